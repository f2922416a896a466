"""Model-level KV reduction (issue 33): transformed models against token-level compression at the same bytes.

Each transform setting (``gqa`` to one KV head per layer: mean-pooling, similarity grouping, absorbed SVD;
``cla`` layer sharing; ``mla`` latents; each alone or followed by ``repair()``) is
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
              # the repair bounded by the 30 minutes, as many whole-model steps as fit
              "svd-repair-30": "gqa(kv_heads=1, how='svd') + repair(steps=1000, minutes=30)",
              "mean-repair": "gqa(kv_heads=1) + repair()", "cla-4": "cla(layers=4, choose='attention')",
              "cla-8": "cla(layers=8, choose='attention')",
              "cla-15": "cla(layers=15, choose='attention')",
              "cla-8-repair": "cla(layers=8, choose='attention') + repair()",
              "cla-4-model": "cla(layers=4)", "cla-8-model": "cla(layers=8)",
              "cla-kvsharer-4": "cla(pairs='16:11,22:10,25:9,27:11')",  # kvsharer(layers=4)'s map, as CLA
              "cla-4-pairs": "cla(pairs='7:6,12:11,17:16,29:28')",  # cla(layers=4)'s chosen map, without the search
              "mla-96": "mla(rank=96, rope_dims=16)", "mla-128": "mla(rank=128, rope_dims=32)",
              "mla-192": "mla(rank=192, rope_dims=32)", "mla-96-repair": "mla(rank=96, rope_dims=16) + repair()"}
TOKEN_LEVEL = ["snapkv(ratio=0.67)", "kivi(bits=4)", "palu(rank=21)"]
COMPOSED = "snapkv(ratio=0.5) + kivi(bits=4)"
# an mla model's latents and rotary keys take a codec, an evicting policy that scores the rebuilt keys, or both
# (one that evicts while decoding too: an encoded victim's place goes to the oldest full-precision token)
LATENT_METHODS = ["kivi(bits=4)", "kivi(bits=2)", "snapkv(ratio=0.5)", "h2o(ratio=0.5)",
                  "h2o(ratio=0.5) + kivi(bits=4)"]
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
        if deadline is not None and time.monotonic() > deadline:  # a transform can take many minutes: not now
            print("stopped at the time limit; run the same command again to carry on", flush=True)
            return
        new = transformed(model, tokenizer, spec, out)
        # a converted model composes with token-level compression (issue 33: gqa, then snapkv + kivi; a cla
        # model's storing layers compress and its sharing layers read what they keep; an mla model's tokens
        # are evicted by scores of the rebuilt keys, its latents and rotary keys quantized)
        methods = ["full", COMPOSED, *(LATENT_METHODS if spec.startswith("mla") else [])]
        if not grid(f"{MODEL}+{spec}", methods, new):
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
    saved = directory / "kvstack_transform.json"
    if saved.is_file():
        print(f"{spec}: loaded from {directory}", flush=True)
        record = json.loads(saved.read_text())
        if not (directory / "weights.pt").is_file():
            return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        # cla and mla have no plain checkpoint: rebuild the structure (cla: the recorded map), then load the
        # (repaired) weights, which for mla include each layer's rotary pairs
        first = record.get("steps", [record])[0]
        structure = first["spec"]
        if "pairs" in first:
            structure = "cla(pairs={!r})".format(",".join(f"{up}:{low}" for up, low in first["pairs"].items()))
        new, _ = kvstack.transform(model, structure, tokenizer=tokenizer)
        new.load_state_dict(torch.load(directory / "weights.pt"))
        return new
    new, record = kvstack.transform(model, spec, tokenizer=tokenizer)
    record = {**record, "model": MODEL, "machine": stamp()}
    print(f"{spec}: {record['kv_bytes_per_token']} bytes per token, {record['seconds']:.1f} s", flush=True)
    if getattr(new.config, "kvstack_shared_kv", None) or getattr(new.config, "kvstack_latent_kv", None):
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(new.state_dict(), directory / "weights.pt")
    else:
        new.save_pretrained(directory)
    (directory / "kvstack_transform.json").write_text(json.dumps(record, indent=1))
    with open(Path(out) / "transforms.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    return new


def plot(out: str) -> None:
    """``model_level.png``: perplexity (1k, 2k) and suite score (1k) against KV bytes per token, one point per
    cell row: transformed models (full cache, composed) beside the token-level methods on the original."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect(out)
    full_bytes = rows.pop("__full_bytes__", None)
    if not full_bytes:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    panels = [("ppl", 1024, "perplexity at 1k (log)"), ("ppl", 2048, "perplexity at 2k (log)"),
              ("suite", 1024, "suite score at 1k")]
    for ax, (kind, length, title) in zip(axes, panels, strict=True):
        for (model, method), row in sorted(rows.items()):
            value = row["ppl"].get(length) if kind == "ppl" else (statistics.fmean(row["scores"])
                                                                  if row["scores"] else None)
            if value is None:
                continue
            transformed = model != MODEL
            label = (model.removeprefix(f"{MODEL}+") + ("" if method == "full" else f" | {method}")
                     if transformed else method)
            ax.scatter(statistics.fmean(row["bytes"]) / full_bytes, value, marker="o" if transformed else "^",
                       color="tab:blue" if transformed else "tab:green")
            ax.annotate(label, (statistics.fmean(row["bytes"]) / full_bytes, value), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        if kind == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("KV bytes per token (of the full cache)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: model transforms (circles) against token-level compression (triangles)")
    fig.tight_layout()
    fig.savefig(Path(out) / "model_level.png", dpi=110)
    plt.close(fig)


def collect(out: str) -> dict:
    """Per ``(model, method)``: bytes per token of each cell, perplexity by length, suite scores at 1k; and the
    full cache's bytes per token under ``"__full_bytes__"``."""
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
    return {**rows, "__full_bytes__": full_bytes}


def report(out: str) -> str:
    rows = collect(out)
    full_bytes = rows.pop("__full_bytes__")
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
    plot(args.out)
    Path(args.out, "tables.md").write_text(f"Command: `python benchmarks/model_level_bench.py --report-only`; "
                                           f"{stamp()}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
