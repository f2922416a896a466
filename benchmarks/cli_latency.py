"""Wall time of CLI calls that need no model, before and after a change, in one run.

Times ``kvstack --help``, ``kvstack methods`` and a spec typo (``generate --method "snapkv(ratio=abc)"``)
as whole processes, alternating between two source trees: this checkout's ``src`` and the ``src`` of an
earlier commit, checked out as a git worktree, both run by this Python with ``PYTHONPATH`` pointing at
the tree (each run checks which tree it imported). Writes ``results.json`` and ``README.md`` under
``benchmarks/results/cli_latency/``.

    python benchmarks/cli_latency.py --before 6b458bc --rounds 7
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from source_trees import ROOT, checkout, head_commit

OUT = ROOT / "benchmarks" / "results" / "cli_latency"

COMMANDS: dict[str, list[str]] = {
    "kvstack --help": ["--help"],
    "kvstack methods": ["methods"],
    'kvstack generate --method "snapkv(ratio=abc)" --prompt hi': ["generate", "--method", "snapkv(ratio=abc)",
                                                                   "--prompt", "hi"],
}
# Run the CLI, then say which tree was imported and whether torch was.
RUNNER = (
    "import sys, runpy\n"
    "sys.argv = ['kvstack', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('kvstack.cli', run_name='__main__')\n"
    "except SystemExit:\n"
    "    pass\n"
    "import kvstack\n"
    "print('TREE', kvstack.__file__, 'torch' in sys.modules, file=sys.stderr)\n"
)


def time_once(src: Path, argv: list[str]) -> tuple[float, str, bool]:
    """Seconds one CLI process took, the ``kvstack`` package file it imported, and whether it imported torch."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    seconds = time.perf_counter() - start
    tree_line = [line for line in done.stderr.splitlines() if line.startswith("TREE ")][-1]
    _, package_file, torch_imported = tree_line.split(" ")
    return seconds, package_file, torch_imported == "True"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="6b458bc", help="the earlier commit (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="runs of each command in each tree")
    args = parser.parse_args()

    with checkout(args.before) as before_src:
        trees = {"before": before_src, "after": ROOT / "src"}
        times: dict[str, dict[str, list[float]]] = {name: {tree: [] for tree in trees} for name in COMMANDS}
        imported_torch: dict[str, dict[str, bool]] = {name: {} for name in COMMANDS}
        for _ in range(args.rounds):
            for name, argv in COMMANDS.items():
                for tree, src in trees.items():  # alternate, so drifting load hits both alike
                    seconds, package_file, torch_imported = time_once(src, argv)
                    if not package_file.startswith(str(src)):
                        raise SystemExit(f"{tree} run imported {package_file}, not the tree at {src}")
                    times[name][tree].append(seconds)
                    imported_torch[name][tree] = torch_imported

    rows = []
    for name in COMMANDS:
        before, after = times[name]["before"], times[name]["after"]
        rows.append({
            "command": name,
            "before_median_s": statistics.median(before), "before_min_s": min(before), "before_max_s": max(before),
            "after_median_s": statistics.median(after), "after_min_s": min(after), "after_max_s": max(after),
            "speedup": statistics.median(before) / statistics.median(after),
            "before_imports_torch": imported_torch[name]["before"],
            "after_imports_torch": imported_torch[name]["after"],
        })
    machine = f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores".replace(" ,", ",")
    head = head_commit()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True,
                           text=True).stdout.strip()
    after = f"`{head}`" + (" plus uncommitted changes under src/" if dirty else "")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    record = {
        "command": f"python benchmarks/cli_latency.py --before {args.before} --rounds {args.rounds}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "python": platform.python_version(), "rounds": args.rounds, "after": after,
        "load_average_at_end": load, "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# CLI latency: calls that need no model", "",
        f"`{record['command']}` on {record['date']}, {machine}, Python {record['python']}.", "",
        f"Whole-process wall time, {args.rounds} runs of each command in each tree, alternating; before = "
        f"`{args.before}`, after = {after}. Load average at the end: {load} (other work on the machine slows "
        "both trees alike).", "",
        "| command | before: median (min-max) | after: median (min-max) | speed-up | imports torch before / after |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| `{row['command']}` | {row['before_median_s']:.2f} s "
            f"({row['before_min_s']:.2f}-{row['before_max_s']:.2f})"
            f" | {row['after_median_s']:.3f} s ({row['after_min_s']:.3f}-{row['after_max_s']:.3f})"
            f" | {row['speedup']:.0f}x | {row['before_imports_torch']} / {row['after_imports_torch']} |"
        )
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
