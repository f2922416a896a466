"""Attention over a layer's entries with the statistics methods ask for, and how each forward is routed.

One forward's attention output comes from PyTorch's SDPA or flash kernel, or from kvstack's fused CPU kernel;
the statistics (``STAT_*`` of :mod:`kvstack.contract`) from the same pass where the route allows it, else from a
block-by-block recomputation. :func:`attention_route` picks the route; :func:`attention_with_stats` runs it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kvstack.cache import kernels
from kvstack.contract import STAT_BELOW_MEAN, STAT_COLSUM, STAT_LAST, STAT_WINDOW, AttentionStats
from kvstack.hardware import cpu_has_fast_bf16

QUERY_BLOCK = 256  # queries per block when attention weights are materialised


def _block_mask(
    causal: torch.Tensor | None, past_valid: torch.Tensor | None, q_len: int, past: int, start: int, stop: int,
    device: torch.device,
) -> torch.Tensor | None:
    """``[B or 1, H or 1, rows, L]`` bool mask of queries ``start:stop`` over ``past + q_len`` entries.

    None when nothing is masked (a single query with no cached padding).
    """
    rows = stop - start
    if causal is None and past_valid is None and q_len == 1:
        return None
    if causal is None:
        tail = torch.ones(rows, q_len, dtype=torch.bool, device=device).tril(start).view(1, 1, rows, q_len)
    else:
        tail = causal[:, :, start:stop]
    if past_valid is None:
        past_part = torch.ones(1, 1, rows, past, dtype=torch.bool, device=device)
    else:
        past_part = past_valid.unsqueeze(2).expand(-1, -1, rows, -1)
    shape = (max(tail.shape[0], past_part.shape[0]), past_part.shape[1], rows)
    mask = torch.cat((past_part.expand(*shape, past), tail.expand(*shape, q_len)), dim=-1)
    if causal is not None or past_valid is not None:
        # A padding query may see nothing; let it see everything (its output is never used) so that
        # no NaN reaches the padding token's hidden state and, through its cached values, real rows.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def _sdpa_output(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    causal: torch.Tensor | None,
    past_valid: torch.Tensor | None,
    scaling: float,
    block_mask: Callable[[int, int], torch.Tensor | None],
) -> torch.Tensor:
    """``[B, Hq, q, D]`` attention output by PyTorch's scaled-dot-product attention (no weights kept)."""
    q_len, length = query.shape[2], keys.shape[2]
    group = query.shape[1] // keys.shape[1]
    if causal is None and past_valid is None and (q_len == 1 or length == q_len):
        return F.scaled_dot_product_attention(
            query, keys, values, is_causal=q_len > 1, scale=scaling, enable_gqa=group > 1
        )
    mask = block_mask(0, q_len)
    if mask is not None and mask.shape[1] > 1:  # per-KV-head mask -> per query head
        mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(mask.shape[0], -1, q_len, length)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=group > 1)


def _trailing_query_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    block_mask: Callable[[int, int], torch.Tensor | None],
    scaling: float,
    needs: set[str] | frozenset[str],
    window: int,
) -> AttentionStats:
    """The ``window`` and ``last`` statistics: softmax weights of the trailing queries only.

    ``query`` ``[B, Hq, q, D]``, ``keys`` ``[B, H, L, D]``; ``block_mask(start, stop)`` gives the mask of
    queries ``start:stop``. Weights are computed for the most trailing rows any statistic needs.
    """
    q_len = query.shape[2]
    stats = AttentionStats()
    wanted = []
    if STAT_WINDOW in needs and window > 0:
        wanted.append(min(window, q_len))
    if STAT_LAST in needs:
        wanted.append(1)
    if wanted:
        rows = max(wanted)
        weights = _weights(query[:, :, q_len - rows :], keys, block_mask(q_len - rows, q_len), scaling)
        if STAT_WINDOW in needs:
            stats.window = weights[:, :, rows - min(window, q_len):]
        if STAT_LAST in needs:
            stats.last = weights[:, :, -1]
    return stats


