"""One model layer's KV storage, driven by a method: holds exactly what the method keeps.

Storage is per KV head, never repeated per query head. Two layouts:

* uniform: ``keys``/``values`` ``[B, H, capacity, D]`` with ``length`` live slots (same count for every
  head; which token sits in a slot may differ per head). Per-slot metadata: ``positions``
  ``[B, H, capacity]`` int32 (true RoPE positions, ``-1`` = padding) and the method's state tensors.
* ragged (head-wise budgets, Ada-KV): one ``[n_bh, D]`` tensor per (sequence, head), each exactly as
  long as that head's budget plus growth slack. No padding, no masks. With a codec, each head also has its
  own encoded region (its oldest entries, a whole number of chunks), so uneven budgets stay uneven.

Evicted entries are gone from memory: eviction either moves a kept entry into the freed slot (one entry
per step while decoding) or gathers the kept entries into new, smaller tensors.

Logical and physical lengths are kept apart: ``seen`` (tokens the sequence has had, which sets the next
RoPE position) versus ``length`` (entries held).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from kvstack.cache import kernels
from kvstack.cache.quantized import QuantizedRegion, blockwise_attention
from kvstack.contract import (
    STAT_BELOW_MEAN,
    STAT_COLSUM,
    STAT_LAST,
    STAT_WINDOW,
    AttentionStats,
    LayerView,
)

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache

QUERY_BLOCK = 256  # queries per block when attention weights are materialised


def growth_slack(length: int) -> int:
    """Spare slots added when a buffer grows: about 1.6%, so reallocation is rare and bytes stay honest."""
    return max(1, length // 64)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE helper in transformers' layout (first half / second half of the head dimension)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_shift(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE-encoded vectors by ``delta`` more positions (rotations compose: R(a)R(b) = R(a+b)).

    Parameters
    ----------
    x:
        ``[..., N, D]`` vectors already rotated at their original positions.
    delta:
        ``[..., N]`` position shifts (may be negative).
    inv_freq:
        ``[D/2]`` the model's RoPE inverse frequencies.
    """
    angles = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(x.device)
    angles = torch.cat((angles, angles), dim=-1)
    return (x * angles.cos().to(x.dtype)) + (rotate_half(x) * angles.sin().to(x.dtype))


def chunk_masks(attention_mask: torch.Tensor | None, batch: int, q_len: int, device: torch.device) -> tuple:
    """Split transformers' mask of the new chunk into (causal ``[B, 1, q, q]`` bool or None, valid ``[B, q]``).

    The cache reports mask sizes that cover only the new tokens, so the mask transformers builds is
    the chunk's causal + padding mask; ``None`` means plain causal without padding.
    """
    if attention_mask is None:
        return None, None
    mask = attention_mask
    if mask.dtype != torch.bool:
        mask = mask == 0  # additive float mask: 0 where attended
    mask = mask[..., -q_len:, -q_len:]
    if mask.shape[0] != batch:
        mask = mask.expand(batch, -1, -1, -1)
    valid = mask[:, 0, -1, :]  # the last query sees every real token of the chunk
    return mask, valid


CacheT = TypeVar("CacheT")


class WeakOwner(Generic[CacheT]):
    """A cache layer's link to the cache that owns it, held weakly (a descriptor).

    The cache owns its layers; a strong link back would form a reference cycle, and a dropped cache, with
    every tensor it holds, would then live on until the garbage collector's next full pass. Reading the
    attribute after the cache is gone raises a one-line error.
    """

    def __set_name__(self, layer_class: type, name: str) -> None:
        self.slot = f"_{name}_ref"

    def __get__(self, layer: Any, layer_class: type | None = None) -> CacheT:
        if layer is None:
            return self  # type: ignore[return-value]  # the descriptor itself, read from the class
        cache = getattr(layer, self.slot)()
        if cache is None:
            raise RuntimeError(f"this {type(layer).__name__}'s cache no longer exists; keep the cache, not its layers")
        return cache

    def __set__(self, layer: Any, cache: CacheT) -> None:
        setattr(layer, self.slot, weakref.ref(cache))


