"""The retrieval-head probe (see :mod:`kvstack.calibration.head_map` for what it measures and why)."""

from __future__ import annotations

from typing import Any

from kvstack.calibration.artefact import CalibrationError
from kvstack.calibration.head_map import HEADS_FORMAT

__all__ = ["probe_retrieval_heads"]


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
