"""Measuring cells: one cell over its samples (:func:`run_cell`), or cells whose methods read each prompt in
one shared forward (:func:`run_cells_shared`).

Generation cells: :func:`kvstack.api.prefill` reads the prompt (chunked for dynamic methods), the
first token is the argmax of its last logits, then greedy decoding one token per forward until an
end-of-sequence token, the task's ``max_new_tokens``, or a prediction that already holds every
reference (its substring score is 100 and cannot change; see :func:`score_settled`). ``prefill_s`` times the prefill,
``ttft_s`` prefill + first token, ``decode_tokens_per_s`` the tokens after the first over the time
spent producing them (``tpot_s`` is its inverse). KV bytes come from the cache's own accounting
(:meth:`kvstack.KVStackCache.summary`) after the prompt (``*_prefill``) and at the end of the cell.

Perplexity cells: see :class:`kvstack.bench.tasks.Perplexity`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvstack.bench.cells import Cell, max_new_tokens, perplexity_chunk
from kvstack.bench.config import BenchConfig
from kvstack.bench.metrics import PeakMemory, synchronize
from kvstack.bench.records import cell_record
from kvstack.bench.scoring import score as score_text
from kvstack.bench.tasks import Sample
from kvstack.spec import parse

__all__ = [
    "Prefilled",
    "prefill_share_key",
    "run_cell",
    "run_cells_shared",
    "score_settled",
    "shares_prefill",
    "warm_up",
]


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def score_settled(scorer: str, prediction: str, answers: Sequence[str]) -> bool:
    """True when ``prediction`` already scores 100 with a substring scorer.

    Greedy decoding only appends text, and a reference found in a prefix is found in every extension,
    so further tokens cannot change the score: decoding stops there (a large saving on the long-answer
    tasks, e.g. common words, without changing any score).
    """
    if scorer not in ("string_match_all", "string_match_part"):
        return False
    return score_text(scorer, prediction, answers) >= 100.0


@dataclasses.dataclass
class Prefilled:
    """A cache that has read a sample's prompt in a shared forward (see :func:`run_cells_shared`).

    Attributes
    ----------
    cache:
        The cache, as its own prefill would have left it.
    logits:
        ``[1, V]`` logits of the last prompt position.
    seconds:
        Wall time of the prompt's reading: the shared forward, or (chunks) the chunks this cache read.
    """

    cache: Any
    logits: torch.Tensor
    seconds: float


def _read_prompt(model: torch.nn.Module, cell: Cell, ids: torch.Tensor, device: torch.device, seed: int,
                 prefilled: Prefilled | None) -> tuple[Any, torch.Tensor, float, float]:
    """``(cache, last logits, prefill seconds, start time)``: the prompt read now, or by a shared forward."""
    from kvstack.api import make_cache, prefill

    if prefilled is not None:
        return prefilled.cache, prefilled.logits, prefilled.seconds, time.perf_counter() - prefilled.seconds
    cache = make_cache(model, cell.method.spec, seed=seed)
    synchronize(device)
    start = time.perf_counter()
    logits = prefill(model, ids, cache)
    synchronize(device)
    return cache, logits, time.perf_counter() - start, start


@torch.no_grad()
def _generation_sample(model: torch.nn.Module, tokenizer: Any, cell: Cell, sample: Sample, limit: int,
                       eos: set[int], device: torch.device, seed: int,
                       prefilled: Prefilled | None = None) -> dict[str, Any]:
    from kvstack.api import cache_kwargs

    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    cache, logits, prefill_s, start = _read_prompt(model, cell, ids, device, seed, prefilled)
    token = logits.argmax(dim=-1, keepdim=True)
    generated = [int(token)]
    first = time.perf_counter()
    after_prompt = cache.summary()
    settled = False
    while len(generated) < limit and generated[-1] not in eos:
        out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(int(token))
        if score_settled(cell.task.scorer, tokenizer.decode(generated, skip_special_tokens=True), sample.answers):
            settled = True
            break
    synchronize(device)
    end = time.perf_counter()
    prediction = tokenizer.decode(generated, skip_special_tokens=True)
    return {
        "score": score_text(cell.task.scorer, prediction, sample.answers),
        "stopped_at_full_score": settled,
        "prediction": prediction,
        "answers": sample.answers,
        "tokens": len(sample.input_ids),
        "new_tokens": len(generated),
        "prefill_s": prefill_s,
        "ttft_s": first - start,
        "decode_s": end - first,
        "cache_prefill": after_prompt,
        "cache": cache.summary(),
        "cache_artefacts": cache.artefacts,
        "metadata": sample.metadata,
    }


def _prompt_ids(cell: Cell, sample: Sample, device: torch.device) -> torch.Tensor:
    """``[1, T]`` the tokens a cell's cache reads as its prompt (a perplexity sample's context half)."""
    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    if cell.task.kind == "perplexity":
        return ids[:, : _perplexity_context(sample)]
    return ids


def _perplexity_context(sample: Sample) -> int:
    return int(sample.metadata.get("context_tokens") or max(1, len(sample.input_ids) // 2))


@torch.no_grad()
def _perplexity_sample(model: torch.nn.Module, cell: Cell, sample: Sample, chunk: int, device: torch.device,
                       seed: int, prefilled: Prefilled | None = None) -> dict[str, Any]:
    from kvstack.api import cache_kwargs

    ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
    length = ids.shape[1]
    context = _perplexity_context(sample)
    # last: [1, V] logits predicting token `context`
    cache, last, prefill_s, _ = _read_prompt(model, cell, ids[:, :context], device, seed, prefilled)
    prefilled_at = time.perf_counter()
    after_prompt = cache.summary()
    nll = 0.0
    for begin in range(context, length, chunk):
        stop = min(begin + chunk, length)
        out = model(input_ids=ids[:, begin:stop], **cache_kwargs(model, cache), use_cache=True)
        logits = torch.cat([last.unsqueeze(1), out.logits[:, :-1]], dim=1).float()  # [1, n, V]
        targets = ids[:, begin:stop]
        nll += float(torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum"))
        last = out.logits[:, -1]
    synchronize(device)
    end = time.perf_counter()
    scored = length - context
    return {
        "score": math.exp(nll / scored),
        "nll_sum": nll,
        "scored_tokens": scored,
        "tokens": length,
        "context_tokens": context,
        "prefill_s": prefill_s,
        "stream_s": end - prefilled_at,
        "cache_prefill": after_prompt,
        "cache": cache.summary(),
        "cache_artefacts": cache.artefacts,
        "metadata": sample.metadata,
    }


def run_cell(model: torch.nn.Module, tokenizer: Any, cell: Cell, samples: Sequence[Sample], config: BenchConfig,
             model_name: str) -> dict[str, Any]:
    """Measure one cell over ``samples`` and return its record (not yet written)."""
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    limit = max_new_tokens(cell.task, config)
    started = time.perf_counter()
    rows = []
    with PeakMemory(device) as memory:
        for sample in samples:
            if cell.task.kind == "perplexity":
                rows.append(_perplexity_sample(model, cell, sample, perplexity_chunk(cell.method, config), device,
                                                       config.seed))
            else:
                rows.append(_generation_sample(model, tokenizer, cell, sample, limit, eos, device, config.seed))
    return cell_record(cell, rows, memory, time.perf_counter() - started, model_name, device, config)


def prefill_share_key(cell: Cell) -> tuple | None:
    """Which cells ``cell`` can read its prompts together with, or None when it reads them alone.

    ``("prompt",)``: a method that compresses once, after the prompt; such cells share one prompt forward
    (:func:`kvstack.prefill_shared`). ``("prompt", key)``: such a method with per-entry state or
    whole-matrix statistics (Ada-KV over H2O); cells with the same key share one prompt forward computing
    those statistics. ``("chunks", key)``: a method that evicts as it reads; cells with the same key share
    the prompt chunks read before each first evicts (:func:`kvstack.prefill_shared_chunks`).
    """
    from kvstack.cache.shared import method_chunk_share_key, method_share_blocker, method_stats_share_key
    from kvstack.methods.base import Composed

    method = parse(cell.method.spec)
    selection, codec = (method.selection, method.codec) if isinstance(method, Composed) else (method, None)
    if method_share_blocker(selection, codec) is None:
        return ("prompt",)
    key = method_stats_share_key(selection, codec)
    if key is not None:
        return ("prompt", key)
    key = method_chunk_share_key(selection, codec)
    return None if key is None else ("chunks", key)


def shares_prefill(cell: Cell) -> bool:
    """Whether ``cell``'s method can read its prompts in forwards shared with other methods."""
    return prefill_share_key(cell) is not None


