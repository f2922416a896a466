"""Admission of waiting sequences: the policy order (``fcfs``, ``lpm`` with aging) and the memory checks.

Functions of the waiting queue and the :class:`~kvstack.engine.blocks.BlockManager`; the
:class:`~kvstack.engine.scheduler.Scheduler` calls them. ``docs/engine-design.md`` (section "Scheduler")
explains the policies.
"""

from __future__ import annotations

from kvstack.engine.blocks import BlockManager
from kvstack.engine.sequence import Sequence, forks_now, token_will_be_appended

__all__ = ["admission_fits", "admission_order", "append_blocks_needed", "queue_order"]


def queue_order(waiting: list[Sequence]) -> list[Sequence]:
    """The waiting queue in FCFS order: preempted sequences first (in queue order), then by arrival."""
    requeued = [s for s in waiting if s._requeued]
    rest = sorted((s for s in waiting if not s._requeued), key=lambda s: s.arrival_key)
    return requeued + rest


def admission_order(
    waiting: list[Sequence], policy: str, steps_done: int, max_waiting_steps: int, manager: BlockManager
) -> list[Sequence]:
    """The order in which waiting sequences are admitted in the current step.

    ``fcfs``: :func:`queue_order`. ``lpm``: preempted sequences first, then those that waited at least
    ``max_waiting_steps`` of the ``steps_done`` steps before this one (aging), then the rest by most prompt
    tokens in the prefix cache, ties by arrival.
    """
    queue = queue_order(waiting)
    if policy == "fcfs":
        return queue
    requeued = [s for s in queue if s._requeued]
    rest = [s for s in queue if not s._requeued]
    aged = [s for s in rest if steps_done - s.waiting_since_step >= max_waiting_steps]
    aged_ids = {id(s) for s in aged}
    others = [s for s in rest if id(s) not in aged_ids]
    hits = {id(s): manager.cached_prefix_tokens(s.token_ids) for s in others}
    others.sort(key=lambda s: (-hits[id(s)], s.arrival_key))
    return requeued + aged + others


def append_blocks_needed(manager: BlockManager, seq: Sequence, num_tokens: int) -> int:
    """Blocks the scheduler's ``update`` will allocate to append the token(s) sampled after a chunk of
    ``num_tokens`` tokens of the running ``seq``.

    One sequence: 0 or 1. A request with ``n > 1`` completing its prompt forks ``n - 1`` children that
    each append their own first token: ``n`` new blocks when the prompt fills its last block, else ``n - 1``
    copies of the shared last block.
    """
    if seq.num_computed_tokens + num_tokens < seq.num_tokens or not token_will_be_appended(seq):
        return 0
    forks = seq.request.n - 1 if forks_now(seq) else 0
    if manager.num_tokens(seq.request_id) % manager.block_size == 0:
        return 1 + forks
    return int(manager.pool.ref_count(manager.block_table(seq.request_id)[-1]) > 1) + forks


def admission_fits(manager: BlockManager, seq: Sequence, budget: int, reserved: int) -> bool:
    """Whether the waiting ``seq``'s prompt blocks, and the block its first sampled token may need, surely fit
    with ``budget`` tokens left in the step and ``reserved`` blocks already promised to the batch.

    Conservative when the prefix cache holds unreferenced blocks: a cached prefix block is counted as consumed
    if it might be one of them.
    """
    pool = manager.pool
    block_size = manager.block_size
    token_ids = seq.token_ids
    num_blocks = -(-len(token_ids) // block_size)
    hit_blocks = manager.cached_prefix_tokens(token_ids) // block_size
    # A hit taken from the LRU leaves the evictable set; assume as many of them as possible are.
    cost = num_blocks - hit_blocks + min(hit_blocks, pool.num_cached)
    may_complete = len(token_ids) - hit_blocks * block_size <= budget
    need_upper = int(may_complete and token_will_be_appended(seq) and len(token_ids) % block_size == 0)
    return cost + need_upper <= pool.num_available - reserved
