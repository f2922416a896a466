"""The bench runner: plan cells, skip finished ones, measure the rest, append each to ``results.jsonl``.

A *cell* is one (model, method, task [variant], length, query mode) combination, measured over
``samples`` samples. Its key is a hash of everything that changes its result (see :func:`cell_config`),
so a rerun of the same command skips every finished cell, and an interrupted run loses only the cell
that was under way: each finished cell is appended to ``results.jsonl`` as one JSON line, flushed and
fsynced before the next starts.

Efficiency: the model is loaded once per run; the samples of a (task, length, query mode) group are
generated and tokenised once and reused by every method. Sample ``i`` depends only on (seed, task,
length, ``i``), so raising ``samples`` extends a finished cell instead of redoing it: only the new
samples run, and the cell's record is the finished record merged with theirs (see :func:`merge_records`;
the merged record names the one it extends in ``extended_from``, and reports drop the superseded one).

Generation cells: :func:`kvstack.api.prefill` reads the prompt (chunked for dynamic methods), the
first token is the argmax of its last logits, then greedy decoding one token per forward until an
end-of-sequence token, the task's ``max_new_tokens``, or a prediction that already holds every
reference (its substring score is 100 and cannot change; see :func:`score_settled`). ``prefill_s`` times the prefill,
``ttft_s`` prefill + first token, ``decode_tokens_per_s`` the tokens after the first over the time
spent producing them (``tpot_s`` is its inverse). KV bytes come from the cache's own accounting
(:meth:`kvstack.KVStackCache.summary`) after the prompt (``*_prefill``) and at the end of the cell.

Perplexity cells: see :class:`kvstack.bench.tasks.Perplexity`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from kvstack.bench.config import QUERY_MODES, BenchConfig, BenchError
from kvstack.bench.metrics import PeakMemory, synchronize
from kvstack.bench.scoring import score as score_text
from kvstack.bench.tasks import LENGTH_TOLERANCE, Sample, Task, make_tasks
from kvstack.models import DEFAULT_MODEL, DEFAULT_MODEL_SHAPE, names_default_model
from kvstack.spec import parse

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
    "expand_methods",
    "plan_cells",
    "read_results",
    "reported_results",
    "run_bench",
]

HARNESS_VERSION = 2
"""Bumped when a change to the harness changes results; part of every cell key."""

RESULTS_FILE = "results.jsonl"

CHECKPOINT_FILE = "partial.jsonl"
"""Where :attr:`BenchConfig.checkpoint_every` saves cells still under way: one record per such cell, with the
samples done so far (its ``config`` and ``key`` say that sample count), removed once the cell is finished."""

_BARE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One concrete method of a run.

    Attributes
    ----------
    spec:
        The spec string given to :func:`kvstack.make_cache`.
    label:
        Its canonical form (``parse(spec).label()``), used in keys and tables.
    group:
        The line it belongs to in plots: the template it came from (``snapkv(ratio={ratio})``) or its label.
    ratio, budget:
        The requested compression ratio / budget (None when not set through the bench).
    dynamic:
        Whether the method evicts at every forward.
    """

    spec: str
    label: str
    group: str
    ratio: float | None
    budget: int | None
    dynamic: bool


def expand_methods(
    methods: Sequence[str], ratios: Sequence[float] = (), budgets: Sequence[int] = (), baseline: bool = True
) -> list[MethodRun]:
    """Turn method templates into concrete methods (see :class:`~kvstack.bench.config.BenchConfig`).

    Raises
    ------
    kvstack.SpecError
        For a spec that does not parse (the message names the valid methods).
    BenchError
        For a placeholder with no values to fill it, or an empty method list.
    """
    runs: dict[str, MethodRun] = {}

    def add(spec: str, group: str, ratio: float | None, budget: int | None) -> None:
        method = parse(spec)
        label = method.label()
        runs.setdefault(label, MethodRun(spec, label, "full" if label == "full" else group, ratio, budget,
                                         bool(method.dynamic)))

    templates = [m.strip() for m in methods if m and m.strip()]
    if not templates:
        raise BenchError("no methods given; e.g. --methods 'full,snapkv(ratio={ratio})' --ratios 0.5")
    if baseline and "full" not in templates:
        templates.insert(0, "full")
    for template in templates:
        if _BARE_NAME.match(template) and template.lower() != "full":
            if not ratios and not budgets:
                raise BenchError(f"method {template!r} needs --ratios or --budgets (or a full spec like "
                                 f"'{template}(ratio=0.5)')")
            for ratio in ratios:
                add(f"{template}(ratio={ratio})", f"{template}(ratio={{ratio}})", float(ratio), None)
            for budget in budgets:
                add(f"{template}(budget={budget})", f"{template}(budget={{budget}})", None, int(budget))
            continue
        has_ratio, has_budget = "{ratio}" in template, "{budget}" in template
        if has_ratio and has_budget:
            raise BenchError(f"method {template!r} has both {{ratio}} and {{budget}}; use one")
        if has_ratio:
            if not ratios:
                raise BenchError(f"method {template!r} has a {{ratio}} placeholder; give --ratios, e.g. 0.5")
            for ratio in ratios:
                add(template.replace("{ratio}", repr(float(ratio))), template, float(ratio), None)
        elif has_budget:
            if not budgets:
                raise BenchError(f"method {template!r} has a {{budget}} placeholder; give --budgets, e.g. 256")
            for budget in budgets:
                add(template.replace("{budget}", str(int(budget))), template, None, int(budget))
        else:
            method = parse(template)
            add(template, method.label(), getattr(method, "ratio", None), getattr(method, "budget", None))
    return list(runs.values())


