"""Reports: methods are compared over the same cells, and plots draw what the records hold."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstack.bench import report
from kvstack.bench.report import comparable_cells


def record(method: str, task: str, length: int = 1024, score: float = 50.0, ratio: float = 0.5,
           variant: str = "", kind: str = "generate") -> dict[str, Any]:
    group = "full" if method == "full" else method.split("@")[0]
    return {
        "model": "m", "task": task, "variant": variant, "length": length, "query_mode": "after",
        "method": method, "method_group": group, "compression_ratio": 0.0 if method == "full" else ratio,
        "score": score, "kind": kind, "scorer": "perplexity" if kind == "perplexity" else "string_match_all",
    }


def covers(records: list[dict[str, Any]], methods: set[str]) -> list[tuple]:
    """Brute force: the cells every method of ``methods`` finished."""
    by_cell: dict[tuple, set[str]] = {}
    for r in records:
        by_cell.setdefault((r["model"], r["task"], r["variant"], r["length"], r["query_mode"]), set()).add(r["method"])
    return sorted(cell for cell, done in by_cell.items() if methods <= done)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=5))
def test_a_grid_filled_cell_by_cell_compares_the_best_rectangle(prefixes):
    """Each method finished a prefix of the same cell order (how the grid fills): the choice is optimal.

    The expectation is a brute force over every subset of methods, maximising (results compared, methods).
    """
    order = [f"t{i}" for i in range(6)]
    records = [record(f"m{j}", task) for j, count in enumerate(prefixes) for task in order[:count]]
    methods, cells = comparable_cells(records)
    names = sorted({r["method"] for r in records})
    best = (0, 0)
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            shared = covers(records, set(subset))
            if shared:
                best = max(best, (len(subset) * len(shared), len(subset)))
    assert (len(methods) * len(cells), len(methods)) == best
    assert cells == covers(records, methods)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5)), min_size=1, max_size=25))
def test_every_method_chosen_finished_every_cell_chosen(pairs):
    records = [record(f"m{m}", f"t{t}") for m, t in set(pairs)]
    methods, cells = comparable_cells(records)
    assert methods and cells
    done = {(r["method"], r["task"]) for r in records}
    assert all((method, cell[1]) in done for method in methods for cell in cells)


def test_the_full_cache_baseline_ignores_cells_no_other_method_ran():
    records = [
        record("full", "a", 1024, score=80), record("full", "b", 1024, score=20),  # b: screened out for the rest
        record("snapkv@0.5", "a", 1024, score=60),
    ]
    kept = report._baseline_on_shared_cells(records)
    assert sorted((r["method"], r["task"]) for r in kept) == [("full", "a"), ("snapkv@0.5", "a")]
    assert report._baseline_on_shared_cells(records[:2]) == records[:2]  # the full cache alone keeps everything


def test_the_mean_plot_compares_every_method_on_the_same_cells(tmp_path, monkeypatch):
    drawn: dict[str, dict[str, list[tuple[float, float]]]] = {}

    def capture(ax, points, styles, title, ylabel):
        drawn[title] = points

    monkeypatch.setattr(report, "_draw_score_panel", capture)
    records = [
        record("full", "a", score=90), record("full", "b", score=70), record("full", "c", score=10),
        record("snapkv@0.5", "a", score=60, ratio=0.5), record("snapkv@0.5", "b", score=40, ratio=0.5),
        record("snapkv@0.75", "a", score=30, ratio=0.75), record("snapkv@0.75", "b", score=10, ratio=0.625),
        record("h2o@0.5", "a", score=5, ratio=0.5),  # fewer cells: left out rather than averaged over less work
        record("full", "p", score=15.0, kind="perplexity"),
    ]
    path = report.plot_score_vs_compression_mean(tmp_path / "mean.png", records)
    assert path is not None and path.exists()
    (title, points), = drawn.items()
    assert title == "1024 tokens (2 task cells)"
    assert points == {"full": [(0.0, 80.0)], "snapkv": [(0.5, 50.0), (0.6875, 20.0)]}


def test_every_method_keeps_one_style_and_the_full_cache_is_black():
    records = [record(f"method{i}@0.5", "a") for i in range(23)] + [record("full", "a")]
    styles = report._styles(records, False, "method_group")
    assert styles["full"]["color"] == "black"
    others = [(style["color"], style["marker"]) for label, style in styles.items() if label != "full"]
    assert len(set(others)) == len(others) == 23


def test_the_compression_axis_shows_negative_ratios():
    assert report._x_limits([0.2, 0.5]) == (-0.03, 1.0)
    low, high = report._x_limits([-0.05, 0.5])
    assert low < -0.05 and high == 1.0


def needle(method: str, depth: float, length: int, score: float, ratio: float = 0.5) -> dict[str, Any]:
    return {**record(method, "niah", length, score, ratio, variant=f"depth={depth:.2f}"), "depth": depth,
            "ratio": None if method == "full" else ratio}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["full", "snapkv@0.75", "snapkv@0.25", "h2o@0.5"]),
                          st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([512, 1024]),
                          st.floats(min_value=0, max_value=100)), min_size=1, max_size=30))
def test_the_needle_grid_holds_each_cell_s_mean_with_the_full_cache_first(rows):
    records = [needle(m, d, n, s, ratio=float(m.split("@")[1]) if "@" in m else 0.5) for m, d, n, s in rows]
    methods, depths, lengths, score = report.needle_grid(records)
    assert depths == sorted({d for _, d, _, _ in rows}) and lengths == sorted({n for _, _, n, _ in rows})
    expected = {}
    for m, d, n, s in rows:
        expected.setdefault((m, d, n), []).append(s)
    assert score.keys() == expected.keys()
    for key, scores in expected.items():
        assert abs(score[key] - sum(scores) / len(scores)) <= 1e-9 * max(1.0, max(scores))
    order = ["full", "h2o@0.5", "snapkv@0.25", "snapkv@0.75"]  # the full cache, then by group and ratio
    assert methods == [m for m in order if m in {m for m, _, _, _ in rows}]


def test_the_needle_heatmap_has_a_row_per_method_and_a_panel_per_length(tmp_path):
    from PIL import Image

    few = [needle(m, d, n, 50.0) for m in ("full", "snapkv@0.5") for d in (0.0, 1.0) for n in (512, 1024)]
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    many = [needle(f"m{i}@0.5", d, n, 50.0) for i in range(30) for d in depths for n in (512, 1024)]
    one_length = [r for r in many if r["length"] == 512]
    sizes = {}
    for name, records in (("few", few), ("many", many), ("one", one_length)):
        path = report.plot_needle_heatmap(tmp_path / f"{name}.png", records)
        sizes[name] = Image.open(path).size
    assert sizes["many"][1] > 3 * sizes["few"][1]  # rows grow with the methods
    assert sizes["many"][0] > 1.25 * sizes["one"][0]  # panels grow with the lengths
    assert report.plot_needle_heatmap(tmp_path / "none.png", [record("full", "passkey")]) is None


def test_the_score_legend_fills_the_group_template_with_the_ratios_drawn(tmp_path, monkeypatch):
    legends: dict[str, list[str]] = {}
    save = report._save

    def capture(fig, path):
        legends[path.name] = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
        return save(fig, path)

    monkeypatch.setattr(report, "_save", capture)
    records = [{**record("full", "a", score=90), "ratio": 0.0}]
    for ratio in (0.25, 0.5):
        records.append({**record(f"h2o(ratio={ratio!r})", "a", ratio=ratio), "method_group": "h2o(ratio={ratio})",
                        "ratio": ratio})
    records.append({**record("snapkv(ratio=0.5)", "a"), "method_group": "snapkv(ratio={ratio})", "ratio": 0.5})
    report.plot_score_vs_compression(tmp_path / "tasks.png", records)
    report.plot_score_vs_compression_mean(tmp_path / "mean.png", records)
    expected = ["full (baseline)", "h2o(ratio=0.25/0.5)", "snapkv(ratio=0.5)"]
    assert legends == {"tasks.png": expected, "mean.png": expected}


def test_legend_texts_fill_ratios_and_budgets_and_keep_plain_labels():
    records = [
        {"model": "m", "method_group": "adakv(snapkv(ratio={ratio}))", "ratio": value} for value in (0.75, 0.25)
    ] + [
        {"model": "m", "method_group": "h2o(budget={budget})", "ratio": None, "budget": 128},
        {"model": "m", "method_group": "full", "ratio": 0.0, "budget": None},
    ]
    assert report.group_legend_texts(records, several_models=False) == {
        "adakv(snapkv(ratio={ratio}))": "adakv(snapkv(ratio=0.25/0.75))",
        "h2o(budget={budget})": "h2o(budget=128)",
        "full": "full",
    }
    assert report.group_legend_texts(records[:1], several_models=True) == {
        "m: adakv(snapkv(ratio={ratio}))": "m: adakv(snapkv(ratio=0.75))"}


def test_results_md_states_the_samples_per_cell_and_what_few_of_them_can_show(tmp_path):
    two = [{**record(m, "passkey", ratio=0.5, score=50.0), "samples": 2, "kv_bytes": 1.0, "full_kv_bytes": 2.0}
           for m in ("full", "snapkv@0.5")]
    text = report.write_markdown(tmp_path / "results.md", two).read_text()
    assert "Samples per cell: 2." in text
    assert "steps of 50 points" in text and "50/√2 ≈ 35 points" in text
    assert "fails outright from one that works" in text
    assert "| passkey | 1024 | after | `full` | 50.00 | 2 |" in text  # the every-cell table's n column

    twenty = [{**r, "samples": 20} for r in two]
    note = report.sample_count_note(twenty)
    assert note.startswith("Samples per cell: 20.") and "steps of 5 points" in note and "≈ 11 points" in note
    assert "fails outright" not in note
    assert report.sample_count_note([two[0], twenty[1]]).startswith(
        "Samples per cell: 2 to 20 (column n of the last table).")
    perplexity = [{**record("full", "ppl", kind="perplexity"), "samples": 2}]
    assert report.sample_count_note(perplexity) == "Samples per cell: 2."
    assert report.sample_count_note([record("full", "a")]) == ""
