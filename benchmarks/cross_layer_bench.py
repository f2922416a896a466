"""Cross-layer merging: bytes saved against perplexity and suite score (issue 32: MiniCache and KVSharer).

Three settings of each cross-layer method beside SnapKV at comparable bytes and KIVI-4, with the full cache as
the reference, on the suite's needle tasks (passkey, single needle in noise, multi-key), variable tracking and
perplexity, at 1k and 2k tokens, 20 samples per cell, seed 0, one harness version. KVSharer's maps are
calibration artefacts: the script searches any that is missing (``calibrate_layer_map``: 2048 tokens of the
default calibration text) and copies each beside the results.

It is :func:`kvstack.bench.run_bench`, so it is resumable: run it again and it carries on; ``--max-minutes``
stops it at the first checkpoint past that time. ``--lengths`` and ``--tasks`` run a part.
``--similarity`` measures what MiniCache relies on: the cosine similarity of adjacent layers' keys and
values, token by token, on bench prose. ``--report-only`` writes the table and the plot from the results.

Usage::

    python benchmarks/cross_layer_bench.py [--lengths 1024,2048] [--tasks passkey,perplexity]
        [--max-minutes 30] [--out benchmarks/results/cross_layer] [--report-only] [--similarity]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import run_grid, stamp, time_caches

from kvstack.bench import BenchConfig, latest_results, plan_cells

OUT = "benchmarks/results/cross_layer"
MODEL = "smollm2-135m"
# KVSharer's settings (layers to share, similarity threshold): at 0.9 the search stops at 6 layers on SmolLM2
SHARING = ((4, 0.9), (8, 0.9), (12, 0.8))
FAMILIES = {
    "MiniCache": ["minicache(start=25)", "minicache(start=21)", "minicache(start=15)"],
    "KVSharer": ["kvsharer(layers=4)", "kvsharer(layers=8)", "kvsharer(layers=12, threshold=0.8)"],
    "SnapKV": ["snapkv(ratio=0.1)", "snapkv(ratio=0.2)", "snapkv(ratio=0.3)", "snapkv(ratio=0.4)"],
    "KIVI-4": ["kivi(bits=4)"],
}
TASKS = ["passkey", "niah_single_noise", "niah_multikey", "vt", "perplexity"]
SAMPLES = 20
BAR_SAVED, BAR_PPL = 0.20, 0.03  # one MiniCache setting: at least 20% saved, perplexity at most 3% above full


def ensure_maps(out: str) -> None:
    """Search KVSharer's maps that are missing, and copy every map beside the results."""
    import kvstack
    from kvstack.calibration.layer_search import calibrate_layer_map

    model, tokenizer = kvstack.load_model(MODEL)
    for layers, threshold in SHARING:
        path, record = calibrate_layer_map(model, tokenizer, layers, threshold)
        if record is not None:
            print(f"searched {path}: {record['map']}", flush=True)
        Path(out, "maps").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out, "maps", path.name))


def similarity(out: str, length: int = 1024) -> str:
    """Mean and median cosine similarity of each adjacent layer pair's keys and values, token by token."""
    import kvstack
    from kvstack.prose import load_prose

    model, tokenizer = kvstack.load_model(MODEL)
    prose = load_prose()
    lines = ["| layers | keys: mean | keys: median | values: mean | values: median |",
             "| --- | --- | --- | --- | --- |"]
    sums: dict[int, list[torch.Tensor]] = {}
    for offset in (100_000, 300_000, 500_000):  # three stretches of the bench prose
        ids = tokenizer(prose[offset : offset + 8 * length], return_tensors="pt").input_ids[:, :length]
        cache = kvstack.make_cache(model, "full")
        with torch.no_grad():
            model(input_ids=ids, **kvstack.cache_kwargs(model, cache), use_cache=True)
        for lower in range(len(cache.layers) - 1):
            a, b = cache.layers[lower], cache.layers[lower + 1]
            keys = torch.nn.functional.cosine_similarity(a.keys[:, :, : a.length], b.keys[:, :, : b.length], dim=-1)
            values = torch.nn.functional.cosine_similarity(a.values[:, :, : a.length], b.values[:, :, : b.length],
                                                           dim=-1)
            sums.setdefault(lower, []).append(torch.stack((keys.flatten(), values.flatten())))
    for lower, parts in sums.items():
        both = torch.cat(parts, dim=1)
        lines.append(f"| {lower}-{lower + 1} | {both[0].mean():.3f} | {both[0].median():.3f} | {both[1].mean():.3f} | "
                     f"{both[1].median():.3f} |")
    text = "\n".join(lines)
    Path(out, "similarity.md").write_text(f"Command: `python benchmarks/cross_layer_bench.py --similarity`; "
                                          f"{stamp()}\n\nSmolLM2-135M, {length} tokens at three offsets of the "
                                          f"bench prose, per KV head and token.\n\n{text}\n")
    return text