# --------------------------------------------------------------------------------------------------------
# Cells and their keys
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
    """One cell to measure: a task variant at a length and query mode, with one method."""

    task: Task
    length: int
    query_mode: str
    method: MethodRun
    config: dict[str, Any]
    key: str

    @property
    def group(self) -> tuple[str, str, int, str]:
        """Cells sharing samples: same task variant, length and query mode."""
        return (self.task.name, self.task.variant, self.length, self.query_mode)


def max_new_tokens(task: Task, config: BenchConfig) -> int:
    """Decode limit of ``task`` in this run (0 for perplexity)."""
    if task.kind == "perplexity":
        return 0
    return int(config.max_new_tokens) if config.max_new_tokens else int(task.max_new_tokens)


def perplexity_chunk(method: MethodRun, config: BenchConfig) -> int:
    """Tokens per teacher-forced forward in a perplexity cell: ``ppl_stream_chunk`` for a method that evicts
    as the text streams in (so each scored token sees little more than its budget), ``ppl_chunk`` otherwise."""
    return int(config.ppl_stream_chunk if method.dynamic else config.ppl_chunk)


def cell_config(model_name: str, task: Task, length: int, query_mode: str, method: MethodRun,
                config: BenchConfig, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything that determines a cell's result; its hash is the cell key.

    The device's type is part of it (timings differ between devices, and so may the last bits of every
    sum): a cell measured on ``cuda`` is another cell than the same one on the CPU, and neither is
    skipped for the other. The CPU is left out of the dictionary, so CPU cells keep the keys they had
    before devices were keyed.
    """
    perplexity = task.kind == "perplexity"
    device_type = torch.device(device).type
    return {
        **({} if device_type == "cpu" else {"device": device_type}),
        "harness_version": HARNESS_VERSION,
        "model": model_name,
        "method": method.label,
        "task": task.name,
        "task_params": task.params(),
        "length": int(length),
        "query_mode": "n/a" if perplexity else query_mode,
        "chat": None if perplexity else bool(config.chat),
        "answer_prefix": None if perplexity else bool(config.answer_prefix),
        "max_new_tokens": max_new_tokens(task, config),
        "ppl_chunk": perplexity_chunk(method, config) if perplexity else None,
        "samples": int(config.samples),
        "seed": int(config.seed),
    }


def cell_key(config: dict[str, Any]) -> str:
    """Stable 20-hex-digit key of a cell configuration (sha256 of its canonical JSON)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def plan_cells(config: BenchConfig, model_name: str | None = None,
               device: torch.device | str | None = None) -> list[Cell]:
    """Every cell of ``config``, once each, in run order (task, length, query mode, then method).

    ``device`` is where the cells run (it is part of their keys); None: ``config.device`` as
    :func:`kvstack.models.resolve_device` resolves it (CUDA when available).
    """
    if device is None:
        from kvstack.models import resolve_device

        device = resolve_device(config.device)
    tasks = make_tasks(config.tasks, prose=config.prose, depths=config.depths)
    methods = expand_methods(config.methods, config.ratios, config.budgets, config.baseline)
    cells = []
    for task in tasks:
        modes = ["n/a"] if task.kind == "perplexity" else list(dict.fromkeys(config.query_modes))
        for length in config.lengths:
            for mode in modes:
                for method in methods:
                    settings = cell_config(model_name or config.model, task, length, mode, method, config,
                                           device)
                    cells.append(Cell(task, int(length), mode, method, settings, cell_key(settings)))
    unique = {cell.key: cell for cell in reversed(cells)}  # a task or length given twice is one cell, run once
    return [cell for cell in cells if unique.get(cell.key) is cell]


