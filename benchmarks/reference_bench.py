"""Reference results of the evaluation harness (issue "Evaluation harness") for SmolLM2-135M-Instruct.

Every registered method at compression ratios 0.25, 0.5 and 0.75, plus the full cache, on the whole
task suite (RULER subset, passkey, the needle grid, long-text perplexity), 20 samples per cell, at the
lengths given (default 1k and 2k tokens; add 4096 where the full cache still scores).

Methods that compress once, after the prompt (full, SnapKV, PyramidKV, Ada-KV over SnapKV, key norm,
random, Loki: 19 of the 34 methods per task cell) read each sample's prompt in one shared forward
(``BenchConfig.share_prefill``); since 2026-12-01 the methods that evict as they read (StreamingLLM, H2O,
TOVA, Scissorhands: 12 more), grouped by the attention statistics they need, also read together the
512-token chunks before each first evicts; and later on 2026-12-01, Ada-KV over H2O's three ratios (it
compresses once, with the scores H2O accumulates over the prompt) share one prompt forward that computes
those column statistics. Since the 2k needle grid (2026-12-01, afternoon), H2O and Scissorhands read
their chunks together (one attention call computes both statistics), as do StreamingLLM and TOVA: groups of
six rather than three.
Their scores, bytes and decoding are exactly those of separate runs
(tests/test_shared_prefill.py, tests/test_bench_run.py, benchmarks/shared_prefill_check.py). Their
records say ``prefill_shared_by``; ``prefill_s`` is the shared forward's time (for chunks: the chunks each
cache read, shared ones counted whole) and the peak memory is the group's. Records without
``prefill_shared_by`` (the earlier cells) ran one method at a time.

The run is :func:`kvstack.bench.run_bench`, so it is resumable: finished cells are keyed in
``results.jsonl`` and skipped, and the same command carries on where an earlier (or interrupted) run
stopped. ``--max-minutes`` ends the run cleanly at the first checkpoint past that time, so a long grid can be spread
over several sessions; ``PROGRESS.md`` says how much of the grid is done. Since 2026-12-03 a cell (or a batch
of cells sharing their prompt forwards) saves its progress every 2 samples to ``partial.jsonl``
(``BenchConfig.checkpoint_every``): a run stopped or killed mid-batch loses at most two samples of it, and the
next run resumes each cell from its checkpoint, with exactly the records of an uninterrupted run (records say
``resumed_from_checkpoint``; their timings then come from more than one process).

Lengths above ``--screen-above`` (2048) are screened first, as the issue asks for them only "where the
full cache still scores": the full cache runs on every task cell at that length, and the other methods
then run only on the task cells where its mean score reaches ``--full-floor`` (20 points, 4 of 20
samples), plus perplexity. PROGRESS.md lists the full cache's screening scores and what was kept.

Usage::

    python benchmarks/reference_bench.py [--lengths 1024,2048,4096] [--max-minutes 90]
        [--out benchmarks/results/reference] [--screen-above 2048] [--full-floor 20] [--tasks niah_multikey]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import cpu_name

from kvstack.bench import TASKS, BenchConfig, latest_results, plan_cells, read_results, run_bench
from kvstack.bench.report import comparable_cells
from kvstack.bench.runner import CHECKPOINT_FILE, cell_key
from kvstack.spec import list_methods

RATIOS = [0.25, 0.5, 0.75]
TASK_ORDER = [
    "passkey", "niah_single_noise", "niah_single_prose", "perplexity", "niah_multikey", "niah_multikey_uuid",
    "niah_multivalue", "niah_multiquery", "vt", "fwe", "cwe", "niah",
]  # the single needles and perplexity first, so a partial grid already compares every method on them
SAMPLES = 20
CHECKPOINT_EVERY = 2  # samples: a run stopped mid-batch (or killed) loses at most two samples of it


class _DeadlineError(Exception):
    """Raised from the per-cell callback when the time budget is spent (the finished cell is saved)."""


def reference_methods() -> list[str]:
    """Every registered selection method as a ``{ratio}`` template; wrappers wrap SnapKV and H2O."""
    templates = []
    for info in list_methods():
        if info.name == "full" or info.category.startswith("token/quantization"):
            continue  # codecs have their own grid (benchmarks/quant_quality.py)
        if info.category.startswith("token/merging"):
            continue  # merging is measured by benchmarks/merging_bench.py and benchmarks/cross_layer_bench.py
        if not info.wraps and "ratio" not in info.parameters:
            continue  # no compression ratio to sweep (palu: a rank; its figures are in benchmarks/results/quant)
        if info.wraps:
            templates += [f"{info.name}(snapkv(ratio={{ratio}}))", f"{info.name}(h2o(ratio={{ratio}}))"]
        else:
            templates.append(f"{info.name}(ratio={{ratio}})")
    return ["full", *templates]


ALL_TASKS = [*TASK_ORDER, *sorted(set(TASKS) - set(TASK_ORDER))]
SCREEN_ABOVE = 2048  # longer lengths run the grid only where the full cache still scores
FULL_FLOOR = 20.0  # mean score (points) the full cache must reach on a task cell for the grid to run there


def reference_config(lengths: list[int], out_dir: str, samples: int = SAMPLES, *, methods: list[str] | None = None,
                     tasks: list[str] | None = None, depths: list[float] | None = None) -> BenchConfig:
    """The reference grid (or a part of it: some methods, tasks or needle depths)."""
    extra = {} if depths is None else {"depths": depths}
    return BenchConfig(
        methods=reference_methods() if methods is None else methods, ratios=list(RATIOS),
        tasks=list(ALL_TASKS if tasks is None else tasks), lengths=lengths, samples=samples, out_dir=out_dir,
        progress=sys.stderr.isatty(), share_prefill=True, checkpoint_every=CHECKPOINT_EVERY, **extra,
    )


def screening(out_dir: str, length: int, samples: int, floor: float) -> tuple[dict[tuple[str, str], float], bool]:
    """The full cache's mean score on each task cell at ``length`` and whether every cell is finished."""
    screen = reference_config([length], out_dir, samples, methods=["full"])
    done = {record["key"]: record for record in read_results(Path(out_dir) / "results.jsonl")}
    cells = plan_cells(screen)
    scores = {(cell.task.name, cell.task.variant): done[cell.key]["score"] for cell in cells if cell.key in done}
    return scores, len(scores) == len(cells)


