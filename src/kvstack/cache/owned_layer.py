"""The base of the cache layers kvstack drives besides :class:`~kvstack.cache.layer.KVStackLayer`.

Linked layers (:mod:`kvstack.cache.cross_layer`) and tiered layers (:mod:`kvstack.cache.page_tier`) store
differently, but take a chunk, count tokens, mask and hand themselves to the attention function the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin

from kvstack.cache.layer import WeakOwner, chunk_masks

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache

__all__ = ["OwnedLayer"]


class OwnedLayer(CacheLayerMixin):
    """A cache layer owned by a :class:`KVStackCache`: the transformers interface and the token bookkeeping.

    Subclasses store the chunk (``_take_chunk``) and answer ``attend`` and the byte counts.
    """

    owner: WeakOwner[KVStackCache] = WeakOwner()
    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: KVStackCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.seen = 0  # tokens given, padding included
        self.pending = False  # update ran, attention not yet
        self.has_padding = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        """Take the new chunk ``[B, H, q, D]`` (what is kept of it is the subclass's); attention runs next."""
        from kvstack.cache.pending import set_pending

        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError("kvstack cache used without the kvstack attention function; create caches with "
                               "kvstack.make_cache(model, spec), which selects it")
        self.pending = True
        self.seen += key_states.shape[2]
        self._take_chunk(key_states, value_states)
        set_pending(self)
        return key_states, value_states

    def _take_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Hold what the subclass needs of the chunk until its attention."""

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Mask of the new chunk only, as :class:`KVStackLayer` (past entries are masked by their positions)."""
        return query_length, self.seen - (query_length if self.pending else 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by kvstack caches")

    def shrink_to_fit(self) -> None:
        """Nothing grows with slack here unless the subclass says so."""

    def holds_every_token(self) -> bool:
        """False: such a layer's entries are not dense resident slots a shared prompt attention could use."""
        return False

    def tier_bytes(self) -> int:
        """Bytes in a slower tier (none unless the subclass keeps one)."""
        return 0

    def full_kv_bytes(self) -> int:
        """What an uncompressed cache of the same tokens would hold in this layer (keys + values)."""
        if not self.is_initialized:
            return 0
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.seen * self.batch * self.heads * self.head_dim * 2 * element

    def start_attention(self, query: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None, shared: Any) -> tuple:
        """``(causal, valid, positions)`` of this forward's chunk: transformers' mask split as
        :func:`chunk_masks` does, and the chunk's ``[B, q]`` int32 true positions (``-1`` for padding)."""
        if shared is not None:
            raise RuntimeError(f"layer {self.layer_idx} ({type(self).__name__}) cannot take a shared prompt attention")
        if not self.pending:
            raise RuntimeError(f"layer {self.layer_idx}: attention without an update")
        self.pending = False
        batch, _, q_len, _ = query.shape
        causal, valid = chunk_masks(attention_mask, batch, q_len, query.device)
        if position_ids is None:
            position_ids = torch.arange(self.seen - q_len, self.seen, device=query.device).unsqueeze(0)
        positions = position_ids.to(torch.int32).expand(batch, -1)
        if valid is not None:
            positions = positions.masked_fill(~valid, -1)
            if not bool(valid.all()):
                self.has_padding = True
        return causal, valid, positions
