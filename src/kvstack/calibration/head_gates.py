"""DuoAttention's retrieval gates, fitted with the model frozen, and a greedy choice of heads by the gates'
gradient at duo's split (two more ways to make duo's artefact; :func:`select_retrieval_heads` for the second).

DuoAttention (Xiao et al., 2024) gives every KV head a gate ``alpha`` in ``[0, 1]`` and mixes, per head, the
output of full attention with that of streaming attention (the first ``sinks`` and last ``recent`` keys, what
``duo(...)`` keeps on a streaming head): ``alpha * full + (1 - alpha) * streaming``. With every weight of the
model frozen, the gates are fitted by gradient descent on synthetic passkey prompts (several pass keys hidden
in calibration text, then asked for in order, or by name with ``prompts='keyed'``; the answer
teacher-forced): the loss is the squared distance between the gated model's last hidden states and the full
model's on the answer's tokens, plus ``reg`` times the sum of the gates, which pulls every head towards
streaming; a head the answer needs whole resists. Each
prompt is a noisy sample of that pull, so the scores are the gates averaged over the second half of the fit
(Polyak averaging), not the last step's; the last step's are kept as ``final_gates``. The scores go in the
same artefact the probe writes (:mod:`.head_map`), with ``"method": "duo-gates"``; ``duo(heads=f)`` keeps
whole the fraction ``f`` of KV heads with the largest.

The probe (:mod:`.head_probe`) asks where each head's strongest attention lands while the model copies a
needle; the gates ask what the answer loses when a head streams, which also counts heads that carry the
needle's content without looking at it hardest. On SmolLM2-135M, fitted for 80 steps, the probe's heads do
better on multi-key retrieval (``benchmarks/results/retrieval/README.md``), so the probe stays the default.
The fit is a forward and a backward pass per step: with a 512-token haystack, about 6 s a step on one CPU
thread, 8 minutes for the default 80.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvstack.calibration.head_map import HEADS_FORMAT
from kvstack.calibration.head_probe import KEY_NAMES

__all__ = ["GATED_ATTENTION_NAME", "PROMPT_KINDS", "fit_retrieval_gates", "gated_attention", "passkey_prompt",
           "ranked_scores", "select_retrieval_heads", "streaming_mask"]

GATED_ATTENTION_NAME = "kvstack_duo_gates"


class _GateState:
    """The gates ``[L, H_kv]`` the gated attention mixes with, and the streaming heads' sinks and recent."""

    def __init__(self, gates: torch.Tensor, sinks: int, recent: int) -> None:
        self.gates, self.sinks, self.recent = gates, sinks, recent
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def streaming_mask(self, length: int, device: torch.device) -> torch.Tensor:
        """The streaming mask for ``length`` tokens, built once per forward's length (every layer asks)."""
        key = (length, device)
        if key not in self._masks:
            self._masks = {key: streaming_mask(length, self.sinks, self.recent, device)}
        return self._masks[key]


_ACTIVE: list[_GateState] = []


def streaming_mask(length: int, sinks: int, recent: int, device: torch.device | None = None) -> torch.Tensor:
    """``[length, length]`` boolean: query ``i`` sees key ``j <= i`` when ``j < sinks`` or ``i - j < recent``."""
    rows = torch.arange(length, device=device).unsqueeze(1)
    cols = torch.arange(length, device=device).unsqueeze(0)
    return (cols <= rows) & ((cols < sinks) | (rows - cols < recent))


def gated_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """One layer's attention over a whole prompt (no cache, batch without padding): per query head the mix
    ``gate * full + (1 - gate) * streaming`` with its KV head's gate. ``query`` ``[B, Hq, q, D]``, ``key`` and
    ``value`` ``[B, H_kv, q, D]``; returns ``([B, q, Hq, D], None)``."""
    if not _ACTIVE:
        raise RuntimeError(f"{GATED_ATTENTION_NAME} attention runs only inside fit_retrieval_gates or "
                           "select_retrieval_heads")
    state = _ACTIVE[-1]
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    length = query.shape[2]
    if key.shape[2] != length:
        raise RuntimeError("the gated attention fits on whole prompts, without a cache")
    full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    streaming = F.scaled_dot_product_attention(
        query, key, value, attn_mask=state.streaming_mask(length, query.device), scale=scaling)
    gate = state.gates[module.layer_idx].repeat_interleave(group).view(1, -1, 1, 1).to(query.dtype)
    mixed = gate * full + (1 - gate) * streaming
    return mixed.transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The gated attention builds its own masks (causal and streaming), as the head search's does."""
    return None


