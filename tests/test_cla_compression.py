"""Token-level methods and codecs on a cla model: the storing layers compress, the sharing layers read what
they keep.

Two independent expectations: (1) with a method whose choice depends only on the keys (key norm, position),
the cla model equals the untouched model with its upper layers' projections hooked to return the lower
layers' (so both layers of a pair store identical keys and evict identically); (2) for every method, each
sharing layer's attention output equals plain softmax attention over the entries its source holds when the
sharing layer reads them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, hook_kv_sharing, random_ids

import kvstack
from kvstack.api import positions_from_mask
from kvstack.cache.cross_layer import ReusingLayer
from kvstack.cache.layer import KVStackLayer

PAIRS = {1: 0, 3: 2}


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    base = build_model(num_hidden_layers=4)
    new, _ = kvstack.transform(base, "cla(pairs='1:0,3:2')")
    return base, new


def _run(model: torch.nn.Module, spec: str, ids: torch.Tensor, mask: torch.Tensor | None,
         steps: int = 6) -> tuple[list[torch.Tensor], kvstack.KVStackCache]:
    """Chunked prefill (chunks of 8) then ``steps`` greedy decoding steps; every step's logits ``[B, V]``."""
    cache = kvstack.make_cache(model, spec)
    logits = kvstack.prefill(model, ids, cache, attention_mask=mask, chunk_size=8)
    out = [logits]
    positions = positions_from_mask(mask)[:, -1:] if mask is not None else None
    step_mask = mask
    with torch.no_grad():
        for _ in range(steps):
            token = out[-1].argmax(-1, keepdim=True)
            if step_mask is not None:
                step_mask = torch.cat((step_mask, torch.ones_like(token)), dim=1)
                positions = positions + 1
            result = model(input_ids=token, attention_mask=step_mask, position_ids=positions, use_cache=True,
                           **kvstack.cache_kwargs(model, cache))
            out.append(result.logits[:, -1])
    return out, cache


@pytest.mark.parametrize("spec", ["keynorm(ratio=0.5)", "streamingllm(budget=12)",
                                  "keynorm(ratio=0.5) + kivi(bits=4, group_size=8, residual=8)",
                                  "kivi(bits=2, group_size=8, residual=8)",
                                  "streamingllm(budget=16) + quant(bits=8, group_size=16)"])
