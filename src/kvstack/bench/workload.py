"""Workloads for the engine benchmark: synthetic generators and replay of Mooncake-style traces.

A :class:`Workload` is a list of :class:`WorkloadRequest` (prompt token ids, tokens to generate, arrival time in
seconds from the workload's start) sorted by arrival. It saves to and loads from JSONL, one request a line with
the keys ``request_id``, ``arrival_time``, ``prompt_token_ids`` and ``max_new_tokens`` (plus ``conversation_id``
and ``turn`` for chats), so another engine can replay exactly the same requests. Its summary counts the prompt
tokens a perfect prefix cache would not recompute (:attr:`Workload.shared_prefix_tokens`).

The workloads, and what each exercises in the engine:

* :func:`shared_prefix_workload` -- every request is one of a few *system prompts* followed by tokens of its own.
  The prefix cache should prefill each system prompt once; ``shared_prefix_tokens`` is exactly
  ``(requests - system prompts used) * system_prompt_tokens``.
* :func:`multi_turn_workload` -- chats whose turn ``t`` prompt is turn ``t - 1``'s prompt, a stand-in for the
  assistant's reply, and a new user message: the prefix grows turn after turn, and a cache that keeps (or
  offloads to a host/disk tier) the KV of a conversation between its turns saves its whole history.
* :func:`mooncake_workload` / :func:`load_mooncake_trace` -- replay of a Mooncake-style trace (real arrival times,
  lengths and block-level sharing); :func:`synthetic_mooncake_trace` writes a small one with a few popular
  prefixes, so nothing needs downloading.

Arrivals are Poisson (:func:`poisson_arrivals`) or all at once (``rate_per_s=None``, an offline batch): bursts
test admission, batching and preemption under load, a trickle tests the latency of a lightly loaded engine.

Every generator is deterministic by its seed. Token ids are drawn from ``token_range``, by default
``[min(100, vocab_size // 2), vocab_size)``, which skips the special tokens at the low end of usual vocabularies.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import operator
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kvstack.errors import KVStackError

__all__ = [
    "DEFAULT_FIRST_TOKEN",
    "MOONCAKE_BLOCK_TOKENS",
    "Workload",
    "WorkloadRequest",
    "load_mooncake_trace",
    "mooncake_workload",
    "multi_turn_workload",
    "poisson_arrivals",
    "shared_prefix_workload",
    "synthetic_mooncake_trace",
    "write_mooncake_trace",
]

DEFAULT_FIRST_TOKEN = 100
"""Lowest token id of the default token range (capped at ``vocab_size // 2``), above usual special tokens."""

MOONCAKE_BLOCK_TOKENS = 512
"""Prompt tokens named by one ``hash_id`` of a Mooncake trace."""

_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")
_JSONL_KEYS = ("request_id", "arrival_time", "prompt_token_ids", "max_new_tokens", "conversation_id", "turn")


# ---------------------------------------------------------------------------------------------- validation
def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_arg(name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum``, else a one-line :class:`KVStackError`."""
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise KVStackError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _rate(rate_per_s: float | None) -> float | None:
    """None for "all at once" (None or inf), else the rate; one-line error unless a positive number."""
    if rate_per_s is None:
        return None
    if not _number(rate_per_s) or math.isnan(rate_per_s) or rate_per_s <= 0:
        raise KVStackError(f"rate_per_s must be a number > 0 (requests per second) or None/inf, got {rate_per_s!r}")
    return None if math.isinf(rate_per_s) else float(rate_per_s)


def _nonnegative_float(name: str, value: object) -> float:
    if not _number(value) or not math.isfinite(value) or value < 0:  # type: ignore[arg-type,operator]
        raise KVStackError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _token_range(vocab_size: object, token_range: tuple[int, int] | None) -> tuple[int, int]:
    """The half-open ``[low, high)`` range token ids are drawn from, checked against ``vocab_size``."""
    vocab = _int_arg("vocab_size", vocab_size, 2)
    if token_range is None:
        return min(DEFAULT_FIRST_TOKEN, vocab // 2), vocab
    try:
        low, high = token_range
    except (TypeError, ValueError):
        raise KVStackError(f"token_range must be a pair (low, high), got {token_range!r}") from None
    if not (_is_int(low) and _is_int(high) and 0 <= low < high <= vocab):
        raise KVStackError(
            f"token_range must satisfy 0 <= low < high <= vocab_size={vocab} (high exclusive), got {token_range!r}"
        )
    return int(low), int(high)


def _seed(seed: object) -> int:
    return _int_arg("seed", seed, 0)


# ---------------------------------------------------------------------------------------------- requests
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
        if not _number(self.arrival_time) or not math.isfinite(self.arrival_time) or self.arrival_time < 0:
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
            if not all(_is_int(t) for t in prompt):
                bad = next(t for t in prompt if not _is_int(t))
                raise KVStackError(f"prompt_token_ids of {rid!r} must be integers >= 0, found {bad!r}")
            prompt = tuple(operator.index(t) for t in prompt)
        if min(prompt) < 0:
            raise KVStackError(f"prompt_token_ids of {rid!r} must be integers >= 0, found {min(prompt)}")
        object.__setattr__(self, "prompt_token_ids", prompt)
        object.__setattr__(self, "max_new_tokens", _int_arg(f"max_new_tokens of {rid!r}", self.max_new_tokens, 1))
        if self.conversation_id is not None and not isinstance(self.conversation_id, str):
            raise KVStackError(f"conversation_id of {rid!r} must be a string or None, got {self.conversation_id!r}")
        object.__setattr__(self, "turn", _int_arg(f"turn of {rid!r}", self.turn, 0))

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
        for lineno, record in _read_jsonl(path):
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


def _read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
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


# ---------------------------------------------------------------------------------------------- arrivals
def poisson_arrivals(num: int, rate_per_s: float | None, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process: the first at 0, then exponential gaps of mean ``1 / rate_per_s``.

    Parameters
    ----------
    num : int
        Number of arrivals (``>= 0``).
    rate_per_s : float or None
        Mean arrivals per second (``> 0``); None or ``inf`` puts every arrival at 0 (an offline batch).
    seed : int, optional
        Seed of the numpy generator.

    Returns
    -------
    list of float
        Non-decreasing times in seconds.

    Raises
    ------
    KVStackError
        On ``num < 0``, a rate that is not a positive number, or a negative seed.
    """
    num = _int_arg("num", num, 0)
    rate = _rate(rate_per_s)
    seed = _seed(seed)
    if rate is None or num == 0:
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


# ---------------------------------------------------------------------------------------------- synthetic
def _tokens(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    return rng.integers(low, high, size=n).tolist()


def _distinct_tokens(rng: np.random.Generator, n: int, low: int, high: int, what: str) -> list[int]:
    """``n`` distinct token ids in ``[low, high)``, so ``n`` sequences starting with them differ at once."""
    if n > high - low:
        raise KVStackError(
            f"{n} {what} need distinct first tokens but token_range [{low}, {high}) has only {high - low} ids; "
            "widen the range (a larger vocab_size) or lower the count"
        )
    return rng.choice(np.arange(low, high), size=n, replace=False).tolist()


def _system_prompts(rng: np.random.Generator, num: int, length: int, low: int, high: int) -> list[list[int]]:
    """``num`` random prompts of ``length`` tokens that differ from each other at their first token."""
    if length == 0:
        return [[] for _ in range(num)]
    firsts = _distinct_tokens(rng, num, low, high, "system prompts")
    return [[first, *_tokens(rng, length - 1, low, high)] for first in firsts]


def _first_tokens_by_group(rng: np.random.Generator, groups: list[int], low: int, high: int, what: str) -> list[int]:
    """A first token per item, distinct among the items of the same group."""
    out = [0] * len(groups)
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        for i, token in zip(members, _distinct_tokens(rng, len(members), low, high, what), strict=True):
            out[i] = token
    return out


def shared_prefix_workload(
    *,
    vocab_size: int,
    num_requests: int = 64,
    system_prompt_tokens: int = 1024,
    unique_tokens: int = 64,
    output_tokens: int = 32,
    num_system_prompts: int = 1,
    rate_per_s: float | None = None,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
) -> Workload:
    """Requests made of a shared system prompt followed by tokens of their own.

    Request ``i`` (id ``"shared-{i}"``) uses system prompt ``i % num_system_prompts``. System prompts differ
    from each other at their first token, and the own tokens of requests with the same system prompt differ at
    their first token, so two requests share exactly ``system_prompt_tokens`` leading tokens when their system
    prompt is the same and none otherwise; ``shared_prefix_tokens`` is ``(num_requests - system prompts used)
    * system_prompt_tokens``.

    Parameters
    ----------
    vocab_size : int
        Vocabulary size of the model (token ids stay below it).
    num_requests : int, optional
        Number of requests (``>= 1``).
    system_prompt_tokens : int, optional
        Length of each system prompt (``>= 0``).
    unique_tokens : int, optional
        Tokens of each request after its system prompt (``>= 1``).
    output_tokens : int, optional
        ``max_new_tokens`` of every request (``>= 1``).
    num_system_prompts : int, optional
        Distinct system prompts (``>= 1``).
    rate_per_s : float or None, optional
        Poisson arrival rate; None sends every request at 0.
    seed : int, optional
        Seed of the token and arrival draws.
    token_range : (int, int), optional
        Half-open range of token ids; defaults to ``[min(100, vocab_size // 2), vocab_size)``.

    Returns
    -------
    Workload

    Raises
    ------
    KVStackError
        If an argument is out of range, or the token range has fewer ids than the distinct first tokens needed
        (``num_system_prompts``, and the requests sharing one system prompt).
    """
    num_requests = _int_arg("num_requests", num_requests, 1)
    system_prompt_tokens = _int_arg("system_prompt_tokens", system_prompt_tokens, 0)
    unique_tokens = _int_arg("unique_tokens", unique_tokens, 1)
    output_tokens = _int_arg("output_tokens", output_tokens, 1)
    num_system_prompts = _int_arg("num_system_prompts", num_system_prompts, 1)
    low, high = _token_range(vocab_size, token_range)
    seed = _seed(seed)
    arrivals = poisson_arrivals(num_requests, rate_per_s, seed)
    rng = np.random.default_rng([seed, 1])
    systems = _system_prompts(rng, num_system_prompts, system_prompt_tokens, low, high)
    assignment = [i % num_system_prompts for i in range(num_requests)]
    # With empty system prompts every request starts at its own tokens: keep those distinct across all of them.
    groups = assignment if system_prompt_tokens > 0 else [0] * num_requests
    firsts = _first_tokens_by_group(rng, groups, low, high, "requests sharing a system prompt")
    requests = [
        WorkloadRequest(
            request_id=f"shared-{i}",
            arrival_time=arrivals[i],
            prompt_token_ids=tuple(systems[assignment[i]] + [firsts[i]] + _tokens(rng, unique_tokens - 1, low, high)),
            max_new_tokens=output_tokens,
        )
        for i in range(num_requests)
    ]
    return Workload(tuple(requests))


def multi_turn_workload(
    *,
    vocab_size: int,
    num_conversations: int = 16,
    turns: int = 4,
    system_prompt_tokens: int = 256,
    user_tokens: int = 64,
    output_tokens: int = 32,
    think_time_s: float = 1.0,
    rate_per_s: float | None = None,
    num_system_prompts: int = 1,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
) -> Workload:
    """Multi-turn chats: each turn's prompt extends the previous turn's prompt.

    Turn 0 of conversation ``c`` (request id ``"conv{c}-turn0"``) is a system prompt (``c %
    num_system_prompts``) followed by ``user_tokens`` user tokens; turn ``t`` is turn ``t - 1``'s prompt, then
    ``output_tokens`` tokens standing in for the assistant's reply, then ``user_tokens`` new user tokens, so
    turn ``t``'s prompt has ``system_prompt_tokens + (t + 1) * user_tokens + t * output_tokens`` tokens.
    Conversations start at Poisson arrivals; turn ``t`` arrives ``think_time_s`` after turn ``t - 1``'s
    *arrival*. This is an open-loop replay: a closed-loop client would wait for the actual reply (and use it
    in the next prompt), whereas the fixed stand-in reply and arrival times keep prompts identical across engines
    and runs, so runs are comparable. Conversations differ from each other right after their system prompt.

    Parameters
    ----------
    vocab_size : int
        Vocabulary size of the model (token ids stay below it).
    num_conversations : int, optional
        Number of chats (``>= 1``).
    turns : int, optional
        Turns per chat (``>= 1``).
    system_prompt_tokens : int, optional
        Length of each system prompt (``>= 0``).
    user_tokens : int, optional
        Tokens of each user message (``>= 1``).
    output_tokens : int, optional
        ``max_new_tokens`` of every turn, and the length of the stand-in replies (``>= 1``).
    think_time_s : float, optional
        Seconds between the arrivals of consecutive turns of a chat (``>= 0``).
    rate_per_s : float or None, optional
        Poisson rate of conversation starts; None starts every chat at 0.
    num_system_prompts : int, optional
        Distinct system prompts (``>= 1``).
    seed : int, optional
        Seed of the token and arrival draws.
    token_range : (int, int), optional
        Half-open range of token ids; defaults to ``[min(100, vocab_size // 2), vocab_size)``.

    Returns
    -------
    Workload
        ``num_conversations * turns`` requests with ``conversation_id="conv{c}"`` and ``turn=t``.

    Raises
    ------
    KVStackError
        If an argument is out of range, or the token range is too small for the distinct first tokens needed.
    """
    num_conversations = _int_arg("num_conversations", num_conversations, 1)
    turns = _int_arg("turns", turns, 1)
    system_prompt_tokens = _int_arg("system_prompt_tokens", system_prompt_tokens, 0)
    user_tokens = _int_arg("user_tokens", user_tokens, 1)
    output_tokens = _int_arg("output_tokens", output_tokens, 1)
    think_time_s = _nonnegative_float("think_time_s", think_time_s)
    num_system_prompts = _int_arg("num_system_prompts", num_system_prompts, 1)
    low, high = _token_range(vocab_size, token_range)
    seed = _seed(seed)
    starts = poisson_arrivals(num_conversations, rate_per_s, seed)
    rng = np.random.default_rng([seed, 2])
    systems = _system_prompts(rng, num_system_prompts, system_prompt_tokens, low, high)
    assignment = [c % num_system_prompts for c in range(num_conversations)]
    groups = assignment if system_prompt_tokens > 0 else [0] * num_conversations
    firsts = _first_tokens_by_group(rng, groups, low, high, "conversations sharing a system prompt")
    requests = []
    for c in range(num_conversations):
        prompt = systems[assignment[c]] + [firsts[c]] + _tokens(rng, user_tokens - 1, low, high)
        for t in range(turns):
            if t > 0:
                prompt = prompt + _tokens(rng, output_tokens, low, high) + _tokens(rng, user_tokens, low, high)
            requests.append(
                WorkloadRequest(
                    request_id=f"conv{c}-turn{t}",
                    arrival_time=starts[c] + t * think_time_s,
                    prompt_token_ids=tuple(prompt),
                    max_new_tokens=output_tokens,
                    conversation_id=f"conv{c}",
                    turn=t,
                )
            )
    return Workload(tuple(requests))


# ---------------------------------------------------------------------------------------------- Mooncake traces
def _check_mooncake_record(record: object, block_tokens: int) -> str | None:
    """The problem with one trace record, or None if it is valid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [k for k in _MOONCAKE_KEYS if k not in record]
    if missing:
        return f"missing key(s) {', '.join(missing)}; a Mooncake trace line needs {', '.join(_MOONCAKE_KEYS)}"
    timestamp = record["timestamp"]
    if not _number(timestamp) or not math.isfinite(timestamp) or timestamp < 0:
        return f"timestamp must be a finite number >= 0 (milliseconds), got {timestamp!r}"
    for key in ("input_length", "output_length"):
        if not _is_int(record[key]) or record[key] < 1:
            return f"{key} must be an integer >= 1, got {record[key]!r}"
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list) or not all(_is_int(h) and h >= 0 for h in hash_ids):
        return f"hash_ids must be a list of integers >= 0, got {hash_ids!r}"
    needed = -(-record["input_length"] // block_tokens)
    if len(hash_ids) != needed:
        return (
            f"{len(hash_ids)} hash_ids but input_length {record['input_length']} needs "
            f"ceil({record['input_length']}/{block_tokens}) = {needed}"
        )
    return None


def mooncake_workload(
    records: Iterable[Mapping[str, Any]],
    *,
    vocab_size: int,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    seed: int = 0,
    time_scale: float = 1.0,
    max_requests: int | None = None,
    token_range: tuple[int, int] | None = None,
) -> Workload:
    """Build a workload from in-memory Mooncake-style records, as :func:`load_mooncake_trace` does from a file.

    Parameters
    ----------
    records : iterable of dict
        Records ``{"timestamp", "input_length", "output_length", "hash_ids"}``, e.g. from
        :func:`synthetic_mooncake_trace`; record ``k`` (from 1) becomes request ``"trace-{k}"``.
    vocab_size, block_tokens, seed, time_scale, max_requests, token_range
        As in :func:`load_mooncake_trace`.

    Returns
    -------
    Workload

    Raises
    ------
    KVStackError
        If an argument is out of range, there is no record, or a record is invalid (naming its number).
    """
    return _mooncake(
        enumerate(records, start=1),
        "trace records",
        "record",
        vocab_size=vocab_size,
        block_tokens=block_tokens,
        seed=seed,
        time_scale=time_scale,
        max_requests=max_requests,
        token_range=token_range,
    )


def _mooncake(
    numbered_records: Iterable[tuple[int, Any]],
    source: str,
    unit: str,
    *,
    vocab_size: int,
    block_tokens: int,
    seed: int,
    time_scale: float,
    max_requests: int | None,
    token_range: tuple[int, int] | None,
) -> Workload:
    """The workload of ``(number, record)`` pairs; errors start with ``f"{source}, {unit} {number}: "``."""
    block_tokens = _int_arg("block_tokens", block_tokens, 1)
    time_scale = _nonnegative_float("time_scale", time_scale)
    if max_requests is not None:
        max_requests = _int_arg("max_requests", max_requests, 1)
    low, high = _token_range(vocab_size, token_range)
    seed = _seed(seed)
    numbered: list[tuple[int, Any]] = []
    for number, record in numbered_records:
        problem = _check_mooncake_record(record, block_tokens)
        if problem is not None:
            raise KVStackError(f"{source}, {unit} {number}: {problem}")
        numbered.append((number, record))
        if max_requests is not None and len(numbered) >= max_requests:
            break
    if not numbered:
        raise KVStackError(f"{source}: no request; expected Mooncake records {{timestamp, input_length, ...}}")
    start = min(record["timestamp"] for _, record in numbered)
    blocks: dict[int, list[int]] = {}

    def block(hash_id: int) -> list[int]:
        # Always the full block, from an RNG of (seed, hash_id) only: a partial use is a prefix of a full one.
        if hash_id not in blocks:
            blocks[hash_id] = _tokens(np.random.default_rng([seed, int(hash_id)]), block_tokens, low, high)
        return blocks[hash_id]

    requests = []
    for number, record in numbered:
        length = int(record["input_length"])
        prompt = [t for h in record["hash_ids"] for t in block(h)][:length]
        requests.append(
            WorkloadRequest(
                request_id=f"trace-{number}",
                arrival_time=(record["timestamp"] - start) / 1000.0 * time_scale,
                prompt_token_ids=tuple(prompt),
                max_new_tokens=int(record["output_length"]),
            )
        )
    return Workload(tuple(requests))


def load_mooncake_trace(
    path: str | Path,
    *,
    vocab_size: int,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    seed: int = 0,
    time_scale: float = 1.0,
    max_requests: int | None = None,
    token_range: tuple[int, int] | None = None,
) -> Workload:
    """Replay a Mooncake-style JSONL trace.

    Each line is ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [h0, h1, ...]}``
    (other keys are ignored). Hash id ``h`` names one block of ``block_tokens`` prompt tokens: its tokens are
    drawn from an RNG seeded by ``(seed, h)``, so prompts sharing hash ids share content exactly. The prompt is
    the concatenation of its blocks cut to ``input_length`` (the last block may be partial: a prefix of the same
    hash id's full block), so ``len(hash_ids)`` must be ``ceil(input_length / block_tokens)``. The request of
    line ``k`` is ``"trace-{k}"``; it generates ``output_length`` tokens and arrives at ``(timestamp -
    earliest timestamp) / 1000 * time_scale`` seconds.

    Parameters
    ----------
    path : str or Path
        The trace (blank lines are skipped).
    vocab_size : int
        Vocabulary size of the model (token ids stay below it).
    block_tokens : int, optional
        Tokens per hash id (512 in Mooncake's traces).
    seed : int, optional
        Seed of the block contents.
    time_scale : float, optional
        Multiplies arrival times (``>= 0``; 0.5 replays twice as fast, 0 sends everything at once).
    max_requests : int or None, optional
        Replay only the first ``max_requests`` lines (later lines are not read).
    token_range : (int, int), optional
        Half-open range of token ids; defaults to ``[min(100, vocab_size // 2), vocab_size)``.

    Returns
    -------
    Workload

    Raises
    ------
    KVStackError
        If an argument is out of range, the file is missing or empty, or a line is not valid JSON, misses a key,
        has a non-positive length, a bad timestamp or not ``ceil(input_length / block_tokens)`` hash ids (the
        message names the file and the line).
    """
    return _mooncake(
        _read_jsonl(path),
        str(path),
        "line",
        vocab_size=vocab_size,
        block_tokens=block_tokens,
        seed=seed,
        time_scale=time_scale,
        max_requests=max_requests,
        token_range=token_range,
    )


def synthetic_mooncake_trace(
    *,
    num_requests: int = 64,
    num_prefixes: int = 4,
    prefix_blocks: int = 4,
    unique_blocks: int = 2,
    output_length: int = 32,
    block_tokens: int = MOONCAKE_BLOCK_TOKENS,
    rate_per_s: float | None = 1.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A small Mooncake-style trace with a few popular shared prefixes.

    Prefix ``k`` has between 1 and ``prefix_blocks`` full blocks and is picked with probability proportional to
    ``1 / (k + 1)`` (a Zipf-like popularity); each request follows its prefix with 1 to ``unique_blocks`` blocks
    of its own, the last one partial (1 to ``block_tokens`` tokens). Hash ids are numbered from 0 as blocks are
    first used. Timestamps are Poisson arrivals in integer milliseconds.

    Parameters
    ----------
    num_requests : int, optional
        Number of records (``>= 1``).
    num_prefixes : int, optional
        Popular prefixes (``>= 0``; 0 gives requests that share nothing).
    prefix_blocks : int, optional
        Maximum blocks of a prefix (``>= 1``).
    unique_blocks : int, optional
        Maximum blocks of a request's own part (``>= 1``).
    output_length : int, optional
        ``output_length`` of every record (``>= 1``).
    block_tokens : int, optional
        Tokens per hash id.
    rate_per_s : float or None, optional
        Poisson arrival rate; None puts every timestamp at 0.
    seed : int, optional
        Seed of the draws.

    Returns
    -------
    list of dict
        Records ``{"timestamp", "input_length", "output_length", "hash_ids"}`` in arrival order, for
        :func:`write_mooncake_trace` or :func:`mooncake_workload`.

    Raises
    ------
    KVStackError
        If an argument is out of range.
    """
    num_requests = _int_arg("num_requests", num_requests, 1)
    num_prefixes = _int_arg("num_prefixes", num_prefixes, 0)
    prefix_blocks = _int_arg("prefix_blocks", prefix_blocks, 1)
    unique_blocks = _int_arg("unique_blocks", unique_blocks, 1)
    output_length = _int_arg("output_length", output_length, 1)
    block_tokens = _int_arg("block_tokens", block_tokens, 1)
    seed = _seed(seed)
    arrivals = poisson_arrivals(num_requests, rate_per_s, seed)
    rng = np.random.default_rng([seed, 3])
    next_id = 0
    prefixes: list[list[int]] = []
    for _ in range(num_prefixes):
        n = int(rng.integers(1, prefix_blocks + 1))
        prefixes.append(list(range(next_id, next_id + n)))
        next_id += n
    weights = 1.0 / np.arange(1, num_prefixes + 1)
    records = []
    for i in range(num_requests):
        prefix = prefixes[int(rng.choice(num_prefixes, p=weights / weights.sum()))] if num_prefixes else []
        n = int(rng.integers(1, unique_blocks + 1))
        own = list(range(next_id, next_id + n))
        next_id += n
        hash_ids = prefix + own
        input_length = len(hash_ids) * block_tokens - int(rng.integers(0, block_tokens))
        records.append(
            {
                "timestamp": round(arrivals[i] * 1000),
                "input_length": input_length,
                "output_length": output_length,
                "hash_ids": hash_ids,
            }
        )
    return records


def write_mooncake_trace(
    path: str | Path, records: Iterable[Mapping[str, Any]], *, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> None:
    """Write Mooncake-style records as JSONL, one a line, checking each first.

    Parameters
    ----------
    path : str or Path
        The file (overwritten).
    records : iterable of dict
        Records as :func:`synthetic_mooncake_trace` returns.
    block_tokens : int, optional
        Tokens per hash id, to check ``len(hash_ids)`` against ``input_length``.

    Raises
    ------
    KVStackError
        If a record is invalid (naming its number, from 1); nothing is written then.
    """
    block_tokens = _int_arg("block_tokens", block_tokens, 1)
    lines = []
    for number, record in enumerate(records, start=1):
        record = dict(record) if isinstance(record, Mapping) else record
        problem = _check_mooncake_record(record, block_tokens)
        if problem is not None:
            raise KVStackError(f"record {number}: {problem}")
        lines.append(json.dumps(record, separators=(",", ":")) + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