def length_config(out_dir: str, length: int, samples: int, screen_above: int, floor: float) -> BenchConfig | None:
    """What the grid runs at ``length``: everything, or (above ``screen_above``, once the full cache has been
    screened) the task cells where the full cache reaches ``floor``, plus perplexity; None when none does.
    While the screening is unfinished, the screening itself (the full cache on every task cell)."""
    if length <= screen_above:
        return reference_config([length], out_dir, samples)
    scores, finished = screening(out_dir, length, samples, floor)
    if not finished:
        return reference_config([length], out_dir, samples, methods=["full"])
    kept = {(task, variant) for (task, variant), score in scores.items() if task == "perplexity" or score >= floor}
    tasks = [name for name in ALL_TASKS if any(task == name for task, _ in kept)]
    depths = sorted(float(variant.split("=")[1]) for task, variant in kept if task == "niah")
    if not tasks:
        return None
    return reference_config([length], out_dir, samples, tasks=tasks, depths=depths or None)


def planned_cells(out_dir: str, lengths: list[int], samples: int, screen_above: int = SCREEN_ABOVE,
                  floor: float = FULL_FLOOR) -> list:
    """Every cell the grid runs at ``lengths`` (at a screened length: the screening, then what it kept)."""
    planned = []
    for length in lengths:
        at_length = length_config(out_dir, length, samples, screen_above, floor)
        planned += plan_cells(at_length) if at_length is not None else []
        if length > screen_above and at_length is not None and at_length.methods != ["full"]:
            planned += plan_cells(reference_config([length], out_dir, samples, methods=["full"]))
    return list({cell.key: cell for cell in planned}.values())


def grid_records(out_dir: str, lengths: list[int], samples: int, **screen: float) -> list[dict]:
    """The latest record of each cell of the grid; records of other settings in the same file are left out."""
    keys = {cell.key for cell in planned_cells(out_dir, lengths, samples, **screen)}
    return [record for record in latest_results(Path(out_dir) / "results.jsonl") if record["key"] in keys]


