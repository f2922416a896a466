"""Iteration-level scheduler (continuous batching) over a paged :class:`~kvstack.engine.blocks.BlockManager`.

Pure bookkeeping: no model, no tensors. Each engine step the caller asks :meth:`Scheduler.schedule` which
sequences to run and how many tokens of each to compute, runs the model on that batch, and reports the
sampled tokens back with :meth:`Scheduler.update`. Sequences join and leave the batch at every step
(continuous batching) instead of waiting for a whole batch to drain.

One step
--------
Every step has a token budget ``max_num_batched_tokens`` and a cap ``max_num_seqs`` on running sequences.

1. **Decodes**: running sequences whose prompt is fully computed get one token each, oldest first.
2. **Prefill chunks**: running sequences still computing their prompt get ``min(remaining, budget left)``
   tokens (chunked prefill: a prompt longer than the budget is computed over several steps and never stalls
   the decodes of the others for more than one step's budget).
3. **Admission**: waiting sequences are admitted in policy order while budget, ``max_num_seqs`` and KV
   blocks allow; admission allocates the prompt's blocks (reusing a cached prefix, whose tokens need not be
   computed) and schedules its first chunk. The first waiting sequence that does not fit ends admission for
   the step: nobody skips ahead of it. No sequence is admitted in a step that preempted one (memory is
   short; the preempted sequence keeps its place at the front of the queue).

Before a scheduled chunk that completes a sequence's tokens is accepted, the step reserves the KV block
that :meth:`Scheduler.update` will need to append the sampled token, so ``update`` never runs out of blocks.

Policies
--------
* ``"fcfs"``: arrival order (``arrival_time``, then the order of :meth:`Scheduler.add_request`).
* ``"lpm"`` (longest prefix match): the waiting sequence with the most prompt tokens already in the prefix
  cache first, ties by arrival. It raises the cache hit rate (requests sharing a warm prefix run while it is
  still cached) but can starve a request that shares nothing, so a sequence that has waited
  ``max_waiting_steps`` steps (default 64) is moved to the front regardless of its prefix (aging).
* Under both, sequences that were preempted come first (they keep the front of the queue).

Preemption
----------
When a running sequence needs a new block for its next token and none is free or evictable, the scheduler
preempts **by recompute** the **most recently arrived** running sequence (possibly the one asking): its
blocks are freed, it goes back to WAITING with ``num_computed_tokens = 0`` at the front of the waiting
queue, keeping its generated tokens, which are recomputed with the prompt on re-admission.

* Recompute rather than a separate swap space: the recompute runs as an ordinary batched prefill, and the
  full blocks the victim had registered stay in the prefix cache when it returns, making the recompute
  partly free. With the engine's storage tiers this becomes a swap of those blocks: a cached block the
  pool evicts is written to the host tier and loaded back on the victim's readmission, so only its last,
  partial block is recomputed.
* Youngest victim: it has usually done the least work, so the least is lost, and the older sequences,
  which arrived first, keep running, so preemption preserves FCFS order instead of inverting it.

Fairness
--------
:meth:`Scheduler.add_request` refuses a request whose prompt plus ``max_new_tokens`` needs more blocks than
the whole pool, so the oldest running sequence alone always fits. Since victims are taken youngest first,
the oldest running sequence is never preempted while another is running, and it is scheduled in every step
whose budget is not used up by decodes (one token each, each decode ending within ``max_new_tokens``
steps): it finishes in a bounded number of steps. Under FCFS the
head of the waiting queue is admitted as soon as it fits (nothing is admitted ahead of it), which happens
at the latest when every older sequence has finished; by induction every request finishes: no starvation,
and no request is ever dropped (a preempted one is requeued, never discarded). Under LPM, aging bounds the
time a request can be passed over to ``max_waiting_steps`` steps, after which the FCFS argument applies.

KV that is not computed yet
---------------------------
:class:`~kvstack.engine.blocks.BlockManager` registers a prompt's full blocks in the prefix cache when it
allocates them, before the model has computed their KV, and a sequence freed mid-prefill (preempted or
aborted) leaves such blocks in the cache. The scheduler therefore tracks which blocks hold uncomputed KV;
a newly admitted sequence whose cached prefix runs into one starts computing at that block instead of
trusting it (writing the same content again). A block fully computed by a chunk placed *earlier in the same
batch* counts as computed: the runner must write a batch's KV in batch order (per layer, before attention,
as paged-attention runners do).

Limitations
-----------
* LPM hashes the prompt of every waiting sequence every step (``cached_prefix_tokens``), which is linear in
  the total waiting prompt length per step.
* Admission checks memory conservatively when the prefix cache holds unreferenced blocks: a cached prefix
  block is counted as consumed if it might be one of them.
* No beam search. Parallel samples (``n > 1``) are forked once the prompt is computed; from then on each
  child is an ordinary sequence (preempted and recomputed on its own, sharing prompt blocks only through the
  prefix cache after a recompute).
* A sequence compacted by a token-level policy (:meth:`Scheduler.compact`) is recomputed from its tokens
  when preempted, and compressed again by the engine.
* When ``max_num_seqs`` exceeds ``max_num_batched_tokens``, the youngest decodes can be left out of a step
  (oldest first); they resume as older sequences finish.
* No admission in a step that preempted: a short burst of memory pressure costs one step of admissions.
* Finished sequences are kept until :meth:`Scheduler.finished` is called with ``clear=True``.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import operator
from collections.abc import Callable, Hashable, Mapping
from typing import NamedTuple

from kvstack.engine.blocks import BlockManager, CopyOnWrite, OutOfBlocksError
from kvstack.errors import KVStackError

__all__ = [
    "DEFAULT_MAX_WAITING_STEPS",
    "SCHEDULING_POLICIES",
    "FinishReason",
    "Request",
    "ScheduledBatch",
    "ScheduledSequence",
    "Scheduler",
    "Sequence",
    "SequenceStatus",
]

SCHEDULING_POLICIES: tuple[str, ...] = ("fcfs", "lpm")
DEFAULT_MAX_WAITING_STEPS = 64


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVStackError(f"{name} must be a positive integer, got {value!r}")
    return value


def _token_id(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise KVStackError(f"{what} must be an integer token id, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise KVStackError(f"{what} must be an integer token id, got {value!r}") from None


@dataclasses.dataclass
class Request:
    """One generation request.

    Parameters
    ----------
    request_id : hashable
        Unique id of the request (also its sequence id in the block manager).
    prompt_token_ids : list of int
        The prompt; at least one token.
    max_new_tokens : int
        Tokens to generate at most (``>= 1``).
    arrival_time : float
        When the request arrived; earlier arrivals come first under FCFS.
    eos_token_ids : frozenset of int, optional
        Sampling one of these finishes the request early (the token is kept in the output).
    n : int, optional
        Parallel samples of the prompt: once the prompt is computed, :meth:`Scheduler.update` forks ``n - 1``
        child sequences sharing its blocks (copy-on-write), each starting from its own first token.

    Raises
    ------
    KVStackError
        If the prompt is empty or holds a non-integer, ``max_new_tokens < 1``, ``n < 1``, or the id is
        unhashable.
    """

    request_id: Hashable
    prompt_token_ids: list[int]
    max_new_tokens: int
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    n: int = 1

    def __post_init__(self) -> None:
        try:
            hash(self.request_id)
        except TypeError:
            raise KVStackError(f"request_id must be hashable, got {self.request_id!r}") from None
        prompt = list(self.prompt_token_ids)
        if not prompt:
            raise KVStackError(f"the prompt of request {self.request_id!r} is empty; give at least one token")
        self.prompt_token_ids = [_token_id(t, f"prompt token of request {self.request_id!r}") for t in prompt]
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise KVStackError(
                f"max_new_tokens of request {self.request_id!r} must be an integer >= 1, got {self.max_new_tokens!r}"
            )
        self.eos_token_ids = frozenset(_token_id(t, "eos token") for t in self.eos_token_ids)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise KVStackError(f"n of request {self.request_id!r} must be an integer >= 1, got {self.n!r}")
        try:
            self.arrival_time = float(self.arrival_time)
        except (TypeError, ValueError):
            raise KVStackError(f"arrival_time must be a number, got {self.arrival_time!r}") from None


class SequenceStatus(enum.Enum):
    """Where a sequence is: waiting for admission, running (holds KV blocks), or finished."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    """Why a sequence finished: ``max_new_tokens`` reached, an eos token sampled, a stop string, or aborted."""

    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    ABORTED = "aborted"


@dataclasses.dataclass(eq=False)
class Sequence:
    """Scheduling state of one request (read it; only the :class:`Scheduler` mutates it).

    Attributes
    ----------
    request : Request
        The request.
    order : int
        Position in the order of :meth:`Scheduler.add_request` calls (breaks arrival-time ties).
    status : SequenceStatus
        WAITING, RUNNING or FINISHED.
    finish_reason : FinishReason or None
        Set when finished.
    output_token_ids : list of int
        Generated tokens so far.
    num_computed_tokens : int
        Tokens of ``token_ids`` whose KV is in the cache: after admission the usable cached prefix, then
        advanced by every chunk the model ran; 0 while waiting.
    num_preemptions : int
        Times this sequence was preempted.
    parent_id : hashable or None
        For a child forked by a request with ``n > 1``, the request it was forked from.
    num_evicted : int
        Computed tokens whose KV was evicted by a token-level policy (:meth:`Scheduler.compact`): token
        ``p``'s KV, if kept, sits in slot ``p - num_evicted`` of the block table once ``p`` is past the evicted
        region. 0 unless the engine compresses this sequence; reset by preemption.
    first_scheduled_step : int or None
        The step (1-based count of :meth:`Scheduler.schedule` calls) it was first scheduled in.
    finished_step : int or None
        The step whose :meth:`Scheduler.update` finished it (the current step count for an abort).
    waiting_since_step : int
        Steps completed when it last entered the waiting queue (for aging).
    """

    request: Request
    order: int
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    num_evicted: int = 0
    parent_id: Hashable | None = None
    first_scheduled_step: int | None = None
    finished_step: int | None = None
    waiting_since_step: int = 0
    # Preempted and not re-admitted yet (keeps the front of the queue).
    _requeued: bool = dataclasses.field(default=False, repr=False)
    # Aborted while in the batch being run: finished at update().
    _abort_requested: bool = dataclasses.field(default=False, repr=False)

    @property
    def request_id(self) -> Hashable:
        """The request's id."""
        return self.request.request_id

    @property
    def arrival_time(self) -> float:
        """The request's arrival time."""
        return self.request.arrival_time

    @property
    def arrival_key(self) -> tuple[float, int]:
        """FCFS sort key: arrival time, then order of addition."""
        return (self.request.arrival_time, self.order)

    @property
    def token_ids(self) -> list[int]:
        """Prompt plus generated tokens."""
        return self.request.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Number of prompt plus generated tokens."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        """Whether the status is FINISHED."""
        return self.status is SequenceStatus.FINISHED


class ScheduledSequence(NamedTuple):
    """One entry of a batch: compute ``num_tokens`` tokens of ``request_id`` from its ``num_computed_tokens``.

    Attributes
    ----------
    request_id : hashable
        The sequence.
    num_tokens : int
        Tokens to compute this step (``>= 1``).
    is_prefill : bool
        True for a prompt (or recompute) chunk, False for a one-token decode.
    """

    request_id: Hashable
    num_tokens: int
    is_prefill: bool


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    """What the model runs in one step.

    Attributes
    ----------
    scheduled : tuple of ScheduledSequence
        Decodes (oldest first), then prefill chunks of running sequences, then newly admitted sequences.
    preempted : tuple of hashable
        Requests preempted (by recompute) in this step, in order.
    num_batched_tokens : int
        Sum of ``num_tokens`` over ``scheduled``; never above ``max_num_batched_tokens``.
    step : int
        1-based index of this step.
    """

    scheduled: tuple[ScheduledSequence, ...]
    preempted: tuple[Hashable, ...]
    num_batched_tokens: int
    step: int

    def __len__(self) -> int:
        return len(self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Whether nothing is scheduled."""
        return not self.scheduled

    def request_ids(self) -> list[Hashable]:
        """Scheduled request ids, in batch order."""
        return [entry.request_id for entry in self.scheduled]


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
        Admission order (see the module docstring).
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
        requeued = [s for s in self._waiting if s._requeued]
        rest = sorted((s for s in self._waiting if not s._requeued), key=lambda s: s.arrival_key)
        return [s.request_id for s in requeued + rest]

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
        total_tokens = len(request.prompt_token_ids) + request.max_new_tokens
        needed = -(-total_tokens // pool.block_size)
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
        seq = self._sequences.get(request_id)
        if seq is None:
            raise KVStackError(f"cannot abort unknown request {request_id!r}; abort a waiting or running request")
        if seq.is_finished:
            return False
        if seq.status is SequenceStatus.RUNNING:
            if self._pending is not None and request_id in self._pending.request_ids():
                seq._abort_requested = True
                return True
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._finish(seq, FinishReason.ABORTED)
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
        step = self._num_steps
        pool = self._block_manager.pool
        budget = self._max_num_batched_tokens
        reserved = 0  # blocks update() will need to append the tokens of this batch
        entries: dict[Hashable, tuple[ScheduledSequence, int]] = {}  # request id -> (entry, reserved blocks)
        preempted: list[Hashable] = []

        # 1. decodes, then 2. prefill chunks of running sequences; each group oldest first.
        decodes = [s for s in self._running if not self._is_prefill(s)]
        prefills = [s for s in self._running if self._is_prefill(s)]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._append_blocks_needed(seq, num_tokens)
            while need and pool.num_available - reserved < need:
                victim = self._running[-1]  # most recently arrived
                if victim.request_id in entries:
                    entry, victim_reserved = entries.pop(victim.request_id)
                    budget += entry.num_tokens
                    reserved -= victim_reserved
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            entries[seq.request_id] = (ScheduledSequence(seq.request_id, num_tokens, self._is_prefill(seq)), need)
            budget -= num_tokens
            reserved += need

        # 3. admissions, in policy order; none in a step that preempted (memory is short).
        if not preempted:
            block_size = self._block_manager.block_size
            # Blocks fully computed by the chunks already in this batch count as computed for later entries.
            computed_this_step: set[int] = set()
            for entry, _ in entries.values():
                seq = self._sequences[entry.request_id]
                table = self._block_manager.block_table(seq.request_id)
                start = seq.num_computed_tokens - seq.num_evicted  # slots
                stop = start + entry.num_tokens
                computed_this_step.update(table[start // block_size : stop // block_size])
            for seq in self._admission_order():
                if budget == 0 or len(self._running) >= self._max_num_seqs:
                    break
                token_ids = seq.token_ids
                num_blocks = -(-len(token_ids) // block_size)
                hit_blocks = self._block_manager.cached_prefix_tokens(token_ids) // block_size
                # A hit taken from the LRU leaves the evictable set; assume as many of them as possible are.
                cost = num_blocks - hit_blocks + min(hit_blocks, pool.num_cached)
                may_complete = len(token_ids) - hit_blocks * block_size <= budget
                need_upper = int(
                    may_complete and self._token_will_be_appended(seq) and len(token_ids) % block_size == 0
                )
                if cost + need_upper > pool.num_available - reserved:
                    break  # head of the queue does not fit: nobody skips ahead of it
                try:
                    cached = self._block_manager.allocate_prompt(seq.request_id, token_ids)
                except OutOfBlocksError:  # pragma: no cover - the check above is conservative
                    break
                table = self._block_manager.block_table(seq.request_id)
                self._unwritten.difference_update(self._block_manager.last_loaded_blocks)  # loaded from a tier
                usable_blocks = cached // block_size
                for index in range(usable_blocks):
                    if table[index] in self._unwritten and table[index] not in computed_this_step:
                        usable_blocks = index
                        break
                seq.num_computed_tokens = usable_blocks * block_size
                self._unwritten.update(table[usable_blocks:])
                self._waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                seq._requeued = False
                bisect.insort(self._running, seq, key=lambda s: s.arrival_key)
                num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
                need = self._append_blocks_needed(seq, num_tokens)
                entries[seq.request_id] = (ScheduledSequence(seq.request_id, num_tokens, self._is_prefill(seq)), need)
                computed_this_step.update(table[usable_blocks : (seq.num_computed_tokens + num_tokens) // block_size])
                budget -= num_tokens
                reserved += need

        scheduled = tuple(entry for entry, _ in entries.values())
        for entry in scheduled:
            seq = self._sequences[entry.request_id]
            if seq.first_scheduled_step is None:
                seq.first_scheduled_step = step
        num_batched = self._max_num_batched_tokens - budget
        self._num_batched_tokens_total += num_batched
        batch = ScheduledBatch(
            scheduled=scheduled, preempted=tuple(preempted), num_batched_tokens=num_batched, step=step
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
        scheduled_ids = set(batch.request_ids())
        unknown = [rid for rid in outputs if rid not in scheduled_ids]
        if unknown:
            raise KVStackError(f"update() got outputs for {unknown!r}, which step {batch.step} did not schedule")
        tokens: dict[Hashable, int] = {}
        for entry in batch.scheduled:
            seq = self._sequences[entry.request_id]
            if seq._abort_requested:
                continue
            completes = seq.num_computed_tokens + entry.num_tokens == seq.num_tokens
            token = outputs.get(entry.request_id)
            if completes and token is None:
                raise KVStackError(
                    f"update() needs the sampled token of request {entry.request_id!r}: its chunk completed its tokens"
                )
            if not completes and token is not None:
                raise KVStackError(
                    f"request {entry.request_id!r} ran a prefill chunk that leaves tokens to compute; "
                    f"its output must be None, got {token!r}"
                )
            if completes:
                tokens[entry.request_id] = _token_id(token, f"sampled token of request {entry.request_id!r}")
        forks = {rid: children for rid, children in (forks or {}).items()
                 if not (rid in self._sequences and self._sequences[rid]._abort_requested)}  # aborted: no samples
        for parent_id, children in forks.items():
            seq = self._sequences.get(parent_id)
            if seq is None or parent_id not in tokens or not self._forks_now(seq):
                raise KVStackError(f"update() got forks for {parent_id!r}, which did not sample its first token in "
                                   "this step with n > 1")
            if len(children) != seq.request.n - 1:
                raise KVStackError(f"request {parent_id!r} has n={seq.request.n}: give {seq.request.n - 1} forks, "
                                   f"got {len(children)}")
            for child_id, child_token in children:
                if child_id in self._sequences or child_id in self._block_manager:
                    raise KVStackError(f"fork id {child_id!r} already exists; use a new id")
                _token_id(child_token, f"sampled token of fork {child_id!r}")

        self._pending = None
        block_size = self._block_manager.block_size
        copies: list[CopyOnWrite] = []
        for entry in batch.scheduled:
            seq = self._sequences[entry.request_id]
            start = seq.num_computed_tokens - seq.num_evicted  # slots
            seq.num_computed_tokens += entry.num_tokens
            table = self._block_manager.block_table(seq.request_id)
            self._unwritten.difference_update(table[start // block_size : (start + entry.num_tokens) // block_size])
            if seq._abort_requested:
                self._running.remove(seq)
                self._finish(seq, FinishReason.ABORTED)
                continue
            token = tokens.get(entry.request_id)
            if token is None:
                continue
            for child_id, child_token in forks.get(entry.request_id, []):
                copies.extend(self._fork(seq, child_id, int(child_token)))
            seq.output_token_ids.append(token)
            if token in seq.request.eos_token_ids:
                self._running.remove(seq)
                self._finish(seq, FinishReason.EOS)
            elif len(seq.output_token_ids) >= seq.request.max_new_tokens:
                self._running.remove(seq)
                self._finish(seq, FinishReason.LENGTH)
            else:
                copy = self._block_manager.append_token(seq.request_id, token)
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
    @staticmethod
    def _is_prefill(seq: Sequence) -> bool:
        return seq.num_tokens - seq.num_computed_tokens > 1 or not seq.output_token_ids

    @staticmethod
    def _token_will_be_appended(seq: Sequence) -> bool:
        """Whether the next sampled token may be appended (the last one, at max_new_tokens, never is)."""
        return len(seq.output_token_ids) + 1 < seq.request.max_new_tokens

    def _append_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks update() will allocate to append the token(s) sampled after this chunk.

        One sequence: 0 or 1. A request with ``n > 1`` completing its prompt forks ``n - 1`` children that
        each append their own first token: ``n`` new blocks when the prompt fills its last block, else ``n - 1``
        copies of the shared last block.
        """
        if seq.num_computed_tokens + num_tokens < seq.num_tokens or not self._token_will_be_appended(seq):
            return 0
        manager = self._block_manager
        forks = seq.request.n - 1 if self._forks_now(seq) else 0
        if manager.num_tokens(seq.request_id) % manager.block_size == 0:
            return 1 + forks
        return int(manager.pool.ref_count(manager.block_table(seq.request_id)[-1]) > 1) + forks

    @staticmethod
    def _forks_now(seq: Sequence) -> bool:
        """Whether the token sampled after this step is the first of a request that forks ``n - 1`` children."""
        return seq.request.n > 1 and not seq.output_token_ids and seq.parent_id is None

    def _admission_order(self) -> list[Sequence]:
        requeued = [s for s in self._waiting if s._requeued]
        rest = sorted((s for s in self._waiting if not s._requeued), key=lambda s: s.arrival_key)
        if self._policy == "fcfs":
            return requeued + rest
        waited_before_this_step = self._num_steps - 1
        aged = [s for s in rest if waited_before_this_step - s.waiting_since_step >= self._max_waiting_steps]
        aged_ids = {id(s) for s in aged}
        others = [s for s in rest if id(s) not in aged_ids]
        hits = {id(s): self._block_manager.cached_prefix_tokens(s.token_ids) for s in others}
        others.sort(key=lambda s: (-hits[id(s)], s.arrival_key))
        return requeued + aged + others

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
        bisect.insort(self._running, child, key=lambda s: s.arrival_key)
        copy = self._block_manager.append_token(child_id, token)
        first_pending_slot = child.num_computed_tokens - child.num_evicted
        table = self._block_manager.block_table(child_id)
        self._unwritten.update(table[first_pending_slot // self._block_manager.block_size :])
        return [] if copy is None else [copy]

    def _preempt(self, seq: Sequence) -> None:
        self._block_manager.free(seq.request_id)
        self._running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_evicted = 0
        seq.num_preemptions += 1
        seq.waiting_since_step = self._num_steps
        seq._requeued = True
        self._waiting.insert(0, seq)
        self._num_preemptions += 1

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.request_id in self._block_manager:
            self._block_manager.free(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_step = self._num_steps
        seq._abort_requested = False
        self._finished.append(seq)
