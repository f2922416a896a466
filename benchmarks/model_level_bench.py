"""Model-level KV reduction (issue 33): transformed models against token-level compression at the same bytes.

Each transform setting (``gqa`` to one KV head per layer: mean-pooling, similarity grouping, absorbed SVD) is
applied to SmolLM2-135M with :func:`kvstack.transform` and measured with the full cache of the new model:
perplexity at 1k and 2k and the suite's needle tasks and variable tracking at 1k, 20 samples per cell, through
:func:`kvstack.bench.run_bench` (resumable; each transform is its own model name in the results). The
untransformed model runs the token-level methods at about the same bytes (a third of the cache: SnapKV at
ratio 0.67, KIVI-4, Palu at rank 21), and the full cache.

Usage::

    python benchmarks/model_level_bench.py [--settings mean,svd] [--tasks perplexity] [--ppl-lengths 1024]
        [--max-minutes 30] [--report-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import run_grid, stamp

from kvstack.bench import BenchConfig, latest_results

OUT = "benchmarks/results/model_level"
MODEL = "smollm2-135m"
TRANSFORMS = {"mean": "gqa(kv_heads=1)", "similarity": "gqa(kv_heads=1, how='similarity')",
              "svd": "gqa(kv_heads=1, how='svd')", "svd-repair": "gqa(kv_heads=1, how='svd') + repair()",
              "mean-repair": "gqa(kv_heads=1) + repair()"}
TOKEN_LEVEL = ["snapkv(ratio=0.67)", "kivi(bits=4)", "palu(rank=21)"]
SUITE = ["passkey", "niah_single_noise", "niah_multikey", "vt"]
SAMPLES = 20


def run(out: str, settings: list[str], tasks: list[str], max_minutes: float | None,
        ppl_lengths: list[int]) -> None:
    import kvstack

    model, tokenizer = kvstack.load_model(MODEL)
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes

    def grid(name: str, methods: list[str], subject: torch.nn.Module) -> bool:
        for lengths, chosen in ((ppl_lengths, [t for t in tasks if t == "perplexity"]),
                                ([1024], [t for t in tasks if t != "perplexity"])):
            if not chosen:
                continue
            config = BenchConfig(model=name, methods=methods, tasks=chosen, lengths=lengths, samples=SAMPLES,
                                 out_dir=out, progress=sys.stderr.isatty(), share_prefill=True, checkpoint_every=2)
            if not run_grid(config, deadline=deadline, model=subject, tokenizer=tokenizer):
                return False
        return True

    from kvstack.calibration import get_calibration

    get_calibration(model, tokenizer=tokenizer, calibrate_if_missing=True)  # palu reads it
    if not grid(MODEL, TOKEN_LEVEL, model):
        return
    for setting in settings:
        spec = TRANSFORMS[setting]
        new = transformed(model, tokenizer, spec, out)
        if not grid(f"{MODEL}+{spec}", ["full"], new):
            return
        del new


def transformed(model: torch.nn.Module, tokenizer: object, spec: str, out: str) -> torch.nn.Module:
    """``spec`` applied to ``model``, kept as a checkpoint under kvstack's home so that a resumed run (or the
    next bench) does not pay for a repair twice; each new transform's record is appended to
    ``transforms.jsonl``."""
    from transformers import AutoModelForCausalLM

    import kvstack
    from kvstack.model_store import kvstack_home

    key = hashlib.sha256(f"{MODEL}|{spec}".encode()).hexdigest()[:16]
    directory = kvstack_home() / "transformed" / key
    if (directory / "kvstack_transform.json").is_file():
        print(f"{spec}: loaded from {directory}", flush=True)
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    new, record = kvstack.transform(model, spec, tokenizer=tokenizer)
    record = {**record, "model": MODEL, "machine": stamp()}
    print(f"{spec}: {record['kv_bytes_per_token']} bytes per token, {record['seconds']:.1f} s", flush=True)
    new.save_pretrained(directory)
    (directory / "kvstack_transform.json").write_text(json.dumps(record, indent=1))
    with open(Path(out) / "transforms.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    return new


def report(out: str) -> str:
    records = latest_results(Path(out) / "results.jsonl")
    full_bytes = None
    rows: dict[tuple[str, str], dict] = {}
    for record in records:
        row = rows.setdefault((record["model"], record["method"]), {"ppl": {}, "scores": [], "bytes": []})
        row["bytes"].append(record["kv_bytes"] / record["length"])
        if record["task"] == "perplexity":
            row["ppl"][record["length"]] = record["score"]
        elif record["length"] == 1024:
            row["scores"].append(record["score"])
        if record["model"] == MODEL and record["method"] == "full":
            full_bytes = record["full_kv_bytes"] / record["length"]
    lines = ["| model | cache | KV bytes per token (of full) | perplexity 1k | perplexity 2k | suite score 1k |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (model, method), row in sorted(rows.items()):
        per_token = statistics.fmean(row["bytes"])
        share = f" ({per_token / full_bytes:.2f})" if full_bytes else ""
        ppl = [f"{row['ppl'][n]:.2f}" if n in row["ppl"] else "-" for n in (1024, 2048)]
        score = f"{statistics.fmean(row['scores']):.1f}" if row["scores"] else "-"
        lines.append(f"| {model} | `{method}` | {per_token:.0f}{share} | {ppl[0]} | {ppl[1]} | {score} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default=",".join(TRANSFORMS))
    parser.add_argument("--tasks", default=",".join(["perplexity", *SUITE]))
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--ppl-lengths", default="1024,2048", help="lengths of the perplexity cells")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run(args.out, args.settings.split(","), args.tasks.split(","), args.max_minutes,
            [int(x) for x in args.ppl_lengths.split(",")])
    table = report(args.out)
    Path(args.out, "tables.md").write_text(f"Command: `python benchmarks/model_level_bench.py --report-only`; "
                                           f"{stamp()}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
