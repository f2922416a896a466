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
import torch.nn.functional as F
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


@functools.cache
def peaky(kind: str = "mha") -> torch.nn.Module:
    """Cached peaky models (weights never change; make_cache only selects the attention function)."""
    if kind == "gqa":
        return build_peaky("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    return build_peaky("llama")


@functools.cache
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
            logits = model(logits.argmax(-1, keepdim=True), **kvstack.cache_kwargs(model, cache)).logits[:, -1]
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
        llama(random_ids(1, seed=step), **kvstack.cache_kwargs(llama, cache))
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
            llama(random_ids(1, seed=step), **kvstack.cache_kwargs(llama, cache))
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
    llama.generate(random_ids(80), **kvstack.cache_kwargs(llama, cache), max_new_tokens=6, do_sample=False)
    assert [layer.length for layer in cache.layers] == [20, 20]


def test_reset_cache_can_be_reused(llama):
    ref = build_model("llama")
    cache = kvstack.make_cache(llama, "full")
    llama(random_ids(30), **kvstack.cache_kwargs(llama, cache))
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.kept_entries() == 0
    ids = random_ids(20, seed=1)
    logits = llama(ids, **kvstack.cache_kwargs(llama, cache)).logits
    torch.testing.assert_close(logits, ref(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["snapkv(ratio=0.5)", "keynorm(ratio=0.5)", "h2o(ratio=0.5)"])
def test_reset_cache_recomputes_ratio_budget(llama, spec):
    cache = kvstack.make_cache(llama, spec)
    llama(random_ids(100), **kvstack.cache_kwargs(llama, cache))
    assert [layer.length for layer in cache.layers] == [50, 50]
    cache.reset()
    llama(random_ids(80, seed=1), **kvstack.cache_kwargs(llama, cache))  # e.g. model.generate on a new prompt
    assert [layer.length for layer in cache.layers] == [40, 40]


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
            logits = model(logits.argmax(-1, keepdim=True), **kvstack.cache_kwargs(model, cache)).logits[:, -1]
            seen += 1
        if seen <= budget:
            expected = set(range(seen))
        else:
            expected = set(range(sinks)) | set(range(seen - (budget - sinks), seen))
        for layer in cache.layers:
            assert kept_sets(layer) == [expected, expected]
        assert cache.get_seq_length() == seen


def _window_attention(query, keys, window):
    """``[H, T]``: attention the last ``window`` queries pay each key, summed over those queries and averaged
    over each KV group's query heads, computed from scratch."""
    weights = causal_weights(query, keys)  # [Hq, T, T]
    length = weights.shape[-1]
    per_q = weights[:, length - window :, :].sum(dim=1)  # [Hq, T]
    return per_q.view(keys.shape[0], -1, length).mean(dim=1)


def _check_snapkv_unpooled(model_kind, length, window, budget, seed):
    model = peaky(model_kind)
    ids = random_ids(length, seed=seed)
    cache = _run(model, f"snapkv(budget={budget}, window={window}, kernel=1)", ids)
    queries, keys = reference_qk(peaky_ref(model_kind), ids)
    for index, layer in enumerate(cache.layers):
        scores = _window_attention(queries[index][0], keys[index][0], window)
        for h, kept in enumerate(kept_sets(layer)):
            assert set(range(length - window, length)) <= kept, "the observation window is not kept"
            assert_top_selection(kept, scores[h], list(range(length - window)), budget - window, 1e-5,
                                 f"layer {index} head {h}")


@SETTINGS
@given(length=st.integers(20, 90), window=st.sampled_from([1, 4, 8, 16, 32]), data=st.data(),
       seed=st.integers(0, 10_000))
def test_snapkv_keeps_window_and_top_window_attention(length, window, data, seed):
    window = min(window, length - 1)
    budget = data.draw(st.integers(window, length - 1), label="budget")
    _check_snapkv_unpooled("mha", length, window, budget, seed)


@SETTINGS
@given(length=st.integers(20, 80), data=st.data(), seed=st.integers(0, 10_000))
def test_snapkv_gqa_aggregates_the_group(length, data, seed):
    """6 query heads / 2 KV heads: each KV head's score aggregates its 3 query heads."""
    budget = data.draw(st.integers(8, length - 1), label="budget")
    _check_snapkv_unpooled("gqa", length, 8, budget, seed)


@SETTINGS
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), length=st.integers(1, 30), pad=st.integers(0, 5),
       kernel=st.sampled_from([1, 3, 5, 7]), mode=st.sampled_from(["avg", "max"]), seed=st.integers(0, 10_000))
