"""Packed storage of a layer's encoded entries, and attention over it one block at a time.

A :class:`QuantizedRegion` holds the entries a codec (:mod:`kvstack.methods.quantization`) has encoded:
for keys and for values a :class:`PackedStream` of bit-packed integer codes with float16 scales and
zero points (and, optionally, sparse float16 outliers), plus each entry's true position and method
state. It grows by whole chunks (``codec.chunk_tokens()`` tokens, a multiple of every token group).

:func:`blockwise_attention` computes attention over ``[region | full-precision tail]`` with an online
softmax: each block of the region is decoded, used and dropped, so the transient full-precision data
is one block (``BLOCK_TOKENS`` tokens), never a whole layer. A second pass over the blocks, with the
log-sum-exp of the first, yields the statistics selection methods need (column sums, below-mean counts,
the weights of trailing queries), so every selection method composes with every codec.

Shapes: ``B`` batch, ``H`` KV heads, ``Hq = G * H`` query heads, ``N`` encoded entries, ``D`` head dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvstack.cache import kernels
from kvstack.cache.codecs import pack_bits, unpack_float
from kvstack.contract import STAT_BELOW_MEAN, STAT_COLSUM, STAT_LAST, STAT_WINDOW, AttentionStats, TensorFormat

BLOCK_TOKENS = 1024  # entries decoded at a time by attention (rounded to whole chunks)
ENCODE_TOKENS = 512  # tokens encoded per step when a long prompt is flushed
FUSED_KERNELS = True  # decode one token with the compiled kernels when they are available
META_DTYPE = torch.float16


def growth_tokens(length: int, chunk: int) -> int:
    """Spare encoded slots kept when the region grows: one chunk or about 3%, whichever is larger."""
    return max(chunk, chunk * (length // (32 * chunk)))


@functools.lru_cache(maxsize=8)
def hadamard_matrix(size: int) -> torch.Tensor:
    """``[size, size]`` orthonormal Sylvester Hadamard matrix (``size`` a power of two)."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix / math.sqrt(size)


def smoothing_factors(calibration: Any, layer_idx: int, alpha: float) -> torch.Tensor:
    """SmoothAttention key divisors ``[1, H, 1, D]``: ``max|K|^alpha / max|Q|^(1 - alpha)`` per RoPE pair.

    Maxima are the calibrated pair norms (``key_pair_norm_max``, ``query_pair_norm_max``, ``[L, H, D/2]``),
    so both channels of a pair share a factor and the scaling commutes with RoPE.
    """
    keys = calibration.key_pair_norm_max[layer_idx].float().clamp(min=1e-5)
    queries = calibration.query_pair_norm_max[layer_idx].float().clamp(min=1e-5)
    pair = keys.pow(alpha) / queries.pow(1.0 - alpha)
    pair = pair / pair.mean(dim=-1, keepdim=True)  # only ratios between channels matter
    return torch.cat((pair, pair), dim=-1).unsqueeze(0).unsqueeze(2)


