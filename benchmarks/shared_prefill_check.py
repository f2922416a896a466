"""Shared prompt reading on SmolLM2 against the committed reference grid (which ran methods one by one).

Runs every reference method that can share its prompt's reading on the first ``--samples`` passkey samples
at 2048 tokens with ``share_prefill=True``: the methods that compress once after the prompt (full, SnapKV,
PyramidKV, Ada-KV over SnapKV, key norm, random, Loki) share one prompt forward (Ada-KV over H2O's three
ratios another, with column statistics); those that evict as they
read (StreamingLLM, H2O, TOVA, Scissorhands), grouped by the statistics one attention call computes (H2O
with Scissorhands: column sums and below-mean counts in one pass; StreamingLLM with TOVA), share the
512-token chunks read before each first evicts. Each sample's prediction and KV bytes are compared with
the same sample of the committed 2k passkey cells in ``benchmarks/results/reference/results.jsonl``,
which were measured one method at a time. Writes ``benchmarks/results/shared_prefill/README.md``.

Ada-KV over H2O compresses once with the scores H2O accumulates over the prompt: its three ratios share
one prompt forward that computes those column statistics.

It then times, on one 2048-token passkey prompt, each family of methods that evict as they read (the three
ratios), and Ada-KV over H2O, read one at a time and read together (``--rounds`` rounds, the order
alternating; medians), all in the same process: the prefill the grid saves. Last, H2O with Scissorhands and
StreamingLLM with TOVA: each family's three ratios sharing chunks (two calls) against all six in one.

Usage::

    python benchmarks/shared_prefill_check.py [--samples 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import cpu_name
from reference_bench import RATIOS, reference_methods

from kvstack.bench import BenchConfig, latest_results, plan_cells, run_bench
from kvstack.bench.runner import shares_prefill

REFERENCE = Path(__file__).parent / "results" / "reference" / "results.jsonl"
OUT = Path(__file__).parent / "results" / "shared_prefill"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.samples < 1 or args.rounds < 1:
        parser.error("--samples and --rounds must be at least 1")
    torch.set_num_threads(os.cpu_count() or 1)
    probe = BenchConfig(methods=reference_methods(), ratios=list(RATIOS), tasks=["passkey"], lengths=[2048])
    methods = [cell.method.spec for cell in plan_cells(probe) if shares_prefill(cell)]
    reference = {r["method"]: r for r in latest_results(REFERENCE) if r["length"] == 2048 and r["task"] == "passkey"
                 and not r.get("prefill_shared_by", 1) > 1}
    with tempfile.TemporaryDirectory() as tmp:
        config = BenchConfig(methods=methods, tasks=["passkey"], lengths=[2048], samples=args.samples,
                             share_prefill=True, out_dir=tmp, progress=False, plots=False)
        started = time.perf_counter()
        result = run_bench(config)
        wall = time.perf_counter() - started
    rows, same, compared = [], 0, 0
    for record in sorted(result.records, key=lambda r: r["method"]):
        expected = reference[record["method"]]["per_sample"]
        matches = [ours["prediction"] == theirs["prediction"] and ours["kv_bytes"] == theirs["kv_bytes"]
                   for ours, theirs in zip(record["per_sample"], expected, strict=False)]
        same, compared = same + sum(matches), compared + len(matches)
        chunks = [row["prompt_chunks_shared"] for row in record["per_sample"] if "prompt_chunks_shared" in row]
        together = f"{sum(chunks) / len(chunks):.1f} of 4 chunks" if chunks else "the whole prompt"
        rows.append(f"| `{record['method']}` | {record['prefill_shared_by']} | {together} | "
                    f"{sum(matches)} / {len(matches)} |")
    lines = [
        "# Shared prompt forward vs methods run one at a time (SmolLM2-135M-Instruct)", "",
        f"Made by `python benchmarks/shared_prefill_check.py --samples {args.samples} --rounds {args.rounds}` on "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} ({cpu_name()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}); run time {wall:.0f} s.", "",
        f"Passkey at 2048 tokens, the first {args.samples} samples: predictions and KV bytes of each method "
        "reading its prompt with others (one shared forward for the methods that compress after the prompt, "
        "another for Ada-KV over H2O's ratios; the 512-token chunks read before each cache first evicts, for "
        "those that evict as they read), against "
        "the same samples of the committed reference cells (one method at a time).", "",
        f"**{same} of {compared} samples identical.**", "",
        "| method | caches sharing | read together (mean per sample) | samples identical |",
        "| --- | ---: | --- | ---: |", *rows, "",
        *chunk_timing(args.rounds),
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "README.md").write_text("\n".join(lines))
    print(f"{same} of {compared} samples identical")
    return 0 if same == compared else 1


def chunk_timing(rounds: int) -> list[str]:
    """Markdown: prefill seconds of each dynamic family's three ratios, one at a time vs sharing chunks, and
    of Ada-KV over H2O's three ratios, one at a time vs one shared forward."""
    import random
    import statistics

    import kvstack
    from kvstack.bench.tasks import get_task

    model, tokenizer = kvstack.load_model("smollm2-135m")
    ids = torch.tensor([get_task("passkey").generate(tokenizer, 2048, random.Random(0)).input_ids])
    families = {name: f"{name}(ratio={{}})" for name in ("streamingllm", "h2o", "tova", "scissorhands")}
    families["adakv(h2o)"] = "adakv(h2o(ratio={}))"
    lines = [f"## Prefill time: one at a time vs read together ({ids.shape[1]} tokens, 512-token chunks)", "",
             f"Each family at ratios {', '.join(map(str, RATIOS))}: the three prefills one after another, and one "
             "`kvstack.prefill_shared_chunks` call (one `kvstack.prefill_shared` call for Ada-KV over H2O, which "
             f"reads its prompt in one forward); median of {rounds} rounds, the order alternating, one process.",
             "", "| methods | one at a time s | together s | saved |", "| --- | ---: | ---: | ---: |"]
    totals = [0.0, 0.0]
    for family, pattern in families.items():
        specs = [pattern.format(ratio) for ratio in RATIOS]
        alone, together = [], []
        for round_index in range(rounds):
            for kind in (("alone", "together") if round_index % 2 == 0 else ("together", "alone")):
                caches = [kvstack.make_cache(model, spec) for spec in specs]
                started = time.perf_counter()
                if kind == "alone":
                    for cache in caches:
                        kvstack.prefill(model, ids, cache)
                    alone.append(time.perf_counter() - started)
                else:
                    if caches[0].method.dynamic:
                        kvstack.prefill_shared_chunks(model, ids, caches)
                    else:
                        kvstack.prefill_shared(model, ids, caches)
                    together.append(time.perf_counter() - started)
                del caches
        one, shared = statistics.median(alone), statistics.median(together)
        totals[0] += one
        totals[1] += shared
        lines.append(f"| `{family}` x 3 | {one:.2f} | {shared:.2f} | {1 - shared / one:.0%} |")
    lines += [f"| all five | {totals[0]:.2f} | {totals[1]:.2f} | {1 - totals[1] / totals[0]:.0%} |", ""]
    lines += [f"## Prefill time: by family vs two families together ({ids.shape[1]} tokens)", "",
              f"Each pair's six caches (both families at ratios {', '.join(map(str, RATIOS))}): one "
              "`kvstack.prefill_shared_chunks` call per family, against one call for all six (their statistics "
              f"come from one attention call); median of {rounds} rounds, the order alternating, one process.", "",
              "| families | by family s | together s | saved |", "| --- | ---: | ---: | ---: |"]
    for pair in (("h2o", "scissorhands"), ("streamingllm", "tova")):
        by_family = [[f"{name}(ratio={ratio})" for ratio in RATIOS] for name in pair]
        apart, joined = [], []
        for round_index in range(rounds):
            for kind in (("apart", "joined") if round_index % 2 == 0 else ("joined", "apart")):
                groups = by_family if kind == "apart" else [by_family[0] + by_family[1]]
                caches = [[kvstack.make_cache(model, spec) for spec in group] for group in groups]
                started = time.perf_counter()
                for group_caches in caches:
                    kvstack.prefill_shared_chunks(model, ids, group_caches)
                (apart if kind == "apart" else joined).append(time.perf_counter() - started)
                del caches
        one, shared = statistics.median(apart), statistics.median(joined)
        lines.append(f"| `{pair[0]}` + `{pair[1]}` x 3 | {one:.2f} | {shared:.2f} | {1 - shared / one:.0%} |")
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