def test_pooling_follows_positions_and_skips_padding(batch, heads, length, pad, kernel, mode, seed):
    """The 1-D pool runs over entries in position order (slots may be shuffled); padding is no neighbour."""
    from kvstack.methods.selection import pool_along_positions

    generator = torch.Generator().manual_seed(seed)
    pad = min(pad, length - 1)
    scores = torch.rand(batch, heads, length, generator=generator, dtype=torch.float64)
    positions = torch.empty(batch, heads, length, dtype=torch.int32)
    for b in range(batch):
        for h in range(heads):
            values = torch.cat([torch.full((pad,), -1), torch.arange(length - pad)]).to(torch.int32)
            positions[b, h] = values[torch.randperm(length, generator=generator)]
    pooled = pool_along_positions(scores, positions, kernel, mode)
    half = kernel // 2
    for b in range(batch):
        for h in range(heads):
            by_position = {int(p): float(s) for p, s in zip(positions[b, h], scores[b, h], strict=True) if p >= 0}
            for slot in range(length):
                p = int(positions[b, h, slot])
                if p < 0:
                    continue
                near = [by_position[q] for q in range(p - half, p + half + 1) if q in by_position]
                expected = sum(near) / len(near) if mode == "avg" else max(near)
                assert abs(float(pooled[b, h, slot]) - expected) < 1e-9


def _reference_snapkv_keep(query, keys, length, window, budget, kernel):
    """SnapKV as its reference code (FasterDecoding/SnapKV, NVIDIA kvpress) selects: the window's attention to
    each *earlier* position, pooled over those earlier positions only; top ``budget - window`` plus the window.

    Returns the two acceptable sets per head: edges pooled as a mean over the neighbours that exist, or with
    zero padding counted (``F.avg_pool1d``'s default, as the reference code does).
    """
    prefix = _window_attention(query, keys, window)[:, : length - window]  # [H, T - W]
    half = kernel // 2
    in_range = torch.stack(
        [prefix[:, max(0, j - half) : j + half + 1].mean(dim=-1) for j in range(prefix.shape[-1])], dim=-1
    )
    zero_padded = F.avg_pool1d(prefix.unsqueeze(1), kernel, stride=1, padding=half).squeeze(1)
    window_set = set(range(length - window, length))
    return [
        [set(pooled[h].topk(budget - window).indices.tolist()) | window_set for h in range(prefix.shape[0])]
        for pooled in (in_range, zero_padded)
    ]


def test_snapkv_pooling_matches_reference_snapkv():
    model, ref = peaky(), peaky_ref()
    length, window, budget, kernel = 100, 32, 40, 7
    mismatches = []
    for seed in (0, 1, 4, 5):
        ids = random_ids(length, seed=seed)
        cache = _run(model, f"snapkv(budget={budget})", ids)
        queries, keys = reference_qk(ref, ids)
        for index, layer in enumerate(cache.layers):
            options = _reference_snapkv_keep(queries[index][0], keys[index][0], length, window, budget, kernel)
            for h, kept in enumerate(kept_sets(layer)):
                if kept not in (options[0][h], options[1][h]):
                    mismatches.append((seed, index, h, sorted(kept - options[0][h]), sorted(options[0][h] - kept)))
    assert not mismatches, f"(seed, layer, head, kept-but-not-expected, expected-but-not-kept): {mismatches}"


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
            logits = model(logits.argmax(-1, keepdim=True), **kvstack.cache_kwargs(model, cache)).logits[:, -1]
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


# ------------------------------------------------------------------------------------------------------
# Dynamic methods step by step: the per-entry state follows its entry through every eviction
# ------------------------------------------------------------------------------------------------------


def _capture_qk(model):
    """Hooks recording each layer's pre-RoPE query/key projections of the next forward."""
    store: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for kind in ("q", "k"):
            proj = getattr(layer.self_attn, f"{kind}_proj")

            def hook(_module, _inputs, output, key=(kind, index)):
                store[key] = output.detach().clone()

            handles.append(proj.register_forward_hook(hook))
    return store, handles


def _rotated(model, projected, positions):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = model.config.hidden_size // model.config.num_attention_heads
    x = projected.view(1, len(positions), -1, head_dim).transpose(1, 2)  # [1, heads, q, D]
    cos, sin = model.model.rotary_emb(x, torch.tensor([positions]))
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return rotated[0]  # [heads, q, D]