# --------------------------------------------------------------------------------------------------------
# results.jsonl
# --------------------------------------------------------------------------------------------------------


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of ``results.jsonl`` (or ``partial.jsonl``), in file order.

    Only a torn last line, left by an interrupted write (no newline after it), is skipped, with a warning on
    stderr; :func:`append_result` removes it before the next record. Any other line that is not a record
    raises :class:`BenchError` naming the file and line, so a report never loses a cell without a word.
    """
    file = Path(path)
    if not file.exists():
        return []
    lines = file.read_text(encoding="utf-8").split("\n")
    unfinished = lines.pop()  # the text after the last newline: "" unless a write was interrupted
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            records.append(_parse_record(line, file, number))
    if unfinished.strip():
        try:
            records.append(_parse_record(unfinished, file, len(lines) + 1))
        except BenchError:
            print(f"kvstack: {file}:{len(lines) + 1}: skipping a torn last line (an interrupted write)",
                  file=sys.stderr)
    return records


def _parse_record(line: str, file: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BenchError(f"{file}:{number}: damaged record ({err.msg} at column {err.colno}); repair or delete "
                         "that line, then run again") from None
    if not isinstance(record, dict) or "key" not in record:
        raise BenchError(f"{file}:{number}: not a kvstack record (no 'key'); repair or delete that line")
    return record


def _drop_torn_tail(fh: Any) -> None:
    """Cut an unfinished last line (an interrupted write) off the end of ``fh``, opened ``a+b`` / ``r+b``."""
    end = fh.seek(0, os.SEEK_END)
    position = end
    while position > 0:
        step = min(1 << 16, position)
        fh.seek(position - step)
        block = fh.read(step)
        newline = block.rfind(b"\n")
        if newline >= 0:
            position = position - step + newline + 1
            break
        position -= step
    if position == end:
        return
    print(f"kvstack: {getattr(fh, 'name', 'results')}: removing a torn last line (an interrupted write)",
          file=sys.stderr)
    fh.truncate(position)


def latest_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One record per cell key: the last one written to ``results.jsonl`` (a re-run cell replaces the old).

    A record that a later one extended with more samples (named in its ``extended_from``) is left out.
    """
    latest = {record["key"]: record for record in read_results(path)}
    extended = {record["extended_from"]["key"] for record in latest.values() if record.get("extended_from")}
    return [record for key, record in latest.items() if key not in extended]


def cell_identity(record: dict[str, Any]) -> tuple[str, str, str, str, int, str]:
    """What a report row stands for: (model, method, task, variant, length, query mode).

    Records of one identity that differ in anything else (seed, sample count, harness or task version,
    chat template, answer prefix, decode limit, prose file, device) are different measurements of it.
    """
    return (str(record["model"]), str(record["method"]), str(record["task"]), str(record.get("variant", "")),
            int(record["length"]), str(record["query_mode"]))