AttentionInterface.register(GATED_ATTENTION_NAME, gated_attention)
AttentionMaskInterface.register(GATED_ATTENTION_NAME, _no_mask)


@contextlib.contextmanager
def _using_attention(model: Any, name: str, active: list[Any], state: Any) -> Iterator[None]:
    """Inside: ``model`` attends with the registered function ``name``, which reads ``state`` from the top of
    its ``active`` stack; after: the implementation it had (also for the head search's split attention)."""
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    active.append(state)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        active.pop()
        model.set_attn_implementation(previous)


def _gated(model: Any, gates: torch.Tensor, sinks: int, recent: int) -> contextlib.AbstractContextManager[None]:
    return _using_attention(model, GATED_ATTENTION_NAME, _ACTIVE, _GateState(gates, sinks, recent))


@contextlib.contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """Every weight of ``model`` without gradients inside (only the gates learn); as they were after."""
    wanted = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in wanted:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in wanted:
            parameter.requires_grad_(flag)


def ranked_scores(chosen: list[int], merit: torch.Tensor) -> torch.Tensor:
    """A greedy choice as head-map scores ``[L * H_kv]``: the ``chosen`` heads ``1`` down to ``0.5`` in the order
    chosen, every other head below ``0.5`` ranked by ``merit`` (higher is better), so ``duo(heads=f)`` keeping
    at most ``len(chosen)`` heads keeps chosen ones, the first chosen first."""
    merit = merit.clone()
    merit[chosen] = float("-inf")
    scores = 0.5 * merit.argsort().argsort().float() / merit.numel()
    scores[chosen] = torch.linspace(1.0, 0.5, len(chosen)) if len(chosen) > 1 else torch.tensor([1.0])
    return scores


PROMPT_KINDS = ("ordered", "keyed")


