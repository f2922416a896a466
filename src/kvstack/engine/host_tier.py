"""The host tier: an in-memory LRU of CPU copies of blocks, spilling its least recently used block to disk.

``docs/engine-design.md`` (section "Storage tiers") describes the tiers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

from kvstack.engine.disk_tier import DiskTier
from kvstack.engine.tier_blocks import Block, TierError, block_nbytes, check_block, check_capacity, check_hash, cpu_copy

__all__ = ["HostTier"]


class HostTier:
    """An in-memory LRU of CPU copies of blocks; the least recently used block spills to ``next_tier``.

    Parameters
    ----------
    capacity_bytes : int
        Maximum total ``nbytes`` of the tensors held (0 holds nothing: every block passes straight down).
    next_tier : DiskTier or None, optional
        Where evicted blocks are written; None drops them.

    Raises
    ------
    TierError
        If ``capacity_bytes`` is not a non-negative int or ``next_tier`` is not a DiskTier.
    """

    def __init__(self, capacity_bytes: int, next_tier: DiskTier | None = None) -> None:
        check_capacity(capacity_bytes, "HostTier", allow_none=False)
        if next_tier is not None and not isinstance(next_tier, DiskTier):
            raise TierError(f"HostTier next_tier must be a DiskTier or None, got {type(next_tier).__name__}")
        self.capacity_bytes = capacity_bytes
        self.next_tier = next_tier
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._sizes: dict[bytes, int] = {}
        self._bytes = 0
        self._counts = dict.fromkeys(("hits", "misses", "puts", "evictions", "spills", "dropped"), 0)

    def _evict_one(self) -> None:
        key, tensors = self._blocks.popitem(last=False)
        self._bytes -= self._sizes.pop(key)
        self._counts["evictions"] += 1
        self._pass_down(key, tensors)

    def _pass_down(self, key: bytes, tensors: Block) -> None:
        if self.next_tier is None:
            self._counts["dropped"] += 1
            return
        self.next_tier.put(key, tensors)
        self._counts["spills"] += 1

    def _insert(self, key: bytes, tensors: Block) -> None:
        """Insert tensors the tier may own (already CPU copies), evicting the LRU blocks to make room."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        size = block_nbytes(tensors)
        self._counts["puts"] += 1
        if size > self.capacity_bytes:  # would never fit: goes straight to the next tier
            self._pass_down(key, tensors)
            return
        while self._blocks and self._bytes + size > self.capacity_bytes:
            self._evict_one()
        self._blocks[key] = tensors
        self._sizes[key] = size
        self._bytes += size

    def put(self, block_hash: bytes, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store a CPU copy of a block as the most recent; a present hash only refreshes its recency.

        Parameters
        ----------
        block_hash : bytes
            The block's hash.
        tensors : mapping of str to torch.Tensor
            The block's KV content (any device); copied, so the caller may reuse its memory.
        """
        key = check_hash(block_hash)
        check_block(tensors)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        self._insert(key, cpu_copy(tensors))

    def get(self, block_hash: bytes) -> Block | None:
        """The block's tensors (shared with the tier: do not modify them in place), or None; a hit becomes
        the most recent."""
        key = check_hash(block_hash)
        tensors = self._blocks.get(key)
        if tensors is None:
            self._counts["misses"] += 1
            return None
        self._blocks.move_to_end(key)
        self._counts["hits"] += 1
        return dict(tensors)

    def flush(self) -> int:
        """Write every held block to the next tier (keeping it in memory); return how many were written.

        Used at shutdown so that a restart finds the whole prefix cache on disk. Without a next tier, nothing.
        """
        if self.next_tier is None:
            return 0
        for key, tensors in self._blocks.items():
            self.next_tier.put(key, tensors)
        return len(self._blocks)

    def pop(self, block_hash: bytes) -> Block | None:
        """Remove a block without writing it to the next tier; return its tensors or None."""
        key = check_hash(block_hash)
        tensors = self._blocks.pop(key, None)
        if tensors is not None:
            self._bytes -= self._sizes.pop(key)
        return tensors

    def contains(self, block_hash: bytes) -> bool:
        """Whether the block is held in memory (does not change recency)."""
        return check_hash(block_hash) in self._blocks

    def __contains__(self, block_hash: object) -> bool:
        return isinstance(block_hash, (bytes, bytearray)) and bytes(block_hash) in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self) -> list[bytes]:
        """The held hashes, least recently used first."""
        return list(self._blocks)

    def nbytes(self) -> int:
        """Sum of ``nbytes`` of the tensors held."""
        return self._bytes

    def metrics(self) -> dict[str, int]:
        """Counters: hits, misses, puts, evictions, spills (written to the next tier), dropped (no next
        tier), plus the current ``bytes`` and ``blocks``."""
        return {**self._counts, "bytes": self._bytes, "blocks": len(self._blocks)}

    def __repr__(self) -> str:
        return f"HostTier(blocks={len(self)}, bytes={self._bytes}, capacity_bytes={self.capacity_bytes})"
