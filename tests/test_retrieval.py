"""Quest: page bounds, exactness with a budget that covers everything, the slow tier's bytes and checksums."""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from conftest import build_model, random_ids, stepwise_logits, usage_error
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvstack
from kvstack.cache import page_tier
from kvstack.cache.cache import KVStackCache
from kvstack.cache.page_tier import TieredLayer, TierError
from kvstack.cache.ragged import RaggedHeads
from kvstack.calibration import CalibrationError, model_key
from kvstack.calibration.head_map import HEADS_FORMAT
from kvstack.calibration.head_probe import probe_retrieval_heads
from kvstack.contract import PAGE_SCORE_LOWRANK
from kvstack.methods.retrieval import Duo, InfLLM, Quest
from kvstack.spec import SpecError, parse


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(num_hidden_layers=2)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), pages=st.integers(1, 6), page=st.sampled_from([1, 2, 4, 8]),
       group=st.integers(1, 3))
def test_a_page_bound_is_never_below_the_true_maximum_score_of_its_keys(seed, pages, page, group) -> None:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, pages, page, 8, generator=generator) * 3
    query = torch.randn(2, 3, group, 8, generator=generator)
    summary = {"min": keys.amin(dim=3), "max": keys.amax(dim=3)}
    bound = Quest(page=page, budget=page).page_scores(query, summary)  # [B, H, P]
    true = torch.einsum("bhgd,bhpnd->bhgpn", query, keys).amax(dim=(2, 4))  # best key of each page, any query head
    assert bool((bound >= true - 1e-4).all())
    narrow = Quest(page=page, budget=page, bounds="bfloat16")
    held = narrow.page_summary(keys, torch.ones(2, 1, pages, page, dtype=torch.bool), None)
    assert held["min"].dtype == torch.bfloat16 and bool((held["min"].float() <= summary["min"]).all())
    assert bool((held["max"].float() >= summary["max"]).all())
    assert bool((narrow.page_scores(query, held) >= true - 1e-4).all())


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(-(2.0**126), 2.0**126, width=32), min_size=1, max_size=40))
def test_bfloat16_outward_never_rounds_inward_and_moves_at_most_one_step(values) -> None:
    from kvstack.methods.retrieval import bfloat16_outward

    exact = torch.tensor(values, dtype=torch.float32)
    up, down = bfloat16_outward(exact, up=True).float(), bfloat16_outward(exact, up=False).float()
    assert bool((up >= exact).all()) and bool((down <= exact).all())
    nearest = exact.to(torch.bfloat16).float()
    spacing = nearest.abs() * 2**-7 + 2**-133  # one bfloat16 step (8 significant bits), a subnormal at zero
    assert bool(((up - exact) <= spacing).all()) and bool(((exact - down) <= spacing).all())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), pages=st.integers(1, 6), page=st.sampled_from([1, 2, 4, 8]),
       group=st.integers(1, 3), rank=st.integers(1, 8), held=st.sampled_from(["float16", "int8"]))
def test_lowrank_page_scores_are_each_pages_best_score_when_the_keys_span_rank_directions(
        seed, pages, page, group, rank, held) -> None:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(2, 3, 8, 8, generator=generator)).Q[..., :rank]  # [B, H, D, r]
    keys = torch.randn(2, 3, pages, page, rank, generator=generator) @ directions.unsqueeze(2).transpose(-1, -2)
    query = torch.randn(2, 3, group, 8, generator=generator)
    quest = Quest(page=page, budget=page, select="lowrank", rank=rank, coordinates=held)
    valid = torch.ones(2, 1, pages, page, dtype=torch.bool)
    summary = quest.page_summary(keys, valid, None, {})
    assert summary["basis"].shape == (2, 3, 8, rank) and summary["coordinates"].dtype == getattr(torch, held)
    true = torch.einsum("bhgd,bhpnd->bhgpn", query, keys).amax(dim=(2, 4))  # best key of each page, any query head
    if held == "float16":
        scale = torch.einsum("bhgd,bhpnd->bhgpn", query.abs(), keys.abs()).amax()
        tolerance = 2e-3 * float(scale) + 1e-4
    else:  # each coordinate within half a step of its page's scale: a score within scale/2 times |q B| summed
        assert summary["scale"].shape == (2, 3, pages)
        exact = (keys @ summary["basis"].unsqueeze(2)).transpose(-1, -2)  # [B, H, P, r, page]
        steps = summary["coordinates"].float() * summary["scale"][..., None, None]
        assert bool(((steps - exact).abs() <= summary["scale"][..., None, None] * 0.5001 + 1e-6).all())
        query_sum = (query @ summary["basis"]).abs().sum(-1).amax()
        tolerance = 0.5001 * float(summary["scale"].amax() * query_sum) + 1e-4
    # keys in an r-dimensional subspace: r principal directions score them exactly (up to the coordinates' rounding)
    torch.testing.assert_close(quest.page_scores(query, summary), true, atol=tolerance, rtol=0)
    # later pages are taken on the layer's basis, fitted once
    later = quest.page_summary(keys.flip(2), valid, None, summary)
    assert later["basis"] is summary["basis"]


@pytest.mark.parametrize("spec", ["quest(budget=4096, page=8)", "quest(budget=4096, page=8, select='lowrank')"])
def test_a_budget_covering_everything_is_exactly_the_full_cache(model, spec) -> None:
    ids = random_ids(70)
    want = stepwise_logits(model, ids, DynamicCache())
    cache = kvstack.make_cache(model, spec)
    got = stepwise_logits(model, ids, cache)
    for step_got, step_want in zip(got, want, strict=True):
        torch.testing.assert_close(step_got, step_want, atol=1e-5, rtol=1e-5)
    assert isinstance(cache.layers[0], TieredLayer) and cache.layers[0].full_pages() == (70 + 8) // 8


