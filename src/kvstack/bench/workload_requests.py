"""A workload's requests: :class:`WorkloadRequest`, :class:`Workload` (sorted by arrival, with its statistics)
and their JSONL form, one request a line, so another engine can replay exactly the same requests."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import operator
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kvstack.bench.workload_args import int_arg, is_int, is_number
from kvstack.errors import KVStackError

__all__ = ["Workload", "WorkloadRequest", "read_jsonl"]

_JSONL_KEYS = ("request_id", "arrival_time", "prompt_token_ids", "max_new_tokens", "conversation_id", "turn")


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload.

    Parameters
    ----------
    request_id : str
        Unique id within its workload.
    arrival_time : float
        Seconds from the workload's start (``>= 0``).
    prompt_token_ids : sequence of int
        The prompt (at least one token id ``>= 0``); stored as a tuple.
    max_new_tokens : int
        Tokens to generate (``>= 1``).
    conversation_id : str or None, optional
        The chat this request is a turn of, if any.
    turn : int, optional
        Index of the turn within its conversation (``>= 0``).

    Raises
    ------
    KVStackError
        If a field has the wrong type or is out of range.
    """

    request_id: str
    arrival_time: float
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    conversation_id: str | None = None
    turn: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise KVStackError(f"request_id must be a non-empty string, got {self.request_id!r}")
        rid = self.request_id
        if not is_number(self.arrival_time) or not math.isfinite(self.arrival_time) or self.arrival_time < 0:
            raise KVStackError(f"arrival_time of {rid!r} must be a finite number >= 0, got {self.arrival_time!r}")
        object.__setattr__(self, "arrival_time", float(self.arrival_time))
        prompt = self.prompt_token_ids
        if isinstance(prompt, (str, bytes, Mapping)):
            raise KVStackError(f"prompt_token_ids of {rid!r} must be a sequence of token ids, got {prompt!r}")
        try:
            prompt = tuple(prompt)
        except TypeError:
            raise KVStackError(f"prompt_token_ids of {rid!r} must be a sequence of token ids, got {prompt!r}") from None
        if not prompt:
            raise KVStackError(f"prompt_token_ids of {rid!r} is empty; give at least one token id")
        if not all(type(t) is int for t in prompt):
            if not all(is_int(t) for t in prompt):
                bad = next(t for t in prompt if not is_int(t))
                raise KVStackError(f"prompt_token_ids of {rid!r} must be integers >= 0, found {bad!r}")
            prompt = tuple(operator.index(t) for t in prompt)
        if min(prompt) < 0:
            raise KVStackError(f"prompt_token_ids of {rid!r} must be integers >= 0, found {min(prompt)}")
        object.__setattr__(self, "prompt_token_ids", prompt)
        object.__setattr__(self, "max_new_tokens", int_arg(f"max_new_tokens of {rid!r}", self.max_new_tokens, 1))
        if self.conversation_id is not None and not isinstance(self.conversation_id, str):
            raise KVStackError(f"conversation_id of {rid!r} must be a string or None, got {self.conversation_id!r}")
        object.__setattr__(self, "turn", int_arg(f"turn of {rid!r}", self.turn, 0))

    def to_dict(self) -> dict[str, Any]:
        """The JSONL record: the four replay keys, plus ``conversation_id`` and ``turn`` for a chat turn."""
        record: dict[str, Any] = {
            "request_id": self.request_id,
            "arrival_time": self.arrival_time,
            "prompt_token_ids": list(self.prompt_token_ids),
            "max_new_tokens": self.max_new_tokens,
        }
        if self.conversation_id is not None or self.turn != 0:
            record["conversation_id"] = self.conversation_id
            record["turn"] = self.turn
        return record


