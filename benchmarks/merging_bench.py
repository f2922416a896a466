"""Does merging beat dropping at equal bytes? (issue 32: CaM, D2O and KVMerger over their eviction base.)

Each merging method wraps H2O, evicts exactly what H2O alone evicts, and folds it into what it keeps. The
grid runs the base and the three merging methods at ratios 0.5 and 0.75 on the suite's needle tasks
(single needle with noise and prose haystacks, multi-key, multi-key UUID, multi-value, multi-query,
passkey, the needle grid's depths), variable tracking and perplexity, at 1k and 2k tokens, 20 samples per
cell, with the same harness version and seeds for every method; the four methods of one ratio read each
sample's first prompt chunk together (``--share-prefill``: they ask for the same statistics).

It is :func:`kvstack.bench.run_bench`, so it is resumable: run it again and it carries on; ``--max-minutes``
stops it cleanly at the first checkpoint past that time. ``--lengths``, ``--ratios`` and ``--tasks`` run a part.

The report (``README.md`` beside the results) pairs every merging cell with its base's cell sample by sample:
the mean score delta over the task cells with its paired standard error (per cell, the variance of the
sample deltas over their count; cells independent), the bytes held against the base's, and perplexity.
``--cost`` times prefill and decoding of each method against its base in one process (interleaved
repeats, medians): the overhead of scoring and merging.

Usage::

    python benchmarks/merging_bench.py [--lengths 1024,2048] [--ratios 0.5,0.75] [--tasks passkey,vt]
        [--methods cam-capped,d2o-uniform,kvmerger] [--max-minutes 60] [--out benchmarks/results/merging]
        [--report-only] [--cost]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import run_grid, stamp, time_caches

from kvstack.bench import BenchConfig, latest_results, plan_cells

OUT = "benchmarks/results/merging"
BASE = "h2o(ratio={ratio})"
MERGING = ["cam(h2o(ratio={ratio}))", "d2o(h2o(ratio={ratio}))", "kvmerger(h2o(ratio={ratio}))",
           "cam(h2o(ratio={ratio}), proportional=True)", "cam(h2o(ratio={ratio}), proportional=True, max_mass=2.0)",
           "d2o(h2o(ratio={ratio}), layers='uniform')"]
NAMES = dict(zip(MERGING, ["cam", "d2o", "kvmerger", "cam-proportional", "cam-capped", "d2o-uniform"], strict=True))
TASKS = ["passkey", "niah_single_noise", "niah_single_prose", "niah_multikey", "niah_multikey_uuid",
         "niah_multivalue", "niah_multiquery", "niah", "vt", "perplexity"]
SAMPLES = 20
BYTES_SLACK = 0.02  # the bar: at most 2% more bytes than the base


def config(lengths: list[int], ratios: list[float], tasks: list[str], out: str,
           merging: list[str] = MERGING) -> BenchConfig:
    """The merging grid (or part of it: ``merging`` templates beside the base)."""
    return BenchConfig(methods=[BASE, *merging], ratios=ratios, tasks=tasks, lengths=lengths, samples=SAMPLES,
                       out_dir=out, progress=sys.stderr.isatty(), share_prefill=True, checkpoint_every=2)


def cell_id(record: dict) -> tuple:
    """What pairs a merging cell with its base's: task, variant, depth, length, ratio."""
    return record["task"], record["variant"], record["depth"], record["length"], record["ratio"]


def paired(records: list[dict], bases: dict[tuple, dict]) -> dict | None:
    """Mean over task cells of (method - base) and its paired standard error; bytes and perplexity ratios."""
    deltas, variances, method_scores, base_scores, byte_ratios, ppl = [], [], [], [], [], []
    for record in records:
        base = bases.get(cell_id(record))
        if base is None:
            continue
        byte_ratios.append(record["kv_bytes"] / base["kv_bytes"])
        if record["task"] == "perplexity":
            ppl.append((record["score"], base["score"]))
            continue
        pairs = [(a["score"], b["score"]) for a, b in zip(record["per_sample"], base["per_sample"], strict=True)]
        diffs = [a - b for a, b in pairs]
        deltas.append(statistics.fmean(diffs))
        variances.append(statistics.variance(diffs) / len(diffs) if len(diffs) > 1 else 0.0)
        method_scores.append(record["score"])
        base_scores.append(base["score"])
    if not deltas:
        return None
    count = len(deltas)
    return {
        "cells": count, "score": statistics.fmean(method_scores), "base_score": statistics.fmean(base_scores),
        "delta": statistics.fmean(deltas), "se": math.sqrt(sum(variances)) / count,
        "bytes_ratio": statistics.fmean(byte_ratios), "ppl": ppl[0][0] if ppl else None,
        "base_ppl": ppl[0][1] if ppl else None,
    }


