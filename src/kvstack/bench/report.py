"""Reports from ``results.jsonl``: a summary CSV, a Markdown table and PNG plots.

Files written in the output directory:

* ``summary.csv``: one row per cell (per-sample details stay in ``results.jsonl``);
* ``results.md``: the samples per cell and what a score over that many can show (:func:`sample_count_note`),
  score by method and length for each task, then every cell with its sample count and costs;
* ``score_vs_compression_mean.png``: per context length, the mean score over the generation task cells
  every method shown has finished (the same work for each), against the compression ratio achieved
  (from the cache's own byte accounting), one line per method, the full cache as a dashed baseline;
* ``score_vs_compression.png``: the same per task (perplexity included), means over lengths and variants;
* ``needle_heatmap.png``: the ``niah`` grid, depth x length: one panel per length, a row per method;
* ``kv_bytes_vs_length.png`` and ``decode_speed_vs_length.png``: KV bytes held and decode tokens/s
  against context length (generation tasks), one line per method.

A plot whose data is absent (e.g. no ``niah`` cells) is not drawn. Each method keeps one colour and marker
in every plot. Where the full cache ran cells the other methods did not (a screened length), its baseline
is taken over the cells they ran.
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

__all__ = ["CSV_COLUMNS", "comparable_cells", "group_legend_texts", "needle_grid", "sample_count_note", "write_csv",
           "write_markdown", "write_plots", "write_reports"]

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


FEW_SAMPLES = 10
"""Below this many samples per cell, ``results.md`` says what a cell's score can and cannot tell apart."""


def sample_count_note(records: Sequence[dict[str, Any]]) -> str:
    """The sample count per cell and, for 0-100 scores, their resolution and standard error ("" without counts).

    A 0-100 score is a mean over ``n`` samples: on a one-answer task it moves in steps of ``100 / n`` points,
    and its standard error is at most ``50 / sqrt(n)`` points (the standard deviation of a 0-100 score is at
    most 50). With fewer than :data:`FEW_SAMPLES` samples the note says what that leaves a cell able to show.
    """
    counts = sorted({int(r["samples"]) for r in records if r.get("samples") is not None})
    if not counts:
        return ""
    fewest = counts[0]
    shown = str(fewest) if len(counts) == 1 else f"{fewest} to {counts[-1]} (column n of the last table)"
    text = f"Samples per cell: {shown}."
    if not any(r.get("kind", "generate") == "generate" for r in records):
        return text
    text += (f" A score is the mean over a cell's samples: with {fewest} samples, a one-answer task's score "
             f"moves in steps of {100 / fewest:.3g} points, and the standard error of a 0–100 score is up to "
             f"50/√{fewest} ≈ {50 / math.sqrt(fewest):.2g} points.")
    if fewest < FEW_SAMPLES:
        text += (f" A {fewest}-sample cell tells a method that fails outright from one that works, not "
                 "differences of 10 or 20 points; telling 10 points apart takes about 100 samples a cell "
                 "(standard error 5 points).")
    return text