def _common_prefix_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix of two tuples (binary search over C-level slice comparisons)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclasses.dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival time (ties keep their given order).

    Parameters
    ----------
    requests : iterable of WorkloadRequest
        The requests; ids must be unique.

    Raises
    ------
    KVStackError
        If an item is not a :class:`WorkloadRequest` or two requests share an id.
    """

    requests: tuple[WorkloadRequest, ...] = ()

    def __post_init__(self) -> None:
        requests = tuple(self.requests)
        seen: set[str] = set()
        for request in requests:
            if not isinstance(request, WorkloadRequest):
                raise KVStackError(f"a Workload holds WorkloadRequest items, got {type(request).__name__}")
            if request.request_id in seen:
                raise KVStackError(f"duplicate request_id {request.request_id!r}; request ids must be unique")
            seen.add(request.request_id)
        object.__setattr__(self, "requests", tuple(sorted(requests, key=lambda r: r.arrival_time)))

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[WorkloadRequest]:
        return iter(self.requests)

    def __getitem__(self, index: int) -> WorkloadRequest:
        return self.requests[index]

    # ------------------------------------------------------------------ statistics
    @property
    def num_requests(self) -> int:
        """Number of requests."""
        return len(self.requests)

    @property
    def total_prompt_tokens(self) -> int:
        """Prompt tokens over all requests."""
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def total_output_tokens(self) -> int:
        """Tokens to generate over all requests (``max_new_tokens``; a stop token may end a request earlier)."""
        return sum(r.max_new_tokens for r in self.requests)

    @property
    def duration(self) -> float:
        """Seconds from the first arrival to the last (0 for an offline batch or an empty workload)."""
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_time - self.requests[0].arrival_time

    @functools.cached_property
    def shared_prefix_tokens(self) -> int:
        """Prompt tokens a perfect prefix cache would not recompute.

        The sum over requests of the longest common prefix of its prompt with the prompt of any *earlier*
        request (in workload order), at token granularity and with unbounded cache memory. A paged engine
        reuses whole blocks only, so it saves at most this many. Computed in ``O(n log n)`` prompt comparisons:
        among prompts kept sorted, the longest common prefix with a new prompt is with one of its two neighbours.
        """
        seen: list[tuple[int, ...]] = []
        total = 0
        for request in self.requests:
            prompt = request.prompt_token_ids
            i = bisect.bisect_left(seen, prompt)
            best = _common_prefix_length(prompt, seen[i - 1]) if i > 0 else 0
            if i < len(seen):
                best = max(best, _common_prefix_length(prompt, seen[i]))
            total += best
            seen.insert(i, prompt)
        return total

    def summary(self) -> dict[str, float]:
        """The statistics as a dict: ``num_requests``, ``total_prompt_tokens``, ``total_output_tokens``,
        ``duration`` and ``shared_prefix_tokens``."""
        return {
            "num_requests": self.num_requests,
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_output_tokens": self.total_output_tokens,
            "duration": self.duration,
            "shared_prefix_tokens": self.shared_prefix_tokens,
        }

    # ------------------------------------------------------------------ JSONL
    def to_jsonl(self, path: str | Path) -> None:
        """Write one JSON object a line (see :meth:`WorkloadRequest.to_dict`), in arrival order.

        Parameters
        ----------
        path : str or Path
            The file (overwritten).
        """
        with open(path, "w", encoding="utf-8") as f:
            for request in self.requests:
                f.write(json.dumps(request.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> Workload:
        """Read a workload written by :meth:`to_jsonl` (blank lines are skipped).

        Parameters
        ----------
        path : str or Path
            The file.

        Returns
        -------
        Workload

        Raises
        ------
        KVStackError
            If the file is missing or holds no request, or a line is not valid JSON, misses a key, has an
            unknown key, an invalid value or a duplicate ``request_id`` (the message names the file and line).
        """
        requests: list[WorkloadRequest] = []
        seen: set[str] = set()
        for lineno, record in read_jsonl(path):
            where = f"{path}, line {lineno}"
            missing = [k for k in _JSONL_KEYS[:4] if k not in record]
            if missing:
                raise KVStackError(f"{where}: missing key(s) {', '.join(missing)}; need {', '.join(_JSONL_KEYS[:4])}")
            unknown = sorted(set(record) - set(_JSONL_KEYS))
            if unknown:
                raise KVStackError(
                    f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_JSONL_KEYS)}"
                )
            try:
                request = WorkloadRequest(**record)
            except KVStackError as error:
                raise KVStackError(f"{where}: {error}") from None
            if request.request_id in seen:
                raise KVStackError(f"{where}: duplicate request_id {request.request_id!r}")
            seen.add(request.request_id)
            requests.append(request)
        if not requests:
            raise KVStackError(f"{path} holds no request; expected one JSON object a line")
        return cls(tuple(requests))


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line; one-line errors for I/O, JSON and non-objects."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as error:
        raise KVStackError(f"cannot read {path}: {error.strerror or error}") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise KVStackError(
                    f"{path}, line {lineno}: invalid JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(record, dict):
                raise KVStackError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record
