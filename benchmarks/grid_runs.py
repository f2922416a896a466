"""What the resumable benchmark scripts share: the stamp of a result file, a grid run that stops cleanly, and
the prefill and decode timing of several caches interleaved in one process.

``run_grid`` runs :func:`kvstack.bench.run_bench` and, past ``max_minutes``, stops at its next checkpoint (the
results so far are written; the same command carries on from there).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
import time
from typing import Any

import torch
from core_bench import cpu_name

from kvstack.bench import BenchConfig, run_bench


def stamp() -> str:
    """Date, machine and torch of a measurement, for the line above a result table."""
    return (f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, {cpu_name()}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.platform()}")


class _DeadlineError(Exception):
    """``max_minutes`` has passed (raised at a checkpoint: the run resumes from there)."""


def run_grid(config: BenchConfig, max_minutes: float | None = None, deadline: float | None = None,
             **run_kwargs: Any) -> bool:
    """Run ``config`` (printing each finished cell); False when it stopped at the deadline.

    ``deadline`` (a ``time.monotonic()`` value) lets several grids share one budget; else ``max_minutes``
    from now.
    """
    if deadline is None and max_minutes is not None:
        deadline = time.monotonic() + 60 * max_minutes

    def on_progress(records: dict | list) -> None:
        first = records[0] if isinstance(records, list) else records
        print(json.dumps({k: first.get(k) for k in ("task", "variant", "length", "method", "score", "samples")}),
              flush=True)
        if deadline is not None and time.monotonic() > deadline:
            raise _DeadlineError

    try:
        run_bench(config, on_cell=on_progress, on_checkpoint=on_progress, **run_kwargs)
    except _DeadlineError:
        print("stopped at the time limit; run the same command again to carry on", flush=True)
        return False
    return True


def time_caches(model: torch.nn.Module, ids: torch.Tensor, specs: list[str], repeats: int,
                decode: int = 32) -> dict[str, tuple[float, float]]:
    """``{spec: (prefill seconds, decode seconds per token)}``, medians over ``repeats`` rounds in which every
    spec runs once in turn (interleaved, so a machine's drift reaches them all alike). ``ids`` ``[1, T]``; the
    prompt is read by ``kvstack.prefill``, then ``decode`` greedy tokens one forward at a time."""
    import kvstack

    times: dict[str, list[tuple[float, float]]] = {spec: [] for spec in specs}
    for _ in range(repeats):
        for spec in specs:
            cache = kvstack.make_cache(model, spec)
            with torch.no_grad():
                start = time.perf_counter()
                logits = kvstack.prefill(model, ids, cache)
                middle = time.perf_counter()
                token = logits.argmax(-1, keepdim=True)
                for _ in range(decode):
                    logits = model(token, **kvstack.cache_kwargs(model, cache)).logits[:, -1]
                    token = logits.argmax(-1, keepdim=True)
                end = time.perf_counter()
            times[spec].append((middle - start, (end - middle) / decode))
    return {spec: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
            for spec, runs in times.items()}
