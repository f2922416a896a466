"""Layers that store their entries through another layer's store (cross-layer policies).

Two kinds, by :class:`~kvstack.contract.LayerLink`:

* :class:`ReusingLayer` (``reuse``; KVSharer, CLA): the layer's own keys and values are computed by the
  model but never stored; its attention reads the entries of a layer below it, which already holds this
  forward's chunk and waits for its readers before it evicts or encodes anything. It holds zero bytes.
* :class:`MagnitudeLayer` (``magnitude``; MiniCache): the lower layer of an adjacent pair. The upper layer
  (an ordinary :class:`~kvstack.cache.layer.KVStackLayer`, codec and all) stores one row per token that the
  pair shares; this layer stores one scale per token (``[B, H, P]`` by true position), the rows the policy
  retains unmerged (``[N, D]`` with their ``(sequence * H + head, position)`` index) and the policy's
  per-pair cutoff. Its attention rebuilds its entries as ``scale * shared`` (retained rows exact) in a
  transient copy, and reads this forward's chunk exactly; the upper layer merges the chunk into the pair
  after its own attention (:meth:`MagnitudeLayer.absorb`), before anything is encoded.

A magnitude pair keeps every token (MiniCache evicts nothing); a reused layer holds whatever its own method
and codec keep, and its readers read exactly that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kvstack.cache.attention_stats import attention_with_stats
from kvstack.cache.capacity import growth_slack
from kvstack.cache.owned_layer import OwnedLayer

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache
    from kvstack.cache.layer import KVStackLayer

__all__ = ["LinkedLayer", "MagnitudeLayer", "ReusingLayer"]

ROWS = ("keys", "values")


class LinkedLayer(OwnedLayer):
    """What both linked kinds share: the layer whose store this one reads."""

    def __init__(self, owner: KVStackCache, layer_idx: int, source: int) -> None:
        super().__init__(owner, layer_idx)
        self.source = source  # the layer whose store this one reads

    def source_layer(self) -> KVStackLayer:
        return self.owner.layers[self.source]

    def reset(self) -> None:
        self.__init__(self.owner, self.layer_idx, self.source)  # type: ignore[misc]

    def kept_entries(self) -> int:
        """Entries this layer's attention reads (its source's), summed over sequences and KV heads."""
        if not self.is_initialized:
            return 0
        source = self.source_layer()
        return source.kept_entries() if source.is_initialized else 0


class ReusingLayer(LinkedLayer):
    """A layer that attends over a lower layer's entries (this forward's chunk included) and stores nothing.

    The source may hold its entries any way a method and codec leave them (evicted, merged, encoded, per head):
    it holds back its own eviction and flush in each forward until its readers have attended to the entries
    its own attention read (:meth:`~kvstack.cache.layer.KVStackLayer.read_for`).
    """

    def kv_bytes(self) -> int:
        """Zero: the layer's keys and values are never stored."""
        return 0

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
               scaling: float, shared: Any = None) -> torch.Tensor:
        """``[B, Hq, q, D]`` queries over the source's entries; returns ``[B, q, Hq, D]``."""
        causal, valid, _ = self.start_attention(query, attention_mask, position_ids, shared)
        source = self.source_layer()
        if source.seen != self.seen:
            raise RuntimeError(f"layer {self.layer_idx} reuses layer {self.source}, which has seen {source.seen} "
                               f"tokens to this layer's {self.seen}")
        return source.read_for(query, causal, valid, scaling)


