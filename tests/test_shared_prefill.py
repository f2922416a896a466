"""One prompt forward shared by several caches (kvstack.prefill_shared) leaves each exactly as its own prefill.

The independent expectation is each method's own :func:`kvstack.prefill` on the same model and prompt:
logits, the entries every layer keeps, the bytes held, and the logits of the tokens decoded afterwards
must all be equal, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_peaky, random_ids
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.cache.shared import share_blocker

SHAREABLE = [
    "full",
    "snapkv(budget={b}, window=8)",
    "snapkv(budget={b}, window=4)",
    "keynorm(budget={b})",
    "random(budget={b})",
    "pyramidkv(budget={b}, window=4)",
    "adakv(snapkv(budget={b}, window=4), floor=0.2)",
    "loki(budget={b}, rank=4)",
]


def _decode(model: torch.nn.Module, cache: kvstack.KVStackCache, logits: torch.Tensor, steps: int) -> list:
    """Greedy tokens and their logits for ``steps`` steps after a prefill."""
    outputs = []
    token = logits.argmax(dim=-1, keepdim=True)
    for _ in range(steps):
        out = model(input_ids=token, **kvstack.cache_kwargs(model, cache), use_cache=True)
        outputs.append(out.logits[:, -1].clone())
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    return outputs


def _kept(cache: kvstack.KVStackCache) -> list:
    return [[p.tolist() for p in row] for layer in cache.layers for row in layer.kept_positions()]


def _check_shared_equals_own(model: torch.nn.Module, ids: torch.Tensor, specs: list[str], steps: int = 4) -> None:
    own = []
    for spec in specs:
        cache = kvstack.make_cache(model, spec, seed=3)
        logits = kvstack.prefill(model, ids, cache)
        own.append((cache, logits, cache.kv_bytes(), _kept(cache)))
    caches = [kvstack.make_cache(model, spec, seed=3) for spec in specs]
    shared_logits = kvstack.prefill_shared(model, ids, caches)
    for spec, cache, (own_cache, own_logits, own_bytes, own_kept) in zip(specs, caches, own, strict=True):
        assert torch.equal(shared_logits, own_logits), spec
        assert cache.kv_bytes() == own_bytes, spec
        assert _kept(cache) == own_kept, spec
        assert cache.summary() == own_cache.summary(), spec
        for a, b in zip(_decode(model, cache, shared_logits, steps), _decode(model, own_cache, own_logits, steps),
                        strict=True):
            assert torch.equal(a, b), spec


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_static_method_ends_a_shared_prefill_exactly_as_its_own(arch: str) -> None:
    model = build_peaky(arch, num_hidden_layers=3)
    ids = random_ids(48, seed=5)
    _check_shared_equals_own(model, ids, [spec.format(b=12) for spec in SHAREABLE])


def test_a_shared_prefill_of_a_batch_equals_each_own_prefill() -> None:
    model = build_peaky("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    ids = random_ids(40, batch=2, seed=7)
    _check_shared_equals_own(model, ids, ["full", "snapkv(budget=10, window=4)", "keynorm(ratio=0.5)"], steps=2)


@settings(max_examples=8, deadline=None)
@given(length=st.integers(min_value=8, max_value=70), budget=st.integers(min_value=6, max_value=40),
       seed=st.integers(min_value=0, max_value=10_000))
def test_shared_prefill_matches_own_prefill_on_random_prompts_and_budgets(length: int, budget: int, seed: int) -> None:
    model = build_peaky("llama", seed=seed % 3)
    ids = random_ids(length, seed=seed)
    specs = ["full", f"snapkv(budget={budget}, window=4)", f"random(budget={budget})",
             f"adakv(snapkv(budget={budget}, window=4), floor=0.2)"]
    _check_shared_equals_own(model, ids, specs, steps=2)


@pytest.mark.parametrize(("spec", "reason"), [
    ("h2o(budget=8)", "evicts while the prompt is read"),
    ("kivi(bits=2)", "encodes entries with kivi"),
    ("snapkv(budget=8, window=4) + kivi(bits=4)", "encodes entries with kivi"),
    ("mikv(snapkv(budget=8, window=4))", "low precision"),
])
def test_prefill_shared_refuses_a_method_that_cannot_share_and_says_why(spec: str, reason: str) -> None:
    model = build_peaky("llama", hidden_size=128)  # head dimension 32: one KIVI group
    ids = random_ids(24)
    caches = [kvstack.make_cache(model, "full"), kvstack.make_cache(model, spec)]
    with pytest.raises(kvstack.InputError, match=rf"cache 1 \(.*\) cannot share a prompt forward: .*{reason}"):
        kvstack.prefill_shared(model, ids, caches)
    assert all(cache.tokens_seen() == 0 for cache in caches)  # refused before anything ran


def test_prefill_shared_refuses_a_cache_that_already_holds_tokens() -> None:
    model = build_peaky("llama")
    used = kvstack.make_cache(model, "full")
    kvstack.prefill(model, random_ids(8), used)
    assert share_blocker(used) == "it already holds tokens"
    with pytest.raises(kvstack.InputError, match="already holds tokens"):
        kvstack.prefill_shared(model, random_ids(16), [kvstack.make_cache(model, "full"), used])
    with pytest.raises(kvstack.InputError, match="at least one cache"):
        kvstack.prefill_shared(model, random_ids(16), [])


@pytest.mark.parametrize("spec", ["full", "snapkv(budget=10, window=4)", "adakv(snapkv(budget=10, window=4))",
                                  "h2o(budget=10)", "loki(budget=10, rank=4)", "kivi(bits=2, group_size=8, residual=8)",
                                  "mikv(h2o(budget=10), group_size=8)"])
def test_a_dropped_cache_is_freed_at_once_without_the_garbage_collector(spec: str) -> None:
    """No reference cycle keeps a used cache's tensors alive: benchmarks that make a cache per sample
    would otherwise hold every earlier sample's cache until the collector's next full pass."""
    import gc
    import weakref

    model = build_peaky("llama", hidden_size=128)
    caches = [kvstack.make_cache(model, spec), kvstack.make_cache(model, "full")]
    logits = kvstack.prefill(model, random_ids(40), caches[0])
    _decode(model, caches[0], logits, 2)
    kvstack.prefill_shared(model, random_ids(40), [caches[1], kvstack.make_cache(model, "keynorm(budget=8)")])
    alive = [weakref.ref(cache) for cache in caches]
    gc.collect()
    gc.disable()
    try:
        caches.clear()
        assert [ref() for ref in alive] == [None, None]
    finally:
        gc.enable()
