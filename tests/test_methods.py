"""Selection methods: each keeps exactly its budget, and keeps what its paper says it keeps.

What a method should keep is recomputed here from a plain ``DynamicCache`` run of the same prompt
(keys read from the cache, queries captured from ``q_proj`` with hooks and rotated with transformers'
``apply_rotary_pos_emb``), never with kvstack's own scoring code.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import (
    DYNAMIC,
    STATIC,
    UNIFORM,
    assert_top_selection,
    build_model,
    build_peaky,
    causal_weights,
    kept_sets,
    random_ids,
    reference_qk,
    spec_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.cache.layer import KVStackLayer

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


@functools.lru_cache(maxsize=None)
def peaky(kind: str = "mha") -> torch.nn.Module:
    """Cached peaky models (weights never change; make_cache only selects the attention function)."""
    if kind == "gqa":
        return build_peaky("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    return build_peaky("llama")


@functools.lru_cache(maxsize=None)
def peaky_ref(kind: str = "mha") -> torch.nn.Module:
    """A second instance with the same weights and transformers' own attention: the reference."""
    if kind == "gqa":
        return build_peaky("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    return build_peaky("llama")


def _run(model, spec: str, ids: torch.Tensor, chunk_size=None, decode: int = 0, seed: int = 0):
    cache = kvstack.make_cache(model, spec, seed=seed)
    with torch.no_grad():
        logits = kvstack.prefill(model, ids, cache, chunk_size=chunk_size)
        for _ in range(decode):
            logits = model(logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]
    return cache


# ------------------------------------------------------------------------------------------------------
# Every method keeps exactly its budget
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNIFORM)
def test_uniform_methods_keep_exactly_the_budget(llama, name):
    cache = _run(llama, spec_for(name, 40), random_ids(100))
    for layer in cache.layers:
        assert layer.head_lengths().tolist() == [[40, 40]]
        assert layer.budget == 40
        assert all(len(p) == 40 for p in layer.kept_positions()[0])
    assert cache.tokens_kept() == 40
    assert cache.tokens_seen() == 100
    for step in range(1, 11):
        llama(random_ids(1, seed=step), past_key_values=cache)
        expected = 40 + step if name in STATIC else 40
        for layer in cache.layers:
            assert layer.head_lengths().tolist() == [[expected, expected]]
            kept = layer.kept_positions()[0]
            assert all(len(set(p.tolist())) == expected for p in kept), "a position is held twice"
            if name != "tova":  # TOVA may drop the current token itself when it gets the least attention
                assert all(int(p.max()) == 100 + step - 1 for p in kept), "the newest token is not held"
    assert cache.tokens_seen() == 110


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_methods_hold_budget_through_chunked_prefill(llama, name, monkeypatch):
    budget, chunk = 40, 16
    peaks: list[int] = []
    after: list[list[int]] = []
    original = KVStackLayer.attend

    def attend(self, *args, **kwargs):
        peaks.append(self.length)  # the new chunk is stored, nothing evicted yet
        out = original(self, *args, **kwargs)
        assert self.length <= budget
        return out

    monkeypatch.setattr(KVStackLayer, "attend", attend)
    cache = kvstack.make_cache(llama, spec_for(name, budget))
    handle = llama.register_forward_hook(lambda *_: after.append([layer.length for layer in cache.layers]))
    try:
        kvstack.prefill(llama, random_ids(100), cache, chunk_size=chunk)
        assert len(after) == math.ceil(100 / chunk)
        assert all(length <= budget for lengths in after for length in lengths)
        assert after[-1] == [budget, budget]
        assert max(peaks) <= budget + chunk
        for layer in cache.layers:
            assert layer.keys.shape[2] <= budget + chunk + (budget + chunk) // 64 + 2
        for step in range(10):
            llama(random_ids(1, seed=step), past_key_values=cache)
            assert after[-1] == [budget, budget]
    finally:
        handle.remove()


@pytest.mark.parametrize("name", STATIC)
def test_static_methods_compress_only_at_the_end_of_a_chunked_prompt(llama, name):
    lengths: list[int] = []
    cache = kvstack.make_cache(llama, spec_for(name, 40))
    handle = llama.register_forward_hook(lambda *_: lengths.append(cache.kept_entries()))
    try:
        kvstack.prefill(llama, random_ids(100), cache, chunk_size=16)
    finally:
        handle.remove()
    # Chunks of 16; with an observation window (32) the last chunk is merged up to hold the window.
    stops = (16, 32, 48, 64) if name in ("snapkv", "pyramidkv", "adakv") else (16, 32, 48, 64, 80, 96)
    assert lengths[:-1] == [2 * 2 * stop for stop in stops]
    assert lengths[-1] == 2 * 2 * 40


