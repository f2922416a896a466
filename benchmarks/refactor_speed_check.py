"""Decode and prefill speed before and after a change, measured in the same run.

Runs the same measurement in fresh processes, alternating between two source trees (this checkout's ``src``
and an earlier commit's, checked out as a git worktree; each process checks which tree it imported):
decode ms/token at ``--length`` tokens of context for transformers' ``DynamicCache``, kvstack ``full``,
``streamingllm(ratio=0.75)`` and ``snapkv(ratio=0.75)`` (the core benchmark's decode cells), and the
prompt forward's time for ``full``, ``snapkv`` and ``h2o`` (one forward each). Writes ``results.json`` and
``README.md`` under ``benchmarks/results/refactor_speed/``.

    python benchmarks/refactor_speed_check.py --before 6b458bc --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from source_trees import ROOT, checkout, head_commit

OUT = ROOT / "benchmarks" / "results" / "refactor_speed"
DECODE = ["dynamic-cache", "full", "streamingllm(ratio=0.75)", "snapkv(ratio=0.75)"]
PREFILL = ["full", "snapkv(ratio=0.75)", "h2o(ratio=0.75)"]

# One process: load the model, then time every cell; prints one JSON line.
WORKER = r'''
import json, sys, time
import torch
from transformers import DynamicCache
import kvstack
from kvstack.api import prefill

length, steps = int(sys.argv[1]), int(sys.argv[2])
decode_methods, prefill_methods = json.loads(sys.argv[3]), json.loads(sys.argv[4])
torch.manual_seed(0)
model, _ = kvstack.load_model("smollm2-135m", device="cpu")
ids = torch.randint(100, 20000, (1, length))
result = {"tree": kvstack.__file__, "decode_ms": {}, "prefill_s": {}}
with torch.no_grad():
    for spec in decode_methods:
        if spec == "dynamic-cache":
            cache = DynamicCache()
            out = model(input_ids=ids, **kvstack.cache_kwargs(model, cache), use_cache=True)
        else:
            cache = kvstack.make_cache(model, spec)
            out = None
            prefill(model, ids, cache)
        token = torch.tensor([[42]])
        for _ in range(3):  # warm-up
            model(input_ids=token, **kvstack.cache_kwargs(model, cache), use_cache=True)
        start = time.perf_counter()
        for _ in range(steps):
            model(input_ids=token, **kvstack.cache_kwargs(model, cache), use_cache=True)
        result["decode_ms"][spec] = (time.perf_counter() - start) / steps * 1000
        del cache, out
    for spec in prefill_methods:
        cache = kvstack.make_cache(model, spec)
        start = time.perf_counter()
        prefill(model, ids, cache, chunk_size=None)
        result["prefill_s"][spec] = time.perf_counter() - start
        del cache
print("RESULT " + json.dumps(result))
'''


def measure(src: Path, length: int, steps: int) -> dict:
    """One fresh process over the tree at ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", WORKER, str(length), str(steps), json.dumps(DECODE),
                           json.dumps(PREFILL)], env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"measurement failed in {src}:\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    if not result["tree"].startswith(str(src)):
        raise SystemExit(f"the run for {src} imported {result['tree']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="6b458bc", help="the earlier commit (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree, alternating")
    parser.add_argument("--length", type=int, default=4096, help="context tokens")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per cell")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with checkout(args.before) as before_src:
        for round_index in range(args.rounds):
            for tree, src in (("before", before_src), ("after", ROOT / "src")):
                runs[tree].append(measure(src, args.length, args.steps))
                print(f"round {round_index + 1}/{args.rounds}: {tree} done", flush=True)

    def median(tree: str, kind: str, spec: str) -> float:
        return statistics.median(run[kind][spec] for run in runs[tree])

    head = head_commit()
    rows = []
    for spec in DECODE:
        before, after = median("before", "decode_ms", spec), median("after", "decode_ms", spec)
        rows.append({"kind": "decode ms/token", "spec": spec, "before": before, "after": after,
                     "before_vs_dynamic": median("before", "decode_ms", "dynamic-cache") / before,
                     "after_vs_dynamic": median("after", "decode_ms", "dynamic-cache") / after})
    for spec in PREFILL:
        rows.append({"kind": "prefill s", "spec": spec, "before": median("before", "prefill_s", spec),
                     "after": median("after", "prefill_s", spec)})
    record = {
        "command": f"python benchmarks/refactor_speed_check.py --before {args.before} --rounds {args.rounds} "
                   f"--length {args.length} --steps {args.steps}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores",
        "after": head, "load_average_at_end": os.getloadavg(), "rows": rows, "runs": runs,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Speed before and after the redesign", "",
        f"`{record['command']}` on {record['date']}, {record['machine']}; before = `{args.before}`, after = "
        f"`{head}` (the working tree). Medians of {args.rounds} fresh processes per tree, alternating. "
        f"Load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}.", "",
        "| measure | method | before | after | after / before | speed-up vs DynamicCache, before / after |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        versus = (f"{row['before_vs_dynamic']:.2f}x / {row['after_vs_dynamic']:.2f}x"
                  if "before_vs_dynamic" in row else "")
        lines.append(f"| {row['kind']} | `{row['spec']}` | {row['before']:.3f} | {row['after']:.3f} | "
                     f"{row['after'] / row['before']:.3f} | {versus} |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
