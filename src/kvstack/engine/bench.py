"""Replay a workload through the engine in real time and measure it: ``kvstack engine-bench``.

:func:`replay` submits each :class:`~kvstack.engine.workload.WorkloadRequest` to an
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

import argparse
import dataclasses
import json
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np

from kvstack.bench.metrics import PeakMemory
from kvstack.bench.runner import ProgressBar
from kvstack.engine.engine import Engine, SamplingParams
from kvstack.engine.paged import BYTES_PER_MB
from kvstack.engine.workload import Workload
from kvstack.errors import KVStackError

__all__ = ["EngineBenchResult", "add_engine_bench_parser", "replay"]

WORKLOAD_KINDS = ("shared-prefix", "multi-turn", "mooncake")


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
    ids: dict[Hashable, str] = {}
    rejected: dict[str, str] = {}
    bar = ProgressBar(progress, len(requests), label="engine-bench", unit="requests")
    pool = engine.block_manager.pool
    peak_used = 0
    finished = 0
    next_index = 0
    with PeakMemory(engine.pool.device) as memory:
        start = time.perf_counter()
        last_finish = start
        while next_index < len(requests) or engine.has_unfinished():
            now = time.perf_counter() - start
            while next_index < len(requests) and requests[next_index].arrival_time * time_scale <= now:
                request = requests[next_index]
                next_index += 1
                try:
                    params = dataclasses.replace(base, max_new_tokens=request.max_new_tokens)
                    ids[engine.add_request(request.prompt_token_ids, params, method=method)] = request.request_id
                except KVStackError as err:
                    rejected[request.request_id] = str(err)
            if not engine.has_unfinished():
                if next_index < len(requests):
                    time.sleep(max(0.0, requests[next_index].arrival_time * time_scale - now))
                continue
            outputs = engine.step()
            peak_used = max(peak_used, pool.num_used)
            done = sum(1 for output in outputs if output.finished)
            if done:
                finished += done
                last_finish = time.perf_counter()
                bar.update(finished + len(rejected), f"{finished} done, {len(engine.scheduler.running_request_ids())} "
                                                      "running")
        duration = last_finish - start
    bar.close()

    after = engine.metrics()
    outputs_by_id: dict[str, list[int]] = {}
    timings: dict[str, dict[str, float | None]] = {}
    ttfts: list[float] = []
    tpots: list[float] = []
    prompt_tokens = output_tokens = 0
    prompts = {request.request_id: request for request in requests}
    for engine_id, request_id in ids.items():
        tokens = engine.get_output(engine_id)
        timing = engine.request_timing(engine_id)
        outputs_by_id[request_id] = tokens
        timings[request_id] = {"ttft": timing.ttft, "tpot": timing.tpot, "e2e": timing.e2e}
        prompt_tokens += len(prompts[request_id].prompt_token_ids)
        output_tokens += len(tokens)
        if timing.ttft is not None:
            ttfts.append(timing.ttft)
        if timing.tpot is not None:
            tpots.append(timing.tpot)
    ttft = _stats(ttfts)
    tpot = _stats(tpots)
    queries = int(after["prefix_cache_queries_tokens"] - before["prefix_cache_queries_tokens"])
    hits = int(after["prefix_cache_hits_tokens"] - before["prefix_cache_hits_tokens"])
    seconds = max(duration, 1e-9)
    return EngineBenchResult(
        num_requests=len(requests),
        num_completed=len(ids),
        duration_s=duration,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / seconds,
        total_tokens_per_s=(prompt_tokens + output_tokens) / seconds,
        requests_per_s=len(ids) / seconds,
        ttft_mean_s=ttft[0], ttft_p50_s=ttft[1], ttft_p99_s=ttft[2],
        tpot_mean_s=tpot[0], tpot_p50_s=tpot[1], tpot_p99_s=tpot[2],
        prefix_cache_queries_tokens=queries,
        prefix_cache_hits_tokens=hits,
        prefix_cache_hit_rate=hits / queries if queries else 0.0,
        peak_rss_mb=None if memory.peak_rss is None else memory.peak_rss / BYTES_PER_MB,
        peak_rss_method=memory.method,
        peak_kv_mb=peak_used * engine.pool.bytes_per_block / BYTES_PER_MB,
        pool_mb=engine.pool.nbytes() / BYTES_PER_MB,
        engine_metrics={name: value - before.get(name, 0) if name in _COUNTERS else value
                        for name, value in after.items()},
        outputs=outputs_by_id,
        timings=timings,
        rejected=rejected,
    )


_COUNTERS = frozenset({
    "steps", "preemptions", "batched_tokens_total", "prefix_cache_queries_tokens", "prefix_cache_hits_tokens",
    "prefix_cache_tier_hits_tokens", "evictions", "tier_offloaded_blocks", "tier_loaded_blocks",
    "compression_evicted_tokens", "compression_freed_blocks", "compression_compactions",
})


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def add_engine_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``engine-bench`` sub-command to ``sub`` (an ``argparse`` sub-parsers object)."""
    parser = sub.add_parser(
        "engine-bench", help="replay a workload through the paged engine: throughput, TTFT/TPOT, hit rate, memory",
        description="Generate (or load) a workload and replay it through kvstack's engine in real time.",
    )
    parser.add_argument("--model", default="smollm2-135m", help="model name or local HF directory")
    parser.add_argument("--workload", default="shared-prefix",
                        help=f"one of {', '.join(WORKLOAD_KINDS)}, or a workload .jsonl file")
    parser.add_argument("--trace", default=None, help="Mooncake-style trace .jsonl (with --workload mooncake); "
                                                      "default: a synthetic trace")
    parser.add_argument("--requests", type=int, default=64, help="requests (conversations for multi-turn)")
    parser.add_argument("--system-tokens", type=int, default=1024, help="shared system prompt length")
    parser.add_argument("--system-prompts", type=int, default=1, help="distinct system prompts")
    parser.add_argument("--unique-tokens", type=int, default=64, help="tokens of each request's own (user turn)")
    parser.add_argument("--output-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (multi-turn)")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrival rate in requests/s "
                                                                 "(default: all at once)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0: all at once)")
    parser.add_argument("--memory-mb", type=float, default=1024.0, help="KV pool budget in MB")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-batched-tokens", type=int, default=512, help="token budget of one step")
    parser.add_argument("--max-seqs", type=int, default=64, help="maximum running sequences")
    parser.add_argument("--policy", default="fcfs", help="scheduling policy: fcfs or lpm")
    parser.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    parser.add_argument("--method", default=None, help="token-level KV policy applied to every request inside the "
                                                       "engine, e.g. 'snapkv(budget=256)' or 'h2o(ratio=0.5)'")
    parser.add_argument("--host-mb", type=float, default=0.0, help="host tier for evicted prefix blocks, MB")
    parser.add_argument("--disk-dir", default=None, help="disk tier directory (survives restarts)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--out", default=None, help="write result.json (and workload.jsonl) to this directory")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_engine_bench)
    return parser