ROUTE_SDPA = "sdpa"  # PyTorch's attention for the output; window / last statistics from the trailing queries
ROUTE_FUSED = "fused"  # kvstack's fused CPU kernel: output, column sums and below-mean counts in one pass
ROUTE_FLASH = "flash"  # PyTorch's CPU flash attention, then the weights recomputed block by block for statistics
ROUTE_FLASH_TRANSPOSED = "flash-transposed"  # flash attention, column sums from a flash call on the transpose
ROUTE_EAGER = "eager"  # weights materialised block by block over the queries


def attention_route(
    needs: set[str] | frozenset[str],
    *,
    q_len: int,
    length: int,
    num_q_heads: int,
    device: torch.device | str,
    dtype: torch.dtype,
    padded: bool = False,
    query_padded: bool = False,
) -> str:
    """Which computation :func:`attention_with_stats` makes for a forward of ``q_len`` queries over ``length``
    entries asking for the statistics ``needs``: one of the ``ROUTE_*`` names.

    Forwards on the same route compute the output by the same call, whatever statistics they ask for;
    on the column routes (all but ``sdpa``) the column sums are the same arithmetic whether or not
    below-mean counts are also taken, and on ``sdpa`` the trailing-query statistics are computed apart
    from the output. So caches whose requests take one route can share one forward
    (:class:`SharedChunkAttention`). ``padded``: a chunk mask or cached padding; ``query_padded``: padding
    queries.
    """
    column = bool(needs & {STAT_COLSUM, STAT_BELOW_MEAN})
    if not column and not (STAT_LAST in needs and q_len == 1):
        return ROUTE_SDPA
    on_cpu = torch.device(device).type == "cpu"
    if (
        on_cpu and dtype == torch.float32 and not padded and not query_padded
        and needs <= {STAT_COLSUM, STAT_BELOW_MEAN} and stats_precision() != "bf16" and kernels.available()
    ):
        return ROUTE_FUSED
    if q_len > 1 and on_cpu:
        low_precision = _use_bf16_stats(num_q_heads * min(q_len, QUERY_BLOCK) * length)
        if low_precision and not padded and needs <= {STAT_COLSUM}:
            return ROUTE_FLASH_TRANSPOSED
        return ROUTE_FLASH
    return ROUTE_EAGER


