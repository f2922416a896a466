"""``transform``: apply a model transform (or a ``+`` chain of them) to a copy of a model."""

from __future__ import annotations

import copy
import time
from typing import Any

from kvstack.lazy_import import lazy_module
from kvstack.spec import parse
from kvstack.transforms.base import Transform, TransformError, attention_layers, collect_attention_inputs
from kvstack.transforms.chain import TransformChain, transform_steps
from kvstack.transforms.latent import latent_geometry
from kvstack.transforms.repair import repair_data
from kvstack.transforms.sharing import shared_layers

torch = lazy_module("torch")

__all__ = ["transform"]

CALIBRATION_SEQUENCE = 512  # tokens per calibration forward


def transform(model: Any, spec: str | Transform | TransformChain, *, tokenizer: Any = None,
              calibration_ids: Any = None, source: str = "python-docs") -> tuple[Any, dict[str, Any]]:
    """Apply the transform ``spec`` to a copy of ``model``.

    Parameters
    ----------
    model:
        A transformers causal LM (Llama, Qwen2, Mistral); it is not modified. It is the teacher of a
        ``repair`` step.
    spec:
        A transform spec such as ``"gqa(kv_heads=1, how='svd')"``, or steps joined by ``+`` such as
        ``"gqa(kv_heads=1, how='svd') + repair()"`` (see ``kvstack methods``, category ``model/``).
    tokenizer:
        The model's tokenizer, to read calibration text for transforms that fit on it (``how='svd'``) and
        the text a ``repair`` trains on.
    calibration_ids:
        ``[B, T]`` token ids to calibrate (and repair) on instead of the calibration text.
    source:
        The calibration text (:data:`kvstack.calibration.SOURCES` or a file), when ``tokenizer`` is given.

    Returns
    -------
    tuple
        The new model and a record (``spec``, what changed, KV bytes per token before and after, seconds);
        a chain's record holds one record per step under ``steps``.

    Raises
    ------
    TransformError
        For a spec that is not a transform, a model it cannot apply to, or missing calibration (one line).
    """
    method = parse(spec)
    if not getattr(method, "is_transform", False):
        raise TransformError(f"{method.label()} is a cache method, not a model transform: use kvstack.make_cache; "
                             "transforms are listed under 'model/' in `kvstack methods`")
    steps = transform_steps(method)
    attention_layers(model)
    steps[0].check(model)
    started = time.perf_counter()
    new = copy.deepcopy(model)
    before = kv_bytes_per_token(model)
    records: list[dict[str, Any]] = []
    changed: dict[int, set[str]] = {}
    for step in steps:
        step_started = time.perf_counter()
        if getattr(step, "is_repair", False):
            ids = repair_data(model, step, tokenizer=tokenizer, source=source, calibration_ids=calibration_ids)
            record = step.fit(new, model, ids, {index: sorted(names) for index, names in changed.items()},
                              started=step_started)
        else:
            step.check(new)
            inputs = None
            if step.uses_calibration():
                ids = _calibration_ids(new, step, tokenizer, calibration_ids, source)
                inputs = ids if step.calibration == "ids" else collect_attention_inputs(new, ids)
            record = step.apply(new, inputs)
            for index, names in record.get("changed", {}).items():
                changed.setdefault(int(index), set()).update(names)
        record.update(spec=step.label(), seconds=time.perf_counter() - step_started)
        records.append(record)
    after = kv_bytes_per_token(new)
    if len(records) == 1:
        return new, {**records[0], "kv_bytes_per_token": [before, after]}
    return new, {"spec": method.label(), "steps": records, "kv_bytes_per_token": [before, after],
                 "seconds": time.perf_counter() - started}


def _calibration_ids(model: Any, step: Transform, tokenizer: Any, calibration_ids: Any, source: str) -> Any:
    """``[B, T]`` calibration token ids for ``step``: the given ones, or the calibration text."""
    if calibration_ids is not None:
        return calibration_ids
    if tokenizer is None:
        raise TransformError(f"{step.label()} fits on calibration text: pass tokenizer= (or calibration_ids=)")
    from kvstack.calibration.text import calibration_text_ids

    length = min(CALIBRATION_SEQUENCE, step.tokens)
    flat, _ = calibration_text_ids(tokenizer, max(1, step.tokens // length) * length, source)
    return torch.tensor(flat, device=next(model.parameters()).device).view(-1, length)


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token adds to an uncompressed cache of ``model`` (all layers)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    layers = config.num_hidden_layers - len(shared_layers(config))  # cla: sharing layers store nothing
    latent = latent_geometry(config)
    if latent is not None:  # mla: one latent and a rotary key per KV head
        return layers * (latent["rank"] + config.num_key_value_heads * latent["rope_dims"]) * element
    return 2 * layers * config.num_key_value_heads * head_dim * element
