"""Quantized KV storage: codecs in the spec language, packed regions, block-wise attention, composition."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import build_model, random_ids
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.api import prefill
from kvstack.cache import kernels, quantized, streams
from kvstack.cache.attention_stats import attention_with_stats
from kvstack.cache.blockwise import blockwise_attention
from kvstack.cache.codecs import CodecError, quantize
from kvstack.cache.quantized import QuantizedRegion
from kvstack.cache.streams import random_hadamard
from kvstack.methods.base import STAT_BELOW_MEAN, STAT_COLSUM, STAT_LAST, STAT_WINDOW
from kvstack.spec import SpecError, parse

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
ALL_STATS = {STAT_COLSUM, STAT_BELOW_MEAN, STAT_WINDOW, STAT_LAST}


def head32_model(seed: int = 0) -> torch.nn.Module:
    """A tiny llama with head dimension 32 (4 query heads, 2 KV heads)."""
    return build_model("llama", seed=seed, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)


# ------------------------------------------------------------------------------------------------------
# Block-wise attention equals dense attention
# ------------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 999), batch=st.integers(1, 2), group=st.sampled_from([1, 3]), encoded=st.integers(1, 70),
    past=st.integers(0, 6), q_len=st.integers(1, 5), padded=st.booleans(), block=st.integers(1, 40),
)
def test_blockwise_attention_equals_dense_attention_with_every_statistic(
    seed, batch, group, encoded, past, q_len, padded, block
):
    generator = torch.Generator().manual_seed(seed)
    heads, head_dim = 2, 8
    length = encoded + past + q_len
    query = torch.randn(batch, heads * group, q_len, head_dim, generator=generator)
    keys = torch.randn(batch, heads, length, head_dim, generator=generator)
    values = torch.randn(batch, heads, length, head_dim, generator=generator)
    past_valid = None
    if padded:  # the first few entries of sequence 0 are padding in every head
        past_valid = torch.ones(batch, heads, encoded + past, dtype=torch.bool)
        past_valid[0, :, : min(3, encoded)] = False
    window = min(2, q_len)
    dense_out, dense = attention_with_stats(
        query, keys, values, None, past_valid, 0.3, set(ALL_STATS), window
    )

    def blocks():
        for start in range(0, encoded, block):
            stop = min(start + block, encoded)
            mask = None if past_valid is None else past_valid[:, :, start:stop].unsqueeze(2)
            yield keys[:, :, start:stop], values[:, :, start:stop], mask
        tail_past = (
            torch.ones(batch, heads, past, dtype=torch.bool) if past_valid is None else past_valid[:, :, encoded:]
        )
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril().expand(batch, heads, q_len, q_len)
        tail_mask = torch.cat((tail_past.unsqueeze(2).expand(-1, -1, q_len, -1), causal), dim=-1)
        yield keys[:, :, encoded:], values[:, :, encoded:], tail_mask

    out, stats = blockwise_attention(query, blocks, 0.3, set(ALL_STATS), window, None)
    torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.colsum, dense.colsum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.below_mean, dense.below_mean)
    torch.testing.assert_close(stats.queries_seen, dense.queries_seen)
    torch.testing.assert_close(stats.window, dense.window, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.last, dense.last, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# The region stores exactly what the codec quantizes
# ------------------------------------------------------------------------------------------------------


def _region(spec: str, heads: int = 2, head_dim: int = 32, **kwargs) -> QuantizedRegion:
    codec = parse(spec).codec
    return QuantizedRegion(codec, 1, heads, head_dim, torch.float32, torch.device("cpu"),
                           per_head_positions=kwargs.pop("per_head", False), **kwargs)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_region_holds_per_channel_keys_and_per_token_values(bits):
    generator = torch.Generator().manual_seed(bits)
    keys = torch.randn(1, 2, 64, 32, generator=generator) * torch.linspace(0.1, 8, 32)  # outlier channels
    values = torch.randn(1, 2, 64, 32, generator=generator)
    region = _region(f"kivi(bits={bits}, group_size=16)")
    region.append(keys, values, torch.arange(64, dtype=torch.int32).view(1, 1, -1), {})
    decoded_keys, decoded_values = region.decode_all()
    torch.testing.assert_close(decoded_keys, quantize(keys, bits, 16, axis=-2).dequantize(), atol=1e-6, rtol=0)
    torch.testing.assert_close(decoded_values, quantize(values, bits, 16, axis=-1).dequantize(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels, wide_bits", [(8, 4), (16, 8)])
def test_kivi_outlier_channels_store_the_widest_rope_pairs_at_more_bits(channels, wide_bits):
    """The widest key channels, chosen in RoPE pairs from the first chunk, are quantized per channel at
    ``outlier_bits`` and the rest at ``key_bits``: each set decodes exactly as the plain per-channel codec
    of its own width would, and later chunks keep the same channels."""
    generator = torch.Generator().manual_seed(channels)
    spread = torch.ones(32)
    wide_pairs = [1, 6, 9, 14, 3, 11, 4, 12][: channels // 2]
    for pair in wide_pairs:
        spread[pair] = spread[pair + 16] = 12.0  # outlier pairs (i, i + D/2)
    keys = torch.randn(1, 2, 96, 32, generator=generator) * spread
    values = torch.randn(1, 2, 96, 32, generator=generator)
    region = _region(f"kivi(bits=2, group_size=16, outlier_channels={channels}, outlier_bits={wide_bits})")
    positions = torch.arange(96, dtype=torch.int32).view(1, 1, -1)
    region.append(keys[:, :, :32], values[:, :, :32], positions[..., :32], {})
    region.append(keys[:, :, 32:], values[:, :, 32:] * 50, positions[..., 32:], {})  # later chunks: same channels
    wide = sorted([*wide_pairs, *(p + 16 for p in wide_pairs)])
    assert region.keys.order[0, 0, :channels].tolist() == sorted(wide_pairs) + sorted(p + 16 for p in wide_pairs)
    narrow = [c for c in range(32) if c not in wide]
    decoded, _ = region.decode_all()
    for subset, bits in ((wide, wide_bits), (narrow, 2)):
        expected = quantize(keys[..., subset], bits, 16, axis=-2).dequantize()
        torch.testing.assert_close(decoded[..., subset], expected, atol=1e-6, rtol=0)
    plain = _region("kivi(bits=2, group_size=16)")
    plain.append(keys, values, positions, {})
    assert (decoded - keys).pow(2).sum() < 0.2 * (plain.decode_all()[0] - keys).pow(2).sum()
    order_bytes = 1 * 2 * 32  # uint8 channel order per (sequence, head)
    layout = (96 * channels * wide_bits // 8 + 96 * (32 - channels) * 2 // 8) * 2 + 96 // 16 * 32 * 2 * 2 * 2
    region.shrink_to_fit()
    assert region.keys.nbytes() == layout + order_bytes


def test_decode_of_any_block_equals_the_matching_slice_of_the_whole():
    generator = torch.Generator().manual_seed(1)
    region = _region("kvquant(bits=2, group_size=16, outliers=0.02)", rope_inv_freq=torch.rand(16))
    keys, values = torch.randn(1, 2, 96, 32, generator=generator), torch.randn(1, 2, 96, 32, generator=generator)
    region.append(keys, values, torch.arange(96, dtype=torch.int32).view(1, 1, -1), {})
    whole_keys, whole_values = region.decode_all()
    for start, stop in [(0, 32), (32, 96), (64, 96)]:
        block_keys, block_values = region.decode(start, stop)
        torch.testing.assert_close(block_keys, whole_keys[:, :, start:stop])
        torch.testing.assert_close(block_values, whole_values[:, :, start:stop])


def test_kvquant_keeps_outliers_exactly_and_quantizes_keys_before_rope():
    generator = torch.Generator().manual_seed(2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    keys = torch.randn(1, 1, 64, 32, generator=generator)
    keys[0, 0, 5, 3] = 40.0  # planted outliers
    keys[0, 0, 40, 17] = -35.0
    values = torch.randn(1, 1, 64, 32, generator=generator)
    region = _region("kvquant(bits=4, group_size=32, outliers=0.01)", heads=1, rope_inv_freq=inv_freq)
    positions = torch.arange(64, dtype=torch.int32).view(1, 1, -1)
    from kvstack.cache.rope import rope_shift

    post_rope = rope_shift(keys, positions.float(), inv_freq)
    region.append(post_rope, values, positions, {})
    decoded, _ = region.decode_all()
    unrotated = rope_shift(decoded, -positions.float(), inv_freq)
    assert float(unrotated[0, 0, 5, 3]) == pytest.approx(40.0, abs=0.05)  # float16 exact, then RoPE round trip
    assert float(unrotated[0, 0, 40, 17]) == pytest.approx(-35.0, abs=0.05)
    # Without an outlier in its range, the rest of that channel's group is quantized on a fine grid.
    error = (unrotated - keys).abs()
    plain = (quantize(keys, 4, 32, axis=-2).dequantize() - keys).abs()
    for tokens, channel in ((slice(0, 32), 3), (slice(32, 64), 17)):
        assert float(error[0, 0, tokens, channel].mean()) < 0.2 * float(plain[0, 0, tokens, channel].mean())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_randomized_hadamard_rotation_cuts_per_token_error_on_outlier_channels(bits):
    rotation = random_hadamard(64, seed=3)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(64), atol=1e-6, rtol=0)
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(1, 1, 256, 64, generator=generator)
    x[..., 7] *= 30.0  # one outlier channel, as in real keys
    plain = _region(f"quant(bits={bits})", heads=1, head_dim=64)
    rotated = _region(f"quant(bits={bits}, rotate='hadamard')", heads=1, head_dim=64)
    positions = torch.arange(256, dtype=torch.int32).view(1, 1, -1)
    for region in (plain, rotated):
        region.append(x, x, positions, {})
    error_plain = (plain.decode_all()[1] - x).pow(2).mean()
    error_rotated = (rotated.decode_all()[1] - x).pow(2).mean()
    assert float(error_rotated) < 0.5 * float(error_plain)


def test_hadamard_values_rotates_only_the_values():
    generator = torch.Generator().manual_seed(11)
    keys = torch.randn(1, 2, 64, 32, generator=generator) * torch.linspace(0.1, 8, 32)
    values = torch.randn(1, 2, 64, 32, generator=generator)
    rotated = _region("kivi(bits=2, group_size=16, rotate='hadamard-values', outlier_channels=8)", layer_idx=3)
    plain = _region("kivi(bits=2, group_size=16, outlier_channels=8)", layer_idx=3)
    positions = torch.arange(64, dtype=torch.int32).view(1, 1, -1)
    for region in (rotated, plain):
        region.append(keys, values, positions, {})
    hadamard = random_hadamard(32, seed=1000 + 3)  # the layer's rotation
    assert torch.equal(rotated.decode_all()[0], plain.decode_all()[0])  # keys keep their channels
    assert rotated.nbytes() == plain.nbytes() + 32 * 32  # the rotation, held as int8 signs
    expected_values = quantize(values @ hadamard, 2, 16, axis=-1).dequantize() @ hadamard.T
    torch.testing.assert_close(rotated.decode_all()[1], expected_values, atol=1e-5, rtol=0)
    query = torch.randn(1, 2, 3, 32, generator=generator)
    torch.testing.assert_close(rotated.scores(query), query @ plain.decode_all()[0].transpose(-1, -2), atol=1e-4,
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------------------
# The cache: accounting, precision, composition
# ------------------------------------------------------------------------------------------------------


def test_kv_bytes_count_payload_metadata_residual_positions_exactly():
    model = head32_model()
    cache = kvstack.make_cache(model, "kivi(bits=2, group_size=16, residual=16)")
    prefill(model, random_ids(200), cache)
    layer = cache.layers[0]
    region = layer.region
    batch, heads, head_dim = 1, 2, 32
    assert region.chunk == 32
    assert region.length == (200 - 16) // 32 * 32 == region.capacity  # exact after the prompt
    assert layer.length == 200 - region.length == layer.capacity
    n = region.length
    encoded_bytes = (
        batch * heads * n * head_dim * 2 // 8 * 2  # 2-bit keys and values
        + batch * heads * (n // 16) * head_dim * 2 * 2  # key scale + zero (float16), per channel per 16 tokens
        + batch * heads * n * (head_dim // 16) * 2 * 2  # value scale + zero, per token per 16 channels
        # no positions: nothing is evicted, so the encoded entries are tokens 0..n-1 (implicit)
    )
    residual_bytes = batch * heads * layer.length * (head_dim * 4 * 2 + 4)  # float32 keys/values + positions
    assert layer.kv_bytes() == encoded_bytes + residual_bytes + 8  # + next position (int64)
    assert cache.kv_bytes() == sum(lay.kv_bytes() for lay in cache.layers)
    full = kvstack.make_cache(model, "full")
    prefill(model, random_ids(200), full)
    assert cache.kv_bytes() < 0.4 * full.kv_bytes()


def test_encoded_positions_are_implicit_for_a_consecutive_run_and_stored_once_the_run_breaks():
    model = head32_model()
    cache = kvstack.make_cache(model, "kivi(bits=2, group_size=16, residual=16)")
    prefill(model, random_ids(200), cache)
    region = cache.layers[0].region
    assert region.implicit_positions and region.positions.numel() == 0
    assert torch.equal(region.live_positions(), torch.arange(region.length, dtype=torch.int32).expand(1, 2, -1))
    # A left-padded batch: the padded sequence's run starts later, so the positions must be stored.
    ids = random_ids(120).expand(2, -1).clone()
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    padded = kvstack.make_cache(model, "kivi(bits=2, group_size=16, residual=16)")
    prefill(model, ids, padded, attention_mask=mask)
    region = padded.layers[0].region
    assert not region.implicit_positions
    assert region.positions.shape == (2, 1, region.capacity)
    expected = torch.stack((torch.arange(region.length), torch.arange(region.length) - 40)).clamp(min=-1)
    assert torch.equal(region.live_positions()[:, 0].long(), expected)


@pytest.mark.parametrize(
    "spec, key_bits, value_bits",
    [
        # KIVI-2: 2-bit codes + float16 scale and zero per channel per 32 tokens / per token per 32 channels.
        ("kivi(bits=2)", 2 + 32 / 32, 2 + 32 / 32),
        ("kivi(bits=4)", 4 + 32 / 32, 4 + 32 / 32),
        # int8: per token, one float16 scale and zero per 64 channels.
        ("quant(bits=8)", 8 + 32 / 64, 8 + 32 / 64),
        # KIVI's K4V2: 4-bit keys, 2-bit values, same groups.
        ("kivi(key_bits=4, value_bits=2)", 4 + 32 / 32, 2 + 32 / 32),
        # KIVI-2 with 16 outlier key channels at 4 bits, values per token in one group of 64 channels;
        # the uint8 channel order (64 bytes per head and layer) is in the constant term below.
        ("kivi(bits=2, outlier_channels=16, value_group_size=64)", (16 * 4 + 48 * 2) / 64 + 32 / 32, 2 + 32 / 64),
        # The same with 24 channels and the first token kept (1 sink + 31 recent in full precision).
        ("kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31)",
         (24 * 4 + 40 * 2) / 64 + 32 / 32, 2 + 32 / 64),
        # GEAR-L: KIVI-2 plus float16 rank-2 coordinates per token (2 * 16 / 64 bits per element); the
        # per-span bases and span ids are in the constant term below.
        ("gear(bits=2, rank=2)", 2 + 32 / 32 + 2 * 16 / 64, 2 + 32 / 32 + 2 * 16 / 64),
    ],
)
def test_bits_per_element_at_a_long_context_include_every_byte(spec, key_bits, value_bits):
    model = build_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=4096)
    tokens, heads, head_dim = 4096, 2, 64
    cache = kvstack.make_cache(model, spec)
    prefill(model, random_ids(tokens), cache)
    codec = parse(spec).codec
    always = codec.sink_tokens() + codec.residual_tokens()
    residual = always + (tokens - always) % codec.chunk_tokens()
    encoded = tokens - residual
    spans = -(-encoded // quantized.ENCODE_TOKENS)  # the prompt is encoded in slabs, one basis each
    rank = codec.residual_rank()
    bits = (
        encoded * head_dim * (key_bits + value_bits)  # payload and group metadata
        # no positions for the encoded entries: consecutive tokens, implicit
        + residual * (2 * head_dim * 32 + 32)  # float32 residual keys and values, with per-head positions
        + 64 / heads  # int64 next position of the sequence
        + head_dim * 8 * bool(codec.key_outlier_channels()[0])  # uint8 key channel order per head
        + 2 * spans * rank * head_dim * 16  # GEAR: float16 [rank, D] bases per span, keys and values
        + 2 * (encoded // codec.chunk_tokens()) * 32 / heads * bool(rank)  # GEAR: int32 span id per chunk
    ) / (tokens * 2 * head_dim)
    assert cache.bits_per_element() == pytest.approx(bits, rel=1e-9)
    bars = {"kivi(bits=2)": 3.5, "kivi(bits=4)": 5.5, "quant(bits=8)": 9.0,
            "kivi(bits=2, outlier_channels=16, value_group_size=64)": 3.5,
            "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31)": 3.5}
    assert cache.bits_per_element() <= bars.get(spec, 32)


def test_more_bits_give_logits_closer_to_the_full_cache():
    model = head32_model(seed=4)
    ids = random_ids(160, seed=4)
    follow = random_ids(24, seed=5)

    def logits(spec: str) -> torch.Tensor:
        cache = kvstack.make_cache(model, spec)
        prefill(model, ids, cache)
        return model(follow, **kvstack.cache_kwargs(model, cache), use_cache=True).logits

    reference = logits("full")
    errors = [float((logits(f"kivi(bits={b}, group_size=16, residual=0)") - reference).abs().mean()) for b in (8, 4, 2)]
    assert errors[0] < errors[1] < errors[2]
    assert errors[0] < 0.02 * float(reference.abs().mean())


@pytest.mark.parametrize("spec", ["kivi(bits=4, group_size=16, residual=16)", "kvquant(bits=2, group_size=16)"])
def test_attention_decodes_one_block_at_a_time_while_decoding(monkeypatch, spec):
    monkeypatch.setattr(quantized, "BLOCK_TOKENS", 32)
    monkeypatch.setattr(quantized, "FUSED_KERNELS", False)  # the PyTorch path (the fused one decodes no block)
    model = head32_model()
    cache = kvstack.make_cache(model, spec)
    prefill(model, random_ids(200), cache)
    decoded_tokens = []
    original = quantized.unpack_float

    def spy(packed, bits):
        decoded_tokens.append(packed.shape[-2])
        return original(packed, bits)

    monkeypatch.setattr(quantized, "unpack_float", spy)  # the region's own reads and its streams' decodes
    monkeypatch.setattr(streams, "unpack_float", spy)
    monkeypatch.setattr(QuantizedRegion, "decode_all", lambda self: pytest.fail("a whole layer was decoded"))
    for token in range(5):
        model(torch.tensor([[token + 3]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
    assert decoded_tokens and max(decoded_tokens) == 32 < cache.layers[0].encoded_entries()


@pytest.mark.parametrize("fused", [False, True])
@SETTINGS
@given(
    seed=st.integers(0, 999), spec=st.sampled_from([
        "kivi(bits=2, group_size=16)", "kivi(bits=4, group_size=8, rotate='hadamard')", "quant(bits=8, group_size=16)",
        "quant(bits=4, group_size=32, rotate='hadamard')", "kvquant(bits=4, group_size=16, outliers=0.02)",
        "kivi(bits=2, group_size=16, outlier_channels=8, value_group_size=32)",
        "kivi(bits=2, group_size=16, outlier_channels=8, value_group_size=32, rotate='hadamard-values')",
    ]),
    chunks=st.integers(1, 5), tail=st.integers(1, 9), group=st.sampled_from([1, 3]), block=st.sampled_from([32, 64]),
)
def test_decoding_fast_path_equals_block_wise_attention_over_decoded_entries(
    fused, seed, spec, chunks, tail, group, block
):
    if fused and not kernels.available():
        pytest.skip("no C++ compiler for the fused kernels")
    generator = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    region = _region(spec, rope_inv_freq=inv_freq)
    n = chunks * region.chunk
    region.append(torch.randn(1, 2, n, 32, generator=generator), torch.randn(1, 2, n, 32, generator=generator),
                  torch.arange(n, dtype=torch.int32).view(1, 1, -1), {})
    query = torch.randn(1, 2 * group, 1, 32, generator=generator)
    tail_keys, tail_values = torch.randn(1, 2, tail, 32, generator=generator), torch.randn(1, 2, tail, 32)
    saved = quantized.BLOCK_TOKENS, quantized.FUSED_KERNELS
    quantized.BLOCK_TOKENS, quantized.FUSED_KERNELS = block, fused
    try:
        fast = region.attend_one(query, tail_keys, tail_values, 0.2)
    finally:
        quantized.BLOCK_TOKENS, quantized.FUSED_KERNELS = saved
    keys, values = region.decode_all()

    def blocks():
        yield torch.cat((keys, tail_keys), dim=2), torch.cat((values, tail_values), dim=2), None

    reference, _ = blockwise_attention(query, blocks, 0.2, set(), 0, None)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-4)


def test_fused_decoding_decodes_no_block_at_all(monkeypatch):
    if not kernels.available():
        pytest.skip("no C++ compiler for the fused kernels")
    model = head32_model()
    cache = kvstack.make_cache(model, "kivi(bits=2, group_size=16, residual=16)")
    prefill(model, random_ids(200), cache)
    monkeypatch.setattr(quantized, "unpack_float", lambda *a: pytest.fail("a block was decoded"))
    monkeypatch.setattr(QuantizedRegion, "decode_all", lambda self: pytest.fail("a whole layer was decoded"))
    model(torch.tensor([[5]]), **kvstack.cache_kwargs(model, cache), use_cache=True)


@pytest.mark.parametrize("spec", ["kivi(bits=2, group_size=16)", "quant(bits=4, group_size=16)",
                                  "kivi(bits=4, group_size=8, rotate='hadamard')"])
def test_fused_decoding_scores_and_weighs_the_same_under_cpu_autocast(spec):
    # a region's decode math runs with CPU autocast off: under bf16 autocast its scores, weighted values and
    # one-token attention are the float32 ones, to the bit (a Hadamard query rotation used to turn bf16 and
    # the packed kernel then refused it)
    if not kernels.available():
        pytest.skip("no C++ compiler for the fused kernels")
    generator = torch.Generator().manual_seed(7)
    region = _region(spec)
    n = 3 * region.chunk
    region.append(torch.randn(1, 2, n, 32, generator=generator), torch.randn(1, 2, n, 32, generator=generator),
                  torch.arange(n, dtype=torch.int32).view(1, 1, -1), {})
    assert region._fused_decoding()
    query = torch.randn(1, 2, 3, 32, generator=generator)  # [B, H, G, D]
    weights = torch.softmax(torch.randn(1, 2, 3, region.length, generator=generator), dim=-1)
    tail_keys, tail_values = torch.randn(2, 1, 2, 5, 32, generator=generator)
    one = torch.randn(1, 6, 1, 32, generator=generator)  # [B, Hq, 1, D]

    def decode_math() -> tuple[torch.Tensor, ...]:
        return (region.scores(query), region.weighted_values(weights),
                region.attend_one(one, tail_keys, tail_values, 0.2))

    plain = decode_math()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = decode_math()
    for got, expected in zip(under_autocast, plain, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(region.scores(query.bfloat16()), region.scores(query.bfloat16().float()), atol=0,
                               rtol=0)  # a bf16 query is widened, not refused


def test_decoding_with_a_rotated_codec_under_cpu_autocast_runs_and_stays_close_to_without():
    model = head32_model()
    spec = "kivi(bits=4, group_size=8, residual=16, rotate='hadamard')"
    ids = random_ids(120)
    logits = []
    for autocast in (False, True):
        cache = kvstack.make_cache(model, spec)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=autocast):
            prefill(model, ids, cache)
            assert cache.layers[0].encoded_entries() > 0
            out = model(torch.tensor([[5]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
        logits.append(out.logits[0, -1].float())
    # bf16 projections move the logits a little; the quantized attention itself is float32 in both
    assert torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=0) > 0.99


def test_static_selection_then_codec_keeps_what_the_selection_alone_keeps():
    model = head32_model()
    ids = random_ids(150)
    alone = kvstack.make_cache(model, "snapkv(budget=64)")
    composed = kvstack.make_cache(model, "snapkv(budget=64) + kivi(bits=2, group_size=16, residual=16)")
    prefill(model, ids, alone)
    prefill(model, ids, composed)
    for a, c in zip(alone.layers, composed.layers, strict=False):
        assert [[p.tolist() for p in head] for head in a.kept_positions()] == [
            [p.tolist() for p in head] for head in c.kept_positions()
        ]
        assert c.encoded_entries() == 32 and c.length == 32  # one 32-token chunk encoded, 16 + 16 waiting
    assert composed.kv_bytes() < 0.6 * alone.kv_bytes()  # half the kept entries are encoded


@pytest.mark.parametrize("inner, uneven", [("snapkv(ratio=0.5)", True), ("h2o(ratio=0.5)", False)])
def test_headwise_budgets_with_a_codec_encode_each_heads_own_entries(inner, uneven):
    model = head32_model()
    ids = random_ids(300)
    alone = kvstack.make_cache(model, f"adakv({inner})")
    composed = kvstack.make_cache(model, f"adakv({inner}) + kivi(bits=2, group_size=16, residual=16)")
    prefill(model, ids, alone)
    prefill(model, ids, composed)
    head_dim, chunk = 32, 32
    every_count = []
    for a, c in zip(alone.layers, composed.layers, strict=True):
        assert [[p.tolist() for p in head] for head in a.kept_positions()] == [
            [p.tolist() for p in head] for head in c.kept_positions()
        ]
        ragged = c.ragged
        counts = [ragged.entries(i) for i in range(2)]
        assert counts == a.head_lengths().flatten().tolist()
        every_count += counts
        for i in range(2):
            region = ragged.regions[i]
            assert region.length == (counts[i] - 16) // chunk * chunk and ragged.lengths[i] == counts[i] - region.length
            n = region.length
            packed = (
                n * head_dim * 2 // 8 * 2  # 2-bit keys and values
                + (n // 16) * head_dim * 2 * 2  # key scale + zero (float16) per channel per 16 tokens
                + n * (head_dim // 16) * 2 * 2  # value scale + zero per token per 16 channels
                + n * 4  # int32 positions
            )
            assert region.nbytes() == packed
        full_precision = sum(
            t.nbytes for store in (ragged.keys, ragged.values, ragged.positions) for t in store
        )
        assert c.kv_bytes() == full_precision + sum(r.nbytes() for r in ragged.regions) + 8
    assert (len(set(every_count)) > 1) == uneven  # uneven budgets stay uneven: no padding to the longest head
    assert composed.kv_bytes() < 0.6 * alone.kv_bytes()  # short heads: the full-precision tail weighs a lot


def test_headwise_heads_flush_their_own_chunks_while_decoding():
    model = head32_model()
    cache = kvstack.make_cache(model, "adakv(h2o(budget=100)) + kivi(bits=4, group_size=16, residual=16)")
    prefill(model, random_ids(90), cache)  # under budget: every head keeps all 90
    for layer in cache.layers:
        assert [r.length for r in layer.ragged.regions] == [64, 64] and layer.ragged.lengths == [26, 26]
    for step in range(40):
        model(torch.tensor([[step + 3]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
    for layer in cache.layers:  # 130 entries: (130 - 16) // 32 whole chunks encoded, the rest in full precision
        assert [r.length for r in layer.ragged.regions] == [96, 96] and layer.ragged.lengths == [34, 34]
        assert all(p.tolist() == list(range(130)) for p in layer.kept_positions()[0])


@pytest.mark.parametrize("batch", [1, 2])
def test_headwise_budgets_with_int8_decode_like_the_uncoded_method(batch):
    """Decoding attends over each head's encoded region and its full-precision tail (fused one-token path
    without padding, block-wise with left padding); int8 keeps the logits close to the uncoded ones."""
    model = head32_model()
    ids = random_ids(200, batch=batch)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :37] = 0  # left padding on the second sequence
    caches = {}
    for spec in ("adakv(snapkv(ratio=0.5))", "adakv(snapkv(ratio=0.5)) + quant(bits=8, group_size=32)"):
        cache = kvstack.make_cache(model, spec)
        prefill(model, ids, cache, attention_mask=mask if batch > 1 else None)
        caches[spec] = cache
    alone, coded = caches.values()
    assert all(layer.ragged.regions[0].length > 0 for layer in coded.layers)
    token = torch.full((batch, 1), 7)
    for _ in range(20):
        mask = torch.cat((mask, torch.ones(batch, 1, dtype=mask.dtype)), dim=1)
        kwargs = {"attention_mask": mask} if batch > 1 else {}
        expected = model(token, **kvstack.cache_kwargs(model, alone), use_cache=True, **kwargs).logits
        got = model(token, **kvstack.cache_kwargs(model, coded), use_cache=True, **kwargs).logits
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)
    # a multi-token chunk (a next turn) attends block by block over each head's region and tail
    chunk = torch.arange(9, 14).repeat(batch, 1)
    mask = torch.cat((mask, torch.ones(batch, 5, dtype=mask.dtype)), dim=1)
    kwargs = {"attention_mask": mask} if batch > 1 else {}
    expected = model(chunk, **kvstack.cache_kwargs(model, alone), use_cache=True, **kwargs).logits
    got = model(chunk, **kvstack.cache_kwargs(model, coded), use_cache=True, **kwargs).logits
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)
    assert coded.tokens_kept() == alone.tokens_kept()


@pytest.mark.parametrize("codec", ["kivi(bits=4, group_size=16, residual=16)", "quant(bits=4, group_size=16)"])
def test_streamingllm_with_a_codec_keeps_exactly_sinks_and_the_recent_window(codec):
    model = head32_model()
    cache = kvstack.make_cache(model, f"streamingllm(budget=64, sinks=4) + {codec}")
    prefill(model, random_ids(150), cache)
    for step in range(40):
        model(torch.tensor([[step % 100 + 3]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
        seen = 151 + step
        for layer in cache.layers:
            assert layer.encoded_entries() > 0
            for positions in layer.kept_positions()[0]:
                assert positions.tolist() == [0, 1, 2, 3, *range(seen - 60, seen)]


@pytest.mark.parametrize("codec", ["quant(bits=8, group_size=16)", "kivi(bits=4, group_size=16, residual=16)",
                                   "kvquant(bits=4, group_size=16, residual=16)"])
def test_streamingllm_cache_positions_with_a_codec_attend_at_slot_positions(codec):
    """positions='cache' over encoded entries: a decoding query attends as if every kept key (decoded
    from its codes, pre-RoPE ones included) and the query sat at their ranks by true position."""
    from kvstack.cache.rope import rope_shift

    model = head32_model()
    spec = f"streamingllm(budget=64, sinks=4, positions='cache') + {codec}"
    cache = kvstack.make_cache(model, spec)
    prefill(model, random_ids(150), cache)
    for step in range(5):
        model(torch.tensor([[step + 3]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
    layer, inv_freq = cache.layers[1], cache.rope_inv_freq
    assert layer.encoded_entries() > 0
    attend_encoded, checked = layer._attend_encoded, []

    def checking(query, *args):  # the step's query [1, Hq, 1, D]; the new token is the last slot
        encoded_keys, encoded_values = layer.region.decode_all()
        keys = torch.cat((encoded_keys, layer.keys[:, :, : layer.length]), dim=2)[0]  # [H, N, D], true positions
        values = torch.cat((encoded_values, layer.values[:, :, : layer.length]), dim=2)[0]
        positions = layer._all_positions()[0].long()  # [H, N]
        output, stats = attend_encoded(query, *args)
        scaling = args[3]
        for head in range(query.shape[1]):
            kv = head // 2
            order = sorted(range(positions.shape[1]), key=lambda i: int(positions[kv, i]))
            rank = torch.empty(positions.shape[1], dtype=torch.long)
            rank[order] = torch.arange(positions.shape[1])  # each entry's slot by true position
            at_slots = rope_shift(keys[kv], rank - positions[kv], inv_freq)
            q = rope_shift(query[0, head], rank[-1:] - positions[kv, -1:], inv_freq)[0]  # at the newest slot
            weights = torch.softmax(at_slots @ q * scaling, dim=0)
            torch.testing.assert_close(output[0, 0, head], weights @ values[kv], atol=1e-5, rtol=1e-4)
        checked.append(int(rank[-1]))
        return output, stats

    layer._attend_encoded = checking
    for step in range(3):
        model(torch.tensor([[step + 9]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
    assert checked == [64, 64, 64]  # budget 64 kept, the query one slot after them


def test_streamingllm_cache_positions_with_int8_decode_like_the_uncoded_method():
    model = head32_model()
    ids = random_ids(150)
    by_slot = "streamingllm(budget=64, sinks=4, positions='cache')"
    alone, coded = (kvstack.make_cache(model, spec) for spec in (by_slot, f"{by_slot} + quant(bits=8, group_size=16)"))
    prefill(model, ids, alone)
    prefill(model, ids, coded)
    for step in range(24):
        token = torch.tensor([[step % 50 + 3]])
        expected = model(token, **kvstack.cache_kwargs(model, alone), use_cache=True).logits
        got = model(token, **kvstack.cache_kwargs(model, coded), use_cache=True).logits
        torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)
        kept = [[p.tolist() for p in layer.kept_positions()[0]] for layer in (coded.layers[0], alone.layers[0])]
        assert kept[0] == kept[1] and coded.layers[0].encoded_entries() > 0


@pytest.mark.parametrize("codec", ["quant(bits=8, group_size=16)", "kivi(bits=4, group_size=16, residual=16)"])
def test_a_multi_token_chunk_over_encoded_entries_decodes_them_then_evicts_like_the_uncoded_method(codec, monkeypatch):
    """A chunk of several tokens after the prompt (a second turn, or perplexity streamed in chunks) makes a
    dynamic method drop several entries at once: the encoded entries are decoded back into full-precision
    slots first, then evicted with the rest, then flushed again."""
    from kvstack.cache.layer import KVStackLayer

    unflushed = []
    original = KVStackLayer._unflush
    monkeypatch.setattr(KVStackLayer, "_unflush", lambda self: (unflushed.append(self.region.length), original(self)))
    model = head32_model()
    ids = random_ids(150)
    spec = "streamingllm(budget=64, sinks=4)"
    alone, coded = (kvstack.make_cache(model, s) for s in (spec, f"{spec} + {codec}"))
    for cache in (alone, coded):
        prefill(model, ids, cache)
        for step in range(4):
            model(torch.tensor([[step + 3]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
    assert all(layer.encoded_entries() > 0 for layer in coded.layers)
    chunk = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49]])
    expected = model(chunk, **kvstack.cache_kwargs(model, alone), use_cache=True).logits
    got = model(chunk, **kvstack.cache_kwargs(model, coded), use_cache=True).logits
    assert len(unflushed) == len(coded.layers) and min(unflushed) > 0
    tolerance = 2e-2 if "bits=8" in codec else 2e-1
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    seen = 150 + 4 + chunk.shape[1]
    for layer, reference in zip(coded.layers, alone.layers, strict=True):
        for positions, uncoded in zip(layer.kept_positions()[0], reference.kept_positions()[0], strict=True):
            assert positions.tolist() == uncoded.tolist() == [0, 1, 2, 3, *range(seen - 60, seen)]
    for step in range(20):  # decoding goes on at the budget and encodes again
        token = torch.tensor([[step + 60]])
        expected = model(token, **kvstack.cache_kwargs(model, alone), use_cache=True).logits
        got = model(token, **kvstack.cache_kwargs(model, coded), use_cache=True).logits
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    for layer in coded.layers:
        assert layer.encoded_entries() > 0 and all(len(p) == 64 for p in layer.kept_positions()[0])


@pytest.mark.parametrize("name", ["h2o", "tova", "scissorhands"])
def test_dynamic_selection_with_a_codec_holds_its_budget_with_distinct_entries(name):
    model = head32_model()
    cache = kvstack.make_cache(model, f"{name}(budget=48) + kivi(bits=4, group_size=16, residual=16)")
    prefill(model, random_ids(120), cache, chunk_size=32)
    for step in range(30):
        model(torch.tensor([[step + 3]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
    for layer in cache.layers:
        assert layer.encoded_entries() > 0
        for positions in layer.kept_positions()[0]:
            assert len(positions) == 48 and len(set(positions.tolist())) == 48
            assert int(positions.max()) == 149  # the newest token is always kept


def test_eviction_inside_the_region_keeps_each_heads_outlier_channels():
    """H2O evicting encoded entries re-encodes their chunk per head through the split key stream: the
    budget holds, the channel order chosen from the prompt stays, and the re-encoded chunk decodes to the
    entry that took the evicted one's place."""
    model = head32_model()
    cache = kvstack.make_cache(model, "h2o(budget=48) + kivi(bits=2, group_size=16, residual=16, outlier_channels=8)")
    prefill(model, random_ids(120), cache, chunk_size=32)
    orders = [layer.region.keys.order.clone() for layer in cache.layers]
    replaced = []
    for layer in cache.layers:
        original = layer.region.replace_entry

        def spy(b, h, slot, keys, values, position, state, original=original, layer=layer):
            original(b, h, slot, keys, values, position, state)
            replaced.append((layer, b, h, slot, keys.clone()))

        layer.region.replace_entry = spy
    for step in range(30):
        model(torch.tensor([[step + 3]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
    assert replaced  # some evictions landed inside the region
    for layer, order in zip(cache.layers, orders, strict=True):
        assert torch.equal(layer.region.keys.order, order)
        for positions in layer.kept_positions()[0]:
            assert len(positions) == 48 and len(set(positions.tolist())) == 48
    layer, b, h, slot, keys = replaced[-1]
    start = slot // layer.region.chunk * layer.region.chunk
    decoded = layer.region.keys.decode_head(b, h, start, start + layer.region.chunk, torch.float32)[slot - start]
    assert float((decoded - keys).norm()) < 0.5 * float(keys.norm())  # 2-bit error, channels in place


def test_generate_with_a_codec_runs_and_reports_its_label():
    model = head32_model()
    cache = kvstack.make_cache(model, "h2o(budget=40) + kivi(bits=2, group_size=16)")
    out = model.generate(random_ids(60), **kvstack.cache_kwargs(model, cache), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 68)
    assert cache.label() == "h2o(budget=40) + kivi(group_size=16)"


# ------------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, words",
    [
        ("kivi(bits=3)", "bits must be one of 2, 4 or 8"),
        ("quant(bits=16)", "bits must be one of 2, 4 or 8"),
        ("kivi(group_size=0)", "group_size must be a positive integer"),
        ("kivi(rotate='random')", "rotate must be None, 'hadamard' or 'hadamard-values'"),
        ("kvquant(outliers=0.7)", "outliers must be a fraction"),
        ("kivi(residual=-1)", "residual must be >= 0"),
        ("kivi(key_bits=3)", "key_bits must be one of 2, 4 or 8"),
        ("quant(value_bits=1)", "value_bits must be one of 2, 4 or 8"),
        ("kivi(outlier_channels=3)", "outlier_channels must be an even number"),
        ("kivi(outlier_channels=8, outlier_bits=5)", "outlier_bits must be one of 2, 4 or 8"),
        ("kivi(value_group_size=0)", "value_group_size must be a positive integer"),
    ],
)
def test_bad_codec_parameters_get_one_line_errors(spec, words):
    with pytest.raises(SpecError, match=words) as info:
        parse(spec)
    assert "\n" not in str(info.value)


def test_a_group_size_that_does_not_divide_the_head_dimension_is_refused_at_make_cache():
    model = head32_model()
    with pytest.raises(CodecError, match="group_size 24 does not divide the head dimension of the values"):
        kvstack.make_cache(model, "kivi(group_size=24)")
    for channels in (32, 6):  # all channels; 26 narrow 2-bit channels do not pack into whole bytes
        with pytest.raises(CodecError, match=f"outlier_channels {channels} does not fit the head dimension 32"):
            kvstack.make_cache(model, f"kivi(outlier_channels={channels}, group_size=16)")


# ------------------------------------------------------------------------------------------------------
# Low rank: Palu-style SVD latents from a calibration artefact
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def calibrated(monkeypatch, tmp_path):
    """A head-32 tiny model with its calibration saved in a temporary kvstack home."""
    from kvstack.calibration import calibrate, save_calibration

    monkeypatch.setenv("KVSTACK_HOME", str(tmp_path))
    model = head32_model(seed=7)
    save_calibration(calibrate(model, None, input_ids=random_ids(256, seed=8), progress=False))
    return model


def test_palu_at_full_rank_reconstructs_exactly(calibrated):
    ids, follow = random_ids(120, seed=1), random_ids(8, seed=2)
    logits = {}
    for spec in ("full", "palu(rank=32, residual=0)"):
        cache = kvstack.make_cache(calibrated, spec)
        prefill(calibrated, ids, cache)
        logits[spec] = calibrated(follow, **kvstack.cache_kwargs(calibrated, cache), use_cache=True).logits
    torch.testing.assert_close(logits["palu(rank=32, residual=0)"], logits["full"], atol=2e-4, rtol=1e-3)
    from kvstack.calibration import calibration_path, model_key

    statistics = calibration_path(model_key(calibrated))  # what the bench records palu's results were made with
    assert cache.artefacts == {str(statistics.resolve()): hashlib.sha256(statistics.read_bytes()).hexdigest()}


def test_palu_at_half_rank_holds_about_half_the_bytes_and_costs_accuracy_gracefully(calibrated):
    ids, follow = random_ids(480, seed=1), random_ids(8, seed=2)
    caches, logits = {}, {}
    for spec in ("full", "palu(rank=16, residual=0)", "palu(rank=4, residual=0)"):
        caches[spec] = kvstack.make_cache(calibrated, spec)
        prefill(calibrated, ids, caches[spec])
        logits[spec] = calibrated(follow, **kvstack.cache_kwargs(calibrated, caches[spec]), use_cache=True).logits
    ratio = caches["palu(rank=16, residual=0)"].kv_bytes() / caches["full"].kv_bytes()
    assert 0.45 < ratio < 0.6  # latents are half of the entries; positions and the projections on top
    error_16 = float((logits["palu(rank=16, residual=0)"] - logits["full"]).abs().mean())
    error_4 = float((logits["palu(rank=4, residual=0)"] - logits["full"]).abs().mean())
    assert 0 < error_16 < error_4


def test_palu_refuses_a_rank_above_the_head_dimension(calibrated):
    with pytest.raises(CodecError, match="rank 40 is above the head dimension 32; choose 1 to 32"):
        kvstack.make_cache(calibrated, "palu(rank=40)")


def test_palu_without_or_with_a_foreign_calibration_is_refused(calibrated, tmp_path):
    from kvstack.calibration import CalibrationError, calibration_path, model_key

    other = head32_model(seed=8)
    with pytest.raises(CalibrationError, match="kvstack calibrate"):
        kvstack.make_cache(other, "palu(rank=16)")
    # Put the first model's artefact where the other model's belongs.
    calibration_path(model_key(calibrated)).rename(calibration_path(model_key(other)))
    with pytest.raises(CalibrationError, match="not"):
        kvstack.make_cache(other, "palu(rank=16)")


def test_smoothing_divides_key_pairs_by_calibrated_factors_and_reads_back_exactly(calibrated):
    from kvstack.cache.streams import smoothing_factors
    from kvstack.calibration import get_calibration

    calibration = get_calibration(calibrated)
    factors = smoothing_factors(calibration, 0, 0.5)  # [1, H, 1, D]
    assert factors.shape == (1, 2, 1, 32)
    torch.testing.assert_close(factors[..., :16], factors[..., 16:])  # one factor per RoPE pair
    expected = calibration.key_pair_norm_max[0].sqrt() / calibration.query_pair_norm_max[0].sqrt()
    torch.testing.assert_close(factors[0, :, 0, :16] / factors[0, :, 0, :1], expected / expected[:, :1])
    # At 8 bits the round trip is near exact, smoothing included; the fast path agrees with the blocks.
    ids = random_ids(150, seed=3)
    logits = {}
    for spec in ("full", "quant(bits=8, group_size=16, smooth=0.5)", "kivi(bits=8, group_size=16, smooth=0.5)"):
        cache = kvstack.make_cache(calibrated, spec)
        prefill(calibrated, ids, cache)
        logits[spec] = calibrated(torch.tensor([[5]]), **kvstack.cache_kwargs(calibrated, cache), use_cache=True).logits
    for spec in list(logits)[1:]:
        torch.testing.assert_close(logits[spec], logits["full"], atol=0.05, rtol=0.05)


def test_smoothing_without_a_calibration_is_refused_with_the_fix(monkeypatch, tmp_path):
    from kvstack.calibration import CalibrationError

    monkeypatch.setenv("KVSTACK_HOME", str(tmp_path))
    with pytest.raises(CalibrationError, match="kvstack calibrate"):
        kvstack.make_cache(head32_model(), "quant(bits=4, group_size=16, smooth=0.5)")
    with pytest.raises(SpecError, match="smooth must be None or a migration strength"):
        parse("kivi(smooth=2)")


def test_palu_split_ranks_hold_the_bytes_of_their_mean_rank(calibrated):
    ids = random_ids(300, seed=1)
    sizes = {}
    for spec in ("palu(rank=16, residual=0)", "palu(key_rank=8, value_rank=24, residual=0)"):
        cache = kvstack.make_cache(calibrated, spec)
        prefill(calibrated, ids, cache)
        sizes[spec] = cache.kv_bytes() - sum(
            layer.region.keys.basis.nbytes + layer.region.values.basis.nbytes for layer in cache.layers
        )
        assert cache.layers[0].region.keys.latents.shape[-1] == (8 if "key_rank" in spec else 16)
    assert len(set(sizes.values())) == 1


# ------------------------------------------------------------------------------------------------------
# Loki: approximate scores in a per-head PCA basis of the keys
# ------------------------------------------------------------------------------------------------------


def test_loki_attending_to_everything_equals_the_full_cache():
    model = head32_model()
    ids = random_ids(90)
    reference = model.generate(ids, **kvstack.cache_kwargs(model, kvstack.make_cache(model, "full")), max_new_tokens=12,
                               do_sample=False, output_scores=True, return_dict_in_generate=True)
    loki = kvstack.make_cache(model, "loki(ratio=0.0, rank=4)")
    out = model.generate(ids, **kvstack.cache_kwargs(model, loki), max_new_tokens=12, do_sample=False,
                         output_scores=True,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference.sequences)
    for ours, theirs in zip(out.scores, reference.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_loki_keeps_every_entry_stores_keys_in_an_orthonormal_pca_basis_and_reads_them_back():
    model = head32_model()
    ids = random_ids(120)
    full, loki = kvstack.make_cache(model, "full"), kvstack.make_cache(model, "loki(ratio=0.75, rank=8)")
    prefill(model, ids, full)
    prefill(model, ids, loki)
    for plain, rotated in zip(full.layers, loki.layers, strict=True):
        basis = rotated.key_basis  # [B, H, D, D]
        torch.testing.assert_close(basis.transpose(-1, -2) @ basis, torch.eye(32).expand_as(basis), atol=1e-4,
                                   rtol=0)
        # Energy sorted: the first coordinates of the stored keys carry the most.
        energy = rotated.keys[:, :, : rotated.length].pow(2).sum(dim=2)  # [B, H, D]
        assert bool((energy[..., :-1] >= energy[..., 1:] - 1e-3).all())
        view = rotated._view(kvstack.methods.base.AttentionStats(), budget=0)
        torch.testing.assert_close(view.keys, plain.keys[:, :, : plain.length], atol=1e-4, rtol=1e-4)
    assert loki.kept_entries() == full.kept_entries()
    assert loki.kv_bytes() == full.kv_bytes() + sum(layer.key_basis.nbytes for layer in loki.layers)


@pytest.mark.parametrize("rank", [32, 6])
def test_loki_attends_only_to_the_top_entries_by_low_rank_scores(rank):
    model = head32_model(seed=2)
    cache = kvstack.make_cache(model, f"loki(budget=8, rank={rank})")
    prefill(model, random_ids(64, seed=2), cache)
    layer = cache.layers[1]
    query = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(0))
    output = layer._attend_low_rank_scored(query, None, 1, 0.2)  # [1, 1, Hq, D]
    keys = layer._view(kvstack.methods.base.AttentionStats(), budget=0).keys  # model basis, [1, H, L, D]
    values = layer.values[:, :, : layer.length]
    basis = layer.key_basis
    for head in range(4):
        kv = head // 2
        q = query[0, head, 0]
        approx = (q @ basis[0, kv])[:rank] @ (keys[0, kv] @ basis[0, kv])[:, :rank].T  # low-rank scores
        chosen = approx.topk(8).indices
        weights = torch.softmax((keys[0, kv, chosen] @ q) * 0.2, dim=0)  # exact attention over the chosen
        torch.testing.assert_close(output[0, 0, head], weights @ values[0, kv, chosen], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rank", [32, 6])
@pytest.mark.parametrize("codec", ["kivi(bits=4, group_size=16, residual=16)", "kvquant(bits=4, group_size=16,"
                                   " residual=16)", "quant(bits=8, group_size=16, rotate='hadamard')"])
def test_loki_with_a_codec_attends_to_the_top_entries_of_region_and_slots(codec, rank, monkeypatch):
    """Encoded keys are scored in the PCA basis by projecting the query: each decoding query attends
    exactly over its top entries by ``(q P)[:r] . (k P)[:r]``, with the encoded keys as the codec decodes
    them; the fused kernels and the block-by-block path agree."""
    model = head32_model(seed=2)
    for fused in (True, False):
        monkeypatch.setattr(quantized, "FUSED_KERNELS", fused)
        cache = kvstack.make_cache(model, f"loki(budget=24, rank={rank}) + {codec}")
        prefill(model, random_ids(100, seed=2), cache)
        layer = cache.layers[1]
        assert layer.encoded_entries() > 0 and layer.length > 0
        attend, checked = layer._attend_low_rank_scored, []

        def checking(query, causal, q_len, scaling, layer=layer, attend=attend, checked=checked):
            encoded_keys, _ = layer.region.decode_all()
            basis = layer.key_basis[0]  # [H, D, D]
            keys = torch.cat((encoded_keys[0], layer.keys[0, :, : layer.length] @ basis.transpose(-1, -2)), dim=1)
            values = torch.cat((layer.region.decode_all()[1][0], layer.values[0, :, : layer.length]), dim=1)
            output = attend(query, causal, q_len, scaling)
            for head in range(4):
                kv = head // 2
                q = query[0, head, 0]
                approx = (q @ basis[kv])[:rank] @ (keys[kv] @ basis[kv])[:, :rank].T
                chosen = approx.topk(24).indices
                weights = torch.softmax((keys[kv, chosen] @ q) * scaling, dim=0)
                torch.testing.assert_close(output[0, 0, head], weights @ values[kv, chosen], atol=1e-5, rtol=1e-4)
            checked.append(q_len)
            return output

        layer._attend_low_rank_scored = checking
        for step in range(3):
            model(torch.tensor([[step + 5]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
        assert checked == [1, 1, 1]


def test_loki_attending_to_everything_with_a_codec_equals_the_codec_alone():
    model = head32_model()
    ids = random_ids(90)
    codec = "quant(bits=8, group_size=16)"
    alone, loki = kvstack.make_cache(model, codec), kvstack.make_cache(model, f"loki(ratio=0.0, rank=4) + {codec}")
    chunked = kvstack.make_cache(model, f"loki(ratio=0.0, rank=4) + {codec}")
    for cache in (alone, loki):
        prefill(model, ids, cache)
    prefill(model, ids, chunked, chunk_size=32)  # nothing is encoded before the basis is fitted on every key
    token = torch.tensor([[7]])
    for _ in range(6):
        expected = model(token, **kvstack.cache_kwargs(model, alone), use_cache=True).logits
        for cache in (loki, chunked):
            got = model(token, **kvstack.cache_kwargs(model, cache), use_cache=True).logits
            torch.testing.assert_close(got, expected,
                                       atol=1e-4, rtol=1e-4)
        token = expected[:, -1].argmax(-1, keepdim=True)
    assert loki.layers[0].encoded_entries() == alone.layers[0].encoded_entries() > 0
    assert loki.kv_bytes() == alone.kv_bytes() + sum(layer.key_basis.nbytes for layer in loki.layers)


def test_loki_refuses_a_rank_above_the_head_dimension():
    with pytest.raises(kvstack.api.InputError, match="rank 64 is above the head dimension 32"):
        kvstack.make_cache(head32_model(), "loki(ratio=0.5, rank=64)")