def report(out: str) -> str:
    """The README's tables from ``results.jsonl``."""
    records = latest_results(Path(out) / "results.jsonl")
    bases = {cell_id(r): r for r in records if r["method"].startswith("h2o(")}
    rows = []
    for template in MERGING:
        name = NAMES[template]
        for ratio in (0.5, 0.75):
            for length in (1024, 2048):
                mine = [r for r in records if r["method"] == template.format(ratio=ratio) and r["length"] == length]
                result = paired(mine, bases)
                if result is not None:
                    rows.append((name, ratio, length, result))
    lines = ["| method | ratio | length | task cells | score | H2O score | delta ± paired SE | bytes / H2O's "
             "| perplexity (H2O) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, ratio, length, r in rows:
        ppl = f"{r['ppl']:.2f} ({r['base_ppl']:.2f})" if r["ppl"] is not None else "-"
        lines.append(f"| {name} | {ratio} | {length} | {r['cells']} | {r['score']:.2f} | {r['base_score']:.2f} | "
                     f"{r['delta']:+.2f} ± {r['se']:.2f} | {r['bytes_ratio']:.4f} | {ppl} |")
    lines += ["", "Bar (ratio 0.75, mean over the cells measured): at least the base's score at no more than 2% "
              "more bytes.", ""]
    for template in MERGING:
        name = NAMES[template]
        mine = [r for r in records if r["method"] == template.format(ratio=0.75)]
        result = paired(mine, bases)
        if result is None:
            continue
        met = result["delta"] >= 0 and result["bytes_ratio"] <= 1 + BYTES_SLACK
        lines.append(f"- {name} at 0.75, over {result['cells']} task cells (1k and 2k as measured): delta "
                     f"{result['delta']:+.2f} ± {result['se']:.2f}, bytes {result['bytes_ratio']:.4f} of H2O's: "
                     f"{'met' if met else 'not met'}")
    return "\n".join(lines)


def cost(out: str, lengths: list[int], repeats: int) -> str:
    """Prefill seconds and decode seconds per token of each method against H2O, interleaved, medians."""
    import kvstack
    from kvstack.prose import load_prose

    model, tokenizer = kvstack.load_model("smollm2-135m")
    text_ids = tokenizer(load_prose(), return_tensors="pt").input_ids[0]
    decode = 32
    lines = ["| length | method | prefill s | decode ms/token | prefill / H2O | decode / H2O |",
             "| --- | --- | --- | --- | --- | --- |"]
    for length in lengths:
        ids = text_ids[:length].unsqueeze(0)
        specs = [t.format(ratio=0.75) for t in (BASE, *MERGING)]
        times = time_caches(model, ids, specs, repeats, decode)
        base_prefill, base_decode = times[specs[0]]
        for spec in specs:
            prefill, step = times[spec]
            lines.append(f"| {length} | `{spec}` | {prefill:.3f} | {step * 1000:.1f} | {prefill / base_prefill:.3f} | "
                         f"{step / base_decode:.3f} |")
    text = "\n".join(lines)
    Path(out, "cost.md").write_text(f"Command: `python benchmarks/merging_bench.py --cost`; {stamp()}\n\n{text}\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--cost", action="store_true", help="time each method against H2O (no grid)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(NAMES.values()),
                        help=f"merging methods run beside H2O (of {', '.join(NAMES.values())})")
    args = parser.parse_args()
    by_name = {name: template for template, name in NAMES.items()}
    unknown = sorted(set(args.methods.split(",")) - set(by_name))
    if unknown:
        parser.error(f"unknown merging method {unknown[0]!r}; choose from {', '.join(by_name)}")
    lengths = [int(x) for x in args.lengths.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.cost:
        print(cost(args.out, lengths, args.repeats))
        return
    if not args.report_only:
        grid = config(lengths, [float(x) for x in args.ratios.split(",")], args.tasks.split(","), args.out,
                      [by_name[name] for name in args.methods.split(",")])
        print(f"{len(plan_cells(grid))} cells planned", flush=True)
        run_grid(grid, args.max_minutes)
    table = report(args.out)
    Path(args.out, "tables.md").write_text(f"Command: `python benchmarks/merging_bench.py --report-only`; "
                                           f"{stamp()}\n\n{table}\n")
    print(table)
    print(json.dumps({"out": args.out}))


if __name__ == "__main__":
    main()