@pytest.mark.parametrize("name", ["keynorm", "snapkv", "random", "pyramidkv", "adakv"])
def test_static_chunked_prefill_keeps_what_one_forward_keeps(name):
    model = peaky()
    ids = random_ids(100, seed=1)
    one = _run(model, spec_for(name, 40), ids)
    chunked = _run(model, spec_for(name, 40), ids, chunk_size=16)
    for a, b in zip(one.layers, chunked.layers, strict=True):
        assert kept_sets(a) == kept_sets(b)


@pytest.mark.parametrize(
    ("name", "spec"),
    [("snapkv", "snapkv(ratio={r})"), ("keynorm", "keynorm(ratio={r})"), ("random", "random(ratio={r})"),
     ("streamingllm", "streamingllm(ratio={r})"), ("h2o", "h2o(ratio={r})"), ("tova", "tova(ratio={r})"),
     ("scissorhands", "scissorhands(ratio={r})")],
)
@pytest.mark.parametrize(("ratio", "prompt"), [(0.6, 100), (0.55, 101), (0.3, 77)])
def test_ratio_keeps_rounded_fraction_of_the_prompt(llama, name, spec, ratio, prompt):
    kept = round((1 - ratio) * prompt)
    chunk = 16 if name in DYNAMIC else None
    cache = _run(llama, spec.format(r=ratio), random_ids(prompt), chunk_size=chunk, decode=3)
    expected = kept + 3 if name in STATIC else kept
    for layer in cache.layers:
        assert layer.head_lengths().tolist() == [[expected, expected]]


