"""Reports from ``results.jsonl``: a summary CSV, a Markdown table and PNG plots.

Files written in the output directory:

* ``summary.csv``: one row per cell (per-sample details stay in ``results.jsonl``);
* ``results.md``: score by method and length for each task, then every cell with its costs;
* ``score_vs_compression.png``: per task, score against the compression ratio achieved (from the
  cache's own byte accounting), one line per method, the full cache as a dashed baseline;
* ``needle_heatmap.png``: the ``niah`` grid, depth x length, one panel per method;
* ``kv_bytes_vs_length.png`` and ``decode_speed_vs_length.png``: KV bytes held and decode tokens/s
  against context length (generation tasks), one line per method.

A plot whose data is absent (e.g. no ``niah`` cells) is not drawn.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kvstack.bench.scoring import HIGHER_IS_BETTER

__all__ = ["CSV_COLUMNS", "write_csv", "write_markdown", "write_plots", "write_reports"]

CSV_COLUMNS = (
    "model", "task", "variant", "depth", "length", "query_mode", "method", "method_group", "ratio", "budget",
    "dynamic", "samples", "scorer", "score", "score_std", "compression_ratio", "kv_bytes", "full_kv_bytes",
    "compression_ratio_prefill", "kv_bytes_prefill", "full_kv_bytes_prefill", "tokens_kept", "tokens_seen",
    "prompt_tokens", "peak_rss_bytes", "base_rss_bytes", "peak_rss_delta_bytes", "peak_rss_method", "peak_gpu_bytes",
    "prefill_s", "ttft_s",
    "decode_tokens_per_s", "tpot_s", "new_tokens", "stream_tokens_per_s", "wall_s", "chat", "answer_prefix",
    "max_new_tokens", "seed", "device", "torch_threads", "finished_at", "key",
)


def _sort_key(record: dict[str, Any]) -> tuple:
    return (
        str(record.get("model")), str(record.get("task")), str(record.get("variant")), int(record.get("length", 0)),
        str(record.get("query_mode")), record.get("method") != "full", str(record.get("method_group")),
        float(record.get("ratio") or 0.0), int(record.get("budget") or 0), str(record.get("method")),
    )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """One row per cell, columns :data:`CSV_COLUMNS`."""
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in sorted(records, key=_sort_key):
        writer.writerow({column: "" if record.get(column) is None else record.get(column) for column in CSV_COLUMNS})
    _atomic_write(path, buffer.getvalue())
    return path


def _fmt(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value) * scale:.{digits}f}"


def _direction(scorer: str) -> str:
    return "higher is better" if HIGHER_IS_BETTER.get(scorer, True) else "lower is better"


def write_markdown(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Score tables per task (method x length) and a table of every cell with its costs."""
    lines = ["# kvstack bench results", ""]
    models = sorted({str(r["model"]) for r in records})
    lines.append(f"Model(s): {', '.join(models) or '–'}. Cells: {len(records)}. Score: RULER string match ×100 "
                 "(higher is better) or perplexity (lower is better); compression ratio (CR) = 1 − KV bytes held / "
                 "bytes of a full cache of the same tokens, from the cache's own accounting at the end of the cell.")
    lines.append("")
    tables: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        tables[(str(record["model"]), str(record["task"]), str(record["query_mode"]))].append(record)
    for (model, task, mode), rows in sorted(tables.items()):
        lengths = sorted({int(r["length"]) for r in rows})
        scorer = rows[0]["scorer"]
        variants = sorted({r["variant"] for r in rows if r["variant"]})
        note = f", mean over {len(variants)} variants" if variants else ""
        lines.append(f"## {task} — {model}, query {mode} ({_direction(scorer)}{note})")
        lines.append("")
        if rows[0].get("kind") == "perplexity":
            lines.append("The first half of each excerpt is read as the prompt (dynamic methods evict while it "
                         "streams in, static ones compress once at its end); the second half is teacher-forced "
                         "through the same cache and scored. CR is measured at the end, so static methods show "
                         "about half their ratio.")
            lines.append("")
        lines.append("| method | CR | " + " | ".join(f"L={length}" for length in lengths) + " |")
        lines.append("| --- | ---: | " + " | ".join("---:" for _ in lengths) + " |")
        by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_method[str(r["method"])].append(r)
        for method, cells in sorted(by_method.items(), key=lambda item: _sort_key(item[1][0])):
            ratio = statistics.fmean(float(c["compression_ratio"]) for c in cells)
            scores = []
            for length in lengths:
                at = [float(c["score"]) for c in cells if int(c["length"]) == length]
                scores.append(_fmt(statistics.fmean(at)) if at else "–")
            lines.append(f"| `{method}` | {ratio:.2f} | " + " | ".join(scores) + " |")
        lines.append("")
    lines.append("## Every cell")
    lines.append("")
    lines.append("| task | L | query | method | score | CR | KV MB held / full | peak RSS MB (+ over cell start) | "
                 "prefill s | TTFT s | decode tok/s | TPOT ms |")
    lines.append("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(records, key=_sort_key):
        task = f"{r['task']} {r['variant']}".strip()
        held = f"{_fmt(r['kv_bytes'], 2, 1e-6)} / {_fmt(r['full_kv_bytes'], 2, 1e-6)}"
        lines.append(
            f"| {task} | {r['length']} | {r['query_mode']} | `{r['method']}` | {_fmt(r['score'])} | "
            f"{_fmt(r['compression_ratio'])} | {held} | {_fmt(r.get('peak_rss_bytes'), 0, 1e-6)} "
            f"(+{_fmt(r.get('peak_rss_delta_bytes'), 0, 1e-6)}) | "
            f"{_fmt(r.get('prefill_s'), 3)} | {_fmt(r.get('ttft_s'), 3)} | {_fmt(r.get('decode_tokens_per_s'), 1)} | "
            f"{_fmt(r.get('tpot_s'), 1, 1e3)} |"
        )
    lines.append("")
    _atomic_write(path, "\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(record: dict[str, Any], several_models: bool, key: str = "method") -> str:
    text = str(record[key])
    return f"{record['model']}: {text}" if several_models else text


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _grid(count: int) -> tuple[int, int]:
    columns = min(3, max(1, count))
    return math.ceil(count / columns), columns


def plot_score_vs_compression(path: Path, records: Sequence[dict[str, Any]]) -> Path | None:
    """Per task: score against achieved compression ratio, one line per method group, full dashed."""
    if not records:
        return None
    plt = _pyplot()
    several = len({r["model"] for r in records}) > 1
    tasks = sorted({str(r["task"]) for r in records})
    rows, columns = _grid(len(tasks))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        cells = [r for r in records if r["task"] == task]
        points: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        for r in cells:
            points[_label(r, several, "method_group")][str(r["method"])].append(
                (float(r["compression_ratio"]), float(r["score"])))
        for group, methods in sorted(points.items()):
            xy = sorted((statistics.fmean(p[0] for p in v), statistics.fmean(p[1] for p in v))
                        for v in methods.values())
            if group.endswith("full"):
                ax.axhline(xy[0][1], color="black", linestyle="--", linewidth=1.2, label=f"{group} (baseline)")
                ax.plot([x for x, _ in xy], [y for _, y in xy], "k*", markersize=9)
            else:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=group)
        scorer = cells[0]["scorer"]
        ax.set_title(task)
        ax.set_xlabel("compression ratio achieved (1 − bytes held / full)")
        ax.set_ylabel("perplexity (lower is better)" if scorer == "perplexity" else "score (0–100)")
        ax.set_xlim(-0.03, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle("Score vs compression ratio (mean over lengths, variants and samples)")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_needle_heatmap(path: Path, records: Sequence[dict[str, Any]], task: str = "niah") -> Path | None:
    """The needle grid: mean score by depth (rows) and length (columns), one panel per method."""
    cells = [r for r in records if r["task"] == task and r.get("depth") is not None]
    if not cells:
        return None
    plt = _pyplot()
    several = len({r["model"] for r in cells}) > 1
    methods = sorted({_label(r, several) for r in cells}, key=lambda m: (not m.endswith("full"), m))
    depths = sorted({float(r["depth"]) for r in cells})
    lengths = sorted({int(r["length"]) for r in cells})
    rows, columns = _grid(len(methods))
    size = (max(4.2, 1.1 * len(lengths) + 2.2) * columns + 1.0, (0.45 * len(depths) + 2.0) * rows + 0.6)
    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False, layout="constrained")
    image = None
    for index, (ax, method) in enumerate(zip(axes.flat, methods, strict=False)):
        grid = [[math.nan] * len(lengths) for _ in depths]
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                at = [float(r["score"]) for r in cells
                      if _label(r, several) == method and float(r["depth"]) == depth and int(r["length"]) == length]
                if at:
                    grid[i][j] = statistics.fmean(at)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        if index >= len(methods) - columns:
            ax.set_xlabel("context length (tokens)")
        if index % columns == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(method, fontsize=9)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="score")
    fig.suptitle("Needle in a haystack: score by depth and length")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_vs_length(path: Path, records: Sequence[dict[str, Any]], field: str, ylabel: str, title: str,
                   scale: float = 1.0) -> Path | None:
    """``field`` (mean over generation tasks) against context length, one line per method."""
    cells = [r for r in records if r.get("kind") == "generate" and r.get(field) is not None]
    if not cells:
        return None
    plt = _pyplot()
    several = len({r["model"] for r in cells}) > 1
    series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in cells:
        series[_label(r, several)][int(r["length"])].append(float(r[field]) * scale)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, by_length in sorted(series.items(), key=lambda item: (not item[0].endswith("full"), item[0])):
        xs = sorted(by_length)
        ys = [statistics.fmean(by_length[x]) for x in xs]
        style = {"color": "black", "linestyle": "--"} if method.endswith("full") else {}
        ax.plot(xs, ys, marker="o", label=method, **style)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_plots(out_dir: Path, records: Sequence[dict[str, Any]]) -> list[Path]:
    """Every PNG plot that has data (see the module docstring)."""
    files = [
        plot_score_vs_compression(out_dir / "score_vs_compression.png", records),
        plot_needle_heatmap(out_dir / "needle_heatmap.png", records),
        plot_vs_length(out_dir / "kv_bytes_vs_length.png", records, "kv_bytes", "KV cache held (MB)",
                       "KV bytes held vs context length", 1e-6),
        plot_vs_length(out_dir / "decode_speed_vs_length.png", records, "decode_tokens_per_s",
                       "decode tokens / s", "Decode speed vs context length"),
    ]
    return [f for f in files if f is not None]


def write_reports(out_dir: str | os.PathLike[str], records: Sequence[dict[str, Any]], plots: bool = True) -> list[Path]:
    """Write ``summary.csv``, ``results.md`` and (when ``plots``) the PNGs; returns the paths written."""
    directory = Path(out_dir)
    files = [write_csv(directory / "summary.csv", records), write_markdown(directory / "results.md", records)]
    if plots and records:
        files += write_plots(directory, records)
    return files
