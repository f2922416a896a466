"""Quantization quality (issue "KV cache quantization"): codecs against the full cache on the harness.

Every codec keeps every token, so the comparison isolates the cost of encoding. All methods read the
same samples (same seed) in the same run: the generation tasks of the harness suite where SmolLM2-135M
scores above zero at 1k-2k tokens (single needles in noise and prose, multi-key, multi-query and
multi-value needles, variable tracking, frequent- and common-word extraction) and long-text perplexity
(the second half of each excerpt is scored while the first half sits in the cache; the streamed tokens
attend to an encoded past).

Bars (issue): average score within 0.5 / 1 / 5 points of the full cache and perplexity at most +0.5% /
+2% / +10% for int8 / KIVI-4 / KIVI-2; the Hadamard rotation must cut KIVI-2's perplexity increase.

Usage::

    python benchmarks/quant_quality.py [--lengths 1024,2048] [--samples 10] [--codecs NAME,...]
        [--out benchmarks/results/quant_quality]
    python benchmarks/quant_quality.py --report-only

The run is resumable (finished cells are kept in ``results.jsonl``). Writes ``README.md`` and
``summary.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import cpu_name

from kvstack.bench import BenchConfig, latest_results, run_bench

CODECS = {
    "int8": "quant(bits=8)",
    "int8 + Hadamard": "quant(bits=8, rotate='hadamard')",
    "KIVI-4": "kivi(bits=4)",
    "KIVI-4 + Hadamard": "kivi(bits=4, rotate='hadamard')",
    "KIVI-4 + sink + value rotation": "kivi(bits=4, sinks=1, residual=31, rotate='hadamard-values')",
    # Chosen by benchmarks/codec_divergence.py (KL to the full cache on held-out samples, seed 1).
    "KIVI-4 + 16 outlier channels + sink + value rotation":
        "kivi(bits=4, outlier_channels=16, outlier_bits=8, value_group_size=64, sinks=1, residual=31, "
        "rotate='hadamard-values')",
    "KIVI-2": "kivi(bits=2)",
    "KIVI-2 + Hadamard": "kivi(bits=2, rotate='hadamard')",
    "KIVI-2 + sink + Hadamard": "kivi(bits=2, sinks=1, rotate='hadamard')",
    "K4V2": "kivi(key_bits=4, value_bits=2)",
    "KVQuant-4": "kvquant(bits=4)",
    "KIVI-2 + 16 outlier channels": "kivi(bits=2, outlier_channels=16, value_group_size=64)",
    "KIVI-2 + 24 outlier channels": "kivi(bits=2, outlier_channels=24, value_group_size=64)",
    "KIVI-2 + 24 outlier channels + sink":
        "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31)",
    "KIVI-2 + 24 outlier channels + sink + value rotation":
        "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31, rotate='hadamard-values')",
    "KIVI-2 + 24 outlier channels + 4 sinks":
        "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=4, residual=28)",
    "KIVI-2 + 24 outlier channels + 4 sinks + value rotation":
        "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=4, residual=28, rotate='hadamard-values')",
}
BARS = {"int8": (0.5, 0.005), "KIVI-4": (1.0, 0.02), "KIVI-2": (5.0, 0.10)}  # score points, perplexity increase
# The rotated variants are judged by their base codec's bar.
BARS.update({"int8 + Hadamard": BARS["int8"], "KIVI-4 + Hadamard": BARS["KIVI-4"],
             "KIVI-4 + sink + value rotation": BARS["KIVI-4"],
             "KIVI-4 + 16 outlier channels + sink + value rotation": BARS["KIVI-4"],
             "KIVI-2 + Hadamard": BARS["KIVI-2"], "KIVI-2 + sink + Hadamard": BARS["KIVI-2"],
             **{name: BARS["KIVI-2"] for name in CODECS if name.startswith("KIVI-2 + ") and "outlier" in name}})
RUNS_FILE = "runs.jsonl"
TASKS = [
    "perplexity", "niah_single_noise", "niah_single_prose", "niah_multikey", "vt", "fwe", "cwe", "niah_multiquery",
    "niah_multivalue",
]  # perplexity and the single needles first, so a partial run already compares every codec on them


def summarize(records: list[dict], lengths: list[int]) -> dict:
    """Per length and codec: mean generation score, perplexity, bits per element, deltas against full."""
    label_of = {}
    from kvstack.spec import parse

    for name, spec in CODECS.items():
        label_of[parse(spec).label()] = name
    label_of["full"] = "full"
    summary: dict = {}
    for length in lengths:
        rows = [r for r in records if r["length"] == length and r["method"] in label_of]
        by_method: dict[str, dict] = {}
        for record in rows:
            by_method.setdefault(label_of[record["method"]], {})[record["task"]] = record
        if "full" not in by_method:
            continue
        tasks = [t for t in TASKS if t != "perplexity" and all(t in v for v in by_method.values())]
        table = {}
        for name, cells in by_method.items():
            counts = [cells[t]["samples"] for t in [*tasks, "perplexity"] if t in cells]
            entry = {"tasks": len(tasks), "samples": min(counts, default=0), "samples_max": max(counts, default=0)}
            if tasks:
                entry["score"] = sum(cells[t]["score"] for t in tasks) / len(tasks)
            if "perplexity" in cells:
                entry["perplexity"] = cells["perplexity"]["score"]
            table[name] = entry
        full = by_method["full"]
        for name, entry in table.items():
            entry["answers_worse"], entry["answers_better"], entry["answers"] = paired_changes(
                by_method[name], full, tasks)
            # deltas against the full cache on the same samples (a codec run with fewer samples than the full
            # cache is compared on the samples it has)
            if tasks:
                reference = [mean_score(full[t], indices(by_method[name][t])) for t in tasks]
                entry["score_delta"] = entry["score"] - sum(reference) / len(tasks)
                entry["score_delta_se"] = paired_standard_error(by_method[name], full, tasks)
            if "perplexity" in entry and "perplexity" in full:
                reference_ppl = perplexity_on(full["perplexity"], indices(by_method[name]["perplexity"]))
                entry["perplexity_increase"] = entry["perplexity"] / reference_ppl - 1.0
            if name in BARS and "score_delta" in entry and "perplexity_increase" in entry:
                points, ppl = BARS[name]
                entry["meets_bar"] = entry["score_delta"] >= -points and entry["perplexity_increase"] <= ppl
        order = ["full", *CODECS]
        table = dict(sorted(table.items(), key=lambda item: order.index(item[0])))
        summary[str(length)] = {"tasks": tasks, "methods": table}
    return summary


def indices(record: dict) -> set[int]:
    """Sample indices a cell record holds."""
    return {row["index"] for row in record["per_sample"]}


def mean_score(record: dict, among: set[int]) -> float:
    """Mean generation score of ``record`` over the samples in ``among``."""
    scores = [row["score"] for row in record["per_sample"] if row["index"] in among]
    return sum(scores) / len(scores)


def perplexity_on(record: dict, among: set[int]) -> float:
    """Token-weighted perplexity of a perplexity cell over the samples in ``among``."""
    rows = [row for row in record["per_sample"] if row["index"] in among]
    return math.exp(sum(row["nll_sum"] for row in rows) / sum(row["scored_tokens"] for row in rows))


def paired_differences(cells: dict[str, dict], full: dict[str, dict], task: str) -> list[float]:
    """Per-sample score minus the full cache's score on the same sample, over the samples both hold."""
    reference = {row["index"]: row["score"] for row in full[task]["per_sample"]}
    return [row["score"] - reference[row["index"]] for row in cells[task]["per_sample"] if row["index"] in reference]