def test_dense_layers_keep_everything_resident_and_attend_to_all_of_it(model) -> None:
    ids = random_ids(70)
    outputs: dict[str, list[torch.Tensor]] = {}

    def first_layer_outputs(name: str, cache: object) -> None:
        """Layer 0's outputs over a 60-token prompt, then 10 teacher-forced decoding steps (the same tokens)."""
        kept = outputs.setdefault(name, [])
        handle = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: kept.append(out[0]))
        try:
            with torch.no_grad():
                model(input_ids=ids[:, :60], **kvstack.cache_kwargs(model, cache), use_cache=True)
                for step in range(60, 70):
                    model(input_ids=ids[:, step : step + 1], **kvstack.cache_kwargs(model, cache), use_cache=True)
        finally:
            handle.remove()

    first_layer_outputs("full", DynamicCache())
    first_layer_outputs("quest", kvstack.make_cache(model, "quest(budget=8, page=8)"))
    dense = kvstack.make_cache(model, "quest(budget=8, page=8, dense_layers=1)")
    first_layer_outputs("dense", dense)
    # the first layer's input is the embedding whatever the cache: a dense first layer attends as the full cache
    for got, want in zip(outputs["dense"], outputs["full"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(outputs["quest"], outputs["full"], strict=True))
    assert not isinstance(dense.layers[0], TieredLayer) and isinstance(dense.layers[1], TieredLayer)
    assert dense.layers[0].tier_bytes() == 0 and dense.layers[1].tier_bytes() > 0
    assert dense.layers[0].kv_bytes() >= dense.layers[0].full_kv_bytes()


def test_exact_with_chunked_prompts_and_left_padding(model) -> None:
    ids = random_ids(45, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    want = stepwise_logits(model, ids, DynamicCache(), mask=mask)
    got = stepwise_logits(model, ids, kvstack.make_cache(model, "quest(budget=4096, page=4)"), mask=mask)
    for step_got, step_want in zip(got, want, strict=True):
        torch.testing.assert_close(step_got[1], step_want[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step_got[0], step_want[0], atol=1e-5, rtol=1e-5)
    whole, chunked = kvstack.make_cache(model, "quest(budget=4096)"), kvstack.make_cache(model, "quest(budget=4096)")
    single = random_ids(60, seed=5)
    torch.testing.assert_close(kvstack.prefill(model, single, chunked, chunk_size=16),
                               kvstack.prefill(model, single, whole, chunk_size=None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["quest(budget=4096, page=4)",
                                  "infllm(budget=4096, block=4, representatives=1, sinks=3, window=8)"])
def test_chunked_prompts_with_left_padding_read_the_tier_exactly(model, spec, monkeypatch) -> None:
    monkeypatch.setattr(page_tier, "PROMPT_READ_TOKENS", 8)  # several tier groups per prompt chunk
    ids = random_ids(53, batch=2, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    want = kvstack.prefill(model, ids, kvstack.make_cache(model, "full"), attention_mask=mask, chunk_size=12)
    cache = kvstack.make_cache(model, spec)
    got = kvstack.prefill(model, ids, cache, attention_mask=mask, chunk_size=12)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].full_pages() >= 8


def test_a_prompt_chunk_adds_to_the_resident_entries_what_they_received_of_exact_attention(monkeypatch) -> None:
    monkeypatch.setattr(page_tier, "PROMPT_READ_TOKENS", 4)
    method = InfLLM(budget=8, block=4, representatives=1, sinks=2, window=4)
    cache = KVStackCache(method, num_layers=1, num_q_heads=2, num_kv_heads=1, label="infllm",
                         tier_dir=tempfile.gettempdir())
    layer = cache.layers[0]
    generator = torch.Generator().manual_seed(4)
    keys, values = torch.randn(1, 1, 24, 8, generator=generator), torch.randn(1, 1, 24, 8, generator=generator)
    cache.update(keys[:, :, :14], values[:, :, :14], 0)
    layer.attend(torch.randn(1, 2, 14, 8, generator=generator), None, None, 8**-0.5)
    assert layer.full_pages() == 2  # entries 2..9 in the tier; 0, 1 and 10..13 resident
    before = layer.tail_importance.clone()
    cache.update(keys[:, :, 14:], values[:, :, 14:], 0)
    monkeypatch.setattr(layer, "_flush", lambda: None)  # keep the entries resident to read what they received
    query = torch.randn(1, 2, 10, 8, generator=generator)
    output = layer.attend(query, None, None, 8**-0.5)
    logits = query[0] @ keys[0, 0].T * 8**-0.5  # [2, 10, 24]
    logits = logits.masked_fill(torch.ones(10, 24, dtype=torch.bool).triu(15), float("-inf"))
    weights = logits.softmax(-1)
    torch.testing.assert_close(output[0].transpose(0, 1), weights @ values[0, 0], atol=1e-5, rtol=1e-5)
    resident = [0, 1, *range(10, 24)]
    received = weights[:, :, resident].sum(dim=(0, 1))
    torch.testing.assert_close(layer.tail_importance[0, 0] - torch.cat((before[0, 0], torch.zeros(10))), received,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
def test_a_decoding_step_attends_exactly_to_the_top_pages_and_the_newest_entries(fused, monkeypatch) -> None:
    if fused and not page_tier.kernels.available():
        pytest.skip("the fused kernels do not compile here")
    monkeypatch.setattr(page_tier.kernels, "available", lambda: fused)
    attended_in_place = []
    kernel = page_tier.kernels.selected_page_attention
    monkeypatch.setattr(page_tier.kernels, "selected_page_attention",
                        lambda *args: (attended_in_place.append(True), kernel(*args))[1])
    method = Quest(budget=8, page=4)
    cache = KVStackCache(method, num_layers=1, num_q_heads=2, num_kv_heads=1, label="quest",
                         tier_dir=tempfile.gettempdir())
    layer = cache.layers[0]
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 1, 22, 8, generator=generator), torch.randn(1, 1, 22, 8, generator=generator)
    cache.update(keys, values, 0)
    layer.attend(torch.randn(1, 2, 22, 8, generator=generator), None, None, 8**-0.5)
    assert layer.full_pages() == 5 and layer.tail_keys.shape[2] == 2  # 20 entries in the tier, 2 resident
    new_key, new_value = torch.randn(1, 1, 1, 8, generator=generator), torch.randn(1, 1, 1, 8, generator=generator)
    query = torch.randn(1, 2, 1, 8, generator=generator)
    cache.update(new_key, new_value, 0)
    output = layer.attend(query, None, None, 8**-0.5)  # [1, 1, 2, 8]
    pages = keys[0, 0, :20].view(5, 4, 8)
    bound = torch.maximum(query[0, :, 0, None, None, :] * pages.amin(1), query[0, :, 0, None, None, :] *
                          pages.amax(1)).sum(-1).amax(0).view(5)  # [5] largest bound over the two query heads
    top = bound.topk(2).indices.sort().values
    chosen = torch.cat([torch.arange(p * 4, p * 4 + 4) for p in top.tolist()] + [torch.arange(20, 22)])
    all_keys, all_values = torch.cat((keys, new_key), 2)[0, 0], torch.cat((values, new_value), 2)[0, 0]
    chosen = torch.cat((chosen, torch.tensor([22])))
    for head in range(2):
        weights = (query[0, head, 0] @ all_keys[chosen].T * 8**-0.5).softmax(-1)
        torch.testing.assert_close(output[0, 0, head], weights @ all_values[chosen], atol=1e-5, rtol=1e-5)
    assert attended_in_place == ([True] if fused else [])


def test_resident_and_tier_bytes_are_what_each_holds_and_the_file_goes_with_the_cache(model, tmp_path) -> None:
    ids = random_ids(100)
    cache = kvstack.make_cache(model, f"quest(budget=32, page=16, tier_dir={str(tmp_path)!r})")
    kvstack.prefill(model, ids, cache)
    full = kvstack.make_cache(model, "full")
    kvstack.prefill(model, ids, full)
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    pages = 100 // 16
    for layer in cache.layers:
        assert layer.tier_bytes() == pages * heads * 2 * 16 * dim * 4 == os.path.getsize(layer.pages.path)
        resident = 2 * heads * pages * dim * 4 + 2 * pages * heads * 8 + 100 * 4 + 2 * heads * (100 % 16) * dim * 4
        assert layer.kv_bytes() == resident  # bounds, checksums, positions, the newest 4 entries
    assert cache.kv_bytes() + cache.tier_bytes() > full.kv_bytes() * 0.9
    assert cache.kv_bytes() < 0.25 * full.kv_bytes()
    assert cache.summary()["tier_bytes"] == cache.tier_bytes()
    assert len(os.listdir(tmp_path)) == 2  # one file per layer (keys and values of each record together)
    del cache, layer
    gc.collect()
    assert os.listdir(tmp_path) == []
    # low-rank selection holds each entry's 4 float16 coordinates and the layer's basis instead of the bounds
    lowrank = kvstack.make_cache(model, "quest(budget=32, page=16, select='lowrank', rank=4, "
                                        f"tier_dir={str(tmp_path)!r})")
    kvstack.prefill(model, ids, lowrank)
    for layer in lowrank.layers:
        coordinates, basis = heads * pages * 16 * 4 * 2, heads * dim * 4 * 4
        assert layer.kv_bytes() == resident - 2 * heads * pages * dim * 4 + coordinates + basis
    # int8 coordinates: one byte each, and a float32 scale per page and head
    halved = kvstack.make_cache(model, "quest(budget=32, page=16, select='lowrank', rank=4, coordinates='int8', "
                                       f"tier_dir={str(tmp_path)!r})")
    kvstack.prefill(model, ids, halved)
    for layer in halved.layers:
        coordinates, scales, basis = heads * pages * 16 * 4, heads * pages * 4, heads * dim * 4 * 4
        assert layer.kv_bytes() == resident - 2 * heads * pages * dim * 4 + coordinates + scales + basis
    del lowrank, halved, layer
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_a_corrupt_page_is_refused_never_read(model, tmp_path) -> None:
    cache = kvstack.make_cache(model, f"quest(budget=4096, page=8, tier_dir={str(tmp_path)!r})")  # reads every page
    kvstack.prefill(model, random_ids(64), cache)
    path = cache.layers[0].pages.path
    with open(path, "r+b") as handle:
        handle.seek(3 * 8 * 4 + 5)
        byte = handle.read(1)
        handle.seek(3 * 8 * 4 + 5)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(TierError, match=r"page \d+ of the slow tier .* fails its checksum; it is refused"):
        stepwise_logits(model, torch.tensor([[5]]), cache, steps=0)


def test_bad_quest_specs_are_one_line_each(model, tmp_path) -> None:
    for spec, message in (("quest(page=12)", "page must be a positive power of two"),
                          ("quest(page=0)", "page must be a positive power of two"),
                          ("quest(budget=8, page=16)", "budget must be at least one page"),
                          ("quest(budget=64, page=8, cached=32)", r"cached must be 0 \(no page cache\) or at least"),
                          ("quest(bounds='float16')", "bounds must be 'float32' or 'bfloat16'"),
                          ("quest(dense_layers=-1)", "dense_layers must be a number of layers >= 0"),
                          ("quest(select='centroid')", "select must be one of 'bound', 'lowrank'"),
                          ("quest(select='lowrank', rank=0)", "rank must be a number of principal directions"),
                          ("quest(select='lowrank', coordinates='int4')",
                           "coordinates must be one of 'float16', 'int8'")):
        with pytest.raises(SpecError, match=message):
            parse(spec)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.access(read_only, os.W_OK):  # root ignores permissions: a file is no directory either way
        read_only = tmp_path / "file"
        read_only.write_text("")
    with pytest.raises(TierError, match=r"tier_dir .* (not writable|not a directory)") as err:
        kvstack.make_cache(model, f"quest(tier_dir={str(read_only)!r})")
    assert "\n" not in str(err.value)
    with pytest.raises(kvstack.InputError, match="does not compose with a codec"):
        kvstack.make_cache(model, "quest + kivi(bits=4, group_size=16)")
    layers = model.config.num_hidden_layers
    with pytest.raises(kvstack.InputError, match=f"leaves none of the model's {layers} layers reading pages"):
        kvstack.make_cache(model, f"quest(dense_layers={layers})")


def test_cli_refuses_bad_quest_input_with_exit_2(capsys, tmp_path) -> None:
    err = usage_error(capsys, ["generate", "--method", "quest(page=3)", "--prompt", "hi"])
    assert "power of two" in err
    err = usage_error(capsys, ["generate", "--method", "quest(budget=2, page=4)", "--prompt", "hi"])
    assert "at least one page" in err
    err = usage_error(capsys, ["generate", "--method", "quest(select='centroid')", "--prompt", "hi"])
    assert "select must be one of 'bound', 'lowrank'" in err


# ------------------------------------------------------------------------------------------------ InfLLM
@pytest.mark.parametrize("options", ["representatives=2", "representatives=2, aggregate='max', precision='int8'",
                                     "representatives=8, aggregate='max', precision='int8'"])
def test_infllm_with_a_budget_covering_everything_is_exactly_the_full_cache(model, options) -> None:
    ids = random_ids(90)
    want = stepwise_logits(model, ids, DynamicCache(), steps=12)
    cache = kvstack.make_cache(model, f"infllm(budget=4096, block=8, sinks=4, window=16, {options})")
    got = stepwise_logits(model, ids, cache, steps=12)
    for step_got, step_want in zip(got, want, strict=True):
        torch.testing.assert_close(step_got, step_want, atol=1e-5, rtol=1e-5)
    layer = cache.layers[0]
    assert layer.full_pages() == (90 + 12 - 4 - 16) // 8 and layer.sink_count() == 4
    reps = int(options.split(",")[0].split("=")[1])
    assert layer.tracks_importance == (reps < 8)  # every key representing its block: no statistics to collect
    if "int8" in options:  # int8 codes (coordinate-major) and a float32 scale per representative, all resident
        assert layer.summary["coordinates"].shape[2:] == (layer.full_pages(), layer.head_dim, reps)
        assert layer.summary["coordinates"].dtype == torch.int8
        assert layer.summary["scale"].shape[2:] == (layer.full_pages(), reps)
    else:
        assert layer.summary["representatives"].shape[2:] == (layer.full_pages(), 2, layer.head_dim)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), group=st.integers(1, 3), reps=st.integers(1, 8), spread=st.floats(0.01, 50))
def test_infllm_int8_representatives_score_within_half_a_step_of_the_full_ones(seed, group, reps, spread) -> None:
    """Each coordinate rounds by at most half its key's step, so a score moves by at most half a step times
    the query's L1 norm (summed over the representatives under ``sum``; the largest under ``max``)."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, 3, 8, 16, generator=generator) * spread
    importance = torch.rand(1, 2, 3, 8, generator=generator)
    query = torch.randn(1, 2, group, 16, generator=generator)
    valid = torch.ones(1, 1, 3, 8, dtype=torch.bool)
    for aggregate in ("sum", "max"):
        exact, narrow = (InfLLM(block=8, budget=8, representatives=reps, aggregate=aggregate, precision=precision)
                         for precision in ("full", "int8"))
        held = narrow.page_summary(keys, valid, importance)
        assert held["coordinates"].dtype == torch.int8 and held["scale"].dtype == torch.float32
        full = exact.page_summary(keys, valid, importance)["representatives"]
        step = full.abs().amax(dim=-1) / 127  # [B, H, P, r]
        slack = 0.5 * step.unsqueeze(2) * query.abs().sum(-1)[:, :, :, None, None]  # [B, H, G, P, r]
        bound = (slack.sum(-1) if aggregate == "sum" else slack.amax(-1)).amax(dim=2)  # [B, H, P]
        gap = (narrow.page_scores(query, held) - exact.page_scores(query, {"representatives": full})).abs()
        assert bool((gap <= bound * 1.001 + 1e-4).all())


def test_infllm_with_every_key_a_representative_needs_no_attention_statistics() -> None:
    """With ``representatives=block`` a block's summary and scores do not depend on which keys were attended:
    without the column sums (None) they are those made with any importance, padding included."""
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 3, 5, 8, 16, generator=generator)
    query = torch.randn(2, 3, 3, 16, generator=generator)
    valid = torch.ones(2, 1, 5, 8, dtype=torch.bool)
    valid[1, 0, 2, :3] = False
    for precision in ("full", "int8"):
        method = InfLLM(block=8, budget=8, representatives=8, aggregate="max", precision=precision)
        assert method.needs == frozenset()
        blind = method.page_scores(query, method.page_summary(keys, valid, None))
        for _ in range(3):
            importance = torch.rand(2, 3, 5, 8, generator=generator)
            torch.testing.assert_close(method.page_scores(query, method.page_summary(keys, valid, importance)), blind)
    assert InfLLM(block=8, budget=8, representatives=4).needs == frozenset({"colsum"})


def test_infllm_representatives_are_each_blocks_most_attended_keys() -> None:
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 3, 8, 4, generator=generator)
    importance = torch.rand(1, 2, 3, 8, generator=generator)
    valid = torch.ones(1, 1, 3, 8, dtype=torch.bool)
    valid[0, 0, 0, :5] = False  # padding is never a representative
    chosen = InfLLM(block=8, budget=8, representatives=2).page_summary(keys, valid, importance)["representatives"]
    for head in range(2):
        for block in range(3):
            score = importance[0, head, block].masked_fill(~valid[0, 0, block], -1.0)
            top = score.topk(2).indices
            torch.testing.assert_close(chosen[0, head, block], keys[0, head, block, top])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), group=st.integers(1, 3), reps=st.integers(1, 4), padded=st.integers(0, 7))
def test_infllm_max_scores_a_block_by_its_best_representative_and_padding_never_raises_it(seed, group, reps,
                                                                                          padded) -> None:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, 3, 8, 4, generator=generator) * 2
    importance = torch.rand(1, 2, 3, 8, generator=generator)
    query = torch.randn(1, 2, group, 4, generator=generator)
    valid = torch.ones(1, 1, 3, 8, dtype=torch.bool)
    valid[0, 0, 1, :padded] = False  # block 1 partly padding: fewer real keys than representatives, maybe
    for aggregate in ("sum", "max"):
        method = InfLLM(block=8, budget=8, representatives=reps, aggregate=aggregate)
        got = method.page_scores(query, method.page_summary(keys, valid, importance))  # [B, H, P]
        for head in range(2):
            for block in range(3):
                real = valid[0, 0, block]
                order = importance[0, head, block].masked_fill(~real, -1.0).topk(min(reps, int(real.sum()))).indices
                dots = query[0, head] @ keys[0, head, block, order].T  # [G, r] over the real representatives
                want = dots.amax() if aggregate == "max" else dots.sum(dim=-1).mean()
                torch.testing.assert_close(got[0, head, block], want, atol=1e-5, rtol=1e-5)


def test_infllm_decoding_attends_to_sinks_window_and_the_top_blocks_through_an_lru() -> None:
    method = InfLLM(budget=8, block=4, representatives=1, sinks=2, window=4, cached_blocks=3)
    cache = KVStackCache(method, num_layers=1, num_q_heads=2, num_kv_heads=1, label="infllm",
                         tier_dir=tempfile.gettempdir())
    layer = cache.layers[0]
    generator = torch.Generator().manual_seed(2)
    keys, values = torch.randn(1, 1, 26, 8, generator=generator), torch.randn(1, 1, 26, 8, generator=generator)
    cache.update(keys, values, 0)
    layer.attend(torch.randn(1, 2, 26, 8, generator=generator), None, None, 8**-0.5)
    assert layer.full_pages() == 5  # entries 2..21 in the tier; 0, 1 and 22..25 resident
    reads = []
    original = layer.pages.read_into
    layer.pages.read_into = lambda records, slots, rows: (reads.append(len(records)), original(records, slots, rows))[1]
    representatives = layer.summary["representatives"][0, 0, :, 0]  # [5, D]
    all_keys, all_values = keys[0, 0], values[0, 0]
    queries = [torch.randn(1, 2, 1, 8, generator=generator)] * 2 + [-torch.randn(1, 2, 1, 8, generator=generator)]
    tops = []
    for step, query in enumerate(queries):
        new_key, new_value = torch.randn(1, 1, 1, 8, generator=generator), torch.randn(1, 1, 1, 8, generator=generator)
        cache.update(new_key, new_value, 0)
        output = layer.attend(query, None, None, 8**-0.5)
        score = (query[0, :, 0] @ representatives.T).mean(0)  # [5] averaged over the two query heads
        top = score.topk(2).indices.sort().values.tolist()
        tops.append(top)
        all_keys, all_values = torch.cat((all_keys, new_key[0, 0])), torch.cat((all_values, new_value[0, 0]))
        resident = [0, 1, *range(22, 26 + step + 1)]
        chosen = [0, 1] + [2 + 4 * block + j for block in top for j in range(4)] + resident[2:]
        for head in range(2):
            weights = (query[0, head, 0] @ all_keys[chosen].T * 8**-0.5).softmax(-1)
            torch.testing.assert_close(output[0, 0, head], weights @ all_values[chosen], atol=1e-5, rtol=1e-5)
    # The second step finds its blocks in the LRU (capacity three blocks); the third reads only what is new,
    # into the least recently used slots.
    fresh = len(set(tops[2]) - set(tops[0]))
    assert reads == [2] + ([fresh] if fresh else []) and fresh >= 1
    assert len(layer.lru) == min(3, 2 + fresh) and layer.lru.misses == 2 + fresh
    assert set(layer.lru.record_of[layer.lru.record_of >= 0].tolist()) >= set(tops[2])
    assert layer.lru.slots.nbytes == 2 * 3 * 4 * 8 * 4 and layer.kv_bytes() > layer.lru.nbytes()


def test_bad_infllm_specs_are_one_line_each() -> None:
    for spec, message in (("infllm(block=100)", "block must be a positive power of two"),
                          ("infllm(budget=64, block=128)", "budget must be at least one block"),
                          ("infllm(block=4, budget=8, representatives=5)", "representatives must be 1 to block=4"),
                          ("infllm(sinks=-1)", "sinks"),
                          ("infllm(aggregate='mean')", "aggregate must be one of sum, max, got 'mean'"),
                          ("infllm(precision='int4')", "precision must be one of full, int8, got 'int4'"),
                          ("infllm(budget=704, block=32, cached_blocks=16)",
                           r"cached_blocks must be 0 \(no block cache\) or at least the 22 blocks one step reads")):
        with pytest.raises(SpecError, match=message):
            parse(spec)
    assert parse("infllm(budget=704, block=32)").cached_pages() == 22  # by default, what one step reads
    assert parse("infllm(budget=704, block=32, cached_blocks=0)").cached_pages() == 0


# ------------------------------------------------------------------------------------------------ retrieval heads
def _write_heads(path, key: str, scores: list[list[float]]) -> str:
    path.write_text(json.dumps({"format": HEADS_FORMAT, "version": 1, "model_key": key, "scores": scores}))
    return str(path)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 40), sinks=st.integers(0, 6), recent=st.integers(0, 12))
def test_duo_keeps_everything_on_retrieval_heads_and_sinks_plus_recent_on_the_others(seed, length, sinks,
                                                                                     recent) -> None:
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(length, dtype=torch.float32).expand(3, length).clone()
    padded = torch.rand(3, length, generator=generator) < 0.2
    scores = positions.masked_fill(padded, float("-inf"))
    scores[0] = torch.where(padded[0], scores[0], torch.full((length,), float("inf")))  # head 0 retrieves
    keep = Duo(sinks=sinks, recent=recent).allocate_heads(scores, length)
    assert torch.equal(keep[0], ~padded[0])
    for head in (1, 2):
        valid = (~padded[head]).nonzero().squeeze(-1).tolist()
        expected = set(valid[:sinks]) | set(valid[max(0, len(valid) - recent):])
        assert set(keep[head].nonzero().squeeze(-1).tolist()) == expected


def test_duo_stores_each_head_its_own_count_from_the_model_artefact(model, tmp_path) -> None:
    scores = [[0.9, 0.0], [0.1, 0.8]]  # 2 layers x 2 KV heads: heads=0.5 keeps L0.H0 and L1.H1 whole
    artefact = _write_heads(tmp_path / "heads.json", model_key(model), scores)
    cache = kvstack.make_cache(model, f"duo(heads=0.5, sinks=2, recent=5, artefact={artefact!r})")
    kvstack.prefill(model, random_ids(40), cache)
    assert cache.layers[0].head_lengths().tolist() == [[40, 7]]
    assert cache.layers[1].head_lengths().tolist() == [[7, 40]]
    assert cache.kv_bytes() == sum(layer.kv_bytes() for layer in cache.layers)
    whole = kvstack.make_cache(model, f"duo(heads=1.0, artefact={artefact!r})")
    ids = random_ids(30, seed=8)
    for got, want in zip(stepwise_logits(model, ids, whole), stepwise_logits(model, ids, DynamicCache()),
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_duo_refuses_scores_from_another_model_or_geometry(model, tmp_path) -> None:
    other = _write_heads(tmp_path / "other.json", "another-model-000000000000", [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(CalibrationError, match="were made for model another-model-000000000000, not this one") as err:
        kvstack.make_cache(model, f"duo(artefact={other!r})")
    assert "\n" not in str(err.value)
    shaped = _write_heads(tmp_path / "shape.json", model_key(model), [[0.5, 0.5, 0.5]])
    with pytest.raises(CalibrationError, match="not 2 layers x 2 KV heads"):
        kvstack.make_cache(model, f"duo(artefact={shaped!r})")
    with pytest.raises(CalibrationError, match="no retrieval-head scores"):
        kvstack.make_cache(model, f"duo(artefact={str(tmp_path / 'none.json')!r})")
    with pytest.raises(SpecError, match="heads must be the fraction"):
        parse("duo(heads=0)")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 40), sinks=st.integers(0, 6), recent=st.integers(0, 12))
def test_duo_compensation_is_the_mean_of_what_each_head_drops_weighing_as_their_count(seed, length, sinks,
                                                                                     recent) -> None:
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(length).expand(3, length).clone()
    padded = torch.rand(3, length, generator=generator) < 0.2
    scores = positions.float().masked_fill(padded, float("-inf"))
    scores[0] = torch.where(padded[0], scores[0], torch.full((length,), float("inf")))  # head 0 retrieves
    positions = positions.masked_fill(padded, -1)
    keys, values = torch.randn(3, length, 4, generator=generator), torch.randn(3, length, 4, generator=generator)
    method = Duo(sinks=sinks, recent=recent, compensation=True)
    keep = method.allocate_heads(scores, length)
    extra = method.compensate_heads(keys, values, positions, keep)
    assert not bool(extra.present[0])  # a retrieval head drops nothing
    for head in (1, 2):
        dropped = [i for i in range(length) if positions[head, i] >= 0 and not keep[head, i]]
        assert bool(extra.present[head]) == bool(dropped)
        if dropped:
            torch.testing.assert_close(extra.keys[head], keys[head, dropped].mean(dim=0))
            torch.testing.assert_close(extra.values[head], values[head, dropped].mean(dim=0))
            assert math.isclose(float(extra.log_mass[head]), math.log(len(dropped)), rel_tol=1e-6)
            assert int(extra.positions[head]) == dropped[0]
    assert Duo(sinks=sinks, recent=recent).compensate_heads(keys, values, positions, keep) is None


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), before=st.integers(0, 5), after=st.integers(0, 5), copies=st.integers(1, 9),
       q_len=st.integers(1, 3))
def test_a_merged_entry_attends_as_the_identical_entries_it_stands_for(seed, before, after, copies, q_len) -> None:
    """RaggedHeads with one entry of log mass log(n) gives what n copies of that entry give, with no mass."""
    generator = torch.Generator().manual_seed(seed)
    dim, group = 8, 2
    keys = torch.randn(before + 1 + after, dim, generator=generator)
    values = torch.randn(before + 1 + after, dim, generator=generator)
    repeat = torch.tensor([1] * before + [copies] + [1] * after)
    merged = RaggedHeads(1, 1, dim, torch.float32, torch.device("cpu"))
    log_mass = torch.zeros(before + 1 + after)
    log_mass[before] = math.log(copies)
    merged.set_head(0, 0, keys, values, torch.arange(before + 1 + after, dtype=torch.int32), log_mass)
    copied = RaggedHeads(1, 1, dim, torch.float32, torch.device("cpu"))
    copied.set_head(0, 0, keys.repeat_interleave(repeat, dim=0), values.repeat_interleave(repeat, dim=0),
                    torch.arange(int(repeat.sum()), dtype=torch.int32))
    new_keys, new_values = torch.randn(2, 1, 1, q_len, dim, generator=generator)
    query = torch.randn(1, group, q_len, dim, generator=generator)
    outputs = []
    for heads in (merged, copied):
        heads.append(new_keys, new_values, torch.arange(q_len, dtype=torch.int32).view(1, q_len) + 100)
        outputs.append(heads.attend(query, None, 0.5))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    assert merged.nbytes() > RaggedHeads(1, 1, dim, torch.float32, torch.device("cpu")).nbytes()


def test_duo_compensation_adds_one_entry_per_streaming_head_and_is_exact_when_nothing_is_dropped(
        model, tmp_path) -> None:
    scores = [[0.9, 0.0], [0.1, 0.8]]
    artefact = _write_heads(tmp_path / "heads.json", model_key(model), scores)
    plain = kvstack.make_cache(model, f"duo(heads=0.5, sinks=2, recent=5, artefact={artefact!r})")
    folded = kvstack.make_cache(model, f"duo(heads=0.5, sinks=2, recent=5, artefact={artefact!r}, "
                                       "compensation=True)")
    ids = random_ids(40)
    kvstack.prefill(model, ids, plain)
    kvstack.prefill(model, ids, folded)
    assert folded.layers[0].head_lengths().tolist() == [[40, 8]]
    assert folded.layers[1].head_lengths().tolist() == [[8, 40]]
    assert folded.kv_bytes() > plain.kv_bytes()
    step = torch.tensor([[7]])
    with torch.no_grad():
        logits = [model(input_ids=step, **kvstack.cache_kwargs(model, cache), use_cache=True).logits
                  for cache in (plain, folded)]
    assert not torch.allclose(logits[0], logits[1])  # the dropped 33 entries reach the output through one
    covering = f"duo(heads=0.5, sinks=20, recent=30, artefact={artefact!r}, compensation=True)"
    short = random_ids(30, seed=8)
    for got, want in zip(stepwise_logits(model, short, kvstack.make_cache(model, covering)),
                         stepwise_logits(model, short, DynamicCache()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(SpecError, match="folds what each head drops into one entry") as err:
        parse("duo(compensation=True) + kivi(bits=2)")
    assert "\n" not in str(err.value)
    with pytest.raises(SpecError, match="compensation must be True or False"):
        parse("duo(compensation=1)")


def test_the_probe_finds_heads_that_retrieve_on_the_default_model() -> None:
    """One short needle prompt on SmolLM2: some KV head's strongest attention lands on the copied digits."""
    real, tokenizer = kvstack.load_model("smollm2-135m")
    record = probe_retrieval_heads(real, tokenizer, prompts=1, length=256, digits=8)
    scores = torch.tensor(record["scores"])
    assert scores.shape == (30, 3) and record["copy_steps"] > 0
    assert bool(((scores >= 0) & (scores <= 1)).all()) and float(scores.max()) >= 0.5
    assert record["model_key"] == model_key(real)
    keyed = probe_retrieval_heads(real, tokenizer, prompts=2, length=512, digits=8, kind="keyed", needles=4)
    assert keyed["method"] == "probe-keyed" and keyed["needles"] == 4 and keyed["digits"] == 8
    assert keyed["copy_steps"] > 0
    assert torch.tensor(keyed["scores"]).shape == (30, 3)
    with pytest.raises(CalibrationError, match="the probe's kind must be one of single, keyed") as err:
        probe_retrieval_heads(real, tokenizer, kind="named")
    assert "\n" not in str(err.value)
    with pytest.raises(CalibrationError, match="the probe's score must be one of argmax, mass"):
        probe_retrieval_heads(real, tokenizer, score="top")
    mass = probe_retrieval_heads(real, tokenizer, prompts=1, length=256, digits=8, score="mass")
    weights = torch.tensor(mass["scores"])  # the mean attention weight on the copied token: a share, in [0, 1]
    assert mass["score"] == "mass" and bool(((weights >= 0) & (weights <= 1)).all())
    argmax_heads = set(scores.flatten().topk(3).indices.tolist())
    assert argmax_heads & set(weights.flatten().topk(9).indices.tolist())  # where a head looks hardest, it weighs


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), needles=st.integers(1, 6))
def test_a_keyed_probe_prompt_asks_for_one_named_needle_among_look_alikes(seed, needles) -> None:
    """The span the probe scores is the needle of the name the question asks for, and every needle is there."""
    from kvstack.calibration.head_probe import KEY_NAMES, _needle_prompt

    class Words:  # a tokenizer of whitespace-separated words, so spans can be read back
        def __init__(self) -> None:
            self.vocabulary: dict[str, int] = {}

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [self.vocabulary.setdefault(w, len(self.vocabulary)) for w in text.split()]}

    words = Words()
    text = words(" ".join(f"filler{i}" for i in range(200)))["input_ids"]
    ids, span, number = _needle_prompt(words, text, "keyed", needles, 6, torch.Generator().manual_seed(seed))
    back = {index: word for word, index in words.vocabulary.items()}
    said = [back[i] for i in ids]
    needle = said[span.start : span.stop]
    asked = said[-2]  # "What is the special magic number for NAME? The special magic number for NAME is"
    assert needle[:5] == ["The", "special", "magic", "number", "for"] and said[-1] == "is"
    assert needle[5] == asked and said[-8] == f"{asked}?" and needle[7] == f"{number}."
    assert sum(w == "magic" for w in said) == needles + 2  # the needles, and the question's two mentions
    assert [w for w in said if w.startswith("filler")] == [f"filler{i}" for i in range(200)]
    assert asked in KEY_NAMES


