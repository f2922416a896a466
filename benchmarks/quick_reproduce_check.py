"""The quick bench before and after a change: every cell's score and every sample's prediction, compared.

Runs ``kvstack bench --quick`` twice in one go, first with an earlier commit's ``src`` (a git worktree), then
with this checkout's, into scratch directories, and compares the two cell by cell: the score, and every
sample's prediction (generation tasks) or NLL (perplexity). Writes ``README.md`` and ``comparison.json``
under ``benchmarks/results/quick_reproduce/``.

    python benchmarks/quick_reproduce_check.py --before 6b458bc
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

sys.path.insert(0, str(Path(__file__).parent))
from source_trees import ROOT, checkout, head_commit

OUT = ROOT / "benchmarks" / "results" / "quick_reproduce"


def run_quick(src: Path, out_dir: Path) -> float:
    """``kvstack bench --quick`` with the package at ``src``; returns its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kvstack.cli", "bench", "--quick", "--out", str(out_dir),
                           "--no-progress", "--no-plots"], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"kvstack bench --quick failed with {src}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def cells(out_dir: Path) -> dict[str, dict]:
    """The cells of a run, keyed by (task, variant, length, method)."""
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    return {f"{r['task']}|{r.get('variant', '')}|{r['length']}|{r['method']}": r for r in records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="6b458bc", help="the earlier commit (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        with checkout(args.before) as before_src:
            before_s = run_quick(before_src, Path(scratch) / "before")
        after_s = run_quick(ROOT / "src", Path(scratch) / "after")
        before, after = cells(Path(scratch) / "before"), cells(Path(scratch) / "after")
    differing = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old is None or new is None:
            differing.append({"cell": key, "why": "missing in one run"})
            continue
        old_samples = [(s.get("prediction"), s.get("nll_sum")) for s in old["per_sample"]]
        new_samples = [(s.get("prediction"), s.get("nll_sum")) for s in new["per_sample"]]
        if old["score"] != new["score"] or old_samples != new_samples:
            differing.append({"cell": key, "before": old["score"], "after": new["score"]})
    head = head_commit()
    record = {
        "command": f"python benchmarks/quick_reproduce_check.py --before {args.before}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores",
        "before": args.before, "after": head, "cells": len(after), "identical": len(after) - len(differing),
        "differing": differing, "before_wall_s": round(before_s, 1), "after_wall_s": round(after_s, 1),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "comparison.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# The quick bench before and after the redesign", "",
        f"`{record['command']}` on {record['date']}, {record['machine']}: `kvstack bench --quick` with "
        f"`{args.before}`'s code, then with `{head}`'s (the working tree), compared cell by cell (score and "
        "every sample's prediction or NLL).", "",
        f"- cells: {record['cells']}; identical: {record['identical']}; differing: {len(differing)}",
        f"- wall time: before {record['before_wall_s']} s, after {record['after_wall_s']} s (plots off)",
    ]
    lines += [f"- differs: `{d['cell']}` ({d.get('before')} -> {d.get('after')})" for d in differing]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not differing else 1


if __name__ == "__main__":
    sys.exit(main())
