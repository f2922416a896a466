"""Serving-engine foundations: paged KV block bookkeeping with a hash-chain prefix cache, an iteration-level
scheduler (continuous batching, chunked prefill, preemption by recompute), the paged KV tensor pool with
attention over block tables, and host/disk tiers for evicted prefix blocks. The runner that drives a model
through them comes next."""

from kvstack.engine.blocks import (
    BlockManager,
    BlockPool,
    BlockStateError,
    CopyOnWrite,
    OutOfBlocksError,
    block_hash,
)
from kvstack.engine.paged import BYTES_PER_MB, PagedKVPool, paged_attention
from kvstack.engine.scheduler import (
    DEFAULT_MAX_WAITING_STEPS,
    SCHEDULING_POLICIES,
    FinishReason,
    Request,
    ScheduledBatch,
    ScheduledSequence,
    Scheduler,
    Sequence,
    SequenceStatus,
)
from kvstack.engine.tiers import DiskTier, HostTier, TieredStore, TierError

__all__ = [
    "BYTES_PER_MB",
    "DEFAULT_MAX_WAITING_STEPS",
    "SCHEDULING_POLICIES",
    "BlockManager",
    "BlockPool",
    "BlockStateError",
    "CopyOnWrite",
    "DiskTier",
    "FinishReason",
    "HostTier",
    "OutOfBlocksError",
    "PagedKVPool",
    "Request",
    "ScheduledBatch",
    "ScheduledSequence",
    "Scheduler",
    "Sequence",
    "SequenceStatus",
    "TierError",
    "TieredStore",
    "block_hash",
    "paged_attention",
]
