"""The bench runner: plan cells, skip finished ones, measure the rest, append each to ``results.jsonl``.

The model is loaded once per run; the samples of a (task, length, query mode) group are generated and
tokenised once and reused by every method. Sample ``i`` depends only on (seed, task, length, ``i``), so
raising ``samples`` extends a finished cell instead of redoing it: only the new samples run, and the cell's
record is the finished record merged with theirs (see :func:`~kvstack.bench.records.merge_records`; the
merged record names the one it extends in ``extended_from``, and reports drop the superseded one).

The runner's parts live beside it, and their public names are importable from here too: cells, methods and
keys in :mod:`kvstack.bench.cells`; ``results.jsonl``, checkpoints and the records reports show in
:mod:`kvstack.bench.results`; a cell's record in :mod:`kvstack.bench.records`; measuring cells in
:mod:`kvstack.bench.measure`; the checks before a run in :mod:`kvstack.bench.validation`; the progress bar
in :mod:`kvstack.bench.progress`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvstack.bench.cells import HARNESS_VERSION, Cell, MethodRun, cell_config, cell_key, expand_methods, plan_cells
from kvstack.bench.config import BenchConfig, BenchError
from kvstack.bench.measure import prefill_share_key, run_cell, run_cells_shared, score_settled, shares_prefill, warm_up
from kvstack.bench.progress import ProgressBar, cell_line
from kvstack.bench.records import merge_records
from kvstack.bench.results import (
    CHECKPOINT_FILE,
    RESULTS_FILE,
    STALE_FILE,
    append_result,
    checkpoint_record,
    ensure_output_dir,
    extendable_records,
    key_without_samples,
    latest_results,
    read_results,
    reported_results,
    save_checkpoints,
    set_aside_stale,
    write_run_config,
)
from kvstack.bench.tasks import Sample, Task
from kvstack.bench.validation import check_context, check_default_model, validate_config
from kvstack.models import names_default_model

__all__ = [
    "CHECKPOINT_FILE",
    "HARNESS_VERSION",
    "RESULTS_FILE",
    "BenchResult",
    "Cell",
    "MethodRun",
    "append_result",
    "cell_config",
    "cell_key",
    "ensure_output_dir",
    "expand_methods",
    "latest_results",
    "plan_cells",
    "read_results",
    "reported_results",
    "run_bench",
    "run_cell",
    "run_cells_shared",
    "sample_rng",
    "score_settled",
    "shares_prefill",
]

_OnRecords = Callable[[list[dict[str, Any]]], None]  # on_checkpoint: the records of a batch
_OnRecord = Callable[[dict[str, Any]], None]  # on_cell: one finished record


@dataclasses.dataclass
class BenchResult:
    """What :func:`run_bench` did.

    Attributes
    ----------
    out_dir:
        The output directory.
    records:
        The records the reports show (this run's and earlier ones'): one per (model, method, task,
        variant, length, query mode), this run's cells winning over other measurements of the same
        (:func:`reported_results`).
    ran, skipped:
        Cells measured by this run / skipped because ``results.jsonl`` already had them.
    files:
        Report files written (CSV, Markdown, PNGs).
    left_out:
        Records in ``results.jsonl`` the reports leave out: other measurements (another seed, sample count,
        setting or harness version) of a cell identity shown.
    changed_artefacts:
        Calibration files (head maps, layer maps, statistics) that hold other bytes than when some of this
        run's cells were measured: those cells were measured again, their old records moved to ``stale.jsonl``.
    """

    out_dir: Path
    records: list[dict[str, Any]]
    ran: int
    skipped: int
    files: list[Path]
    left_out: int = 0
    changed_artefacts: list[str] = dataclasses.field(default_factory=list)


def sample_rng(seed: int, task: Task, length: int, index: int) -> random.Random:
    """The generator sample ``index`` of a ``task`` cell at ``length`` draws from: it depends on nothing else, so
    every method of a grid sees the same samples, and a script can rebuild any one of them."""
    text = f"{seed}|{task.name}|{task.variant}|{length}|{index}"
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


def run_bench(
    config: BenchConfig,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    *,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
) -> BenchResult:
    """Run (or resume) a bench and write its reports.

    Parameters
    ----------
    config:
        What to measure and where to write it.
    model, tokenizer:
        An already loaded model and tokenizer; when None, ``kvstack.models.load_model(config.model)``
        loads them (once, and only if some cell is left to run). ``config.model`` names the model in
        results either way.
    on_cell:
        Called with each record right after it is written to ``results.jsonl``.
    on_checkpoint:
        With ``config.checkpoint_every``: called with the records of a cell, or of a batch of cells sharing
        their prompt forwards, right after their progress is saved to ``partial.jsonl`` (see
        :func:`~kvstack.bench.results.checkpoint_record`). Either callback may raise to stop the run: what it was
        given is saved.

    Returns
    -------
    BenchResult

    Raises
    ------
    BenchError, kvstack.SpecError
        For bad input, before any cell runs: unknown task, zero samples, a length beyond the model's
        context or too short for a task, an unwritable output directory, a bad method spec.
    """
    validate_config(config)
    cells = plan_cells(config, device=None if model is None else next(model.parameters()).device)
    out_dir = ensure_output_dir(config.out_dir)
    changed_artefacts = set_aside_stale(out_dir, [cell.config for cell in cells])
    if changed_artefacts:
        print(f"kvstack: {', '.join(changed_artefacts)} changed since some of these cells were measured; they are "
              f"measured again (their old records are in {out_dir / STALE_FILE})", file=sys.stderr)
    finished = read_results(out_dir / RESULTS_FILE)
    done = {record["key"] for record in finished}
    pending = [cell for cell in cells if cell.key not in done]
    prefix = _records_to_extend(pending, finished, out_dir, config)
    ran = 0
    if pending:
        model, tokenizer = _ready_model(model, tokenizer, cells, config)
        ran = _run_pending(model, tokenizer, pending, prefix, config, out_dir, on_cell, on_checkpoint)
    result = _report(out_dir, config, cells, ran=ran, skipped=len(cells) - len(pending))
    return dataclasses.replace(result, changed_artefacts=changed_artefacts)


def _records_to_extend(pending: Sequence[Cell], finished: Sequence[dict[str, Any]], out_dir: Path,
                       config: BenchConfig) -> dict[str, dict[str, Any]]:
    """By cell key: a finished record of the same cell with fewer samples, or a checkpoint; the cell runs
    only the samples it lacks."""
    shorter = extendable_records([*finished, *read_results(out_dir / CHECKPOINT_FILE)])
    return {cell.key: record for cell in pending
            if (record := shorter.get(key_without_samples(cell.config))) and record["samples"] < config.samples}


def _ready_model(model: torch.nn.Module | None, tokenizer: Any, cells: Sequence[Cell],
                 config: BenchConfig) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer to measure with (loaded when not given), checked against the cells and warmed up."""
    if model is None:
        from kvstack.models import load_model

        model, tokenizer = load_model(config.model, device=config.device)
    elif names_default_model(config.model):
        check_default_model(model)
    if tokenizer is None:
        raise BenchError("run_bench was given a model without its tokenizer; pass tokenizer=...")
    model.eval()
    check_context(cells, model, config)
    warm_up(model)
    return model, tokenizer


