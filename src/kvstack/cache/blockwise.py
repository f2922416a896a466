"""Attention over ``[encoded entries | full-precision tail]`` one decoded block at a time (online softmax).

Each block of an encoded region is decoded, used and dropped, so the transient full-precision data is one
block, never a whole layer. A second pass over the blocks, with the log-sum-exp of the first, yields the
statistics selection methods need (column sums, below-mean counts, the weights of trailing queries), so every
selection method composes with every codec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kvstack.contract import STAT_BELOW_MEAN, STAT_COLSUM, STAT_LAST, STAT_WINDOW, AttentionStats

# ---------------------------------------------------------------------------------- attention
# (keys, values, mask) or (keys, values, mask, logit bias): see blockwise_attention
Block = tuple[torch.Tensor, ...]


def blockwise_attention(
    query: torch.Tensor,
    blocks: Callable[[], Iterator[Block]],
    scaling: float,
    needs: set[str],
    window: int,
    query_valid: torch.Tensor | None,
    stats_blocks: Callable[[], Iterator[Block]] | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Grouped-query attention over a sequence of blocks with an online softmax.

    Parameters
    ----------
    query:
        ``[B, Hq, q, D]``.
    blocks:
        Called once per pass; yields ``(keys, values, mask)`` or ``(keys, values, mask, bias)`` per block:
        ``[B, H, n, D]`` keys and values, a ``[B|1, H|1, q|1, n]`` bool mask of what each query may see
        (None: everything) and a ``[B, H, n]`` float32 bias added to every query's logit of each entry
        (None: 0; the log of a merged entry's mass). Blocks are decoded lazily, so only one is in full
        precision at a time.
    needs, window:
        Statistics to collect (``STAT_*``) and the trailing queries of the ``window`` statistic.
    query_valid:
        ``[B, q]`` bool, False for padding queries (they contribute to no statistic).
    stats_blocks:
        The blocks the statistics are reported over, a subset of ``blocks`` in the same form (None: all of
        them); the weights are still normalised over every block.

    Returns
    -------
    tuple
        ``[B, q, Hq, D]`` output and the :class:`AttentionStats` over the concatenated (statistics) blocks.
    """
    output, grouped_q, lse, visible_count = _online_softmax_pass(query, blocks, scaling)
    stats = AttentionStats()
    if needs & {STAT_COLSUM, STAT_BELOW_MEAN, STAT_WINDOW, STAT_LAST}:
        stats = _statistics_pass(blocks if stats_blocks is None else stats_blocks, grouped_q, lse, visible_count,
                                 needs, window, query_valid)
    return output, stats


