"""MiKV mixed precision: what the inner method evicts stays in the cache at low precision ("no token left behind")."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, prompt_of

import kvstack
from kvstack.errors import KVStackError

VOCAB = 200
PROMPT = prompt_of(60, 1, VOCAB)


def tiny() -> torch.nn.Module:
    return build_model("llama", seed=0, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1)


def greedy(model: torch.nn.Module, spec: str, new: int = 8) -> tuple[list[int], object]:
    cache = kvstack.make_cache(model, spec)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kvstack.cache_kwargs(model, cache),
                             max_new_tokens=new,
                             do_sample=False)
    return out[0, len(PROMPT):].tolist(), cache


@pytest.mark.parametrize("rotate", [None, "hadamard"])
def test_eight_bit_demotion_keeps_the_full_cache_output_where_eviction_alone_does_not(rotate: str | None) -> None:
    model = tiny()
    full, _ = greedy(model, "full")
    evicted, _ = greedy(model, "h2o(budget=16)")
    mixed, _ = greedy(model, f"mikv(h2o(budget=16), bits=8, group_size=16, rotate={rotate!r})")
    assert evicted != full  # the budget is tight enough to change the answer...
    assert mixed == full  # ...and the evicted entries, kept at 8 bits, bring it back


def test_every_token_stays_the_budget_in_full_precision_and_the_rest_is_demoted() -> None:
    model = tiny()
    _, cache = greedy(model, "mikv(h2o(budget=16), bits=2, group_size=8)", new=5)
    seen = len(PROMPT) + 4
    for layer in cache.layers:
        assert layer.length == 16  # the inner budget, full precision
        assert layer.demoted.length == seen - 16
        assert layer.kept_entries() == seen * layer.batch * layer.heads
        kept = torch.cat((layer.demoted.live_positions(), layer.positions[:, :, : layer.length]), dim=-1)
        assert sorted(kept[0, 0].tolist()) == list(range(seen))  # no token left behind


def test_bytes_are_the_full_precision_budget_plus_the_low_precision_rest() -> None:
    model = tiny()
    _, plain = greedy(model, "h2o(budget=16)", new=5)
    _, mixed = greedy(model, "mikv(h2o(budget=16), bits=2, group_size=8)", new=5)
    layer = mixed.layers[0]
    heads, dim, demoted = layer.heads, layer.head_dim, layer.demoted.length
    payload = 2 * demoted * heads * dim * 2 // 8  # keys + values, 2 bits each
    metadata = 2 * demoted * heads * (dim // 8) * 2 * 2  # float16 scale + zero per 8-channel group, keys + values
    positions = demoted * heads * 4  # int32 per (entry, head)
    expected_extra = (payload + metadata + positions) * len(mixed.layers)
    # The demoted region may hold spare capacity rows; kv_bytes counts the tensors it holds.
    assert mixed.kv_bytes() - plain.kv_bytes() >= expected_extra
    assert mixed.kv_bytes() - plain.kv_bytes() <= 2 * expected_extra
    assert mixed.kv_bytes() < mixed.full_kv_bytes()


def test_demoted_attention_equals_dense_attention_on_the_dequantised_entries() -> None:
    """One decode step through the cache equals SDPA over [dequantised demoted | full-precision] entries."""
    model = tiny()
    _, cache = greedy(model, "mikv(snapkv(budget=16, window=4), bits=4, group_size=16)", new=2)
    layer = cache.layers[1]
    keys, values = layer.demoted.decode_all()
    all_keys = torch.cat((keys, layer.keys[:, :, : layer.length]), dim=2)
    all_values = torch.cat((values, layer.values[:, :, : layer.length]), dim=2)
    query = torch.randn(1, 4, 1, layer.head_dim)
    expected = torch.nn.functional.scaled_dot_product_attention(query, all_keys, all_values, enable_gqa=True)
    output, _ = layer._attend_demoted(query, None, None, 1, layer.head_dim ** -0.5, set(), 0)
    torch.testing.assert_close(output.transpose(1, 2), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("spec", "needle"), [
    ("mikv(adakv(snapkv(budget=16, window=4)))", "mikv wraps a uniform selection method"),
    ("mikv(loki(budget=16))", "mikv wraps a uniform selection method"),
    ("mikv(h2o(budget=16), bits=3)", "bits"),
    ("mikv(h2o(budget=16)) + kivi(bits=2)", "already stores what it evicts at low precision"),
    ("mikv(streamingllm(budget=16, positions='cache'))", "true positions"),
])
def test_bad_mikv_specs_are_refused_in_one_line(spec: str, needle: str) -> None:
    with pytest.raises(KVStackError) as info:
        kvstack.make_cache(tiny(), spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_group_that_does_not_tile_the_head_dimension_is_refused() -> None:
    with pytest.raises(KVStackError, match="does not divide the head dimension"):
        kvstack.make_cache(tiny(), "mikv(h2o(budget=16), bits=2, group_size=32)")  # head_dim 16
