"""The FastAPI app: OpenAI's completions, chat completions and models endpoints over one engine, plus health
and Prometheus metrics.

:func:`create_app` builds it from an :class:`~kvstack.engine.Engine` (or an :class:`EngineLoop` around one) and
the model's tokenizer; it needs no socket (tests drive it with Starlette's ``TestClient``), and ``kvstack serve``
runs it under uvicorn. Each HTTP request tokenizes its prompt(s) on the event loop, queues one engine request
per prompt on the engine loop's thread, and turns the sample events coming back into OpenAI's objects, streamed
as server-sent events or returned whole. A client that goes away aborts its engine requests, which frees their
KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kvstack.engine import Engine, SamplingParams
from kvstack.engine.compression import engine_method
from kvstack.errors import KVStackError
from kvstack.serve.detokenizer import IncrementalDetokenizer
from kvstack.serve.engine_loop import (
    EngineLoop,
    EngineLoopStoppedError,
    QueueFullError,
    RequestHandle,
    SampleEvent,
    Submission,
)
from kvstack.serve.errors import (
    AUTHENTICATION_ERROR,
    INVALID_REQUEST_ERROR,
    NOT_FOUND_ERROR,
    RATE_LIMIT_ERROR,
    SERVER_ERROR,
    OpenAIError,
    error_response,
    install_error_handlers,
)
from kvstack.serve.metrics import ServerMetrics
from kvstack.serve.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    unsupported_field,
)

__all__ = ["DEFAULT_CHAT_MAX_TOKENS", "DEFAULT_COMPLETION_MAX_TOKENS", "DEFAULT_MAX_QUEUE", "ServeLimits",
           "create_app"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256
"""Requests (one per prompt) waiting or running at most before new ones get 429."""
DEFAULT_COMPLETION_MAX_TOKENS = 16
"""``max_tokens`` of a completion that gives none (OpenAI's default)."""
DEFAULT_CHAT_MAX_TOKENS = 256
"""``max_tokens`` of a chat completion that gives none (capped by the context and ``max_tokens_limit``)."""

_ENGINE_STOPS = ("eos", "stop")  # engine finish reasons that are OpenAI's "stop"


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for.

    Attributes
    ----------
    max_prompt_tokens : int or None
        Longest prompt in tokens (None: the model's context).
    max_tokens_limit : int or None
        Largest ``max_tokens`` (None: only the context limits it).
    max_queue : int
        Requests (one per prompt) in flight at most; more get 429.
    """

    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    max_queue: int = DEFAULT_MAX_QUEUE

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_queue"):
            value = getattr(self, name)
            if value is None and name != "max_queue":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVStackError(f"{name} must be an integer >= 1, got {value!r}")


def create_app(
    engine: Engine | EngineLoop,
    tokenizer: Any,
    model_name: str,
    *,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    api_key: str | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> FastAPI:
    """Build the OpenAI-compatible app over an engine.

    Parameters
    ----------
    engine : Engine or EngineLoop
        The engine (wrapped in a new :class:`EngineLoop`), or a loop around one. The app's lifespan starts the
        loop if it is not running and then stops it at shutdown; it never closes the engine (its owner does,
        after shutdown: that writes tiered blocks to disk).
    tokenizer
        The model's HuggingFace tokenizer: prompts are encoded and outputs decoded with it (chat prompts through
        its chat template). When it is also the engine's own tokenizer (for stop strings) the server works on a
        copy: a fast tokenizer must not be used by two threads at once.
    model_name : str
        The name clients pass as ``model`` and ``/v1/models`` lists; other names get 404 ``model_not_found``.
    max_prompt_tokens : int or None, optional
        Longest prompt in tokens; None: the model's context.
    max_tokens_limit : int or None, optional
        Largest ``max_tokens`` a request may ask for; None: only the context limits it.
    max_queue : int, optional
        Requests (one per prompt) in flight at most; a request that would pass it gets 429.
    api_key : str or None, optional
        When set, every ``/v1`` endpoint needs ``Authorization: Bearer <api_key>`` (401 otherwise); ``/health``
        and ``/metrics`` stay open.
    stop_token_ids : sequence of int or None, optional
        Tokens that end a choice (OpenAI's ``finish_reason: "stop"``); None: the tokenizer's EOS token.

    Returns
    -------
    FastAPI
        The app; ``app.state.kvstack`` holds its engine loop (``.engine_loop``) and metrics (``.metrics``).

    Raises
    ------
    KVStackError
        On a limit that is not a positive integer, an empty model name or API key, or no tokenizer.
    """
    loop = engine if isinstance(engine, EngineLoop) else EngineLoop(engine)
    limits = ServeLimits(max_prompt_tokens, max_tokens_limit, max_queue)
    if tokenizer is None:
        raise KVStackError("the server needs the model's tokenizer (to encode prompts and decode outputs)")
    if not isinstance(model_name, str) or not model_name.strip():
        raise KVStackError(f"model_name must be a non-empty string, got {model_name!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise KVStackError("api_key must be a non-empty string (or None for no authentication)")
    server = _Server(loop, tokenizer, model_name, limits, stop_token_ids)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started_here = not loop.is_running
        loop.start()
        try:
            yield
        finally:
            if started_here:
                await asyncio.to_thread(loop.stop)

    app = FastAPI(title="kvstack", description="OpenAI-compatible server over kvstack's paged engine",
                  lifespan=lifespan)
    app.state.kvstack = server
    install_error_handlers(app)
    if api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    _add_routes(app, server)
    return app


# ----------------------------------------------------------------------------------------------------------
# The server's state and request preparation
# ----------------------------------------------------------------------------------------------------------


class _Server:
    """What the handlers share: the engine loop, the tokenizer, the limits and the metrics."""

    def __init__(self, loop: EngineLoop, tokenizer: Any, model_name: str, limits: ServeLimits,
                 stop_token_ids: Sequence[int] | None) -> None:
        engine = loop.engine
        self.engine_loop = loop
        engine_tokenizer = getattr(engine, "tokenizer", None)
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is engine_tokenizer else tokenizer
        # Stop strings go to the engine (to finish early) only when it can decode; the server cuts the text
        # at them in any case.
        self.engine_reads_stop_strings = engine_tokenizer is not None
        self.model_name = model_name
        self.limits = limits
        self.context: int | None = engine.max_context
        self.num_layers: int = engine.pool.num_layers
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            stop_token_ids = () if eos is None else (eos,)
        self.stop_token_ids = tuple(int(token) for token in stop_token_ids)
        self.created = int(time.time())
        self.metrics = ServerMetrics(loop.snapshot, model_name)

    # -------------------------------------------------------------- checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                              error_type=NOT_FOUND_ERROR, param="model", code="model_not_found")

    def check_prompt(self, prompt: list[int], param: str) -> None:
        """Refuse an empty prompt or one over the prompt limit, in OpenAI's terms."""
        if not prompt:
            raise OpenAIError(400, "the prompt is empty; give at least one token", param=param)
        limit = self.limits.max_prompt_tokens or self.context
        if limit is not None and len(prompt) > limit:
            what = "the server's limit" if self.limits.max_prompt_tokens else "the model's context"
            raise OpenAIError(400, f"the prompt has {len(prompt)} tokens, more than {what} of {limit}",
                              param=param, code="context_length_exceeded")

    def max_tokens(self, requested: int | None, default: int, prompt_length: int) -> int:
        """The ``max_tokens`` of one prompt: the request's (checked) or the default capped by what fits."""
        limit = self.limits.max_tokens_limit
        room = None if self.context is None else self.context - prompt_length + 1  # the last token needs no KV
        if requested is None:
            caps = [default, *(cap for cap in (limit, room) if cap is not None)]
            return max(1, min(caps))
        if limit is not None and requested > limit:
            raise OpenAIError(400, f"max_tokens={requested} is more than the server's limit of {limit}",
                              param="max_tokens")
        if room is not None and requested > room:
            raise OpenAIError(400, f"{prompt_length} prompt tokens plus max_tokens={requested} run past the model's "
                              f"context of {self.context}; lower max_tokens to at most {room}",
                              param="max_tokens", code="context_length_exceeded")
        return requested

    def check_kv_policy(self, spec: str | None, prompt_length: int) -> None:
        """Refuse a kv_policy the engine cannot run, with the engine's own one-line message."""
        if spec is None:
            return
        try:
            engine_method(spec, prompt_length, self.num_layers)
        except KVStackError as error:
            raise OpenAIError(400, f"kv_policy {spec!r}: {error}", param="kv_policy") from None

    # -------------------------------------------------------------- prompts
    def completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """The token ids of each prompt of a completion request."""
        if isinstance(prompt, str):
            texts: list[str] = [prompt]
        elif prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        elif prompt and all(isinstance(item, list) for item in prompt):
            return [list(ids) for ids in prompt]  # type: ignore[union-attr]
        elif prompt and all(isinstance(item, str) for item in prompt):
            texts = list(prompt)  # type: ignore[arg-type]
        else:
            raise OpenAIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                                   "lists of token ids, and not empty", param="prompt")
        return [list(self.tokenizer(text)["input_ids"]) for text in texts]

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """The token ids of a conversation through the model's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                              param="messages")
        messages = []
        for position, message in enumerate(body.messages):
            content = message.content
            if isinstance(content, list):
                refused = [part.type for part in content if part.type != "text"]
                if refused:
                    raise OpenAIError(400, f"content parts of type {refused[0]!r} are not supported; only 'text'",
                                      param=f"messages.{position}.content")
                content = "\n".join(part.text or "" for part in content)
            role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for system
            messages.append({"role": role, "content": content or ""})
        try:
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)
        except Exception as error:  # the template's own checks (roles must alternate, ...) are the client's
            raise OpenAIError(400, f"the chat template refused the messages: {error}", param="messages") from None
        return list(encoded["input_ids"])

    def sampling_params(self, body: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                        stop: tuple[str, ...]) -> SamplingParams:
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else float(body.temperature),
                top_p=1.0 if body.top_p is None else float(body.top_p),
                seed=body.seed,
                stop_token_ids=() if body.ignore_eos else self.stop_token_ids,
                stop=stop if self.engine_reads_stop_strings else (),
                n=body.n or 1,
            )
        except KVStackError as error:
            raise OpenAIError(400, str(error)) from None


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(strings):
        raise OpenAIError(400, "stop strings must not be empty", param="stop")
    return strings


# ----------------------------------------------------------------------------------------------------------
# One generation request: its choices, their engine requests, and what goes back to the client
# ----------------------------------------------------------------------------------------------------------

_DISCONNECTED = object()  # put in a run's event queue when its client goes away


@dataclasses.dataclass(eq=False)
class _Choice:
    """One choice (one sample of one prompt) as the client sees it."""

    index: int
    detokenizer: IncrementalDetokenizer
    num_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", or "abort" / "error" (never sent as a finish reason)
    error: str | None = None
    engine_reason: str | None = None  # the engine's finish reason ("eos", "aborted", ...)
    engine_finished: bool = False  # the engine reported this sample finished (no abort needed)
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclasses.dataclass(frozen=True)
class _Update:
    """What one batch of events changed in one choice: new text, and its finish reason if it just ended."""

    choice: _Choice
    text: str
    finished: bool


class _Run:
    """One completions or chat request from submission to its last byte."""

    def __init__(self, server: _Server, request: Request, prompts: list[list[int]], params: list[SamplingParams],
                 kv_policy: str | None, stop: tuple[str, ...], *, chat: bool, include_usage: bool) -> None:
        self.server = server
        self.request = request
        self.prompts = prompts
        self.params = params
        self.kv_policy = kv_policy
        self.chat = chat
        self.include_usage = include_usage
        self.n = params[0].n
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrived = time.perf_counter()
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.choices = [_Choice(index, IncrementalDetokenizer(server.tokenizer, stop))
                        for index in range(len(prompts) * self.n)]
        self.handles: list[RequestHandle] = []
        self.accepted = False  # the engine took every prompt: from then on each choice is counted as it ends
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    # -------------------------------------------------------------- submission
    async def submit(self) -> None:
        """Queue one engine request per prompt and wait until the engine accepted them all.

        Raises
        ------
        OpenAIError
            429 when the queue is full, 503 when the engine loop is not running, 400 when the engine refused a
            prompt (every other prompt of the request is then aborted).
        """
        submissions = [Submission(prompt, params, self.kv_policy)
                       for prompt, params in zip(self.prompts, self.params, strict=True)]
        try:
            self.handles = self.server.engine_loop.submit(submissions, self.events,
                                                          max_in_flight=self.server.limits.max_queue)
        except QueueFullError as error:
            raise OpenAIError(429, f"the server is busy: {error}; retry later", error_type=RATE_LIMIT_ERROR,
                              code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except EngineLoopStoppedError as error:
            raise OpenAIError(503, f"the server is not accepting requests: {error}",
                              error_type=SERVER_ERROR) from None
        results = await asyncio.gather(*(handle.accepted for handle in self.handles), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            self.abort()
            error = failures[0]
            if isinstance(error, EngineLoopStoppedError):
                raise OpenAIError(503, f"the server is not accepting requests: {error}", error_type=SERVER_ERROR)
            if not isinstance(error, KVStackError):  # not the request's fault: the engine raised something else
                raise OpenAIError(500, f"the engine could not queue the request: {type(error).__name__}: {error}",
                                  error_type=SERVER_ERROR)
            raise OpenAIError(400, str(error), error_type=INVALID_REQUEST_ERROR)
        self.accepted = True
        for prompt in self.prompts:
            self.server.metrics.record_prompt(len(prompt))

    # -------------------------------------------------------------- events
    def watch_disconnect(self) -> None:
        """Watch for the client going away (until :meth:`stop_watching`)."""
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.events.put_nowait(_DISCONNECTED)
                return

    async def stop_watching(self) -> None:
        """Stop the watcher; after it returns nobody else reads the request's messages."""
        if self._watcher is not None:
            self._watcher.cancel()
            # A watcher that failed (a server whose receive raised) only cost the disconnect detection.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None

    @property
    def complete(self) -> bool:
        return all(choice.finish_reason is not None for choice in self.choices)

    @property
    def failure(self) -> _Choice | None:
        """The first choice that ended in an error (the engine failed it, or the server shut down)."""
        return next((choice for choice in self.choices if choice.finish_reason == "error"), None)

    async def next_updates(self) -> list[_Update]:
        """Wait for the next events and apply them (and any already queued); sets ``disconnected`` when the
        client went away."""
        updates: list[_Update] = []
        item = await self.events.get()
        while True:
            if item is _DISCONNECTED:
                self.disconnected = True
            else:
                update = self._apply(item)
                if update is not None:
                    updates.append(update)
            if self.events.empty():
                return updates
            item = self.events.get_nowait()

    def _apply(self, event: SampleEvent) -> _Update | None:
        choice = self.choices[event.tag * self.n + event.sample_index]
        if event.finished:
            choice.engine_finished = True
            choice.engine_reason = event.finish_reason
        if choice.finish_reason is not None:  # already ended here (a stop string); the engine may run on
            return None
        if event.token_ids:
            now = time.perf_counter()
            choice.num_tokens += len(event.token_ids)
            choice.first_token_at = choice.first_token_at or now
            choice.last_token_at = now
        if event.finished and event.finish_reason not in ("length", *_ENGINE_STOPS):
            message = event.error or ("the engine failed this request" if event.finish_reason == "error" else
                                      f"the engine ended this request ({event.finish_reason})")
            self._end(choice, "error", message)
            return _Update(choice, "", True)
        text = choice.detokenizer.add(event.token_ids, final=event.finished)
        if choice.detokenizer.stopped:
            self._end(choice, "stop")
        elif event.finished:
            self._end(choice, "stop" if event.finish_reason in _ENGINE_STOPS else "length")
        return _Update(choice, text, choice.finish_reason is not None)

    def _end(self, choice: _Choice, reason: str, error: str | None = None) -> None:
        """End a choice once, and count it in the metrics."""
        choice.finish_reason = reason
        choice.error = error
        ttft = tpot = e2e = None
        if reason in ("stop", "length") and choice.first_token_at is not None:
            ttft = choice.first_token_at - self.arrived
            e2e = (choice.last_token_at or choice.first_token_at) - self.arrived
            if choice.num_tokens > 1 and choice.last_token_at is not None:
                tpot = (choice.last_token_at - choice.first_token_at) / (choice.num_tokens - 1)
        self.server.metrics.record_choice(reason, choice.num_tokens, ttft, tpot, e2e)

    def abort(self) -> None:
        """End every choice still going (reason ``abort``) and abort the engine requests still running; safe to
        call at any point, any number of times."""
        if self.accepted:  # a refused request (400) ran nothing: no choice of it is counted
            for choice in self.choices:
                if choice.finish_reason is None:
                    self._end(choice, "abort")
        for handle in self.handles:
            samples = self.choices[handle.tag * self.n : (handle.tag + 1) * self.n]
            if not all(choice.engine_finished for choice in samples):
                handle.abort()
        if self._watcher is not None:
            self._watcher.cancel()

    # -------------------------------------------------------------- what the client gets
    def usage(self) -> Usage:
        prompt_tokens = sum(len(prompt) for prompt in self.prompts)
        completion_tokens = sum(choice.num_tokens for choice in self.choices)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def failure_error(self, choice: _Choice) -> OpenAIError:
        message = f"generation failed: {choice.error}"
        # aborted by the server itself (it is stopping): unavailable rather than broken
        return OpenAIError(503 if choice.engine_reason == "aborted" else 500, message, error_type=SERVER_ERROR)

    def response(self) -> JSONResponse:
        """The whole (non-streamed) response."""
        common = {"id": self.id, "created": self.created, "model": self.server.model_name, "usage": self.usage()}
        if self.chat:
            body: ChatCompletionResponse | CompletionResponse = ChatCompletionResponse(
                choices=[ChatChoice(index=choice.index, message=ChatMessageOut(content=choice.detokenizer.text),
                                    finish_reason=choice.finish_reason)  # type: ignore[arg-type]
                         for choice in self.choices], **common)
        else:
            body = CompletionResponse(
                choices=[CompletionChoice(index=choice.index, text=choice.detokenizer.text,
                                          finish_reason=choice.finish_reason)  # type: ignore[arg-type]
                         for choice in self.choices], **common)
        return JSONResponse(body.model_dump(mode="json"))

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.server.model_name,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:  # OpenAI: every chunk has "usage" then, null but on the last one
            payload["usage"] = None if usage is None else usage.model_dump()
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def _choice_chunk(self, index: int, text: str | None, finish_reason: str | None, *, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return self._chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
        return self._chunk([{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}])

    def _update_chunks(self, updates: list[_Update]) -> list[str]:
        chunks = []
        for update in updates:
            if update.text:
                chunks.append(self._choice_chunk(update.choice.index, update.text, None))
            if update.finished and update.choice.finish_reason in ("stop", "length"):
                chunks.append(self._choice_chunk(update.choice.index, None if self.chat else "",
                                                 update.choice.finish_reason))
        return chunks

    async def stream(self, first: list[_Update]) -> AsyncIterator[str]:
        """The server-sent events: the chunks, an error event if a choice failed, the usage chunk, ``[DONE]``."""
        try:
            if self.chat:
                for choice in self.choices:
                    yield self._choice_chunk(choice.index, "", None, role=True)
            updates = first
            while True:
                for chunk in self._update_chunks(updates):
                    yield chunk
                failed = self.failure
                if failed is not None:
                    error = self.failure_error(failed)
                    yield f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"
                    break
                if self.complete:
                    if self.include_usage:
                        yield self._chunk([], self.usage())
                    break
                updates = await self.next_updates()
            yield "data: [DONE]\n\n"
        finally:
            self.abort()


class _EventStreamResponse(StreamingResponse):
    """Server-sent events that call ``on_close`` however the response ends (finished, client gone, cancelled),
    even before its body was iterated."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _generate(server: _Server, request: Request, body: CompletionRequest | ChatCompletionRequest,
                    prompts: list[list[int]], *, chat: bool) -> Response:
    """Run a completions or chat request: checks, submission, then the whole response or the event stream."""
    param = "messages" if chat else "prompt"
    if len(prompts) > server.limits.max_queue:
        raise OpenAIError(400, f"{len(prompts)} prompts in one request are more than the server's queue of "
                               f"{server.limits.max_queue}", param=param)
    requested = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        requested = body.max_completion_tokens
    default = DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS
    stop = _stop_strings(body.stop)
    params = []
    for prompt in prompts:
        server.check_prompt(prompt, param)
        server.check_kv_policy(body.kv_policy, len(prompt))
        params.append(server.sampling_params(body, server.max_tokens(requested, default, len(prompt)), stop))
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    run = _Run(server, request, prompts, params, body.kv_policy, stop, chat=chat, include_usage=include_usage)
    handed_over = False
    try:
        await run.submit()
        run.watch_disconnect()
        updates: list[_Update] = []
        # Wait for the first event even when streaming: a request that fails before its first token gets a
        # plain 500 rather than a 200 stream holding an error.
        while not run.disconnected and not run.complete and not (updates and body.stream):
            updates += await run.next_updates()
            if run.failure is not None and not (body.stream and any(choice.num_tokens for choice in run.choices)):
                raise run.failure_error(run.failure)
        if run.disconnected:
            return Response(status_code=499)  # nobody reads it: the client is gone
        await run.stop_watching()
        if body.stream:
            handed_over = True
            return _EventStreamResponse(run.stream(updates), on_close=run.abort)
        return run.response()
    finally:
        if not handed_over:
            run.abort()


# ----------------------------------------------------------------------------------------------------------
# Routes and authentication
# ----------------------------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, server: _Server) -> None:
    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        """200 while the engine loop runs, 503 once it stopped."""
        if server.engine_loop.is_running:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "the engine loop is not running"}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> ModelCard:
        return ModelCard(id=server.model_name, created=server.created, max_model_len=server.context)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The one model this server serves."""
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def retrieve_model(model_id: str) -> ModelCard:
        """The served model, or 404 ``model_not_found``."""
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/completions", response_model=None)
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        """OpenAI's text completions, streamed (``stream: true``) or not."""
        server.check_model(body.model)
        _refuse_unsupported(body)
        return await _generate(server, request, body, server.completion_prompts(body.prompt), chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI's chat completions through the model's chat template, streamed or not."""
        server.check_model(body.model)
        _refuse_unsupported(body)
        return await _generate(server, request, body, [server.chat_prompt(body)], chat=True)


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    refused = unsupported_field(body)
    if refused is not None:
        param, message = refused
        raise OpenAIError(400, message, param=param, code="unsupported_parameter")


class _ApiKeyMiddleware:
    """Every ``/v1`` request needs ``Authorization: Bearer <key>``; other paths (health, metrics) stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")
            normalised = b"Bearer " + key.strip() if scheme.lower() == b"bearer" else b""
            if not hmac.compare_digest(normalised, self._expected):
                message = "incorrect API key provided" if given else "no API key provided; send 'Authorization: " \
                                                                     "Bearer <key>'"
                response = error_response(401, message, error_type=AUTHENTICATION_ERROR, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
