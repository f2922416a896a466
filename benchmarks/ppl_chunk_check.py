"""How the harness's perplexity depends on its streaming chunk (``ppl_chunk``), against token-by-token streaming.

The perplexity task reads the first half of an excerpt as the prompt, then teacher-forces the second half
through the same cache in ``ppl_chunk``-token forwards. StreamingLLM's protocol streams one token per forward,
so every scored token sees exactly the compressed cache. With a chunk of C tokens, a token also sees up to C - 1
tokens of its own chunk that the method has not yet had the chance to evict; for a method that evicts as it
goes (StreamingLLM, H2O, TOVA, Scissorhands) the measured perplexity is then optimistic. Methods that compress
once after the prompt keep every streamed token anyway, so the chunk should not matter for them, nor for the
full cache.

This script measures each method's perplexity at several chunk sizes on the same excerpts (SmolLM2-135M-Instruct,
1k tokens, ratio 0.75) and its difference from chunk 1, and the time the streaming took. It chose the harness's
``ppl_stream_chunk`` default (8) for the methods that evict as the text streams.

Usage::

    python benchmarks/ppl_chunk_check.py [--samples 2] [--chunks 1,8,32,256] [--length 1024]
        [--out benchmarks/results/ppl_chunk]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import cpu_name

from kvstack.bench import BenchConfig, latest_results, run_bench
from kvstack.models import load_model

METHODS = ["full", "snapkv(ratio=0.75)", "streamingllm(ratio=0.75)", "h2o(ratio=0.75)", "tova(ratio=0.75)"]


def markdown(records: list[dict], chunks: list[int], command: str, started: str) -> str:
    """Perplexity per method and chunk, its change from the first chunk size, and the streaming time."""
    by = {(r["method"], r["config"]["ppl_chunk"]): r for r in records}
    reference = chunks[0]
    lines = [
        "# Perplexity vs the streaming chunk", "",
        f"- command: `{command}`",
        f"- run started {started}, table written "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} (UTC)",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python "
        f"{platform.python_version()}; SmolLM2-135M-Instruct, fp32",
        f"- {records[0]['samples']} excerpt(s) of {records[0]['length']} tokens (the same for every cell): the first "
        "half read as the prompt, the second half teacher-forced and scored", "",
        f"Perplexity (lower is better) and its change from chunk {reference} (token by token when 1); "
        "stream s: seconds spent streaming the scored half, per excerpt.", "",
        "| method | " + " | ".join(f"chunk {c}" for c in chunks) + " | " + " | ".join(
            f"Δ at {c}" for c in chunks[1:]) + " | " + " | ".join(f"stream s at {c}" for c in chunks) + " |",
        "| --- | " + " | ".join("---:" for _ in range(3 * len(chunks) - 1)) + " |",
    ]
    for method in METHODS:
        cells = [by.get((method, c)) for c in chunks]
        if any(cell is None for cell in cells):
            continue
        base = cells[0]["score"]
        lines.append(
            f"| `{method}` | " + " | ".join(f"{cell['score']:.3f}" for cell in cells) + " | "
            + " | ".join(f"{100 * (cell['score'] / base - 1):+.2f}%" for cell in cells[1:]) + " | "
            + " | ".join(f"{sum(r['stream_s'] for r in cell['per_sample']) / len(cell['per_sample']):.1f}"
                         for cell in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--chunks", default="1,8,32,256", help="comma-separated chunk sizes, the reference first")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--out", default="benchmarks/results/ppl_chunk")
    args = parser.parse_args()
    try:
        chunks = [int(item) for item in args.chunks.split(",") if item.strip()]
    except ValueError:
        parser.error(f"--chunks takes comma-separated positive integers, got {args.chunks!r}")
    if not chunks or min(chunks) < 1:
        parser.error(f"--chunks takes comma-separated positive integers, got {args.chunks!r}")
    torch.set_num_threads(os.cpu_count() or 1)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    model, tokenizer = load_model("smollm2-135m")
    out = Path(args.out)
    for chunk in chunks:
        config = BenchConfig(methods=METHODS, tasks=["perplexity"], lengths=[args.length], samples=args.samples,
                             ppl_chunk=chunk, ppl_stream_chunk=chunk, out_dir=str(out), plots=False,
                             progress=sys.stderr.isatty())
        run_bench(config, model, tokenizer)
    records = [r for r in latest_results(out / "results.jsonl")
               if r["config"]["ppl_chunk"] in chunks and r["length"] == args.length and r["samples"] == args.samples]
    command = (f"python benchmarks/ppl_chunk_check.py --samples {args.samples} --chunks {args.chunks} "
               f"--length {args.length} --out {args.out}")
    (out / "README.md").write_text(markdown(records, chunks, command, started))
    print((out / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
