"""Mixed precision (issue "KV cache quantization", MiKV): evicted entries kept at low precision vs dropped.

SmolLM2-135M-Instruct on the harness, same samples for every method, one run: the full cache, H2O and
SnapKV at compression ratio 0.75 (a quarter of the context kept), and MiKV around each of them with the
evicted three quarters kept at 2 bits (plain and Hadamard-rotated) and 4 bits. Tasks: long-text
perplexity (the cache compressed as the text streams through) and the single-needle tasks in noise and
in prose, at 1k and 2k tokens. Each cell records the bytes the cache holds (the full-precision budget plus
the low-precision remainder, all metadata included).

Usage::

    python benchmarks/mixed_precision_bench.py [--lengths 1024,2048] [--samples 10]
        [--out benchmarks/results/mixed_precision]

Resumable (finished cells stay in ``results.jsonl``); writes ``README.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from kvstack.bench import BenchConfig, latest_results, run_bench

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import cpu_name

METHODS = [
    "full",
    "h2o(ratio=0.75)",
    "mikv(h2o(ratio=0.75), bits=2)",
    "mikv(h2o(ratio=0.75), bits=2, rotate='hadamard')",
    "mikv(h2o(ratio=0.75), bits=4)",
    "snapkv(ratio=0.75)",
    "mikv(snapkv(ratio=0.75), bits=2, rotate='hadamard')",
    "mikv(snapkv(ratio=0.75), bits=4)",
]
TASKS = ["perplexity", "niah_single_noise", "niah_single_prose"]


def markdown(records: list[dict], lengths: list[int], command: str, samples: int) -> str:
    """Per length: each method's perplexity, needle scores and bytes against the full cache."""
    lines = [
        "# Mixed precision (MiKV) on the harness", "",
        f"- command: `{command}`",
        f"- cells finished between {min(r['finished_at'] for r in records)} and "
        f"{max(r['finished_at'] for r in records)} (UTC); table written "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {cpu_name()}; SmolLM2-135M-Instruct, fp32; {samples} samples per needle cell", "",
        "Bytes are the cache's own `kv_bytes()` at the end of the prompt, as a share of the full cache's. "
        "A `mikv(...)` label without `bits` is the default, 2 bits.", "",
    ]
    for length in lengths:
        cells = {(r["method"], r["task"]): r for r in records if r["length"] == length}
        lines += [f"## {length} tokens", "",
                  "| method | perplexity | Δ vs full | niah noise | niah prose | bytes vs full |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        full = cells.get(("full", "perplexity"))
        for method in {r["method"]: None for r in records if r["length"] == length}:
            ppl = cells.get((method, "perplexity"))
            noise = cells.get((method, "niah_single_noise"))
            prose = cells.get((method, "niah_single_prose"))
            share = None
            for cell in (noise, prose):
                if cell and cell.get("kv_bytes_prefill") and cell.get("full_kv_bytes_prefill"):
                    share = cell["kv_bytes_prefill"] / cell["full_kv_bytes_prefill"]
            delta = (ppl["score"] / full["score"] - 1) * 100 if ppl and full else None
            lines.append(
                f"| `{method}` | {ppl['score']:.3f} | {delta:+.2f}% | " if ppl and delta is not None else
                f"| `{method}` | | | "
            )
            lines[-1] += (f"{noise['score']:.1f} | " if noise else " | ") + (f"{prose['score']:.1f} | " if prose else
                                                                             " | ")
            lines[-1] += f"{share:.1%} |" if share is not None else " |"
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/mixed_precision")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    out = Path(args.out)
    command = "python benchmarks/mixed_precision_bench.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    if not args.report_only:
        config = BenchConfig(methods=METHODS, tasks=TASKS, lengths=lengths, samples=args.samples, out_dir=str(out),
                             progress=sys.stderr.isatty())
        run_bench(config)
    records = latest_results(out / "results.jsonl")
    (out / "README.md").write_text(markdown(records, lengths, command.strip(), args.samples))
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