def _run_pending(model: torch.nn.Module, tokenizer: Any, pending: Sequence[Cell], prefix: dict[str, dict[str, Any]],
                 config: BenchConfig, out_dir: Path, on_cell: _OnRecord | None,
                 on_checkpoint: _OnRecords | None) -> int:
    """Measure the cells left to run, a sample group at a time, under one progress bar; returns the number of
    records written."""
    groups: dict[tuple[str, str, int, str], list[Cell]] = {}
    for cell in pending:
        groups.setdefault(cell.group, []).append(cell)
    first_samples: dict[tuple[str, str, int, str], Sample] = {}
    for key, members in groups.items():  # sizing errors (length too short) before anything runs
        first_samples[key] = _make_sample(members[0], tokenizer, config, 0)
    to_run = sum(config.samples - (prefix[c.key]["samples"] if c.key in prefix else 0) for c in pending)
    progress = ProgressBar(config.progress, to_run)
    ran = 0
    try:
        for key, members in groups.items():
            first = members[0]
            samples = [first_samples.pop(key)]
            samples += [_make_sample(first, tokenizer, config, i) for i in range(1, config.samples)]
            for batch in _prefill_batches(members, prefix, config.share_prefill):
                ran += _run_batch(model, tokenizer, batch, samples, config, prefix, out_dir, progress,
                                  on_cell, on_checkpoint)
    finally:
        progress.close()
    return ran


def _report(out_dir: Path, config: BenchConfig, cells: Sequence[Cell], ran: int, skipped: int) -> BenchResult:
    """Write the reports of the records ``out_dir`` holds, this run's cells winning, and say what the run did."""
    records, left_out = reported_results(latest_results(out_dir / RESULTS_FILE), prefer={cell.key for cell in cells})
    write_run_config(out_dir, config)
    from kvstack.bench.report import write_reports

    files = write_reports(out_dir, records, plots=config.plots, left_out=len(left_out))
    return BenchResult(out_dir=out_dir, records=records, ran=ran, skipped=skipped, files=files,
                       left_out=len(left_out))


