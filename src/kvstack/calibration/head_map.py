"""Retrieval heads: a probe that scores every KV head by how often it retrieves, and the artefact keeping it.

The probe (the retrieval score of Wu et al., 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality", as RazorAttention and HeadKV use it): synthetic needle prompts are built from calibration text
with a random number inserted at a random depth, and the model is asked to repeat it. At every decoding step
whose greedy token is a token of the needle, a query head *retrieves* when its strongest attention falls on
that token inside the needle. A query head's score is the fraction of such steps it retrieves; a KV head's
is the largest over its group's query heads (its cache serves them all). No weights are trained: DuoAttention
fits a gate per head by gradient descent with the model frozen, which is hours on 2 CPU cores; the probe is a
few forwards, and ranks the heads the same way the gates are meant to.

The scores are a JSON artefact keyed by the model under ``<kvstack_home()>/calibration/<model_key>.heads.json``
(``kvstack calibrate --retrieval-heads``); ``duo(...)`` refuses one made for another model with one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kvstack.calibration.artefact import CalibrationError
from kvstack.models import kvstack_home

__all__ = ["HEADS_FORMAT", "head_map_path", "load_head_scores", "probe_retrieval_heads", "save_head_scores"]

HEADS_FORMAT = "kvstack-retrieval-heads"


def head_map_path(model_key: str) -> Path:
    return kvstack_home() / "calibration" / f"{model_key}.heads.json"


def load_head_scores(model_key: str | None, num_layers: int, num_kv_heads: int,
                     path: str | None = None) -> list[list[float]]:
    """``[L][H]`` retrieval scores from the artefact at ``path`` (None: the model's own file); one line if it is
    missing, unreadable, made for another model or shaped for another geometry."""
    if model_key is None:
        raise CalibrationError("duo needs the model's identity to find its retrieval heads")
    target = Path(path).expanduser() if path is not None else head_map_path(model_key)
    hint = "make it with `kvstack calibrate --model MODEL --retrieval-heads`"
    if not target.is_file():
        raise CalibrationError(f"no retrieval-head scores at {target}; {hint}")
    try:
        record = json.loads(target.read_text())
        if record.get("format") != HEADS_FORMAT:
            raise ValueError("not a retrieval-head artefact")
        made_for, scores = record["model_key"], [[float(x) for x in row] for row in record["scores"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CalibrationError(f"{target} is not a readable retrieval-head artefact ({err})") from None
    if made_for != model_key:
        raise CalibrationError(f"the retrieval-head scores {target} were made for model {made_for}, not this one "
                               f"({model_key}); {hint}")
    if len(scores) != num_layers or any(len(row) != num_kv_heads for row in scores):
        raise CalibrationError(f"the retrieval-head scores {target} are not {num_layers} layers x {num_kv_heads} "
                               f"KV heads; {hint}")
    return scores


def save_head_scores(record: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(tmp, path)
    return path


def probe_retrieval_heads(model: Any, tokenizer: Any, *, prompts: int = 8, length: int = 768, digits: int = 12,
                          source: str = "python-docs", seed: int = 0) -> dict[str, Any]:
    """Run the probe: ``prompts`` needle prompts of about ``length`` tokens; returns the artefact's record."""
    import torch

    from kvstack.api import cache_kwargs
    from kvstack.calibration.identity import model_key
    from kvstack.calibration.text import calibration_text_ids
    from kvstack.models import model_geometry

    geometry = model_geometry(model)
    group = geometry.num_q_heads // geometry.num_kv_heads
    hay, description = calibration_text_ids(tokenizer, prompts * length, source)
    generator = torch.Generator().manual_seed(seed)
    hits = torch.zeros(geometry.num_layers, geometry.num_q_heads)
    steps = 0
    previous = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")  # attention weights come back only from the eager path
    try:
        for index in range(prompts):
            number = "".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=generator))
            needle = tokenizer(f" The special magic number is {number}. Remember it.", add_special_tokens=False)
            question = tokenizer(" What is the special magic number? The special magic number is",
                                 add_special_tokens=False)
            text = hay[index * length : (index + 1) * length]
            depth = int(torch.randint(len(text) // 10, len(text) * 9 // 10, (1,), generator=generator))
            ids = text[:depth] + needle["input_ids"] + text[depth:] + question["input_ids"]
            span = range(depth, depth + len(needle["input_ids"]))
            needle_tokens = {ids[p] for p in span}
            sequence = torch.tensor([ids], device=next(model.parameters()).device)
            with torch.no_grad():
                out = model(input_ids=sequence, use_cache=True)
                cache, attentions = out.past_key_values, None
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(digits + 2):
                    generated = int(token)
                    if attentions is not None and generated in needle_tokens:
                        # the forward that produced this copied token: where did each head look?
                        steps += 1
                        targets = torch.tensor([p for p in span if ids[p] == generated])
                        for layer, weights in enumerate(attentions):  # [1, Hq, 1, L]
                            strongest = weights[0, :, -1, : len(ids)].argmax(-1).cpu()
                            hits[layer] += torch.isin(strongest, targets).float()
                    out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True, output_attentions=True)
                    cache, attentions = out.past_key_values, out.attentions
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
    finally:
        model.set_attn_implementation(previous or "sdpa")
    if steps == 0:
        raise CalibrationError("the probe saw no step repeating the needle: the model does not copy it; no "
                               "retrieval heads can be scored")
    per_query_head = hits / steps
    per_kv_head = per_query_head.view(geometry.num_layers, geometry.num_kv_heads, group).amax(dim=-1)
    return {"format": HEADS_FORMAT, "version": 1, "model_key": model_key(model), "source": description,
            "prompts": prompts, "length": length, "copy_steps": steps, "scores": per_kv_head.tolist()}
