"""Serving-engine foundations: paged KV block bookkeeping with a hash-chain prefix cache, an iteration-level
scheduler (continuous batching, chunked prefill, preemption by recompute), the paged KV tensor pool with
attention over block tables, host/disk tiers for evicted prefix blocks, and the model runner (one packed forward
per step over paged KV); :class:`Engine` ties them together. ``docs/engine-design.md`` walks through the modules.
The workloads ``kvstack engine-bench`` replays, and the replay itself, belong to the bench
(:mod:`kvstack.bench.workload`, :mod:`kvstack.bench.engine_replay`)."""

from kvstack.engine.batch import ScheduledBatch, ScheduledSequence
from kvstack.engine.block_pool import BlockPool, BlockStateError, OutOfBlocksError
from kvstack.engine.blocks import BlockManager, CopyOnWrite
from kvstack.engine.engine import Engine, default_namespace
from kvstack.engine.latent_pool import PagedLatentPool
from kvstack.engine.outputs import RequestOutput, RequestTiming
from kvstack.engine.paged import BYTES_PER_MB, PagedKVPool
from kvstack.engine.paged_attention import paged_attention, paged_attention_packed
from kvstack.engine.prefix_hash import block_hash
from kvstack.engine.runner import ATTENTION_NAME, ModelRunner, PagedBatchCache, PagedCacheLayer, SequenceChunk
from kvstack.engine.sampling import SamplingParams
from kvstack.engine.scheduler import DEFAULT_MAX_WAITING_STEPS, SCHEDULING_POLICIES, Scheduler
from kvstack.engine.sequence import FinishReason, Request, Sequence, SequenceStatus
from kvstack.engine.tiers import DiskTier, HostTier, TieredStore, TierError

__all__ = [
    "ATTENTION_NAME",
    "BYTES_PER_MB",
    "DEFAULT_MAX_WAITING_STEPS",
    "SCHEDULING_POLICIES",
    "BlockManager",
    "BlockPool",
    "BlockStateError",
    "CopyOnWrite",
    "DiskTier",
    "Engine",
    "FinishReason",
    "HostTier",
    "ModelRunner",
    "OutOfBlocksError",
    "PagedBatchCache",
    "PagedCacheLayer",
    "PagedKVPool",
    "PagedLatentPool",
    "Request",
    "RequestOutput",
    "RequestTiming",
    "SamplingParams",
    "ScheduledBatch",
    "ScheduledSequence",
    "Scheduler",
    "Sequence",
    "SequenceChunk",
    "SequenceStatus",
    "TierError",
    "TieredStore",
    "block_hash",
    "default_namespace",
    "paged_attention",
    "paged_attention_packed",
]