def attention_with_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    causal: torch.Tensor | None,
    past_valid: torch.Tensor | None,
    scaling: float,
    needs: set[str],
    window: int,
    query_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Grouped-query attention over ``L = past + q`` entries, collecting the statistics methods need.

    Parameters
    ----------
    query:
        ``[B, Hq, q, D]``.
    keys, values:
        ``[B, H, L, D]`` (the last ``q`` entries are the new chunk).
    causal:
        ``[B, 1, q, q]`` bool mask of the chunk (None: lower-triangular, no padding).
    past_valid:
        ``[B, H, past]`` bool, False for cached padding (None: all valid).
    needs:
        Subset of ``{"window", "colsum", "below_mean", "last"}``.
    window:
        Trailing queries whose weights the ``window`` statistic returns.
    query_valid:
        ``[B, q]`` bool, False for padding queries: they contribute to no statistic.

    Returns
    -------
    tuple
        ``[B, q, Hq, D]`` output and the :class:`AttentionStats`.
    """
    batch, num_q_heads, q_len, _ = query.shape
    heads, length = keys.shape[1], keys.shape[2]
    group = num_q_heads // heads
    past = length - q_len
    stats = AttentionStats()
    route = attention_route(needs, q_len=q_len, length=length, num_q_heads=num_q_heads, device=query.device,
                            dtype=query.dtype, padded=causal is not None or past_valid is not None,
                            query_padded=query_valid is not None)

    def block_mask(start: int, stop: int) -> torch.Tensor | None:
        return _block_mask(causal, past_valid, q_len, past, start, stop, query.device)

    if route == ROUTE_SDPA:
        output = _sdpa_output(query, keys, values, causal, past_valid, scaling, block_mask)
        stats = _trailing_query_stats(query, keys, block_mask, scaling, needs, window)
        return output.transpose(1, 2), stats

    if route == ROUTE_FUSED:  # one fused pass, exact in float32: softmax, output and column statistics per tile
        output, stats.colsum, stats.below_mean = kernels.attention_with_column_sums(
            query, keys, values, scaling, STAT_BELOW_MEAN in needs
        )
        if stats.below_mean is not None:
            stats.queries_seen = _causal_rows_seeing(batch, heads, length, q_len, group, query.device)
        return output.transpose(1, 2), stats

    if route in (ROUTE_FLASH, ROUTE_FLASH_TRANSPOSED):
        return _flash_attention_with_column_stats(
            query, keys, values, causal, past_valid, block_mask, scaling, needs, window, query_valid,
            transposed_column_sums=route == ROUTE_FLASH_TRANSPOSED,
        )

    return _eager_attention_with_stats(query, keys, values, block_mask, scaling, needs, window, query_valid)


def _eager_attention_with_stats(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
    block_mask: Callable[[int, int], torch.Tensor | None], scaling: float, needs: set[str], window: int,
    query_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, AttentionStats]:
    """The eager route: weights materialised one block of ``QUERY_BLOCK`` queries at a time (shapes as
    :func:`attention_with_stats`; ``block_mask(start, stop)`` gives those queries' mask)."""
    batch, num_q_heads, q_len, head_dim = query.shape
    heads, length = keys.shape[1], keys.shape[2]
    group = num_q_heads // heads
    stats = AttentionStats()
    output = torch.empty_like(query)
    colsum = torch.zeros(batch, heads, length, dtype=torch.float32, device=query.device)
    below = torch.zeros_like(colsum) if STAT_BELOW_MEAN in needs else None
    seen_by = torch.zeros_like(colsum) if STAT_BELOW_MEAN in needs else None
    window_parts = []
    for start in range(0, q_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, q_len)
        mask = block_mask(start, stop)
        weights = _weights(query[:, :, start:stop], keys, mask, scaling)  # [B, Hq, rows, L] float32
        rows = stop - start
        grouped = weights.view(batch, heads, group, rows, length)
        out = torch.matmul(grouped.to(values.dtype), values.unsqueeze(2))  # [B, H, G, rows, D]
        output[:, :, start:stop] = out.reshape(batch, num_q_heads, rows, head_dim)
        visible = torch.ones_like(grouped, dtype=torch.bool) if mask is None else mask.unsqueeze(2).expand_as(grouped)
        if query_valid is not None:
            visible = visible & query_valid[:, start:stop].view(batch, 1, 1, rows, 1)
            grouped = grouped * visible
        colsum += grouped.sum(dim=(2, 3))
        if below is not None:
            count = visible.sum(dim=-1, keepdim=True).clamp(min=1)
            below += ((grouped < 1.0 / count) & visible).sum(dim=(2, 3)).float()
            seen_by += visible.sum(dim=(2, 3)).float()
        if STAT_WINDOW in needs and stop > q_len - window:
            window_parts.append(weights[:, :, max(start, q_len - window) - start :])
        if STAT_LAST in needs and stop == q_len:
            stats.last = weights[:, :, -1]
    stats.colsum = colsum
    stats.below_mean, stats.queries_seen = below, seen_by
    if window_parts:
        stats.window = torch.cat(window_parts, dim=2)
    return output.transpose(1, 2), stats


def _causal_rows_seeing(
    batch: int, heads: int, length: int, q_len: int, group: int, device: torch.device
) -> torch.Tensor:
    """``[B, H, L]`` float32: how many (query, query head) rows of a causal, unpadded chunk see each entry.

    The chunk is the last ``q_len`` of ``length`` entries; entry ``j`` is seen by the ``group`` query heads of
    every chunk query ``i`` with ``j <= length - q_len + i``.
    """
    past = length - q_len
    counts = torch.full((length,), float(q_len * group), device=device)
    counts[past:] = torch.arange(q_len, 0, -1, device=device, dtype=torch.float32) * group
    return counts.expand(batch, heads, length).clone()


STATS_PRECISION_ENV = "KVSTACK_STATS_PRECISION"
BF16_STATS_MIN_ENTRIES = 1 << 20  # weights per block above which bf16 statistics pay off (auto mode)


def stats_precision() -> str:
    """How column statistics are recomputed on CPU: ``fp32``, ``bf16`` or ``auto`` (env ``KVSTACK_STATS_PRECISION``).

    ``auto`` (the default) uses bf16 matrix products for large blocks when the CPU has native bf16
    (AMX / AVX512-BF16), where they are several times faster than fp32, and fp32 otherwise.
    """
    value = os.environ.get(STATS_PRECISION_ENV, "auto").strip().lower()
    if value not in ("auto", "fp32", "bf16"):
        raise ValueError(f"{STATS_PRECISION_ENV}={value!r}: choose auto, fp32 or bf16")
    return value


def _use_bf16_stats(entries: int) -> bool:
    mode = stats_precision()
    if mode == "auto":
        return entries >= BF16_STATS_MIN_ENTRIES and cpu_has_fast_bf16()
    return mode == "bf16"


def _flash_attention_with_column_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    causal: torch.Tensor | None,
    past_valid: torch.Tensor | None,
    block_mask: Any,
    scaling: float,
    needs: set[str],
    window: int,
    query_valid: torch.Tensor | None,
    transposed_column_sums: bool = False,
) -> tuple[torch.Tensor, AttentionStats]:
    """Column statistics (H2O's received attention, Scissorhands' below-mean counts) for a multi-token chunk.

    The output and each query's log-sum-exp ``lse`` come from PyTorch's fused CPU flash-attention
    kernel (causal fast path when nothing is padded). The weights are then recomputed block by block
    as ``exp(q.k * scale - lse)``, only over the keys each block can see, with the causal mask applied
    to the diagonal part alone. With bf16 statistics (see :func:`stats_precision`) the product is taken
    in bfloat16 with ``-lse`` folded into the matrix product as two extra columns (its high and low
    bf16 parts), so the rounded numbers are ``log w <= 0``; the column sums of the heavy entries then
    carry about 0.5% relative error on average (under 3% at worst in the tests), as fp16/bf16 H2O runs
    on GPUs do. When only column sums are needed and nothing is padded (H2O), they come instead from
    one fused flash call on the transposed problem (:func:`_column_sums_by_transposed_flash`), which
    never materialises a weight. The attention output is always exact.
    Shapes as in :func:`attention_with_stats`.
    """
    padded = causal is not None or past_valid is not None
    output, lse, full_mask = _flash_output_and_lse(query, keys, values, padded, block_mask, scaling)
    if transposed_column_sums:  # only column sums, unpadded, bf16 statistics (see attention_route)
        return output.transpose(1, 2), AttentionStats(colsum=_column_sums_by_transposed_flash(query, keys, lse,
                                                                                              scaling))
    stats = _column_stats_from_lse(query, keys, lse, full_mask, scaling, needs, window, query_valid)
    return output.transpose(1, 2), stats