def config(lengths: list[int], tasks: list[str], out: str) -> BenchConfig:
    methods = [spec for specs in FAMILIES.values() for spec in specs]
    return BenchConfig(methods=methods, tasks=tasks, lengths=lengths, samples=SAMPLES, out_dir=out,
                       progress=sys.stderr.isatty(), share_prefill=True, checkpoint_every=2)


def family_of(method: str) -> str:
    """The family of a result's method label (labels drop default parameters: ``kvsharer(layers=8)`` is
    ``kvsharer``)."""
    from kvstack import parse

    for family, specs in FAMILIES.items():
        if method in specs or method in {parse(spec).label() for spec in specs}:
            return family
    return "full"


def summarise(records: list[dict], length: int) -> dict[str, dict]:
    """Per method at ``length``: bytes saved, perplexity, and the mean score over the task cells."""
    rows: dict[str, dict] = {}
    for record in records:
        if record["length"] != length:
            continue
        row = rows.setdefault(record["method"], {"saved": [], "scores": {}, "ppl": None})
        row["saved"].append(record["compression_ratio"])
        if record["task"] == "perplexity":
            row["ppl"] = record["score"]
        else:
            row["scores"][(record["task"], record["variant"], record["depth"])] = record["score"]
    return rows


def report(out: str) -> str:
    records = latest_results(Path(out) / "results.jsonl")
    lines: list[str] = []
    plot_data = {}
    for length in sorted({r["length"] for r in records}):
        rows = summarise(records, length)
        full = rows.get("full")
        if full is None:
            continue
        cells = sorted(set.intersection(*(set(r["scores"]) for r in rows.values())) if rows else set())
        lines += [f"### {length} tokens ({len(cells)} task cells common to every method)", "",
                  "| family | method | bytes saved | perplexity | vs full | suite score | vs full |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        full_score = statistics.fmean(full["scores"][c] for c in cells) if cells else float("nan")
        points = {}
        for method, row in sorted(rows.items(), key=lambda kv: (family_of(kv[0]), statistics.fmean(kv[1]["saved"]))):
            saved = statistics.fmean(row["saved"])
            score = statistics.fmean(row["scores"][c] for c in cells) if cells else float("nan")
            ppl = row["ppl"]
            ppl_text = f"{ppl:.2f} | {100 * (ppl / full['ppl'] - 1):+.1f}%" if ppl and full["ppl"] else "- | -"
            score_text = f"{score:.1f} | {score - full_score:+.1f}" if cells else "- | -"
            lines.append(f"| {family_of(method)} | `{method}` | {100 * saved:.1f}% | {ppl_text} | {score_text} |")
            points.setdefault(family_of(method), []).append((saved, ppl, score))
        plot_data[length] = points
        if full["ppl"] is None:
            lines.append("")
            continue
        minis = [(m, statistics.fmean(r["saved"]), r["ppl"]) for m, r in rows.items()
                 if family_of(m) == "MiniCache" and r["ppl"]]
        met = [m for m, saved, ppl in minis if saved >= BAR_SAVED and ppl <= (1 + BAR_PPL) * full["ppl"]]
        lines += ["", f"Bar at {length} (a MiniCache setting saving at least {BAR_SAVED:.0%} with perplexity at most "
                  f"{BAR_PPL:.0%} above the full cache's {full['ppl']:.2f}): "
                  + (f"met by {', '.join(met)}" if met else "not met"), ""]
    if plot_data:
        plot(plot_data, Path(out, "cross_layer.png"))
    return "\n".join(lines)


def plot(data: dict[int, dict[str, list[tuple]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(data), figsize=(5.5 * len(data), 8), squeeze=False)
    styles = {"full": ("k", "*"), "MiniCache": ("tab:blue", "o"), "KVSharer": ("tab:orange", "s"),
              "SnapKV": ("tab:green", "^"), "KIVI-4": ("tab:red", "D")}
    for column, (length, points) in enumerate(sorted(data.items())):
        for row, (index, label) in enumerate(((1, "perplexity (log)"), (2, "suite score (task cells)"))):
            ax = axes[row][column]
            for family, values in points.items():
                values = sorted(v for v in values if v[index] is not None)
                color, marker = styles[family]
                ax.plot([100 * v[0] for v in values], [v[index] for v in values], color=color, marker=marker,
                        label=family, linestyle="-" if len(values) > 1 else "none")
            if index == 1:
                ax.set_yscale("log")
            ax.set_xlabel("KV bytes saved (%)")
            ax.set_ylabel(label)
            ax.set_title(f"{length} tokens")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("SmolLM2-135M: cross-layer merging against SnapKV and KIVI-4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COST_SPECS = ["full", "minicache(start=25)", "minicache(start=21)", "minicache(start=15)", "kvsharer(layers=4)",
              "kvsharer(layers=8)"]


def cost(out: str, lengths: list[int], repeats: int) -> str:
    """Prefill seconds and decode seconds per token of MiniCache and KVSharer against the full cache (their
    base: neither evicts), interleaved in one process, medians of ``repeats``; written to ``cost.md``."""
    import kvstack
    from kvstack.prose import load_prose

    ensure_maps(out)
    model, tokenizer = kvstack.load_model(MODEL)
    text_ids = tokenizer(load_prose(), return_tensors="pt").input_ids[0]
    lines = ["| length | method | prefill s | decode ms/token | prefill / full | decode / full |",
             "| --- | --- | --- | --- | --- | --- |"]
    for length in lengths:
        times = time_caches(model, text_ids[:length].unsqueeze(0), COST_SPECS, repeats)
        base_prefill, base_decode = times["full"]
        for spec, (prefill, step) in times.items():
            lines.append(f"| {length} | `{spec}` | {prefill:.3f} | {step * 1000:.1f} | {prefill / base_prefill:.3f} | "
                         f"{step / base_decode:.3f} |")
    text = "\n".join(lines)
    Path(out, "cost.md").write_text(f"Command: `python benchmarks/cross_layer_bench.py --cost --repeats {repeats}`; "
                                    f"{stamp()}\n\n{text}\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--similarity", action="store_true", help="adjacent layers' cosine similarity (no grid)")
    parser.add_argument("--cost", action="store_true", help="prefill and decode time against the full cache (no grid)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.cost:
        print(cost(args.out, [int(x) for x in args.lengths.split(",")], args.repeats))
        return
    if args.similarity:
        print(similarity(args.out))
        return
    if not args.report_only:
        ensure_maps(args.out)
        grid = config([int(x) for x in args.lengths.split(",")], args.tasks.split(","), args.out)
        print(f"{len(plan_cells(grid))} cells planned", flush=True)
        run_grid(grid, args.max_minutes)
    table = report(args.out)
    Path(args.out, "tables.md").write_text(f"Command: `python benchmarks/cross_layer_bench.py --report-only`; "
                                           f"{stamp()}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