def _online_softmax_pass(
    query: torch.Tensor, blocks: Callable[[], Iterator[Block]], scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """First pass: the ``[B, q, Hq, D]`` output with an online softmax, plus what the second pass needs: the
    grouped scaled queries ``[B, H, G*q, D]``, the log-sum-exp ``[B, H, G, q, 1]`` and the visible entry
    counts ``[B, H, 1, q, 1]``."""
    if query.device.type == "cpu" and query.dtype == torch.float32 and query.shape[2] > 1:
        return _flash_merge_pass(query, blocks, scaling)
    batch, num_q_heads, q_len, head_dim = query.shape
    heads = None
    grouped_q = None
    running_max = running_sum = accumulator = visible_count = None
    for block in blocks():
        keys, values, mask = block[:3]
        bias = block[3] if len(block) > 3 else None
        if grouped_q is None:
            heads = keys.shape[1]
            group = num_q_heads // heads
            grouped_q = (query * scaling).reshape(batch, heads, group * q_len, head_dim)
            running_max = torch.full((batch, heads, group * q_len, 1), float("-inf"), device=query.device)
            running_sum = torch.zeros_like(running_max)
            accumulator = torch.zeros((batch, heads, group * q_len, head_dim), dtype=torch.float32, device=query.device)
            visible_count = torch.zeros((batch, heads, 1, q_len, 1), device=query.device)
        logits = torch.matmul(grouped_q, keys.transpose(-1, -2)).float()  # [B, H, G*q, n]
        if bias is not None:
            logits = logits + bias.unsqueeze(2)
        if mask is not None:
            view = logits.view(batch, heads, group, q_len, -1)
            view.masked_fill_(~mask.unsqueeze(2), float("-inf"))
            visible_count = visible_count + mask.sum(dim=-1, keepdim=True).unsqueeze(2)
        else:
            visible_count = visible_count + keys.shape[2]
        block_max = logits.amax(dim=-1, keepdim=True)
        new_max = torch.maximum(running_max, block_max)
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        weights = torch.exp(logits - safe_max)
        correction = torch.exp(running_max - safe_max)
        running_sum = running_sum * correction + weights.sum(dim=-1, keepdim=True)
        accumulator = accumulator * correction + torch.matmul(weights.to(values.dtype), values).float()
        running_max = new_max
    assert grouped_q is not None, "blockwise_attention needs at least one block"
    output = torch.where(running_sum > 0, accumulator / running_sum.clamp(min=1e-30), torch.zeros_like(accumulator))
    output = output.to(query.dtype).view(batch, num_q_heads, q_len, head_dim).transpose(1, 2)
    safe_max = torch.where(torch.isinf(running_max), torch.zeros_like(running_max), running_max)
    lse = (safe_max + running_sum.clamp(min=1e-30).log()).view(batch, heads, group, q_len, 1)
    return output, grouped_q, lse, visible_count


def _flash_merge_pass(
    query: torch.Tensor, blocks: Callable[[], Iterator[Block]], scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_online_softmax_pass` for float32 query chunks on the CPU: each block through PyTorch's CPU flash
    kernel, which returns its output and log-sum-exp, merged as ``out = sum_i exp(lse_i - lse) out_i`` with
    ``lse = logsumexp_i lse_i``. The same result, without materialising a block's ``[q, n]`` weights."""
    batch, num_q_heads, q_len, head_dim = query.shape
    output = lse = visible_count = None
    heads = group = 0
    for block in blocks():
        keys, values, mask = block[:3]
        bias = block[3] if len(block) > 3 else None
        heads = keys.shape[1]
        group = num_q_heads // heads
        if visible_count is None:
            visible_count = torch.zeros((batch, heads, 1, q_len, 1), device=query.device)
        additive = None
        if mask is not None:
            expanded = mask.repeat_interleave(group, dim=1) if mask.shape[1] > 1 else mask
            additive = torch.zeros(expanded.shape, dtype=query.dtype).masked_fill_(~expanded, float("-inf"))
            visible_count = visible_count + mask.sum(dim=-1, keepdim=True).unsqueeze(2)
        else:
            visible_count = visible_count + keys.shape[2]
        if bias is not None:
            logit_bias = bias.repeat_interleave(group, dim=1)[:, :, None, :].to(query.dtype)
            additive = logit_bias if additive is None else additive + logit_bias
        if group > 1:
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        block_out, block_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys.to(query.dtype), values.to(query.dtype), 0.0, False, attn_mask=additive, scale=scaling
        )  # [B, Hq, q, D], [B, Hq, q]
        if mask is not None:  # a row that sees nothing of the block: the kernel gives lse 0, it is -inf
            blind = ~mask.any(dim=-1)  # [B|1, H|1, q|1]
            blind = blind.repeat_interleave(group, dim=1) if blind.shape[1] > 1 else blind
            block_lse = block_lse.masked_fill(blind, float("-inf"))
        if output is None:
            output, lse = block_out.float(), block_lse
            continue
        merged = torch.logaddexp(lse, block_lse)
        safe = torch.where(torch.isinf(merged), torch.zeros_like(merged), merged)
        output = (output * torch.exp(lse - safe).unsqueeze(-1)
                  + block_out.float() * torch.exp(block_lse - safe).unsqueeze(-1))
        lse = merged
    assert output is not None and lse is not None and visible_count is not None, \
        "blockwise_attention needs at least one block"
    output = torch.where(torch.isinf(lse).unsqueeze(-1), torch.zeros_like(output), output)
    grouped_q = (query * scaling).reshape(batch, heads, group * q_len, head_dim)
    lse = lse.masked_fill(torch.isinf(lse), 0.0).view(batch, heads, group, q_len, 1)
    return output.to(query.dtype).transpose(1, 2), grouped_q, lse, visible_count


def _statistics_pass(
    blocks: Callable[[], Iterator[Block]], grouped_q: torch.Tensor, lse: torch.Tensor, visible_count: torch.Tensor,
    needs: set[str], window: int, query_valid: torch.Tensor | None,
) -> AttentionStats:
    """Second pass over the blocks: the weights ``exp(q.k - lse)`` block by block, reduced to the statistics."""
    batch, heads, group, q_len, _ = lse.shape
    num_q_heads = heads * group
    stats = AttentionStats()
    query_ok = None if query_valid is None else query_valid.view(batch, 1, 1, q_len, 1)
    colsums, belows, seens, window_parts, last_parts = [], [], [], [], []
    rows = min(window, q_len) if STAT_WINDOW in needs else 0
    for block in blocks():
        keys, mask = block[0], block[2]
        logits = torch.matmul(grouped_q, keys.transpose(-1, -2)).float().view(batch, heads, group, q_len, -1)
        if len(block) > 3 and block[3] is not None:
            logits = logits + block[3][:, :, None, None, :]
        weights = torch.exp(logits - lse)
        visible = None
        if mask is not None:
            visible = mask.unsqueeze(2).expand_as(weights)
            weights = weights.masked_fill(~visible, 0.0)
        if query_ok is not None:
            weights = weights * query_ok
            visible = query_ok.expand_as(weights) if visible is None else visible & query_ok
        if STAT_COLSUM in needs:
            colsums.append(weights.sum(dim=(2, 3)))
        if STAT_BELOW_MEAN in needs:
            under = weights < 1.0 / visible_count.clamp(min=1)
            if visible is not None:
                under &= visible
                seens.append(visible.sum(dim=(2, 3)).float())
            else:
                seens.append(torch.full(weights.shape[:2] + weights.shape[-1:], float(group * q_len)))
            belows.append(under.sum(dim=(2, 3)).float())
        if rows:
            window_parts.append(weights[:, :, :, q_len - rows :].reshape(batch, num_q_heads, rows, -1))
        if STAT_LAST in needs:
            last_parts.append(weights[:, :, :, -1].reshape(batch, num_q_heads, -1))
    if colsums:
        stats.colsum = torch.cat(colsums, dim=-1)
    if belows:
        stats.below_mean, stats.queries_seen = torch.cat(belows, dim=-1), torch.cat(seens, dim=-1)
    if window_parts:
        stats.window = torch.cat(window_parts, dim=-1)
    if last_parts:
        stats.last = torch.cat(last_parts, dim=-1)
    return stats
