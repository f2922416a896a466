"""Intra-layer merging (CaM, D2O, KVMerger): the papers' behaviour, honest bytes, composition, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_model, random_ids, reference_generate, usage_error
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.cache.cache import KVStackCache
from kvstack.contract import AttentionStats, LayerView
from kvstack.methods.merging import LOG_MASS, proportional_budgets
from kvstack.spec import SpecError, parse

MERGING = ["cam(h2o(ratio=0.75))", "d2o(h2o(ratio=0.75))", "kvmerger(h2o(ratio=0.75))",
           "cam(snapkv(ratio=0.5))", "d2o(tova(ratio=0.5))", "kvmerger(snapkv(ratio=0.5))",
           "kvmerger(streamingllm(ratio=0.5))", "d2o(scissorhands(ratio=0.5), layers='uniform')"]


def _view(keys: torch.Tensor, values: torch.Tensor, colsum: torch.Tensor, state: dict | None = None,
          layer_state: dict | None = None) -> LayerView:
    batch, heads, length, _ = keys.shape
    positions = torch.arange(length, dtype=torch.int32).expand(batch, heads, length).clone()
    return LayerView(
        positions=positions, next_position=torch.full((batch,), length), state=state or {},
        stats=AttentionStats(colsum=colsum), layer_idx=0, num_layers=1, generator=torch.Generator().manual_seed(0),
        group_size=1, budget=length, kv_source=lambda: (keys, values), layer_state=layer_state or {},
    )


def _attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None):
    """``[B, H, D]`` output of one query per head over ``[B, H, L, D]`` entries (reference softmax)."""
    logits = torch.einsum("bhd,bhld->bhl", query, keys) / math.sqrt(keys.shape[-1])
    if bias is not None:
        logits = logits + bias
    return torch.einsum("bhl,bhld->bhd", logits.softmax(-1), values)


# ---------------------------------------------------------------------------------------------------- CaM
@settings(max_examples=40, deadline=None)
@given(length=st.integers(6, 40), recipients=st.integers(1, 8), seed=st.integers(0, 10_000), data=st.data())
def test_cam_gives_back_the_evicted_share_of_the_output(length, recipients, seed, data):
    """CaM: the kept entries' weighted values gain exactly min(a_e, mean a of the recipients) * v_e, nothing else."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 2, length, 8, generator=gen), torch.randn(1, 2, length, 8, generator=gen)
    attention = torch.rand(1, 2, length, generator=gen)
    attention = attention / attention.sum(-1, keepdim=True)
    evict = data.draw(st.integers(0, length - 1))
    method = parse(f"cam(h2o(budget={length - 1}), recipients={recipients})")
    evicted = torch.full((1, 2, 1), evict)
    update = method.merge(_view(keys, values, attention), evicted)
    kept = [i for i in range(length) if i != evict]
    # the recipients: the `recipients` kept entries after it (the newest ones when fewer follow)
    after = [i for i in kept if i > evict]
    chosen = (after + [i for i in reversed(kept) if i < evict])[:recipients] if len(after) < recipients else after[
        :recipients]
    chosen = sorted(chosen)[:recipients]
    if len(after) < recipients:
        chosen = kept[-recipients:]
    mean = attention[..., chosen].mean(-1)  # [1, 2]
    expected = torch.minimum(attention[..., evict], mean).unsqueeze(-1) * values[:, :, evict]
    gained = torch.einsum("bhl,bhld->bhd", attention[..., kept], update.values[:, :, kept] - values[:, :, kept])
    torch.testing.assert_close(gained, expected, atol=1e-5, rtol=1e-4)
    untouched = [i for i in kept if i not in chosen]
    torch.testing.assert_close(update.values[:, :, untouched], values[:, :, untouched], atol=0, rtol=0)
    assert update.keys is None


