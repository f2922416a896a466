"""The evaluation harness every kvstack method is judged with.

From Python::

    from kvstack.bench import BenchConfig, run_bench

    config = BenchConfig(methods=["snapkv(ratio={ratio})", "h2o(ratio={ratio})"], ratios=[0.5, 0.75],
                         tasks=["passkey", "niah", "perplexity"], lengths=[1024, 2048], samples=3,
                         out_dir="bench-results")
    result = run_bench(config)               # loads config.model; or run_bench(config, model, tokenizer)
    result.records                           # one dict per (model, method, task, length, query mode) cell

From the command line: ``kvstack bench --quick`` (see ``kvstack bench --help``).

A new task is one small class registered with :func:`register_task` (see :mod:`kvstack.bench.tasks`).
"""

from __future__ import annotations

from kvstack.bench import perplexity_task, ruler_tasks  # noqa: F401  (registers the built-in tasks)
from kvstack.bench.config import QUICK, BenchConfig, BenchError
from kvstack.lazy_import import deferred_attributes

# name -> module that defines it, imported on first use (PEP 562): the runner imports torch, and
# `kvstack bench --help` must not
_DEFERRED = {
    **dict.fromkeys(
        ["BenchResult", "expand_methods", "latest_results", "plan_cells", "read_results", "reported_results",
         "run_bench"], "kvstack.bench.runner"),
    **dict.fromkeys(["string_match_all", "string_match_part"], "kvstack.bench.scoring"),
    **dict.fromkeys(["TASKS", "Parts", "Sample", "Task", "get_task", "make_tasks", "register_task"],
                    "kvstack.bench.tasks"),
}


__getattr__, __dir__ = deferred_attributes(__name__, _DEFERRED)

__all__ = [
    "QUICK",
    "TASKS",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "Parts",
    "Sample",
    "Task",
    "expand_methods",
    "get_task",
    "latest_results",
    "make_tasks",
    "plan_cells",
    "read_results",
    "register_task",
    "reported_results",
    "run_bench",
    "string_match_all",
    "string_match_part",
]