def _flash_output_and_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padded: bool, block_mask: Any, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PyTorch's CPU flash attention: ``[B, Hq, q, D]`` output, ``[B, Hq, q]`` log-sum-exp, and the full
    ``[B|1, H|1, q, L]`` bool mask when anything is padded (None otherwise)."""
    _, num_q_heads, q_len, _ = query.shape
    heads, length = keys.shape[1], keys.shape[2]
    group = num_q_heads // heads
    past = length - q_len
    repeated_keys = keys.repeat_interleave(group, dim=1) if group > 1 else keys
    repeated_values = values.repeat_interleave(group, dim=1) if group > 1 else values
    full_mask = None
    if padded:
        full_mask = block_mask(0, q_len)  # [B or 1, H or 1, q, L] bool
        bias = torch.zeros(full_mask.shape, dtype=query.dtype).masked_fill_(~full_mask, float("-inf"))
        if bias.shape[1] > 1:
            bias = bias.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(bias.shape[0], num_q_heads, q_len, length)
        is_causal = False
    elif past == 0:
        bias, is_causal = None, True
    else:
        bias = torch.zeros((1, 1, q_len, length), dtype=query.dtype, device=query.device)
        bias[..., past:].masked_fill_(_upper_triangle(q_len, query.device), float("-inf"))
        is_causal = False
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, repeated_keys, repeated_values, 0.0, is_causal, attn_mask=bias, scale=scaling
    )
    return output, lse, full_mask


def _column_stats_from_lse(
    query: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, full_mask: torch.Tensor | None, scaling: float,
    needs: set[str], window: int, query_valid: torch.Tensor | None,
) -> AttentionStats:
    """The statistics, with the weights recomputed block by block as ``exp(q.k * scale - lse)`` (see
    :func:`_flash_attention_with_column_stats`); ``full_mask`` None means causal and unpadded."""
    batch, num_q_heads, q_len, _ = query.shape
    heads, length = keys.shape[1], keys.shape[2]
    group = num_q_heads // heads
    past = length - q_len
    padded = full_mask is not None
    stats = AttentionStats()
    low_precision = _use_bf16_stats(num_q_heads * min(q_len, QUERY_BLOCK) * length)
    colsum = torch.zeros(batch, heads, length, dtype=torch.float32, device=query.device)
    below = torch.zeros_like(colsum) if STAT_BELOW_MEAN in needs else None
    seen_by = torch.zeros_like(colsum) if STAT_BELOW_MEAN in needs else None
    window_parts = []
    if low_precision:
        lse_high, lse_low = _bf16_high_low(lse)
        ones = keys.new_ones((batch, heads, length, 2), dtype=torch.bfloat16)
        keys_for_stats = torch.cat((keys.to(torch.bfloat16), ones), dim=-1)  # [B, H, L, D + 2]
    else:
        keys_for_stats = keys
    for start in range(0, q_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, q_len)
        rows, visible_keys = stop - start, past + stop
        block_lse = lse[:, :, start:stop]  # [B, Hq, rows]
        scaled_q = query[:, :, start:stop] * scaling
        if low_precision:
            scaled_q = torch.cat(
                (scaled_q.to(torch.bfloat16), -lse_high[:, :, start:stop, None], -lse_low[:, :, start:stop, None]),
                dim=-1,
            )
        grouped_q = scaled_q.reshape(batch, heads, group * rows, scaled_q.shape[-1])
        weights = torch.matmul(grouped_q, keys_for_stats[:, :, :visible_keys].transpose(-1, -2))
        weights = weights.view(batch, heads, group, rows, visible_keys)
        if not low_precision:
            weights.sub_(block_lse.view(batch, heads, group, rows, 1))
        weights.exp_()
        if padded:
            mask = full_mask[:, :, start:stop, :visible_keys].unsqueeze(2)  # [B|1, H|1, 1, rows, keys]
            if query_valid is not None:  # padding queries contribute nothing
                mask = mask & query_valid[:, start:stop].view(batch, 1, 1, rows, 1)
            weights.masked_fill_(~mask, 0.0)
            visible = mask.expand_as(weights)
            count = visible.sum(dim=-1, keepdim=True).clamp(min=1)
        else:  # only the diagonal part of the block is masked (causal)
            weights[..., past + start :].masked_fill_(_upper_triangle(rows, query.device), 0.0)
            visible = None
            count = (past + start + 1 + torch.arange(rows, device=query.device)).view(1, 1, 1, rows, 1)
        if low_precision:  # column sums as a bf16 product with a ones row: one read, fp32 accumulation inside
            ones_row = weights.new_ones((batch, heads, 1, group * rows))
            colsum[:, :, :visible_keys] += torch.matmul(
                ones_row, weights.view(batch, heads, group * rows, visible_keys)
            ).view(batch, heads, visible_keys)
        else:
            colsum[:, :, :visible_keys] += weights.sum(dim=(2, 3))
        if below is not None:
            under = weights < (1.0 / count).to(weights.dtype)
            if visible is None:
                under[..., past + start :].masked_fill_(_upper_triangle(rows, query.device), False)
                seen = torch.arange(rows, 0, -1, device=query.device).clamp(max=rows)
                seen_counts = torch.full((visible_keys,), float(rows), device=query.device)
                seen_counts[past + start :] = seen.float()
                seen_by[:, :, :visible_keys] += seen_counts * group
            else:
                under &= visible
                seen_by[:, :, :visible_keys] += visible.sum(dim=(2, 3)).float()
            below[:, :, :visible_keys] += under.sum(dim=(2, 3)).float()
        if STAT_WINDOW in needs and stop > q_len - window:
            part = weights.reshape(batch, num_q_heads, rows, visible_keys)[:, :, max(start, q_len - window) - start :]
            window_parts.append(F.pad(part.float(), (0, length - visible_keys)))
        if STAT_LAST in needs and stop == q_len:
            stats.last = weights.reshape(batch, num_q_heads, rows, visible_keys)[:, :, -1].float()
    stats.colsum, stats.below_mean, stats.queries_seen = colsum, below, seen_by
    if window_parts:
        stats.window = torch.cat(window_parts, dim=2)
    return stats


def _column_sums_by_transposed_flash(
    query: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Causal column sums of the softmax weights, ``[B, H, L]``, with one fused bf16 flash-attention call.

    The attention an entry ``j`` receives is ``sum_i exp(s * q_i.k_j - lse_i)``: the normaliser of a
    softmax in which ``k_j`` is the query and the ``q_i`` are the keys, with ``-lse_i`` folded into them
    as two extra bf16 columns (high and low parts, met by two columns of ones on the key side). The
    flash kernel returns that normaliser's log as its log-sum-exp, so no weight is ever materialised.
    Reversing both axes turns "query ``i`` sees entry ``j`` iff ``j <= past + i``" into the kernel's
    top-left causal mask. Inputs are rounded to bf16 (as in fp16/bf16 GPU runs of H2O); the sums are
    accumulated in fp32 inside the kernel.

    Parameters
    ----------
    query:
        ``[B, Hq, q, D]`` queries of the chunk (the last ``q`` of the ``L`` entries are the chunk itself).
    keys:
        ``[B, H, L, D]``.
    lse:
        ``[B, Hq, q]`` float32 log-sum-exp of each query's attention (from the forward's flash call).
    """
    batch, num_q_heads = query.shape[:2]
    heads, length = keys.shape[1], keys.shape[2]
    group = num_q_heads // heads
    lse_high, lse_low = _bf16_high_low(lse)
    ones = keys.new_ones((batch, heads, length, 2))
    entry_side = torch.cat((keys * scaling, ones), dim=-1).to(torch.bfloat16).flip(2)  # [B, H, L, D + 2]
    entry_side = entry_side.repeat_interleave(group, dim=1) if group > 1 else entry_side
    query_side = torch.cat(
        (query.to(torch.bfloat16), -lse_high.unsqueeze(-1), -lse_low.unsqueeze(-1)), dim=-1
    ).flip(2)  # [B, Hq, q, D + 2]
    unused_values = query_side.new_zeros(query_side.shape)
    _, entry_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        entry_side, query_side, unused_values, 0.0, True, scale=1.0
    )  # [B, Hq, L] float32
    return entry_lse.flip(2).exp_().view(batch, heads, group, length).sum(dim=2)


def _bf16_high_low(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split float32 ``x`` into two bf16 tensors whose sum carries about 16 significant bits of ``x``."""
    high = x.to(torch.bfloat16)
    return high, (x - high.float()).to(torch.bfloat16)


@functools.lru_cache(maxsize=16)
def _upper_triangle_cpu(size: int) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool).triu(1)


def _upper_triangle(size: int, device: torch.device) -> torch.Tensor:
    """``[size, size]`` bool, True strictly above the diagonal (the future a causal query cannot see)."""
    mask = _upper_triangle_cpu(size)
    return mask if mask.device == torch.device(device) else mask.to(device)


def _weights(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Softmax weights ``[B, Hq, rows, L]`` (float32) of ``[B, Hq, rows, D]`` queries over ``[B, H, L, D]`` keys."""
    batch, num_q_heads, rows, head_dim = query.shape
    heads = keys.shape[1]
    group = num_q_heads // heads
    grouped = query.reshape(batch, heads, group * rows, head_dim)
    logits = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scaling  # [B, H, G*rows, L]
    logits = logits.view(batch, heads, group, rows, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(2), float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return weights.view(batch, num_q_heads, rows, -1)