def passkey_prompt(tokenizer: Any, haystack: list[int], passkeys: int, digits: int, generator: torch.Generator,
                   kind: str = "ordered") -> tuple[list[int], int]:
    """A training prompt: ``passkeys`` pass keys of ``digits`` digits at sorted random depths of ``haystack``,
    then the answer, teacher-forced. ``ordered`` (DuoAttention's): numbered keys, asked for in order.
    ``keyed``: each key belongs to a name, and the answer recalls them by name in a shuffled order, so a head
    must find a needle by its name rather than by its place. Returns the ids and where the answer starts;
    the prompt is ``len(haystack)`` tokens plus the needles, question and answer."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    keys = ["".join(str(int(d)) for d in torch.randint(0, 10, (digits,), generator=generator))
            for _ in range(passkeys)]
    depths = sorted(int(d) for d in torch.randint(len(haystack) // 20, len(haystack) * 19 // 20, (passkeys,),
                                                  generator=generator))
    names = [KEY_NAMES[int(i)] for i in torch.randperm(len(KEY_NAMES), generator=generator)[:passkeys]]
    needles = ([f" Pass key {n} is {key}. Remember it." for n, key in enumerate(keys, 1)] if kind == "ordered"
               else [f" The pass key for {name} is {key}." for name, key in zip(names, keys, strict=True)])
    sequence: list[int] = []
    start = 0
    for depth, needle in zip(depths, needles, strict=True):
        sequence += haystack[start:depth] + ids(needle)
        start = depth
    if kind == "ordered":
        sequence += haystack[start:] + ids(" What are the pass keys, in order? The pass keys are")
        return sequence + ids(" " + ", ".join(keys) + "."), len(sequence)
    sequence += haystack[start:] + ids(" Recall every pass key.")
    order = torch.randperm(passkeys, generator=generator).tolist()
    return sequence + ids("".join(f" The pass key for {names[i]} is {keys[i]}." for i in order)), len(sequence)


def fit_retrieval_gates(model: Any, tokenizer: Any, *, steps: int = 80, length: int = 512, passkeys: int = 4,
                        digits: int = 8, sinks: int = 16, recent: int = 64, lr: float = 0.05, reg: float = 0.5,
                        source: str = "python-docs", seed: int = 0, prompts: str = "ordered",
                        progress: Callable[[int, float, float], None] | None = None) -> dict[str, Any]:
    """Fit DuoAttention's gates; returns the retrieval-head artefact's record (scores: the gates ``[L][H_kv]``).

    Parameters
    ----------
    steps:
        Optimiser steps, one new prompt each.
    length:
        Haystack tokens per prompt (the needles, question and answer come on top).
    passkeys, digits:
        Pass keys per prompt and digits per key.
    prompts:
        ``ordered`` (DuoAttention's: numbered keys recalled in order) or ``keyed`` (named keys recalled by name,
        shuffled): see :func:`passkey_prompt`.
    sinks, recent:
        The streaming attention the gates mix in (duo's defaults).
    lr, reg:
        Adam's learning rate, and the weight of the sum of the gates in the loss. DuoAttention's are 0.02 and
        0.05 over 2000 steps with the distance summed over the answer's tokens; here the distance is their mean
        and the fit 80 steps, so both are larger (at 0.05 the gates barely leave 1 in 80 steps: the ranking
        among the heads that matter is noise; at 0.5 they spread, half the heads close).
    progress:
        Called after each step with ``(step, distillation loss, mean gate)``.
    """
    from kvstack.calibration.artefact import CalibrationError
    from kvstack.calibration.identity import model_key
    from kvstack.calibration.text import calibration_text_ids
    from kvstack.models import model_geometry

    if prompts not in PROMPT_KINDS:
        raise CalibrationError(f"prompts must be one of {', '.join(PROMPT_KINDS)}, got {prompts!r}")
    if steps < 1 or length < 4 * (sinks + recent) or passkeys < 1 or digits < 1:
        raise CalibrationError(f"the gate fit needs steps >= 1, passkeys >= 1, digits >= 1 and a haystack of at "
                               f"least 4 x (sinks + recent) = {4 * (sinks + recent)} tokens")
    geometry = model_geometry(model)
    device = next(model.parameters()).device
    pool, description = calibration_text_ids(tokenizer, 16 * length, source)
    generator = torch.Generator().manual_seed(seed)
    gates = torch.ones(geometry.num_layers, geometry.num_kv_heads, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([gates], lr=lr)
    body = model.base_model  # the decoder stack: its last hidden states, without the vocabulary projection
    distances: list[float] = []
    averaged = torch.zeros_like(gates, requires_grad=False)  # the gates summed over the second half of the fit
    with _frozen(model):
        for step in range(steps):
            offset = int(torch.randint(0, len(pool) - length + 1, (1,), generator=generator))
            ids, answer_start = passkey_prompt(tokenizer, pool[offset:offset + length], passkeys, digits, generator,
                                               prompts)
            sequence = torch.tensor([ids], device=device)
            answer = slice(answer_start - 1, len(ids) - 1)  # the positions that predict the answer's tokens
            with torch.no_grad():
                target = body(input_ids=sequence, use_cache=False).last_hidden_state[0, answer]
            with _gated(model, gates, sinks, recent), torch.enable_grad():  # callers may hold no_grad
                mixed = body(input_ids=sequence, use_cache=False).last_hidden_state[0, answer]
                distance = (mixed.float() - target.float()).pow(2).sum(-1).mean()
                loss = distance + reg * gates.sum()
                optimiser.zero_grad()
                loss.backward()
            optimiser.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
                if step >= steps // 2:
                    averaged += gates
            distances.append(distance.item())
            if progress is not None:
                progress(step + 1, distances[-1], gates.mean().item())
    averaged /= steps - steps // 2
    if not torch.isfinite(averaged).all():
        raise CalibrationError("the gate fit diverged (non-finite gates); try a smaller lr")
    return {"format": HEADS_FORMAT, "version": 1, "method": "duo-gates", "model_key": model_key(model),
            "source": description, "steps": steps, "length": length, "passkeys": passkeys, "digits": digits,
            "prompts": prompts, "sinks": sinks, "recent": recent, "lr": lr, "reg": reg, "seed": seed,
            "final_distance": sum(distances[-10:]) / len(distances[-10:]),
            "final_gates": gates.detach().cpu().tolist(), "scores": averaged.cpu().tolist()}


def select_retrieval_heads(model: Any, tokenizer: Any, *, count: int = 9, prompts: int = 4, length: int = 1024,
                           needles: int = 4, digits: int = 8, sinks: int = 16, recent: int = 64,
                           source: str = "python-docs", seed: int = 0,
                           progress: Callable[[int, tuple[int, int], float], None] | None = None) -> dict[str, Any]:
    """Choose ``count`` retrieval heads greedily, each from the gradient at the split duo would run.

    Start with every KV head streaming (gates 0: duo's sinks and recent entries). Each round runs ``prompts``
    keyed needle prompts (several numbers under names, one asked for: :func:`.head_probe._needle_prompt`) with
    the answer teacher-forced, through the gated attention with the heads chosen so far whole (gate 1) and
    the rest streaming (gate 0), and takes the gradient of the cross-entropy of the answer's tokens with
    respect to every gate: ``-d loss / d gate`` is how much the answer gains, to first order, when that head
    starts to read everything. The head with the largest gain joins, and the next round starts from the new
    split. Unlike DuoAttention's fit (:func:`fit_retrieval_gates`, linearised around every head whole, on the
    distance of hidden states), each step is taken at the split itself and on the answer's tokens.

    Returns the retrieval-head artefact's record: the chosen heads score ``1`` down to ``0.5`` in the order
    chosen, the others below ``0.5`` by their gain in the last round, so ``duo(heads=f)`` with ``f`` of at
    most ``count`` heads keeps chosen ones. Cost: ``count`` rounds of ``prompts`` forward and backward passes.
    """
    from kvstack.calibration.artefact import CalibrationError
    from kvstack.calibration.head_probe import keyed_answers
    from kvstack.calibration.identity import model_key
    from kvstack.models import model_geometry

    geometry = model_geometry(model)
    total = geometry.num_layers * geometry.num_kv_heads
    if not 1 <= count <= total or prompts < 1 or length < 4 * (sinks + recent):
        raise CalibrationError(f"the head selection needs 1 <= count <= {total}, prompts >= 1 and a haystack of at "
                               f"least 4 x (sinks + recent) = {4 * (sinks + recent)} tokens")
    device = next(model.parameters()).device
    cases, description = keyed_answers(tokenizer, prompts, length, needles, digits, source, seed)
    batches = [(torch.tensor([ids + answer], device=device), len(ids)) for ids, answer in cases]
    chosen: list[int] = []
    gain = torch.zeros(total)
    with _frozen(model):
        for _ in range(count):
            gates = torch.zeros(total, device=device)
            gates[chosen] = 1.0
            gates = gates.view(geometry.num_layers, geometry.num_kv_heads).requires_grad_(True)
            loss_sum = 0.0
            with _gated(model, gates, sinks, recent), torch.enable_grad():
                for sequence, answer_start in batches:
                    logits = model(input_ids=sequence, use_cache=False).logits[0, answer_start - 1 : -1]
                    loss = F.cross_entropy(logits.float(), sequence[0, answer_start:]) / len(batches)
                    loss.backward()
                    loss_sum += loss.item()
            gain = -gates.grad.detach().flatten().cpu()
            gain[chosen] = float("-inf")
            best = int(gain.argmax())
            chosen.append(best)
            if progress is not None:
                progress(len(chosen), divmod(best, geometry.num_kv_heads), loss_sum)
    scores = ranked_scores(chosen, gain)  # the others by the last round's gain
    return {"format": HEADS_FORMAT, "version": 1, "method": "duo-greedy", "model_key": model_key(model),
            "source": description, "count": count, "prompts": prompts, "length": length, "needles": needles,
            "digits": digits, "sinks": sinks, "recent": recent, "seed": seed,
            "chosen": [list(divmod(head, geometry.num_kv_heads)) for head in chosen],
            "scores": scores.view(geometry.num_layers, geometry.num_kv_heads).tolist()}