@settings(max_examples=40, deadline=None)
@given(length=st.integers(6, 40), recipients=st.integers(1, 8), seed=st.integers(0, 10_000), data=st.data())
def test_proportional_cam_gives_the_same_share_as_weight_and_keeps_values_convex(length, recipients, seed, data):
    """cam(..., proportional=True): mass * value of the kept entries gains exactly what plain CaM adds to
    their values (for unit masses), the mass grows by CaM's coefficients, and every value is a convex
    combination of itself and the evicted one."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 2, length, 8, generator=gen), torch.randn(1, 2, length, 8, generator=gen)
    attention = torch.rand(1, 2, length, generator=gen)
    evict = data.draw(st.integers(0, length - 1))
    evicted = torch.full((1, 2, 1), evict)
    state = {"accumulated": torch.zeros(1, 2, length), LOG_MASS: torch.zeros(1, 2, length)}
    plain = parse(f"cam(h2o(budget={length - 1}), recipients={recipients})").merge(
        _view(keys, values, attention, state), evicted)
    method = parse(f"cam(h2o(budget={length - 1}), recipients={recipients}, proportional=True)")
    assert method.mass_state == LOG_MASS
    update = method.merge(_view(keys, values, attention, state), evicted)
    mass = update.state[LOG_MASS].exp()
    kept = [i for i in range(length) if i != evict]
    gain = plain.values[:, :, kept] - values[:, :, kept]  # [1, 2, K, D] what CaM adds: c * v_e
    coefficient = (gain * values[:, :, evict : evict + 1]).sum(-1) / values[:, :, evict].pow(2).sum(-1, keepdim=True)
    torch.testing.assert_close(mass[:, :, kept] - 1, coefficient, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass[:, :, kept].unsqueeze(-1) * update.values[:, :, kept] - values[:, :, kept], gain,
                               atol=1e-5, rtol=1e-4)
    lam = (mass - 1) / mass  # the share of the evicted value in each entry
    expected = (1 - lam[:, :, kept]).unsqueeze(-1) * values[:, :, kept] + lam[:, :, kept].unsqueeze(-1) * values[
        :, :, evict : evict + 1]
    torch.testing.assert_close(update.values[:, :, kept], expected, atol=1e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(6, 30), recipients=st.integers(1, 8), cap=st.floats(1.0, 3.0), seed=st.integers(0, 10_000),
       data=st.data())
def test_capped_cam_mass_never_passes_the_cap_and_values_stay_convex(length, recipients, cap, seed, data):
    """cam(..., proportional=True, max_mass=c): no recipient's mass passes max(its mass, c); one already above
    takes nothing; each value stays a convex combination of itself and the evicted one; a cap never reached
    changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 2, length, 8, generator=gen), torch.randn(1, 2, length, 8, generator=gen)
    attention = torch.rand(1, 2, length, generator=gen) * 4  # large shares, so that caps bind
    log_mass = (torch.rand(1, 2, length, generator=gen) * 1.5).log1p()  # masses in [1, 2.5]
    evict = data.draw(st.integers(0, length - 1))
    evicted = torch.full((1, 2, 1), evict)
    state = {"accumulated": torch.zeros(1, 2, length), LOG_MASS: log_mass}
    spec = f"cam(h2o(budget={length - 1}), recipients={recipients}, proportional=True"
    capped = parse(f"{spec}, max_mass={cap})").merge(_view(keys, values, attention, state), evicted)
    mass, before = capped.state[LOG_MASS].exp(), log_mass.exp()
    kept = [i for i in range(length) if i != evict]
    assert bool((mass[:, :, kept] <= torch.clamp(before[:, :, kept], min=cap) * (1 + 1e-5)).all())
    above = before[:, :, kept] >= cap
    assert torch.equal(capped.values[:, :, kept][above], values[:, :, kept][above])
    lam = (mass - before) / mass  # the share of the evicted value in each entry
    expected = (1 - lam[:, :, kept]).unsqueeze(-1) * values[:, :, kept] + lam[:, :, kept].unsqueeze(-1) * values[
        :, :, evict : evict + 1]
    torch.testing.assert_close(capped.values[:, :, kept], expected, atol=1e-5, rtol=1e-4)
    unbounded = parse(f"{spec}, max_mass=1e9)").merge(_view(keys, values, attention, state), evicted)
    plain = parse(f"{spec})").merge(_view(keys, values, attention, state), evicted)
    torch.testing.assert_close(unbounded.values, plain.values, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unbounded.state[LOG_MASS], plain.state[LOG_MASS], atol=1e-6, rtol=1e-5)


