"""The bridge between the KV pool and the storage tiers: evicted cached blocks go down, prefix hits come back.

The :class:`~kvstack.engine.blocks.BlockTiers` the engine gives its block manager; ``docs/engine-design.md``
(section "Engine") describes the tiers' part in the engine.
"""

from __future__ import annotations

import os

from kvstack.engine.block_pool import BlockPool
from kvstack.engine.paged import BYTES_PER_MB, PagedKVPool
from kvstack.engine.scheduler import Scheduler
from kvstack.engine.tiers import DiskTier, HostTier, TieredStore
from kvstack.errors import KVStackError

__all__ = ["PoolTiers", "build_store"]


class PoolTiers:
    """The :class:`~kvstack.engine.blocks.BlockTiers` of an engine: KV pool blocks <-> a TieredStore."""

    def __init__(self, store: TieredStore, pool: PagedKVPool) -> None:
        self.store = store
        self.pool = pool
        self.scheduler: Scheduler | None = None  # set once built: it knows which blocks hold computed KV
        self.offloaded = 0
        self.loaded = 0

    def offload(self, block_id: int, hash_value: bytes) -> None:
        if self.scheduler is not None and self.scheduler.is_computed(block_id):
            self.store.put(hash_value, self.pool.export_block(block_id))
            self.offloaded += 1

    def contains(self, hash_value: bytes) -> bool:
        return self.store.contains(hash_value)

    def load(self, hash_value: bytes, block_id: int) -> bool:
        tensors = self.store.get(hash_value)
        if tensors is None:
            return False
        try:
            self.pool.import_block(block_id, tensors)
        except KVStackError:  # a block of another geometry or dtype under this namespace: compute instead
            return False
        self.loaded += 1
        return True

    def close(self, blocks: BlockPool) -> None:
        """Write the cached, computed blocks of ``blocks`` and the host tier down to disk (when the store has a
        disk tier), then close the store."""
        if self.store.disk is not None:
            assert self.scheduler is not None
            for block_id in blocks.cached_blocks_lru():
                key = blocks.hash_of(block_id)
                if key is not None and self.scheduler.is_computed(block_id) and not self.store.contains(key):
                    self.store.put(key, self.pool.export_block(block_id))
            self.store.flush()
        self.store.close()


def build_store(
    namespace: str, host_mb: float, disk_dir: str | os.PathLike[str] | None, disk_mb: float | None
) -> TieredStore:
    """The engine's tiered store: a host tier of ``host_mb`` MB over, with ``disk_dir``, a disk tier of ``disk_mb``
    MB (None: unbounded) in the directory of ``namespace``."""
    disk = None
    if disk_dir is not None:
        capacity = None if disk_mb is None else int(disk_mb * BYTES_PER_MB)
        disk = DiskTier(disk_dir, namespace=namespace, capacity_bytes=capacity)
    return TieredStore(HostTier(int(host_mb * BYTES_PER_MB), next_tier=disk), disk)
