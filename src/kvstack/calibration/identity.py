"""Which model an artefact belongs to: its checked geometry and a key that tells models apart."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import torch
from torch import nn

from kvstack.calibration.artefact import CalibrationError
from kvstack.errors import InputError
from kvstack.models import MODEL_ALIASES, Geometry, attention_modules, model_geometry

__all__ = [
    "checked_geometry", "fix_hint", "identity_geometry", "model_display_name", "model_key", "ordered_attention_modules",
    "text_config",
]

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_ALIAS_KEYS = frozenset(alias.lower() for alias in MODEL_ALIASES)


def text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise CalibrationError(f"{type(model).__name__} has no config; calibration needs a transformers model")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def checked_geometry(model: nn.Module) -> Geometry:
    """The model's geometry (:func:`kvstack.models.model_geometry`), refused unless calibration can fit it."""
    try:
        geometry = model_geometry(model)
    except InputError as err:
        raise CalibrationError(str(err)) from None
    layers, q_heads, kv_heads, head_dim = (geometry.num_layers, geometry.num_q_heads, geometry.num_kv_heads,
                                           geometry.head_dim)
    if min(layers, q_heads, kv_heads, head_dim) < 1 or q_heads % kv_heads or head_dim % 2:
        raise CalibrationError(
            f"unsupported attention geometry: {layers} layers, {q_heads} query heads, {kv_heads} KV heads, "
            f"head_dim {head_dim} (query heads must be a multiple of KV heads, head_dim even)"
        )
    return geometry


def ordered_attention_modules(model: nn.Module, geometry: Geometry) -> list[nn.Module]:
    """The attention module of every decoder layer, ordered by ``layer_idx`` (each index exactly once)."""
    modules = attention_modules(model)
    indices = [int(module.layer_idx) for module in modules]
    if indices != list(range(geometry.num_layers)):
        raise CalibrationError(
            f"found attention modules (with q_proj, k_proj, v_proj, layer_idx) for layers {indices}, "
            f"expected 0..{geometry.num_layers - 1}; calibration supports Llama-style attention "
            "(Llama, Qwen2, Mistral)"
        )
    return modules


def identity_geometry(geometry: Geometry) -> dict[str, int]:
    """The geometry fields a calibration artefact's model key is made of."""
    return {"num_layers": geometry.num_layers, "num_kv_heads": geometry.num_kv_heads,
            "num_q_heads": geometry.num_q_heads, "head_dim": geometry.head_dim}


def model_display_name(model: nn.Module) -> str:
    config = text_config(model)
    name = str(getattr(config, "name_or_path", "") or getattr(model.config, "name_or_path", "") or "")
    return name or str(getattr(config, "model_type", "") or "model")


def _short_name(model: nn.Module) -> str:
    name = model_display_name(model).rstrip("/\\")
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return SAFE_NAME.sub("-", base).strip("-.") or "model"


def _fingerprint(tensor: torch.Tensor) -> bytes:
    """Bytes of ``tensor`` rounded to bfloat16 and widened to float32: equal for a model and its casts."""
    return tensor.detach().to("cpu").to(torch.bfloat16).to(torch.float32).contiguous().numpy().tobytes()


def model_key(model: nn.Module) -> str:
    """A stable identity of a model, used to name and check its calibration artefact.

    The key is ``<basename of name_or_path (or model type)>-<12 hex digits>``, the digits being the
    sha256 of the model type, the attention geometry, the hidden and vocabulary sizes, the first layer's
    ``k_proj`` weight and the first 16 rows of the input embedding. Weights are rounded to bfloat16 first,
    so a float32 model and its bfloat16 cast share a key; models with other weights (another seed,
    another fine-tune) get another key.

    Parameters
    ----------
    model
        A transformers causal LM with Llama-style attention modules.

    Returns
    -------
    str
        E.g. ``"smollm2-135m-3f9a0c1b2d4e"``; only ``[A-Za-z0-9._-]`` characters.

    Raises
    ------
    CalibrationError
        If the model's geometry or attention modules cannot be read.
    """
    geometry = checked_geometry(model)
    attention = ordered_attention_modules(model, geometry)
    config = text_config(model)
    identity = {
        "model_type": str(getattr(config, "model_type", "")),
        "geometry": identity_geometry(geometry),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    digest.update(_fingerprint(attention[0].k_proj.weight))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        digest.update(_fingerprint(embeddings.weight[:16]))
    return f"{_short_name(model)}-{digest.hexdigest()[:12]}"


def fix_hint(model_name: str) -> str:
    """How the user makes a calibration for ``model_name``."""
    base = model_name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    if base.lower() in _ALIAS_KEYS:
        return f"run `kvstack calibrate --model {base}`"
    if os.path.isdir(model_name):
        return f"run `kvstack calibrate --model {model_name}`"
    return ("run `kvstack calibrate --model <its name or directory>`, or kvstack.calibration.calibrate() "
            "and save_calibration() in Python")