@pytest.mark.parametrize("spec", ["h2o(budget=20)", "h2o(budget=16, recent=4)", "tova(budget=16)"])
def test_dynamic_selection_step_by_step(spec):
    """Replays the method from its definition on the queries/keys the model really produced (captured with
    hooks), starting each step from what the cache holds, and checks every eviction."""
    model = build_peaky("llama")
    is_h2o = spec.startswith("h2o")
    budget = int(spec.split("budget=")[1].split(",")[0].rstrip(")"))
    n_recent = (int(spec.split("recent=")[1].rstrip(")")) if "recent=" in spec else budget // 2) if is_h2o else 0
    cache = kvstack.make_cache(model, spec)
    ids = random_ids(40, seed=5)
    keys: dict[int, dict[int, torch.Tensor]] = {0: {}, 1: {}}  # layer -> position -> [H, D]
    accumulated: dict[tuple[int, int], dict[int, float]] = {}  # (layer, head) -> position -> score
    store, handles = _capture_qk(model)
    forwards = [(ids[:, a:b], a, b) for a, b in ((0, 16), (16, 32), (32, 40))]
    token = None
    try:
        for step in range(14):
            if step < len(forwards):
                tokens, start, stop = forwards[step]
            else:
                tokens, start, stop = token, stop, stop + 1
            held = [kept_sets(layer) if layer.is_initialized else [set(), set()] for layer in cache.layers]
            logits = model(tokens, **kvstack.cache_kwargs(model, cache)).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            new = list(range(start, stop))
            for index, layer in enumerate(cache.layers):
                q = _rotated(model, store[("q", index)], new)  # [Hq, q, D]
                k = _rotated(model, store[("k", index)], new)  # [H, q, D]
                for i, p in enumerate(new):
                    keys[index][p] = k[:, i]
                last_query = []
                for h in range(2):
                    live = sorted(held[index][h]) + new
                    key_matrix = torch.stack([keys[index][p][h] for p in live]).double()  # [L, D]
                    group = q[2 * h : 2 * h + 2].double()  # this KV head's 2 query heads
                    logits_h = group @ key_matrix.T / key_matrix.shape[-1] ** 0.5  # [2, q, L]
                    visible = torch.tensor([[kp <= qp for kp in live] for qp in new])
                    weights = torch.softmax(logits_h.masked_fill(~visible, float("-inf")), dim=-1)
                    last_query.append(weights[:, -1])
                    state = accumulated.setdefault((index, h), {})
                    received = weights.sum(dim=(0, 1))
                    for j, p in enumerate(live):
                        state[p] = state.get(p, 0.0) + float(received[j])
                tova_scores = torch.cat(last_query).mean(dim=0)  # averaged over every query head of the layer
                for h, kept in enumerate(kept_sets(layer)):
                    live = sorted(held[index][h]) + new
                    if len(live) <= budget:
                        assert kept == set(live)
                        continue
                    if is_h2o:
                        recent = {p for p in live if p >= stop - n_recent}
                        assert recent <= kept
                        others = [p for p in live if p not in recent]
                        scores = {p: accumulated[(index, h)][p] for p in others}
                        assert_top_selection(kept - recent, scores, others, budget - len(recent), 1e-5,
                                             f"step {step} layer {index} head {h}")
                    else:
                        scores = {p: float(tova_scores[j]) for j, p in enumerate(live)}
                        assert_top_selection(kept, scores, live, budget, 1e-5, f"step {step} layer {index}")
                    for p in set(live) - kept:
                        accumulated[(index, h)].pop(p, None)
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------
# Left padding must not change what a row keeps, through decoding
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec",
    ["keynorm(budget=12)", "snapkv(budget=20, window=8)", "streamingllm(budget=10)", "tova(budget=12)",
     "adakv(snapkv(budget=20, window=8))", "pyramidkv(budget=20, window=8)",
     "streamingllm(budget=10, positions='cache')",
     "h2o(budget=12)", "scissorhands(budget=12)"],
)
def test_left_padded_row_decodes_like_the_row_alone(spec):
    model = peaky()
    pads = 9
    ids = random_ids(40, batch=2, seed=4)
    mask = torch.ones_like(ids)
    ids[1, :pads] = 0
    mask[1, :pads] = 0
    batch = kvstack.make_cache(model, spec)
    logits = kvstack.prefill(model, ids, batch, attention_mask=mask, chunk_size=None)
    alone = kvstack.make_cache(model, spec)
    alone_logits = kvstack.prefill(model, ids[1:, pads:], alone, chunk_size=None)
    torch.testing.assert_close(logits[1], alone_logits[0], atol=1e-4, rtol=0)
    for step in range(6):
        token = alone_logits.argmax(-1, keepdim=True)
        tokens = torch.cat([logits[:1].argmax(-1, keepdim=True), token])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        positions = torch.tensor([[40 + step], [40 - pads + step]])
        logits = model(tokens, **kvstack.cache_kwargs(model, batch), attention_mask=mask,
                       position_ids=positions).logits[:, -1]
        alone_logits = model(token, **kvstack.cache_kwargs(model, alone)).logits[:, -1]
        for layer, single in zip(batch.layers, alone.layers, strict=True):
            assert kept_sets(layer, b=1) == kept_sets(single, b=0), f"step {step}: the padded row kept other tokens"
        torch.testing.assert_close(logits[1], alone_logits[0], atol=1e-4, rtol=0)
