"""Quest inside the paged engine: a decoding step reads only the selected blocks of the pool.

Quest's page is the engine's block. The pool keeps each full block's element-wise key minimum and maximum
beside it (:meth:`~kvstack.engine.paged.PagedKVPool.block_key_bounds`); a request carrying ``quest(...)``
has, at each decoding step and in each layer, its full blocks scored by the method's bound for the step's
query (per KV head, the largest over the query heads of its group), and attends exactly over the top
``budget // block_size`` blocks of each KV head plus the newest block. Prompt chunks attend over everything,
as Quest does. ``docs/engine-design.md`` (section "Quest") says how it meets the rest of the engine.

Shapes: ``H`` KV heads, ``G`` query heads per KV head, ``Hq = H * G``, ``D`` head dimension, ``C`` full blocks.
"""

from __future__ import annotations

import torch

from kvstack.cache import kernels
from kvstack.engine.paged import PagedKVPool
from kvstack.methods.base import PAGE_SCORE_KEY_BOUND, Method

__all__ = ["quest_blocks_read", "quest_decode_attention", "quest_decode_batch", "select_blocks"]


def quest_blocks_read(reader: Method, context_len: int, block_size: int) -> tuple[int, int]:
    """``(full, read)``: the full blocks before the newest one of a ``context_len``-token sequence, and how many
    of them a decoding step reads."""
    full = (context_len - 1) // block_size  # the newest block (holding the step's token) is always read
    return full, reader.pages_read(full)


