"""Serving-engine foundations: paged KV block bookkeeping with a hash-chain prefix cache and an iteration-level
scheduler (continuous batching, chunked prefill, preemption by recompute); no tensors."""

from kvstack.engine.blocks import (
    BlockManager,
    BlockPool,
    BlockStateError,
    CopyOnWrite,
    OutOfBlocksError,
    block_hash,
)
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
    "Request",
    "ScheduledBatch",
    "ScheduledSequence",
    "Scheduler",
    "Sequence",
    "SequenceStatus",
    "TierError",
    "TieredStore",
    "block_hash",
]
