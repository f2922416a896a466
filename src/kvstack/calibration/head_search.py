"""Retrieval heads chosen by the answer itself: a greedy search that runs duo's split for every candidate.

The probe (:mod:`.head_probe`) and the gates (:mod:`.head_gates`) score heads by a proxy: where a head looks
while the model copies a needle, or a gradient at one split. This search asks the question duo's budget asks
directly: with the heads chosen so far kept whole and every other head streaming, which one more head, kept
whole, most raises the log-likelihood of the right answer? It evaluates every candidate exactly, as duo would
decode, and takes the best; nine rounds choose nine heads.

What makes it affordable on a CPU is that duo reads the prompt with full attention and only then drops the
streaming heads' middle entries (:class:`kvstack.methods.retrieval.Duo` compresses once). So the prompt's
keys and values are computed once per calibration prompt, and each candidate split costs only the answer's
tokens, teacher-forced, attending to that cache: the streaming heads to the first ``sinks`` and last ``recent``
prompt entries and the answer so far, the whole heads to everything. All the candidates of a round go through
the model as one batch sharing the prompt's cache (broadcast, never copied). The first answer token comes from
the prefill's logits, which no split changes, so the loss is the cross-entropy of the answer's later tokens.

The prompts are the keyed probe's (several numbers hidden under names, one asked for), so a head earns its
place by finding the named needle among look-alikes, what a multi-key question needs. Cost on SmolLM2-135M
with two CPU threads: about 10 s per prompt per round at 2048 tokens, 24 minutes for the defaults (16
prompts, nine rounds); 41 minutes at 4096 tokens. On 4k multi-key its heads score as the keyed probe's
(``benchmarks/results/retrieval/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvstack.calibration.head_gates import _no_mask, _using_attention, ranked_scores
from kvstack.calibration.head_map import HEADS_FORMAT

__all__ = ["SPLIT_ATTENTION_NAME", "evaluate_splits", "search_retrieval_heads", "split_attention"]

SPLIT_ATTENTION_NAME = "kvstack_duo_split"


class _SplitState:
    """One prompt's keys and values per layer (``[1, H_kv, P, D]`` each) and the splits ``[B, L, H_kv]``
    (True: the head keeps everything) the batch's rows decode with."""

    def __init__(self, prompt: list[tuple[torch.Tensor, torch.Tensor]], whole: torch.Tensor, sinks: int,
                 recent: int) -> None:
        self.prompt, self.whole = prompt, whole
        length = prompt[0][0].shape[2]
        positions = torch.arange(length, device=whole.device)
        self.streamed = (positions < sinks) | (positions >= length - recent)  # [P]: what a streaming head keeps


_ACTIVE: list[_SplitState] = []


