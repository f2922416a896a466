"""What the scheduler schedules: a request, the scheduling state of its sequence, and their states.

Pure data and validation, no tensors; :class:`~kvstack.engine.scheduler.Scheduler` is the only writer of a
:class:`Sequence`. ``docs/engine-design.md`` describes the engine.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Hashable

from kvstack.errors import KVStackError

__all__ = [
    "FinishReason", "Request", "Sequence", "SequenceStatus", "forks_now", "is_prefill", "token_id",
    "token_will_be_appended",
]


def token_id(value: object, what: str) -> int:
    """``value`` as an int token id; :class:`KVStackError` naming ``what`` if it is not an integer."""
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
        self.prompt_token_ids = [token_id(t, f"prompt token of request {self.request_id!r}") for t in prompt]
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise KVStackError(
                f"max_new_tokens of request {self.request_id!r} must be an integer >= 1, got {self.max_new_tokens!r}"
            )
        self.eos_token_ids = frozenset(token_id(t, "eos token") for t in self.eos_token_ids)
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
    """Why a sequence finished: ``max_new_tokens`` reached, an eos token sampled, a stop string, aborted, or an
    error in the step that ran it (the engine failed it alone and kept serving)."""

    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    ABORTED = "aborted"
    ERROR = "error"


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
    # Aborted (ABORTED) or failed (ERROR) while in the batch being run: finished at update() with this reason.
    _finish_requested: FinishReason | None = dataclasses.field(default=None, repr=False)

    @property
    def finishing(self) -> bool:
        """Whether it was aborted or failed while in the batch being run (it finishes at the next update)."""
        return self._finish_requested is not None

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


def is_prefill(seq: Sequence) -> bool:
    """Whether the running ``seq``'s next chunk computes prompt (or recomputed) tokens, not one decode token."""
    return seq.num_tokens - seq.num_computed_tokens > 1 or not seq.output_token_ids


def token_will_be_appended(seq: Sequence) -> bool:
    """Whether the next sampled token may be appended (the last one, at max_new_tokens, never is)."""
    return len(seq.output_token_ids) + 1 < seq.request.max_new_tokens


def forks_now(seq: Sequence) -> bool:
    """Whether the token sampled after this step is the first of a request that forks ``n - 1`` children."""
    return seq.request.n > 1 and not seq.output_token_ids and seq.parent_id is None