def _build_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    from kvstack.engine import workload as wl

    if args.workload == "shared-prefix":
        return wl.shared_prefix_workload(
            vocab_size=vocab_size, num_requests=args.requests, system_prompt_tokens=args.system_tokens,
            unique_tokens=args.unique_tokens, output_tokens=args.output_tokens,
            num_system_prompts=args.system_prompts, rate_per_s=args.rate, seed=args.seed,
        )
    if args.workload == "multi-turn":
        return wl.multi_turn_workload(
            vocab_size=vocab_size, num_conversations=args.requests, turns=args.turns,
            system_prompt_tokens=args.system_tokens, user_tokens=args.unique_tokens,
            output_tokens=args.output_tokens, rate_per_s=args.rate, num_system_prompts=args.system_prompts,
            seed=args.seed,
        )
    if args.workload == "mooncake":
        if args.trace is not None:
            return wl.load_mooncake_trace(args.trace, vocab_size=vocab_size, seed=args.seed,
                                          max_requests=args.requests)
        records = wl.synthetic_mooncake_trace(num_requests=args.requests, output_length=args.output_tokens,
                                              rate_per_s=args.rate or 1.0, seed=args.seed)
        return wl.mooncake_workload(records, vocab_size=vocab_size, seed=args.seed)
    return Workload.from_jsonl(args.workload)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments before the model is loaded (one line each)."""
    is_file = args.workload not in WORKLOAD_KINDS
    if is_file and not Path(args.workload).is_file():
        raise KVStackError(f"--workload {args.workload!r}: choose one of {', '.join(WORKLOAD_KINDS)} or give an "
                           "existing workload .jsonl file")
    if args.trace is not None and not Path(args.trace).is_file():
        raise KVStackError(f"--trace {args.trace}: no such file")
    for name in ("requests", "output_tokens", "block_size", "max_batched_tokens", "max_seqs", "turns",
                 "system_prompts"):
        if getattr(args, name) < 1:
            raise KVStackError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("system_tokens", "unique_tokens"):
        if getattr(args, name) < 0:
            raise KVStackError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.rate is not None and not args.rate > 0:
        raise KVStackError(f"--rate must be > 0 requests/s, got {args.rate}")
    if args.time_scale < 0:
        raise KVStackError(f"--time-scale must be >= 0, got {args.time_scale}")
    if not args.memory_mb > 0:
        raise KVStackError(f"--memory-mb must be > 0, got {args.memory_mb}")
    if args.host_mb < 0:
        raise KVStackError(f"--host-mb must be >= 0, got {args.host_mb}")
    from kvstack.engine.scheduler import SCHEDULING_POLICIES

    if args.policy not in SCHEDULING_POLICIES:
        raise KVStackError(f"unknown --policy {args.policy!r}; choose one of {', '.join(SCHEDULING_POLICIES)}")
    if args.out is not None:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".kvstack-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise KVStackError(f"--out {out}: cannot write there ({err.strerror or err})") from None


def cmd_engine_bench(args: argparse.Namespace) -> int:
    """Build the workload, load the model, replay, print the summary and write ``result.json``."""
    import datetime
    import platform

    from kvstack.models import load_model

    _check_args(args)
    if args.method is not None:
        from kvstack.engine.compression import engine_method

        engine_method(args.method, 1 << 16, 1)  # refuse a bad spec before loading the model
    model, _ = load_model(args.model, device=args.device)
    workload = _build_workload(args, int(model.config.vocab_size))
    engine = Engine(
        model, memory_mb=args.memory_mb, block_size=args.block_size, max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_seqs, policy=args.policy, enable_prefix_caching=not args.no_prefix_caching,
        host_mb=args.host_mb, disk_dir=args.disk_dir,
    )
    try:
        result = replay(engine, workload, time_scale=args.time_scale, progress=not args.no_progress,
                        method=args.method)
    finally:
        engine.close()
    print(result.summary_line())
    for request_id, error in result.rejected.items():
        print(f"rejected {request_id}: {error}")
    if args.out is not None:
        out = Path(args.out)
        workload.to_jsonl(out / "workload.jsonl")
        record = {
            "command": "kvstack engine-bench " + " ".join(_argv_of(args)),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} {_cpu_count()} cores".strip(),
            "workload": workload.summary(),
            **result.summary(),
            "engine_metrics": result.engine_metrics,
            "timings": result.timings,
        }
        (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out / 'result.json'}")
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    parts = []
    for name, value in sorted(vars(args).items()):
        if name in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return parts


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
