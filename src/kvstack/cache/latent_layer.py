"""The store of a layer whose attention caches a latent instead of keys and values (MLA-style models).

A model converted by ``mla`` (:mod:`kvstack.transforms.latent`) hands its cache, per token, a rotary key of
``d`` dimensions per KV head (in the key slot, ``[B, H, q, d]``) and one latent of ``r`` numbers shared by the
KV heads (in the value slot, ``[B, 1, q, r]``), and rebuilds keys and values from everything the store
returns. :class:`LatentLayer` holds exactly those tensors, densely, every token; its bytes are theirs.

It does not hand itself to kvstack's attention function: the model's attention module attends over the
rebuilt keys and values itself, so the mask covers every cached token (as transformers' ``DynamicLayer``),
and no eviction or codec applies (``make_cache`` refuses them for such a model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kvstack.cache.owned_layer import OwnedLayer

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache

__all__ = ["LatentLayer"]


class LatentLayer(OwnedLayer):
    """Every token's rotary keys ``[B, H, N, d]`` and latents ``[B, 1, N, r]``, stored as given.

    Parameters
    ----------
    heads, head_dim:
        The KV heads and head dimension the rebuilt keys and values have: what an uncompressed cache of the
        same tokens would hold (:meth:`full_kv_bytes`) and how entries are counted.
    """

    def __init__(self, owner: KVStackCache, layer_idx: int, heads: int, head_dim: int) -> None:
        super().__init__(owner, layer_idx)
        self.kv_heads, self.kv_head_dim = heads, head_dim
        self.keys: torch.Tensor | None = None  # [B, H, N, d] rotary keys
        self.values: torch.Tensor | None = None  # [B, 1, N, r] latents

    def reset(self) -> None:
        self.__init__(self.owner, self.layer_idx, self.kv_heads, self.kv_head_dim)  # type: ignore[misc]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, self.head_dim = key_states.shape[0], self.kv_heads, self.kv_head_dim
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        """Append the chunk's rotary keys ``[B, H, q, d]`` and latents ``[B, 1, q, r]``; return all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # concatenation allocates exactly what is held: the byte count has no growth slack to explain
        self.keys = torch.cat((self.keys, key_states), dim=2)
        self.values = torch.cat((self.values, value_states), dim=2)
        self.seen += key_states.shape[2]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask covers every cached token and the new chunk (the attention module reads them all)."""
        return self.seen + query_length, 0

    def kv_bytes(self) -> int:
        """Bytes of the rotary keys and latents held."""
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def kept_entries(self) -> int:
        """Tokens held, counted per sequence and KV head as for any other layer."""
        return self.seen * self.batch * self.kv_heads if self.is_initialized else 0