def test_a_key_only_method_on_a_cla_model_equals_the_hooked_model_storing_both_layers(models, spec) -> None:
    base, new = models
    ids = random_ids(30, batch=2, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence
    handles = hook_kv_sharing(base, PAIRS)
    try:
        expected, base_cache = _run(base, spec, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    got, cache = _run(new, spec, ids, mask)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"step {step}")
    per_layer = [layer.kv_bytes() for layer in cache.layers]
    assert per_layer[1] == per_layer[3] == 0
    assert per_layer[0] == base_cache.layers[0].kv_bytes() and per_layer[2] == base_cache.layers[2].kv_bytes()
    assert cache.kv_bytes() < cache.full_kv_bytes()


def _expected_read(source: KVStackLayer, query: torch.Tensor, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of ``[B, Hq, q, D]`` queries at ``positions`` ``[B, q]`` over every entry ``source``
    holds (decoded where encoded), visible when its position is valid and not after the query's;
    returns ``[B, q, Hq, D]``."""
    keys, values = source.dense_entries()
    entry_positions = source._all_positions()  # [B, H, N]
    if source.demoted is not None and source.demoted.length:  # MiKV's low-precision entries count as well
        demoted_keys, demoted_values = source.demoted.decode_all()
        keys, values = torch.cat((demoted_keys, keys), dim=2), torch.cat((demoted_values, values), dim=2)
        entry_positions = torch.cat((source.demoted.live_positions(), entry_positions), dim=-1)
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1).float(), values.repeat_interleave(group, 1).float()
    entry_positions = entry_positions.repeat_interleave(group, 1)
    visible = (entry_positions.unsqueeze(2) >= 0) & (entry_positions.unsqueeze(2) <= positions[:, None, :, None])
    scores = (query.float() @ keys.transpose(-1, -2)) * scaling
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (weights @ values).transpose(1, 2)


@pytest.mark.parametrize("spec", ["snapkv(ratio=0.5, window=4)", "h2o(budget=10)", "tova(budget=10)",
                                  "snapkv(ratio=0.5, window=4) + kivi(bits=4, group_size=8, residual=8)",
                                  "mikv(h2o(budget=10), bits=4, group_size=8)"])
def test_each_sharing_layer_reads_exactly_what_its_source_holds_when_it_reads(models, spec, monkeypatch) -> None:
    _, new = models
    checked: list[int] = []
    original = ReusingLayer.attend

    def checking(self, query, attention_mask, position_ids, scaling, shared=None):
        source = self.source_layer()
        q_len = query.shape[2]
        if position_ids is None:
            position_ids = torch.arange(self.seen - q_len, self.seen).unsqueeze(0)
        positions = position_ids.expand(query.shape[0], -1)
        expected = _expected_read(source, query, positions, scaling)
        held = source.kept_entries()
        output = original(self, query, attention_mask, position_ids, scaling, shared)
        torch.testing.assert_close(output.float(), expected, atol=2e-5, rtol=2e-5)
        checked.append(q_len)
        assert source.deferred is None  # the last reader released the source's eviction
        assert source.kept_entries() <= held
        return output

    monkeypatch.setattr(ReusingLayer, "attend", checking)
    ids = random_ids(30, batch=2, seed=6)
    _, cache = _run(new, spec, ids, None)
    assert any(q > 1 for q in checked) and any(q == 1 for q in checked)  # prompt chunks and decoding steps
    every = cache.tokens_seen() * ids.shape[0] * new.config.num_key_value_heads * new.config.num_hidden_layers
    if spec.startswith("mikv"):  # MiKV keeps what it would evict, at low precision
        assert cache.layers[0].demoted.length > 0
    else:
        assert 0 < cache.kept_entries() < every  # the source layers evicted, and their readers read less
    assert cache.layers[1].kv_bytes() == cache.layers[3].kv_bytes() == 0


def test_the_source_evicts_only_after_its_readers_attended_so_the_prompt_reads_whole(models) -> None:
    """SnapKV evicts at the end of the prompt's forward; the sharing layer must still read the whole prompt
    in that forward, so the prompt's logits equal the full cache's."""
    _, new = models
    ids = random_ids(24, batch=1, seed=7)
    full = kvstack.make_cache(new, "full")
    snap = kvstack.make_cache(new, "snapkv(ratio=0.5, window=4)")
    with torch.no_grad():
        expected = new(input_ids=ids, use_cache=True, **kvstack.cache_kwargs(new, full)).logits
        got = new(input_ids=ids, use_cache=True, **kvstack.cache_kwargs(new, snap)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert snap.layers[0].kept_entries() < full.layers[0].kept_entries()  # and then it evicted


@pytest.mark.parametrize("spec", ["adakv(snapkv(ratio=0.5, window=4))", "loki(ratio=0.5, rank=4)",
                                  "cam(h2o(budget=10))", "kvmerger(h2o(budget=10))",
                                  "pyramidkv(ratio=0.5, window=4)"])
def test_other_storage_paths_run_on_a_cla_model_and_hold_less(models, spec) -> None:
    _, new = models
    ids = random_ids(30, batch=2, seed=9)
    got, cache = _run(new, spec, ids, None)
    assert all(torch.isfinite(step).all() for step in got)
    assert cache.layers[1].kv_bytes() == cache.layers[3].kv_bytes() == 0
    assert cache.kv_bytes() > 0
    if not spec.startswith("loki"):  # Loki keeps every entry
        every = cache.tokens_seen() * ids.shape[0] * new.config.num_key_value_heads * new.config.num_hidden_layers
        assert cache.kept_entries() < every


def test_layer_budgets_are_spread_over_the_storing_layers_only(models) -> None:
    _, new = models
    ids = random_ids(30, batch=2, seed=9)
    got, cache = _run(new, "d2o(h2o(ratio=0.5))", ids, None)
    assert all(torch.isfinite(step).all() for step in got)
    budgets = cache.layer_budgets
    assert budgets[1] is None and budgets[3] is None  # the sharing layers hold nothing and take no budget
    base = kvstack.parse("h2o(ratio=0.5)").layer_budget(cache.context_length, 0, 4)
    assert budgets[0] + budgets[2] == 2 * base  # D2O spreads the two storing layers' budgets between them
    assert cache.layers[0].kept_entries() == budgets[0] * ids.shape[0] * new.config.num_key_value_heads


@pytest.mark.parametrize(("spec", "message"), [
    ("quest(budget=16, page=4)", "pages live in a slow tier"),
    ("kvsharer(layers=1)", "links layers itself"),
])
def test_methods_a_cla_model_cannot_take_are_refused_in_one_line(models, spec, message) -> None:
    _, new = models
    with pytest.raises(kvstack.InputError, match=message) as error:
        kvstack.make_cache(new, spec)
    assert "\n" not in str(error.value) and "(cla)" in str(error.value)
