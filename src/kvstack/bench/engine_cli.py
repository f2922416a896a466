"""``kvstack engine-bench``: the command-line face of :func:`kvstack.bench.engine_replay.replay`.

The parser and the argument checks import no torch, so help and usage errors answer at once; the engine and
the model are imported only when a replay runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvstack.errors import KVStackError

__all__ = ["WORKLOAD_KINDS", "add_engine_bench_parser", "cmd_engine_bench"]

WORKLOAD_KINDS = ("shared-prefix", "multi-turn", "mooncake")



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
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of the forward (default: the CPUs this process may use, less those "
                             "other processes keep busy)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_engine_bench)
    return parser


def _build_workload(args: argparse.Namespace, vocab_size: int) -> Any:
    from kvstack.bench import workload as wl

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
    return wl.Workload.from_jsonl(args.workload)


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
    if args.threads is not None and args.threads < 1:
        raise KVStackError(f"--threads must be >= 1, got {args.threads}")
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

    _check_args(args)
    from kvstack.bench.engine_replay import replay
    from kvstack.engine.engine import Engine
    from kvstack.models import load_model

    if args.method is not None:
        from kvstack.engine.compression import engine_method

        engine_method(args.method, 1 << 16, 1, args.block_size)  # refuse a bad spec before loading the model
    model, _ = load_model(args.model, device=args.device)
    workload = _build_workload(args, int(model.config.vocab_size))
    engine = Engine(
        model, memory_mb=args.memory_mb, block_size=args.block_size, max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_seqs, policy=args.policy, enable_prefix_caching=not args.no_prefix_caching,
        host_mb=args.host_mb, disk_dir=args.disk_dir, threads=args.threads,
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