class KVStackLayer(CacheLayerMixin):
    """A ``CacheLayerMixin`` whose contents a kvstack method decides. See the module docstring."""

    owner: WeakOwner[KVStackCache] = WeakOwner()  # the cache this layer belongs to
    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: KVStackCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.length = 0  # live slots per head (uniform layout)
        self.seen = 0  # logical tokens seen, padding included
        self.capacity = 0
        self.positions: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.next_position: torch.Tensor | None = None
        self.compressed = False
        self.has_padding = False
        self.ragged: RaggedHeads | None = None
        self.pending_chunk: tuple[torch.Tensor, torch.Tensor] | None = None
        self.budget: int | None = None
        self.region: QuantizedRegion | None = None  # entries a codec has encoded (they precede the slots)
        self.demoted: QuantizedRegion | None = None  # entries MiKV evicted to low precision (attended first)
        self.pca_basis: torch.Tensor | None = None  # [B, H, D, D] Loki's per-head key basis (keys stored rotated)

    # ---------------------------------------------------------------- transformers CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.keys = key_states.new_empty((batch, heads, 0, head_dim))
        self.values = value_states.new_empty((batch, heads, 0, value_states.shape[-1]))
        self.positions = torch.empty((batch, heads, 0), dtype=torch.int32, device=self.device)
        self.state = {
            name: torch.empty((batch, heads, 0), dtype=torch.float32, device=self.device)
            for name in self.owner.method.state_names
        }
        self.next_position = torch.zeros(batch, dtype=torch.long, device=self.device)
        codec = self.owner.codec
        if codec is not None:
            self.region = QuantizedRegion(
                codec, batch, heads, head_dim, self.dtype, self.device,
                per_head_positions=self.owner.method.compresses(),
                state_names=tuple(self.owner.method.state_names),
                rope_inv_freq=self.owner.rope_inv_freq, layer_idx=self.layer_idx,
                calibration=self.owner.calibration,
            )
        demotion = getattr(self.owner.method, "demotion_codec", None)
        if demotion is not None:
            self.demoted = QuantizedRegion(
                demotion(), batch, heads, head_dim, self.dtype, self.device, per_head_positions=True,
                layer_idx=self.layer_idx,
            )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        """Store the new chunk ``[B, H, q, D]`` and return this layer's keys/values for attention.

        The kvstack attention function, which runs next, finishes the step (masking, statistics,
        eviction); see :meth:`attend`.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        from kvstack.attention import set_pending

        if self.pending_chunk is not None:
            raise RuntimeError(
                "kvstack cache used without the kvstack attention function; create caches with "
                "kvstack.make_cache(model, spec), which selects it"
            )
        q_len = key_states.shape[2]
        if self.ragged is None:
            self._append(key_states, value_states)
        self.pending_chunk = (key_states, value_states)
        self.seen += q_len
        set_pending(self)
        if self.ragged is not None:
            return key_states, value_states
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Mask covers only the new chunk (kv_length = q at offset = tokens seen before it).

        The attention function builds the mask of cached entries itself from their stored positions,
        because after eviction their slots no longer map to positions.
        """
        past = self.seen - (query_length if self.pending_chunk is not None else 0)
        return query_length, past

    def get_seq_length(self) -> int:
        """Logical length: tokens seen so far (sets the next RoPE position), not entries held."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.owner, self.layer_idx)  # type: ignore[misc]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by kvstack caches")

    # ---------------------------------------------------------------- storage
    def _resize(self, capacity: int) -> None:
        """Reallocate every per-slot tensor to ``capacity`` slots, keeping the live ones."""
        live = self.length

        def grown(tensor: torch.Tensor) -> torch.Tensor:
            new = tensor.new_empty((*tensor.shape[:2], capacity, *tensor.shape[3:]))
            new[:, :, :live] = tensor[:, :, :live]
            return new

        self.keys, self.values = grown(self.keys), grown(self.values)
        self.positions = grown(self.positions)
        self.state = {name: grown(t) for name, t in self.state.items()}
        self.capacity = capacity

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        q_len = key_states.shape[2]
        if self.length == 0 and self.region is not None and not self.owner.method.compresses():
            # A chunk that will be encoded right after its attention: hold the tensors themselves, no copy.
            self.keys, self.values = key_states, value_states
            self.positions = torch.empty((self.batch, self.heads, q_len), dtype=torch.int32, device=self.device)
            self.state = {name: t.new_zeros((self.batch, self.heads, q_len)) for name, t in self.state.items()}
            self.capacity = self.length = q_len
            return
        needed = self.length + q_len
        if needed > self.capacity:
            extra = growth_slack(needed)
            if self.region is not None:  # room for the tokens before the next flush
                extra = max(extra, self.region.chunk)
            self._resize(needed + extra)
        end = self.length + q_len
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        for tensor in self.state.values():
            tensor[:, :, self.length : end] = 0.0
        self.length = end

    def shrink_to_fit(self) -> None:
        """Release spare capacity beyond the growth slack (after a prompt, when chunks stop arriving)."""
        if self.region is not None:  # exact: the next flush or token reallocates with room to grow
            self.region.shrink_to_fit()
            spare = 0
        else:
            spare = growth_slack(self.length) + 1
        if self.ragged is None and self.capacity > self.length + spare:
            self._resize(self.length + spare)

    def kv_bytes(self) -> int:
        """Bytes of every tensor this layer holds: payload, positions, method state, bookkeeping."""
        if not self.is_initialized:
            return 0
        if self.ragged is not None:
            return self.ragged.nbytes() + self.next_position.nbytes
        tensors = [self.keys, self.values, self.positions, self.next_position, *self.state.values()]
        if self.pca_basis is not None:
            tensors.append(self.pca_basis)
        encoded = self.region.nbytes() if self.region is not None else 0
        demoted = self.demoted.nbytes() if self.demoted is not None else 0
        return sum(t.nbytes for t in tensors) + encoded + demoted

    def encoded_entries(self) -> int:
        """Entries per (sequence, head) held in encoded form (0 without a codec)."""
        return self.region.length if self.region is not None else 0

    def kept_entries(self) -> int:
        """Entries held, summed over sequences and KV heads."""
        if not self.is_initialized:
            return 0
        if self.ragged is not None:
            return sum(self.ragged.entries(i) for i in range(len(self.ragged.lengths)))
        demoted = self.demoted.length if self.demoted is not None else 0
        return (self.encoded_entries() + demoted + self.length) * self.batch * self.heads

    def full_kv_bytes(self) -> int:
        """What an uncompressed cache of the same tokens would hold (keys + values, no metadata)."""
        if not self.is_initialized:
            return 0
        element = self.keys.element_size()
        return self.seen * self.batch * self.heads * self.head_dim * 2 * element

    def head_lengths(self) -> torch.Tensor:
        """``[B, H]`` entries kept by each head."""
        if self.ragged is not None:
            return torch.tensor([self.ragged.entries(i) for i in range(len(self.ragged.lengths))]).view(
                self.batch, self.heads
            )
        return torch.full((self.batch, self.heads), self.encoded_entries() + self.length)

    def kept_positions(self) -> list[list[torch.Tensor]]:
        """Sorted true positions kept by each (sequence, head), for inspection and tests."""
        if self.ragged is not None:
            return [
                [self.ragged.head_positions(b * self.heads + h).sort().values for h in range(self.heads)]
                for b in range(self.batch)
            ]
        live = self._all_positions()
        return [[live[b, h].sort().values for h in range(self.heads)] for b in range(self.batch)]

    def _all_positions(self) -> torch.Tensor:
        """``[B, H, N + length]`` positions of the encoded entries, then of the full-precision slots."""
        live = self.positions[:, :, : self.length]
        if not self.encoded_entries():
            return live
        return torch.cat((self.region.live_positions(), live), dim=-1)

    # ---------------------------------------------------------------- the step
    def attend(
        self,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        scaling: float,
        shared: SharedPromptAttention | SharedChunkAttention | None = None,
    ) -> torch.Tensor:
        """Finish one forward step of this layer: attention over the kept entries, then eviction.

        Parameters
        ----------
        query:
            ``[B, Hq, q, D]`` queries, RoPE applied at their true positions.
        attention_mask:
            transformers' mask for the new chunk (``[B, 1, q, q]`` bool/float) or None (causal, no padding).
        position_ids:
            ``[B or 1, q]`` true positions of the new tokens (None: consecutive after ``seen``).
        scaling:
            Softmax scale, usually ``D ** -0.5``.
        shared:
            This prompt forward's (or prompt chunk's) attention, already computed for several caches reading
            the same prompt (see :class:`kvstack.cache.shared.SharedPrefillCache`); this layer then only does
            its own bookkeeping and compression.

        Returns
        -------
        torch.Tensor
            ``[B, q, Hq, D]`` attention output, as transformers' attention functions return it.
        """
        assert self.pending_chunk is not None
        new_keys, new_values = self.pending_chunk
        self.pending_chunk = None
        batch, _, q_len, _ = query.shape
        causal, valid = chunk_masks(attention_mask, batch, q_len, query.device)
        if position_ids is None:
            position_ids = torch.arange(self.seen - q_len, self.seen, device=query.device).unsqueeze(0)
        new_positions = position_ids.to(torch.int32).expand(batch, -1)
        if valid is not None:
            new_positions = new_positions.masked_fill(~valid, -1)
            if not bool(valid.all()):
                self.has_padding = True
        self.next_position = torch.maximum(self.next_position, new_positions.max(dim=-1).values.long() + 1)

        if shared is not None and not self.holds_every_token():
            raise RuntimeError(f"a shared {type(shared).__name__} applies only to an unpadded layer that holds "
                               "every token it was given, densely and in full precision")
        if self.ragged is not None:
            self.ragged.append(new_keys, new_values, new_positions)
            output = self.ragged.attend(query, causal, scaling)
            self.ragged.flush()
            return output

        start = self.length - q_len
        self.positions[:, :, start : self.length] = new_positions.unsqueeze(1)
        method = self.owner.method
        compress_now, needs = self.forward_needs(q_len)

        if shared is not None:
            if isinstance(shared, SharedPromptAttention) and self.length != q_len:
                raise RuntimeError("a shared prompt attention applies only to a first forward into an empty layer")
            output, stats = shared.output, shared.stats(needs, method.window_queries())
        elif self.pca_basis is not None:
            self._rotate_new_keys(q_len)
            output, stats = self._attend_low_rank_scored(query, causal, q_len, scaling), AttentionStats()
        elif self.encoded_entries():
            output, stats = self._attend_encoded(query, causal, valid, q_len, scaling, needs, method.window_queries())
        elif self.demoted is not None and self.demoted.length:
            output, stats = self._attend_demoted(query, causal, valid, q_len, scaling, needs, method.window_queries())
        else:
            keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
            if method.uses_cache_positions():
                keys, query = self._cache_position_view(keys, query, q_len)
            past_valid = (self.positions[:, :, :start] >= 0) if self.has_padding else None
            output, stats = attention_with_stats(
                query, keys, values, causal, past_valid, scaling, needs, method.window_queries(), query_valid=valid
            )
        if method.state_names:
            view = self._view(stats, budget=0)
            method.observe(view)
            self._store_state(view)
        if compress_now:
            self._compress(stats)
        if method.sparse_attention and self.pca_basis is None and not self.owner.more_prompt_follows:
            self._fit_key_basis()  # before any flush: the basis is fitted to every prompt key
        holds_prompt = method.compresses() or (method.sparse_attention and self.pca_basis is None)
        if self.region is not None and not (holds_prompt and self.owner.more_prompt_follows):
            # The last chunk of a prompt is stored without growth room: decoding adds it when it needs it
            # (end_prompt would trim it anyway), so the prompt's peak holds no spare slots.
            self._flush(exact=q_len > 1 and not self.owner.more_prompt_follows)
        return output

    # ---------------------------------------------------------------- low-rank scoring (Loki)
    def _fit_key_basis(self) -> None:
        """Fit each head's PCA basis to its cached keys and store the keys rotated into it."""
        keys = self.keys[:, :, : self.length].float()
        if self.has_padding:
            keys = keys * (self.positions[:, :, : self.length] >= 0).unsqueeze(-1)
        _, vectors = torch.linalg.eigh(keys.transpose(-1, -2) @ keys)  # ascending eigenvalues
        self.pca_basis = vectors.flip(-1).to(self.keys.dtype)  # [B, H, D, D], principal directions first
        self.keys[:, :, : self.length] = self.keys[:, :, : self.length] @ self.pca_basis

    def _rotate_new_keys(self, q_len: int) -> None:
        new = slice(self.length - q_len, self.length)
        self.keys[:, :, new] = self.keys[:, :, new] @ self.pca_basis

    def _attend_low_rank_scored(
        self, query: torch.Tensor, causal: torch.Tensor | None, q_len: int, scaling: float
    ) -> torch.Tensor:
        """Each query attends exactly to its top entries by scores over the first ``rank`` PCA coordinates."""
        if self.encoded_entries():
            return self._attend_low_rank_scored_encoded(query, causal, q_len, scaling)
        method = self.owner.method
        batch, num_q_heads, _, head_dim = query.shape
        group = num_q_heads // self.heads
        basis = self.pca_basis.repeat_interleave(group, dim=1) if group > 1 else self.pca_basis
        rotated = query @ basis  # [B, Hq, q, D]: q P . k P = q . k
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        visible = self._tail_mask(causal, q_len, query.device)  # [B|1, H|1, q, L] or None
        if self.has_padding and visible is None:
            visible = (self.positions[:, :, : self.length] >= 0).unsqueeze(2)
        rank = min(method.rank, head_dim)
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
        """Loki over ``[encoded region | full-precision slots]``.

        The region holds keys in the model's basis (so every codec encodes what it was designed for);
        the slots hold them in the PCA basis ``P``. The low-rank score of an encoded key is
        ``(q P_r) . (k P_r) = (q P_r P_r^T) . k``: the query is projected instead of the keys, so the
        region is read with the same kernels (or one decoded block at a time) for both the approximate
        and the exact scores; then each query keeps its top entries and attends over them exactly.
        """
        region = self.region
        assert region is not None and self.pca_basis is not None
        method = self.owner.method
        batch, num_q_heads, _, head_dim = query.shape
        group = num_q_heads // self.heads
        rank = min(method.rank, head_dim)
        grouped = query.float().reshape(batch, self.heads, group * q_len, head_dim)  # rows g * q + t
        rotated = grouped @ self.pca_basis.float()  # [B, H, G*q, D] in the PCA basis
        projected = rotated[..., :rank] @ self.pca_basis[..., :rank].float().transpose(-1, -2)
        encoded = region.length
        slot_keys = self.keys[:, :, : self.length].float()  # [B, H, L, D] in the PCA basis
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
        if q_len == 1 and not needs and not self.has_padding and causal is None and not cache_positions:
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
                yield keys, values, None if region_valid is None else region_valid[..., block_start:block_stop]
            yield fp_keys, fp_values, tail_mask

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

    def _store_state(self, view: LayerView) -> None:
        """Write a view's method state back (views of encoded layers hold concatenated copies)."""
        encoded = self.encoded_entries()
        if not encoded:
            return
        for name, tensor in view.state.items():
            self.region.state[name][:, :, :encoded] = tensor[:, :, :encoded]
            self.state[name][:, :, : self.length] = tensor[:, :, encoded:]

    def _flush(self, exact: bool = False) -> None:
        """Encode whole chunks of the oldest full-precision entries, keeping sinks and the residual window.

        ``exact``: allocate the region and the full-precision slots without room to grow.
        """
        region, codec = self.region, self.owner.codec
        sinks = codec.sink_tokens()
        count = region.flushable(self.length)
        if count == 0:
            return
        live = self.positions[:, :, : self.length]
        if not self.owner.method.compresses():  # nothing is ever evicted: slots are in position order
            chosen = slice(sinks, sinks + count)
            keys = self.keys[:, :, chosen]
            if self.pca_basis is not None:  # Loki's slots are in the PCA basis; the region in the model's
                keys = keys @ self.pca_basis.transpose(-1, -2)
            region.append(keys, self.values[:, :, chosen], live[:, :, chosen],
                          {name: t[:, :, chosen] for name, t in self.state.items()}, exact=exact)
            order = torch.arange(self.length, device=live.device).expand(live.shape)
        else:
            order = live.argsort(dim=-1, stable=True)  # oldest first
            index = order[:, :, sinks : sinks + count]
            expanded = index.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
            region.append(
                self.keys[:, :, : self.length].gather(2, expanded),
                self.values[:, :, : self.length].gather(2, expanded),
                live.gather(2, index),
                {name: t[:, :, : self.length].gather(2, index) for name, t in self.state.items()},
                exact=exact,
            )
        rest = torch.cat((order[:, :, :sinks], order[:, :, sinks + count :]), dim=-1).sort(dim=-1).values
        self._gather(rest, capacity=rest.shape[-1] + (0 if exact else region.chunk))

    def _unflush(self) -> None:
        """Decode every encoded entry back into the full-precision slots (before a many-entry eviction)."""
        region = self.region
        encoded = region.length
        keys, values = region.decode_all()
        live = self.length
        capacity = encoded + live + growth_slack(encoded + live)

        def joined(front: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
            new = tensor.new_empty((*tensor.shape[:2], capacity, *tensor.shape[3:]))
            new[:, :, :encoded] = front
            new[:, :, encoded : encoded + live] = tensor[:, :, :live]
            return new

        self.keys, self.values = joined(keys, self.keys), joined(values, self.values)
        self.positions = joined(region.live_positions(), self.positions)
        self.state = {name: joined(region.state[name][:, :, :encoded], t) for name, t in self.state.items()}
        self.capacity, self.length = capacity, encoded + live
        region.clear()

    def _replace_encoded(self, evicted: torch.Tensor) -> None:
        """Evict one entry per head (``evicted`` ``[B, H]`` indices over ``[encoded | slots]``).

        A head whose victim is encoded fills its place with its oldest full-precision entry after the
        sinks (re-encoding that chunk); every head then frees one full-precision slot, so all heads keep
        the same counts.
        """
        region = self.region
        encoded = region.length
        in_region = evicted < encoded
        slot = (evicted - encoded).clamp(min=0)
        if bool(in_region.any()):
            live = self.positions[:, :, : self.length]
            sinks = min(self.owner.codec.sink_tokens(), self.length - 1)
            source = live.argsort(dim=-1, stable=True)[:, :, sinks]  # [B, H]
            for b, h in in_region.nonzero().tolist():
                src = int(source[b, h])
                region.replace_entry(
                    b, h, int(evicted[b, h]), self.keys[b, h, src], self.values[b, h, src], int(live[b, h, src]),
                    {name: float(t[b, h, src]) for name, t in self.state.items()},
                )
            slot = torch.where(in_region, source, slot)
        self._replace_slot(slot)

    def forward_needs(self, q_len: int) -> tuple[bool, set[str]]:
        """``(compress now, statistics needed)`` for a forward of ``q_len`` new tokens (already stored)."""
        method = self.owner.method
        compress_now = self._compression_due(q_len)
        accumulates = method.dynamic or bool(method.state_names)
        needs = set(method.needs) - {STAT_WINDOW} if accumulates else set()
        if compress_now:
            needs |= set(method.needs)
        return compress_now, needs

    def holds_every_token(self) -> bool:
        """True while this layer holds every token it was given, unpadded, as dense full-precision slots: no
        eviction yet, no head-wise storage, no encoded or demoted entries, no PCA basis. Caches whose layers
        all do (and read the same tokens) hold the same keys and values, so a chunk's attention over them
        can be computed once (:class:`SharedChunkAttention`)."""
        return (
            self.ragged is None and not self.has_padding and self.pca_basis is None and not self.encoded_entries()
            and (self.demoted is None or not self.demoted.length) and self.length == self.seen
        )

    def _compression_due(self, q_len: int) -> bool:
        method = self.owner.method
        if not method.compresses():
            return False
        if method.dynamic:
            return True
        return not self.compressed and not self.owner.more_prompt_follows and (q_len > 1 or self.seen == q_len)

    def _view(self, stats: AttentionStats, budget: int) -> LayerView:
        live = self.length
        encoded = self.encoded_entries()
        if encoded:
            region = self.region

            def kv_source() -> tuple[torch.Tensor, torch.Tensor]:
                keys, values = region.decode_all()
                slots = self.keys[:, :, :live]
                if self.pca_basis is not None:  # stored in the PCA basis: back to the model's
                    slots = slots @ self.pca_basis.transpose(-1, -2)
                return torch.cat((keys, slots), dim=2), torch.cat((values, self.values[:, :, :live]), dim=2)

            state = {name: torch.cat((region.state[name][:, :, :encoded], t[:, :, :live]), dim=-1)
                     for name, t in self.state.items()}
        else:

            def kv_source() -> tuple[torch.Tensor, torch.Tensor]:
                keys = self.keys[:, :, :live]
                if self.pca_basis is not None:  # stored in the PCA basis: back to the model's
                    keys = keys @ self.pca_basis.transpose(-1, -2)
                return keys, self.values[:, :, :live]

            state = {name: t[:, :, :live] for name, t in self.state.items()}
        return LayerView(
            kv_source=kv_source,
            positions=self._all_positions(),
            next_position=self.next_position,
            state=state,
            stats=stats,
            layer_idx=self.layer_idx,
            num_layers=self.owner.num_layers,
            generator=self.owner.generator,
            group_size=self.owner.group_size,
            budget=budget,
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
        budget = method.layer_budget(context, self.layer_idx, self.owner.num_layers)
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

    def _to_ragged(self, scores: torch.Tensor, budget: int, method: Any) -> None:
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
            for h in range(self.heads):
                index = keep[h].nonzero().squeeze(-1)
                ragged.set_head(
                    b, h, self.keys[b, h, :live][index], self.values[b, h, :live][index],
                    self.positions[b, h, :live][index],
                )
        self.ragged = ragged
        self.keys = self.keys.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.values = self.values.new_empty((self.batch, self.heads, 0, self.head_dim))
        self.positions = self.positions.new_empty((self.batch, self.heads, 0))
        self.state = {}
        self.length = 0
        self.capacity = 0


class RaggedHeads:
    """Variable-length storage: one ``[capacity_i, D]`` keys/values tensor per (sequence, KV head).

    With a codec (``head_region`` builds one head's :class:`QuantizedRegion`), each head keeps its oldest
    entries encoded in its own region, a whole number of chunks, and the rest (its sinks and the newest
    ``residual`` to ``residual + chunk - 1`` entries) in full precision, exactly as a uniform layer does
    per layer.
    """

    def __init__(
        self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
        head_region: Callable[[], QuantizedRegion] | None = None,
    ) -> None:
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        count = batch * heads
        self.keys: list[torch.Tensor] = [torch.empty((0, head_dim), dtype=dtype, device=device)] * count
        self.values: list[torch.Tensor] = list(self.keys)
        self.positions: list[torch.Tensor] = [torch.empty(0, dtype=torch.int32, device=device)] * count
        self.lengths: list[int] = [0] * count  # full-precision entries per head
        self.regions: list[QuantizedRegion] | None = None
        if head_region is not None:
            self.regions = [head_region() for _ in range(count)]

    def set_head(self, b: int, h: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store exactly these entries (``[n, D]``, ``[n, D]``, ``[n]``, oldest first) for one head."""
        i = b * self.heads + h
        self.keys[i], self.values[i], self.positions[i] = keys.clone(), values.clone(), positions.clone()
        self.lengths[i] = keys.shape[0]
        self._flush(i, room=0)  # the prompt is complete: hold exactly what is kept
        if self.regions is not None:
            self.regions[i].shrink_to_fit()

    def entries(self, i: int) -> int:
        """Entries held by head ``i`` (encoded + full precision)."""
        return self.lengths[i] + (self.regions[i].length if self.regions is not None else 0)

    def head_positions(self, i: int) -> torch.Tensor:
        """``[n]`` int32 true positions held by head ``i``: encoded ones first."""
        live = self.positions[i][: self.lengths[i]]
        if self.regions is None or not self.regions[i].length:
            return live
        return torch.cat((self.regions[i].live_positions()[0, 0], live))

    def nbytes(self) -> int:
        total = sum(t.nbytes for group in (self.keys, self.values, self.positions) for t in group)
        return total + (sum(region.nbytes() for region in self.regions) if self.regions is not None else 0)

    def _flush(self, i: int, room: int | None = None) -> None:
        """Encode whole chunks of head ``i``'s oldest full-precision entries, keeping its sinks and residual.

        The full-precision storage is reallocated with ``room`` spare slots (default: one chunk, the entries
        that arrive before the next flush)."""
        if self.regions is None:
            return
        region = self.regions[i]
        sinks, length = region.codec.sink_tokens(), self.lengths[i]
        count = region.flushable(length)
        if count == 0:
            return
        chosen = slice(sinks, sinks + count)
        region.append(self.keys[i][chosen].view(1, 1, count, -1), self.values[i][chosen].view(1, 1, count, -1),
                      self.positions[i][chosen].view(1, 1, count), {})
        kept = length - count  # the sinks, then the entries after the encoded ones
        capacity = kept + (region.chunk if room is None else room)
        for store in (self.keys, self.values, self.positions):
            new = store[i].new_empty((capacity, *store[i].shape[1:]))
            new[:sinks] = store[i][:sinks]
            new[sinks:kept] = store[i][sinks + count : length]
            store[i] = new
        self.lengths[i] = kept

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append ``[B, H, q, D]`` new entries (``positions`` ``[B, q]``) to every head."""
        q_len = keys.shape[2]
        for b in range(self.batch):
            for h in range(self.heads):
                i = b * self.heads + h
                length = self.lengths[i]
                needed = length + q_len
                if needed > self.keys[i].shape[0]:
                    capacity = needed + growth_slack(needed)
                    for store in (self.keys, self.values, self.positions):
                        old = store[i]
                        new = old.new_empty((capacity, *old.shape[1:]))
                        new[:length] = old[:length]
                        store[i] = new
                self.keys[i][length:needed] = keys[b, h]
                self.values[i][length:needed] = values[b, h]
                self.positions[i][length:needed] = positions[b]
                self.lengths[i] = needed

    def flush(self) -> None:
        """Encode what each head's residual window has overflowed (after its attention)."""
        for i in range(len(self.lengths)):
            self._flush(i)

    def attend(self, query: torch.Tensor, causal: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``[B, Hq, q, D]`` queries over each head's own entries; returns ``[B, q, Hq, D]``.

        A head with encoded entries attends over ``[its region | its full-precision entries]`` one decoded
        block at a time (:func:`blockwise_attention`), or, for one new token with nothing masked, with the
        region's fused decoding (:meth:`QuantizedRegion.attend_one`).
        """
        _, num_q_heads, q_len, _ = query.shape
        group = num_q_heads // self.heads
        out = torch.empty_like(query)
        for b in range(self.batch):
            for h in range(self.heads):
                i = b * self.heads + h
                length = self.lengths[i]
                keys, values = self.keys[i][:length], self.values[i][:length]
                q = query[b, h * group : (h + 1) * group]  # [G, q, D]
                past = length - q_len
                mask = (self.positions[i][:length] >= 0).view(1, 1, length).expand(1, q_len, length).clone()
                tail = causal[b, 0] if causal is not None else torch.ones(q_len, q_len, dtype=torch.bool).tril()
                mask[:, :, past:] &= tail.to(mask.device)
                region = self.regions[i] if self.regions is not None else None
                if region is not None and region.length:
                    out[b, h * group : (h + 1) * group] = self._attend_encoded_head(
                        region, q, keys, values, mask, scaling
                    )
                    continue
                out[b, h * group : (h + 1) * group] = F.scaled_dot_product_attention(
                    q, keys.unsqueeze(0).expand(group, -1, -1), values.unsqueeze(0).expand(group, -1, -1),
                    attn_mask=mask, scale=scaling,
                )
        return out.transpose(1, 2)

    @staticmethod
    def _attend_encoded_head(
        region: QuantizedRegion, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
        mask: torch.Tensor, scaling: float,
    ) -> torch.Tensor:
        """One head's ``[G, q, D]`` queries over ``[region | keys/values [n, D]]`` (``mask`` ``[1, q, n]`` over
        the full-precision part); returns ``[G, q, D]``."""
        group, q_len, head_dim = query.shape
        tail_keys, tail_values = keys.view(1, 1, -1, head_dim), values.view(1, 1, -1, head_dim)
        region_valid = region.live_positions() >= 0  # [1, 1, N]
        if q_len == 1 and bool(mask.all()) and bool(region_valid.all()):
            output = region.attend_one(query.view(1, group, 1, head_dim), tail_keys, tail_values, scaling)
            return output.view(group, 1, head_dim)

        def blocks():
            for start, stop in region.block_bounds():
                block_keys, block_values = region.decode(start, stop)
                yield block_keys, block_values, region_valid[..., start:stop].unsqueeze(2)
            yield tail_keys, tail_values, mask.unsqueeze(0)  # [1, 1, q, n]

        output, _ = blockwise_attention(query.unsqueeze(0), blocks, scaling, set(), 0, None)  # [1, q, G, D]
        return output[0].transpose(0, 1)


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


class SharedPromptAttention:
    """One prompt forward's attention, computed once for several caches that read the same prompt.

    It applies to a first forward into empty layers without padding, for methods whose statistics come
    from the trailing queries only (``window``, ``last``). The output is computed by the same call each
    cache's own forward makes (:func:`attention_with_stats`), and each distinct statistics request once,
    the same way, so every cache ends exactly as its own prefill would leave it.

    Parameters
    ----------
    query:
        ``[B, Hq, q, D]`` the prompt's queries.
    keys, values:
        ``[B, H, q, D]`` the prompt's keys and values.
    causal:
        ``[B, 1, q, q]`` bool mask of the prompt, or None (plain causal).
    scaling:
        Softmax scale.

    Attributes
    ----------
    output:
        ``[B, q, Hq, D]`` attention output, as transformers' attention functions return it.
    """

    def __init__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: torch.Tensor | None,
                 scaling: float) -> None:
        q_len = query.shape[2]
        if keys.shape[2] != q_len:
            raise ValueError(f"shared prompt attention needs empty layers: {keys.shape[2]} entries for {q_len} queries")
        self.query, self.keys, self.scaling = query, keys, scaling
        self._block_mask = functools.partial(_block_mask, causal, None, q_len, 0, device=query.device)
        self.output = _sdpa_output(query, keys, values, causal, None, scaling, self._block_mask).transpose(1, 2)
        self._stats: dict[tuple[frozenset[str], int], AttentionStats] = {}

    def stats(self, needs: set[str] | frozenset[str], window: int) -> AttentionStats:
        """The statistics ``needs`` (a subset of ``{"window", "last"}``) with a ``window``-query window."""
        if set(needs) - {STAT_WINDOW, STAT_LAST}:
            raise ValueError(f"shared prompt attention gives only window/last statistics, not {sorted(needs)}")
        key = (frozenset(needs), int(window))
        if key not in self._stats:
            self._stats[key] = _trailing_query_stats(self.query, self.keys, self._block_mask, self.scaling, needs,
                                                     window)
        return self._stats[key]


class SharedChunkAttention:
    """One prompt chunk's attention, computed once for several caches that hold the same entries.

    Caches of methods that evict while the prompt is read (StreamingLLM, H2O, TOVA, Scissorhands) hold
    every token, unevicted, until their budget is first exceeded; until then their layers hold the same
    keys and values. A chunk's attention over them is computed here once, with every statistic any of
    them asks for (:func:`attention_with_stats`); each cache then does its own bookkeeping and eviction
    from it, with exactly the statistics its own forward would compute. That holds when every request
    takes the route the union takes (:func:`attention_route`; checked here): on one route the output is
    the same call and each statistic the same arithmetic. Column sums are then those of the union call
    (a forward asking for below-mean counts alone computes them too); below-mean counts go only to the
    caches that ask for them; trailing-query statistics are taken for each distinct request, as its own
    forward takes them.

    Parameters
    ----------
    query:
        ``[B, Hq, q, D]`` the chunk's queries.
    keys, values:
        ``[B, H, L, D]`` every entry, the chunk's ``q`` last.
    causal:
        ``[B, 1, q, q]`` bool mask of the chunk, or None (plain causal).
    query_valid:
        ``[B, q]`` bool, False for padding queries, or None.
    scaling:
        Softmax scale.
    requests:
        Each sharing cache's ``(statistics, trailing-query window)`` (:meth:`KVStackLayer.forward_needs`
        and the method's window); all with the same window.

    Attributes
    ----------
    output:
        ``[B, q, Hq, D]`` attention output, as transformers' attention functions return it.

    Raises
    ------
    ValueError
        For no requests, different windows, or a request whose own forward would take another route.
    """

    def __init__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: torch.Tensor | None,
                 query_valid: torch.Tensor | None, scaling: float,
                 requests: list[tuple[set[str] | frozenset[str], int]]) -> None:
        distinct = list(dict.fromkeys((frozenset(needs), int(window)) for needs, window in requests))
        if not distinct:
            raise ValueError("a shared chunk attention needs at least one request")
        windows = {window for _, window in distinct}
        if len(windows) > 1:
            raise ValueError(f"caches sharing a chunk must have one query window, not {sorted(windows)}")
        window = windows.pop()
        union = frozenset().union(*(needs for needs, _ in distinct))
        q_len = query.shape[2]
        route_of = functools.partial(attention_route, q_len=q_len, length=keys.shape[2], num_q_heads=query.shape[1],
                                     device=query.device, dtype=query.dtype, padded=causal is not None,
                                     query_padded=query_valid is not None)
        route = route_of(union)
        for needs, _ in distinct:
            if route_of(needs) != route:
                raise ValueError(f"a cache asking for {sorted(needs)} computes its attention another way "
                                 f"({route_of(needs)}) than the shared chunk ({route}, for {sorted(union)})")
            if route != ROUTE_SDPA and needs != union and needs & {STAT_WINDOW, STAT_LAST}:
                raise ValueError(f"a shared chunk with column statistics serves {sorted(needs)} only to caches "
                                 f"asking for all of {sorted(union)}")
        self.output, union_stats = attention_with_stats(query, keys, values, causal, None, scaling, set(union),
                                                        window, query_valid=query_valid)
        block_mask = functools.partial(_block_mask, causal, None, q_len, keys.shape[2] - q_len, device=query.device)
        self._stats: dict[tuple[frozenset[str], int], AttentionStats] = {}
        for needs, _ in distinct:
            if needs == union:
                self._stats[(needs, window)] = union_stats
                continue
            stats = dataclasses.replace(union_stats, window=None, last=None)
            if STAT_BELOW_MEAN not in needs:
                stats.below_mean = stats.queries_seen = None
            if route == ROUTE_SDPA:  # trailing-query statistics as the request's own forward takes them
                trailing = _trailing_query_stats(query, keys, block_mask, scaling, needs, window)
                stats.window, stats.last = trailing.window, trailing.last
            self._stats[(needs, window)] = stats

    def stats(self, needs: set[str] | frozenset[str], window: int) -> AttentionStats:
        """The statistics for one of the requests the chunk was computed for."""
        request = (frozenset(needs), int(window))
        if request not in self._stats:
            raise ValueError(f"this shared chunk was computed for {sorted(sorted(n) for n, _ in self._stats)} "
                             f"(window {next(iter(self._stats))[1]}), not {sorted(needs)} (window {window})")
        return self._stats[request]


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
    batch, num_q_heads, q_len, head_dim = query.shape
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

    # Eager, block by block over queries: weights are materialised one block at a time.
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


@functools.lru_cache(maxsize=1)
def _cpu_has_fast_bf16() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AMX"):
        return False
    try:
        flags = open("/proc/cpuinfo", encoding="ascii", errors="ignore").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _use_bf16_stats(entries: int) -> bool:
    mode = stats_precision()
    if mode == "auto":
        return entries >= BF16_STATS_MIN_ENTRIES and _cpu_has_fast_bf16()
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
    batch, num_q_heads, q_len, _ = query.shape
    heads, length = keys.shape[1], keys.shape[2]
    group = num_q_heads // heads
    past = length - q_len
    padded = causal is not None or past_valid is not None
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
    del repeated_keys, repeated_values, bias
    stats = AttentionStats()
    low_precision = _use_bf16_stats(num_q_heads * min(q_len, QUERY_BLOCK) * length)
    if transposed_column_sums:  # only column sums, unpadded, bf16 statistics (see attention_route)
        stats.colsum = _column_sums_by_transposed_flash(query, keys, lse, scaling)
        return output.transpose(1, 2), stats
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
    return output.transpose(1, 2), stats


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

