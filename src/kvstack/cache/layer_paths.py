"""The attention paths of a layer that holds more than plain full-precision slots.

Encoded entries (a codec's region), demoted entries (kept at low precision instead of evicted) and
approximate-score attention (each query attends only to its top entries): a mixin of
:class:`kvstack.cache.layer.KVStackLayer`, which owns the storage these methods read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvstack.cache.blockwise import blockwise_attention
from kvstack.cache.quantized import QuantizedRegion
from kvstack.cache.rope import rope_shift
from kvstack.contract import AttentionStats


class LayerAttentionPaths:
    """Attention over ``[encoded or demoted region | full-precision slots]``, and approximate-score attention."""

    # ---------------------------------------------------------------- approximate-score attention (Loki)
    def _fit_key_basis(self) -> None:
        """Ask the method for its key basis (fitted to the prompt's keys) and store the keys rotated into it."""
        valid = (self.positions[:, :, : self.length] >= 0) if self.has_padding else None
        basis = self.owner.method.key_basis(self.keys[:, :, : self.length], valid)
        self.key_basis = basis.to(self.keys.dtype)  # [B, H, D, D]
        self.keys[:, :, : self.length] = self.keys[:, :, : self.length] @ self.key_basis

    def _rotate_new_keys(self, q_len: int) -> None:
        new = slice(self.length - q_len, self.length)
        self.keys[:, :, new] = self.keys[:, :, new] @ self.key_basis

    def _attend_low_rank_scored(
        self, query: torch.Tensor, causal: torch.Tensor | None, q_len: int, scaling: float
    ) -> torch.Tensor:
        """Each query attends exactly to its top entries by scores over the leading ``rank`` key-basis coordinates."""
        if self.encoded_entries():
            return self._attend_low_rank_scored_encoded(query, causal, q_len, scaling)
        method = self.owner.method
        batch, num_q_heads, _, head_dim = query.shape
        group = num_q_heads // self.heads
        basis = self.key_basis.repeat_interleave(group, dim=1) if group > 1 else self.key_basis
        rotated = query @ basis  # [B, Hq, q, D]: q P . k P = q . k
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        visible = self._tail_mask(causal, q_len, query.device)  # [B|1, H|1, q, L] or None
        if self.has_padding and visible is None:
            visible = (self.positions[:, :, : self.length] >= 0).unsqueeze(2)
        rank = method.approximate_dims(head_dim)
        approx = (rotated[..., :rank].reshape(batch, self.heads, group * q_len, rank)
                  @ keys[..., :rank].transpose(-1, -2)).view(batch, self.heads, group, q_len, -1)
        if visible is not None:
            approx = approx.masked_fill(~visible.unsqueeze(2), float("-inf"))
        counts = self.length if visible is None else int(visible.sum(dim=-1).max())
        chosen = approx.topk(method.attended(counts), dim=-1).indices
        mask = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, chosen, True)
        if visible is not None:
            mask &= visible.unsqueeze(2)
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # a padding query attends to something
        output = F.scaled_dot_product_attention(
            rotated, keys, values, attn_mask=mask.view(batch, num_q_heads, q_len, -1), scale=scaling,
            enable_gqa=group > 1,
        )
        return output.transpose(1, 2)

    def _attend_low_rank_scored_encoded(
        self, query: torch.Tensor, causal: torch.Tensor | None, q_len: int, scaling: float
    ) -> torch.Tensor:
        """Approximate-score attention (Loki) over ``[encoded region | full-precision slots]``.

        The region holds keys in the model's basis (so every codec encodes what it was designed for);
        the slots hold them in the method's key basis ``P``. The low-rank score of an encoded key is
        ``(q P_r) . (k P_r) = (q P_r P_r^T) . k``: the query is projected instead of the keys, so the
        region is read with the same kernels (or one decoded block at a time) for both the approximate
        and the exact scores; then each query keeps its top entries and attends over them exactly.
        """
        region = self.region
        assert region is not None and self.key_basis is not None
        method = self.owner.method
        batch, num_q_heads, _, head_dim = query.shape
        group = num_q_heads // self.heads
        rank = method.approximate_dims(head_dim)
        grouped = query.float().reshape(batch, self.heads, group * q_len, head_dim)  # rows g * q + t
        rotated = grouped @ self.key_basis.float()  # [B, H, G*q, D] in the key basis
        projected = rotated[..., :rank] @ self.key_basis[..., :rank].float().transpose(-1, -2)
        encoded = region.length
        slot_keys = self.keys[:, :, : self.length].float()  # [B, H, L, D] in the key basis
        rows = group * q_len
        region_scores = region.scores(torch.cat((grouped * scaling, projected), dim=2))  # one pass over the codes
        exact = torch.cat((region_scores[:, :, :rows], rotated @ slot_keys.transpose(-1, -2) * scaling), dim=-1)
        approx = torch.cat((region_scores[:, :, rows:], rotated[..., :rank] @ slot_keys[..., :rank].transpose(-1, -2)),
                           dim=-1)  # both [B, H, G*q, N + L]
        exact = exact.view(batch, self.heads, group, q_len, -1)
        approx = approx.view(batch, self.heads, group, q_len, -1)
        visible = None  # [B|1, H|1, 1, q, N + L] bool, None: everything
        tail = self._tail_mask(causal, q_len, query.device)  # [B|1, H|1, q, L]; None only without padding
        if tail is not None:
            front = (region.live_positions() >= 0).unsqueeze(2) if self.has_padding else torch.ones(
                1, 1, 1, encoded, dtype=torch.bool, device=query.device)
            shape = torch.broadcast_shapes(front.shape[:2], tail.shape[:2])
            visible = torch.cat((front.expand(*shape, q_len, encoded), tail.expand(*shape, q_len, self.length)),
                                dim=-1).unsqueeze(2)
            approx = approx.masked_fill(~visible, float("-inf"))
        counts = encoded + self.length if visible is None else int(visible.sum(dim=-1).max())
        chosen = approx.topk(method.attended(counts), dim=-1).indices
        mask = torch.zeros_like(approx, dtype=torch.bool).scatter_(-1, chosen, True)
        if visible is not None:
            mask &= visible
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # a padding query attends to something
        weights = torch.softmax(exact.masked_fill(~mask, float("-inf")), dim=-1)
        weights = weights.view(batch, self.heads, group * q_len, -1)
        output = region.weighted_values(weights[..., :encoded]) + weights[..., encoded:] @ self.values[
            :, :, : self.length].float()
        return output.to(query.dtype).view(batch, num_q_heads, q_len, head_dim).transpose(1, 2)

    # ---------------------------------------------------------------- encoded entries (codecs)
    def _attend_encoded(
        self, query: torch.Tensor, causal: torch.Tensor | None, valid: torch.Tensor | None, q_len: int,
        scaling: float, needs: set[str], window: int,
    ) -> tuple[torch.Tensor, AttentionStats]:
        """Attention over ``[encoded region | full-precision slots]``, one decoded block at a time."""
        region = self.region
        assert region is not None
        cache_positions = self.owner.method.uses_cache_positions()
        if (q_len == 1 and not needs and not self.has_padding and causal is None and not cache_positions
                and self.log_mass_name() is None):
            output = region.attend_one(query, self.keys[:, :, : self.length], self.values[:, :, : self.length], scaling)
            return output, AttentionStats()
        return self._attend_region_then_slots(region, query, causal, valid, q_len, scaling, needs, window,
                                              cache_positions)

    def _attend_region_then_slots(
        self, region: QuantizedRegion, query: torch.Tensor, causal: torch.Tensor | None, valid: torch.Tensor | None,
        q_len: int, scaling: float, needs: set[str], window: int, cache_positions: bool = False,
    ) -> tuple[torch.Tensor, AttentionStats]:
        """Block-wise attention over ``[region's entries | full-precision slots]``, one decoded block at a time;
        the statistics cover both, region first.

        With ``cache_positions`` (StreamingLLM's ``positions='cache'``) each decoded block's keys and the
        query are re-rotated to the entries' slot order over ``[region | slots]``, as the uncoded path does.
        """
        region_valid = (region.live_positions() >= 0).unsqueeze(2) if self.has_padding else None  # [B, H, 1, N]
        tail_mask = self._tail_mask(causal, q_len, query.device)
        fp_keys, fp_values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        key_shift = None
        mass = self.log_mass_name()  # merged entries weigh as the tokens they stand for
        region_bias = region.state[mass] if mass is not None and mass in region.state else None
        slot_bias = self.state[mass][:, :, : self.length] if mass is not None else None
        if cache_positions:
            key_shift, query_shift = self._cache_position_shifts(self._all_positions(), q_len)
            inv_freq = self.owner.rope_inv_freq
            query = rope_shift(query, query_shift.expand(-1, query.shape[1], -1), inv_freq)
            fp_keys = rope_shift(fp_keys, key_shift[..., region.length :], inv_freq)

        def blocks():
            for block_start, block_stop in region.block_bounds():
                keys, values = region.decode(block_start, block_stop)
                if key_shift is not None:
                    keys = rope_shift(keys, key_shift[..., block_start:block_stop], self.owner.rope_inv_freq)
                yield (keys, values, None if region_valid is None else region_valid[..., block_start:block_stop],
                       None if region_bias is None else region_bias[:, :, block_start:block_stop])
            yield fp_keys, fp_values, tail_mask, slot_bias

        return blockwise_attention(query, blocks, scaling, needs, window, valid)

    def _attend_with_mass(
        self, query: torch.Tensor, causal: torch.Tensor | None, valid: torch.Tensor | None, q_len: int,
        scaling: float, needs: set[str], window: int,
    ) -> tuple[torch.Tensor, AttentionStats]:
        """Attention over the full-precision slots with ``log(mass)`` added to each entry's logit (merged entries
        weigh as the tokens they replaced); the statistics are those of the same weights."""
        bias = self.state[self.log_mass_name()][:, :, : self.length]
        mask = self._tail_mask(causal, q_len, query.device)
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]

        def blocks():
            yield keys, values, mask, bias

        return blockwise_attention(query, blocks, scaling, needs, window, valid)

    def _attend_demoted(
        self, query: torch.Tensor, causal: torch.Tensor | None, valid: torch.Tensor | None, q_len: int,
        scaling: float, needs: set[str], window: int,
    ) -> tuple[torch.Tensor, AttentionStats]:
        """Attention over ``[demoted low-precision entries | full-precision slots]`` (MiKV), block by block.

        The statistics returned cover the full-precision slots only: the method scores what it may still
        evict, and demoted entries are never promoted back.
        """
        demoted = self.demoted
        assert demoted is not None
        output, stats = self._attend_region_then_slots(demoted, query, causal, valid, q_len, scaling, needs, window)
        skip = demoted.length
        for field in ("window", "colsum", "below_mean", "queries_seen", "last"):
            value = getattr(stats, field)
            if value is not None:
                setattr(stats, field, value[..., skip:])
        return output, stats

    def _demote(self, index: torch.Tensor) -> None:
        """Encode the full-precision entries at slots ``index`` ``[B, H, n]`` into the demoted region (MiKV)."""
        assert self.demoted is not None
        expanded = index.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        self.demoted.append(
            self.keys[:, :, : self.length].gather(2, expanded),
            self.values[:, :, : self.length].gather(2, expanded),
            self.positions[:, :, : self.length].gather(2, index),
            {},
        )

    def _tail_mask(self, causal: torch.Tensor | None, q_len: int, device: torch.device) -> torch.Tensor | None:
        """``[B|1, H|1, q, length]`` bool: what each new query sees of the full-precision slots (None: all)."""
        past = self.length - q_len
        if causal is None and not self.has_padding and q_len == 1:
            return None
        batch = self.batch if (causal is not None or self.has_padding) else 1
        heads = self.heads if self.has_padding else 1
        if self.has_padding:
            past_part = (self.positions[:, :, :past] >= 0).unsqueeze(2)
        else:
            past_part = torch.ones(1, 1, 1, past, dtype=torch.bool, device=device)
        tail = causal if causal is not None else torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        tail = tail.view(-1, 1, q_len, q_len)
        return torch.cat(
            (past_part.expand(batch, heads, q_len, past), tail.expand(batch, heads, q_len, q_len)), dim=-1
        )