class MagnitudeLayer(LinkedLayer):
    """The lower layer of a merged pair: per-token scales over the upper layer's shared rows (see the module)."""

    def __init__(self, owner: KVStackCache, layer_idx: int, source: int) -> None:
        super().__init__(owner, layer_idx, source)
        self.chunk: tuple[torch.Tensor, torch.Tensor] | None = None  # exact rows awaiting the upper layer's merge
        self.chunk_positions: torch.Tensor | None = None  # [B, q]
        self.scales: dict[str, torch.Tensor] = {}  # name -> [B, H, capacity] by true position
        self.positions_held = 0  # true positions 0 .. positions_held - 1 have a scale
        self.retained_rows: dict[str, torch.Tensor] = {}  # name -> [N, D]
        self.retained_index: dict[str, torch.Tensor] = {}  # name -> [N, 2] int32 (sequence * H + head, position)
        self.cutoffs: dict[str, torch.Tensor] = {}  # name -> [B, H] float32, the policy's per-pair state

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        for name in ROWS:
            self.scales[name] = key_states.new_empty((self.batch, self.heads, 0))
            self.retained_rows[name] = key_states.new_empty((0, self.head_dim))
            self.retained_index[name] = torch.empty((0, 2), dtype=torch.int32, device=self.device)

    def _take_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.chunk = (key_states, value_states)

    def kv_bytes(self) -> int:
        """Bytes held: the scales, the retained rows and their index, the cutoffs (the chunk awaiting its
        merge too, between this layer's attention and the upper layer's)."""
        if not self.is_initialized:
            return 0
        tensors = [*self.scales.values(), *self.retained_rows.values(), *self.retained_index.values(),
                   *self.cutoffs.values()]
        if self.chunk is not None:
            tensors.extend(self.chunk)
        return sum(t.nbytes for t in tensors)

    def shrink_to_fit(self) -> None:
        for name, tensor in self.scales.items():
            if tensor.shape[-1] > self.positions_held + growth_slack(self.positions_held) + 1:
                self.scales[name] = tensor[:, :, : self.positions_held].clone()

    # ------------------------------------------------------------------ attention
    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
               scaling: float, shared: Any = None) -> torch.Tensor:
        """``[B, Hq, q, D]`` queries over the rebuilt past entries and the exact chunk; returns ``[B, q, Hq, D]``."""
        causal, valid, positions = self.start_attention(query, attention_mask, position_ids, shared)
        assert self.chunk is not None
        self.chunk_positions = positions
        past_keys, past_values, past_positions = self.rebuilt()
        keys = torch.cat((past_keys, self.chunk[0]), dim=2)
        values = torch.cat((past_values, self.chunk[1]), dim=2)
        past_valid = (past_positions >= 0) if self.has_padding else None
        output, _ = attention_with_stats(query, keys, values, causal, past_valid, scaling, set(), 0,
                                         query_valid=valid)
        return output

    def rebuilt(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This layer's past entries, rebuilt from the upper layer's store: keys and values ``[B, H, N, D]``
        (a transient copy) and their positions ``[B, H, N]``, in the upper layer's order."""
        upper = self.source_layer()
        if not upper.is_initialized or upper.encoded_entries() + upper.length == 0:
            empty = self.chunk[0].new_empty((self.batch, self.heads, 0, self.head_dim))
            return empty, empty.clone(), torch.empty((self.batch, self.heads, 0), dtype=torch.int32)
        keys, values = upper.dense_entries()
        positions = upper._all_positions()
        index = positions.clamp(min=0).long()
        slot_of: torch.Tensor | None = None
        rebuilt = []
        for name, rows in zip(ROWS, (keys, values), strict=True):
            scale = self.scales[name].gather(2, index).to(rows.dtype)
            rows = rows * scale.unsqueeze(-1)
            if self.retained_rows[name].shape[0]:
                if slot_of is None:
                    slot_of = self._slot_of_position(positions)
                where = self.retained_index[name].long()
                slots = slot_of[where[:, 0], where[:, 1]]
                rows.view(-1, rows.shape[2], self.head_dim)[where[:, 0], slots] = self.retained_rows[name]
            rebuilt.append(rows)
        return rebuilt[0], rebuilt[1], positions

    def _slot_of_position(self, positions: torch.Tensor) -> torch.Tensor:
        """``[B * H, P]`` the slot of each true position in ``positions`` ``[B, H, N]`` (``-1``: none)."""
        flat = positions.reshape(-1, positions.shape[-1]).long()
        slot_of = torch.full((flat.shape[0], self.positions_held), -1, dtype=torch.long, device=flat.device)
        row, slot = (flat >= 0).nonzero(as_tuple=True)
        slot_of[row, flat[row, slot]] = slot
        return slot_of

    # ------------------------------------------------------------------ the pair's merge
    def absorb(self, upper_keys: torch.Tensor, upper_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge this forward's chunk with the upper layer's (``[B, H, q, D]`` each, after its attention).

        Stores this layer's scales and retained rows; returns what the upper layer stores for the chunk.
        """
        if self.chunk is None or self.chunk_positions is None:
            raise RuntimeError(f"layer {self.layer_idx + 1} merges with layer {self.layer_idx}, which has no chunk")
        positions = self.chunk_positions.unsqueeze(1).expand(-1, self.heads, -1)  # [B, H, q]
        valid = positions >= 0
        self._grow(int(positions.max()) + 1)
        method = self.owner.method
        shared = []
        seq, head, token = valid.nonzero(as_tuple=True)  # the chunk's real tokens, the same for keys and values
        where = positions[seq, head, token].long()
        for name, lower, upper in zip(ROWS, self.chunk, (upper_keys, upper_values), strict=True):
            merged = method.merge_layer_pair(lower, upper, valid, self.cutoffs.get(name))
            self.cutoffs[name] = merged.cutoff.float()
            self.scales[name][seq, head, where] = merged.scale[seq, head, token].to(self.scales[name].dtype)
            kept_seq, kept_head, kept_token = (merged.retained & valid).nonzero(as_tuple=True)
            if kept_seq.numel():
                index = torch.stack((kept_seq * self.heads + kept_head,
                                     positions[kept_seq, kept_head, kept_token].long()), dim=1)
                self.retained_index[name] = torch.cat((self.retained_index[name], index.to(torch.int32)))
                self.retained_rows[name] = torch.cat((self.retained_rows[name], lower[kept_seq, kept_head, kept_token]))
            shared.append(merged.shared)
        self.chunk = self.chunk_positions = None
        return shared[0], shared[1]

    def _grow(self, needed: int) -> None:
        """Room for scales at true positions ``0 .. needed - 1``."""
        if needed > self.scales["keys"].shape[-1]:
            capacity = needed + growth_slack(needed)
            for name, tensor in self.scales.items():
                grown = tensor.new_ones((self.batch, self.heads, capacity))
                grown[:, :, : tensor.shape[-1]] = tensor
                self.scales[name] = grown
        self.positions_held = max(self.positions_held, needed)
