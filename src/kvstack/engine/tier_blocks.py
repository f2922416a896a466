"""What the storage tiers hold: a block's KV tensors under its hash, and the checks every tier applies.

``docs/engine-design.md`` (section "Storage tiers") describes the tiers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kvstack.errors import KVStackError

__all__ = ["MAX_HASH_BYTES", "Block", "TierError", "block_nbytes", "check_block", "check_capacity", "check_hash",
           "cpu_copy"]

MAX_HASH_BYTES = 64

Block = dict[str, torch.Tensor]


class TierError(KVStackError):
    """A storage tier was configured or called with invalid arguments."""


def check_capacity(capacity_bytes: int | None, what: str, allow_none: bool) -> None:
    """Raise :class:`TierError` unless ``capacity_bytes`` is a non-negative int (or None when allowed)."""
    if capacity_bytes is None and allow_none:
        return
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
        hint = "a non-negative int of bytes" + (" or None for unbounded" if allow_none else "")
        raise TierError(f"{what} capacity_bytes must be {hint}, got {capacity_bytes!r}")


def check_hash(block_hash: bytes) -> bytes:
    """Return ``block_hash`` as bytes, or raise :class:`TierError` if it is not 1..64 bytes."""
    if not isinstance(block_hash, (bytes, bytearray, memoryview)):
        raise TierError(f"a block hash must be bytes (e.g. from block_hash()), got {type(block_hash).__name__}")
    value = bytes(block_hash)
    if not 1 <= len(value) <= MAX_HASH_BYTES:
        raise TierError(f"a block hash must be 1 to {MAX_HASH_BYTES} bytes long, got {len(value)} bytes")
    return value


def check_block(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`TierError` unless ``tensors`` is a non-empty mapping of str to tensors."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise TierError("a block must be a non-empty dict of name -> torch.Tensor, e.g. {'keys': k, 'values': v}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TierError(
                f"a block must map str names to torch.Tensor, got {type(name).__name__} -> {type(tensor).__name__}"
            )


def block_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Total ``nbytes`` of the tensors of a block."""
    return sum(int(tensor.nbytes) for tensor in tensors.values())


def cpu_copy(tensors: Mapping[str, torch.Tensor]) -> Block:
    """Detached, contiguous CPU copies of a block's tensors (never aliasing the caller's memory)."""
    return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