def write_progress(out_dir: Path, lengths: list[int], samples: int, command: str, started: str,
                   stopped_early: bool, report_only: bool = False, screen_above: int = SCREEN_ABOVE,
                   floor: float = FULL_FLOOR) -> None:
    """``PROGRESS.md``: the command, machine, and how many cells of the grid are finished, per length."""
    config = reference_config(lengths, str(out_dir), samples)
    planned = planned_cells(str(out_dir), lengths, samples, screen_above, floor)
    done = {record["key"] for record in read_results(out_dir / "results.jsonl")}
    lines = [
        "# Reference results: progress", "",
        f"- command: `{command}`",
        (f"- tables rewritten from results.jsonl at {started} (--report-only); every cell records its own "
         "finished_at" if started is None or report_only else
         f"- last run: started {started}, ended {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"
         + (" (stopped at its time budget; run the same command to continue)" if stopped_early else "")),
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}",
        f"- grid: {len(reference_methods())} method templates x ratios {RATIOS} on {len(config.tasks)} tasks, "
        f"{config.samples} samples per cell",
        "- methods that compress after the prompt share each sample's prompt forward, and (since 2026-12-01) "
        "methods that evict as they read share the prompt chunks read before each first evicts; later that day, "
        "Ada-KV over H2O's three ratios share a prompt forward with H2O's column statistics; from the 2k needle "
        "grid on, H2O with Scissorhands and StreamingLLM with TOVA share chunks in groups of six (same results as "
        "separate runs; `prefill_shared_by` in their records; earlier records ran one method at a time)", "",
        "| length | cells done | cells planned |", "| --- | --- | --- |",
    ]
    for length in lengths:
        cells = [cell for cell in planned if cell.length == length]
        finished = sum(cell.key in done for cell in cells)
        lines.append(f"| {length} | {finished} | {len(cells)} |")
    tasks_done = sorted({(cell.task.name, cell.task.variant, cell.length) for cell in planned if cell.key in done})
    lines += ["", "Task cells with at least one method finished: "
              + (", ".join(f"{t}{' ' + v if v else ''}@{n}" for t, v, n in tasks_done) or "none"), ""]
    under_way = checkpointed(out_dir, planned, done, samples)
    if under_way:
        lines += [f"Under way ({CHECKPOINT_FILE}; the same command resumes them from there): "
                  + ", ".join(f"{name} ({count} cells, {saved} of {samples} samples)"
                              for name, count, saved in under_way), ""]
    for length in lengths:
        if length <= screen_above:
            continue
        scores, finished = screening(str(out_dir), length, samples, floor)
        status = "finished" if finished else f"{len(scores)} task cells so far"
        lines += [f"Screening at {length} tokens ({status}): the full cache's mean score per task cell; the grid "
                  f"runs where it reaches {floor:g} (and on perplexity).", "",
                  "| task cell | full cache | grid |", "| --- | ---: | --- |"]
        for (task, variant), score in sorted(scores.items()):
            if task == "perplexity":
                lines.append(f"| perplexity | {score:.2f} (perplexity) | yes (always) |")
                continue
            name = f"{task} {variant}" if variant else task
            lines.append(f"| {name} | {score:.2f} | {'yes' if score >= floor else 'no'} |")
        lines.append("")
    records = grid_records(str(out_dir), lengths, samples, screen_above=screen_above, floor=floor)
    for length in config.lengths:
        lines += [f"## Summary at {length} tokens", "", summary_table(records, length), ""]
    (out_dir / "PROGRESS.md").write_text("\n".join(lines))


def checkpointed(out_dir: Path, planned: list, done: set[str], samples: int) -> list[tuple[str, int, int]]:
    """Unfinished cells of the grid with a checkpoint: (task cell @ length, cells, samples saved) per group."""
    unfinished = {cell.key: cell for cell in planned if cell.key not in done}
    groups: dict[tuple[str, int], int] = {}
    for record in read_results(out_dir / CHECKPOINT_FILE):
        # a checkpoint's config is its cell's but for the samples done so far
        cell = unfinished.get(cell_key({**record["config"], "samples": samples}))
        if cell is not None:
            variant = f" {cell.task.variant}" if cell.task.variant else ""
            name = (f"{cell.task.name}{variant}@{cell.length}", int(record["samples"]))
            groups[name] = groups.get(name, 0) + 1
    return [(name, count, saved) for (name, saved), count in sorted(groups.items())]