def test_bad_mass_caps_are_one_line():
    with pytest.raises(SpecError, match=r"max_mass must be 0 \(no cap\) or a mass >= 1"):
        parse("cam(h2o(ratio=0.5), proportional=True, max_mass=0.5)")
    with pytest.raises(SpecError, match="add proportional=True"):
        parse("cam(h2o(ratio=0.5), max_mass=2.0)")


def test_cam_keeps_the_output_when_the_evicted_entry_is_weak():
    """The attention output before renormalisation is unchanged by evicting a weakly attended entry."""
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 1, 12, 8, generator=gen), torch.randn(1, 1, 12, 8, generator=gen)
    query = torch.randn(1, 1, 8, generator=gen)
    weights = (torch.einsum("bhd,bhld->bhl", query, keys) / math.sqrt(8)).softmax(-1)
    evict = int(weights[0, 0].argmin())
    update = parse("cam(h2o(budget=11), recipients=4)").merge(_view(keys, values, weights),
                                                              torch.tensor([[[evict]]]))
    kept = [i for i in range(12) if i != evict]
    before = torch.einsum("bhl,bhld->bhd", weights, values)
    after = torch.einsum("bhl,bhld->bhd", weights[..., kept], update.values[:, :, kept])
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- D2O / KVMerger
def _layer_with_duplicates(spec: str, length: int = 10, seed: int = 0):
    """A one-layer cache fed entries 4 and 5 identical and weakly attended: the first to be evicted."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = 16
    query = torch.randn(1, 2, 1, head_dim, generator=gen)  # two query heads on one KV head
    keys = torch.randn(1, 1, length, head_dim, generator=gen)
    values = torch.randn(1, 1, length, head_dim, generator=gen)
    keys[:, :, 4] = keys[:, :, 5] = -6.0 * query[:, 0, 0] / query[:, 0, 0].norm() - 6.0 * query[:, 1, 0] / query[
        :, 1, 0].norm()
    values[:, :, 4] = values[:, :, 5]
    method = parse(spec)
    cache = KVStackCache(method, num_layers=1, num_q_heads=2, num_kv_heads=1, label=spec)
    return cache, query, keys, values


@pytest.mark.parametrize("spec", ["d2o(h2o(budget=9, recent=2), layers='uniform')",
                                  "kvmerger(h2o(budget=9, recent=2))"])
def test_merging_identical_entries_changes_no_attention_output(spec):
    cache, query, keys, values = _layer_with_duplicates(spec)
    layer = cache.layers[0]
    prompt_query = query.expand(-1, -1, keys.shape[2], -1)
    cache.update(keys, values, 0)
    layer.attend(prompt_query, None, None, 16**-0.5)
    assert layer.length == 9 and layer.merged  # one of the twins was folded into the other
    kept = layer.positions[0, 0, : layer.length].tolist()
    assert (4 in kept) != (5 in kept)
    twin = kept.index(4 if 4 in kept else 5)
    assert layer.state[LOG_MASS][0, 0, twin].exp().item() == pytest.approx(2.0)
    gen = torch.Generator().manual_seed(1)
    new_key, new_value = torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, 1, 16, generator=gen)
    cache.update(new_key, new_value, 0)
    output = layer.attend(query, None, None, 16**-0.5)  # [1, 1, 2, D]
    all_keys, all_values = torch.cat((keys, new_key), 2), torch.cat((values, new_value), 2)
    for head in range(2):
        expected = _attention(query[:, head : head + 1, 0], all_keys, all_values)
        torch.testing.assert_close(output[:, 0, head], expected[:, 0], atol=1e-5, rtol=1e-4)


def test_without_proportional_attention_the_twin_weighs_once():
    """The papers' plain average keeps no count: the same step then differs from full attention."""
    cache, query, keys, values = _layer_with_duplicates("kvmerger(h2o(budget=9, recent=2), proportional=False)")
    layer = cache.layers[0]
    cache.update(keys, values, 0)
    layer.attend(query.expand(-1, -1, keys.shape[2], -1), None, None, 16**-0.5)
    assert LOG_MASS not in layer.state
    cache.update(keys[:, :, -1:], values[:, :, -1:], 0)
    output = layer.attend(query, None, None, 16**-0.5)
    expected = _attention(query[:, :1, 0], torch.cat((keys, keys[:, :, -1:]), 2),
                          torch.cat((values, values[:, :, -1:]), 2))
    assert not torch.allclose(output[:, 0, 0], expected[:, 0], atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(length=st.integers(8, 40), evict=st.integers(1, 6), seed=st.integers(0, 10_000),
       spec=st.sampled_from(["d2o(h2o(budget=1))", "kvmerger(h2o(budget=1), threshold=0.2)",
                             "kvmerger(h2o(budget=1), threshold=-1.0, sigma=2.0)"]))
def test_merges_are_weighted_averages_that_keep_the_total_mass(length, evict, seed, spec):
    """Every kept entry becomes a convex combination of itself and what merged into it; masses add up; the
    untouched entries are bit-exact."""
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 2, length, 8, generator=gen), torch.randn(2, 2, length, 8, generator=gen)
    colsum = torch.rand(2, 2, length, generator=gen)
    state = {"accumulated": torch.rand(2, 2, length, generator=gen), LOG_MASS: torch.rand(2, 2, length, generator=gen)}
    layer_state = {"threshold": torch.zeros(2, 2), "updates": torch.zeros(2, 2)}
    rows = [torch.randperm(length, generator=gen)[:evict].sort().values for _ in range(4)]
    evicted = torch.stack(rows).view(2, 2, -1)
    update = parse(spec).merge(_view(keys, values, colsum, state, layer_state), evicted)
    kept = torch.ones(2, 2, length, dtype=torch.bool).scatter_(-1, evicted, False)
    mass = state[LOG_MASS].exp()
    new_mass = update.state[LOG_MASS].exp()
    gained = (new_mass - mass)[kept].sum()
    assert gained <= mass.gather(-1, evicted).sum() + 1e-4
    changed = (update.keys != keys).any(-1) & kept
    assert torch.equal(changed, (new_mass - mass).abs().gt(1e-6) & kept)
    for b in range(2):
        for h in range(2):
            pool = torch.cat((keys[b, h, kept[b, h]], keys[b, h, evicted[b, h]]))
            low, high = pool.min(0).values - 1e-5, pool.max(0).values + 1e-5
            new = update.keys[b, h, kept[b, h]]
            assert bool(((new >= low) & (new <= high)).all())


