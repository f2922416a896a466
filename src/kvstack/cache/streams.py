"""How one of keys / values is held in bytes once a codec encodes it: the streams of an encoded region.

:class:`PackedStream` holds bit-packed integer codes with float16 scales and zero points (and optional sparse
float16 outliers); :class:`ChannelSplitStream` keeps a few wide key channels at more bits;
:class:`LowRankResidualStream` adds GEAR's low-rank correction of the quantization error; :class:`LatentStream`
holds Palu's low-rank latents. Rotations (randomized Hadamard) and SmoothAttention's factors are built here.

Shapes: ``B`` batch, ``H`` KV heads, ``N`` encoded entries, ``D`` head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from kvstack.cache.codecs import pack_bits, unpack_float
from kvstack.contract import TensorFormat

META_DTYPE = torch.float16  # scales, zero points, outliers and low-rank factors


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