def reported_results(records: Sequence[dict[str, Any]],
                     prefer: Collection[str] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The records a report shows, one per :func:`cell_identity`, and the ones it leaves out.

    Reports average over variants and lengths, so two measurements of one identity (say ``--seed 0``
    and ``--seed 1`` written to the same directory) must not both reach them. Where several records
    share an identity the report keeps the one whose key is in ``prefer`` (the cells the current run
    planned), else the one finished last; ``results.jsonl`` keeps every record.

    Parameters
    ----------
    records:
        One record per cell key, e.g. :func:`latest_results`.
    prefer:
        Cell keys that win over other records of their identity.

    Returns
    -------
    (shown, left_out)
        ``shown`` in the order of ``records``.
    """
    chosen: dict[tuple[str, str, str, str, int, str], dict[str, Any]] = {}
    for record in records:
        identity = cell_identity(record)
        held = chosen.get(identity)
        if held is None or _report_rank(record, prefer) > _report_rank(held, prefer):
            chosen[identity] = record
    kept = {id(record) for record in chosen.values()}
    shown = [record for record in records if id(record) in kept]
    return shown, [record for record in records if id(record) not in kept]


def _report_rank(record: dict[str, Any], prefer: Collection[str]) -> tuple[bool, str]:
    return record["key"] in prefer, str(record.get("finished_at") or "")


def _without_samples(config: dict[str, Any]) -> str:
    return cell_key({k: v for k, v in config.items() if k != "samples"})


def extendable_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Finished records by their configuration without the sample count: for each, the one with most samples."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        config = record.get("config")
        if not config or record.get("samples") != config.get("samples"):
            continue
        key = _without_samples(config)
        if key not in best or record["samples"] >= best[key]["samples"]:
            best[key] = record
    return best


def merge_records(earlier: dict[str, Any], later: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """One record for ``cell`` from ``earlier`` (samples ``0..n-1``) and ``later`` (samples ``n..``, same cell).

    Scores and timings are recomputed from the per-sample rows; KV bytes and token counts are
    sample-weighted means; peak memory is the larger of the two runs'. ``extended_from`` names the
    earlier record.
    """
    n_early, n_late = int(earlier["samples"]), int(later["samples"])
    total = n_early + n_late
    per_sample = [dict(entry) for entry in earlier["per_sample"]]
    per_sample += [{**entry, "index": n_early + i} for i, entry in enumerate(later["per_sample"])]
    merged = dict(later)

    def weighted(name: str) -> float:
        return (earlier[name] * n_early + later[name] * n_late) / total

    for name in ("prompt_tokens", "kv_bytes", "full_kv_bytes", "kv_bytes_prefill", "full_kv_bytes_prefill",
                 "tokens_kept", "tokens_seen"):
        merged[name] = weighted(name)
    merged["compression_ratio"] = _saved(merged["kv_bytes"], merged["full_kv_bytes"])
    merged["compression_ratio_prefill"] = _saved(merged["kv_bytes_prefill"], merged["full_kv_bytes_prefill"])
    merged.update(_sample_summary(per_sample, cell.task.kind == "perplexity"))
    deltas = [r for r in (earlier, later) if r.get("peak_rss_delta_bytes") is not None]
    if deltas:
        peak = max(deltas, key=lambda r: r["peak_rss_delta_bytes"])
        for name in ("peak_rss_bytes", "base_rss_bytes", "peak_rss_delta_bytes", "peak_rss_method"):
            merged[name] = peak[name]
    gpu = [r["peak_gpu_bytes"] for r in (earlier, later) if r.get("peak_gpu_bytes") is not None]
    merged["peak_gpu_bytes"] = max(gpu) if gpu else None
    merged["wall_s"] = earlier["wall_s"] + later["wall_s"]
    merged["samples"] = total
    merged["per_sample"] = per_sample
    merged["extended_from"] = {"key": earlier["key"], "samples": n_early, "finished_at": earlier["finished_at"]}
    return merged


def append_result(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record as a JSON line, then flush and fsync, so a finished cell survives a crash."""
    line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
    with open(path, "r+b" if Path(path).exists() else "w+b") as fh:
        _drop_torn_tail(fh)  # its record was never finished; the file holds only whole lines
        fh.seek(0, os.SEEK_END)
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoints(path: str | os.PathLike[str], records: Sequence[dict[str, Any]],
                     finished: Sequence[dict[str, Any]] = ()) -> None:
    """Rewrite the checkpoint file with ``records`` in place of earlier checkpoints of the same cells.

    Checkpoints of the cells of ``finished`` (full records) are dropped too. A cell is named by its
    configuration without the sample count. The file is replaced atomically (written beside it, then
    renamed), so an interruption leaves either the old checkpoints or the new ones.
    """
    file = Path(path)
    replaced = {_without_samples(record["config"]) for record in [*records, *finished]}
    kept = [record for record in read_results(file)
            if record.get("config") and _without_samples(record["config"]) not in replaced]
    kept += list(records)
    if not kept and not file.exists():
        return
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in kept:
            fh.write(json.dumps(record, default=_json_default, allow_nan=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, file)


def checkpoint_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a cell measured over its first ``record['samples']`` samples) keyed as a cell of that many
    samples: what :func:`extendable_records` resumes from."""
    config = {**record["config"], "samples": int(record["samples"])}
    return {**record, "key": cell_key(config), "config": config, "checkpoint": True}


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def ensure_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and check files can be written in it; :class:`BenchError` otherwise."""
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
        results = directory / RESULTS_FILE
        if results.exists() and not os.access(results, os.W_OK):
            raise PermissionError(f"{results} is read-only")
    except OSError as err:
        reason = err.strerror or str(err)
        raise BenchError(f"cannot write to output directory {str(directory)!r} ({reason}); "
                         "choose a writable --out") from None
    return directory


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def validate_config(config: BenchConfig) -> None:
    """Refuse bad settings before anything runs (BenchError / SpecError, one line each)."""
    samples = config.samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise BenchError(f"samples must be a positive integer, got {samples!r}; e.g. --samples 3")
    if not config.lengths:
        raise BenchError("no lengths given; e.g. --lengths 1024,2048")
    for length in config.lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise BenchError(f"lengths must be positive integers (tokens), got {length!r}")
    if not config.tasks:
        raise BenchError("no tasks given; see kvstack bench --list-tasks")
    for mode in config.query_modes:
        if mode not in QUERY_MODES:
            raise BenchError(f"unknown query mode {mode!r}; choose from {', '.join(QUERY_MODES)}")
    if not config.query_modes:
        raise BenchError(f"no query mode given; choose from {', '.join(QUERY_MODES)}")
    if config.max_new_tokens is not None and (not isinstance(config.max_new_tokens, int)
                                              or config.max_new_tokens < 1):
        raise BenchError(f"max_new_tokens must be a positive integer, got {config.max_new_tokens!r}")
    for name in ("ppl_chunk", "ppl_stream_chunk"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BenchError(f"{name} must be a positive integer, got {value!r}")
    every = config.checkpoint_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise BenchError(f"checkpoint_every must be a positive integer (samples) or None, got {every!r}; "
                         "e.g. --checkpoint-every 5")
    for ratio in config.ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise BenchError(f"ratios are fractions evicted, in [0, 1); got {ratio!r}")
    for budget in config.budgets:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise BenchError(f"budgets are positive token counts; got {budget!r}")
    if config.device is not None:
        from kvstack.models import resolve_device

        resolve_device(config.device)  # DeviceError (one line) for a device this machine lacks, before loading


def _check_context(cells: Sequence[Cell], model: torch.nn.Module, config: BenchConfig) -> None:
    from kvstack.models import model_geometry

    limit = model_geometry(model).max_context
    if limit is None:
        return
    for cell in cells:
        generated = max_new_tokens(cell.task, config)
        longest = _longest_prompt(cell.task, cell.length)
        if longest + generated > limit:
            fitting = next((n for n in range(limit - generated, 0, -1)
                            if _longest_prompt(cell.task, n) + generated <= limit), 0)
            sized = "" if longest == cell.length else ", sized within 2%"
            raise BenchError(
                f"length {cell.length} (a {cell.task.name} prompt of up to {longest} tokens{sized}, "
                f"+{generated} tokens to generate) is beyond the model's context of {limit} tokens; "
                f"use lengths <= {fitting}"
            )


def _check_default_model(model: torch.nn.Module) -> None:
    """Refuse a given model that is not the default one while ``config.model`` (the results' label) names it."""
    model_config = getattr(model, "config", None)
    found = {name: getattr(model_config, name, None) for name in DEFAULT_MODEL_SHAPE}
    if found != DEFAULT_MODEL_SHAPE:
        shape = ", ".join(f"{name}={value}" for name, value in found.items())
        raise BenchError(f"config.model names the default model ({DEFAULT_MODEL}), which labels every result, but "
                         f"the model given is another ({shape}); set BenchConfig(model=...) to its name")


def _longest_prompt(task: Task, length: int) -> int:
    """The most tokens a prompt of ``task`` sized to ``length`` can have: generation tasks size within 2% (at
    least 1 token), a perplexity excerpt is exactly ``length`` tokens."""
    if task.kind == "perplexity":
        return length
    return length + math.floor(max(1.0, LENGTH_TOLERANCE * length))


# --------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------


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
    """

    out_dir: Path
    records: list[dict[str, Any]]
    ran: int
    skipped: int
    files: list[Path]
    left_out: int = 0


def _sample_rng(seed: int, task: Task, length: int, index: int) -> random.Random:
    text = f"{seed}|{task.name}|{task.variant}|{length}|{index}"
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def score_settled(scorer: str, prediction: str, answers: Sequence[str]) -> bool:
    """True when ``prediction`` already scores 100 with a substring scorer.

    Greedy decoding only appends text, and a reference found in a prefix is found in every extension,
    so further tokens cannot change the score: decoding stops there (a large saving on the long-answer
    tasks, e.g. common words, without changing any score).
    """
    if scorer not in ("string_match_all", "string_match_part"):
        return False
    return score_text(scorer, prediction, answers) >= 100.0


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.fmean(present) if present else None


@dataclasses.dataclass
class Prefilled:
    """A cache that has read a sample's prompt in a shared forward (see :func:`run_cells_shared`).

    Attributes
    ----------
    cache:
        The cache, as its own prefill would have left it.
    logits:
        ``[1, V]`` logits of the last prompt position.
    seconds:
        Wall time of the prompt's reading: the shared forward, or (chunks) the chunks this cache read.
    """

    cache: Any
    logits: torch.Tensor
    seconds: float


def _read_prompt(model: torch.nn.Module, cell: Cell, ids: torch.Tensor, device: torch.device, seed: int,
                 prefilled: Prefilled | None) -> tuple[Any, torch.Tensor, float, float]:
    """``(cache, last logits, prefill seconds, start time)``: the prompt read now, or by a shared forward."""
    from kvstack.api import make_cache, prefill

    if prefilled is not None:
        return prefilled.cache, prefilled.logits, prefilled.seconds, time.perf_counter() - prefilled.seconds
    cache = make_cache(model, cell.method.spec, seed=seed)
    synchronize(device)
    start = time.perf_counter()
    logits = prefill(model, ids, cache)
    synchronize(device)
    return cache, logits, time.perf_counter() - start, start


@torch.no_grad()
def _generation_sample(model: torch.nn.Module, tokenizer: Any, cell: Cell, sample: Sample, limit: int,
                       eos: set[int], device: torch.device, seed: int,
                       prefilled: Prefilled | None = None) -> dict[str, Any]:
    from kvstack.api import cache_kwargs

    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    cache, logits, prefill_s, start = _read_prompt(model, cell, ids, device, seed, prefilled)
    token = logits.argmax(dim=-1, keepdim=True)
    generated = [int(token)]
    first = time.perf_counter()
    after_prompt = cache.summary()
    settled = False
    while len(generated) < limit and generated[-1] not in eos:
        out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(int(token))
        if score_settled(cell.task.scorer, tokenizer.decode(generated, skip_special_tokens=True), sample.answers):
            settled = True
            break
    synchronize(device)
    end = time.perf_counter()
    prediction = tokenizer.decode(generated, skip_special_tokens=True)
    return {
        "score": score_text(cell.task.scorer, prediction, sample.answers),
        "stopped_at_full_score": settled,
        "prediction": prediction,
        "answers": sample.answers,
        "tokens": len(sample.input_ids),
        "new_tokens": len(generated),
        "prefill_s": prefill_s,
        "ttft_s": first - start,
        "decode_s": end - first,
        "cache_prefill": after_prompt,
        "cache": cache.summary(),
        "metadata": sample.metadata,
    }


def _prompt_ids(cell: Cell, sample: Sample, device: torch.device) -> torch.Tensor:
    """``[1, T]`` the tokens a cell's cache reads as its prompt (a perplexity sample's context half)."""
    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    if cell.task.kind == "perplexity":
        return ids[:, : _perplexity_context(sample)]
    return ids


def _perplexity_context(sample: Sample) -> int:
    return int(sample.metadata.get("context_tokens") or max(1, len(sample.input_ids) // 2))


@torch.no_grad()
def _perplexity_sample(model: torch.nn.Module, cell: Cell, sample: Sample, chunk: int, device: torch.device,
                       seed: int, prefilled: Prefilled | None = None) -> dict[str, Any]:
    from kvstack.api import cache_kwargs

    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    length = ids.shape[1]
    context = _perplexity_context(sample)
    # last: [1, V] logits predicting token `context`
    cache, last, prefill_s, _ = _read_prompt(model, cell, ids[:, :context], device, seed, prefilled)
    prefilled_at = time.perf_counter()
    after_prompt = cache.summary()
    nll = 0.0
    for begin in range(context, length, chunk):
        stop = min(begin + chunk, length)
        out = model(input_ids=ids[:, begin:stop], **cache_kwargs(model, cache), use_cache=True)
        logits = torch.cat([last.unsqueeze(1), out.logits[:, :-1]], dim=1).float()  # [1, n, V]
        targets = ids[:, begin:stop]
        nll += float(torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum"))
        last = out.logits[:, -1]
    synchronize(device)
    end = time.perf_counter()
    scored = length - context
    return {
        "score": math.exp(nll / scored),
        "nll_sum": nll,
        "scored_tokens": scored,
        "tokens": length,
        "context_tokens": context,
        "prefill_s": prefill_s,
        "stream_s": end - prefilled_at,
        "cache_prefill": after_prompt,
        "cache": cache.summary(),
        "metadata": sample.metadata,
    }


def _saved(held: float, full: float) -> float:
    """Compression ratio: the fraction of the full-cache bytes not held (0 when there is nothing)."""
    return 1.0 - held / full if full else 0.0


def _sample_summary(rows: Sequence[dict[str, Any]], perplexity: bool) -> dict[str, Any]:
    """Score and timing fields of a cell record from its per-sample rows (measured or from a record)."""
    scores = [r["score"] for r in rows]
    summary: dict[str, Any] = {
        "score_std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
        "prefill_s": _mean([r["prefill_s"] for r in rows]),
    }
    if perplexity:
        stream_s = sum(r["stream_s"] for r in rows)
        return {
            **summary,
            "score": math.exp(sum(r["nll_sum"] for r in rows) / sum(r["scored_tokens"] for r in rows)),
            "ttft_s": None, "decode_tokens_per_s": None, "tpot_s": None, "new_tokens": None,
            "stream_tokens_per_s": sum(r["scored_tokens"] for r in rows) / max(stream_s, 1e-12),
        }
    decode_tokens = float(sum(r["new_tokens"] - 1 for r in rows))
    decode_time = sum(r["decode_s"] for r in rows)
    return {
        **summary,
        "score": statistics.fmean(scores),
        "ttft_s": _mean([r["ttft_s"] for r in rows]),
        "decode_tokens_per_s": decode_tokens / decode_time if decode_time > 0 and decode_tokens else None,
        "tpot_s": decode_time / decode_tokens if decode_tokens else None,
        "new_tokens": statistics.fmean(r["new_tokens"] for r in rows),
        "stream_tokens_per_s": None,
    }


def _aggregate(cell: Cell, rows: list[dict[str, Any]], memory: PeakMemory, wall: float, model_name: str,
               device: torch.device, config: BenchConfig, shared_by: int = 1) -> dict[str, Any]:
    task = cell.task
    perplexity = task.kind == "perplexity"
    held = sum(r["cache"]["kv_bytes"] for r in rows)
    full = sum(r["cache"]["full_kv_bytes"] for r in rows)
    held_prompt = sum(r["cache_prefill"]["kv_bytes"] for r in rows)
    full_prompt = sum(r["cache_prefill"]["full_kv_bytes"] for r in rows)
    per_sample = []
    for index, r in enumerate(rows):
        entry = {k: v for k, v in r.items() if k not in ("cache", "cache_prefill")}
        entry["index"] = index
        entry["kv_bytes"] = r["cache"]["kv_bytes"]
        entry["compression_ratio"] = r["cache"]["compression_ratio"]
        per_sample.append(entry)
    return {
        "key": cell.key,
        "harness_version": HARNESS_VERSION,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "method": cell.method.label,
        "method_spec": cell.method.spec,
        "method_group": cell.method.group,
        "dynamic": cell.method.dynamic,
        "ratio": 0.0 if cell.method.label == "full" else cell.method.ratio,
        "budget": cell.method.budget,
        "task": task.name,
        "variant": task.variant,
        "depth": getattr(task, "depth", None),
        "kind": task.kind,
        "scorer": task.scorer,
        "length": cell.length,
        "query_mode": cell.config["query_mode"],
        "chat": bool(rows[0]["metadata"].get("chat")) if not perplexity else False,
        "answer_prefix": cell.config["answer_prefix"],
        "max_new_tokens": cell.config["max_new_tokens"],
        "samples": len(rows),
        "seed": config.seed,
        **_sample_summary(rows, perplexity),
        "prompt_tokens": statistics.fmean(r["tokens"] for r in rows),
        "kv_bytes": held / len(rows),
        "full_kv_bytes": full / len(rows),
        "compression_ratio": _saved(held, full),
        "kv_bytes_prefill": held_prompt / len(rows),
        "full_kv_bytes_prefill": full_prompt / len(rows),
        "compression_ratio_prefill": _saved(held_prompt, full_prompt),
        "tokens_kept": statistics.fmean(r["cache"]["tokens_kept"] for r in rows),
        "tokens_seen": statistics.fmean(r["cache"]["tokens_seen"] for r in rows),
        "peak_rss_bytes": memory.peak_rss,
        "base_rss_bytes": memory.base_rss,
        "peak_rss_delta_bytes": (memory.peak_rss - memory.base_rss
                                 if memory.peak_rss is not None and memory.base_rss is not None else None),
        "peak_rss_method": memory.method,
        "peak_gpu_bytes": memory.peak_gpu,
        "prefill_shared_by": shared_by,
        "wall_s": wall,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(terse=True),
        "config": cell.config,
        "per_sample": per_sample,
    }


def run_cell(model: torch.nn.Module, tokenizer: Any, cell: Cell, samples: Sequence[Sample], config: BenchConfig,
             model_name: str) -> dict[str, Any]:
    """Measure one cell over ``samples`` and return its record (not yet written)."""
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    limit = max_new_tokens(cell.task, config)
    started = time.perf_counter()
    rows = []
    with PeakMemory(device) as memory:
        for sample in samples:
            if cell.task.kind == "perplexity":
                rows.append(_perplexity_sample(model, cell, sample, perplexity_chunk(cell.method, config), device,
                                                       config.seed))
            else:
                rows.append(_generation_sample(model, tokenizer, cell, sample, limit, eos, device, config.seed))
    return _aggregate(cell, rows, memory, time.perf_counter() - started, model_name, device, config)


def prefill_share_key(cell: Cell) -> tuple | None:
    """Which cells ``cell`` can read its prompts together with, or None when it reads them alone.

    ``("prompt",)``: a method that compresses once, after the prompt; such cells share one prompt forward
    (:func:`kvstack.prefill_shared`). ``("prompt", key)``: such a method with per-entry state or
    whole-matrix statistics (Ada-KV over H2O); cells with the same key share one prompt forward computing
    those statistics. ``("chunks", key)``: a method that evicts as it reads; cells with the same key share
    the prompt chunks read before each first evicts (:func:`kvstack.prefill_shared_chunks`).
    """
    from kvstack.cache.shared import method_chunk_share_key, method_share_blocker, method_stats_share_key
    from kvstack.methods.base import Composed

    method = parse(cell.method.spec)
    selection, codec = (method.selection, method.codec) if isinstance(method, Composed) else (method, None)
    if method_share_blocker(selection, codec) is None:
        return ("prompt",)
    key = method_stats_share_key(selection, codec)
    if key is not None:
        return ("prompt", key)
    key = method_chunk_share_key(selection, codec)
    return None if key is None else ("chunks", key)


def shares_prefill(cell: Cell) -> bool:
    """Whether ``cell``'s method can read its prompts in forwards shared with other methods."""
    return prefill_share_key(cell) is not None


def run_cells_shared(model: torch.nn.Module, tokenizer: Any, cells: Sequence[Cell], samples: Sequence[Sample],
                     config: BenchConfig, model_name: str,
                     on_sample: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Measure ``cells`` (one task, length and query mode; methods with one :func:`prefill_share_key`) over
    ``samples``.

    Each sample's prompt is read once for every cell (:func:`kvstack.prefill_shared`), or, for methods that
    evict as they read, its chunks are read together until each cache first evicts
    (:func:`kvstack.prefill_shared_chunks`); then each cell decodes (or streams, for perplexity) from its
    own cache, which is freed before the next. Scores, bytes and tokens are exactly those :func:`run_cell`
    measures. ``prefill_s`` is the shared forward's time (with chunks: the chunks each cache read, shared
    ones counted whole); peak memory is the whole group's; ``wall_s`` is the group's wall time over the
    cell count. ``on_sample`` is called after each sample.
    """
    from kvstack.api import make_cache, prefill_shared, prefill_shared_chunks

    chunked = prefill_share_key(cells[0])[0] == "chunks"

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    limit = max_new_tokens(cells[0].task, config)
    started = time.perf_counter()
    rows: list[list[dict[str, Any]]] = [[] for _ in cells]
    with PeakMemory(device) as memory:
        for sample in samples:
            ids = _prompt_ids(cells[0], sample, device)
            caches = [make_cache(model, cell.method.spec, seed=config.seed) for cell in cells]
            synchronize(device)
            start = time.perf_counter()
            if chunked:
                reads = prefill_shared_chunks(model, ids, caches)
                read_by = [(read.logits, read.seconds) for read in reads]
                shared_chunks = [read.chunks_shared for read in reads]
            else:
                logits = prefill_shared(model, ids, caches)
                synchronize(device)
                read_by = [(logits, time.perf_counter() - start)] * len(cells)
            for index, cell in enumerate(cells):
                prefilled = Prefilled(caches[index], *read_by[index])
                caches[index] = None  # the cell's row keeps no reference: its cache is freed after it
                if cell.task.kind == "perplexity":
                    row = _perplexity_sample(model, cell, sample, perplexity_chunk(cell.method, config), device,
                                             config.seed, prefilled)
                else:
                    row = _generation_sample(model, tokenizer, cell, sample, limit, eos, device, config.seed,
                                             prefilled)
                if chunked:
                    row["prompt_chunks_shared"] = shared_chunks[index]  # read with the group, before evicting
                rows[index].append(row)
                del prefilled
            if on_sample is not None:
                on_sample()
    wall = (time.perf_counter() - started) / len(cells)
    return [_aggregate(cell, cell_rows, memory, wall, model_name, device, config, shared_by=len(cells))
            for cell, cell_rows in zip(cells, rows, strict=True)]


def _cell_line(record: dict[str, Any]) -> str:
    variant = f" {record['variant']}" if record["variant"] else ""
    speed = record.get("decode_tokens_per_s") or record.get("stream_tokens_per_s")
    return (f"{record['task']}{variant} L={record['length']} {record['method']}: score {record['score']:.2f} | "
            f"kv {record['kv_bytes'] / 1e6:.2f}/{record['full_kv_bytes'] / 1e6:.2f} MB "
            f"(cr {record['compression_ratio']:.2f}) | {speed or float('nan'):.1f} tok/s")


class ProgressBar:
    """A rich progress bar with ETA on stderr, or nothing (``enabled`` False or nothing to do).

    Parameters
    ----------
    enabled : bool
        Show it.
    total : int
        Units of work.
    label : str, optional
        Bold label before the description.
    unit : str, optional
        What is counted (shown after ``done/total``).
    """

    def __init__(self, enabled: bool, total: int, label: str = "bench", unit: str = "samples") -> None:
        self.bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=total)

    def update(self, completed: int, description: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, description=description)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, amount: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, amount)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


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
        :func:`checkpoint_record`). Either callback may raise to stop the run: what it was given is saved.

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
    results_path = out_dir / RESULTS_FILE
    finished = read_results(results_path)
    done = {record["key"] for record in finished}
    pending = [cell for cell in cells if cell.key not in done]
    shorter = extendable_records([*finished, *read_results(out_dir / CHECKPOINT_FILE)])
    # a finished record of the same cell with fewer samples, or a checkpoint: run only the samples it lacks
    prefix = {cell.key: record for cell in pending
              if (record := shorter.get(_without_samples(cell.config))) and record["samples"] < config.samples}
    ran = 0
    if pending:
        if model is None:
            from kvstack.models import load_model

            model, tokenizer = load_model(config.model, device=config.device)
        elif names_default_model(config.model):
            _check_default_model(model)
        if tokenizer is None:
            raise BenchError("run_bench was given a model without its tokenizer; pass tokenizer=...")
        model.eval()
        _check_context(cells, model, config)
        _warm_up(model)
        groups: dict[tuple[str, str, int, str], list[Cell]] = {}
        for cell in pending:
            groups.setdefault(cell.group, []).append(cell)
        first_samples: dict[tuple[str, str, int, str], Sample] = {}
        for key, members in groups.items():  # sizing errors (length too short) before anything runs
            cell = members[0]
            first_samples[key] = _make_sample(cell, tokenizer, config, 0)
        to_run = sum(config.samples - (prefix[c.key]["samples"] if c.key in prefix else 0) for c in pending)
        progress = ProgressBar(config.progress, to_run)
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
    records, left_out = reported_results(latest_results(results_path), prefer={cell.key for cell in cells})
    _write_config(out_dir, config)
    from kvstack.bench.report import write_reports

    files = write_reports(out_dir, records, plots=config.plots, left_out=len(left_out))
    return BenchResult(out_dir=out_dir, records=records, ran=ran, skipped=len(cells) - len(pending), files=files,
                       left_out=len(left_out))


def _run_batch(model: torch.nn.Module, tokenizer: Any, batch: Sequence[Cell], samples: Sequence[Sample],
               config: BenchConfig, prefix: dict[str, dict[str, Any]], out_dir: Path, progress: ProgressBar,
               on_cell: Callable[[dict[str, Any]], None] | None,
               on_checkpoint: Callable[[list[dict[str, Any]]], None] | None) -> int:
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
        progress.print(_cell_line(record))
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


@torch.no_grad()
def _warm_up(model: torch.nn.Module) -> None:
    """One short prefill and decode step, so the first cell's timings do not pay one-off start-up costs."""
    from kvstack.api import cache_kwargs, make_cache, prefill

    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = (torch.arange(32, device=device) % max(vocab - 1, 1) + 1).unsqueeze(0)
    cache = make_cache(model, "full")
    logits = prefill(model, ids, cache)
    model(input_ids=logits.argmax(dim=-1, keepdim=True), **cache_kwargs(model, cache), use_cache=True)


def _make_sample(cell: Cell, tokenizer: Any, config: BenchConfig, index: int) -> Sample:
    rng = _sample_rng(config.seed, cell.task, cell.length, index)
    mode = "after" if cell.query_mode == "n/a" else cell.query_mode
    return cell.task.generate(tokenizer, cell.length, rng, mode, chat=config.chat,
                              answer_prefix=config.answer_prefix)


def _write_config(out_dir: Path, config: BenchConfig) -> None:
    path = out_dir / "last-run-config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
