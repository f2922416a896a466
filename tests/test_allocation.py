"""Budget allocation: PyramidKV (per layer) and Ada-KV (per head), as functions and inside a cache."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from conftest import assert_top_selection, build_model, build_peaky, kept_sets, random_ids, reference_qk
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.methods.allocation import headwise_counts, pyramid_budgets

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------------------------------
# headwise_counts
# ------------------------------------------------------------------------------------------------------


@SETTINGS
@given(heads=st.integers(1, 8), length=st.integers(1, 40), budget=st.integers(0, 50),
       floor=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.99, 1.0]), seed=st.integers(0, 10_000),
       special=st.booleans())
def test_headwise_counts(heads, length, budget, floor, seed, special):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(heads, length, generator=generator)
    if special and length > 2:  # protected (+inf) and padding (-inf) entries, as the cache passes them
        scores[:, -1] = float("inf")
        scores[0, 0] = float("-inf")
    keep = headwise_counts(scores, budget, floor)
    assert keep.shape == (heads, length) and keep.dtype == torch.bool
    assert int(keep.sum()) == min(heads * budget, heads * length)
    reserved = min(math.ceil(floor * budget), length, budget)
    per_head = keep.sum(dim=-1)
    assert bool((per_head >= reserved).all())
    # Each head's reservation: its own top `reserved` entries (independently recomputed, ties broken by score).
    outside = keep.clone()
    for h in range(heads):
        order = sorted(range(length), key=lambda i, h=h: float(scores[h, i]), reverse=True)
        for i in order[:reserved]:
            assert keep[h, i], f"head {h} lost one of its top-{reserved} entries"
            outside[h, i] = False
    if outside.any() and (~keep).any():
        worst_kept = float(scores[outside].min())
        best_dropped = float(scores[~keep].max())
        assert worst_kept >= best_dropped


def test_headwise_counts_uneven_example():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 0.5, 0.2, 0.1]])
    keep = headwise_counts(scores, budget=2, floor=0.5)  # 4 in total, each head at least 1
    assert keep.tolist() == [[True, True, True, False], [True, False, False, False]]
    keep = headwise_counts(scores, budget=2, floor=1.0)  # a full floor: every head keeps exactly its budget
    assert keep.sum(dim=-1).tolist() == [2, 2]


# ------------------------------------------------------------------------------------------------------
# pyramid_budgets
# ------------------------------------------------------------------------------------------------------


@SETTINGS
@given(window=st.integers(0, 64), extra=st.integers(0, 300), context=st.integers(1, 600),
       num_layers=st.integers(1, 40), beta=st.floats(1.0, 50.0))
def test_pyramid_budgets(window, extra, context, num_layers, beta):
    # The cache only asks for an average of at least min(window, context): a budget below the window is refused.
    average = min(window, context) + extra
    budgets = pyramid_budgets(average, window, context, num_layers, beta)
    assert len(budgets) == num_layers
    assert all(isinstance(b, int) for b in budgets)
    assert sum(budgets) == min(average, context) * num_layers
    assert all(b <= context for b in budgets)
    assert all(b >= 0 for b in budgets)
    assert all(a >= b for a, b in pairwise(budgets)), budgets


@pytest.mark.parametrize(("average", "window", "layers", "beta"), [(40, 32, 2, 20.0), (100, 32, 8, 20.0),
                                                                   (64, 8, 5, 4.0), (500, 32, 32, 20.0)])
def test_pyramid_budgets_follow_the_paper_shape(average, window, layers, beta):
    """PyramidKV: above the window, layer 0 gets 2a - a/beta and the top layer a/beta (a = average - window)."""
    above = average - window
    budgets = pyramid_budgets(average, window, 10_000, layers, beta)
    assert abs(budgets[0] - (window + 2 * above - above / beta)) <= 1
    assert abs(budgets[-1] - (window + above / beta)) <= 1
    assert min(budgets) >= window


def test_pyramid_budgets_capped_by_context():
    budgets = pyramid_budgets(100, 32, 120, 4, 20.0)
    assert max(budgets) <= 120 and sum(budgets) == 400
    assert pyramid_budgets(100, 32, 50, 4, 20.0) == [50, 50, 50, 50]


# ------------------------------------------------------------------------------------------------------
# pyramidkv in a cache
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [2, 4])
def test_pyramidkv_layer_budgets(layers):
    model = build_model("llama", num_hidden_layers=layers)
    cache = kvstack.make_cache(model, "pyramidkv(budget=40)")
    kvstack.prefill(model, random_ids(100), cache)
    kept = [int(layer.head_lengths()[0, 0]) for layer in cache.layers]
    for layer, budget in zip(cache.layers, kept, strict=True):
        assert layer.head_lengths().tolist() == [[budget, budget]]  # uniform within a layer
        assert layer.budget == budget
    assert sum(kept) == layers * 40
    assert all(a > b for a, b in pairwise(kept)), kept
    assert kept[0] == round(32 + 2 * 8 - 8 / 20) and kept[-1] >= 32  # 48 at the bottom
    for layer in cache.layers:  # the observation window is kept by every layer
        for positions in kept_sets(layer):
            assert set(range(68, 100)) <= positions
    model(random_ids(1), **kvstack.cache_kwargs(model, cache))
    assert [int(layer.head_lengths()[0, 0]) for layer in cache.layers] == [k + 1 for k in kept]


def test_pyramidkv_ratio():
    model = build_model("llama", num_hidden_layers=4)
    cache = kvstack.make_cache(model, "pyramidkv(ratio=0.5)")
    kvstack.prefill(model, random_ids(120), cache)
    kept = [layer.length for layer in cache.layers]
    assert sum(kept) == 4 * 60
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]


# ------------------------------------------------------------------------------------------------------
# adakv in a cache
# ------------------------------------------------------------------------------------------------------


def test_adakv_head_budgets_vary_and_sum_to_the_layer_budget():
    model = build_model("llama")
    cache = kvstack.make_cache(model, "adakv(snapkv(budget=40), floor=0.2)")
    kvstack.prefill(model, random_ids(100, batch=2), cache)
    uneven = False
    for layer in cache.layers:
        counts = layer.head_lengths()  # [B, H]
        assert counts.shape == (2, 2)
        assert counts.sum(dim=-1).tolist() == [2 * 40, 2 * 40]
        assert bool((counts >= math.ceil(0.2 * 40)).all())
        uneven |= bool((counts != 40).any())
        for b in range(2):
            for h, positions in enumerate(layer.kept_positions()[b]):
                assert len(positions) == int(counts[b, h])
                assert set(range(68, 100)) <= set(positions.tolist()), "the observation window is not kept"
    assert uneven, "head budgets never differed: the test shows nothing"
    assert cache.kept_entries() == 2 * 2 * 2 * 40
    before = [layer.head_lengths().clone() for layer in cache.layers]
    model(random_ids(1, batch=2), **kvstack.cache_kwargs(model, cache))
    for layer, counts in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.head_lengths(), counts + 1)


def test_adakv_ratio():
    model = build_model("llama")
    cache = kvstack.make_cache(model, "adakv(snapkv(ratio=0.6), floor=0.5)")
    kvstack.prefill(model, random_ids(100), cache)
    for layer in cache.layers:
        assert int(layer.head_lengths().sum()) == 2 * 40


@settings(max_examples=10, deadline=None, derandomize=True)
@given(length=st.integers(10, 80), data=st.data(), floor=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
       seed=st.integers(0, 10_000))
def test_adakv_keynorm_selects_globally_with_a_floor(length, data, floor, seed):
    """adakv(keynorm): each head keeps its ceil(floor*b) smallest-norm keys; the rest of the layer's H*b entries
    go to the smallest-norm keys of any head (recomputed from a DynamicCache's keys)."""
    budget = data.draw(st.integers(1, length - 1), label="budget")
    model, ref = build_peaky("llama"), build_peaky("llama")
    ids = random_ids(length, seed=seed)
    cache = kvstack.make_cache(model, f"adakv(keynorm(budget={budget}), floor={floor})")
    kvstack.prefill(model, ids, cache)
    _, keys = reference_qk(ref, ids)
    reserved = min(math.ceil(floor * budget), budget)
    for index, layer in enumerate(cache.layers):
        norms = keys[index][0].double().norm(dim=-1)  # [H, T]
        kept = kept_sets(layer)
        assert sum(len(k) for k in kept) == 2 * budget
        pool_scores, pool_kept = [], []
        for h in range(2):
            order = sorted(range(length), key=lambda i, h=h: float(norms[h, i]))
            floor_part = set(order[:reserved])
            assert len(kept[h]) >= reserved
            # Within a head, what is kept is always that head's best entries.
            assert_top_selection(kept[h], -norms[h], list(range(length)), len(kept[h]), 1e-4,
                                 f"layer {index} head {h}")
            for i in range(length):
                if i not in floor_part:
                    pool_scores.append(-float(norms[h, i]))
                    pool_kept.append(i in kept[h])
        chosen = [s for s, k in zip(pool_scores, pool_kept, strict=True) if k]
        dropped = [s for s, k in zip(pool_scores, pool_kept, strict=True) if not k]
        if chosen and dropped:
            assert min(chosen) >= max(dropped) - 1e-4
