"""Cross-layer merging: MiniCache's layer pairs and KVSharer's reused layers, against independent references."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_model, hook_kv_sharing, random_ids, stepwise_logits, usage_error
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvstack
from kvstack.cache.cross_layer import MagnitudeLayer, ReusingLayer
from kvstack.calibration import CalibrationError, model_key
from kvstack.calibration.layer_map import MAP_FORMAT, load_layer_map
from kvstack.calibration.layer_search import search_layer_map
from kvstack.methods.cross_layer import MiniCache, slerp
from kvstack.spec import SpecError, parse

LAYERS = 6


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(num_hidden_layers=LAYERS)


# ------------------------------------------------------------------------------------------------ MiniCache
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.floats(0.0, 1.0), tokens=st.integers(1, 12))
def test_slerp_of_a_layer_pair_with_itself_restores_it_exactly(seed: int, t: float, tokens: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(2, 3, tokens, 16, generator=generator) * torch.rand(2, 3, tokens, 1, generator=generator) * 5
    merged = MiniCache(t=t, retain=0.0).merge_layer_pair(rows, rows.clone(), torch.ones(2, 3, tokens, dtype=torch.bool),
                                                         None)
    assert not merged.retained.any()
    torch.testing.assert_close(merged.shared, rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.scale.unsqueeze(-1) * merged.shared, rows, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.floats(0.0, 1.0))
def test_slerp_is_a_unit_direction_at_the_right_angles(seed: int, t: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    lower, upper = torch.randn(2, 50, 8, generator=generator).unbind(0)
    direction, angle = slerp(lower, upper, t)
    torch.testing.assert_close(direction.norm(dim=-1), torch.ones(50), atol=1e-5, rtol=0)
    unit = torch.nn.functional.normalize
    to_lower = torch.arccos((direction * unit(lower, dim=-1)).sum(-1).clamp(-1, 1))
    to_upper = torch.arccos((direction * unit(upper, dim=-1)).sum(-1).clamp(-1, 1))
    usable = angle < math.pi - 1e-2  # nearly opposite rows have no well-defined arc
    torch.testing.assert_close(to_lower[usable], (t * angle)[usable], atol=2e-3, rtol=0)
    torch.testing.assert_close(to_upper[usable], ((1 - t) * angle)[usable], atol=2e-3, rtol=0)


def test_minicache_retains_the_widest_angles_and_keeps_their_rows_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    lower, upper = torch.randn(2, 1, 2, 200, 16, generator=generator).unbind(0)
    valid = torch.ones(1, 2, 200, dtype=torch.bool)
    merged = MiniCache(retain=0.1).merge_layer_pair(lower, upper, valid, None)
    _, angle = slerp(lower, upper, 0.6)
    for head in range(2):
        retained = merged.retained[0, head]
        assert 15 <= int(retained.sum()) <= 21  # 10% of 200, the quantile's tokens excepted
        assert angle[0, head][retained].min() > angle[0, head][~retained].max()
    torch.testing.assert_close(merged.shared[merged.retained], upper[merged.retained])
    # the cutoff holds for later chunks: a pair at a wider angle than every prompt pair is retained
    later = merged.cutoff
    again = MiniCache(retain=0.1).merge_layer_pair(lower[..., :1, :], -lower[..., :1, :], valid[..., :1], later)
    assert again.retained.all()


def test_minicache_that_retains_every_token_equals_the_full_cache_exactly(model) -> None:
    ids = random_ids(40)
    reference = stepwise_logits(model, ids, DynamicCache())
    cache = kvstack.make_cache(model, "minicache(start=0, retain=1.0)")
    assert [type(layer) for layer in cache.layers[:2]] == [MagnitudeLayer, kvstack.cache.layer.KVStackLayer]
    for got, want in zip(stepwise_logits(model, ids, cache), reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_minicache_holds_the_pairs_bytes_exactly(model) -> None:
    ids = random_ids(64)
    cache = kvstack.make_cache(model, "minicache(start=2, retain=0.25)")
    kvstack.prefill(model, ids, cache)
    full = kvstack.make_cache(model, "full")
    kvstack.prefill(model, ids, full)
    lowers = [2, 4]
    assert all(isinstance(cache.layers[i], MagnitudeLayer) for i in lowers)
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    for i in lowers:
        layer = cache.layers[i]
        retained = sum(int(t.shape[0]) for t in layer.retained_rows.values())
        expected = (2 * heads * layer.scales["keys"].shape[-1] * 4  # one float32 scale per entry, keys and values
                    + retained * (dim * 4 + 2 * 4)  # each retained row and its int32 (head, position) index
                    + 2 * heads * 4)  # the cutoffs
        assert layer.kv_bytes() == expected
        assert 0.15 * 2 * heads * 64 <= retained <= 0.3 * 2 * heads * 64
    others = [i for i in range(LAYERS) if i not in lowers]
    assert sum(cache.layers[i].kv_bytes() for i in others) == sum(full.layers[i].kv_bytes() for i in others)
    assert cache.kv_bytes() < full.kv_bytes()
    assert cache.full_kv_bytes() == full.full_kv_bytes()


def test_minicache_batched_with_left_padding_equals_each_sequence_alone(model) -> None:
    short, long = random_ids(20, seed=1), random_ids(33, seed=2)
    ids = torch.cat((torch.zeros(1, 13, dtype=torch.long), short), dim=1)
    ids = torch.cat((ids, long))
    mask = torch.ones_like(ids)
    mask[0, :13] = 0
    spec = "minicache(start=1, retain=0.2)"
    batched = stepwise_logits(model, ids, kvstack.make_cache(model, spec), mask=mask)
    alone = [stepwise_logits(model, seq, kvstack.make_cache(model, spec)) for seq in (short, long)]
    for step, got in enumerate(batched):
        torch.testing.assert_close(got[0], alone[0][step][0], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(got[1], alone[1][step][0], atol=2e-4, rtol=1e-4)


def test_minicache_read_in_prompt_chunks_matches_one_forward_when_it_retains_all(model) -> None:
    ids = random_ids(50)
    whole = kvstack.make_cache(model, "minicache(start=0, retain=1.0)")
    chunked = kvstack.make_cache(model, "minicache(start=0, retain=1.0)")
    want = kvstack.prefill(model, ids, whole, chunk_size=None)
    got = kvstack.prefill(model, ids, chunked, chunk_size=16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert chunked.kv_bytes() == whole.kv_bytes()


def test_minicache_composes_with_a_codec_and_encodes_the_shared_rows(model) -> None:
    ids = random_ids(200)
    codec = "kivi(bits=4, group_size=16, residual=32)"
    merged = kvstack.make_cache(model, f"minicache(start=2, retain=0.05) + {codec}")
    alone = kvstack.make_cache(model, codec)
    kvstack.prefill(model, ids, merged)
    kvstack.prefill(model, ids, alone)
    assert merged.layers[3].encoded_entries() > 0  # the upper layer's shared rows are encoded like any entry
    lowers = sum(merged.layers[i].kv_bytes() for i in (2, 4))
    assert merged.kv_bytes() == sum(layer.kv_bytes() for layer in merged.layers)
    assert merged.kv_bytes() < alone.kv_bytes()
    assert merged.kv_bytes() - lowers == sum(alone.layers[i].kv_bytes() for i in range(LAYERS) if i not in (2, 4))
    logits = stepwise_logits(model, torch.tensor([[5]]), merged, steps=3)  # decoding reads the decoded shared rows
    assert all(torch.isfinite(step).all() for step in logits)


def test_minicache_start_layer_outside_the_model_is_one_line(model) -> None:
    with pytest.raises(SpecError, match=r"start=5 is outside the model.*choose 0 to 4") as err:
        kvstack.make_cache(model, "minicache(start=5)")
    assert "\n" not in str(err.value)
    for bad, match in (("minicache(t=1.5)", "t must be"), ("minicache(retain=-0.1)", "retain must be"),
                       ("minicache(start=-1)", "start must be")):
        with pytest.raises(SpecError, match=match):
            parse(bad)


def model_error(capsys, argv: list[str]) -> str:
    """Run ``kvstack argv`` on the default model: exit 2, no traceback, and the error as the one line after the
    model's loading bar (the error depends on the model, so it comes once the model is loaded)."""
    from kvstack import cli

    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err + captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("kvstack: error:"), captured.err
    return last


