"""Replay a workload through the engine in real time and measure it: ``kvstack engine-bench``.

:func:`replay` submits each :class:`~kvstack.bench.workload.WorkloadRequest` to an
:class:`~kvstack.engine.engine.Engine` when its arrival time comes (open loop: arrivals do not wait for
earlier replies; ``time_scale`` stretches or compresses the trace, 0 submits everything at once), steps the
engine whenever it has work, and sleeps until the next arrival when it has none. It reports:

* throughput: output tokens/s, total (prompt + output) tokens/s and requests/s over the wall time from the
  first arrival to the last finish;
* latency: TTFT (arrival to first token) and TPOT (mean time per output token after the first) per request,
  summarised as mean, p50 and p99;
* the prefix cache: queried and hit prompt tokens and the hit rate, tier loads and offloads;
* memory: the peak process RSS over the replay (:class:`~kvstack.bench.metrics.PeakMemory`) and the peak KV
  blocks in use (as MB of the pool);
* scheduling: steps, preemptions, evictions;
* compression (``method``): tokens evicted and blocks released by the token-level policy.

A request the engine refuses (empty, longer than the context, larger than the whole pool) is recorded with
its one-line error in ``rejected`` and the replay goes on: other requests are not disturbed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Hashable
from typing import Any

import numpy as np

from kvstack.bench.metrics import PeakMemory
from kvstack.bench.progress import ProgressBar
from kvstack.bench.workload import Workload, WorkloadRequest
from kvstack.engine.engine import Engine, SamplingParams
from kvstack.engine.paged import BYTES_PER_MB
from kvstack.errors import KVStackError

__all__ = ["EngineBenchResult", "replay"]


@dataclasses.dataclass
class EngineBenchResult:
    """What one replay measured (see the module docstring); times in seconds.

    ``outputs`` maps each workload request id to its generated token ids; ``timings`` to ``{"ttft", "tpot",
    "e2e"}``; ``rejected`` to the error that refused it.
    """

    num_requests: int
    num_completed: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    total_tokens_per_s: float
    requests_per_s: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_mean_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    prefix_cache_queries_tokens: int
    prefix_cache_hits_tokens: int
    prefix_cache_hit_rate: float
    peak_rss_mb: float | None
    peak_rss_method: str
    peak_kv_mb: float
    pool_mb: float
    engine_metrics: dict[str, float | int]
    outputs: dict[str, list[int]]
    timings: dict[str, dict[str, float | None]]
    rejected: dict[str, str]

    def summary(self) -> dict[str, Any]:
        """The scalar figures (no per-request outputs or timings)."""
        skip = {"outputs", "timings", "engine_metrics"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def summary_line(self) -> str:
        """One line: throughput, TTFT, TPOT, hit rate, peak memory."""
        rss = "n/a" if self.peak_rss_mb is None else f"{self.peak_rss_mb:.0f} MB"
        return (
            f"{self.num_completed}/{self.num_requests} requests in {self.duration_s:.1f} s | "
            f"{self.output_tokens_per_s:.1f} output tok/s, {self.total_tokens_per_s:.1f} total tok/s, "
            f"{self.requests_per_s:.2f} req/s | TTFT p50 {self.ttft_p50_s:.3f} s p99 {self.ttft_p99_s:.3f} s | "
            f"TPOT p50 {self.tpot_p50_s * 1e3:.1f} ms p99 {self.tpot_p99_s * 1e3:.1f} ms | "
            f"prefix hit rate {self.prefix_cache_hit_rate:.1%} | peak RSS {rss}, peak KV {self.peak_kv_mb:.1f} MB"
        )


def _stats(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return float("nan"), float("nan"), float("nan")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(np.percentile(array, 50)), float(np.percentile(array, 99))


def replay(
    engine: Engine,
    workload: Workload,
    *,
    time_scale: float = 1.0,
    progress: bool = False,
    sampling: SamplingParams | None = None,
    method: str | None = None,
) -> EngineBenchResult:
    """Run ``workload`` through ``engine`` in real time and measure it.

    Parameters
    ----------
    engine : Engine
        A fresh engine (its metrics are read as deltas over the replay).
    workload : Workload
        The requests; each one's ``max_new_tokens`` overrides ``sampling``'s.
    time_scale : float, optional
        Multiplies arrival times; 0 submits every request at once (an offline batch).
    progress : bool, optional
        Show a progress bar with ETA on stderr.
    sampling : SamplingParams, optional
        Sampling of every request (default greedy, no stop tokens, so output lengths are exact).
    method : str, optional
        A token-level selection method applied to every request inside the engine (e.g.
        ``"snapkv(budget=256)"``); None keeps the full KV.

    Returns
    -------
    EngineBenchResult

    Raises
    ------
    KVStackError
        On a negative ``time_scale``.
    """
    if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not time_scale >= 0:
        raise KVStackError(f"time_scale must be a number >= 0, got {time_scale!r}")
    base = sampling or SamplingParams()
    requests = list(workload)
    before = engine.metrics()
    bar = ProgressBar(progress, len(requests), label="engine-bench", unit="requests")
    with PeakMemory(engine.pool.device) as memory:
        replayed = _drive(engine, requests, time_scale, base, method, bar)
    bar.close()
    return _result(engine, requests, replayed, memory, before, engine.metrics())


@dataclasses.dataclass
class _Replayed:
    """What the replay loop saw: engine request id -> workload request id for each request the engine took,
    the error of each it refused, the most KV blocks in use at once, and the seconds to the last finish."""

    ids: dict[Hashable, str] = dataclasses.field(default_factory=dict)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    peak_used: int = 0
    duration: float = 0.0


def _drive(engine: Engine, requests: list[WorkloadRequest], time_scale: float, base: SamplingParams,
           method: str | None, bar: ProgressBar) -> _Replayed:
    """Submit each request when its arrival time comes, step the engine whenever it has work, and sleep until
    the next arrival when it has none."""
    replayed = _Replayed()
    pool = engine.block_manager.pool
    finished = 0
    next_index = 0
    start = time.perf_counter()
    last_finish = start
    while next_index < len(requests) or engine.has_unfinished():
        now = time.perf_counter() - start
        next_index = _submit_arrivals(engine, requests, next_index, now, time_scale, base, method, replayed)
        if not engine.has_unfinished():
            if next_index < len(requests):
                time.sleep(max(0.0, requests[next_index].arrival_time * time_scale - now))
            continue
        outputs = engine.step()
        replayed.peak_used = max(replayed.peak_used, pool.num_used)
        done = sum(1 for output in outputs if output.finished)
        if done:
            finished += done
            last_finish = time.perf_counter()
            bar.update(finished + len(replayed.rejected), f"{finished} done, "
                                                           f"{len(engine.scheduler.running_request_ids())} running")
    replayed.duration = last_finish - start
    return replayed


def _submit_arrivals(engine: Engine, requests: list[WorkloadRequest], next_index: int, now: float,
                     time_scale: float, base: SamplingParams, method: str | None, replayed: _Replayed) -> int:
    """Submit the requests from ``next_index`` on that have arrived by ``now`` (seconds into the replay);
    returns the index of the first request still to come."""
    while next_index < len(requests) and requests[next_index].arrival_time * time_scale <= now:
        request = requests[next_index]
        next_index += 1
        try:
            params = dataclasses.replace(base, max_new_tokens=request.max_new_tokens)
            replayed.ids[engine.add_request(request.prompt_token_ids, params, method=method)] = request.request_id
        except KVStackError as err:
            replayed.rejected[request.request_id] = str(err)
    return next_index


def _per_request(engine: Engine, requests: list[WorkloadRequest],
                 ids: dict[Hashable, str]) -> tuple[dict[str, list[int]], dict[str, dict[str, float | None]], int]:
    """Each taken request's output tokens and timings (``ttft``, ``tpot``, ``e2e``), by workload request id,
    and the prompt tokens of those requests."""
    outputs: dict[str, list[int]] = {}
    timings: dict[str, dict[str, float | None]] = {}
    prompt_tokens = 0
    prompts = {request.request_id: request for request in requests}
    for engine_id, request_id in ids.items():
        outputs[request_id] = engine.get_output(engine_id)
        timing = engine.request_timing(engine_id)
        timings[request_id] = {"ttft": timing.ttft, "tpot": timing.tpot, "e2e": timing.e2e}
        prompt_tokens += len(prompts[request_id].prompt_token_ids)
    return outputs, timings, prompt_tokens


def _result(engine: Engine, requests: list[WorkloadRequest], replayed: _Replayed, memory: PeakMemory,
            before: dict[str, float | int], after: dict[str, float | int]) -> EngineBenchResult:
    """The figures of a finished replay; the engine's counters as deltas between ``before`` and ``after``."""
    outputs, timings, prompt_tokens = _per_request(engine, requests, replayed.ids)
    output_tokens = sum(len(tokens) for tokens in outputs.values())
    ttft = _stats([t["ttft"] for t in timings.values() if t["ttft"] is not None])
    tpot = _stats([t["tpot"] for t in timings.values() if t["tpot"] is not None])
    queries = int(after["prefix_cache_queries_tokens"] - before["prefix_cache_queries_tokens"])
    hits = int(after["prefix_cache_hits_tokens"] - before["prefix_cache_hits_tokens"])
    completed = len(replayed.ids)
    seconds = max(replayed.duration, 1e-9)
    return EngineBenchResult(
        num_requests=len(requests),
        num_completed=completed,
        duration_s=replayed.duration,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / seconds,
        total_tokens_per_s=(prompt_tokens + output_tokens) / seconds,
        requests_per_s=completed / seconds,
        ttft_mean_s=ttft[0], ttft_p50_s=ttft[1], ttft_p99_s=ttft[2],
        tpot_mean_s=tpot[0], tpot_p50_s=tpot[1], tpot_p99_s=tpot[2],
        prefix_cache_queries_tokens=queries,
        prefix_cache_hits_tokens=hits,
        prefix_cache_hit_rate=hits / queries if queries else 0.0,
        peak_rss_mb=None if memory.peak_rss is None else memory.peak_rss / BYTES_PER_MB,
        peak_rss_method=memory.method,
        peak_kv_mb=replayed.peak_used * engine.pool.bytes_per_block / BYTES_PER_MB,
        pool_mb=engine.pool.nbytes() / BYTES_PER_MB,
        engine_metrics={name: value - before.get(name, 0) if name in _COUNTERS else value
                        for name, value in after.items()},
        outputs=outputs,
        timings=timings,
        rejected=replayed.rejected,
    )


_COUNTERS = frozenset({
    "steps", "preemptions", "batched_tokens_total", "prefix_cache_queries_tokens", "prefix_cache_hits_tokens",
    "prefix_cache_tier_hits_tokens", "evictions", "tier_offloaded_blocks", "tier_loaded_blocks",
    "compression_evicted_tokens", "compression_freed_blocks", "compression_compactions",
})