def test_host_pages_read_what_the_file_tier_reads() -> None:
    """The GPU case's host-memory tier numbers and returns blocks exactly as the file does (checked on the CPU)."""
    from kvstack.cache.page_tier import HostPages, PageFile

    generator = torch.Generator().manual_seed(4)
    keys, values = torch.randn(2, 3, 40, 8, generator=generator), torch.randn(2, 3, 40, 8, generator=generator)
    host = HostPages(2, 3, 8, 8, torch.float32)
    file = PageFile(tempfile.gettempdir(), 2, 3, 8, 8, torch.float32)
    for tier in (host, file):
        tier.append(keys[:, :, :16], values[:, :, :16])
        tier.append(keys[:, :, 16:], values[:, :, 16:])
    pages = torch.randint(0, 5, (2, 3, 3), generator=generator).sort(dim=-1).values
    for got, want in zip(host.read(pages), file.read(pages), strict=True):
        assert torch.equal(got, want)
    index = (pages.unsqueeze(-1) * 8 + torch.arange(8)).flatten(2).unsqueeze(-1).expand(-1, -1, -1, 8)
    assert torch.equal(host.read(pages)[0], keys.gather(2, index))
    assert host.nbytes() == file.nbytes() == 2 * 3 * 5 * 2 * 8 * 8 * 4
    file.close()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), capacity=st.integers(1, 6),
       reads=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=6, unique=True), min_size=1, max_size=8))
