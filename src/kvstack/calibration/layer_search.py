"""KVSharer's calibration search for a layer map (see :mod:`kvstack.calibration.layer_map` for the method)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvstack.calibration.layer_map import MAP_FORMAT, MAP_VERSION, layer_map_path, save_layer_map

__all__ = ["calibrate_layer_map", "search_layer_map"]


@torch.no_grad()
def _last_hidden(model: nn.Module, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """``[B, T, hidden]`` the model's last hidden states over ``ids`` with ``cache``."""
    from kvstack.api import cache_kwargs

    out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, output_hidden_states=True)
    return out.hidden_states[-1].float()


def _cache_with_links(model: nn.Module, links: dict[int, int]) -> Any:
    from kvstack.api import make_cache
    from kvstack.cache.cache import KVStackCache
    from kvstack.contract import LINK_REUSE, LayerLink

    full = make_cache(model, "full")  # selects kvstack's attention function on the model
    return KVStackCache(
        full.method, num_layers=full.num_layers, num_q_heads=full.group_size * model.config.num_key_value_heads,
        num_kv_heads=model.config.num_key_value_heads, rope_inv_freq=full.rope_inv_freq, label="kvsharer-search",
        layer_links={layer: LayerLink(source=source, kind=LINK_REUSE) for layer, source in links.items()},
    )


@torch.no_grad()
def search_layer_map(model: nn.Module, ids: torch.Tensor, layers: int, threshold: float,
                     max_trials: int = 200) -> dict[str, Any]:
    """Run the KVSharer search on calibration ``ids`` ``[B, T]``; returns the artefact's record (without identity).

    ``max_trials`` bounds the forwards spent on candidate shares.
    """
    from kvstack.api import make_cache

    full = make_cache(model, "full")
    reference = _last_hidden(model, ids, full)
    summaries = []
    for layer in full.layers:
        keys, values = layer.keys[:, :, : layer.length], layer.values[:, :, : layer.length]
        mean_key, mean_value = keys.float().mean(dim=(0, 2)), values.float().mean(dim=(0, 2))  # [H, D] each
        summaries.append(torch.cat((mean_key.flatten(), mean_value.flatten())))
    stacked = torch.stack(summaries)  # [L, 2 * H * D]
    distances = torch.cdist(stacked, stacked)
    num_layers = len(summaries)
    pairs = sorted(((float(distances[lower, upper]), lower, upper) for upper in range(num_layers)
                    for lower in range(upper)), reverse=True)
    accepted: dict[int, int] = {}
    trials: list[dict[str, Any]] = []
    for distance, lower, upper in pairs:
        if len(accepted) >= layers or len(trials) >= max_trials:
            break
        if upper in accepted or lower in accepted or upper in accepted.values():
            continue
        candidate = {**accepted, upper: lower}
        hidden = _last_hidden(model, ids, _cache_with_links(model, candidate))
        similarity = float(torch.nn.functional.cosine_similarity(hidden, reference, dim=-1).mean())
        keep = similarity >= threshold
        trials.append({"layer": upper, "source": lower, "distance": distance, "similarity": similarity,
                       "accepted": keep})
        if keep:
            accepted = candidate
    return {
        "format": MAP_FORMAT, "version": MAP_VERSION, "num_layers": num_layers, "layers": layers,
        "threshold": threshold, "map": {str(layer): source for layer, source in sorted(accepted.items())},
        "trials": trials,
    }


def calibrate_layer_map(model: nn.Module, tokenizer: Any, layers: int, threshold: float, *, tokens: int = 2048,
                        sequence_length: int = 512, source: str = "python-docs",
                        force: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """The model's map for ``layers`` at ``threshold``: searched on ``tokens`` calibration tokens (in sequences
    of ``sequence_length``) and written, unless it exists (then ``(path, None)``; ``force`` searches again)."""
    from kvstack.calibration.identity import model_key
    from kvstack.calibration.text import calibration_text_ids

    key = model_key(model)
    path = layer_map_path(key, layers, threshold)
    if path.is_file() and not force:
        return path, None
    length = min(sequence_length, tokens)
    ids, description = calibration_text_ids(tokenizer, tokens // length * length, source)
    batch = torch.tensor(ids, device=next(model.parameters()).device).view(-1, length)
    record = search_layer_map(model, batch, layers, threshold)
    record.update(model_key=key, source=description, tokens=batch.numel(), sequence_length=length)
    return save_layer_map(record, path), record