def summary_table(records: list[dict], length: int) -> str:
    """Markdown: mean score per method template and ratio over generation tasks finished by every method shown.

    Each row is taken over the same work. While the grid fills, the table shows the set of methods and task
    cells that covers the most finished cells (methods with fewer finished cells are listed as pending).
    Perplexity is shown in its own column (lower is better).
    """
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        if record["length"] == length:
            cells.setdefault((record["task"], record["variant"]), {})[record["method"]] = record
    methods, compared = comparable_cells([r for r in records if r["length"] == length and r["task"] != "perplexity"])
    generation = [(task, variant) for _, task, variant, _, _ in compared]
    finished = {str(r["method"]) for r in records if r["length"] == length and r["task"] != "perplexity"}
    if not generation or "full" not in methods:
        return f"No task is finished for every method at {length} tokens yet."
    pending = sorted(set(finished) - methods)
    groups: dict[str, dict[float, str]] = {}
    for method in methods:
        record = cells[generation[0]][method]
        groups.setdefault(record["method_group"], {})[record["ratio"] or 0.0] = method
    names = ", ".join(f"{t}{' ' + v if v else ''}" for t, v in generation)
    waiting = f" Not in the table yet (fewer cells finished): {', '.join(pending)}." if pending else ""
    lines = [f"Mean score over {len(generation)} task cells at {length} tokens ({names}), "
             f"{cells[generation[0]]['full']['samples']} samples each; perplexity where finished "
             f"(lower is better).{waiting}", "",
             "| method | ratio 0.25 | ratio 0.5 | ratio 0.75 | perplexity at 0.25 / 0.5 / 0.75 |",
             "| --- | ---: | ---: | ---: | --- |"]
    perplexity = cells.get(("perplexity", ""), {})
    for group in sorted(groups, key=lambda g: (g != "full", g)):
        by_ratio = groups[group]
        row = [f"`{group}`"]
        ppl = []
        for ratio in RATIOS:  # the full cache's score is repeated under every ratio, as the baseline
            method = by_ratio.get(0.0 if group == "full" else ratio)
            if method is None:
                row.append("")
                continue
            row.append(f"{sum(cells[key][method]['score'] for key in generation) / len(generation):.1f}")
            if method in perplexity:
                ppl.append(f"{perplexity[method]['score']:.2f}")
        row.append(" / ".join(dict.fromkeys(ppl)))  # full: one value
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--out", default="benchmarks/results/reference")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop at the first checkpoint (every 2 samples) or cell past this many minutes "
                             "(resume with the same command)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the tables, plots and PROGRESS.md from results.jsonl")
    parser.add_argument("--screen-above", type=int, default=SCREEN_ABOVE,
                        help="lengths above this run the grid only where the full cache scores (default 2048)")
    parser.add_argument("--full-floor", type=float, default=FULL_FLOOR,
                        help="the full cache's mean score a task cell needs at a screened length (default 20)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks: run only these cells of the grid (its tables and PROGRESS.md "
                             "still cover the whole grid), e.g. to fit a shorter batch into a session")
    args = parser.parse_args()
    only_tasks = None if args.tasks is None else [item.strip() for item in args.tasks.split(",") if item.strip()]
    if only_tasks is not None:
        unknown = [name for name in only_tasks if name not in ALL_TASKS]
        if unknown or not only_tasks:
            parser.error(f"--tasks: unknown or no task {', '.join(unknown) or repr(args.tasks)}; "
                         f"choose from {', '.join(ALL_TASKS)}")
    torch.set_num_threads(os.cpu_count() or 1)
    lengths = [int(item) for item in args.lengths.split(",") if item.strip()]
    screen = {"screen_above": args.screen_above, "floor": args.full_floor}
    options = "".join(f" --{name} {value:g}" for name, value, default in (
        ("screen-above", args.screen_above, SCREEN_ABOVE), ("full-floor", args.full_floor, FULL_FLOOR))
        if value != default and any(length > args.screen_above for length in lengths))
    command = (f"python benchmarks/reference_bench.py --lengths {args.lengths} --samples {args.samples} "
               f"--out {args.out}{options} [--max-minutes M]")  # the command that runs (or continues) this grid
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes

    def on_cell(record: dict) -> None:
        print(json.dumps({k: record[k] for k in ("task", "variant", "length", "method", "score", "compression_ratio")}),
              flush=True)
        if deadline is not None and time.monotonic() > deadline:
            raise _DeadlineError

    def on_checkpoint(records: list[dict]) -> None:
        first = records[0]
        variant = f" {first['variant']}" if first["variant"] else ""
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        print(f"{now} checkpoint: {first['task']}{variant} L={first['length']}, {len(records)} cells at "
              f"{first['samples']} of {args.samples} samples ({first['wall_s'] * len(records):.0f} s so far)",
              flush=True)
        if deadline is not None and time.monotonic() > deadline:
            raise _DeadlineError

    stopped_early = False
    if args.report_only:
        from kvstack.bench.report import write_reports

        write_reports(Path(args.out), grid_records(args.out, lengths, args.samples, **screen), plots=True)
        write_progress(Path(args.out), lengths, args.samples, command, started, stopped_early=True,
                       report_only=True, **screen)
        return 0
    try:
        for length in lengths:  # one length at a time, so a partial run completes the shorter lengths first
            while (config := length_config(args.out, length, args.samples, **screen)) is not None:
                if only_tasks is not None:
                    config.tasks = [name for name in config.tasks if name in only_tasks]
                    if not config.tasks:
                        break  # none of the tasks asked for is in the grid at this length (yet)
                run_bench(config, on_cell=on_cell, on_checkpoint=on_checkpoint)
                if config.methods != ["full"] or length <= args.screen_above:
                    break  # the grid at this length is done; after a screening, the loop runs what it kept
                if only_tasks is not None and not screening(args.out, length, args.samples, args.full_floor)[1]:
                    break  # the screening of the tasks not asked for is still to run: it decides what is kept
    except _DeadlineError:
        stopped_early = True
        from kvstack.bench.report import write_reports

        write_reports(Path(args.out), grid_records(args.out, lengths, args.samples, **screen), plots=True)
    write_progress(Path(args.out), lengths, args.samples, command, started, stopped_early, **screen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