def test_the_page_cache_returns_the_tiers_blocks_and_keeps_the_most_recently_read(seed, capacity, reads) -> None:
    from kvstack.cache.page_tier import HostPages, PageCache

    store = HostPages(batch=1, heads=1, page=2, head_dim=3, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 1, 20, 3, generator=generator), torch.randn(1, 1, 20, 3, generator=generator)
    store.append(keys, values)  # ten blocks of two entries
    cache = PageCache(capacity, page=2, head_dim=3, dtype=torch.float32, device=torch.device("cpu"))
    last_read: dict[int, int] = {}  # record -> the read that last used it (a read's records are equally recent)
    for step, records in enumerate(reads):
        records = records[:capacity]
        got_keys, got_values = cache.read(np.array(records), store)
        want_keys, want_values = store.read_records(np.array(records))
        assert torch.equal(got_keys, want_keys) and torch.equal(got_values, want_values)
        last_read.update(dict.fromkeys(records, step))
        held = set(cache.record_of[cache.record_of >= 0].tolist())
        assert len(held) == min(capacity, len(last_read)) and set(records) <= held
        assert min(last_read[r] for r in held) >= max((last_read[r] for r in set(last_read) - held), default=-1)


@pytest.mark.skipif(not page_tier.kernels.available(), reason="the fused kernels do not compile here")
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), capacity=st.integers(1, 4),
       reads=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True), min_size=1, max_size=8))