def paired_changes(cells: dict[str, dict], full: dict[str, dict], tasks: list[str]) -> tuple[int, int, int]:
    """``(worse, better, compared)``: generation samples scoring below / above the full cache's same sample."""
    diffs = [d for task in tasks for d in paired_differences(cells, full, task)]
    return sum(d < 0 for d in diffs), sum(d > 0 for d in diffs), len(diffs)


def paired_standard_error(cells: dict[str, dict], full: dict[str, dict], tasks: list[str]) -> float:
    """Standard error of the mean-score delta, from per-sample differences with the full cache.

    The delta is ``mean_t mean_i (s_ti - f_ti)`` over tasks ``t`` and shared samples ``i``, so its variance is
    ``sum_t var_t / n_t / T**2`` with ``var_t`` the sample variance of task ``t``'s differences.
    """
    variance = 0.0
    for task in tasks:
        diffs = paired_differences(cells, full, task)
        if len(diffs) > 1:
            variance += statistics.variance(diffs) / len(diffs)
    return math.sqrt(variance) / len(tasks)


def markdown(summary: dict, runs: list[dict]) -> str:
    lines = [
        "# Quantization quality on the harness (SmolLM2-135M-Instruct, CPU)", "",
        "Made by these runs (each resumable: it skips finished cells, and a larger `--samples` extends them):", "",
        *(f"- `{run['command']}` ({run['date']}{', ' + run['machine'] if run.get('machine') else ''})"
          for run in runs), "",
        f"Report written: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        "Samples: per task cell, the same samples (same seed and index) for every codec; a codec run with fewer "
        "samples than the full cache is compared with the full cache on the samples it has.", "",
        "Score: mean over the generation tasks listed (0-100, string match); perplexity: long-text prose, "
        "second half scored through the cache (lower is better). Deltas are against the full cache on the same "
        "samples. Bars from the issue: int8 within 0.5 points and +0.5% perplexity, KIVI-4 within 1 point and +2%, "
        "KIVI-2 within 5 points and +10%. Answers worse / better: generation samples whose score is below / above "
        "the full cache's on the same sample, out of all samples of the tasks listed. SE: standard error of the "
        "score delta from the per-sample differences (paired), so a delta within about 2 SE of a bar is not "
        "distinguishable from it at these sample counts.", "",
    ]
    for length, block in summary.items():
        lines += [f"## {length} tokens", "", "Tasks: " + ", ".join(block["tasks"]), "",
                  "| codec | spec | samples | score | Δ score ± SE | answers worse / better | perplexity "
                  "| Δ perplexity | bar |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, entry in block["methods"].items():
            spec = CODECS.get(name, "full")
            score = f"{entry['score']:.1f}" if "score" in entry else "–"
            delta = (f"{entry['score_delta']:+.1f} ± {entry['score_delta_se']:.1f}" if "score_delta" in entry
                     else "–")
            ppl = f"{entry['perplexity']:.3f}" if "perplexity" in entry else "–"
            dppl = f"{100 * entry['perplexity_increase']:+.2f}%" if "perplexity_increase" in entry else "–"
            bar = {True: "met", False: "**missed**"}.get(entry.get("meets_bar"), "")
            changed = f"{entry['answers_worse']} / {entry['answers_better']} of {entry['answers']}"
            most = entry.get("samples_max", entry["samples"])
            counts = f"{entry['samples']}" + (f"-{most}" if most > entry["samples"] else "")
            lines.append(f"| {name} | `{spec}` | {counts} | {score} | {delta} | {changed} | {ppl} | {dppl} "
                         f"| {bar} |")
        lines.append("")
        kivi2, rotated = block["methods"].get("KIVI-2", {}), block["methods"].get("KIVI-2 + Hadamard", {})
        if "perplexity_increase" in kivi2 and "perplexity_increase" in rotated:
            lines += [f"Hadamard rotation: KIVI-2 perplexity increase {100 * kivi2['perplexity_increase']:+.2f}% -> "
                      f"{100 * rotated['perplexity_increase']:+.2f}%.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--codecs", default="all",
                        help="comma-separated codec names to run (the full cache always runs); default: all")
    parser.add_argument("--out", default="benchmarks/results/quant_quality")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(CODECS) if args.codecs == "all" else [n.strip() for n in args.codecs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CODECS]
    if unknown:
        parser.error(f"unknown codec {unknown[0]!r}; choose from: {', '.join(CODECS)}")
    if not args.report_only:
        config = BenchConfig(methods=["full", *(CODECS[n] for n in names)], tasks=TASKS, lengths=lengths,
                             samples=args.samples, out_dir=str(out), progress=sys.stderr.isatty(), plots=False)
        run_bench(config)
        command = "python benchmarks/quant_quality.py " + " ".join(
            f"'{a}'" if " " in a else a for a in sys.argv[1:])
        with open(out / RUNS_FILE, "a", encoding="utf-8") as fh:  # the runs that made the results
            fh.write(json.dumps({"command": command.strip(),
                                 "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
                                 "machine": f"{cpu_name()}, {torch.get_num_threads()} torch threads, "
                                            f"torch {torch.__version__}"}) + "\n")
    records = latest_results(out / "results.jsonl")
    summary = summarize(records, lengths)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    runs_path = out / RUNS_FILE
    runs = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.exists() else []
    (out / "README.md").write_text(markdown(summary, runs))
    print(markdown(summary, runs))


if __name__ == "__main__":
    main()
