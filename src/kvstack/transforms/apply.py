"""``transform``: apply a model transform to a copy of a model."""

from __future__ import annotations

import copy
import time
from typing import Any

from kvstack.lazy_import import lazy_module
from kvstack.spec import parse
from kvstack.transforms.base import Transform, TransformError, attention_layers, collect_attention_inputs

torch = lazy_module("torch")

__all__ = ["transform"]

CALIBRATION_SEQUENCE = 512  # tokens per calibration forward


def transform(model: Any, spec: str | Transform, *, tokenizer: Any = None, calibration_ids: Any = None,
              source: str = "python-docs") -> tuple[Any, dict[str, Any]]:
    """Apply the transform ``spec`` to a copy of ``model``.

    Parameters
    ----------
    model:
        A transformers causal LM (Llama, Qwen2, Mistral); it is not modified.
    spec:
        A transform spec such as ``"gqa(kv_heads=1, how='svd')"`` (see ``kvstack methods``, category ``model/``).
    tokenizer:
        The model's tokenizer, to read calibration text for transforms that fit on it (``how='svd'``).
    calibration_ids:
        ``[B, T]`` token ids to calibrate on instead of the calibration text.
    source:
        The calibration text (:data:`kvstack.calibration.SOURCES` or a file), when ``tokenizer`` is given.

    Returns
    -------
    tuple
        The new model and a record (``spec``, what changed, KV bytes per token before and after, seconds).

    Raises
    ------
    TransformError
        For a spec that is not a transform, a model it cannot apply to, or missing calibration (one line).
    """
    method = parse(spec)
    if not getattr(method, "is_transform", False):
        raise TransformError(f"{method.label()} is a cache method, not a model transform: use kvstack.make_cache; "
                             "transforms are listed under 'model/' in `kvstack methods`")
    attention_layers(model)
    method.check(model)
    inputs = None
    if method.uses_calibration():
        ids = calibration_ids
        if ids is None:
            if tokenizer is None:
                raise TransformError(f"{method.label()} fits on calibration text: pass tokenizer= "
                                     "(or calibration_ids=)")
            from kvstack.calibration.text import calibration_text_ids

            length = min(CALIBRATION_SEQUENCE, method.tokens)
            flat, _ = calibration_text_ids(tokenizer, max(1, method.tokens // length) * length, source)
            ids = torch.tensor(flat, device=next(model.parameters()).device).view(-1, length)
        inputs = collect_attention_inputs(model, ids)
    started = time.perf_counter()
    new = copy.deepcopy(model)
    before = kv_bytes_per_token(model)
    record = method.apply(new, inputs)
    record.update(spec=method.label(), kv_bytes_per_token=[before, kv_bytes_per_token(new)],
                  seconds=time.perf_counter() - started)
    return new, record


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token adds to an uncompressed cache of ``model`` (all layers)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