def _run_batch(model: torch.nn.Module, tokenizer: Any, batch: Sequence[Cell], samples: Sequence[Sample],
               config: BenchConfig, prefix: dict[str, dict[str, Any]], out_dir: Path, progress: ProgressBar,
               on_cell: _OnRecord | None, on_checkpoint: _OnRecords | None) -> int:
    """Measure one cell, or cells sharing their prompt forwards, over the samples their records lack; save
    a checkpoint every ``config.checkpoint_every`` samples and the finished records at the end. Returns
    the number of records written to ``results.jsonl``."""
    first = batch[0]
    variant = f" {first.task.variant}" if first.task.variant else ""
    label = first.method.label if len(batch) == 1 else f"{len(batch)} methods, one prompt forward"
    progress.describe(f"{first.task.name}{variant} L={first.length} {label}")
    so_far: list[dict[str, Any] | None] = [prefix.get(cell.key) for cell in batch]
    resumed = so_far[0] if so_far[0] is not None and so_far[0].get("checkpoint") else None
    # where earlier processes stopped: the finished records' timings come from each of them and this one
    resumes = [] if resumed is None else [*resumed.get("resumed_from_checkpoint", []),
                                          {"samples": resumed["samples"], "finished_at": resumed["finished_at"]}]
    start = so_far[0]["samples"] if so_far[0] is not None else 0
    step = config.checkpoint_every or len(samples)
    checkpoint_path = out_dir / CHECKPOINT_FILE
    while True:
        part = samples[start:start + step]
        if len(batch) == 1:
            measured = [run_cell(model, tokenizer, first, part, config, config.model)]
            progress.advance(len(part))
        else:
            measured = run_cells_shared(model, tokenizer, batch, part, config, config.model,
                                        on_sample=functools.partial(progress.advance, len(batch)))
        records = [record if earlier is None else _extended(earlier, record, cell)
                   for cell, earlier, record in zip(batch, so_far, measured, strict=True)]
        start += len(part)
        if start >= len(samples):
            break
        so_far = [checkpoint_record({**record, "resumed_from_checkpoint": resumes} if resumes else record)
                  for record in records]
        save_checkpoints(checkpoint_path, so_far)
        if on_checkpoint is not None:
            on_checkpoint(list(so_far))
    for record in records:
        if resumes:
            record["resumed_from_checkpoint"] = resumes
        append_result(out_dir / RESULTS_FILE, record)
        progress.print(cell_line(record))
    if step < len(samples) or resumed is not None:
        save_checkpoints(checkpoint_path, [], finished=records)  # the cells' checkpoints are done with
    for record in records:  # every record of a batch is saved before a callback may stop the run
        if on_cell is not None:
            on_cell(record)
    return len(records)


def _extended(earlier: dict[str, Any], later: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """:func:`merge_records`; extending a checkpoint keeps the checkpoint's own origin (a finished record
    with fewer samples, or none) rather than naming the checkpoint."""
    merged = merge_records(earlier, later, cell)
    if earlier.get("checkpoint"):
        merged.pop("extended_from", None)
        if earlier.get("extended_from"):
            merged["extended_from"] = earlier["extended_from"]
    merged.pop("checkpoint", None)
    return merged


def _prefill_batches(members: Sequence[Cell], prefix: dict[str, dict[str, Any]], share: bool) -> list[list[Cell]]:
    """Cells of one sample group in the order they run: lists of one cell, or of cells sharing a prefill.

    With ``share``, cells with the same :func:`prefill_share_key` that lack the same number of samples run
    together, first (a group of one runs alone); every other cell runs alone.
    """
    if not share:
        return [[cell] for cell in members]
    together: dict[tuple, list[Cell]] = {}
    alone = []
    for cell in members:
        key = prefill_share_key(cell)
        if key is not None:
            together.setdefault((key, prefix[cell.key]["samples"] if cell.key in prefix else 0), []).append(cell)
        else:
            alone.append([cell])
    return [*together.values(), *alone]


def _make_sample(cell: Cell, tokenizer: Any, config: BenchConfig, index: int) -> Sample:
    rng = sample_rng(config.seed, cell.task, cell.length, index)
    mode = "after" if cell.query_mode == "n/a" else cell.query_mode
    return cell.task.generate(tokenizer, cell.length, rng, mode, chat=config.chat,
                              answer_prefix=config.answer_prefix)