def test_the_fused_page_cache_read_returns_the_tiers_blocks_and_keeps_the_most_recently_read(
        seed, capacity, reads, tmp_path_factory) -> None:
    from kvstack.cache.page_tier import PageCache, PageFile

    batch, heads = 2, 3
    store = PageFile(str(tmp_path_factory.mktemp("tier")), batch, heads, page=2, head_dim=4, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(batch, heads, 16, 4, generator=generator), torch.randn(batch, heads, 16, 4,
                                                                                     generator=generator)
    store.append(keys, values)  # eight pages of two entries
    cache = PageCache(capacity * batch * heads, page=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    last_read: dict[int, int] = {}  # record -> the read that last used it
    for step, chosen in enumerate(reads):
        pages = torch.tensor(chosen[:capacity]).expand(batch, heads, -1)  # every (sequence, head) reads these
        slots = cache.locate_pages(pages, store)
        want_keys, want_values = store.read(pages)  # [B, H, k * page, D]
        assert torch.equal(cache.slots[0][slots].flatten(2, 3), want_keys)
        assert torch.equal(cache.slots[1][slots].flatten(2, 3), want_values)
        records = store.records(pages).tolist()
        last_read.update(dict.fromkeys(records, step))
        held = set(cache.record_of[cache.record_of >= 0].tolist())
        assert len(held) == min(cache.capacity, len(last_read)) and set(records) <= held
        assert min(last_read[r] for r in held) >= max((last_read[r] for r in set(last_read) - held), default=-1)
        assert all(cache.slot_of[r] == s for s, r in enumerate(cache.record_of.tolist()) if r >= 0)
    store.close()


@pytest.mark.skipif(not page_tier.kernels.available(), reason="the fused kernels do not compile here")
def test_the_fused_page_cache_read_refuses_a_corrupt_or_cut_page_and_forgets_its_slots(tmp_path) -> None:
    from kvstack.cache.page_tier import PageCache, PageFile

    generator = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 48, 8, generator=generator), torch.randn(1, 2, 48, 8, generator=generator)
    file = PageFile(str(tmp_path), 1, 2, 8, 8, torch.float32)
    file.append(keys, values)  # six pages of two heads: (page, head) -> record 2 * page + head
    cache = PageCache(4, page=8, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    first = torch.tensor([[[0, 1], [0, 1]]])  # records 0, 2 (head 0) and 1, 3 (head 1)
    cache.locate_pages(first, file)
    with open(file.path, "r+b") as handle:  # flip a bit of record 6's keys (page 3, head 0)
        handle.seek(2 * 6 * 8 * 8 * 4 + 3)
        byte = handle.read(1)
        handle.seek(2 * 6 * 8 * 8 * 4 + 3)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(TierError, match=r"page 3 of the slow tier .*\(keys\) fails its checksum; it is refused"):
        cache.locate_pages(torch.tensor([[[3, 0], [2, 1]]]), file)  # records 6, 0 (cached) and 5, 3 (cached)
    assert set(cache.record_of[cache.record_of >= 0].tolist()) == {0, 3}  # the slots read into hold nothing
    assert (cache.slot_of[[5, 6]] == -1).all()
    slots = cache.locate_pages(first, file)  # what the cache holds is still the tier's
    want_keys, want_values = file.read(first)
    assert torch.equal(cache.slots[0][slots].flatten(2, 3), want_keys)
    assert torch.equal(cache.slots[1][slots].flatten(2, 3), want_values)
    os.truncate(file.path, 2 * 10 * 8 * 8 * 4)  # records 10 and 11 (page 5) cut off
    with pytest.raises(TierError, match="is shorter than its pages; it is refused"):
        cache.locate_pages(torch.tensor([[[5], [4]]]), file)
    file.close()


@pytest.mark.skipif(not page_tier.kernels.available(), reason="the fused kernels do not compile here")
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), pages=st.integers(2, 150), page=st.sampled_from([1, 2, 4, 8, 16, 32]),
       group=st.integers(1, 6), rank=st.integers(1, 12), select=st.sampled_from(["bound", "lowrank", "infllm"]),
       head_dim=st.sampled_from([12, 16]), held=st.sampled_from(["float16", "int8"]), data=st.data())