def split_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The answer's tokens attending to the prompt's cache as duo decodes, one split per batch row.

    ``query`` ``[B, Hq, n, D]`` and ``key``/``value`` ``[B, H_kv, n, D]`` are the ``n`` answer tokens (after the
    prompt's ``P``); each attends causally to the answer and, on a whole head, to all ``P`` prompt entries, on a
    streaming head to the first ``sinks`` and last ``recent``. Returns ``([B, n, Hq, D], None)``."""
    if not _ACTIVE:
        raise RuntimeError(f"{SPLIT_ATTENTION_NAME} attention runs only inside evaluate_splits")
    state = _ACTIVE[-1]
    prompt_keys, prompt_values = state.prompt[module.layer_idx]
    batch, query_heads, count, dim = query.shape
    kv_heads = key.shape[1]
    group = query_heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, kv_heads, group * count, dim)  # query head h reads KV head h // group
    on_prompt = grouped @ prompt_keys.transpose(-1, -2) * scale  # [B, H_kv, g*n, P], the cache broadcast
    visible = state.whole[:, module.layer_idx].view(batch, kv_heads, 1, 1) | state.streamed.view(1, 1, 1, -1)
    on_prompt = on_prompt.masked_fill(~visible, float("-inf"))
    on_answer = grouped @ key.transpose(-1, -2) * scale  # [B, H_kv, g*n, n]
    rows = torch.arange(count, device=query.device).repeat(group).view(-1, 1)
    on_answer = on_answer.masked_fill(torch.arange(count, device=query.device).view(1, -1) > rows, float("-inf"))
    weights = torch.cat([on_prompt, on_answer], dim=-1).softmax(dim=-1)
    length = prompt_keys.shape[2]
    out = weights[..., :length] @ prompt_values + weights[..., length:] @ value
    return out.view(batch, query_heads, count, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(SPLIT_ATTENTION_NAME, split_attention)
AttentionMaskInterface.register(SPLIT_ATTENTION_NAME, _no_mask)  # it builds its own masks


def prompt_cache(model: Any, prompt: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompt read with full attention: per layer its keys and values ``[1, H_kv, P, D]`` (rotated)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5.24 renamed the field
    return [(layer.keys, layer.values) for layer in cache.layers]


def evaluate_splits(model: Any, cache: list[tuple[torch.Tensor, torch.Tensor]], answer: list[int],
                    whole: torch.Tensor, *, sinks: int = 16, recent: int = 64) -> torch.Tensor:
    """The answer's cross-entropy after its first token under each split: ``whole`` ``[B, L, H_kv]`` (True:
    keeps everything); returns ``[B]``, the mean over the answer's tokens from the second on.

    The first token is predicted by the prefill (full attention whatever the split), so it is left out."""
    if len(answer) < 2:
        raise ValueError("the answer needs at least two tokens: the first is the prefill's, whatever the split")
    length = cache[0][0].shape[2]
    device = whole.device
    batch = whole.shape[0]
    inputs = torch.tensor(answer[:-1], device=device).expand(batch, -1)
    positions = torch.arange(length, length + len(answer) - 1, device=device).expand(batch, -1)
    targets = torch.tensor(answer[1:], device=device).expand(batch, -1)
    with _using_attention(model, SPLIT_ATTENTION_NAME, _ACTIVE, _SplitState(cache, whole, sinks, recent)), \
            torch.no_grad():
        logits = model(input_ids=inputs, position_ids=positions, use_cache=False).logits
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").mean(dim=-1)


def search_retrieval_heads(model: Any, tokenizer: Any, *, count: int = 9, prompts: int = 16, length: int = 2048,
                           needles: int = 4, digits: int = 7, sinks: int = 16, recent: int = 64, batch: int = 32,
                           source: str = "python-docs", seed: int = 0, key_words: int = 1,
                           progress: Callable[[int, tuple[int, int], float], None] | None = None) -> dict[str, Any]:
    """Choose ``count`` retrieval heads greedily, each by evaluating every candidate split exactly.

    Every KV head starts streaming (duo's ``sinks`` and ``recent`` entries). Each round, for every head not yet
    chosen, the split "chosen so far plus that head whole" decodes the answers of ``prompts`` keyed needle
    prompts of about ``length`` tokens (``needles`` numbers of ``digits`` digits under names, one asked for:
    :func:`.head_probe._needle_prompt`; names of ``key_words`` words, 1 or 2) teacher-forced, and the head
    whose split gives the lowest mean cross-entropy joins. ``batch`` candidates go through the model at once.

    Returns the retrieval-head artefact's record: the chosen heads score ``1`` down to ``0.5`` in the order
    chosen, the others below ``0.5`` by their loss in the last round, so ``duo(heads=f)`` with ``f`` of at most
    ``count`` heads keeps chosen ones; ``losses`` has each round's best loss, ``loss_streaming`` and
    ``loss_whole`` the loss with no head whole and with every head whole.
    """
    from kvstack.calibration.artefact import CalibrationError
    from kvstack.calibration.head_probe import KEY_NAMES, keyed_answers
    from kvstack.calibration.identity import model_key
    from kvstack.models import model_geometry

    geometry = model_geometry(model)
    total = geometry.num_layers * geometry.num_kv_heads
    if not 1 <= count <= total or prompts < 1 or batch < 1 or length < 4 * (sinks + recent):
        raise CalibrationError(f"the head search needs 1 <= count <= {total}, prompts >= 1, batch >= 1 and a "
                               f"haystack of at least 4 x (sinks + recent) = {4 * (sinks + recent)} tokens")
    if not 1 <= needles <= len(KEY_NAMES) or digits < 2 or key_words not in (1, 2):
        raise CalibrationError(f"the head search needs 1 <= needles <= {len(KEY_NAMES)}, digits >= 2 and key_words "
                               "1 or 2")
    device = next(model.parameters()).device
    prompts_and_answers, description = keyed_answers(tokenizer, prompts, length, needles, digits, source, seed,
                                                     key_words)
    cases = [(prompt_cache(model, ids), answer) for ids, answer in prompts_and_answers]

    def mean_loss(splits: torch.Tensor) -> torch.Tensor:
        """``[B]``: the loss of each split ``[B, total]``, averaged over the prompts."""
        losses = torch.zeros(splits.shape[0])
        for cache, answer in cases:
            for start in range(0, splits.shape[0], batch):
                part = splits[start : start + batch].view(-1, geometry.num_layers, geometry.num_kv_heads)
                losses[start : start + batch] += evaluate_splits(model, cache, answer, part, sinks=sinks,
                                                                 recent=recent).cpu()
        return losses / len(cases)

    ends = mean_loss(torch.tensor([[False] * total, [True] * total], device=device))
    chosen: list[int] = []
    best_losses: list[float] = []
    losses = torch.empty(0)  # the last round's, by head (count >= 1: the loop sets it)
    for _ in range(count):
        candidates = [head for head in range(total) if head not in chosen]
        splits = torch.zeros(len(candidates), total, dtype=torch.bool, device=device)
        splits[:, chosen] = True
        splits[torch.arange(len(candidates)), candidates] = True
        round_losses = mean_loss(splits)
        losses = torch.full((total,), float("inf"))
        losses[candidates] = round_losses
        best = candidates[int(round_losses.argmin())]
        chosen.append(best)
        best_losses.append(float(round_losses.min()))
        if progress is not None:
            progress(len(chosen), divmod(best, geometry.num_kv_heads), best_losses[-1])
    scores = ranked_scores(chosen, -losses)  # the others by the last round's loss, lowest first
    return {"format": HEADS_FORMAT, "version": 1, "method": "duo-search", "model_key": model_key(model),
            "source": description, "count": count, "prompts": prompts, "length": length, "needles": needles,
            "digits": digits, "sinks": sinks, "recent": recent, "seed": seed,
            "chosen": [list(divmod(head, geometry.num_kv_heads)) for head in chosen], "losses": best_losses,
            "loss_streaming": float(ends[0]), "loss_whole": float(ends[1]), "key_words": key_words,
            "scores": scores.view(geometry.num_layers, geometry.num_kv_heads).tolist()}