def test_cli_refuses_a_bad_cross_layer_spec_with_exit_2(capsys) -> None:
    err = model_error(capsys, ["generate", "--method", "minicache(start=400)", "--prompt", "hi"])
    assert "start=400 is outside the model" in err
    err = usage_error(capsys, ["generate", "--method", "kvsharer(threshold=2)", "--prompt", "hi"])
    assert "threshold must be" in err
    err = usage_error(capsys, ["calibrate", "--kvsharer", "0"])
    assert "--kvsharer must be >= 1" in err


def test_the_engine_refuses_cross_layer_methods() -> None:
    from kvstack.engine.compression import engine_method
    from kvstack.errors import KVStackError

    with pytest.raises(KVStackError, match="cannot run in the paged engine"):
        engine_method("minicache", prompt_length=100, num_layers=LAYERS)


# ------------------------------------------------------------------------------------------------ KVSharer
class ReusingDynamicCache(DynamicCache):
    """transformers' own cache, where a layer in ``share`` attends with its source layer's keys and values."""

    def __init__(self, share: dict[int, int]) -> None:
        super().__init__()
        self.share = share

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.share:
            source = self.layers[self.share[layer_idx]]
            return source.keys, source.values
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _write_map(path, key: str, share: dict[int, int]) -> str:
    path.write_text(json.dumps({"format": MAP_FORMAT, "version": 1, "model_key": key,
                                "map": {str(k): v for k, v in share.items()}}))
    return str(path)