def select_blocks(query: torch.Tensor, pool: PagedKVPool, layer: int, table: list[int], full: int, read: int,
                  reader: Method) -> torch.Tensor:
    """``[H, read]`` int64 pool block ids each KV head reads, in table order.

    ``query`` ``[Hq, 1, D]`` is the step's query (RoPE applied); the candidates are the sequence's first ``full``
    blocks of ``table``, scored by ``reader.page_scores`` from the pool's block bounds.
    """
    heads, dim = pool.num_kv_heads, pool.head_dim
    candidates = torch.tensor(table[:full], dtype=torch.long, device=pool.device)
    bounds = pool.block_key_bounds(layer, candidates)  # [C, 2, H, D]
    summary = {"min": bounds[:, 0].transpose(0, 1)[None], "max": bounds[:, 1].transpose(0, 1)[None]}  # [1, H, C, D]
    grouped = query.reshape(1, heads, query.shape[0] // heads, dim)  # [1, H, G, D]
    scores = reader.page_scores(grouped, summary)[0]  # [H, C]
    chosen = scores.topk(read, dim=-1).indices.sort(dim=-1).values  # [H, read], in table order
    return candidates[chosen]


def quest_decode_attention(query: torch.Tensor, pool: PagedKVPool, layer: int, table: list[int], context_len: int,
                           reader: Method, scaling: float) -> torch.Tensor:
    """``[Hq, 1, D]`` attention of one decoding query ``[Hq, 1, D]`` over the blocks Quest selects and the newest.

    The caller sends here only steps where ``read < full`` (:func:`quest_blocks_read`); with every block read,
    the engine's ordinary path runs, so a budget covering the context gives exactly the full engine's outputs.
    Float32 softmax; ``read * block_size + (context_len - full * block_size)`` keys per KV head, gathered: the
    engine's path without the fused kernels (with them, :func:`quest_decode_batch` reads the pool in place).
    """
    heads, dim, size = pool.num_kv_heads, pool.head_dim, pool.block_size
    full, read = quest_blocks_read(reader, context_len, size)
    blocks = select_blocks(query, pool, layer, table, full, read, reader)  # [H, read]
    layer_kv = pool.kv[:, layer]  # [num_blocks, 2, H, block_size, D], a view
    newest = layer_kv[table[full], :, :, : context_len - full * size]  # [2, H, r, D]
    # Two advanced indices split by a slice put theirs first: [H, read, 2, block_size, D].
    picked = layer_kv[blocks, :, torch.arange(heads, device=pool.device)[:, None]]
    picked = picked.permute(2, 0, 1, 3, 4).reshape(2, heads, read * size, dim)
    keys = torch.cat((picked[0], newest[0]), dim=1).float()  # [H, n, D]
    values = torch.cat((picked[1], newest[1]), dim=1).float()
    grouped = query.to(device=pool.device, dtype=torch.float32).reshape(heads, -1, dim)  # [H, G, D]
    weights = torch.softmax(grouped @ keys.transpose(-1, -2) * scaling, dim=-1)  # [H, G, n]
    output = weights @ values  # [H, G, D]
    return output.reshape(query.shape).to(device=query.device, dtype=query.dtype)


def quest_decode_batch(query: torch.Tensor, pool: PagedKVPool, layer: int,
                       steps: list[tuple[list[int], int, Method]], scaling: float) -> torch.Tensor:
    """``[S, Hq, D]`` float32: the decoding queries ``[S, Hq, D]`` of ``S`` Quest sequences over the blocks each
    selects and its newest block, read in place from a float32 CPU pool by the fused kernel.

    ``steps`` holds each sequence's ``(block table, context length, reader)``; every step reads fewer blocks
    than it has full (:func:`quest_blocks_read`). Steps whose readers are of one kind and read as many blocks
    are scored and attended together: one gather of their candidate blocks' bounds (padded to the widest), one
    ``page_scores`` and one top-k (with Quest's bound: one fused selection call per context length among them)
    and one kernel call, instead of one of each per sequence.
    """
    output = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    counts = [quest_blocks_read(reader, context_len, pool.block_size) for _, context_len, reader in steps]
    groups: dict[tuple[type, int], list[int]] = {}
    for index, ((_, _, reader), (_, read)) in enumerate(zip(steps, counts, strict=True)):
        groups.setdefault((type(reader), read), []).append(index)
    for (_, read), members in groups.items():
        output[members] = _decode_group(query[members].float(), pool, layer, [steps[i] for i in members],
                                        [counts[i][0] for i in members], read, scaling)
    return output


def _decode_group(query: torch.Tensor, pool: PagedKVPool, layer: int, steps: list[tuple[list[int], int, Method]],
                  fulls: list[int], read: int, scaling: float) -> torch.Tensor:
    """``[S, Hq, D]``: :func:`quest_decode_batch` for steps with ``fulls`` full blocks that all read ``read``
    blocks per KV head."""
    heads, dim, size = pool.num_kv_heads, pool.head_dim, pool.block_size
    count = len(steps)
    widest = max(fulls)
    candidates = torch.tensor([table[:full] + [table[0]] * (widest - full) for (table, _, _), full in
                               zip(steps, fulls, strict=True)], dtype=torch.long, device=pool.device)  # [S, C]
    bounds = pool.block_key_bounds(layer, candidates.flatten()).view(count, widest, 2, heads, dim)
    low, high = bounds[:, :, 0].transpose(1, 2), bounds[:, :, 1].transpose(1, 2)  # [S, H, C, D]
    grouped = query.view(count, heads, -1, dim)  # [S, H, G, D]
    if steps[0][2].page_score_form() == PAGE_SCORE_KEY_BOUND:
        # the bound scored and ranked in one fused call per candidate count (no padding to mask), as the core
        # cache does; the pages chosen are the top ones of page_scores
        picked = torch.empty((count, heads, read), dtype=torch.long, device=pool.device)
        by_full: dict[int, list[int]] = {}
        for index, full in enumerate(fulls):
            by_full.setdefault(full, []).append(index)
        for full, rows in by_full.items():
            picked[rows] = kernels.key_bound_top_pages(grouped[rows], low[rows, :, :full], high[rows, :, :full], read)
    else:
        scores = steps[0][2].page_scores(grouped, {"min": low, "max": high})  # [S, H, C]
        padding = torch.arange(widest, device=pool.device) >= torch.tensor(fulls, device=pool.device)[:, None]
        scores = scores.masked_fill(padding[:, None, :], float("-inf"))
        picked = scores.topk(read, dim=-1).indices  # [S, H, read], in any order: the softmax is over a set
    blocks = candidates.gather(1, picked.flatten(1)).view(count, heads, read)
    newest = pool.kv[torch.tensor([table[full] for (table, _, _), full in zip(steps, fulls, strict=True)]), layer]
    counts = torch.tensor([context_len - full * size for (_, context_len, _), full in zip(steps, fulls, strict=True)])
    layer_kv = pool.kv[:, layer]  # [num_blocks, 2, H, block_size, D], a view
    return kernels.selected_page_attention(query, layer_kv[:, 0], layer_kv[:, 1], blocks, newest[:, 0],
                                           newest[:, 1], scaling, counts)
