"""The retrieval-head probe (see :mod:`kvstack.calibration.head_map` for what it measures and why)."""

from __future__ import annotations

from typing import Any

from kvstack.calibration.artefact import CalibrationError
from kvstack.calibration.head_map import HEADS_FORMAT

__all__ = ["KEYED_PROBE", "KEY_NAMES", "PROBE_KINDS", "PROBE_SCORES", "keyed_answers", "probe_retrieval_heads"]

PROBE_KINDS = ("single", "keyed")
PROBE_SCORES = ("argmax", "mass")
# calibrate --retrieval-heads keyed: on SmolLM2-135M 32 prompts give the top nine heads 64 give (16 do not)
KEYED_PROBE = {"prompts": 32, "length": 1536, "needles": 4, "digits": 8}
# names a keyed needle belongs to (also the gate fit's keyed prompts)
KEY_NAMES = ("amber", "birch", "cobalt", "delta", "ember", "falcon", "granite", "harbor", "indigo", "juniper",
             "kestrel", "lantern", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "thistle",
             "umber", "violet", "walnut", "yarrow", "zephyr", "basil", "cedar", "dune", "fern", "glacier")


def _needle_prompt(tokenizer: Any, text: list[int], kind: str, needles: int, digits: int,
                   generator: Any, key_words: int = 1) -> tuple[list[int], range, str]:
    """One probe prompt: ``text`` with the needle(s) in it and the question last; returns the ids, the span
    of the needle the question asks for and its number (the answer). ``single``: one magic number.
    ``keyed``: ``needles`` numbers, each belonging to a name, and the question names one, so the span to copy
    from sits among look-alikes. ``key_words=2`` makes each name two words (``amber-falcon``), the first drawn
    from only six, so names in one prompt often share it and a head must tell them apart by the second."""
    import torch

    def ids(words: str) -> list[int]:
        return tokenizer(words, add_special_tokens=False)["input_ids"]

    count = 1 if kind == "single" else needles
    numbers = ["".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=generator))
               for _ in range(count)]
    depths = sorted(int(d) for d in torch.randint(len(text) // 10, len(text) * 9 // 10, (count,),
                                                  generator=generator))
    if kind == "single":
        needle_texts = [f" The special magic number is {numbers[0]}. Remember it."]
        question, asked = " What is the special magic number? The special magic number is", 0
    else:
        names = [KEY_NAMES[int(i)] for i in torch.randperm(len(KEY_NAMES), generator=generator)[:count]]
        if key_words == 2:
            firsts = torch.randint(0, 6, (count,), generator=generator).tolist()
            names = [f"{KEY_NAMES[first]}-{name}" for first, name in zip(firsts, names, strict=True)]
        needle_texts = [f" The special magic number for {name} is {number}." for name, number in zip(
            names, numbers, strict=True)]
        asked = int(torch.randint(0, count, (1,), generator=generator))
        question = (f" What is the special magic number for {names[asked]}? The special magic number for "
                    f"{names[asked]} is")
    sequence: list[int] = []
    start, span = 0, range(0)
    for index, (depth, needle) in enumerate(zip(depths, needle_texts, strict=True)):
        sequence += text[start:depth]
        if index == asked:
            span = range(len(sequence), len(sequence) + len(ids(needle)))
        sequence += ids(needle)
        start = depth
    return sequence + text[start:] + ids(question), span, numbers[asked]


def keyed_answers(tokenizer: Any, prompts: int, length: int, needles: int, digits: int, source: str,
                  seed: int, key_words: int = 1) -> tuple[list[tuple[list[int], list[int]]], str]:
    """``prompts`` keyed needle prompts (:func:`_needle_prompt`) on consecutive ``length``-token stretches of
    calibration text, each with the ids of its answer (`` <number>``); and the text's description. What the
    greedy head choices (by gradient, or by evaluating every candidate) teacher-force."""
    import torch

    from kvstack.calibration.text import calibration_text_ids

    pool, description = calibration_text_ids(tokenizer, prompts * length, source)
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for index in range(prompts):
        ids, _, number = _needle_prompt(tokenizer, pool[index * length : (index + 1) * length], "keyed", needles,
                                        digits, generator, key_words)
        cases.append((ids, tokenizer(f" {number}", add_special_tokens=False)["input_ids"]))
    return cases, description


def probe_retrieval_heads(model: Any, tokenizer: Any, *, prompts: int = 8, length: int = 768, digits: int = 12,
                          source: str = "python-docs", seed: int = 0, kind: str = "single",
                          needles: int = 4, score: str = "argmax") -> dict[str, Any]:
    """Run the probe: ``prompts`` needle prompts of about ``length`` tokens; returns the artefact's record.

    ``kind='single'`` hides one number (Wu et al.'s probe); ``'keyed'`` hides ``needles`` numbers by name and
    asks for one, so only a head that finds the named needle among look-alikes scores (what a multi-key
    question needs). ``score='argmax'`` counts a copy step when a head's strongest attention lands on the copied
    token in the needle (Wu et al.); ``'mass'`` adds the attention weight the head puts there (HeadKV's
    refinement: a head splitting its attention over the token and its neighbours still counts)."""
    import torch

    from kvstack.api import cache_kwargs
    from kvstack.calibration.identity import model_key
    from kvstack.calibration.text import calibration_text_ids
    from kvstack.models import model_geometry

    if kind not in PROBE_KINDS:
        raise CalibrationError(f"the probe's kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
    if score not in PROBE_SCORES:
        raise CalibrationError(f"the probe's score must be one of {', '.join(PROBE_SCORES)}, got {score!r}")
    if not 1 <= needles <= len(KEY_NAMES):
        raise CalibrationError(f"needles must be between 1 and {len(KEY_NAMES)}, got {needles}")
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
            ids, span, _ = _needle_prompt(tokenizer, hay[index * length : (index + 1) * length], kind, needles,
                                          digits, generator)
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
                            if score == "mass":
                                hits[layer] += weights[0, :, -1, targets].float().sum(-1).cpu()
                                continue
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
    record = {"format": HEADS_FORMAT, "version": 1, "model_key": model_key(model), "source": description,
              "prompts": prompts, "length": length, "copy_steps": steps, "scores": per_kv_head.tolist()}
    if kind != "single":  # the single-needle probe's record stays as it was
        record.update(method="probe-keyed", needles=needles, digits=digits)
    if score != "argmax":
        record["score"] = score
    return record
