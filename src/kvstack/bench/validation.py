"""Checks that refuse a bench before it runs: its settings, a given model, and lengths beyond its context."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kvstack.bench.cells import Cell, max_new_tokens
from kvstack.bench.config import QUERY_MODES, BenchConfig, BenchError
from kvstack.bench.tasks import LENGTH_TOLERANCE, Task
from kvstack.models import DEFAULT_MODEL, DEFAULT_MODEL_SHAPE

__all__ = ["check_context", "check_default_model", "validate_config"]


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


def check_context(cells: Sequence[Cell], model: torch.nn.Module, config: BenchConfig) -> None:
    """Refuse a cell whose longest prompt plus its tokens to generate exceed the model's context (BenchError
    naming the longest length that fits)."""
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


def check_default_model(model: torch.nn.Module) -> None:
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
