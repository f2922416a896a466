"""Mooncake-style traces: replay of a trace's arrivals, lengths and block-level sharing, and a small
synthetic trace with a few popular prefixes, so nothing needs downloading."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kvstack.bench.workload_args import check_token_range, int_arg, is_int, is_number, nonnegative_float, seed_arg
from kvstack.bench.workload_requests import Workload, WorkloadRequest, read_jsonl
from kvstack.bench.workload_synthetic import poisson_arrivals, random_tokens
from kvstack.errors import KVStackError

__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "load_mooncake_trace",
    "mooncake_workload",
    "synthetic_mooncake_trace",
    "write_mooncake_trace",
]

MOONCAKE_BLOCK_TOKENS = 512
"""Prompt tokens named by one ``hash_id`` of a Mooncake trace."""

_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


def _check_mooncake_record(record: object, block_tokens: int) -> str | None:
    """The problem with one trace record, or None if it is valid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [k for k in _MOONCAKE_KEYS if k not in record]
    if missing:
        return f"missing key(s) {', '.join(missing)}; a Mooncake trace line needs {', '.join(_MOONCAKE_KEYS)}"
    timestamp = record["timestamp"]
    if not is_number(timestamp) or not math.isfinite(timestamp) or timestamp < 0:
        return f"timestamp must be a finite number >= 0 (milliseconds), got {timestamp!r}"
    for key in ("input_length", "output_length"):
        if not is_int(record[key]) or record[key] < 1:
            return f"{key} must be an integer >= 1, got {record[key]!r}"
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list) or not all(is_int(h) and h >= 0 for h in hash_ids):
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
    block_tokens = int_arg("block_tokens", block_tokens, 1)
    time_scale = nonnegative_float("time_scale", time_scale)
    if max_requests is not None:
        max_requests = int_arg("max_requests", max_requests, 1)
    low, high = check_token_range(vocab_size, token_range)
    seed = seed_arg(seed)
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
            blocks[hash_id] = random_tokens(np.random.default_rng([seed, int(hash_id)]), block_tokens, low, high)
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
        read_jsonl(path),
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
    num_requests = int_arg("num_requests", num_requests, 1)
    num_prefixes = int_arg("num_prefixes", num_prefixes, 0)
    prefix_blocks = int_arg("prefix_blocks", prefix_blocks, 1)
    unique_blocks = int_arg("unique_blocks", unique_blocks, 1)
    output_length = int_arg("output_length", output_length, 1)
    block_tokens = int_arg("block_tokens", block_tokens, 1)
    seed = seed_arg(seed)
    arrivals = poisson_arrivals(num_requests, rate_per_s, seed)
    rng = np.random.default_rng([seed, 3])
    prefixes = _popular_prefixes(rng, num_prefixes, prefix_blocks)
    return _trace_records(rng, arrivals, prefixes, unique_blocks, output_length, block_tokens)


def _popular_prefixes(rng: np.random.Generator, num_prefixes: int, prefix_blocks: int) -> list[list[int]]:
    """The hash ids of each popular prefix: 1 to ``prefix_blocks`` blocks, numbered from 0 in order."""
    prefixes: list[list[int]] = []
    next_id = 0
    for _ in range(num_prefixes):
        n = int(rng.integers(1, prefix_blocks + 1))
        prefixes.append(list(range(next_id, next_id + n)))
        next_id += n
    return prefixes


def _trace_records(rng: np.random.Generator, arrivals: list[float], prefixes: list[list[int]], unique_blocks: int,
                   output_length: int, block_tokens: int) -> list[dict[str, Any]]:
    """A record per arrival: a prefix drawn by Zipf-like popularity (``1 / (k + 1)``), then 1 to
    ``unique_blocks`` new blocks, the last one partial."""
    num_prefixes = len(prefixes)
    next_id = sum(len(prefix) for prefix in prefixes)  # new hash ids go on after the prefixes' blocks
    weights = 1.0 / np.arange(1, num_prefixes + 1)
    records = []
    for arrival in arrivals:
        prefix = prefixes[int(rng.choice(num_prefixes, p=weights / weights.sum()))] if num_prefixes else []
        n = int(rng.integers(1, unique_blocks + 1))
        hash_ids = prefix + list(range(next_id, next_id + n))
        next_id += n
        input_length = len(hash_ids) * block_tokens - int(rng.integers(0, block_tokens))
        records.append(
            {
                "timestamp": round(arrival * 1000),
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
    block_tokens = int_arg("block_tokens", block_tokens, 1)
    lines = []
    for number, record in enumerate(records, start=1):
        record = dict(record) if isinstance(record, Mapping) else record
        problem = _check_mooncake_record(record, block_tokens)
        if problem is not None:
            raise KVStackError(f"record {number}: {problem}")
        lines.append(json.dumps(record, separators=(",", ":")) + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
