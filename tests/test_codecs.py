"""Packed codecs: lossless bit packing, round-trip error bounds, honest byte accounting, clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstack.cache.codecs import CodecError, pack_bits, quantize, unpack_bits, unpack_float

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@SETTINGS
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 4), words=st.integers(1, 20), seed=st.integers(0, 999))
def test_packing_is_lossless_and_dense(bits, rows, words, seed):
    count = words * (8 // bits)
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, count), generator=generator, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, count * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_packing_layout_puts_the_first_code_in_the_lowest_bits():
    codes = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)
    assert pack_bits(codes, 2).tolist() == [1 | (2 << 2) | (3 << 4)]
    assert pack_bits(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]


@SETTINGS
@given(
    bits=st.sampled_from([2, 4, 8]), group=st.sampled_from([8, 16, 32]), axis=st.sampled_from([-1, -2]),
    scale=st.floats(0.01, 50.0), seed=st.integers(0, 999),
)
def test_round_trip_error_is_within_half_a_step_of_each_group(bits, group, axis, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 32, generator=generator) * scale
    q = quantize(x, bits, group, axis=axis)
    restored = q.dequantize()
    assert restored.shape == x.shape and restored.dtype == x.dtype
    moved = x.movedim(axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], -1, group)
    step = (grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)) / ((1 << bits) - 1)
    # Half a step, plus what float16 storage of the scale and zero point can add.
    bound = step / 2 + step * ((1 << bits) - 1) * 2**-10 + grouped.abs().amax(-1, keepdim=True) * 2**-10
    error = (restored.movedim(axis, -1).reshape(grouped.shape) - grouped).abs()
    assert bool((error <= bound + 1e-6).all()), float((error - bound).max())


def test_constant_groups_are_exact_and_do_not_divide_by_zero():
    x = torch.full((4, 64), 3.25)
    assert torch.equal(quantize(x, 2, 32).dequantize(), x)


@pytest.mark.parametrize("bits, group, expected_bits", [(2, 32, 3.0), (4, 32, 5.0), (8, 64, 8.5), (4, 128, 4.25)])
def test_bytes_count_payload_scales_and_zero_points(bits, group, expected_bits):
    x = torch.randn(1, 3, 256, 64)
    q = quantize(x, bits, group, axis=-2)
    groups = x.numel() // group
    assert q.nbytes() == x.numel() * bits // 8 + groups * 2 + groups * 2  # fp16 scale + fp16 zero per group
    assert q.bits_per_element() == pytest.approx(expected_bits)


@pytest.mark.parametrize("bits", [0, 1, 3, 16, True, "4"])
def test_bits_outside_2_4_8_are_refused(bits):
    with pytest.raises(CodecError, match="bits must be one of 2, 4 or 8"):
        quantize(torch.randn(4, 64), bits, 32)


def test_a_group_size_that_does_not_divide_its_axis_is_refused_with_divisors():
    with pytest.raises(CodecError, match=r"group_size 48 does not divide axis 1 of length 64; choose a divisor"):
        quantize(torch.randn(4, 64), 4, 48)
    with pytest.raises(CodecError, match="positive integer"):
        quantize(torch.randn(4, 64), 4, 0)


@SETTINGS
@given(bits=st.sampled_from([2, 4, 8]), words=st.integers(1, 20), seed=st.integers(0, 999))
def test_table_decoding_to_float_equals_unpacking(bits, words, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (3, words * (8 // bits)), generator=generator, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_float(packed, bits), codes.float())