def test_ratio_budget_with_generate(llama):
    """Without kvstack.prefill the first forward is the prompt: ratio refers to it."""
    cache = kvstack.make_cache(llama, "h2o(ratio=0.75)")
    llama.generate(random_ids(80), past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert [layer.length for layer in cache.layers] == [20, 20]


def test_batch_rows_keep_their_own_budget(llama):
    ids = random_ids(60, batch=3, seed=2)
    cache = _run(llama, "keynorm(budget=20)", ids)
    for layer in cache.layers:
        assert layer.head_lengths().tolist() == [[20, 20]] * 3
    assert cache.kept_entries() == 2 * 3 * 2 * 20


# ------------------------------------------------------------------------------------------------------
# Selection correctness against independent recomputations (hypothesis)
# ------------------------------------------------------------------------------------------------------


@SETTINGS
@given(length=st.integers(12, 90), data=st.data(), seed=st.integers(0, 10_000))
def test_keynorm_keeps_smallest_norm_keys(length, data, seed):
    budget = data.draw(st.integers(1, length - 1), label="budget")
    ids = random_ids(length, seed=seed)
    cache = _run(peaky(), f"keynorm(budget={budget})", ids)
    _, keys = reference_qk(peaky_ref(), ids)
    for index, layer in enumerate(cache.layers):
        norms = keys[index][0].double().norm(dim=-1)  # [H, T]
        for h, kept in enumerate(kept_sets(layer)):
            assert_top_selection(kept, -norms[h], list(range(length)), budget, 1e-4, f"layer {index} head {h}")


@SETTINGS
@given(length=st.integers(2, 90), budget=st.integers(1, 40), sinks=st.integers(0, 6), decode=st.integers(0, 6),
       chunk=st.sampled_from([None, 1, 5, 16]), seed=st.integers(0, 10_000))
def test_streamingllm_keeps_sinks_and_recent(length, budget, sinks, decode, chunk, seed):
    budget = max(budget, sinks + 1)
    model = build_model("llama") if seed % 2 else peaky()
    ids = random_ids(length, seed=seed)
    cache = kvstack.make_cache(model, f"streamingllm(budget={budget}, sinks={sinks})")
    logits = kvstack.prefill(model, ids, cache, chunk_size=chunk)
    seen = length
    for step in range(decode + 1):
        if step:
            logits = model(logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]
            seen += 1
        if seen <= budget:
            expected = set(range(seen))
        else:
            expected = set(range(sinks)) | set(range(seen - (budget - sinks), seen))
        for layer in cache.layers:
            assert kept_sets(layer) == [expected, expected]
        assert cache.get_seq_length() == seen


def _snapkv_expected(query, keys, window, kernel, pooling):
    """SnapKV scores ``[H, T]`` for one sequence, from scratch: attention of the last ``window`` queries summed
    per key, averaged over each KV group's query heads, pooled over ``kernel`` neighbours by position."""
    weights = causal_weights(query, keys)  # [Hq, T, T]
    length = weights.shape[-1]
    heads = keys.shape[0]
    per_q = weights[:, length - window :, :].sum(dim=1)  # [Hq, T]
    per_kv = per_q.view(heads, -1, length).mean(dim=1)  # [H, T]
    half = kernel // 2
    pooled = torch.empty_like(per_kv)
    for j in range(length):
        part = per_kv[:, max(0, j - half) : min(length, j + half + 1)]
        pooled[:, j] = part.mean(dim=-1) if pooling == "avg" else part.max(dim=-1).values
    return pooled


def _check_snapkv(model_kind, length, window, budget, kernel, pooling, seed):
    model = peaky(model_kind)
    ids = random_ids(length, seed=seed)
    spec = f"snapkv(budget={budget}, window={window}, kernel={kernel}, pooling='{pooling}')"
    cache = _run(model, spec, ids)
    queries, keys = reference_qk(peaky_ref(model_kind), ids)
    for index, layer in enumerate(cache.layers):
        scores = _snapkv_expected(queries[index][0], keys[index][0], window, kernel, pooling)
        for h, kept in enumerate(kept_sets(layer)):
            assert set(range(length - window, length)) <= kept, "the observation window is not kept"
            assert_top_selection(kept, scores[h], list(range(length - window)), budget - window, 1e-5,
                                 f"layer {index} head {h}")


@SETTINGS
@given(length=st.integers(20, 90), window=st.sampled_from([1, 4, 8, 16]), data=st.data(),
       kernel=st.sampled_from([1, 3, 5, 7]), pooling=st.sampled_from(["avg", "max"]), seed=st.integers(0, 10_000))
def test_snapkv_keeps_window_and_top_scores(length, window, data, kernel, pooling, seed):
    budget = data.draw(st.integers(window, length - 1), label="budget")
    _check_snapkv("mha", length, window, budget, kernel, pooling, seed)


def test_snapkv_default_parameters():
    _check_snapkv("mha", 100, 32, 40, 7, "avg", 0)


@SETTINGS
@given(length=st.integers(20, 80), data=st.data(), seed=st.integers(0, 10_000))
def test_snapkv_gqa_aggregates_the_group(length, data, seed):
    """6 query heads / 2 KV heads: each KV head's score aggregates its 3 query heads."""
    budget = data.draw(st.integers(8, length - 1), label="budget")
    _check_snapkv("gqa", length, 8, budget, 7, "avg", seed)


def test_gqa_storage_is_per_kv_head(gqa_model):
    cache = _run(gqa_model, "snapkv(budget=40)", random_ids(60))
    for layer in cache.layers:
        assert layer.keys.shape[1] == gqa_model.config.num_key_value_heads == 2
        assert layer.values.shape[1] == 2
        assert layer.head_lengths().shape == (1, 2)
    assert cache.kept_entries() == 2 * 2 * 40


@SETTINGS
@given(length=st.integers(10, 80), data=st.data(), recent=st.one_of(st.none(), st.integers(0, 12)),
       seed=st.integers(0, 10_000))
def test_h2o_single_forward_keeps_recent_and_heavy_hitters(length, data, recent, seed):
    budget = data.draw(st.integers(max(recent or 0, 1), length - 1), label="budget")
    spec = f"h2o(budget={budget})" if recent is None else f"h2o(budget={budget}, recent={recent})"
    ids = random_ids(length, seed=seed)
    cache = _run(peaky(), spec, ids)
    queries, keys = reference_qk(peaky_ref(), ids)
    n_recent = budget // 2 if recent is None else recent
    for index, layer in enumerate(cache.layers):
        weights = causal_weights(queries[index][0], keys[index][0])  # [Hq, T, T]
        colsum = weights.sum(dim=1).view(2, -1, length).sum(dim=1)  # [H, T], over queries and group heads
        for h, kept in enumerate(kept_sets(layer)):
            recent_set = set(range(length - n_recent, length))
            assert recent_set <= kept
            others = [p for p in range(length) if p not in recent_set]
            assert_top_selection(kept, colsum[h], others, budget - n_recent, 1e-4, f"layer {index} head {h}")


@SETTINGS
@given(length=st.integers(10, 70), budget=st.integers(2, 30), decode=st.integers(1, 8),
       chunk=st.sampled_from([None, 3, 16]), recent=st.one_of(st.none(), st.integers(1, 2)),
       method=st.sampled_from(["h2o", "scissorhands"]), seed=st.integers(0, 10_000))
def test_recent_window_always_kept(length, budget, decode, chunk, recent, method, seed):
    spec = f"{method}(budget={budget})" if recent is None else f"{method}(budget={budget}, recent={recent})"
    n_recent = budget // 2 if recent is None else recent
    model = peaky()
    cache = kvstack.make_cache(model, spec)
    logits = kvstack.prefill(model, random_ids(length, seed=seed), cache, chunk_size=chunk)
    seen = length
    for step in range(decode + 1):
        if step:
            logits = model(logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]
            seen += 1
        for layer in cache.layers:
            for kept in kept_sets(layer):
                assert len(kept) == min(budget, seen)
                assert set(range(max(0, seen - n_recent), seen)) <= kept


@SETTINGS
@given(length=st.integers(10, 80), data=st.data(), seed=st.integers(0, 10_000))
def test_tova_keeps_top_last_query_attention_averaged_over_the_layer(length, data, seed):
    budget = data.draw(st.integers(1, length - 1), label="budget")
    ids = random_ids(length, seed=seed)
    cache = _run(peaky(), f"tova(budget={budget})", ids)
    queries, keys = reference_qk(peaky_ref(), ids)
    for index, layer in enumerate(cache.layers):
        last = causal_weights(queries[index][0], keys[index][0])[:, -1, :].mean(dim=0)  # [T] over all Hq heads
        sets = kept_sets(layer)
        assert sets[0] == sets[1], "TOVA's decision is layer-wise: every head keeps the same entries"
        assert_top_selection(sets[0], last, list(range(length)), budget, 1e-5, f"layer {index}")


def test_scissorhands_keeps_the_entries_least_often_below_average():
    """One forward, one query head per KV head, history 1: the state is the fraction of queries that gave an
    entry less than 1/visible; the non-recent entries with the lowest fractions are kept."""
    model = build_peaky("llama", num_attention_heads=2, num_key_value_heads=2)
    ref = build_peaky("llama", num_attention_heads=2, num_key_value_heads=2)
    length, budget = 60, 20
    ids = random_ids(length, seed=3)
    cache = _run(model, f"scissorhands(budget={budget}, history=1)", ids)
    queries, keys = reference_qk(ref, ids)
    for index, layer in enumerate(cache.layers):
        weights = causal_weights(queries[index][0], keys[index][0])  # [H, T, T]
        visible = torch.ones(length, length, dtype=torch.bool).tril()
        below = ((weights < 1.0 / visible.sum(-1, keepdim=True)) & visible).sum(dim=1)  # [H, T]
        fraction = below / visible.sum(dim=0)  # queries that could see each entry
        recent = set(range(length - budget // 2, length))
        others = [p for p in range(length) if p not in recent]
        for h, kept in enumerate(kept_sets(layer)):
            assert recent <= kept
            assert_top_selection(kept, -fraction[h], others, budget - len(recent), 1e-6, f"layer {index} head {h}")


def test_random_is_seeded():
    model = build_model("llama")
    ids = random_ids(80)
    a = _run(model, "random(budget=20)", ids, seed=1)
    b = _run(model, "random(budget=20)", ids, seed=1)
    c = _run(model, "random(budget=20)", ids, seed=2)
    assert [kept_sets(layer) for layer in a.layers] == [kept_sets(layer) for layer in b.layers]
    assert [kept_sets(layer) for layer in a.layers] != [kept_sets(layer) for layer in c.layers]
    for layer in a.layers:
        for kept in kept_sets(layer):
            assert len(kept) == 20 and kept <= set(range(80))


# ------------------------------------------------------------------------------------------------------
# Left-padded batches: padding is evicted first and rows select independently
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["keynorm(budget=12)", "snapkv(budget=20, window=8)", "streamingllm(budget=10)",
                                  "h2o(budget=12)", "tova(budget=12)"])
def test_left_padded_row_keeps_what_it_keeps_alone(spec):
    model = peaky()
    ids = random_ids(40, batch=2, seed=4)
    mask = torch.ones_like(ids)
    ids[1, :9] = 0
    mask[1, :9] = 0
    cache = kvstack.make_cache(model, spec)
    kvstack.prefill(model, ids, cache, attention_mask=mask, chunk_size=None)
    alone = _run(model, spec, ids[1:, 9:])
    for layer, single in zip(cache.layers, alone.layers, strict=True):
        assert layer.head_lengths().tolist()[1] == single.head_lengths().tolist()[0]
        for kept in layer.kept_positions()[1]:
            assert int(kept.min()) >= 0, "padding kept while real tokens were evicted"
        assert kept_sets(layer, b=1) == kept_sets(single, b=0)
