"""Packed integer codecs for KV storage (taxonomy §1.4): bit packing and group-wise min-max quantization.

This is the storage half of the quantization family: a policy decides *which* entries are quantized
and along which axis (KIVI: keys per channel with groups along tokens, values per token); this module
stores them in exactly the bytes it reports.

* :func:`pack_bits` / :func:`unpack_bits` put 2-, 4- or 8-bit codes into ``uint8`` words
  (``8 // bits`` consecutive codes per byte, first code in the lowest bits). Packing is lossless.
  :func:`unpack_float` decodes words straight to float32 codes through a 256-entry table.
* :func:`quantize` applies asymmetric min-max quantization (FlexGen / KIVI style) to groups of
  ``group_size`` consecutive elements along one axis: per group a ``scale = (max - min) / (2**bits - 1)``
  and a zero point ``min``, codes ``round((x - min) / scale)``. Scales and zero points are stored in
  ``float16`` by default, as in KIVI and FlexGen.
* :class:`QuantizedTensor` holds the packed codes and the group metadata; :meth:`QuantizedTensor.nbytes`
  counts payload + scales + zero points, so ``8 * nbytes / numel`` is the honest bits per element
  (2-bit codes in groups of 32 with fp16 metadata: ``2 + 32 / 32 = 3`` bits).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from kvstack.contract import VALID_BITS, CodecError, check_bits, check_group_size

__all__ = [
    "VALID_BITS", "CodecError", "QuantizedTensor", "check_bits", "pack_bits", "quantize", "unpack_bits", "unpack_float",
]

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[..., n]`` codes in ``[0, 2**bits)`` into ``[..., n * bits / 8]`` ``uint8`` words.

    ``n`` must be a multiple of ``8 // bits``. Code ``k`` of a word sits in bits ``k*bits .. k*bits+bits-1``.
    """
    bits = check_bits(bits)
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise CodecError(f"cannot pack {codes.shape[-1]} {bits}-bit codes: the count must be a multiple of {per_byte}")
    codes = codes.to(torch.uint8)
    if per_byte == 1:
        return codes.clone()
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = grouped[..., 0].clone()
    for k in range(1, per_byte):
        packed |= grouped[..., k] << (k * bits)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, count: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[..., m]`` words -> ``[..., m * 8 / bits]`` ``uint8`` codes (first ``count``)."""
    bits = check_bits(bits)
    per_byte = 8 // bits
    if per_byte == 1:
        codes = packed
    else:
        mask = (1 << bits) - 1
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = ((packed.unsqueeze(-1) >> shifts) & mask).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
    return codes if count is None else codes[..., :count]


@functools.lru_cache(maxsize=8)
def _code_table(bits: int, device: torch.device) -> torch.Tensor:
    """``[256, 8 // bits]`` float32: the codes held by each possible byte, in order."""
    shifts = torch.arange(0, 8, bits)
    table = (torch.arange(256).view(-1, 1) >> shifts) & ((1 << bits) - 1)
    return table.float().to(device)


def unpack_float(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`unpack_bits` straight to float32: ``[..., m]`` words -> ``[..., m * 8 / bits]`` codes.

    One table lookup per byte (an embedding gather), several times faster on CPU than shifting and
    masking each code and converting it afterwards.
    """
    bits = check_bits(bits)
    if bits == 8:
        return packed.float()
    per_byte = 8 // bits
    codes = torch.nn.functional.embedding(packed.int(), _code_table(bits, packed.device))  # [..., m, p]
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per_byte)


@dataclasses.dataclass
class QuantizedTensor:
    """A tensor quantized group-wise along one axis and bit-packed.

    Attributes
    ----------
    packed:
        ``[..., groups, group_size * bits / 8]`` uint8 codes, the quantized axis moved last and split into groups.
    scale, zero:
        ``[..., groups, 1]`` per-group step and minimum (``float16`` by default).
    bits, group_size:
        Code width and elements per group.
    axis:
        The quantized axis of the original tensor (non-negative).
    shape:
        Shape of the original tensor.
    dtype:
        dtype the tensor dequantizes to.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """The reconstructed tensor, shape :attr:`shape`, dtype :attr:`dtype`."""
        codes = unpack_bits(self.packed, self.bits, self.group_size)  # [..., groups, group_size]
        values = codes.to(torch.float32) * self.scale.float() + self.zero.float()
        moved = values.reshape(*values.shape[:-2], values.shape[-2] * self.group_size)
        return moved.movedim(-1, self.axis).to(self.dtype)

    def nbytes(self) -> int:
        """Bytes held: packed payload + scales + zero points."""
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes

    def numel(self) -> int:
        """Elements of the original tensor."""
        total = 1
        for size in self.shape:
            total *= size
        return total

    def bits_per_element(self) -> float:
        """``8 * nbytes / numel``: payload and metadata bits per stored element."""
        return 8.0 * self.nbytes() / self.numel()


def quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: int = -1, meta_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Asymmetric min-max quantization of ``x`` in groups of ``group_size`` consecutive elements along ``axis``.

    Parameters
    ----------
    x:
        Any floating tensor, e.g. keys ``[B, H, L, D]``.
    bits:
        2, 4 or 8.
    group_size:
        Elements per group; must divide ``x.shape[axis]``.
    axis:
        The axis the groups run along: ``-1`` (channels) quantizes per token, ``-2`` (tokens) per channel.
    meta_dtype:
        dtype of the stored scales and zero points.

    Returns
    -------
    QuantizedTensor
        Every element reconstructs within half a step of its group (plus the rounding of the stored
        scale and zero point to ``meta_dtype``).
    """
    bits = check_bits(bits)
    axis = axis % x.dim()
    check_group_size(group_size, x.shape[axis], f"axis {axis}")
    moved = x.movedim(axis, -1).float()
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // group_size, group_size)
    low = grouped.amin(dim=-1, keepdim=True)
    high = grouped.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    zero = low.to(meta_dtype)
    scale = ((high - zero.float()) / levels).to(meta_dtype)
    step = scale.float()
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((grouped - zero.float()) / safe_step).clamp_(0, levels)
    return QuantizedTensor(
        packed=pack_bits(codes.to(torch.uint8), bits), scale=scale, zero=zero, bits=bits, group_size=group_size,
        axis=axis, shape=tuple(x.shape), dtype=x.dtype,
    )