def test_kvsharer_applies_its_map_and_the_shared_layers_hold_zero_bytes(model, tmp_path) -> None:
    share = {3: 0, 5: 2}
    artefact = _write_map(tmp_path / "map.json", model_key(model), share)
    ids = random_ids(30)
    cache = kvstack.make_cache(model, f"kvsharer(layers=2, artefact={artefact!r})")
    got = stepwise_logits(model, ids, cache)
    want = stepwise_logits(model, ids, ReusingDynamicCache(share))
    for step_got, step_want in zip(got, want, strict=True):
        torch.testing.assert_close(step_got, step_want, atol=1e-5, rtol=1e-5)
    full = kvstack.make_cache(model, "full")
    stepwise_logits(model, ids, full)
    for layer in share:
        assert isinstance(cache.layers[layer], ReusingLayer)
        assert cache.layers[layer].kv_bytes() == 0
    assert cache.kv_bytes() == full.kv_bytes() - sum(full.layers[layer].kv_bytes() for layer in share)
    assert cache.full_kv_bytes() == full.full_kv_bytes()


def test_kvsharer_refuses_a_map_from_another_model(model, tmp_path) -> None:
    other = build_model(num_hidden_layers=LAYERS, seed=7)
    artefact = _write_map(tmp_path / "other.json", model_key(other), {3: 0})
    with pytest.raises(CalibrationError, match=r"was made for model .*not this one") as err:
        kvstack.make_cache(model, f"kvsharer(layers=1, artefact={artefact!r})")
    assert "\n" not in str(err.value)
    with pytest.raises(CalibrationError, match="no kvsharer map"):
        kvstack.make_cache(model, f"kvsharer(layers=1, artefact={str(tmp_path / 'missing.json')!r})")
    bad = _write_map(tmp_path / "bad.json", model_key(model), {3: 4})
    with pytest.raises(CalibrationError, match="not below it"):
        load_layer_map(model_key(model), LAYERS, 1, 0.9, bad)


def test_kvsharer_with_a_codec_equals_the_model_storing_the_shared_layers_copies_encoded(model, tmp_path) -> None:
    """With a codec, the shared layer reads its source's encoded entries: the same logits as the model whose
    shared layer stores (and encodes identically) a copy of its source's keys and values."""
    share = {3: 0, 5: 2}
    artefact = _write_map(tmp_path / "map.json", model_key(model), share)
    ids = random_ids(40, batch=2, seed=3)
    codec = "kivi(bits=4, group_size=8, residual=8)"
    cache = kvstack.make_cache(model, f"kvsharer(layers=2, artefact={artefact!r}) + {codec}")
    assert cache.artefacts == {str(Path(artefact).resolve()): hashlib.sha256(Path(artefact).read_bytes()).hexdigest()}
    got = stepwise_logits(model, ids, cache, steps=10)
    handles = hook_kv_sharing(model, share)
    try:
        reference = kvstack.make_cache(model, codec)
        want = stepwise_logits(model, ids, reference, steps=10)
    finally:
        for handle in handles:
            handle.remove()
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"step {step}")
    assert cache.layers[3].kv_bytes() == cache.layers[5].kv_bytes() == 0
    assert cache.layers[0].kv_bytes() == reference.layers[0].kv_bytes() > 0
    assert cache.layers[0].encoded_entries() > 0  # the codec encoded what the shared layers read


def test_cli_refuses_a_kvsharer_map_from_another_model_with_exit_2(capsys, tmp_path) -> None:
    artefact = _write_map(tmp_path / "x.json", "another-model-000000000000", {3: 0})
    err = model_error(capsys, ["generate", "--method", f"kvsharer(artefact={artefact!r})", "--prompt", "hi"])
    assert "was made for model another-model-000000000000" in err


def test_kvsharer_search_takes_dissimilar_pairs_while_the_model_stays_similar(model) -> None:
    ids = random_ids(48, batch=2, seed=3)
    loose = search_layer_map(model, ids, layers=2, threshold=0.0)
    shared = {int(k): v for k, v in loose["map"].items()}
    assert len(shared) == 2
    assert all(source < layer for layer, source in shared.items())
    assert not set(shared) & set(shared.values())  # a reused layer stores its own cache
    distances = [trial["distance"] for trial in loose["trials"]]
    assert distances == sorted(distances, reverse=True)  # the most dissimilar pairs are tried first
    strict = search_layer_map(model, ids, layers=2, threshold=1.0, max_trials=5)
    assert strict["map"] == {}
    assert all(trial["similarity"] < 1.0 and not trial["accepted"] for trial in strict["trials"])
