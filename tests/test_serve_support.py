"""Shared helpers of the ``kvstack serve`` tests (this file holds no tests).

A tiny random Llama (vocabulary of 200, context of 128) with a word-level tokenizer over its vocabulary: token
``i`` is the word ``w{i}``, so texts and token ids convert into each other by hand, and the expected output of
any request is computed by a separate in-process engine with the same weights (:func:`reference_tokens`).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI

from kvstack.engine import BYTES_PER_MB, Engine, SamplingParams
from kvstack.models import tiny_model

VOCAB = 200
CONTEXT = 128
BLOCK_SIZE = 4
MODEL_NAME = "tiny-llama"
# 2 layers x (K, V) x 2 KV heads x 4 tokens x 16 dims x 4 bytes
BLOCK_BYTES = 2 * 2 * 2 * BLOCK_SIZE * 16 * 4
# A chat template made of vocabulary words, so the prompt it makes is known: w3 <content> w4 per message, w5.
CHAT_TEMPLATE = ("{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
                 "{% if add_generation_prompt %}w5{% endif %}")


def mb(num_blocks: int) -> float:
    """The memory budget of a pool of ``num_blocks`` blocks of the tiny model."""
    return num_blocks * BLOCK_BYTES / BYTES_PER_MB


def build_model() -> Any:
    """The tiny model; every call gives the same weights."""
    return tiny_model("llama", seed=0, vocab_size=VOCAB, max_position_embeddings=CONTEXT)


def word_tokenizer(eos_word: str | None = None) -> Any:
    """A word-level tokenizer over the tiny vocabulary (``w{i}`` is token i) with :data:`CHAT_TEMPLATE`.

    ``eos_word`` makes that word the EOS token (a special token: skipped when decoding).
    """
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {} if eos_word is None else {"eos_token": eos_word}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", **extra)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def words(token_ids: Sequence[int]) -> str:
    """The text the word tokenizer decodes ``token_ids`` to."""
    return " ".join(f"w{token}" for token in token_ids)


def ids_of(text: str) -> list[int]:
    """The token ids of a text of words."""
    return [int(word[1:]) for word in text.split()]


def tiny_engine(num_blocks: int = 96, **options: Any) -> Engine:
    """A fresh engine on the tiny model with a pool of ``num_blocks`` blocks."""
    settings: dict[str, Any] = {"memory_mb": mb(num_blocks), "block_size": BLOCK_SIZE}
    settings.update(options)
    return Engine(build_model(), **settings)


def slow_engine(seconds_per_step: float = 0.005) -> Engine:
    """A tiny engine whose steps take at least ``seconds_per_step`` (so that a request is still running when a
    test acts on it)."""
    engine = tiny_engine()
    real_step = engine.step

    def step() -> Any:
        time.sleep(seconds_per_step)
        return real_step()

    engine.step = step  # type: ignore[method-assign]
    return engine


@functools.lru_cache(maxsize=1)
def _reference_engine() -> Engine:
    return tiny_engine(num_blocks=256)


def reference_tokens(prompts: Sequence[Sequence[int]], max_tokens: int, method: str | None = None,
                     **params: Any) -> list[Any]:
    """What a separate in-process engine generates for ``prompts`` (greedy unless ``params`` say otherwise)."""
    engine = _reference_engine()
    sampling = SamplingParams(max_new_tokens=max_tokens, **params)
    if method is None:
        return engine.generate([list(p) for p in prompts], sampling)
    results = []
    for prompt in prompts:
        request_id = engine.add_request(list(prompt), sampling, method=method)
        while engine.has_unfinished():
            engine.step()
        results.append(engine.get_output(request_id))
    return results


def make_app(engine: Engine | None = None, tokenizer: Any = None, **options: Any) -> FastAPI:
    """The app over ``engine`` (a fresh tiny one by default) with no stop token unless ``options`` give some."""
    from kvstack.serve import create_app

    options.setdefault("stop_token_ids", ())
    return create_app(engine if engine is not None else tiny_engine(), tokenizer or word_tokenizer(), MODEL_NAME,
                      **options)


def sse_payloads(body: str) -> list[Any]:
    """The ``data:`` payloads of a server-sent event stream, checking its framing: JSON objects, then
    ``[DONE]`` (returned as the string ``"[DONE]"``) last."""
    assert body.endswith("\n\n"), body[-50:]
    events = body[:-2].split("\n\n")
    payloads: list[Any] = []
    for event in events:
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {timeout} s")
        time.sleep(interval)


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as ``{(sample name, sorted labels without model_name): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            values[(sample.name, labels)] = sample.value
    return values
