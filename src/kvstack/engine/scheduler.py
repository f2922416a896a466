"""The iteration-level scheduler: which sequences run each step, and how many tokens of each.

Continuous batching, chunked prefill, prefix-aware admission (``fcfs`` / ``lpm``) and preemption by recompute,
over a :class:`~kvstack.engine.blocks.BlockManager`; pure bookkeeping, no tensors. Design, fairness argument
and limitations: ``docs/engine-design.md`` (section "Scheduler").
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Hashable, Mapping

from kvstack.engine.admission import admission_fits, admission_order, append_blocks_needed, queue_order
from kvstack.engine.batch import ScheduledBatch, ScheduledSequence, StepPlan, checked_forks_of, sampled_tokens
from kvstack.engine.blocks import BlockManager, CopyOnWrite, OutOfBlocksError
from kvstack.engine.sequence import FinishReason, Request, Sequence, SequenceStatus, is_prefill
from kvstack.errors import KVStackError

__all__ = [
    "DEFAULT_MAX_WAITING_STEPS",
    "SCHEDULING_POLICIES",
    "ScheduledBatch",
    "ScheduledSequence",
    "Scheduler",
]

SCHEDULING_POLICIES: tuple[str, ...] = ("fcfs", "lpm")
DEFAULT_MAX_WAITING_STEPS = 64


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVStackError(f"{name} must be a positive integer, got {value!r}")
    return value


class Scheduler:
    """Continuous-batching scheduler with chunked prefill, prefix-aware admission and preemption by recompute.

    Parameters
    ----------
    block_manager : BlockManager
        Owns the KV blocks; the scheduler allocates and frees sequences keyed by request id. Do not allocate
        those ids behind the scheduler's back.
    max_num_batched_tokens : int, optional
        Token budget of one step (decodes count 1 each).
    max_num_seqs : int, optional
        Maximum number of running sequences.
    policy : {"fcfs", "lpm"}, optional
        Admission order (see ``docs/engine-design.md``).
    max_waiting_steps : int or None, optional
        Under ``"lpm"``, a sequence that waited this many steps is admitted first (default 64).

    Raises
    ------
    KVStackError
        On an unknown policy or a non-positive limit.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 64,
        policy: str = "fcfs",
        max_waiting_steps: int | None = None,
    ) -> None:
        if not isinstance(block_manager, BlockManager):
            raise KVStackError(f"block_manager must be a BlockManager, got {type(block_manager).__name__}")
        if policy not in SCHEDULING_POLICIES:
            raise KVStackError(f"unknown scheduling policy {policy!r}; choose one of {', '.join(SCHEDULING_POLICIES)}")
        self._block_manager = block_manager
        self._max_num_batched_tokens = _positive_int(max_num_batched_tokens, "max_num_batched_tokens")
        self._max_num_seqs = _positive_int(max_num_seqs, "max_num_seqs")
        self._policy = policy
        self._max_waiting_steps = (
            DEFAULT_MAX_WAITING_STEPS
            if max_waiting_steps is None
            else _positive_int(max_waiting_steps, "max_waiting_steps")
        )
        self._sequences: dict[Hashable, Sequence] = {}
        self._waiting: list[Sequence] = []  # requeued (preempted) ones at the front
        self._running: list[Sequence] = []  # sorted by arrival key, oldest first
        self._finished: list[Sequence] = []
        self._unwritten: set[int] = set()  # blocks whose KV is not (fully) computed
        self._pending: ScheduledBatch | None = None
        self._num_added = 0
        self._num_steps = 0
        self._num_preemptions = 0
        self._num_batched_tokens_total = 0

    # ------------------------------------------------------------------ properties
    @property
    def block_manager(self) -> BlockManager:
        """The block manager the scheduler allocates from."""
        return self._block_manager

    @property
    def policy(self) -> str:
        """The admission policy."""
        return self._policy

    @property
    def max_num_batched_tokens(self) -> int:
        """Token budget of one step."""
        return self._max_num_batched_tokens

    @property
    def max_num_seqs(self) -> int:
        """Maximum number of running sequences."""
        return self._max_num_seqs

    @property
    def max_waiting_steps(self) -> int:
        """Aging threshold of the ``"lpm"`` policy, in steps."""
        return self._max_waiting_steps

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for admission."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding KV blocks."""
        return len(self._running)

    @property
    def num_steps(self) -> int:
        """Calls to :meth:`schedule` so far."""
        return self._num_steps

    def __contains__(self, request_id: object) -> bool:
        """Whether ``request_id`` is a known request (waiting, running or finished and not cleared)."""
        return request_id in self._sequences

    @property
    def pending_batch(self) -> ScheduledBatch | None:
        """The batch returned by the last :meth:`schedule` and not yet reported with :meth:`update` (None)."""
        return self._pending

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self._waiting or self._running)

    def get_sequence(self, request_id: Hashable) -> Sequence:
        """The state of ``request_id`` (waiting, running or finished and not cleared).

        Raises
        ------
        KVStackError
            If the id is unknown.
        """
        seq = self._sequences.get(request_id)
        if seq is None:
            raise KVStackError(f"unknown request {request_id!r}; add_request() it first (or it was cleared)")
        return seq

    def is_computed(self, block_id: int) -> bool:
        """Whether block ``block_id`` holds KV computed by the model (False while a chunk still has to write it).

        The engine offloads a cached block to the storage tiers only when this holds: a block registered at
        allocation whose sequence was preempted or aborted mid-prefill holds no valid KV.
        """
        return block_id not in self._unwritten

    def waiting_request_ids(self) -> list[Hashable]:
        """Waiting request ids in queue order: preempted ones first, then by arrival (not the LPM order)."""
        return [s.request_id for s in queue_order(self._waiting)]

    def running_request_ids(self) -> list[Hashable]:
        """Running request ids, oldest arrival first."""
        return [s.request_id for s in self._running]

    def finished(self, *, clear: bool = False) -> list[Sequence]:
        """Finished sequences (tokens in ``token_ids`` / ``output_token_ids``, reason in ``finish_reason``).

        Parameters
        ----------
        clear : bool, optional
            Forget them afterwards (their ids become unknown and reusable).

        Returns
        -------
        list of Sequence
            In the order they finished.
        """
        done = list(self._finished)
        if clear:
            for seq in done:
                del self._sequences[seq.request_id]
            self._finished.clear()
        return done

    def forget(self, request_id: Hashable) -> None:
        """Drop a finished request (its id becomes unknown); a long-running server does it once reported.

        Raises
        ------
        KVStackError
            If the id is unknown or the request has not finished.
        """
        seq = self.get_sequence(request_id)
        if not seq.is_finished:
            raise KVStackError(f"request {request_id!r} is {seq.status.value}; only a finished request can be "
                               "forgotten (abort it first)")
        del self._sequences[request_id]
        self._finished.remove(seq)

    def metrics(self) -> dict[str, float | int]:
        """Scheduler counters plus the block manager's :meth:`~kvstack.engine.blocks.BlockManager.metrics`.

        Returns
        -------
        dict
            ``steps``, ``preemptions``, ``num_waiting``, ``num_running``, ``num_finished``,
            ``batched_tokens_total`` and every block-manager metric.
        """
        return {
            "steps": self._num_steps,
            "preemptions": self._num_preemptions,
            "num_waiting": len(self._waiting),
            "num_running": len(self._running),
            "num_finished": len(self._finished),
            "batched_tokens_total": self._num_batched_tokens_total,
            **self._block_manager.metrics(),
        }

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> Sequence:
        """Queue a request for admission.

        Parameters
        ----------
        request : Request
            A request with a new id.

        Returns
        -------
        Sequence
            Its scheduling state (WAITING).

        Raises
        ------
        KVStackError
            If the id is already known, or the prompt plus ``max_new_tokens`` needs more KV blocks than the
            whole pool (it could never run); nothing is changed.
        """
        if not isinstance(request, Request):
            raise KVStackError(f"add_request() takes a Request, got {type(request).__name__}")
        request_id = request.request_id
        if request_id in self._sequences:
            status = self._sequences[request_id].status.value
            raise KVStackError(f"request {request_id!r} already exists ({status}); use a new request_id")
        if request_id in self._block_manager:
            raise KVStackError(f"request id {request_id!r} is already a sequence of the block manager; use a new id")
        pool = self._block_manager.pool
        # The last generated token's KV is never stored (generation ends with it), as the context check counts.
        stored_tokens = len(request.prompt_token_ids) + request.max_new_tokens - 1
        needed = -(-stored_tokens // pool.block_size)
        # n samples share the prompt's blocks but each needs its own output blocks (and last prompt block).
        needed += (request.n - 1) * (-(-request.max_new_tokens // pool.block_size) + 1)
        if needed > pool.num_blocks:
            raise KVStackError(
                f"request {request_id!r} can never fit: its {len(request.prompt_token_ids)} prompt tokens plus "
                f"max_new_tokens={request.max_new_tokens} need {needed} KV blocks but the pool has only "
                f"{pool.num_blocks}; shorten the request or use a larger num_blocks"
            )
        seq = Sequence(request=request, order=self._num_added, waiting_since_step=self._num_steps)
        self._num_added += 1
        self._sequences[request_id] = seq
        self._waiting.append(seq)
        return seq

    def abort(self, request_id: Hashable) -> bool:
        """Abort a request wherever it is, freeing its KV blocks; it finishes with reason ABORTED.

        A request in the batch returned by the last :meth:`schedule` keeps its blocks until :meth:`update`
        (the runner may be writing into them) and is finished there, its sampled token discarded.

        Parameters
        ----------
        request_id : hashable
            A known request.

        Returns
        -------
        bool
            True if it was aborted (or will be at the next update), False if it had already finished.

        Raises
        ------
        KVStackError
            If the id is unknown.
        """
        return self._end(request_id, FinishReason.ABORTED)

    def fail(self, request_id: Hashable) -> bool:
        """Finish a request with reason ERROR, freeing its KV blocks: the step that ran it raised.

        As :meth:`abort`, but a request of the pending batch is finished at :meth:`update` without its chunk
        counted as computed: the blocks it was writing are never trusted by the prefix cache.

        Returns
        -------
        bool
            True if it was failed (or will be at the next update), False if it had already finished.

        Raises
        ------
        KVStackError
            If the id is unknown.
        """
        return self._end(request_id, FinishReason.ERROR)

    def _end(self, request_id: Hashable, reason: FinishReason) -> bool:
        """Abort or fail a request wherever it is (see :meth:`abort`)."""
        seq = self._sequences.get(request_id)
        if seq is None:
            raise KVStackError(f"cannot {'abort' if reason is FinishReason.ABORTED else 'fail'} unknown request "
                               f"{request_id!r}; give a waiting or running request")
        if seq.is_finished:
            return False
        if seq.status is SequenceStatus.RUNNING:
            if self._pending is not None and request_id in self._pending.request_ids():
                if seq._finish_requested is not FinishReason.ERROR:  # a failure outranks an abort
                    seq._finish_requested = reason
                return True
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._finish(seq, reason)
        return True

    def stop(self, request_id: Hashable) -> bool:
        """Finish a running request now with reason STOP (the engine found a stop string in its output).

        Call it between steps (after :meth:`update`); its blocks are freed.

        Returns
        -------
        bool
            True if it was stopped, False if it had already finished.

        Raises
        ------
        KVStackError
            If the id is unknown, a batch is pending, or the request is still waiting.
        """
        seq = self.get_sequence(request_id)
        if seq.is_finished:
            return False
        if self._pending is not None:
            raise KVStackError("stop() cannot run while a batch is pending; call it after update()")
        if seq.status is not SequenceStatus.RUNNING:
            raise KVStackError(f"only a running request can be stopped; {request_id!r} is {seq.status.value}")
        self._running.remove(seq)
        self._finish(seq, FinishReason.STOP)
        return True

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch:
        """Choose this step's batch (decodes, prefill chunks, admissions), preempting if memory runs out.

        Returns
        -------
        ScheduledBatch
            Pass the model's outputs for it to :meth:`update` before the next call.

        Raises
        ------
        KVStackError
            If the previous non-empty batch was not reported with :meth:`update`.
        """
        if self._pending is not None:
            raise KVStackError(
                f"schedule() called again before update() for step {self._pending.step}; "
                "report that batch's outputs with update() first"
            )
        self._num_steps += 1
        plan = StepPlan(budget=self._max_num_batched_tokens)
        self._schedule_running(plan)
        if not plan.preempted:  # no admission in a step that preempted: memory is short
            self._admit_waiting(plan)
        return self._close_step(plan)

    def _schedule_running(self, plan: StepPlan) -> None:
        """Steps 1 and 2: decodes, then prefill chunks of running sequences, each group oldest first."""
        decodes = [s for s in self._running if not is_prefill(s)]
        prefills = [s for s in self._running if is_prefill(s)]
        for seq in decodes + prefills:
            if plan.budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, plan.budget)
            need = append_blocks_needed(self._block_manager, seq, num_tokens)
            self._preempt_until_fits(plan, seq, need)
            if seq.status is not SequenceStatus.RUNNING:
                continue
            plan.add(ScheduledSequence(seq.request_id, num_tokens, is_prefill(seq)), need)

    def _preempt_until_fits(self, plan: StepPlan, seq: Sequence, need: int) -> None:
        """Preempt the most recently arrived running sequences until ``need`` more blocks fit (or ``seq`` itself
        was preempted)."""
        pool = self._block_manager.pool
        while need and pool.num_available - plan.reserved < need:
            victim = self._running[-1]  # most recently arrived
            if victim.request_id in plan.entries:
                plan.drop(victim.request_id)
            self._preempt(victim)
            plan.preempted.append(victim.request_id)
            if victim is seq:
                break

    def _admit_waiting(self, plan: StepPlan) -> None:
        """Step 3: admit waiting sequences in policy order until one does not fit (nobody skips ahead of it)."""
        block_size = self._block_manager.block_size
        # Blocks fully computed by the chunks already in this batch count as computed for later entries.
        computed_this_step: set[int] = set()
        for entry, _ in plan.entries.values():
            seq = self._sequences[entry.request_id]
            table = self._block_manager.block_table(seq.request_id)
            start = seq.num_computed_tokens - seq.num_evicted  # slots
            stop = start + entry.num_tokens
            computed_this_step.update(table[start // block_size : stop // block_size])
        order = admission_order(self._waiting, self._policy, self._num_steps - 1, self._max_waiting_steps,
                                self._block_manager)
        for seq in order:
            if plan.budget == 0 or len(self._running) >= self._max_num_seqs:
                break
            if not self._admit(seq, plan, computed_this_step):
                break  # head of the queue does not fit: nobody skips ahead of it

    def _admit(self, seq: Sequence, plan: StepPlan, computed_this_step: set[int]) -> bool:
        """Allocate ``seq``'s prompt, make it running and schedule its first chunk; False if it does not fit."""
        if not admission_fits(self._block_manager, seq, plan.budget, plan.reserved):
            return False
        block_size = self._block_manager.block_size
        try:
            cached = self._block_manager.allocate_prompt(seq.request_id, seq.token_ids)
        except OutOfBlocksError:  # pragma: no cover - the check above is conservative
            return False
        table = self._block_manager.block_table(seq.request_id)
        self._unwritten.difference_update(self._block_manager.last_loaded_blocks)  # loaded from a tier
        usable_blocks = cached // block_size
        for index in range(usable_blocks):  # a cached block whose KV is not computed yet ends the usable prefix
            if table[index] in self._unwritten and table[index] not in computed_this_step:
                usable_blocks = index
                break
        seq.num_computed_tokens = usable_blocks * block_size
        self._unwritten.update(table[usable_blocks:])
        self._waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        seq._requeued = False
        bisect.insort(self._running, seq, key=lambda s: s.arrival_key)
        num_tokens = min(seq.num_tokens - seq.num_computed_tokens, plan.budget)
        plan.add(ScheduledSequence(seq.request_id, num_tokens, is_prefill(seq)),
                 append_blocks_needed(self._block_manager, seq, num_tokens))
        computed_this_step.update(table[usable_blocks : (seq.num_computed_tokens + num_tokens) // block_size])
        return True

    def _close_step(self, plan: StepPlan) -> ScheduledBatch:
        """The batch of a finished plan; it stays pending until :meth:`update` when not empty."""
        step = self._num_steps
        scheduled = tuple(entry for entry, _ in plan.entries.values())
        for entry in scheduled:
            seq = self._sequences[entry.request_id]
            if seq.first_scheduled_step is None:
                seq.first_scheduled_step = step
        num_batched = self._max_num_batched_tokens - plan.budget
        self._num_batched_tokens_total += num_batched
        batch = ScheduledBatch(
            scheduled=scheduled, preempted=tuple(plan.preempted), num_batched_tokens=num_batched, step=step
        )
        self._pending = batch if scheduled else None
        return batch

    def update(
        self,
        outputs: Mapping[Hashable, int | None],
        forks: Mapping[Hashable, list[tuple[Hashable, int]]] | None = None,
    ) -> list[CopyOnWrite]:
        """Record that the model ran the last batch: advance computed tokens, append or finish on sampled tokens.

        Parameters
        ----------
        outputs : mapping of request id to int or None
            For every scheduled sequence whose chunk completed its tokens, the sampled token; None (or no
            key) for a prefill chunk that leaves tokens to compute. Outputs of requests aborted meanwhile are
            ignored.
        forks : mapping of request id to list of (child id, token), optional
            For a request with ``n > 1`` whose prompt this step completed: its ``n - 1`` children, each with
            its own first token (sampled from the same logits). Each child shares the parent's blocks; its
            first token's slot is copied on write. Children are new running sequences with the parent's
            request (same prompt, limits and arrival) and ``parent_id`` set.

        Returns
        -------
        list of CopyOnWrite
            Block copies the runner must perform before writing the appended tokens' KV (only after fork).

        Raises
        ------
        KVStackError
            If an id was not scheduled, a completing chunk has no token, a non-completing chunk has one, or a
            token is not an integer; nothing is changed and the batch stays pending.
        """
        batch = self._pending
        if batch is None:
            if outputs:
                raise KVStackError("update() got outputs but no batch is pending; call schedule() first")
            return []
        tokens = sampled_tokens(batch, outputs, self._sequences)
        checked_forks = checked_forks_of(forks or {}, tokens, self._sequences, self._block_manager)
        self._pending = None
        copies: list[CopyOnWrite] = []
        for entry in batch.scheduled:
            copies.extend(self._advance(entry, tokens.get(entry.request_id), checked_forks.get(entry.request_id, [])))
        return copies

    def _advance(
        self, entry: ScheduledSequence, token: int | None, children: list[tuple[Hashable, int]]
    ) -> list[CopyOnWrite]:
        """Apply one entry of the batch: its chunk is computed; fork, append ``token`` or finish."""
        block_size = self._block_manager.block_size
        seq = self._sequences[entry.request_id]
        if seq._finish_requested is FinishReason.ERROR:  # its KV may be half written: its blocks stay unwritten
            self._running.remove(seq)
            self._finish(seq, FinishReason.ERROR)
            return []
        start = seq.num_computed_tokens - seq.num_evicted  # slots
        seq.num_computed_tokens += entry.num_tokens
        table = self._block_manager.block_table(seq.request_id)
        self._unwritten.difference_update(table[start // block_size : (start + entry.num_tokens) // block_size])
        if seq._finish_requested is FinishReason.ABORTED:
            self._running.remove(seq)
            self._finish(seq, FinishReason.ABORTED)
            return []
        if token is None:
            return []
        copies: list[CopyOnWrite] = []
        for child_id, child_token in children:
            copies.extend(self._fork(seq, child_id, int(child_token)))
        seq.output_token_ids.append(token)
        if token in seq.request.eos_token_ids:
            self._running.remove(seq)
            self._finish(seq, FinishReason.EOS)
        elif len(seq.output_token_ids) >= seq.request.max_new_tokens:
            self._running.remove(seq)
            self._finish(seq, FinishReason.LENGTH)
        else:
            try:
                copy = self._block_manager.append_token(seq.request_id, token)
            except OutOfBlocksError:  # its forks took the last blocks: recomputed later, as if preempted
                self._preempt(seq)
                return copies
            if copy is not None:
                copies.append(copy)
            table = self._block_manager.block_table(seq.request_id)
            self._unwritten.update(table[(seq.num_computed_tokens - seq.num_evicted) // block_size :])
        return copies

    def compact(self, request_id: Hashable, kept: int, copy: Callable[[list[int], list[int]], None]) -> int:
        """Evict computed KV of a running sequence: keep ``kept`` of its computed slots, in fresh blocks.

        Wraps :meth:`~kvstack.engine.blocks.BlockManager.compact` (``copy(old_table, new_table)`` writes the
        kept entries into the first ``kept`` slots of the new table) and records the eviction in
        :attr:`Sequence.num_evicted`. Call it between steps (after :meth:`update`).

        Returns
        -------
        int
            Blocks released.

        Raises
        ------
        KVStackError
            If the request is not running, a batch is pending, or ``kept`` is not in ``0 ..`` its computed slots.
        OutOfBlocksError
            If the new blocks do not fit; nothing is changed.
        """
        if self._pending is not None:
            raise KVStackError("compact() cannot run while a batch is pending; call it after update()")
        seq = self.get_sequence(request_id)
        if seq.status is not SequenceStatus.RUNNING:
            raise KVStackError(f"only a running request can be compacted; {request_id!r} is {seq.status.value}")
        computed = seq.num_computed_tokens - seq.num_evicted
        freed = self._block_manager.compact(request_id, computed, kept, copy)
        new_table = self._block_manager.block_table(request_id)
        # The old blocks keep their marks: one registered in the prefix cache before its KV was computed (a
        # prompt compacted mid-prefill) must stay untrusted for the next prompt that hits it.
        first_pending_block = kept // self._block_manager.block_size
        if self._block_manager.num_tokens(request_id) > kept:  # slots recorded but not computed yet
            self._unwritten.difference_update(new_table[:first_pending_block])
            self._unwritten.update(new_table[first_pending_block:])
        else:
            self._unwritten.difference_update(new_table)
        seq.num_evicted += computed - kept
        return freed

    # ------------------------------------------------------------------ helpers
    def _fork(self, parent: Sequence, child_id: Hashable, token: int) -> list[CopyOnWrite]:
        """A child of ``parent`` (prompt just computed) starting with ``token``; returns its copy-on-write."""
        request = dataclasses.replace(parent.request, request_id=child_id, n=1)
        child = Sequence(request=request, order=parent.order, status=SequenceStatus.RUNNING,
                         num_computed_tokens=parent.num_computed_tokens, num_evicted=parent.num_evicted,
                         parent_id=parent.request_id, first_scheduled_step=parent.first_scheduled_step,
                         waiting_since_step=parent.waiting_since_step)
        self._sequences[child_id] = child
        child.output_token_ids.append(token)
        if token in request.eos_token_ids or request.max_new_tokens == 1:
            reason = FinishReason.EOS if token in request.eos_token_ids else FinishReason.LENGTH
            self._finish(child, reason)  # never held a block
            return []
        self._block_manager.fork(parent.request_id, child_id)
        try:
            copy = self._block_manager.append_token(child_id, token)
        except OutOfBlocksError:  # no block for its first token: it waits and is recomputed, as if preempted
            self._block_manager.free(child_id)
            self._requeue(child)
            return []
        bisect.insort(self._running, child, key=lambda s: s.arrival_key)
        first_pending_slot = child.num_computed_tokens - child.num_evicted
        table = self._block_manager.block_table(child_id)
        self._unwritten.update(table[first_pending_slot // self._block_manager.block_size :])
        return [] if copy is None else [copy]

    def _preempt(self, seq: Sequence) -> None:
        self._block_manager.free(seq.request_id)
        self._running.remove(seq)
        seq.num_preemptions += 1
        self._num_preemptions += 1
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Put a sequence that holds no blocks at the head of the queue, to be recomputed from its tokens."""
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_evicted = 0
        seq.waiting_since_step = self._num_steps
        seq._requeued = True
        self._waiting.insert(0, seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.request_id in self._block_manager:
            self._block_manager.free(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_step = self._num_steps
        seq._finish_requested = None
        self._finished.append(seq)
