"""Byte accounting: what the cache says it holds is what it holds, and eviction really frees memory.

These tests use a tiny model with a realistic head dimension (64): kvstack counts per-entry metadata
(an int32 position, and a float32 state for h2o/scissorhands) in ``kv_bytes``, which is 4-8 bytes per
entry against ``2 * 64 * 4 = 512`` bytes of keys and values here (with head_dim 16 that metadata alone
would be about 6% for h2o, and a 5% tolerance would be about the head size, not about honesty).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DYNAMIC, METHOD_TEMPLATES, build_model, random_ids, spec_for
from transformers import DynamicCache

import kvstack

HEAD_DIM = 64
LAYERS, KV_HEADS = 2, 2
PROMPT, BUDGET = 400, 200
ELEMENT = 4  # float32


@pytest.fixture
def model():
    return build_model("llama", head_dim=HEAD_DIM)


def _entry_bytes(entries: int) -> int:
    return entries * HEAD_DIM * 2 * ELEMENT


def _tensor_bytes(layer) -> int:
    """Bytes of every tensor the layer object references, found by walking it (not via kv_bytes)."""
    seen: dict[int, torch.Tensor] = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            seen[id(value)] = value
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif value is not None and type(value).__name__ == "RaggedHeads":
            visit(vars(value))

    for name, value in vars(layer).items():
        if name not in ("owner", "pending_chunk"):
            visit(value)
    storages = {}
    for tensor in seen.values():
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("name", sorted(METHOD_TEMPLATES))
def test_kv_bytes_close_to_theory(model, name):
    cache = kvstack.make_cache(model, spec_for(name, BUDGET))
    chunk = 64 if name in DYNAMIC else None
    logits = kvstack.prefill(model, random_ids(PROMPT), cache, chunk_size=chunk)
    for step in range(6):
        if step:
            logits = model(logits.argmax(-1, keepdim=True), **kvstack.cache_kwargs(model, cache)).logits[:, -1]
        grown = step if name not in DYNAMIC else 0
        # Entries computed here: every (layer, head) keeps the budget on average (+ decoding growth).
        expected = _entry_bytes(LAYERS * KV_HEADS * (BUDGET + grown))
        assert cache.kept_entries() == LAYERS * KV_HEADS * (BUDGET + grown)
        assert cache.theoretical_kv_bytes() == expected
        held = cache.kv_bytes()
        assert expected <= held <= 1.05 * expected, (held, expected)
        # kv_bytes is what the layers really reference.
        assert held == sum(_tensor_bytes(layer) for layer in cache.layers)
        assert cache.full_kv_bytes() == (PROMPT + step) * LAYERS * KV_HEADS * HEAD_DIM * 2 * ELEMENT
    summary = cache.summary()
    assert summary["kv_bytes"] == cache.kv_bytes()
    assert summary["full_kv_bytes"] == cache.full_kv_bytes()
    assert summary["tokens_seen"] == PROMPT + 5
    assert summary["compression_ratio"] == pytest.approx(1 - cache.kv_bytes() / cache.full_kv_bytes())
    assert 0.45 < summary["compression_ratio"] < 0.52


def test_adakv_bytes_follow_uneven_head_budgets(model):
    cache = kvstack.make_cache(model, f"adakv(snapkv(budget={BUDGET}), floor=0.2)")
    kvstack.prefill(model, random_ids(PROMPT), cache)
    counts = [layer.head_lengths() for layer in cache.layers]
    assert any(bool((c != BUDGET).any()) for c in counts), "head budgets are even: the test shows nothing"
    expected = _entry_bytes(sum(int(c.sum()) for c in counts))
    assert expected == _entry_bytes(LAYERS * KV_HEADS * BUDGET)
    assert expected <= cache.kv_bytes() <= 1.05 * expected
    assert cache.kv_bytes() == sum(_tensor_bytes(layer) for layer in cache.layers)


@pytest.mark.parametrize("batch", [1, 2])
def test_full_kv_bytes_formula_and_dynamic_cache(model, batch):
    ids = random_ids(PROMPT, batch=batch)
    cache = kvstack.make_cache(model, "full")
    model(ids, **kvstack.cache_kwargs(model, cache))
    expected = PROMPT * LAYERS * KV_HEADS * HEAD_DIM * 2 * ELEMENT * batch
    assert cache.full_kv_bytes() == expected
    reference = DynamicCache(config=model.config)
    model(ids, **kvstack.cache_kwargs(model, reference))
    assert sum(layer.keys.nbytes + layer.values.nbytes for layer in reference.layers) == expected
    assert expected <= cache.kv_bytes() <= 1.05 * expected
    assert cache.theoretical_kv_bytes() == expected


def test_full_kv_bytes_counts_padding(model):
    ids = random_ids(50, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    cache = kvstack.make_cache(model, "keynorm(budget=20)")
    kvstack.prefill(model, ids, cache, attention_mask=mask)
    assert cache.full_kv_bytes() == 50 * LAYERS * KV_HEADS * HEAD_DIM * 2 * ELEMENT * 2
    assert cache.theoretical_kv_bytes() == _entry_bytes(LAYERS * KV_HEADS * 2 * 20)


@pytest.mark.parametrize("spec", ["snapkv(budget=200)", "keynorm(budget=200)", "streamingllm(budget=200)",
                                  "h2o(budget=200)", "pyramidkv(budget=200)"])
@pytest.mark.parametrize("batch", [1, 2])
def test_eviction_frees_memory(model, spec, batch):
    """After compression the tensors themselves are small, not just a shorter view of the old ones."""
    cache = kvstack.make_cache(model, spec)
    model(random_ids(PROMPT, batch=batch), **kvstack.cache_kwargs(model, cache))  # one forward, no end_prompt() help
    for layer in cache.layers:
        budget = layer.budget
        slack = budget // 64 + 2
        assert layer.keys.numel() <= (budget + slack) * KV_HEADS * HEAD_DIM * batch
        assert layer.values.numel() <= (budget + slack) * KV_HEADS * HEAD_DIM * batch
        assert layer.keys.untyped_storage().nbytes() <= (budget + slack) * KV_HEADS * HEAD_DIM * batch * ELEMENT
        assert layer.positions.numel() <= (budget + slack) * KV_HEADS * batch


def test_adakv_eviction_frees_memory(model):
    cache = kvstack.make_cache(model, "adakv(snapkv(budget=200))")
    model(random_ids(PROMPT), **kvstack.cache_kwargs(model, cache))
    for layer in cache.layers:
        assert layer.keys.numel() == 0
        stored = sum(t.untyped_storage().nbytes() for t in layer.ragged.keys)
        assert stored == _entry_bytes(KV_HEADS * 200) // 2  # keys only, exactly the kept entries


def test_chunked_prefill_peak_capacity_is_budget_plus_chunk(model, monkeypatch):
    from kvstack.cache.layer import KVStackLayer

    cache = kvstack.make_cache(model, "h2o(budget=100)")
    peaks = []
    original = KVStackLayer.attend

    def attend(self, *args, **kwargs):
        peaks.append(self.keys.shape[2])  # capacity while the new chunk is held, before eviction
        return original(self, *args, **kwargs)

    monkeypatch.setattr(KVStackLayer, "attend", attend)
    kvstack.prefill(model, random_ids(PROMPT), cache, chunk_size=32)
    assert len(peaks) == LAYERS * (PROMPT // 32 + 1)
    assert max(peaks) <= 100 + 32 + (100 + 32) // 64 + 1
    assert cache.kv_bytes() <= 1.05 * _entry_bytes(LAYERS * KV_HEADS * 100)


def test_bytes_never_under_reported_with_small_heads():
    small = build_model("llama")  # head_dim 16: metadata is a larger share, and must be counted
    for spec in ("h2o(budget=40)", "snapkv(budget=40)", "adakv(keynorm(budget=40))", "full"):
        cache = kvstack.make_cache(small, spec)
        kvstack.prefill(small, random_ids(100), cache)
        assert cache.kv_bytes() >= cache.theoretical_kv_bytes()
        assert cache.kv_bytes() == sum(_tensor_bytes(layer) for layer in cache.layers)


def test_empty_cache_reports_zero(model):
    cache = kvstack.make_cache(model, "snapkv(ratio=0.5)")
    assert cache.kv_bytes() == cache.full_kv_bytes() == cache.theoretical_kv_bytes() == 0
    assert cache.kept_entries() == 0 and cache.tokens_seen() == 0 and cache.tokens_kept() == 0.0
    assert cache.summary()["compression_ratio"] == 0.0


@pytest.mark.parametrize("spec", ["kivi(bits=2)", "kivi(bits=4, sinks=1, residual=31)", "quant(bits=8, residual=16)",
                                  "kvquant(bits=2)"])
def test_a_prompt_read_in_one_forward_is_stored_without_spare_slots(model, spec):
    """The prompt's last chunk is encoded into exactly-sized tensors: its peak holds no growth room."""
    cache = kvstack.make_cache(model, spec)
    model(random_ids(PROMPT + 7), **kvstack.cache_kwargs(model, cache))  # one forward, no end_prompt() trimming
    for layer in cache.layers:
        region = layer.region
        assert region.length > 0 and region.capacity == region.length
        assert layer.capacity == layer.length == PROMPT + 7 - region.length
        assert layer.keys.untyped_storage().nbytes() == layer.length * KV_HEADS * HEAD_DIM * ELEMENT
    before = cache.kv_bytes()
    cache.end_prompt()
    assert cache.kv_bytes() == before  # nothing left to trim
    model(random_ids(1), **kvstack.cache_kwargs(model, cache))  # decoding regrows with room
    assert all(layer.capacity > layer.length for layer in cache.layers)
