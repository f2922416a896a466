"""The fused C++ kernels are compiled once per machine, not once per virtual environment.

Creates two fresh virtual environments (``python -m venv``, then ``pip install torch==2.13.0 -e <repo>``,
with ``-c constraints.txt`` where the repo has one), points both at one fresh ``TORCH_EXTENSIONS_DIR`` and
times a process that calls ``kvstack.cache.kernels.available()`` in each:

* in order: env 1 (compiles), env 2 (should only load env 1's library), env 1 again (no flip-flop);
* at the same time, on another fresh directory: one compiles, the other waits for that build, then loads.

Each process reports the seconds to import kvstack and the seconds ``available()`` took; the wall time is
the whole process (python start, torch import). Writes ``benchmarks/results/kernel_build/README.md`` and
``results.json``.

Usage::

    python benchmarks/kernel_build_check.py [--venvs DIR]   # DIR: keep (and reuse) the two environments there
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "kernel_build"
TORCH = "torch==2.13.0"

SNIPPET = """
import json, sys, time
started = time.perf_counter()
import torch
from kvstack.cache import kernels
imported = time.perf_counter()
ok = kernels.available()
done = time.perf_counter()
print(json.dumps({"available": ok, "import_s": imported - started, "call_s": done - imported,
                  "prefix": sys.prefix, "torch": torch.__version__}))
"""


def cpu_model() -> str:
    """``lscpu``'s model name (the CPU the build targets with ``-march=native``)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def make_env(path: Path) -> tuple[Path, float | None]:
    """A virtual environment at ``path`` with torch and kvstack (editable), and the seconds that took.

    One that already imports both is reused (seconds ``None``).
    """
    python = path / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import kvstack, torch"]).returncode == 0:
        return python, None
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    command = [str(python), "-m", "pip", "install", "--quiet", TORCH, "-e", str(REPO)]
    if (REPO / "constraints.txt").exists():
        command += ["-c", str(REPO / "constraints.txt")]
    subprocess.run(command, check=True)
    return python, time.perf_counter() - started


def child_env(extensions: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "KVSTACK_KERNELS")}
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    return env


def start(python: Path, extensions: Path) -> tuple[subprocess.Popen[str], float]:
    process = subprocess.Popen([str(python), "-c", SNIPPET], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=child_env(extensions))
    return process, time.perf_counter()


def finish(name: str, process: subprocess.Popen[str], started: float) -> dict[str, Any]:
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{name} failed ({process.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    said = [line for line in stderr.splitlines() if line.startswith("kvstack:")]
    result.update(env=name, wall_s=wall, said=said,
                  compiled=any(line.startswith("kvstack: compiling") for line in said),
                  waited=any(line.startswith("kvstack: waiting") for line in said))
    print(f"  {name}: process {wall:.1f} s, available() {result['call_s']:.2f} s"
          f"{' (compiled)' if result['compiled'] else ''}{' (waited)' if result['waited'] else ''}", flush=True)
    return result


def libraries(extensions: Path) -> list[dict[str, Any]]:
    return [{"path": str(p.relative_to(extensions)), "mtime_ns": p.stat().st_mtime_ns}
            for p in sorted(extensions.rglob("*.so"))]


def write_readme(report: dict[str, Any]) -> None:
    seq, conc = report["sequential"], report["concurrent"]

    def row(r: dict[str, Any]) -> str:
        what = "compiled" if r["compiled"] else ("waited, then loaded" if r["waited"] else "loaded")
        return f"| {r['env']} | {what} | {r['wall_s']:.1f} | {r['import_s']:.2f} | {r['call_s']:.2f} |"

    header = ["| process | what it did | process wall (s) | import kvstack (s) | `available()` (s) |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines = [
        "# The fused C++ kernels: compiled once per machine, loaded by every virtual environment",
        "",
        f"Made by `{report['command']}` on {report['date']} ({report['machine']}, "
        f"{report['cores']} cores, {report['torch']}); run time {report['run_s']:.0f} s.",
        "",
        "Two fresh virtual environments (`python -m venv`, then "
        f"`pip install {TORCH} -e <repo>{' -c constraints.txt' if report['constraints'] else ''}`), both pointed "
        "at one fresh `TORCH_EXTENSIONS_DIR`. Each process imports torch and kvstack and calls "
        "`kvstack.cache.kernels.available()`; the wall time is the whole process (python start and torch import "
        "included).",
        "",
        "## One after the other",
        "",
        *header,
        *(row(r) for r in seq),
        "",
        f"Env 1's first use compiles in **{seq[0]['call_s']:.0f} s**; env 2 then loads that library in "
        f"**{seq[1]['call_s']:.2f} s**, and env 1 again in {seq[2]['call_s']:.2f} s (no rebuild: the library's "
        f"mtime is {'unchanged' if report['library_unchanged'] else 'CHANGED'}; {len(report['libraries'])} "
        "library in the directory).",
        "",
        "## Both at the same time",
        "",
        *header,
        *(row(r) for r in conc),
        "",
        "One compiles; the other finds the build lock held, says it is waiting, and loads the published library "
        "as soon as the build ends, without compiling it again.",
        "",
        "What each printed on stderr (nothing, on a load):",
        "",
        *(f"- {r['env']}{when}: " + ("; ".join(f"`{line}`" for line in r["said"]) or "nothing")
          for when, runs in (("", seq), (", at the same time", conc)) for r in runs),
        "",
        "Setting up the two environments (not part of the figures): "
        + " and ".join("reused from an earlier run" if s is None else f"{s:.0f} s" for s in report["setup_s"])
        + ".",
        "",
    ]
    (OUT / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venvs", type=Path, help="keep (and reuse) the two environments in this directory")
    args = parser.parse_args()
    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kvstack-kernel-build-"))
    venvs = args.venvs.resolve() if args.venvs else work
    try:
        print("setting up two virtual environments...", flush=True)
        (env1, setup1), (env2, setup2) = make_env(venvs / "env1"), make_env(venvs / "env2")

        print("one after the other:", flush=True)
        shared = work / "extensions-sequential"
        sequential = [finish("env 1", *start(env1, shared))]
        before = libraries(shared)
        sequential += [finish("env 2", *start(env2, shared)), finish("env 1 again", *start(env1, shared))]
        after = libraries(shared)

        print("at the same time:", flush=True)
        together = work / "extensions-concurrent"
        first, second = start(env1, together), start(env2, together)
        concurrent = [finish("env 1", *first), finish("env 2", *second)]

        report = {
            "command": " ".join(["python", "benchmarks/kernel_build_check.py", *sys.argv[1:]]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": cpu_model(), "cores": os.cpu_count(), "torch": f"torch {sequential[0]['torch']}",
            "constraints": (REPO / "constraints.txt").exists(), "setup_s": [setup1, setup2],
            "sequential": sequential, "concurrent": concurrent, "libraries": after,
            "library_unchanged": before == after, "concurrent_libraries": libraries(together),
            "run_s": time.perf_counter() - began,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(report)
    print(f"wrote {OUT / 'README.md'}")


if __name__ == "__main__":
    main()
