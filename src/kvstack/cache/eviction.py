"""Eviction inside one layer: the view a method scores, and the moves that free memory.

A mixin of :class:`kvstack.cache.layer.KVStackLayer`: evicted entries leave memory, either by moving a kept
entry into the freed slot or by gathering the kept entries into new, smaller tensors (or per-head tensors
for head-wise budgets).
"""

from __future__ import annotations

import functools

import torch

from kvstack.cache.capacity import growth_slack
from kvstack.cache.quantized import QuantizedRegion
from kvstack.cache.ragged import RaggedHeads
from kvstack.cache.rope import rope_shift
from kvstack.contract import AttentionStats, LayerView, Policy


class LayerEviction:
    """Scoring views and eviction moves of :class:`~kvstack.cache.layer.KVStackLayer`."""

    def _view(self, stats: AttentionStats, budget: int) -> LayerView:
        live = self.length
        encoded = self.encoded_entries()
        if encoded:
            region = self.region
            state = {name: torch.cat((region.state[name][:, :, :encoded], t[:, :, :live]), dim=-1)
                     for name, t in self.state.items()}
        else:
            state = {name: t[:, :, :live] for name, t in self.state.items()}
        return LayerView(
            kv_source=functools.partial(self.dense_entries, live),  # the slots live now, read when asked
            positions=self._all_positions(),
            next_position=self.next_position,
            state=state,
            stats=stats,
            layer_idx=self.layer_idx,
            num_layers=self.owner.num_layers,
            generator=self.owner.generator,
            group_size=self.owner.group_size,
            budget=budget,
            layer_state=self.layer_state,
        )

    def _cache_position_view(self, keys: torch.Tensor, query: torch.Tensor, q_len: int) -> tuple:
        """Re-assign RoPE positions by cache slot order (StreamingLLM's in-cache positions)."""
        inv_freq = self.owner.rope_inv_freq
        key_shift, query_shift = self._cache_position_shifts(self.positions[:, :, : self.length], q_len)
        keys = rope_shift(keys, key_shift, inv_freq)
        query = rope_shift(query, query_shift.expand(-1, query.shape[1], -1), inv_freq)
        return keys, query

    @staticmethod
    def _cache_position_shifts(positions: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE shifts that move entries to their slot order (StreamingLLM's in-cache positions).

        Parameters
        ----------
        positions:
            ``[B, H, N]`` true positions of every kept entry; the new chunk's ``q_len`` entries are last.

        Returns
        -------
        tuple
            ``[B, H, N]`` shift of each entry (its rank by true position minus that position) and
            ``[B, 1, q]`` shift of each new query (the chunk's ranks minus its positions, equal on all heads).
        """
        positions = positions.long()
        rank = positions.argsort(dim=-1).argsort(dim=-1)  # slot order by true position
        shift = rank - positions
        return shift, shift[:, :1, -q_len:]

    def _compress(self, stats: AttentionStats) -> None:
        """Evict down to this layer's budget (the caller decided it is due)."""
        method = self.owner.method
        context = self.owner.context_length or self.seen
        budget = self.owner.layer_budget(self.layer_idx, context)
        self.budget = budget
        self.compressed = True
        encoded = self.encoded_entries()
        if budget is None or (encoded + self.length <= budget and not method.headwise):
            return
        view = self._view(stats, budget=budget)
        scores = method.score(view).float()
        protect = method.protect(view)
        if protect is not None:
            scores = scores.masked_fill(protect, float("inf"))
        scores = scores.masked_fill(view.positions < 0, float("-inf"))
        if method.headwise:
            self._to_ragged(scores, budget, method)
            return
        if method.merges:
            self._merge_and_evict(stats, scores, budget)
            return
        drop = encoded + self.length - budget
        if encoded and drop == 1:
            self._replace_encoded(scores.argmin(dim=-1))
            return
        if encoded:
            self._unflush()
        if drop == 1:
            evicted = scores.argmin(dim=-1)  # [B, H]
            if self.demoted is not None:
                self._demote(evicted.unsqueeze(-1))
            self._replace_slot(evicted)
        else:
            keep = scores.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values
            if self.demoted is not None:
                dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, keep, False)
                slots = torch.arange(dropped.shape[-1], device=keep.device).expand_as(dropped)
                self._demote(slots[dropped].view(*keep.shape[:2], -1))
            self._gather(keep)

    def _merge_and_evict(self, stats: AttentionStats, scores: torch.Tensor, budget: int) -> None:
        """Let the merging policy fold the entries to evict into those kept (:meth:`Policy.merge`), then evict.

        Merging rewrites kept entries, so a codec's encoded entries are first decoded back into full-precision
        slots (its next flush encodes them again); the policy sees every entry in full precision.
        """
        if self.encoded_entries():
            self._unflush()
        view = self._view(stats, budget=budget)
        live = self.length
        keep = scores.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values  # [B, H, K]
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, keep, False)
        slots = torch.arange(live, device=keep.device).expand_as(dropped)
        evicted = slots[dropped].view(*keep.shape[:2], -1)  # [B, H, E], ascending
        update = self.owner.method.merge(view, evicted)
        if update.keys is not None:
            self.keys[:, :, :live] = update.keys
        if update.values is not None:
            self.values[:, :, :live] = update.values
        for name, tensor in update.state.items():
            self.state[name][:, :, :live] = tensor
        self.merged = True
        if evicted.shape[-1] == 1:
            self._replace_slot(evicted[..., 0])
        else:
            self._gather(keep)

    def _replace_slot(self, evicted: torch.Tensor) -> None:
        """Evict one entry per head (``evicted`` ``[B, H]`` slot indices) by moving the last slot into it."""
        last = self.length - 1
        index = evicted.unsqueeze(-1)  # [B, H, 1]
        for tensor in (self.keys, self.values):
            src = tensor[:, :, last : last + 1]
            tensor.scatter_(2, index.unsqueeze(-1).expand(-1, -1, 1, tensor.shape[-1]), src.clone())
        for tensor in (self.positions, *self.state.values()):
            tensor.scatter_(2, index, tensor[:, :, last : last + 1].clone())
        self.length = last

    def _gather(self, keep: torch.Tensor, capacity: int | None = None) -> None:
        """Keep only the slots ``keep`` ``[B, H, n]`` (sorted), in new tensors; the old ones are freed."""
        kept = keep.shape[-1]
        capacity = capacity or kept + growth_slack(kept)

        def take(tensor: torch.Tensor) -> torch.Tensor:
            live = tensor[:, :, : self.length]
            index = keep if tensor.dim() == 3 else keep.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1])
            new = tensor.new_empty((*tensor.shape[:2], capacity, *tensor.shape[3:]))
            new[:, :, :kept] = live.gather(2, index)
            return new

        self.keys, self.values = take(self.keys), take(self.values)
        self.positions = take(self.positions)
        self.state = {name: take(t) for name, t in self.state.items()}
        self.capacity = capacity
        self.length = kept

    def _to_ragged(self, scores: torch.Tensor, budget: int, method: Policy) -> None:
        """Head-wise allocation: per sequence, ``method.allocate_heads`` shares ``H * budget`` entries among heads."""
        if self.encoded_entries():  # decode what the codec holds; the scores cover [encoded | slots] in order
            self._unflush()
        codec = self.owner.codec
        head_region = None
        if codec is not None:
            def head_region() -> QuantizedRegion:
                return QuantizedRegion(
                    codec, 1, 1, self.head_dim, self.dtype, self.device, per_head_positions=True,
                    rope_inv_freq=self.owner.rope_inv_freq, layer_idx=self.layer_idx,
                    calibration=self.owner.calibration,
                )
        ragged = RaggedHeads(self.batch, self.heads, self.head_dim, self.keys.dtype, self.keys.device, head_region)
        live = self.length
        for b in range(self.batch):
            keep = method.allocate_heads(scores[b], budget)  # [H, L]
            extra = method.compensate_heads(self.keys[b, :, :live], self.values[b, :, :live],
                                            self.positions[b, :, :live], keep)
            if extra is not None and codec is not None:
                raise ValueError(f"{method.label()} folds dropped entries into one per head, which a codec would "
                                 "encode away; use it without a codec")
            for h in range(self.heads):
                index = keep[h].nonzero().squeeze(-1)
                keys, values = self.keys[b, h, :live][index], self.values[b, h, :live][index]
                positions = self.positions[b, h, :live][index]
                log_mass = None
                if extra is not None and bool(extra.present[h]):  # the merged entry goes in by its position
                    slot = int((positions < extra.positions[h]).sum())
                    keys = _insert_row(keys, slot, extra.keys[h : h + 1])
                    values = _insert_row(values, slot, extra.values[h : h + 1])
                    positions = _insert_row(positions, slot, extra.positions[h : h + 1])
                    log_mass = torch.zeros(positions.shape[0], dtype=torch.float32, device=keys.device)
                    log_mass[slot] = extra.log_mass[h]
                ragged.set_head(b, h, keys, values, positions, log_mass)
        self.ragged = ragged
        self.keys = self.keys.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.values = self.values.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.positions = self.positions.new_empty((self.batch, self.heads, 0))
        self.state = {}
        self.length = 0
        self.capacity = 0


def _insert_row(rows: torch.Tensor, slot: int, row: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[n, ...]`` with ``row`` ``[1, ...]`` (cast to their dtype) placed at index ``slot``."""
    return torch.cat((rows[:slot], row.to(rows.dtype), rows[slot:]))
