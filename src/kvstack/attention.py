"""The attention function kvstack registers with transformers' ``AttentionInterface``.

A kvstack cache layer stores the new chunk in ``update`` and marks itself pending; the attention
function, which the model calls right after, hands the queries to that layer, which computes attention
over the entries it keeps (collecting the statistics its method needs) and then evicts. With any other
cache the function is exactly transformers' SDPA attention.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvstack.cache.pending import take_pending

ATTENTION_NAME = "kvstack"


def kvstack_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for one layer. ``query`` ``[B, Hq, q, D]``; returns ``([B, q, Hq, D], None)``.

    ``latents_given=True``: an mla module's decoding step hands the cached rotary keys ``[B, H, N, d]`` and
    latents ``[B, 1, N, r]`` as ``key`` and ``value``; the module attends with its up-projection absorbed
    (or rebuilds keys and values for a layer whose policy scores them), and the layer is told as usual."""
    layer = take_pending()
    latents_given = kwargs.pop("latents_given", False)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if latents_given and not getattr(layer, "evicts", False):
        output = module.attend_absorbed(query, key, value, attention_mask, scaling)
        if layer is not None:
            layer.finish_forward(query.shape[2])
        return output, None
    if latents_given:  # a layer whose policy scores keys gets them rebuilt
        key, value = module.rebuild(key, value)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        raise RuntimeError(f"kvstack: cache layer {layer.layer_idx} updated but attention ran for {module.layer_idx}")
    if getattr(layer, "evicts", False):  # an mla layer under an evicting policy: scores the rebuilt keys
        return layer.attend_rebuilt(query, key, value, attention_mask, kwargs.get("position_ids"), scaling), None
    if getattr(layer, "attends_rebuilt", False):
        # the module rebuilt ``key`` and ``value`` from what the layer returned (mla latents): attend over them
        # as SDPA does, then let the layer finish its forward (a codec encodes what left its window)
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        layer.finish_forward(query.shape[2])
        return output, None
    return layer.attend(query, attention_mask, kwargs.get("position_ids"), scaling), None


def register() -> None:
    """Register the attention function and its mask builder (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, kvstack_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
