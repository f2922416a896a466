"""A cell's record: the figures of its per-sample rows (:func:`cell_record`), and two records of one cell
merged into one when more samples extend it (:func:`merge_records`)."""

from __future__ import annotations

import datetime as dt
import math
import platform
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from kvstack.bench.cells import HARNESS_VERSION, Cell
from kvstack.bench.config import BenchConfig
from kvstack.bench.metrics import PeakMemory

__all__ = ["cell_record", "merge_records"]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.fmean(present) if present else None


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


def cell_record(cell: Cell, rows: list[dict[str, Any]], memory: PeakMemory, wall: float, model_name: str,
                device: torch.device, config: BenchConfig, shared_by: int = 1) -> dict[str, Any]:
    """The record of ``cell`` measured over ``rows`` (one per sample), not yet written: its configuration,
    scores, timings, KV bytes, peak memory and the per-sample rows."""
    task = cell.task
    perplexity = task.kind == "perplexity"
    held = sum(r["cache"]["kv_bytes"] for r in rows)
    full = sum(r["cache"]["full_kv_bytes"] for r in rows)
    held_prompt = sum(r["cache_prefill"]["kv_bytes"] for r in rows)
    full_prompt = sum(r["cache_prefill"]["full_kv_bytes"] for r in rows)
    per_sample = []
    for index, r in enumerate(rows):
        entry = {k: v for k, v in r.items() if k not in ("cache", "cache_prefill", "cache_artefacts")}
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
        # {path: sha256} of the calibration files the caches were built from: a resumed run measures the cell
        # again when one has changed since (bench.runner)
        **({"artefacts": rows[0]["cache_artefacts"]} if rows[0].get("cache_artefacts") else {}),
        "per_sample": per_sample,
    }


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
