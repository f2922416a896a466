"""Fitting a calibration: one pass over calibration text with hooks on every attention module."""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kvstack.calibration.artefact import Calibration, CalibrationError
from kvstack.calibration.identity import (
    checked_geometry,
    model_display_name,
    model_key,
    ordered_attention_modules,
    text_config,
)
from kvstack.calibration.text import DEFAULT_SOURCE, calibration_text_ids
from kvstack.models import Geometry

__all__ = ["DEFAULT_SEQUENCE_LENGTH", "DEFAULT_TOKENS", "calibrate"]

DEFAULT_TOKENS = 4096
"""Calibration tokens used when none are given."""
DEFAULT_SEQUENCE_LENGTH = 1024
"""Tokens per forward pass during calibration."""


class _LayerStats:
    """Running float64 statistics of one layer's keys, values and queries (nothing else is kept)."""

    def __init__(self, geometry: Geometry) -> None:
        heads, dim = geometry.num_kv_heads, geometry.head_dim
        self.heads, self.q_heads, self.dim = heads, geometry.num_q_heads, dim
        f64 = torch.float64
        self.key_sum = torch.zeros(heads, dim, dtype=f64)
        self.key_moment = torch.zeros(heads, dim, dim, dtype=f64)
        self.value_sum = torch.zeros(heads, dim, dtype=f64)
        self.value_moment = torch.zeros(heads, dim, dim, dtype=f64)
        self.key_absmax = torch.zeros(heads, dim, dtype=f64)
        self.key_pair = torch.zeros(heads, dim // 2, dtype=f64)
        self.query_pair = torch.zeros(heads, dim // 2, dtype=f64)
        self.key_count = 0
        self.value_count = 0

    def _rows(self, output: torch.Tensor, heads: int) -> torch.Tensor:
        """``output`` (``[..., heads * D]`` or ``[..., heads, D]``) as float64 ``[N, heads, D]`` on the CPU."""
        return output.detach().reshape(-1, heads, self.dim).to("cpu", torch.float64)

    def _pair_norms(self, rows: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        return torch.sqrt(rows[..., :half].square() + rows[..., half:].square())

    def add_keys(self, output: torch.Tensor) -> None:
        keys = self._rows(output, self.heads)  # [N, H, D]
        self.key_count += keys.shape[0]
        self.key_sum += keys.sum(0)
        self.key_moment += torch.einsum("nhc,nhd->hcd", keys, keys)
        self.key_absmax = torch.maximum(self.key_absmax, keys.abs().amax(0))
        self.key_pair = torch.maximum(self.key_pair, self._pair_norms(keys).amax(0))

    def add_values(self, output: torch.Tensor) -> None:
        values = self._rows(output, self.heads)
        self.value_count += values.shape[0]
        self.value_sum += values.sum(0)
        self.value_moment += torch.einsum("nhc,nhd->hcd", values, values)

    def add_queries(self, output: torch.Tensor) -> None:
        queries = self._rows(output, self.q_heads)  # [N, Hq, D]
        per_head = self._pair_norms(queries).amax(0)  # [Hq, D/2]
        grouped = per_head.view(self.heads, self.q_heads // self.heads, self.dim // 2).amax(1)
        self.query_pair = torch.maximum(self.query_pair, grouped)


def _eigen(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns) and eigenvalues of symmetric ``[..., D, D]``, descending, sign-normalised."""
    symmetric = 0.5 * (moment + moment.transpose(-1, -2))
    values, vectors = torch.linalg.eigh(symmetric)
    values, vectors = values.flip(-1).clamp_min(0.0), vectors.flip(-1)
    pivot = vectors.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -2, pivot))
    signs[signs == 0] = 1.0
    return vectors * signs, values


def _sequences(rows: torch.Tensor, tokens: int, sequence_length: int) -> list[torch.Tensor]:
    """Split ``rows`` ``[B, T]`` into ``[1, <= sequence_length]`` chunks holding ``tokens`` ids in total."""
    chunks: list[torch.Tensor] = []
    left = tokens
    for row in rows:
        for start in range(0, row.shape[0], sequence_length):
            if left <= 0:
                return chunks
            chunk = row[start : start + min(sequence_length, left)]
            chunks.append(chunk.unsqueeze(0))
            left -= chunk.shape[0]
    return chunks


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{name} must be a positive integer, got {value!r}")
    return value


def _hook_target(attention: nn.Module, projection: str, norm: str) -> nn.Module:
    """The module whose output is the pre-RoPE head tensor: ``q_norm``/``k_norm`` when present, else the
    projection."""
    module = getattr(attention, norm, None)
    return module if isinstance(module, nn.Module) else getattr(attention, projection)


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    *,
    tokens: int | None = None,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    progress: bool = True,
    input_ids: torch.Tensor | None = None,
    source: str = DEFAULT_SOURCE,
) -> Calibration:
    """Run ``model`` over calibration text and collect per-layer, per-KV-head statistics.

    Parameters
    ----------
    model
        A transformers causal LM with Llama-style attention (Llama, Qwen2, Mistral), on any device.
    tokenizer
        Tokenizes the calibration text; may be ``None`` when ``input_ids`` is given.
    tokens
        Calibration tokens: default :data:`DEFAULT_TOKENS` from the text, or all of ``input_ids``
        (at most ``tokens`` of them when given).
    sequence_length
        Tokens per forward pass; the text is cut into consecutive sequences of this length (the last
        may be shorter), each starting at position 0. A sequence longer than the model's
        ``max_position_embeddings`` is an error.
    progress
        Show a progress bar over sequences on stderr.
    input_ids
        ``[T]`` or ``[B, T]`` token ids to use instead of the text (each row is cut into sequences).
    source
        The calibration text when ``input_ids`` is not given: see :data:`SOURCES` (default
        ``"python-docs"``, disjoint from the perplexity benchmark's prose) or a text file path.

    Returns
    -------
    Calibration
        float32 statistics on the CPU (see :class:`Calibration` for their shapes).

    Raises
    ------
    CalibrationError
        On a bad argument, an unsupported model, or too short a text.
    """
    geometry = checked_geometry(model)
    attention = ordered_attention_modules(model, geometry)
    _check_count("sequence_length", sequence_length)
    chunks, description = _calibration_sequences(model, tokenizer, tokens, sequence_length, input_ids, source)
    stats = _collect(model, attention, geometry, chunks, progress)
    tokens_seen = sum(int(chunk.shape[1]) for chunk in chunks)
    for index, layer in enumerate(stats):
        if layer.key_count != tokens_seen or layer.value_count != tokens_seen:
            raise CalibrationError(
                f"layer {index} saw {layer.key_count} keys and {layer.value_count} values for {tokens_seen} "
                "tokens; unsupported model"
            )
    return _artefact(model, geometry, stats, tokens_seen, sequence_length, description)


def _calibration_sequences(
    model: nn.Module, tokenizer: Any, tokens: int | None, sequence_length: int, input_ids: torch.Tensor | None,
    source: str,
) -> tuple[list[torch.Tensor], str]:
    """The ``[1, n]`` token sequences to run (from ``input_ids`` or the calibration text) and where they came from."""
    if input_ids is None:
        if tokenizer is None:
            raise CalibrationError("calibrate() needs a tokenizer, or input_ids")
        count = _check_count("tokens", DEFAULT_TOKENS if tokens is None else tokens)
        ids, description = calibration_text_ids(tokenizer, count, source)
        rows = torch.tensor([ids], dtype=torch.long)
    else:
        rows = torch.as_tensor(input_ids)
        if rows.dim() == 1:
            rows = rows.unsqueeze(0)
        if rows.dim() != 2 or rows.numel() == 0 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise CalibrationError(
                f"input_ids must be a non-empty integer tensor [T] or [B, T], got {rows.dtype} {tuple(rows.shape)}"
            )
        count = rows.numel() if tokens is None else min(_check_count("tokens", tokens), rows.numel())
        description = f"input_ids: {rows.shape[0]} x {rows.shape[1]} token ids given directly"
    chunks = _sequences(rows.to(torch.long), count, sequence_length)
    context = getattr(text_config(model), "max_position_embeddings", None)
    longest = max(int(chunk.shape[1]) for chunk in chunks)
    if isinstance(context, int) and longest > context:
        raise CalibrationError(
            f"sequence_length {sequence_length} exceeds the model's context of {context} tokens; use a shorter one"
        )
    return chunks, description


def _collect(model: nn.Module, attention: list[nn.Module], geometry: Geometry, chunks: list[torch.Tensor],
             progress: bool) -> list[_LayerStats]:
    """Run the decoder stack over ``chunks`` with hooks on every attention module; one :class:`_LayerStats` each."""
    stats = [_LayerStats(geometry) for _ in attention]
    handles = []

    def hook(update: Callable[[torch.Tensor], None]) -> Callable[..., None]:
        def run(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            update(output)

        return run

    for layer, module in zip(stats, attention, strict=True):
        handles.append(_hook_target(module, "k_proj", "k_norm").register_forward_hook(hook(layer.add_keys)))
        handles.append(module.v_proj.register_forward_hook(hook(layer.add_values)))
        handles.append(_hook_target(module, "q_proj", "q_norm").register_forward_hook(hook(layer.add_queries)))

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the decoder stack: skips the LM head and its logits
    try:
        with torch.no_grad():
            for chunk in tqdm(chunks, desc="calibrating", unit="seq", disable=not progress, file=sys.stderr):
                body(input_ids=chunk.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _artefact(model: nn.Module, geometry: Geometry, stats: list[_LayerStats], tokens_seen: int,
              sequence_length: int, description: str) -> Calibration:
    """The float32 :class:`Calibration` of the collected statistics, with its eigen-decompositions."""
    key_moment = torch.stack([s.key_moment for s in stats])
    value_moment = torch.stack([s.value_moment for s in stats])
    key_basis, key_spectrum = _eigen(key_moment)
    value_basis, value_spectrum = _eigen(value_moment)
    f32 = torch.float32
    return Calibration(
        key_second_moment=key_moment.to(f32),
        key_mean=(torch.stack([s.key_sum for s in stats]) / tokens_seen).to(f32),
        value_second_moment=value_moment.to(f32),
        value_mean=(torch.stack([s.value_sum for s in stats]) / tokens_seen).to(f32),
        key_absmax=torch.stack([s.key_absmax for s in stats]).to(f32),
        key_pair_norm_max=torch.stack([s.key_pair for s in stats]).to(f32),
        query_pair_norm_max=torch.stack([s.query_pair for s in stats]).to(f32),
        key_basis=key_basis.to(f32),
        key_spectrum=key_spectrum.to(f32),
        value_basis=value_basis.to(f32),
        value_spectrum=value_spectrum.to(f32),
        model_key=model_key(model),
        model_name=model_display_name(model),
        num_layers=geometry.num_layers,
        num_kv_heads=geometry.num_kv_heads,
        num_q_heads=geometry.num_q_heads,
        head_dim=geometry.head_dim,
        tokens=tokens_seen,
        sequence_length=sequence_length,
        source=description,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
