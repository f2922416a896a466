"""The OpenAI request and response objects the server speaks (pydantic models).

Requests take OpenAI's field names; fields OpenAI has and kvstack does not implement are refused with a 400
when set to something that would change the answer (``echo``, ``logprobs``, penalties, ``logit_bias``,
``suffix``, tools, JSON response formats), and fields OpenAI does not have are ignored, so that clients sending
extras keep working. ``kv_policy`` is kvstack's own: a method spec run on the request's KV inside the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatChoice",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ChatMessageOut",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "ContentPart",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "Usage",
    "unsupported_field",
]

MAX_N = 128  # OpenAI's own limit on n
_SEED_RANGE = {"ge": -(2**63), "le": 2**63 - 1 - MAX_N}  # samples are seeded seed + i


class StreamOptions(BaseModel):
    """``stream_options``: with ``include_usage``, a last chunk carries the usage (and ``choices: []``)."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class _GenerationRequest(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="The served model's name (optional here, required by OpenAI).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1 as in OpenAI.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N, description="Choices per prompt.")
    stop: str | list[str] | None = Field(None, description="Stop strings; the text ends before the first one.")
    seed: int | None = Field(None, **_SEED_RANGE)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    kv_policy: str | None = Field(None, description="kvstack extension: a KV method spec for this request, e.g. "
                                                    "'snapkv(budget=256)' or 'h2o(ratio=0.5)'.")
    ignore_eos: bool = Field(False, description="vLLM's extension: do not stop at the end-of-sequence token "
                                                "(benchmarks replaying fixed output lengths)")


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, texts, token ids, or lists of token ids.")
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is supported."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


def unsupported_field(request: _GenerationRequest) -> tuple[str, str] | None:
    """The first field set to something kvstack cannot honour, as ``(param, message)``; None if there is none."""
    checks: list[tuple[str, bool, str]] = [
        ("frequency_penalty", bool(request.frequency_penalty), "frequency_penalty is not supported; leave it 0"),
        ("presence_penalty", bool(request.presence_penalty), "presence_penalty is not supported; leave it 0"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
    ]
    if isinstance(request, CompletionRequest):
        n = request.n or 1
        checks += [
            ("echo", bool(request.echo), "echo is not supported; the prompt is not returned"),
            ("logprobs", request.logprobs is not None, "logprobs are not supported"),
            ("suffix", bool(request.suffix), "suffix (insertion) is not supported"),
            ("best_of", request.best_of not in (None, n), "best_of is not supported; use n"),
        ]
    if isinstance(request, ChatCompletionRequest):
        response_type = (request.response_format or {}).get("type", "text")
        checks += [
            ("logprobs", bool(request.logprobs) or bool(request.top_logprobs), "logprobs are not supported"),
            ("tools", bool(request.tools), "tools (function calling) are not supported"),
            ("response_format", response_type != "text", f"response_format {response_type!r} is not supported; "
                                                         "only 'text'"),
        ]
    for param, refused, message in checks:
        if refused:
            return param, message
    return None


class Usage(BaseModel):
    """Token counts of a response: every prompt once, every choice's generated tokens."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    """One choice of a completion."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    """A (non-streamed) completion: ``object`` is ``text_completion``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessageOut(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    """A (non-streamed) chat completion: ``object`` is ``chat.completion``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvstack"
    max_model_len: int | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
