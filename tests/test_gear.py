"""GEAR: a KIVI backbone plus a per-span rank-r SVD of its quantization error and optional sparse outliers."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, random_ids

import kvstack
from kvstack.api import prefill
from kvstack.cache.codecs import quantize
from kvstack.cache.quantized import QuantizedRegion
from kvstack.cache.streams import LowRankResidualStream
from kvstack.spec import SpecError, parse

HEADS, HEAD_DIM = 2, 32


def _region(spec: str, per_head: bool = False) -> QuantizedRegion:
    return QuantizedRegion(parse(spec).codec, 1, HEADS, HEAD_DIM, torch.float32, torch.device("cpu"),
                           per_head_positions=per_head)


def _structured(tokens: int, seed: int) -> torch.Tensor:
    """``[1, H, tokens, D]`` keys with outlier channels and a few shared directions (like real keys)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, HEADS, tokens, 3, generator=generator)
    shared = shared @ torch.randn(1, HEADS, 3, HEAD_DIM, generator=generator)
    noise = torch.randn(1, HEADS, tokens, HEAD_DIM, generator=generator)
    return (2 * shared + noise) * torch.linspace(0.2, 4, HEAD_DIM)


def _positions(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.int32).view(1, 1, -1)


def _backbone_error(spec: str, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The error of the KIVI backbone alone (the same codec without the low-rank part), keys and values."""
    codec = parse(spec).codec
    kivi = f"kivi(bits={codec.bits}, group_size={codec.group_size}, residual={codec.residual})"
    region = _region(kivi)
    region.append(keys, values, _positions(0, keys.shape[2]), {})
    decoded_keys, decoded_values = region.decode_all()
    return keys - decoded_keys, values - decoded_values


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_gear_error_is_the_best_rank_r_approximation_of_the_kivi_error(rank):
    spec = f"gear(bits=2, group_size=16, rank={rank})"
    keys, values = _structured(64, seed=rank), _structured(64, seed=100 + rank)
    region = _region(spec)
    region.append(keys, values, _positions(0, 64), {})
    decoded_keys, decoded_values = region.decode_all()
    for original, decoded, backbone in zip((keys, values), (decoded_keys, decoded_values),
                                           _backbone_error(spec, keys, values), strict=True):
        # Eckart-Young: the best rank-r approximation leaves the error's trailing singular values.
        spectrum = torch.linalg.svdvals(backbone)  # [1, H, D]
        expected = spectrum[..., rank:].square().sum(-1).sqrt()
        achieved = (original - decoded).square().sum((-1, -2)).sqrt()
        torch.testing.assert_close(achieved, expected, rtol=2e-3, atol=1e-3)
        assert (achieved < backbone.square().sum((-1, -2)).sqrt()).all()


def test_gear_at_full_rank_reconstructs_up_to_float16():
    region = _region(f"gear(bits=2, group_size=16, rank={HEAD_DIM})")
    keys, values = _structured(64, seed=1), _structured(64, seed=2)
    region.append(keys, values, _positions(0, 64), {})
    decoded_keys, decoded_values = region.decode_all()
    torch.testing.assert_close(decoded_keys, keys, rtol=0, atol=5e-3 * float(keys.abs().max()))
    torch.testing.assert_close(decoded_values, values, rtol=0, atol=5e-3 * float(values.abs().max()))


def test_each_encode_is_a_span_with_its_own_basis_and_every_byte_is_counted():
    spec = "gear(bits=2, group_size=16, rank=3)"
    rank = 3
    region = _region(spec)
    keys, values = _structured(96, seed=3), _structured(96, seed=4)
    region.append(keys[:, :, :64], values[:, :, :64], _positions(0, 64), {})
    region.append(keys[:, :, 64:], values[:, :, 64:], _positions(64, 96), {})
    stream = region.keys
    assert isinstance(stream, LowRankResidualStream)
    assert stream.bases.shape == (1, HEADS, 2, rank, HEAD_DIM)
    assert stream.span_of_chunk[: 96 // region.chunk].tolist() == [0, 0, 1]
    # The second span is approximated with its own residual only (Eckart-Young on tokens 64:96).
    backbone = _backbone_error(spec, keys, values)[0][:, :, 64:]
    expected = torch.linalg.svdvals(backbone)[..., rank:].square().sum(-1).sqrt()
    achieved = (keys[:, :, 64:] - region.decode(64, 96)[0]).square().sum((-1, -2)).sqrt()
    torch.testing.assert_close(achieved, expected, rtol=2e-3, atol=1e-3)
    whole_keys, whole_values = region.decode_all()
    for start, stop in [(0, 32), (32, 96), (64, 96)]:  # blocks inside one span and across two
        block_keys, block_values = region.decode(start, stop)
        torch.testing.assert_close(block_keys, whole_keys[:, :, start:stop])
        torch.testing.assert_close(block_values, whole_values[:, :, start:stop])
    region.shrink_to_fit()
    kivi = _region("kivi(bits=2, group_size=16)")
    kivi.append(keys, values, _positions(0, 96), {})
    kivi.shrink_to_fit()
    low_rank = 2 * (HEADS * 96 * rank * 2 + HEADS * 2 * rank * HEAD_DIM * 2 + 3 * 4)  # coeffs, bases, span ids
    assert region.nbytes() == kivi.nbytes() + low_rank


def test_shrinking_keeps_the_decoded_entries_and_clearing_restarts_the_spans():
    region = _region("gear(bits=4, group_size=16, rank=2)")
    keys, values = _structured(64, seed=5), _structured(64, seed=6)
    region.append(keys, values, _positions(0, 64), {})
    before = region.decode_all()
    region.shrink_to_fit()
    after = region.decode_all()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    region.clear()
    assert region.keys.bases.shape[2] == 0 and region.keys.nbytes() == 0
    region.append(keys[:, :, :32], values[:, :, :32], _positions(0, 32), {})
    assert region.keys.span_of_chunk[0] == 0 and region.keys.bases.shape[2] == 1


def test_sparse_outliers_stay_exact_after_the_low_rank_correction():
    region = _region("gear(bits=2, group_size=16, rank=4, outliers=0.05)")
    keys, values = _structured(64, seed=7), _structured(64, seed=8)
    region.append(keys, values, _positions(0, 64), {})
    decoded_keys, _ = region.decode_all()
    base = region.keys.base
    index = base.outlier_index[0, 0, 0].long()  # the first chunk of head 0
    flat = decoded_keys[0, 0, : region.chunk].reshape(-1)
    torch.testing.assert_close(flat[index], keys[0, 0, : region.chunk].reshape(-1)[index].half().float())


def test_replacing_an_entry_re_encodes_its_chunk_on_the_span_basis():
    region = _region("gear(bits=4, group_size=16, rank=4)", per_head=True)
    keys, values = _structured(64, seed=9), _structured(64, seed=10)
    region.append(keys, values, _positions(0, 64).expand(1, HEADS, -1), {})
    bases = region.keys.bases.clone()
    before = region.decode_all()[0]
    new_key, new_value = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)
    region.replace_entry(0, 1, 5, new_key, new_value, 200, {})
    after = region.decode_all()[0]
    assert torch.equal(region.keys.bases, bases)
    assert torch.equal(after[0, 0], before[0, 0])  # the other head is untouched
    assert int(region.positions[0, 1, 5]) == 200
    # Expected: the chunk as it decoded, with the new key, quantized per channel again and corrected on
    # the span's stored basis (coordinates rounded to float16 like the stored ones).
    chunk = before[0, 1, : region.chunk].clone()
    chunk[5] = new_key
    backbone = quantize(chunk, 4, 16, axis=-2).dequantize()
    basis = bases[0, 1, 0].float()
    expected = backbone + ((chunk - backbone) @ basis.T).half().float() @ basis
    torch.testing.assert_close(after[0, 1, : region.chunk], expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(after[0, 1, region.chunk :], before[0, 1, region.chunk :])


def _decode_logits(model: torch.nn.Module, spec: str, steps: int = 12) -> tuple[torch.Tensor, kvstack.KVStackCache]:
    cache = kvstack.make_cache(model, spec)
    prefill(model, random_ids(160, seed=3), cache)
    logits = [model(torch.tensor([[t + 3]]), **kvstack.cache_kwargs(model, cache), use_cache=True).logits
              for t in range(steps)]
    return torch.cat(logits, dim=1).detach(), cache


@torch.no_grad()
def test_gear_decodes_closer_to_the_full_cache_than_its_kivi_backbone():
    model = build_model("llama", seed=0, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    reference, _ = _decode_logits(model, "full")

    def error(spec: str) -> float:
        return float((_decode_logits(model, spec)[0] - reference).abs().mean())

    kivi = error("kivi(bits=2, group_size=16, residual=16)")
    assert error("gear(bits=2, group_size=16, residual=16, rank=4)") < kivi
    assert error(f"gear(bits=2, group_size=16, residual=16, rank={HEAD_DIM})") < 1e-3 * kivi


@pytest.mark.parametrize("spec", [
    "h2o(budget=120) + gear(bits=4, group_size=16, residual=16)",
    "snapkv(budget=120) + gear(bits=2, group_size=16, residual=16, outliers=0.02)",
    "adakv(snapkv(budget=120)) + gear(bits=2, group_size=16, residual=16)",
    "loki(ratio=0.5, rank=8) + gear(bits=4, group_size=16, residual=16)",
])
@torch.no_grad()
def test_gear_composes_with_selection(spec):
    model = build_model("llama", seed=0, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    logits, cache = _decode_logits(model, spec)
    assert torch.isfinite(logits).all()
    assert parse(spec).label() == cache.label()
    selection_alone = _decode_logits(model, spec.split(" + ")[0])[1]
    assert cache.kv_bytes() < 0.7 * selection_alone.kv_bytes()


@pytest.mark.parametrize("spec, words", [
    ("gear(rank=0)", "rank must be >= 1"),
    ("gear(outliers=0.7)", "outliers must be a fraction"),
    ("gear(outliers=0.01, outlier_channels=8)", "either sparse `outliers` or `outlier_channels`"),
])
def test_bad_gear_parameters_get_one_line_errors(spec, words):
    with pytest.raises(SpecError, match=words) as caught:
        parse(spec)
    assert "\n" not in str(caught.value)


def test_a_rank_above_the_head_dimension_is_refused_at_make_cache():
    model = build_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(SpecError, match=f"rank 33 is above the head dimension {HEAD_DIM}"):
        kvstack.make_cache(model, "gear(rank=33)")
