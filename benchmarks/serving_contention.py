"""Engine throughput on a shared CPU: the default ``kvstack engine-bench`` workload, quiet and with one busy
process competing, with the automatic thread count and with a fixed count of every core (the old default).

Each case is a fresh ``kvstack engine-bench`` process (64 shared-prefix requests, default engine); a busy
case starts ``python -c "while True: pass"`` a second before and kills it after. The figure is the replay's
own wall time (``duration_s`` of its result.json) and the bar is busy / quiet <= 2.5 with the default.
Writes ``results.json`` and ``README.md`` under ``benchmarks/results/serving/contention/``.

    python benchmarks/serving_contention.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "serving" / "contention"
BAR = 2.5


def run_case(threads: int | None, busy: bool, requests: int) -> dict[str, object]:
    """One engine-bench process; its duration, throughput and the thread count the engine ended with."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "kvstack.cli", "engine-bench", "--no-progress", "--requests", str(requests),
                   "--out", out]
        if threads is not None:
            command += ["--threads", str(threads)]
        competitor = None
        if busy:
            competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1.0)
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=1200)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        result = json.loads((Path(out) / "result.json").read_text())
    return {
        "threads": "auto" if threads is None else threads,
        "busy": busy,
        "duration_s": round(result["duration_s"], 2),
        "output_tokens_per_s": round(result["output_tokens_per_s"], 1),
        "ttft_p50_s": round(result["ttft_p50_s"], 3),
        "threads_at_end": result["engine_metrics"].get("threads"),
        "num_completed": result["num_completed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests of the shared-prefix workload")
    parser.add_argument("--fixed", type=int, default=len(os.sched_getaffinity(0)),
                        help="the fixed thread count to compare with (default: every allowed core)")
    args = parser.parse_args()
    cases = [(None, False), (None, True), (args.fixed, False), (args.fixed, True)]
    rows = []
    for threads, busy in cases:
        row = run_case(threads, busy, args.requests)
        print(json.dumps(row), flush=True)
        rows.append(row)
    by_case = {(row["threads"], row["busy"]): row["duration_s"] for row in rows}
    auto_ratio = by_case[("auto", True)] / by_case[("auto", False)]
    fixed_ratio = by_case[(args.fixed, True)] / by_case[(args.fixed, False)]
    record = {
        "command": "python benchmarks/serving_contention.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {len(os.sched_getaffinity(0))} cores".strip(),
        "rows": rows,
        "busy_over_quiet_auto": round(auto_ratio, 2),
        "busy_over_quiet_fixed": round(fixed_ratio, 2),
        "bar": BAR,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Engine throughput with a competing busy process",
        "",
        f"`{record['command']}` on {record['date']}, {record['machine']}.",
        "",
        f"Default `kvstack engine-bench` workload ({args.requests} shared-prefix requests), each case a fresh process;",
        "a busy case runs `python -c \"while True: pass\"` beside it. Duration is the replay's wall time.",
        "",
        "| threads | competing process | duration (s) | output tok/s | TTFT p50 (s) | threads at end |",
        "|---|---|---|---|---|---|",
        *(f"| {r['threads']} | {'yes' if r['busy'] else 'no'} | {r['duration_s']} | {r['output_tokens_per_s']} | "
          f"{r['ttft_p50_s']} | {r['threads_at_end']} |" for r in rows),
        "",
        f"Busy / quiet: **{auto_ratio:.2f}x** with the automatic count (bar: at most {BAR}x), "
        f"{fixed_ratio:.2f}x with {args.fixed} fixed threads.",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))
    print(f"busy/quiet auto {auto_ratio:.2f}x, fixed {fixed_ratio:.2f}x; wrote {OUT}")


if __name__ == "__main__":
    main()