def random_hadamard(size: int, seed: int) -> torch.Tensor:
    """``[size, size]`` randomized Hadamard rotation ``diag(s) @ H`` with random signs ``s`` (orthogonal)."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1
    return signs.unsqueeze(1) * hadamard_matrix(size)


class PackedStream:
    """A ``[B, H, N, D]`` tensor stored as packed ``bits``-bit codes, grown by whole chunks.

    Attributes
    ----------
    codes:
        ``[B, H, capacity, D * bits / 8]`` uint8, token-major (planar packing along channels).
    scale, zero:
        float16 group metadata: ``[B, H, capacity / G, D]`` when groups run along tokens (per channel),
        ``[B, H, capacity, D / g]`` when they run along channels (per token).
    outlier_index, outlier_value:
        ``[B, H, capacity / chunk, k]`` int16 positions inside a chunk's ``chunk * D`` elements and their
        exact float16 values (``k = 0`` without outliers).
    """

    def __init__(
        self, fmt: TensorFormat, batch: int, heads: int, head_dim: int, chunk: int, outliers: int,
        device: torch.device,
    ) -> None:
        self.fmt, self.chunk, self.outliers = fmt, chunk, outliers
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.codes = torch.empty((batch, heads, 0, head_dim * fmt.bits // 8), dtype=torch.uint8, device=device)
        meta_cols = head_dim if fmt.along == "tokens" else head_dim // fmt.group_size
        self.scale = torch.empty((batch, heads, 0, meta_cols), dtype=META_DTYPE, device=device)
        self.zero = torch.empty_like(self.scale)
        self.outlier_index = torch.empty((batch, heads, 0, outliers), dtype=torch.int16, device=device)
        self.outlier_value = torch.empty((batch, heads, 0, outliers), dtype=META_DTYPE, device=device)

    def _meta_rows(self, tokens: int) -> int:
        return tokens // self.fmt.group_size if self.fmt.along == "tokens" else tokens

    def nbytes(self) -> int:
        tensors = (self.codes, self.scale, self.zero, self.outlier_index, self.outlier_value)
        return sum(t.nbytes for t in tensors)

    def resize(self, capacity: int, live: int) -> None:
        """Reallocate to ``capacity`` tokens, keeping the first ``live``."""

        def grown(tensor: torch.Tensor, rows: int, keep: int) -> torch.Tensor:
            new = tensor.new_empty((*tensor.shape[:2], rows, tensor.shape[3]))
            new[:, :, :keep] = tensor[:, :, :keep]
            return new

        self.codes = grown(self.codes, capacity, live)
        self.scale = grown(self.scale, self._meta_rows(capacity), self._meta_rows(live))
        self.zero = grown(self.zero, self._meta_rows(capacity), self._meta_rows(live))
        self.outlier_index = grown(self.outlier_index, capacity // self.chunk, live // self.chunk)
        self.outlier_value = grown(self.outlier_value, capacity // self.chunk, live // self.chunk)

    # ------------------------------------------------------------------------------ encode / decode
    def encode(self, x: torch.Tensor, start: int) -> None:
        """Quantize ``x`` ``[B', H', n, D]`` (``n`` a multiple of the chunk) into tokens ``start:start+n``.

        ``B'``/``H'`` may be 1 with ``start`` addressing one (sequence, head) through :meth:`encode_head`.
        """
        self._write(self.codes, self.scale, self.zero, self.outlier_index, self.outlier_value, x, start)

    def encode_head(self, b: int, h: int, x: torch.Tensor, start: int) -> None:
        """Re-encode tokens ``start:start+n`` of one (sequence, head) from ``x`` ``[n, D]``."""
        sl = (slice(b, b + 1), slice(h, h + 1))
        self._write(
            self.codes[sl], self.scale[sl], self.zero[sl], self.outlier_index[sl], self.outlier_value[sl],
            x.view(1, 1, *x.shape), start,
        )

    def _write(self, codes_out, scale_out, zero_out, index_out, value_out, x: torch.Tensor, start: int) -> None:
        fmt = self.fmt
        batch, heads, n, head_dim = x.shape
        levels = (1 << fmt.bits) - 1
        values = x.float().contiguous()
        if fmt.along == "tokens":
            grouped = values.view(batch, heads, n // fmt.group_size, fmt.group_size, head_dim)
            axis = 3
        else:
            grouped = values.view(batch, heads, n, head_dim // fmt.group_size, fmt.group_size)
            axis = 4
        excluded = None
        if self.outliers:
            deviation = (grouped - grouped.mean(dim=axis, keepdim=True)).abs_()
            deviation /= grouped.std(dim=axis, keepdim=True).clamp_(min=1e-6)
            per_chunk = deviation.view(batch, heads, n // self.chunk, self.chunk * head_dim)
            index = per_chunk.topk(self.outliers, dim=-1, sorted=False).indices  # [B, H, n/chunk, k]
            flat = values.view(batch, heads, n // self.chunk, self.chunk * head_dim)
            index_out[:, :, start // self.chunk : (start + n) // self.chunk] = index.to(torch.int16)
            value_out[:, :, start // self.chunk : (start + n) // self.chunk] = flat.gather(-1, index).to(META_DTYPE)
            excluded = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, index, True).view(grouped.shape)
        if excluded is None:
            low, high = grouped.amin(dim=axis, keepdim=True), grouped.amax(dim=axis, keepdim=True)
        else:
            low = grouped.masked_fill(excluded, float("inf")).amin(dim=axis, keepdim=True)
            high = grouped.masked_fill(excluded, float("-inf")).amax(dim=axis, keepdim=True)
        zero = low.to(META_DTYPE)
        scale = ((high - zero.float()) / levels).to(META_DTYPE)
        step = scale.float()
        step = torch.where(step > 0, step, torch.ones_like(step))
        quantized = ((grouped - zero.float()) / step).round_().clamp_(0, levels).to(torch.uint8)
        codes_out[:, :, start : start + n] = pack_bits(quantized.view(batch, heads, n, head_dim), fmt.bits)
        rows = slice(self._meta_rows(start), self._meta_rows(start + n))
        scale_out[:, :, rows] = scale.squeeze(axis)
        zero_out[:, :, rows] = zero.squeeze(axis)

    def decode(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B, H, stop - start, D]`` reconstruction of tokens ``start:stop`` (whole chunks)."""
        fmt = self.fmt
        n = stop - start
        codes = unpack_float(self.codes[:, :, start:stop], fmt.bits)
        rows = slice(self._meta_rows(start), self._meta_rows(stop))
        scale, zero = self.scale[:, :, rows].float(), self.zero[:, :, rows].float()
        batch, heads, head_dim = self.batch, self.heads, self.head_dim
        if fmt.along == "tokens":
            shape = (batch, heads, n // fmt.group_size, fmt.group_size, head_dim)
            values = torch.addcmul(zero.unsqueeze(3), codes.view(shape), scale.unsqueeze(3))
        else:
            shape = (batch, heads, n, head_dim // fmt.group_size, fmt.group_size)
            values = torch.addcmul(zero.unsqueeze(4), codes.view(shape), scale.unsqueeze(4))
        values = values.view(batch, heads, n, head_dim)
        if self.outliers:
            self.scatter_outliers(values, start)
        return values.to(dtype)

    def scatter_outliers(self, values: torch.Tensor, start: int) -> None:
        """Write the exact sparse outliers into ``values`` ``[B, H, n, D]`` float32, tokens ``start:start+n``."""
        batch, heads, n, head_dim = values.shape
        chunks = slice(start // self.chunk, (start + n) // self.chunk)
        flat = values.view(batch, heads, n // self.chunk, self.chunk * head_dim)
        flat.scatter_(-1, self.outlier_index[:, :, chunks].long(), self.outlier_value[:, :, chunks].float())

    def decode_head(self, b: int, h: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """``[stop - start, D]`` reconstruction of one (sequence, head)."""
        view = PackedStream.__new__(PackedStream)
        view.__dict__.update(self.__dict__)
        view.batch = view.heads = 1
        sl = (slice(b, b + 1), slice(h, h + 1))
        for name in ("codes", "scale", "zero", "outlier_index", "outlier_value"):
            setattr(view, name, getattr(self, name)[sl])
        return view.decode(start, stop, dtype)[0, 0]


class ChannelSplitStream:
    """A ``[B, H, N, D]`` key tensor whose widest channels are stored at more bits than the others.

    Per (sequence, head), the ``C`` channels with the widest range (in RoPE pairs ``i``, ``i + D/2``) of
    the first chunk encoded are chosen once; ``order`` puts them first. Two :class:`PackedStream`s hold
    the channels in that order: ``wide`` the first ``C`` at the codec's outlier width, ``narrow`` the
    other ``D - C`` at its key width, both per channel along tokens.

    Attributes
    ----------
    order:
        ``[B, H, D]`` uint8 channel permutation (None until the first encode), stored and counted.
    """

    outliers = 0

    def __init__(
        self, wide: TensorFormat, narrow: TensorFormat, channels: int, batch: int, heads: int, head_dim: int,
        chunk: int, device: torch.device,
    ) -> None:
        self.channels, self.batch, self.heads, self.head_dim = channels, batch, heads, head_dim
        self.wide = PackedStream(wide, batch, heads, channels, chunk, 0, device)
        self.narrow = PackedStream(narrow, batch, heads, head_dim - channels, chunk, 0, device)
        self.order: torch.Tensor | None = None

    def nbytes(self) -> int:
        order = 0 if self.order is None else self.order.nbytes
        return self.wide.nbytes() + self.narrow.nbytes() + order

    def resize(self, capacity: int, live: int) -> None:
        self.wide.resize(capacity, live)
        self.narrow.resize(capacity, live)

    def _choose(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, D]`` uint8 order of ``x`` ``[B, H, n, D]``'s channels: widest RoPE pairs first."""
        half = self.head_dim // 2
        spread = (x.amax(dim=2) - x.amin(dim=2)).float()  # [B, H, D]
        pairs = (spread[..., :half] + spread[..., half:]).topk(self.channels // 2, dim=-1).indices.sort(-1).values
        wide = torch.cat((pairs, pairs + half), dim=-1)
        rest = torch.ones_like(spread, dtype=torch.bool).scatter_(-1, wide, False)
        narrow = rest.nonzero()[:, -1].view(*spread.shape[:2], -1)  # ascending per (sequence, head)
        return torch.cat((wide, narrow), dim=-1).to(torch.uint8)

    def _permuted(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., n, D]`` with its channels in ``order`` ``[..., D]``."""
        return x.gather(-1, order.long().unsqueeze(-2).expand_as(x))

    def _unpermuted(self, permuted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_permuted`: channels back to the model's order."""
        return torch.empty_like(permuted).scatter_(-1, order.long().unsqueeze(-2).expand_as(permuted), permuted)

    def permute_query(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, R, D]`` query rows in each head's channel order, split into ``(wide, narrow)`` parts."""
        assert self.order is not None
        permuted = self._permuted(query, self.order).contiguous()
        return permuted[..., : self.channels].contiguous(), permuted[..., self.channels :].contiguous()

    def encode(self, x: torch.Tensor, start: int) -> None:
        if self.order is None:
            self.order = self._choose(x)
        permuted = self._permuted(x, self.order)
        self.wide.encode(permuted[..., : self.channels], start)
        self.narrow.encode(permuted[..., self.channels :], start)

    def encode_head(self, b: int, h: int, x: torch.Tensor, start: int) -> None:
        assert self.order is not None
        permuted = self._permuted(x, self.order[b, h])
        self.wide.encode_head(b, h, permuted[:, : self.channels], start)
        self.narrow.encode_head(b, h, permuted[:, self.channels :], start)

    def decode(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        assert self.order is not None
        permuted = torch.cat((self.wide.decode(start, stop, dtype), self.narrow.decode(start, stop, dtype)), dim=-1)
        return self._unpermuted(permuted, self.order)

    def decode_head(self, b: int, h: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        assert self.order is not None
        permuted = torch.cat((self.wide.decode_head(b, h, start, stop, dtype),
                              self.narrow.decode_head(b, h, start, stop, dtype)), dim=-1)
        return self._unpermuted(permuted, self.order[b, h])


class LowRankResidualStream:
    """A quantized ``[B, H, N, D]`` tensor plus a rank-``r`` approximation of its quantization error (GEAR).

    Every :meth:`encode` (one *span*: the prompt's slabs, then each chunk flushed while decoding) first
    stores ``x`` in the ``base`` stream, then takes the residual ``x - base(x)`` of each (sequence, head)
    and keeps its top-``r`` right singular vectors (``basis``, ``[r, D]``) and the residual's coordinates in
    them (``coeffs``, ``[n, r]``). Reading adds ``coeffs @ basis`` back; the base's sparse outliers, if
    any, are exact and stay so.

    Attributes
    ----------
    coeffs:
        ``[B, H, capacity, r]`` float16 residual coordinates per token.
    bases:
        ``[B, H, S, r, D]`` float16 orthonormal residual directions, one set per span.
    span_of_chunk:
        ``[capacity / chunk]`` int32 span of each chunk (spans are whole chunks, in token order).
    """

    def __init__(self, base: PackedStream | ChannelSplitStream, rank: int, chunk: int, device: torch.device) -> None:
        self.base, self.rank, self.chunk = base, rank, chunk
        batch, heads, head_dim = base.batch, base.heads, base.head_dim
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.coeffs = torch.empty((batch, heads, 0, rank), dtype=META_DTYPE, device=device)
        self.bases = torch.empty((batch, heads, 0, rank, head_dim), dtype=META_DTYPE, device=device)
        self.span_of_chunk = torch.empty((0,), dtype=torch.int32, device=device)

    @property
    def outliers(self) -> int:
        return self.base.outliers

    def nbytes(self) -> int:
        return self.base.nbytes() + self.coeffs.nbytes + self.bases.nbytes + self.span_of_chunk.nbytes

    def resize(self, capacity: int, live: int) -> None:
        self.base.resize(capacity, live)
        coeffs = self.coeffs.new_empty((self.batch, self.heads, capacity, self.rank))
        coeffs[:, :, :live] = self.coeffs[:, :, :live]
        spans = self.span_of_chunk.new_empty((capacity // self.chunk,))
        spans[: live // self.chunk] = self.span_of_chunk[: live // self.chunk]
        kept = int(self.span_of_chunk[live // self.chunk - 1]) + 1 if live else 0  # spans run in token order
        self.coeffs, self.span_of_chunk, self.bases = coeffs, spans, self.bases[:, :, :kept].clone()

    def _residual(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``x - base(x)`` for ``x`` ``[B, H, n, D]`` just encoded at ``start`` (float32)."""
        return x.float() - self.base.decode(start, start + x.shape[2], torch.float32)

    def encode(self, x: torch.Tensor, start: int) -> None:
        n = x.shape[2]
        self.base.encode(x, start)
        residual = self._residual(x, start)
        rank = min(self.rank, n)
        basis = torch.zeros((*x.shape[:2], self.rank, self.head_dim), dtype=META_DTYPE, device=x.device)
        basis[:, :, :rank] = torch.linalg.svd(residual, full_matrices=False).Vh[:, :, :rank].to(META_DTYPE)
        self.coeffs[:, :, start : start + n] = (residual @ basis.float().transpose(-1, -2)).to(META_DTYPE)
        self.span_of_chunk[start // self.chunk : (start + n) // self.chunk] = self.bases.shape[2]
        self.bases = torch.cat((self.bases, basis.unsqueeze(2)), dim=2)

    def encode_head(self, b: int, h: int, x: torch.Tensor, start: int) -> None:
        """Re-encode tokens ``start:start+n`` of one (sequence, head) inside an existing span (its basis kept)."""
        self.base.encode_head(b, h, x, start)
        residual = x.float() - self.base.decode_head(b, h, start, start + x.shape[0], torch.float32)
        basis = self.bases[b, h, int(self.span_of_chunk[start // self.chunk])].float()  # [r, D]
        self.coeffs[b, h, start : start + x.shape[0]] = (residual @ basis.T).to(META_DTYPE)

    def _correction(self, start: int, stop: int) -> torch.Tensor:
        """``[B, H, stop - start, D]`` float32 low-rank residual of tokens ``start:stop`` (whole chunks)."""
        chunks = (stop - start) // self.chunk
        spans = self.span_of_chunk[start // self.chunk : stop // self.chunk].long()
        bases = self.bases[:, :, spans].float()  # [B, H, chunks, r, D]
        coeffs = self.coeffs[:, :, start:stop].float().view(self.batch, self.heads, chunks, self.chunk, self.rank)
        return (coeffs @ bases).view(self.batch, self.heads, stop - start, self.head_dim)

    def decode(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        values = self.base.decode(start, stop, torch.float32) + self._correction(start, stop)
        if self.outliers:
            self.base.scatter_outliers(values, start)
        return values.to(dtype)

    def decode_head(self, b: int, h: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return self.decode(start, stop, dtype)[b, h]


class LatentStream:
    """A ``[B, H, N, D]`` tensor stored as rank-``r`` latents ``x @ P`` and read back as ``latents @ P^T``.

    Attributes
    ----------
    basis:
        ``[H, D, r]`` orthonormal columns per KV head (the calibrated principal directions).
    latents:
        ``[B, H, capacity, r]`` in the model's dtype.
    """

    outliers = 0

    def __init__(self, basis: torch.Tensor, batch: int, heads: int, dtype: torch.dtype, device: torch.device) -> None:
        self.basis = basis.to(device=device, dtype=dtype).contiguous()
        self.batch, self.heads, self.head_dim = batch, heads, basis.shape[1]
        self.latents = torch.empty((batch, heads, 0, basis.shape[2]), dtype=dtype, device=device)

    def nbytes(self) -> int:
        return self.latents.nbytes + self.basis.nbytes

    def resize(self, capacity: int, live: int) -> None:
        new = self.latents.new_empty((*self.latents.shape[:2], capacity, self.latents.shape[3]))
        new[:, :, :live] = self.latents[:, :, :live]
        self.latents = new

    def encode(self, x: torch.Tensor, start: int) -> None:
        self.latents[:, :, start : start + x.shape[2]] = (x.to(self.basis.dtype) @ self.basis).to(self.latents.dtype)

    def decode(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return (self.latents[:, :, start:stop] @ self.basis.transpose(-1, -2)).to(dtype)

    def encode_head(self, b: int, h: int, x: torch.Tensor, start: int) -> None:
        self.latents[b, h, start : start + x.shape[0]] = (x.to(self.basis.dtype) @ self.basis[h]).to(self.latents.dtype)

    def decode_head(self, b: int, h: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return (self.latents[b, h, start:stop] @ self.basis[h].T).to(dtype)


class QuantizedRegion:
    """The encoded entries of one layer: packed keys and values, positions and method state.

    Parameters
    ----------
    codec:
        The codec (formats, outliers, rotation, pre-RoPE).
    batch, heads, head_dim, dtype, device:
        Geometry of the layer and the dtype entries decode to.
    per_head_positions:
        True when heads may hold different tokens (a selection method evicts); otherwise positions are
        shared by the heads: implicit while the entries are consecutive tokens at the same positions in every
        sequence (``position_start + index``, no tensor held), else stored once per sequence, ``[B, 1, N]``.
    state_names:
        Per-entry float32 method state kept alongside (e.g. H2O's accumulated attention).
    rope_inv_freq:
        ``[D/2]`` RoPE inverse frequencies, needed by pre-RoPE codecs.
    layer_idx:
        Seeds the layer's random rotation.
    """

    def __init__(
        self,
        codec: Any,
        batch: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        per_head_positions: bool,
        state_names: tuple[str, ...] = (),
        rope_inv_freq: torch.Tensor | None = None,
        layer_idx: int = 0,
        calibration: Any = None,
    ) -> None:
        self.codec = codec
        self.batch, self.heads, self.head_dim, self.dtype, self.device = batch, heads, head_dim, dtype, device
        self.chunk = codec.chunk_tokens()
        outliers = math.ceil(codec.outlier_fraction() * self.chunk * head_dim)
        self.keys: PackedStream | ChannelSplitStream | LowRankResidualStream | LatentStream
        self.values: PackedStream | LowRankResidualStream | LatentStream
        if codec.stream_kind() == "latent":
            if calibration is None:
                raise ValueError(f"{codec.label()} needs the model's calibration (kvstack calibrate --model ...)")
            key_rank, value_rank = codec.ranks()
            self.keys = LatentStream(calibration.key_basis[layer_idx, :, :, :key_rank], batch, heads, dtype, device)
            self.values = LatentStream(
                calibration.value_basis[layer_idx, :, :, :value_rank], batch, heads, dtype, device
            )
        else:
            channels, wide_bits = codec.key_outlier_channels()
            if channels:
                narrow = codec.key_format()
                wide = TensorFormat(wide_bits, narrow.group_size, narrow.along)
                self.keys = ChannelSplitStream(wide, narrow, channels, batch, heads, head_dim, self.chunk, device)
            else:
                self.keys = PackedStream(codec.key_format(), batch, heads, head_dim, self.chunk, outliers, device)
            self.values = PackedStream(codec.value_format(), batch, heads, head_dim, self.chunk, outliers, device)
            if codec.residual_rank():
                self.keys = LowRankResidualStream(self.keys, codec.residual_rank(), self.chunk, device)
                self.values = LowRankResidualStream(self.values, codec.residual_rank(), self.chunk, device)
        self.positions = torch.empty((batch, heads if per_head_positions else 1, 0), dtype=torch.int32, device=device)
        self.per_head_positions = per_head_positions
        self.implicit_positions = not per_head_positions  # positions are position_start + index, none stored
        self.position_start = 0
        self.state = {name: torch.empty((batch, heads, 0), dtype=torch.float32, device=device) for name in state_names}
        self.length = 0
        self.capacity = 0
        # The randomized Hadamard matrix, held as its [D, D] int8 signs (its entries are +-1/sqrt(D)); applied
        # to the values, and to the keys unless rotate='hadamard-values'.
        self.rotation_signs: torch.Tensor | None = None
        self.rotates_keys = codec.rotation() == "hadamard"
        if codec.rotation() is not None:
            hadamard = random_hadamard(head_dim, seed=1000 + layer_idx) * math.sqrt(head_dim)
            self.rotation_signs = hadamard.round().to(torch.int8).to(device)
        self.smoothing: torch.Tensor | None = None  # [1, H, 1, D] per-channel key divisors
        if codec.smoothing() is not None:
            if calibration is None:
                raise ValueError(f"{codec.label()} needs the model's calibration (kvstack calibrate --model ...)")
            self.smoothing = smoothing_factors(calibration, layer_idx, float(codec.smoothing())).to(device)
        self.rope_inv_freq = rope_inv_freq
        if codec.pre_rope() and rope_inv_freq is None:
            raise ValueError(f"{codec.label()} quantizes keys before RoPE and needs the model's RoPE frequencies")

    # ------------------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes held: packed payload, scales, zero points, outliers, positions, state, rotation, smoothing."""
        total = self.keys.nbytes() + self.values.nbytes() + self.positions.nbytes
        total += sum(t.nbytes for t in self.state.values())
        return total + sum(t.nbytes for t in (self.rotation_signs, self.smoothing) if t is not None)

    @property
    def rotation(self) -> torch.Tensor | None:
        """``[D, D]`` float32 randomized Hadamard rotation (a transient built from the stored signs), or None."""
        if self.rotation_signs is None:
            return None
        return self.rotation_signs.float() * self.head_dim ** -0.5

    # ------------------------------------------------------------------------------ key transforms
    def _encode_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from kvstack.cache.layer import rope_shift

        if self.codec.pre_rope():
            keys = rope_shift(keys, -positions.expand(keys.shape[:3]).float(), self.rope_inv_freq)
        if self.smoothing is not None:
            keys = keys.float() / (self.smoothing if keys.shape[1] == self.heads else self.smoothing[:, :1])
        if self.rotates_keys:
            keys = keys.float() @ self.rotation
        return keys

    def _rotate(self, values: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation
        return values if rotation is None else values.float() @ rotation

    def _unrotate(self, values: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation
        return values if rotation is None else values @ rotation.T.to(values.dtype)

    def _decode_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from kvstack.cache.layer import rope_shift

        if self.rotates_keys:
            keys = self._unrotate(keys)
        if self.smoothing is not None:
            keys = keys * self.smoothing.to(keys.dtype)
        if self.codec.pre_rope():
            keys = rope_shift(keys, positions.expand(keys.shape[:3]).float(), self.rope_inv_freq)
        return keys

    # ------------------------------------------------------------------------------ storage
    def flushable(self, full_precision: int) -> int:
        """How many of ``full_precision`` waiting entries to encode now: whole chunks, after the codec's sinks
        and before its residual window (0 when there is not a whole chunk yet)."""
        count = full_precision - self.codec.sink_tokens() - self.codec.residual_tokens()
        return max(0, count // self.chunk * self.chunk)

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, state: dict[str, torch.Tensor],
        exact: bool = False,
    ) -> None:
        """Encode ``[B, H, n, D]`` entries (``n`` a multiple of the chunk) after the existing ones.

        ``positions`` ``[B, H or 1, n]`` int32; ``state`` maps each state name to ``[B, H, n]``. ``exact``:
        grow to exactly the entries held (no spare chunks), as at the end of a prompt.
        """
        n = keys.shape[2]
        assert n % self.chunk == 0, (n, self.chunk)
        needed = self.length + n
        if needed > self.capacity:
            self._resize(needed + (0 if exact else growth_tokens(needed, self.chunk)))
        start = self.length
        if self.implicit_positions:
            self._keep_positions_implicit(positions[:, :1])
        step = max(self.chunk, ENCODE_TOKENS // self.chunk * self.chunk)
        for offset in range(0, n, step):  # in slabs, so encoding temporaries stay small
            part = slice(offset, min(offset + step, n))
            self.keys.encode(self._encode_keys(keys[:, :, part], positions[:, :, part]), start + offset)
            self.values.encode(self._rotate(values[:, :, part]), start + offset)
        if not self.implicit_positions:
            self.positions[:, :, start:needed] = positions[:, : self.positions.shape[1]]
        for name, tensor in self.state.items():
            tensor[:, :, start:needed] = state[name]
        self.length = needed

    def _keep_positions_implicit(self, positions: torch.Tensor) -> None:
        """Check that new entries' ``[B, 1, n]`` positions continue the implicit run; store them all if not."""
        if positions.shape[-1] == 0:
            return
        first = self.position_start if self.length else int(positions[0, 0, 0])
        expected = torch.arange(first + self.length, first + self.length + positions.shape[-1],
                                dtype=positions.dtype, device=positions.device)
        if bool((positions == expected).all()):
            self.position_start = first
            return
        stored = torch.empty((self.batch, 1, self.capacity), dtype=torch.int32, device=self.device)
        stored[:, :, : self.length] = self.positions_between(0, self.length)
        self.positions, self.implicit_positions = stored, False

    def positions_between(self, start: int, stop: int) -> torch.Tensor:
        """``[B, H or 1, stop - start]`` int32 true positions of encoded entries ``start:stop``."""
        if self.implicit_positions:
            run = torch.arange(self.position_start + start, self.position_start + stop, dtype=torch.int32,
                               device=self.device)
            return run.expand(self.batch, 1, -1)
        return self.positions[:, :, start:stop]

    def _resize(self, capacity: int) -> None:
        live = self.length
        self.keys.resize(capacity, live)
        self.values.resize(capacity, live)

        def grown(tensor: torch.Tensor) -> torch.Tensor:
            new = tensor.new_empty((*tensor.shape[:2], capacity))
            new[:, :, :live] = tensor[:, :, :live]
            return new

        if not self.implicit_positions:
            self.positions = grown(self.positions)
        self.state = {name: grown(t) for name, t in self.state.items()}
        self.capacity = capacity

    def shrink_to_fit(self) -> None:
        """Release every spare slot (after a prompt); the next append grows with room to spare."""
        if self.capacity > self.length:
            self._resize(self.length)

    def live_positions(self) -> torch.Tensor:
        """``[B, H, N]`` int32 true positions of the encoded entries."""
        return self.positions_between(0, self.length).expand(self.batch, self.heads, -1)

    def block_bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each attention block: ``BLOCK_TOKENS`` rounded to whole chunks."""
        step = max(self.chunk, BLOCK_TOKENS // self.chunk * self.chunk)
        return [(start, min(start + step, self.length)) for start in range(0, self.length, step)]

    def decode(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, stop - start, D]`` of tokens ``start:stop`` (whole chunks), model dtype."""
        keys = self.keys.decode(start, stop, torch.float32)
        keys = self._decode_keys(keys, self.positions_between(start, stop)).to(self.dtype)
        values = self._unrotate(self.values.decode(start, stop, torch.float32)).to(self.dtype)
        return keys, values

    def decode_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every encoded entry decoded (a transient full-precision copy: for selection, never for attention)."""
        if self.length == 0:
            empty = torch.empty((self.batch, self.heads, 0, self.head_dim), dtype=self.dtype, device=self.device)
            return empty, empty.clone()
        return self.decode(0, self.length)

    def clear(self) -> None:
        """Drop every encoded entry and release the storage."""
        self.length = 0
        self._resize(0)
        if not self.per_head_positions:  # the next entries may again be a consecutive run
            self.positions = self.positions[:, :, :0]
            self.implicit_positions = True

    def replace_entry(
        self, b: int, h: int, slot: int, key: torch.Tensor, value: torch.Tensor, position: int,
        state: dict[str, float],
    ) -> None:
        """Put a new entry (``key``/``value`` ``[D]``) into ``slot`` of one head, re-encoding its chunk.

        Only possible with per-head positions (the evicting methods). The chunk is decoded, the entry
        replaced and the chunk encoded again, so the chunk's other entries keep their values up to one
        more rounding where the group's range changes.
        """
        start = slot // self.chunk * self.chunk
        stop = start + self.chunk
        chunk_positions = self.positions[b, h, start:stop].clone()
        chunk_positions[slot - start] = position
        keys = self.keys.decode_head(b, h, start, stop, torch.float32)
        encoded_key = key.float().view(1, 1, 1, -1)
        if self.smoothing is not None:  # _encode_keys divides by every head's factors; keep head h's
            encoded_key = encoded_key.expand(1, self.heads, 1, -1)
        encoded = self._encode_keys(encoded_key, torch.tensor(position).view(1, 1, 1))
        keys[slot - start] = encoded[0, h if self.smoothing is not None else 0, 0]
        values = self.values.decode_head(b, h, start, stop, torch.float32)
        values[slot - start] = self._rotate(value.float().view(1, -1))[0]
        self.keys.encode_head(b, h, keys, start)
        self.values.encode_head(b, h, values, start)
        self.positions[b, h, slot] = position
        for name, tensor in self.state.items():
            tensor[b, h, slot] = state[name]


    # ------------------------------------------------------------------------------ decoding fast path
    @kernels.without_cpu_autocast
    def attend_one(
        self, query: torch.Tensor, tail_keys: torch.Tensor, tail_values: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Attention of one new token per sequence over ``[region | tail]``, nothing masked, no statistics.

        Two passes over the blocks: scores of every block (:meth:`scores`), one softmax over the
        ``[B, Hq, N + P]`` weights, then the values block by block (:meth:`weighted_values`), in float32
        with CPU autocast off; the output is cast back to the query's dtype.

        Parameters
        ----------
        query:
            ``[B, Hq, 1, D]``.
        tail_keys, tail_values:
            ``[B, H, P, D]`` full-precision entries after the region (the new token among them).

        Returns
        -------
        torch.Tensor
            ``[B, 1, Hq, D]``.
        """
        batch, num_q_heads, _, head_dim = query.shape
        grouped = (query.float() * scaling).view(batch, self.heads, num_q_heads // self.heads, head_dim)
        scores = torch.cat((self.scores(grouped), grouped @ tail_keys.float().transpose(-1, -2)), dim=-1)
        weights = torch.softmax(scores, dim=-1)
        encoded = self.length
        output = self.weighted_values(weights[..., :encoded]) + weights[..., encoded:] @ tail_values.float()
        return output.to(query.dtype).view(batch, num_q_heads, 1, head_dim).transpose(1, 2)

    @kernels.without_cpu_autocast
    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Dot products of query rows with every encoded key, in the model's basis.

        Keys are never rescaled element by element when the fused kernels run; otherwise one block is
        decoded at a time. A Hadamard rotation and smoothing are folded into the query.

        Parameters
        ----------
        query:
            ``[B, H, R, D]`` float32 rows per KV head (e.g. the ``G`` query heads of a group, times scaling);
            a narrower dtype (bf16 under CPU autocast) is widened, and autocast is off here, so the rotation
            and the scores are float32 either way.

        Returns
        -------
        torch.Tensor
            ``[B, H, R, N]`` float32.
        """
        query = query.float()
        rotated = query * self.smoothing if self.smoothing is not None else query  # q.(k'l) = (q l).k'
        rotated = rotated @ self.rotation if self.rotates_keys else rotated
        encoded = self.length
        if self._fused_decoding():
            if isinstance(self.keys, ChannelSplitStream):  # q.k = q_wide.k_wide + q_narrow.k_narrow
                wide, narrow = self.keys.permute_query(rotated)
                return _packed_scores(self.keys.wide, wide, encoded) + _packed_scores(self.keys.narrow, narrow, encoded)
            return _packed_scores(self.keys, rotated, encoded)
        scores = torch.empty((*query.shape[:3], encoded), device=query.device)
        for start, stop in self.block_bounds():
            keys = self.keys.decode(start, stop, torch.float32)
            if self.codec.pre_rope():  # _decode_keys undoes rotation and smoothing too
                keys = self._decode_keys(keys, self.positions_between(start, stop))
                scores[..., start:stop] = query @ keys.transpose(-1, -2)
            else:
                scores[..., start:stop] = rotated @ keys.transpose(-1, -2)
        return scores

    @kernels.without_cpu_autocast
    def weighted_values(self, weights: torch.Tensor) -> torch.Tensor:
        """``[B, H, R, N]`` float32 weights over every encoded entry applied to their values: ``[B, H, R, D]``
        float32 in the model's basis (value scales and zero points are folded into the weights); narrower
        weights are widened, and CPU autocast is off here."""
        weights = weights.float()
        values = self.values
        if self._fused_decoding():
            out = kernels.packed_weighted_values(
                values.codes, values.scale, values.zero, weights.contiguous(), self.length, values.fmt.bits,
                values.fmt.group_size, values.fmt.along == "tokens",
            )
        else:
            out = torch.zeros((*weights.shape[:3], self.head_dim), device=weights.device)
            for start, stop in self.block_bounds():
                out += self._weighted_values(weights[..., start:stop], start, stop)
        return self._unrotate(out)

    def _fused_decoding(self) -> bool:
        """Whether the compiled kernels (:mod:`kvstack.cache.kernels`) can decode this region."""
        streams = (self.keys, self.values)
        return (
            self.device.type == "cpu" and not self.codec.pre_rope() and FUSED_KERNELS
            and all(isinstance(s, (PackedStream, ChannelSplitStream)) and not s.outliers for s in streams)
            and kernels.available()
        )

    def _weighted_values(self, weights: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``weights @ values[start:stop]`` (``[B, H, G, n]`` -> ``[B, H, G, D]``) in the stored (rotated) basis."""
        stream = self.values
        if not isinstance(stream, PackedStream) or stream.outliers or stream.fmt.along != "channels":
            return weights @ stream.decode(start, stop, torch.float32)
        fmt = stream.fmt
        codes = unpack_float(stream.codes[:, :, start:stop], fmt.bits)  # [B, H, n, D]
        scale = stream.scale[:, :, start:stop].float()  # [B, H, n, J]
        zero = stream.zero[:, :, start:stop].float()
        width = fmt.group_size
        parts = [
            (weights * scale[..., j].unsqueeze(2)) @ codes[..., j * width : (j + 1) * width]
            for j in range(scale.shape[-1])
        ]
        offsets = (weights @ zero).repeat_interleave(width, dim=-1)  # [B, H, G, D]
        return torch.cat(parts, dim=-1) + offsets


def _packed_scores(stream: PackedStream, query: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H, R, N]`` dot products of ``query`` ``[B, H, R, D]`` with a packed stream's first ``N`` entries."""
    fmt = stream.fmt
    return kernels.packed_scores(stream.codes, stream.scale, stream.zero, query, length, fmt.bits, fmt.group_size,
                                 fmt.along == "tokens")


# ---------------------------------------------------------------------------------- attention
Block = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def blockwise_attention(
    query: torch.Tensor,
    blocks: Callable[[], Iterator[Block]],
    scaling: float,
    needs: set[str],
    window: int,
    query_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Grouped-query attention over a sequence of blocks with an online softmax.

    Parameters
    ----------
    query:
        ``[B, Hq, q, D]``.
    blocks:
        Called once per pass; yields ``(keys, values, mask)`` per block: ``[B, H, n, D]`` keys and
        values and a ``[B|1, H|1, q|1, n]`` bool mask of what each query may see (None: everything).
        Blocks are decoded lazily, so only one is in full precision at a time.
    needs, window:
        Statistics to collect (``STAT_*``) and the trailing queries of the ``window`` statistic.
    query_valid:
        ``[B, q]`` bool, False for padding queries (they contribute to no statistic).

    Returns
    -------
    tuple
        ``[B, q, Hq, D]`` output and the :class:`AttentionStats` over the concatenated blocks.
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    heads = None
    grouped_q = None
    running_max = running_sum = accumulator = visible_count = None
    for keys, values, mask in blocks():
        if grouped_q is None:
            heads = keys.shape[1]
            group = num_q_heads // heads
            grouped_q = (query * scaling).reshape(batch, heads, group * q_len, head_dim)
            running_max = torch.full((batch, heads, group * q_len, 1), float("-inf"), device=query.device)
            running_sum = torch.zeros_like(running_max)
            accumulator = torch.zeros((batch, heads, group * q_len, head_dim), dtype=torch.float32, device=query.device)
            visible_count = torch.zeros((batch, heads, 1, q_len, 1), device=query.device)
        logits = torch.matmul(grouped_q, keys.transpose(-1, -2)).float()  # [B, H, G*q, n]
        if mask is not None:
            view = logits.view(batch, heads, group, q_len, -1)
            view.masked_fill_(~mask.unsqueeze(2), float("-inf"))
            visible_count = visible_count + mask.sum(dim=-1, keepdim=True).unsqueeze(2)
        else:
            visible_count = visible_count + keys.shape[2]
        block_max = logits.amax(dim=-1, keepdim=True)
        new_max = torch.maximum(running_max, block_max)
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        weights = torch.exp(logits - safe_max)
        correction = torch.exp(running_max - safe_max)
        running_sum = running_sum * correction + weights.sum(dim=-1, keepdim=True)
        accumulator = accumulator * correction + torch.matmul(weights.to(values.dtype), values).float()
        running_max = new_max
    assert grouped_q is not None, "blockwise_attention needs at least one block"
    output = torch.where(running_sum > 0, accumulator / running_sum.clamp(min=1e-30), torch.zeros_like(accumulator))
    output = output.to(query.dtype).view(batch, num_q_heads, q_len, head_dim).transpose(1, 2)
    stats = AttentionStats()
    wanted = needs & {STAT_COLSUM, STAT_BELOW_MEAN, STAT_WINDOW, STAT_LAST}
    if not wanted:
        return output, stats
    safe_max = torch.where(torch.isinf(running_max), torch.zeros_like(running_max), running_max)
    lse = (safe_max + running_sum.clamp(min=1e-30).log()).view(batch, heads, group, q_len, 1)
    query_ok = None if query_valid is None else query_valid.view(batch, 1, 1, q_len, 1)
    colsums, belows, seens, window_parts, last_parts = [], [], [], [], []
    rows = min(window, q_len) if STAT_WINDOW in needs else 0
    for keys, _, mask in blocks():
        logits = torch.matmul(grouped_q, keys.transpose(-1, -2)).float().view(batch, heads, group, q_len, -1)
        weights = torch.exp(logits - lse)
        visible = None
        if mask is not None:
            visible = mask.unsqueeze(2).expand_as(weights)
            weights = weights.masked_fill(~visible, 0.0)
        if query_ok is not None:
            weights = weights * query_ok
            visible = query_ok.expand_as(weights) if visible is None else visible & query_ok
        if STAT_COLSUM in needs:
            colsums.append(weights.sum(dim=(2, 3)))
        if STAT_BELOW_MEAN in needs:
            under = weights < 1.0 / visible_count.clamp(min=1)
            if visible is not None:
                under &= visible
                seens.append(visible.sum(dim=(2, 3)).float())
            else:
                seens.append(torch.full(weights.shape[:2] + weights.shape[-1:], float(group * q_len)))
            belows.append(under.sum(dim=(2, 3)).float())
        if rows:
            window_parts.append(weights[:, :, :, q_len - rows :].reshape(batch, num_q_heads, rows, -1))
        if STAT_LAST in needs:
            last_parts.append(weights[:, :, :, -1].reshape(batch, num_q_heads, -1))
    if colsums:
        stats.colsum = torch.cat(colsums, dim=-1)
    if belows:
        stats.below_mean, stats.queries_seen = torch.cat(belows, dim=-1), torch.cat(seens, dim=-1)
    if window_parts:
        stats.window = torch.cat(window_parts, dim=-1)
    if last_parts:
        stats.last = torch.cat(last_parts, dim=-1)
    return output, stats
