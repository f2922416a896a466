"""What one scheduler step runs (its entries, its batch, the plan it is built in) and the checks of what the
model reports back for it.

``docs/engine-design.md`` (section "Scheduler") describes a step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from typing import NamedTuple

from kvstack.engine.blocks import BlockManager
from kvstack.engine.sequence import Sequence, forks_now, token_id
from kvstack.errors import KVStackError

__all__ = ["ScheduledBatch", "ScheduledSequence", "StepPlan", "checked_forks_of", "sampled_tokens"]


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


@dataclasses.dataclass
class StepPlan:
    """The batch :meth:`~kvstack.engine.scheduler.Scheduler.schedule` is building.

    Attributes
    ----------
    budget : int
        Tokens left in the step.
    reserved : int
        Blocks :meth:`~kvstack.engine.scheduler.Scheduler.update` will need to append the tokens sampled
        after this batch.
    entries : dict
        Request id to ``(entry, blocks reserved for it)``, in scheduling order.
    preempted : list of hashable
        Requests preempted in this step, in order.
    """

    budget: int
    reserved: int = 0
    entries: dict[Hashable, tuple[ScheduledSequence, int]] = dataclasses.field(default_factory=dict)
    preempted: list[Hashable] = dataclasses.field(default_factory=list)

    def add(self, entry: ScheduledSequence, need: int) -> None:
        """Schedule ``entry``, reserving ``need`` blocks for its sampled token."""
        self.entries[entry.request_id] = (entry, need)
        self.budget -= entry.num_tokens
        self.reserved += need

    def drop(self, request_id: Hashable) -> None:
        """Take a preempted sequence's entry back out, returning its tokens and blocks."""
        entry, need = self.entries.pop(request_id)
        self.budget += entry.num_tokens
        self.reserved -= need


def sampled_tokens(
    batch: ScheduledBatch, outputs: Mapping[Hashable, int | None], sequences: Mapping[Hashable, Sequence]
) -> dict[Hashable, int]:
    """The sampled token of every entry of ``batch`` whose chunk completed its tokens, checked (entries of
    requests aborted meanwhile are left out); ``outputs`` as given to the scheduler's ``update``.

    Raises
    ------
    KVStackError
        If an id was not scheduled, a completing chunk has no token, a non-completing chunk has one, or a
        token is not an integer.
    """
    scheduled_ids = set(batch.request_ids())
    unknown = [rid for rid in outputs if rid not in scheduled_ids]
    if unknown:
        raise KVStackError(f"update() got outputs for {unknown!r}, which step {batch.step} did not schedule")
    tokens: dict[Hashable, int] = {}
    for entry in batch.scheduled:
        seq = sequences[entry.request_id]
        if seq._finish_requested is not None:
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
            tokens[entry.request_id] = token_id(token, f"sampled token of request {entry.request_id!r}")
    return tokens


def checked_forks_of(
    forks: Mapping[Hashable, list[tuple[Hashable, int]]], tokens: Mapping[Hashable, int],
    sequences: Mapping[Hashable, Sequence], manager: BlockManager,
) -> dict[Hashable, list[tuple[Hashable, int]]]:
    """The forks given to the scheduler's ``update``, checked against the sampled ``tokens``, without those of
    requests aborted meanwhile (they take no samples).

    Raises
    ------
    KVStackError
        If a request did not sample its first token of ``n > 1`` in this step, the number of forks is not
        ``n - 1``, a fork id exists already or a fork's token is not an integer.
    """
    forks = {rid: children for rid, children in forks.items()
             if not (rid in sequences and sequences[rid]._finish_requested is not None)}
    for parent_id, children in forks.items():
        seq = sequences.get(parent_id)
        if seq is None or parent_id not in tokens or not forks_now(seq):
            raise KVStackError(f"update() got forks for {parent_id!r}, which did not sample its first token in "
                               "this step with n > 1")
        if len(children) != seq.request.n - 1:
            raise KVStackError(f"request {parent_id!r} has n={seq.request.n}: give {seq.request.n - 1} forks, "
                               f"got {len(children)}")
        for child_id, child_token in children:
            if child_id in sequences or child_id in manager:
                raise KVStackError(f"fork id {child_id!r} already exists; use a new id")
            token_id(child_token, f"sampled token of fork {child_id!r}")
    return forks
