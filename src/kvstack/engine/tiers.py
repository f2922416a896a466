"""The storage tiers for evicted prefix-cache blocks: :class:`TieredStore`, host memory over local disk.

When the device pool evicts a cached block its KV goes down to the host tier (:mod:`kvstack.engine.host_tier`),
which spills to the disk tier (:mod:`kvstack.engine.disk_tier`); a later prefix hit loads it back instead of
recomputing it. Design, file format and limitations: ``docs/engine-design.md`` (section "Storage tiers").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

import torch

from kvstack.engine.disk_tier import DiskTier
from kvstack.engine.host_tier import HostTier
from kvstack.engine.tier_blocks import Block, TierError, check_hash

__all__ = [
    "DiskTier",
    "HostTier",
    "TierError",
    "TieredStore",
]


class TieredStore:
    """Host tier over an optional disk tier, with background prefetch from disk.

    Parameters
    ----------
    host : HostTier
        The memory tier; its ``next_tier`` must be ``disk`` (both None is allowed).
    disk : DiskTier or None
        The disk tier, or None for memory only.

    Raises
    ------
    TierError
        If ``host.next_tier`` is not ``disk``.
    """

    def __init__(self, host: HostTier, disk: DiskTier | None) -> None:
        if not isinstance(host, HostTier):
            raise TierError(f"TieredStore host must be a HostTier, got {type(host).__name__}")
        if host.next_tier is not disk:
            raise TierError(
                "TieredStore needs host.next_tier to be the disk tier it is given; "
                "build HostTier(capacity, next_tier=disk)"
            )
        self.host = host
        self.disk = disk
        self._executor: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstack-prefetch") if disk is not None else None
        )
        self._pending: dict[bytes, Future[Block | None]] = {}
        self._closed = False
        self._counts = dict.fromkeys(("host_hits", "disk_hits", "misses", "prefetched", "prefetch_hits"), 0)

    def put(self, block_hash: bytes, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store a block in the host tier (copied to CPU); older blocks spill to disk as needed."""
        self.host.put(block_hash, tensors)

    def get(self, block_hash: bytes) -> Block | None:
        """The block from host, else from disk (waiting for its prefetch if one is running), else None.

        A disk hit is promoted to the host tier as the most recent block.
        """
        key = check_hash(block_hash)
        future = self._pending.pop(key, None)
        tensors = self.host.get(key)
        if tensors is not None:
            if future is not None:
                future.cancel()
            self._counts["host_hits"] += 1
            return tensors
        if self.disk is None:
            self._counts["misses"] += 1
            return None
        if future is not None and not future.cancelled():
            tensors = future.result()
            if tensors is not None:
                self._counts["prefetch_hits"] += 1
        else:
            tensors = self.disk.get(key)
        if tensors is None:
            self._counts["misses"] += 1
            return None
        self._counts["disk_hits"] += 1
        self.host._insert(key, tensors)  # fresh CPU tensors from the file: no copy needed
        return dict(tensors)

    def prefetch(self, block_hashes: Iterable[bytes]) -> int:
        """Start reading disk-resident blocks on the background thread; return how many were scheduled.

        Hashes already in host memory, already being prefetched, or not on disk are skipped.

        Raises
        ------
        TierError
            If the store is closed.
        """
        if self._closed:
            raise TierError("TieredStore is closed; create a new one to prefetch")
        if self._executor is None or self.disk is None:
            return 0
        scheduled = 0
        for block_hash in block_hashes:
            key = check_hash(block_hash)
            if key in self._pending or self.host.contains(key) or not self.disk.contains(key):
                continue
            self._pending[key] = self._executor.submit(self.disk.get, key)
            scheduled += 1
        self._counts["prefetched"] += scheduled
        return scheduled

    def cancel_prefetch(self) -> None:
        """Forget every pending prefetch (those already running finish in the background)."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def contains(self, block_hash: bytes) -> bool:
        """Whether the block is in host memory or indexed on disk."""
        return self.host.contains(block_hash) or (self.disk is not None and self.disk.contains(block_hash))

    def metrics(self) -> dict[str, int]:
        """Counters: host_hits, disk_hits, misses, prefetched, prefetch_hits, spills (host -> disk),
        corrupt (disk files detected and deleted), host_bytes, disk_bytes."""
        disk = self.disk.metrics() if self.disk is not None else {"corrupt": 0, "bytes": 0}
        host = self.host.metrics()
        return {
            **self._counts,
            "spills": host["spills"],
            "corrupt": disk["corrupt"],
            "host_bytes": host["bytes"],
            "disk_bytes": disk["bytes"],
        }

    def flush(self) -> int:
        """Write every host-resident block to the disk tier (see :meth:`HostTier.flush`); return the count."""
        return self.host.flush()

    def close(self) -> None:
        """Cancel pending prefetches and shut the background thread down; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self.cancel_prefetch()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