def test_d2o_threshold_is_an_ema_of_best_similarities():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 1, 20, 8, generator=gen), torch.randn(1, 1, 20, 8, generator=gen)
    layer_state = {"threshold": torch.zeros(1, 1), "updates": torch.zeros(1, 1)}
    method = parse("d2o(h2o(budget=1), ema=0.5)")
    view = _view(keys, values, torch.rand(1, 1, 20), {"accumulated": torch.zeros(1, 1, 20),
                                                      LOG_MASS: torch.zeros(1, 1, 20)}, layer_state)
    unit = torch.nn.functional.normalize(keys[0, 0], dim=-1)
    bests = []
    for evict in ([3, 4], [7]):
        kept = [i for i in range(20) if i not in evict]
        bests.append(torch.stack([(unit[e] @ unit[kept].T).max() for e in evict]).mean())
        method.merge(view, torch.tensor([[evict]]))
    assert layer_state["threshold"].item() == pytest.approx(0.5 * bests[0].item() + 0.5 * bests[1].item(), abs=1e-5)
    assert layer_state["updates"].item() == 2


@settings(max_examples=50, deadline=None)
@given(weights=st.lists(st.floats(0, 10), min_size=1, max_size=12), base=st.integers(4, 200),
       context=st.integers(4, 400))