def test_the_fused_page_selection_picks_the_top_pages_of_the_policys_scores(
        seed, pages, page, group, rank, select, head_dim, held, data) -> None:
    # up to 150 pages: several of the kernels' chunks of 64 per head; up to 6 query heads: a group of four and the
    # rest; head dimensions of 12 and 16: the scalar and the vector key-bound paths; InfLLM's int8 keys with the
    # maximum: the low-rank form without a basis, a scale per key (per page when a block has one representative)
    generator = torch.Generator().manual_seed(seed)
    norms = torch.rand(2, 3, pages, page, 1, generator=generator) * 4  # keys of different lengths: per-key scales
    keys = torch.randn(2, 3, pages, page, head_dim, generator=generator) * norms
    query = torch.randn(2, 3, group, head_dim, generator=generator)
    count = data.draw(st.integers(1, pages - 1))
    if select == "infllm":
        quest = InfLLM(block=page, budget=page, representatives=data.draw(st.integers(1, page)), aggregate="max",
                       precision="int8")
        importance = torch.rand(2, 3, pages, page, generator=generator)
        summary = quest.page_summary(keys, torch.ones(2, 1, pages, page, dtype=torch.bool), importance, {})
        assert quest.page_score_form() == PAGE_SCORE_LOWRANK and "basis" not in summary
    else:
        quest = Quest(page=page, budget=page, select=select, rank=rank, coordinates=held)
        summary = quest.page_summary(keys, torch.ones(2, 1, pages, page, dtype=torch.bool), None, {})
    cache = KVStackCache(quest, num_layers=1, num_q_heads=3 * group, num_kv_heads=3, label="quest",
                         tier_dir=tempfile.gettempdir())
    layer = cache.layers[0]
    layer.summary = summary  # what a layer holds once these pages have moved to the tier
    chosen = layer._top_pages(query, count)
    scores = quest.page_scores(query, summary)  # [B, H, P]
    assert chosen.shape == (2, 3, count) and chosen.dtype == torch.long
    assert all(len(set(row)) == count for row in chosen.flatten(0, 1).tolist())  # distinct pages
    picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
    lowest_picked = scores.masked_fill(~picked, float("inf")).amin(dim=-1)
    highest_left = scores.masked_fill(picked, float("-inf")).amax(dim=-1)
    # the top `count` pages, up to float rounding between the kernel's sums and the policy's matrix products
    assert bool((lowest_picked >= highest_left - 1e-4 * scores.abs().amax()).all())


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch"])
def test_blocks_read_into_the_page_slots_are_the_tiers_and_a_corrupt_one_is_refused_and_forgotten(
        fused, monkeypatch, tmp_path) -> None:
    from kvstack.cache.page_tier import PageCache, PageFile

    if fused and not page_tier.kernels.available():
        pytest.skip("the fused kernels do not compile here")
    monkeypatch.setattr(page_tier.kernels, "available", lambda: fused)
    generator = torch.Generator().manual_seed(7)
    keys, values = torch.randn(1, 2, 48, 8, generator=generator), torch.randn(1, 2, 48, 8, generator=generator)
    file = PageFile(str(tmp_path), 1, 2, 8, 8, torch.float32)
    file.append(keys, values)  # twelve blocks: (page, head) -> record 2 * page + head
    cache = PageCache(5, page=8, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    records = np.array([9, 2, 3, 4, 11])  # runs 2-4 and 9, 11, in no order
    got_keys, got_values = cache.read(records, file)
    want_keys, want_values = file.read_records(records)
    assert torch.equal(got_keys, want_keys) and torch.equal(got_values, want_values)
    assert torch.equal(got_keys[0], keys[0, 1, 32:40])  # record 9: page 4, head 1
    with open(file.path, "r+b") as handle:  # flip a bit of record 6's values (each record: keys, then values)
        handle.seek((2 * 6 + 1) * 8 * 8 * 4 + 17)
        byte = handle.read(1)
        handle.seek((2 * 6 + 1) * 8 * 8 * 4 + 17)
        handle.write(bytes([byte[0] ^ 0x04]))
    with pytest.raises(TierError, match=r"page 3 of the slow tier .*values.* fails its checksum; it is refused"):
        cache.read(np.array([5, 6]), file)
    held = set(cache.record_of[cache.record_of >= 0].tolist())
    assert 6 not in held and 5 not in held and len(held) == 3  # the two slots read into hold nothing now
    assert (cache.slot_of[[5, 6]] == -1).all()
    again_keys, _ = cache.read(np.array([2, 3, 4]), file)  # what survived is still the tier's
    assert torch.equal(again_keys, want_keys[1:4])
    file.close()
