"""The bench's cells: the methods a run expands to, and the cells it plans, each keyed by its configuration.

A *cell* is one (model, method, task [variant], length, query mode) combination, measured over
``samples`` samples. Its key is a hash of everything that changes its result (see :func:`cell_config`),
so a rerun of the same command skips every finished cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import torch

from kvstack.bench.config import BenchConfig, BenchError
from kvstack.bench.tasks import Task, make_tasks
from kvstack.spec import parse

__all__ = [
    "HARNESS_VERSION",
    "Cell",
    "MethodRun",
    "cell_config",
    "cell_key",
    "expand_methods",
    "max_new_tokens",
    "perplexity_chunk",
    "plan_cells",
]

HARNESS_VERSION = 2
"""Bumped when a change to the harness changes results; part of every cell key."""

_BARE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