def run_cells_shared(model: torch.nn.Module, tokenizer: Any, cells: Sequence[Cell], samples: Sequence[Sample],
                     config: BenchConfig, model_name: str,
                     on_sample: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Measure ``cells`` (one task, length and query mode; methods with one :func:`prefill_share_key`) over
    ``samples``.

    Each sample's prompt is read once for every cell (:func:`kvstack.prefill_shared`), or, for methods that
    evict as they read, its chunks are read together until each cache first evicts
    (:func:`kvstack.prefill_shared_chunks`); then each cell decodes (or streams, for perplexity) from its
    own cache, which is freed before the next. Scores, bytes and tokens are exactly those :func:`run_cell`
    measures. ``prefill_s`` is the shared forward's time (with chunks: the chunks each cache read, shared
    ones counted whole); peak memory is the whole group's; ``wall_s`` is the group's wall time over the
    cell count. ``on_sample`` is called after each sample.
    """
    from kvstack.api import make_cache, prefill_shared, prefill_shared_chunks

    chunked = prefill_share_key(cells[0])[0] == "chunks"

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    limit = max_new_tokens(cells[0].task, config)
    started = time.perf_counter()
    rows: list[list[dict[str, Any]]] = [[] for _ in cells]
    with PeakMemory(device) as memory:
        for sample in samples:
            ids = _prompt_ids(cells[0], sample, device)
            caches = [make_cache(model, cell.method.spec, seed=config.seed) for cell in cells]
            synchronize(device)
            start = time.perf_counter()
            if chunked:
                reads = prefill_shared_chunks(model, ids, caches)
                read_by = [(read.logits, read.seconds) for read in reads]
                shared_chunks = [read.chunks_shared for read in reads]
            else:
                logits = prefill_shared(model, ids, caches)
                synchronize(device)
                read_by = [(logits, time.perf_counter() - start)] * len(cells)
            for index, cell in enumerate(cells):
                prefilled = Prefilled(caches[index], *read_by[index])
                caches[index] = None  # the cell's row keeps no reference: its cache is freed after it
                if cell.task.kind == "perplexity":
                    row = _perplexity_sample(model, cell, sample, perplexity_chunk(cell.method, config), device,
                                             config.seed, prefilled)
                else:
                    row = _generation_sample(model, tokenizer, cell, sample, limit, eos, device, config.seed,
                                             prefilled)
                if chunked:
                    row["prompt_chunks_shared"] = shared_chunks[index]  # read with the group, before evicting
                rows[index].append(row)
                del prefilled
            if on_sample is not None:
                on_sample()
    wall = (time.perf_counter() - started) / len(cells)
    return [cell_record(cell, cell_rows, memory, wall, model_name, device, config, shared_by=len(cells))
            for cell, cell_rows in zip(cells, rows, strict=True)]


@torch.no_grad()
def warm_up(model: torch.nn.Module) -> None:
    """One short prefill and decode step, so the first cell's timings do not pay one-off start-up costs."""
    from kvstack.api import cache_kwargs, make_cache, prefill

    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = (torch.arange(32, device=device) % max(vocab - 1, 1) + 1).unsqueeze(0)
    cache = make_cache(model, "full")
    logits = prefill(model, ids, cache)
    model(input_ids=logits.argmax(dim=-1, keepdim=True), **cache_kwargs(model, cache), use_cache=True)