def write_markdown(path: Path, records: Sequence[dict[str, Any]], left_out: int = 0) -> Path:
    """Score tables per task (method x length) and a table of every cell with its costs.

    ``left_out``: records of ``results.jsonl`` not shown (other measurements of a cell shown), mentioned.
    """
    lines = ["# kvstack bench results", ""]
    models = sorted({str(r["model"]) for r in records})
    lines.append(f"Model(s): {', '.join(models) or '–'}. Cells: {len(records)}. Score: RULER string match ×100 "
                 "(higher is better) or perplexity (lower is better); compression ratio (CR) = 1 − KV bytes held / "
                 "bytes of a full cache of the same tokens, from the cache's own accounting at the end of the cell.")
    samples_text = sample_count_note(records)
    if samples_text:
        lines.append("")
        lines.append(samples_text)
    if left_out:
        lines.append("")
        lines.append(f"{left_out} other record{'s' if left_out != 1 else ''} in results.jsonl "
                     f"{'measure cells' if left_out != 1 else 'measures a cell'} shown here with another seed, "
                     "sample count, setting or harness version; each cell shows one measurement (the latest "
                     "run's), so no score averages two runs.")
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
    lines.append("| task | L | query | method | score | n | CR | KV MB held / full | peak RSS MB (+ over cell start) | "
                 "prefill s | TTFT s | decode tok/s | TPOT ms |")
    lines.append("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(records, key=_sort_key):
        task = f"{r['task']} {r['variant']}".strip()
        held = f"{_fmt(r['kv_bytes'], 2, 1e-6)} / {_fmt(r['full_kv_bytes'], 2, 1e-6)}"
        lines.append(
            f"| {task} | {r['length']} | {r['query_mode']} | `{r['method']}` | {_fmt(r['score'])} | "
            f"{r.get('samples', '–')} | {_fmt(r['compression_ratio'])} | {held} | "
            f"{_fmt(r.get('peak_rss_bytes'), 0, 1e-6)} (+{_fmt(r.get('peak_rss_delta_bytes'), 0, 1e-6)}) | "
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


CellId = tuple[str, str, str, int, str]  # (model, task, variant, length, query mode)


def _cell_id(record: dict[str, Any]) -> CellId:
    return (str(record["model"]), str(record["task"]), str(record["variant"]), int(record["length"]),
            str(record["query_mode"]))


def comparable_cells(records: Sequence[dict[str, Any]]) -> tuple[set[str], list[CellId]]:
    """The methods and task cells to compare over the same work: every method shown finished every cell.

    While a grid fills, methods have finished different cells. The candidates are the sets "the methods that
    finished at least n cells" (for each n; when the grid fills cell by cell these include the best choice)
    and "the methods that finished cell c" (for each cell, so some choice always exists). The chosen one
    compares the most (method, cell) results, ties going to more methods, then to the earlier candidate.
    Returns ``(methods, cells)``; both empty without records.
    """
    by_cell: dict[CellId, set[str]] = defaultdict(set)
    for record in records:
        by_cell[_cell_id(record)].add(str(record["method"]))
    finished: dict[str, int] = defaultdict(int)
    for methods in by_cell.values():
        for method in methods:
            finished[method] += 1
    candidates = [{method for method, count in finished.items() if count >= threshold}
                  for threshold in sorted(set(finished.values()), reverse=True)]
    candidates += [by_cell[cell] for cell in sorted(by_cell)]
    best: tuple[int, int, set[str], list[CellId]] = (0, 0, set(), [])
    for shown in candidates:
        cells = sorted(cell for cell, methods in by_cell.items() if shown <= methods)
        if cells and (len(shown) * len(cells), len(shown)) > best[:2]:
            best = (len(shown) * len(cells), len(shown), set(shown), cells)
    return best[2], best[3]


def _baseline_on_shared_cells(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` without the full cache's cells that no other method ran (a screened length's extra cells)."""
    others = {_cell_id(r) for r in records if r["method_group"] != "full"}
    if not others:
        return list(records)
    return [r for r in records if r["method_group"] != "full" or _cell_id(r) in others]


def _styles(records: Sequence[dict[str, Any]], several_models: bool, key: str) -> dict[str, dict[str, Any]]:
    """One colour and marker per label, the same in every panel; the full cache black and dashed."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    markers = "osD^vPX<>hp"
    labels = sorted({_label(r, several_models, key) for r in records})
    styles: dict[str, dict[str, Any]] = {}
    index = 0
    for label in labels:
        if label.endswith("full"):
            styles[label] = {"color": "black", "linestyle": "--", "marker": "*"}
            continue
        colour = palette[(2 * index) % 20 + (index // 10) % 2]  # the dark shades of tab20 first, then the light
        styles[label] = {"color": colour, "marker": markers[index % len(markers)]}
        index += 1
    return styles


def _x_limits(xs: Iterable[float]) -> tuple[float, float]:
    """The compression-ratio axis: 0 to 1, widened to show a negative ratio (a method holding extra state)."""
    return min([-0.03, *(x - 0.03 for x in xs)]), 1.0


def _mean_points(cells: Sequence[dict[str, Any]], several: bool) -> dict[str, list[tuple[float, float]]]:
    """Per method group: ``(mean compression ratio, mean score)`` per method, sorted by ratio."""
    points: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in cells:
        points[_label(r, several, "method_group")][str(r["method"])].append(
            (float(r["compression_ratio"]), float(r["score"])))
    return {group: sorted((statistics.fmean(p[0] for p in v), statistics.fmean(p[1] for p in v))
                          for v in methods.values())
            for group, methods in points.items()}


def _draw_score_panel(ax: Any, points: dict[str, list[tuple[float, float]]], styles: dict[str, dict[str, Any]],
                      title: str, ylabel: str) -> None:
    for group, xy in sorted(points.items(), key=lambda item: (not item[0].endswith("full"), item[0])):
        style = styles[group]
        if group.endswith("full"):
            ax.axhline(xy[0][1], color="black", linestyle="--", linewidth=1.2)
            ax.plot([x for x, _ in xy], [y for _, y in xy], "k*", markersize=10)
        else:
            ax.plot([x for x, _ in xy], [y for _, y in xy], color=style["color"], marker=style["marker"])
    ax.set_title(title)
    ax.set_xlabel("compression ratio achieved (1 − bytes held / full)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(*_x_limits(x for xy in points.values() for x, _ in xy))
    ax.grid(alpha=0.3)


def group_legend_texts(records: Sequence[dict[str, Any]], several_models: bool) -> dict[str, str]:
    """Legend text per method-group label: the group's template with its placeholders filled.

    ``h2o(ratio={ratio})`` run at 0.5 reads ``h2o(ratio=0.5)``; run at several ratios, one line joins its
    points and reads ``h2o(ratio=0.25/0.5/0.75)``. A group without placeholders keeps its label.
    """
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"ratio": set(), "budget": set()})
    for r in records:
        label = _label(r, several_models, "method_group")
        if r.get("ratio") is not None:
            values[label]["ratio"].add(repr(float(r["ratio"])))
        if r.get("budget") is not None:
            values[label]["budget"].add(str(int(r["budget"])))
    texts: dict[str, str] = {}
    for label, filled in values.items():
        text = label
        for name, found in filled.items():
            if found and f"{{{name}}}" in text:
                text = text.replace(f"{{{name}}}", "/".join(sorted(found, key=float)))
        texts[label] = text
    return texts


def _figure_legend(fig: Any, styles: dict[str, dict[str, Any]], shown: set[str],
                   texts: dict[str, str] | None = None) -> None:
    """One entry per method group drawn, the full cache first; ``texts``: what each group's entry reads."""
    from matplotlib.lines import Line2D

    handles = []
    for label in sorted(shown, key=lambda item: (not item.endswith("full"), item)):
        style = styles[label]
        text = (texts or {}).get(label, label)
        text = f"{text} (baseline)" if label.endswith("full") else text
        handles.append(Line2D([], [], color=style["color"], marker=style["marker"],
                              linestyle=style.get("linestyle", "-"), label=text))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))


def _above_legend(fig: Any, entries: int) -> tuple[float, float, float, float]:
    """The part of ``fig`` left for the panels above :func:`_figure_legend`'s rows (about 0.17 inch each)."""
    height = float(fig.get_size_inches()[1])
    return 0.0, (0.17 * math.ceil(entries / 4) + 0.06) / height, 1.0, 1.0


def plot_score_vs_compression(path: Path, records: Sequence[dict[str, Any]]) -> Path | None:
    """Per task: score against achieved compression ratio, one line per method group, full dashed."""
    if not records:
        return None
    plt = _pyplot()
    records = _baseline_on_shared_cells(records)
    several = len({r["model"] for r in records}) > 1
    styles = _styles(records, several, "method_group")
    tasks = sorted({str(r["task"]) for r in records})
    rows, columns = _grid(len(tasks))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows + 1.0), squeeze=False)
    shown: set[str] = set()
    for ax, task in zip(axes.flat, tasks, strict=False):
        cells = [r for r in records if r["task"] == task]
        points = _mean_points(cells, several)
        shown |= set(points)
        perplexity = cells[0]["scorer"] == "perplexity"
        _draw_score_panel(ax, points, styles, task,
                          "perplexity (lower is better)" if perplexity else "score (0–100)")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle("Score vs compression ratio per task (mean over lengths, variants and samples)")
    _figure_legend(fig, styles, shown, group_legend_texts(records, several))
    fig.tight_layout(rect=_above_legend(fig, len(shown)))
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_score_vs_compression_mean(path: Path, records: Sequence[dict[str, Any]]) -> Path | None:
    """Per length: mean generation score over the task cells every method shown finished, vs compression."""
    generation = [r for r in records if r.get("kind") == "generate"]
    if not generation:
        return None
    plt = _pyplot()
    several = len({r["model"] for r in generation}) > 1
    styles = _styles(generation, several, "method_group")
    lengths = sorted({int(r["length"]) for r in generation})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.0 * len(lengths), 5.0), squeeze=False)
    shown: set[str] = set()
    drawn: list[dict[str, Any]] = []
    for ax, length in zip(axes.flat, lengths, strict=True):
        at_length = [r for r in generation if int(r["length"]) == length]
        methods, cells = comparable_cells(_baseline_on_shared_cells(at_length))
        chosen = set(cells)
        compared = [r for r in at_length if str(r["method"]) in methods and _cell_id(r) in chosen]
        drawn += compared
        points = _mean_points(compared, several)
        shown |= set(points)
        tasks = len({cell[1:3] for cell in cells})
        _draw_score_panel(ax, points, styles, f"{length} tokens ({tasks} task cells)",
                          "mean score over the task cells (0–100)")
    fig.suptitle("Score vs compression ratio (generation tasks; mean over task cells and samples)")
    _figure_legend(fig, styles, shown, group_legend_texts(drawn, several))
    fig.tight_layout(rect=_above_legend(fig, len(shown)))
    out = _save(fig, path)
    plt.close(fig)
    return out


NeedleGrid = tuple[list[str], list[float], list[int], dict[tuple[str, float, int], float]]


def needle_grid(records: Sequence[dict[str, Any]], task: str = "niah") -> NeedleGrid:
    """The needle grid's mean scores: ``(methods, depths, lengths, score)``.

    ``score[(method, depth, length)]`` is the mean over the records of that cell (present only where one
    finished). Methods come in table order: the full cache first, then by method group, ratio and budget.
    """
    cells = [r for r in records if r["task"] == task and r.get("depth") is not None]
    several = len({r["model"] for r in cells}) > 1
    order: dict[str, tuple] = {}
    sums: dict[tuple[str, float, int], list[float]] = defaultdict(list)
    for r in cells:
        method = _label(r, several)
        rank = (str(r["model"]), r["method"] != "full", str(r.get("method_group")), float(r.get("ratio") or 0.0),
                int(r.get("budget") or 0), method)
        order[method] = min(order.get(method, rank), rank)
        sums[(method, float(r["depth"]), int(r["length"]))].append(float(r["score"]))
    methods = sorted(order, key=order.__getitem__)
    depths = sorted({key[1] for key in sums})
    lengths = sorted({key[2] for key in sums})
    return methods, depths, lengths, {key: statistics.fmean(scores) for key, scores in sums.items()}


def plot_needle_heatmap(path: Path, records: Sequence[dict[str, Any]], task: str = "niah") -> Path | None:
    """The needle grid: mean score by method (rows) and needle depth (columns), one panel per context length,
    so a method's row reads across depths and, panel to panel, across lengths."""
    methods, depths, lengths, score = needle_grid(records, task)
    if not methods:
        return None
    plt = _pyplot()
    label_width = 0.075 * max(len(m) for m in methods) + 0.4  # inches for the method names of the first panel
    panel_width = 0.62 * len(depths) + 0.5
    size = (max(6.4, label_width + panel_width * len(lengths) + 1.4), 0.3 * len(methods) + 1.7)  # room for the title
    fig, axes = plt.subplots(1, len(lengths), figsize=size, squeeze=False, sharey=True, layout="constrained")
    image = None
    for ax, length in zip(axes.flat, lengths, strict=True):
        grid = [[score.get((method, depth, length), math.nan) for depth in depths] for method in methods]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.set_xlabel("needle depth")
        ax.set_title(f"{length} tokens", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=min(1.0, 6.0 / max(len(methods), 1) + 0.4), label="score")
    fig.suptitle("Needle in a haystack: score by needle depth and context length (mean over samples)")
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
        plot_score_vs_compression_mean(out_dir / "score_vs_compression_mean.png", records),
        plot_score_vs_compression(out_dir / "score_vs_compression.png", records),
        plot_needle_heatmap(out_dir / "needle_heatmap.png", records),
        plot_vs_length(out_dir / "kv_bytes_vs_length.png", records, "kv_bytes", "KV cache held (MB)",
                       "KV bytes held vs context length", 1e-6),
        plot_vs_length(out_dir / "decode_speed_vs_length.png", records, "decode_tokens_per_s",
                       "decode tokens / s", "Decode speed vs context length"),
    ]
    return [f for f in files if f is not None]


def write_reports(out_dir: str | os.PathLike[str], records: Sequence[dict[str, Any]], plots: bool = True,
                  left_out: int = 0) -> list[Path]:
    """Write ``summary.csv``, ``results.md`` and (when ``plots``) the PNGs; returns the paths written.

    ``records`` hold one record per cell identity (:func:`kvstack.bench.runner.reported_results`);
    ``left_out`` counts the other measurements ``results.jsonl`` holds, which ``results.md`` mentions.
    """
    directory = Path(out_dir)
    files = [write_csv(directory / "summary.csv", records),
             write_markdown(directory / "results.md", records, left_out=left_out)]
    if plots and records:
        files += write_plots(directory, records)
    return files