def test_d2o_layer_budgets_share_the_total_exactly(weights, base, context):
    base = min(base, context)
    low = math.ceil(base / 4)
    budgets = proportional_budgets(weights, base * len(weights), low, context)
    assert sum(budgets) == base * len(weights)
    assert all(low <= b <= context for b in budgets)


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("spec", MERGING)
def test_merging_runs_chunked_batched_left_padded_and_holds_the_base_budget(spec):
    model = build_model()
    ids = random_ids(120, batch=2, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :17] = 0  # left padding of the second row
    cache = kvstack.make_cache(model, spec)
    cache.begin_prompt(120)
    with torch.no_grad():
        for start in range(0, 120, 32):
            cache.more_prompt_follows = start + 32 < 120
            chunk = ids[:, start : start + 32]
            model(chunk, attention_mask=mask[:, : start + 32], **kvstack.cache_kwargs(model, cache))
        step = ids[:, -1:]
        for _ in range(6):
            mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), 1)
            out = model(step, attention_mask=mask, **kvstack.cache_kwargs(model, cache))
            step = out.logits[:, -1:].argmax(-1)
    assert torch.isfinite(out.logits).all()
    base = kvstack.make_cache(model, parse(spec).inner.label())
    budgets = cache.layer_budgets or [parse(spec).inner.layer_budget(120, i, 2) for i in range(2)]
    grown = 0 if parse(spec).dynamic else 6  # a method that compresses once keeps what decoding adds
    for layer, budget in zip(cache.layers, budgets, strict=True):
        assert layer.length + layer.encoded_entries() <= budget + grown
    assert base is not None and cache.kv_bytes() < cache.full_kv_bytes()


def test_cam_holds_exactly_the_bytes_of_its_base():
    model = build_model()
    ids = random_ids(100, seed=2)
    sizes = {}
    for spec in ("h2o(ratio=0.75)", "cam(h2o(ratio=0.75))", "d2o(h2o(ratio=0.75), layers='uniform')",
                 "kvmerger(h2o(ratio=0.75))"):
        cache = kvstack.make_cache(model, spec)
        with torch.no_grad():
            kvstack.prefill(model, ids, cache, chunk_size=16)
        sizes[spec] = (cache.kv_bytes(), cache.kept_entries())
    base_bytes, entries = sizes["h2o(ratio=0.75)"]
    assert sizes["cam(h2o(ratio=0.75))"] == (base_bytes, entries)
    # a log-mass per entry (float32) and D2O's two per-layer [B, H] thresholds
    layer_state = 2 * 2 * 1 * model.config.num_key_value_heads * 4
    assert sizes["kvmerger(h2o(ratio=0.75))"][0] == base_bytes + 4 * _slots(model, "kvmerger(h2o(ratio=0.75))", ids)
    assert sizes["d2o(h2o(ratio=0.75), layers='uniform')"][0] == base_bytes + 4 * _slots(
        model, "kvmerger(h2o(ratio=0.75))", ids) + layer_state


def _slots(model, spec, ids) -> int:
    """Allocated per-entry slots (capacity) summed over layers, batch and heads."""
    cache = kvstack.make_cache(model, spec)
    with torch.no_grad():
        kvstack.prefill(model, ids, cache, chunk_size=16)
    return sum(layer.capacity * layer.batch * layer.heads for layer in cache.layers)


def test_d2o_density_budgets_sum_to_the_base_total_and_are_held():
    model = build_model(num_hidden_layers=4)
    cache = kvstack.make_cache(model, "d2o(h2o(ratio=0.5))")
    with torch.no_grad():
        kvstack.prefill(model, random_ids(128, seed=5), cache, chunk_size=32)
    assert cache.layer_budgets is not None and sum(cache.layer_budgets) == 4 * 64
    assert [layer.length for layer in cache.layers] == cache.layer_budgets


