"""What every model transform is, and the calibration statistics transforms fit on.

A transform (taxonomy §2) changes a model so that it needs less cache: it returns a new model (the input is
never modified) and a record of what changed. It is a dataclass registered in the spec language like a
cache method (``gqa(kv_heads=1, how='svd')``) but applied with :func:`kvstack.transform`, never with
``make_cache``.

Shapes: ``L`` layers, ``Hq`` query heads, ``H`` KV heads, ``D`` head dimension, ``h`` hidden size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from kvstack.errors import InputError
from kvstack.lazy_import import lazy_module

torch = lazy_module("torch")

__all__ = ["AttentionInputs", "Transform", "TransformError", "adopt_attention_settings", "attention_layers",
           "collect_attention_inputs"]


class TransformError(InputError):
    """A transform that cannot apply to this model or with these parameters (one line, the CLI exits 2)."""


@dataclasses.dataclass
class Transform:
    """Base of every transform: a dataclass with its parameters, validated in ``__post_init__``."""

    spec_name: ClassVar[str]
    is_transform: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    calibration: ClassVar[str] = "moments"  # what apply() receives: AttentionInputs, or "ids" (the token ids)

    def label(self) -> str:
        """The canonical spec string of this transform with its non-default parameters."""
        parts = [f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self)
                 if field.init and getattr(self, field.name) != field.default]
        return f"{self.spec_name}({', '.join(parts)})" if parts else self.spec_name

    def uses_calibration(self) -> bool:
        """True when :meth:`apply` needs :class:`AttentionInputs` of calibration text."""
        return self.needs_calibration

    def apply(self, model: Any, inputs: AttentionInputs | None) -> dict[str, Any]:
        """Change ``model`` (already a copy) in place; return the record of what changed."""
        raise NotImplementedError


def attention_layers(model: Any) -> list[Any]:
    """The model's attention modules, refused unless they are Llama-style (q/k/v/o projections, RoPE in the
    ``rotate_half`` layout, no per-head normalisation): Llama, Qwen2, Mistral."""
    from kvstack.models import attention_modules

    layers = getattr(getattr(model, "model", None), "layers", None)
    # per layer, so that a layer whose attention has no K/V projection of its own (cla) keeps its index
    modules = [layer.self_attn for layer in layers] if layers is not None and all(
        hasattr(layer, "self_attn") for layer in layers) else attention_modules(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if not modules or config is None:
        raise TransformError(f"{type(model).__name__} has no attention layers a transform recognises; supported: "
                             "Llama, Qwen2, Mistral")
    for module in modules:
        if not hasattr(module, "o_proj") or hasattr(module, "q_norm") or hasattr(module, "k_norm"):
            raise TransformError(f"transforms support Llama-style attention (Llama, Qwen2, Mistral: q/k/v/o "
                                 f"projections, no per-head norms); {model_type} is not one")
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if model_type not in ("llama", "qwen2", "mistral") or rope_type not in ("default", None):
        raise TransformError(f"transforms support Llama, Qwen2 and Mistral with plain RoPE; this model is {model_type} "
                             f"(rope {rope_type})")
    return modules


def adopt_attention_settings(module: Any, original: Any) -> None:
    """Give a replacement attention ``module`` what transformers' attention functions read from the module it
    replaces (layer index, head size, grouping, scaling, dropout, causality, sliding window)."""
    module.config = original.config
    module.layer_idx = original.layer_idx
    module.head_dim = original.head_dim
    module.num_key_value_groups = original.num_key_value_groups
    module.scaling = original.scaling
    module.attention_dropout = original.attention_dropout
    module.is_causal = True
    module.sliding_window = getattr(original, "sliding_window", None)


@dataclasses.dataclass
class AttentionInputs:
    """Second moments of what each layer's key/value projections read, on calibration text.

    ``moments[l]`` is ``[h + 1, h + 1]`` float64: ``sum_t [x_t; 1] [x_t; 1]^T`` over the calibration tokens
    (the appended 1 carries the projections' biases), ``tokens`` how many tokens were read.
    """

    moments: list[Any]
    tokens: int

    def covariance(self, layer: int) -> Any:
        """``[h + 1, h + 1]`` float64 mean second moment of layer ``layer``'s augmented inputs."""
        return self.moments[layer] / self.tokens


def collect_attention_inputs(model: Any, ids: Any) -> AttentionInputs:
    """Run ``model`` on calibration ``ids`` ``[B, T]`` and collect :class:`AttentionInputs` (hooks on ``k_proj``)."""
    modules = attention_layers(model)
    moments: list[Any] = [None] * len(modules)
    handles = []

    def hook_for(index: int) -> Any:
        def hook(module: Any, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            x = torch.cat((x, torch.ones_like(x[:, :1])), dim=1)
            moment = x.T @ x
            moments[index] = moment if moments[index] is None else moments[index] + moment
        return hook

    for index, module in enumerate(modules):
        handles.append(module.k_proj.register_forward_pre_hook(hook_for(index)))
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return AttentionInputs(moments=moments, tokens=int(ids.numel()))