@pytest.mark.parametrize("spec", ["cam(h2o(budget=500))", "d2o(h2o(budget=500))", "kvmerger(snapkv(budget=500))"])
def test_merging_without_eviction_is_exactly_the_full_model(spec):
    model, reference = build_model(), build_model()
    prompt = random_ids(40, seed=7)[0].tolist()
    cache = kvstack.make_cache(model, spec)
    tokens = []
    with torch.no_grad():
        logits = kvstack.prefill(model, torch.tensor([prompt]), cache)
        for _ in range(8):
            tokens.append(int(logits.argmax(-1)))
            logits = model(torch.tensor([[tokens[-1]]]), **kvstack.cache_kwargs(model, cache)).logits[:, -1]
    assert tokens == reference_generate(reference, prompt, 8)


def test_merging_composes_with_a_codec():
    model = build_model()
    ids = random_ids(150, seed=3)
    kivi = "kivi(bits=4, group_size=16, residual=16)"  # the tiny model's head dimension is 16
    for spec in ("cam(h2o(ratio=0.5))", f"cam(h2o(ratio=0.5)) + {kivi}", f"d2o(h2o(ratio=0.5)) + {kivi}"):
        cache = kvstack.make_cache(model, spec)
        with torch.no_grad():
            logits = kvstack.prefill(model, ids, cache, chunk_size=32)
            for _ in range(40):  # enough decoding for the codec to flush and the merge to reach encoded entries
                logits = model(logits.argmax(-1, keepdim=True), **kvstack.cache_kwargs(model, cache)).logits[:, -1]
        assert torch.isfinite(logits).all()
        assert cache.label() == spec
        layer = cache.layers[0]
        assert layer.encoded_entries() > 0 or "kivi" not in spec
        held = sum(t.nbytes for t in (layer.keys, layer.values, layer.positions, layer.next_position,
                                      *layer.state.values(), *layer.layer_state.values()))
        assert layer.kv_bytes() == held + (layer.region.nbytes() if layer.region is not None else 0)
        if "kivi" in spec:  # the encoded entries take less than their float32 keys and values would
            region = layer.region
            assert region.nbytes() < region.length * layer.batch * layer.heads * layer.head_dim * 2 * 4


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("spec", "message"), [
    ("cam(snapky(ratio=0.5))", "unknown method"),
    ("cam()", "cam wraps one method"),
    ("d2o(h2o(ratio=0.5), ema=1.5)", "ema must be in [0.0, 1.0)"),
    ("kvmerger(h2o(ratio=0.5), threshold=1.5)", "threshold must be in [-1.0, 1.0]"),
    ("kvmerger(h2o(ratio=0.5), sigma=0)", "sigma must be in (0.0, inf)"),
    ("cam(h2o(ratio=0.5), recipients=0)", "recipients must be >= 1"),
    ("cam(adakv(snapkv(ratio=0.5)))", "one uniform budget per layer"),
    ("d2o(full)", "wraps an eviction method with a budget"),
    ("cam(kivi(bits=4))", "wraps an eviction method"),
])
def test_bad_merging_specs_name_the_problem(spec, message):
    with pytest.raises(SpecError, match=None) as error:
        parse(spec)
    assert message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_cli_refuses_a_bad_merging_spec_with_exit_2(capsys):
    err = usage_error(capsys, ["generate", "--method", "kvmerger(h2o(ratio=0.5), threshold=3)", "--prompt", "hi"])
    assert "threshold must be in" in err
    err = usage_error(capsys, ["generate", "--method", "cam(snapky(ratio=0.5))", "--prompt", "hi"])
    assert "snapky" in err


def test_the_engine_refuses_merging_with_a_clear_error():
    from kvstack.engine.compression import engine_method
    from kvstack.errors import KVStackError

    with pytest.raises(KVStackError, match="merged entries"):
        engine_method("cam(h2o(budget=64))", prompt_length=200, num_layers=2)
