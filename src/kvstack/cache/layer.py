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

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from transformers.cache_utils import CacheLayerMixin

from kvstack.cache.attention_stats import attention_with_stats
from kvstack.cache.capacity import growth_slack
from kvstack.cache.eviction import LayerEviction
from kvstack.cache.layer_paths import LayerAttentionPaths
from kvstack.cache.pending import set_pending
from kvstack.cache.quantized import QuantizedRegion
from kvstack.cache.ragged import RaggedHeads
from kvstack.cache.shared_attention import SharedChunkAttention, SharedPromptAttention
from kvstack.contract import STAT_WINDOW, AttentionStats, LayerView

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache


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


def forward_plan(method: Any, compressed: bool, more_prompt_follows: bool, seen: int,
                 q_len: int) -> tuple[bool, set[str]]:
    """``(compress now, statistics needed)`` for a layer's forward of ``q_len`` new tokens (``seen`` counts
    them): a dynamic method compresses at every forward, a static one once, when the prompt's last chunk has
    been read; statistics a method accumulates are collected at every forward, the rest when it compresses."""
    if not method.compresses():
        compress_now = False
    elif method.dynamic:
        compress_now = True
    else:
        compress_now = not compressed and not more_prompt_follows and (q_len > 1 or seen == q_len)
    accumulates = method.dynamic or bool(method.state_names)
    needs = set(method.needs) - {STAT_WINDOW} if accumulates else set()
    if compress_now:
        needs |= set(method.needs)
    return compress_now, needs


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


class KVStackLayer(LayerAttentionPaths, LayerEviction, CacheLayerMixin):
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
        self.key_basis: torch.Tensor | None = None  # [B, H, D, D] a sparse-attention method's basis (keys stored in it)
        self.layer_state: dict[str, torch.Tensor] = {}  # per-layer [B, H] method state (not tied to entries)
        self.merged = False  # a merging method has folded entries into others (their mass may differ from 1)
        # What follows this forward's attention (statistics, eviction, the codec's flush), held back while layers
        # above that read this one's entries (cla models, KVSharer) still have to attend to the same entries.
        self.deferred: Callable[[], None] | None = None
        self.readers_left = 0

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
        self.layer_state = {
            name: torch.zeros((batch, heads), dtype=torch.float32, device=self.device)
            for name in self.owner.method.layer_state_names
        }
        codec = self.owner.codec
        if codec is not None:
            self.region = QuantizedRegion(
                codec, batch, heads, head_dim, self.dtype, self.device,
                per_head_positions=self.owner.method.compresses(),
                state_names=tuple(self.owner.method.state_names),
                rope_inv_freq=self.owner.rope_inv_freq, layer_idx=self.layer_idx,
                calibration=self.owner.calibration,
            )
        demotion = self.owner.method.demotion_codec()  # MiKV: evicted entries stay, at low precision
        if demotion is not None:
            self.demoted = QuantizedRegion(
                demotion, batch, heads, head_dim, self.dtype, self.device, per_head_positions=True,
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
        if self.deferred is not None:  # a forward whose reading layers never attended: finish it first
            self.finish_forward()
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
        tensors = [self.keys, self.values, self.positions, self.next_position, *self.state.values(),
                   *self.layer_state.values()]
        if self.key_basis is not None:
            tensors.append(self.key_basis)
        encoded = self.region.nbytes() if self.region is not None else 0
        demoted = self.demoted.nbytes() if self.demoted is not None else 0
        return sum(t.nbytes for t in tensors) + encoded + demoted

    def tier_bytes(self) -> int:
        """Bytes in a slower tier: none, this layer holds its entries in memory."""
        return 0

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

    def dense_entries(self, live: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every entry's key and value ``[B, H, N + live, D]`` in the model's space: the encoded ones decoded
        (a transient copy), then the first ``live`` full-precision slots (default: all), in
        :meth:`_all_positions`' order."""
        live = self.length if live is None else live
        keys, values = self.keys[:, :, :live], self.values[:, :, :live]
        if self.key_basis is not None:  # stored in the key basis: back to the model's
            keys = keys @ self.key_basis.transpose(-1, -2)
        if self.encoded_entries():
            encoded_keys, encoded_values = self.region.decode_all()
            keys, values = torch.cat((encoded_keys, keys), dim=2), torch.cat((encoded_values, values), dim=2)
        return keys, values

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
        new_positions = self._record_positions(position_ids, valid, batch, q_len, query.device)
        if shared is not None and not self.holds_every_token():
            raise RuntimeError(f"a shared {type(shared).__name__} applies only to an unpadded layer that holds "
                               "every token it was given, densely and in full precision")
        if self.ragged is not None:
            self.ragged.append(new_keys, new_values, new_positions)
            output = self.ragged.attend(query, causal, scaling)
            self._defer_or_run(self.ragged.flush)
            return output
        self.positions[:, :, self.length - q_len : self.length] = new_positions.unsqueeze(1)
        compress_now, needs = self.forward_needs(q_len)
        output, stats = self._route(query, causal, valid, q_len, scaling, needs, shared)
        self._defer_or_run(lambda: self._after_attention(stats, compress_now, q_len))
        return output

    # ---------------------------------------------------------------- layers that read this one's entries
    def _defer_or_run(self, finish: Callable[[], None]) -> None:
        """Run what follows this forward's attention now, or once every layer reading this one has attended."""
        readers = self.owner.readers.get(self.layer_idx, 0)
        if readers:
            self.deferred, self.readers_left = finish, readers
        else:
            finish()

    def finish_forward(self) -> None:
        """Run this forward's held-back statistics, eviction and flush (see :meth:`read_for`)."""
        finish, self.deferred, self.readers_left = self.deferred, None, 0
        if finish is not None:
            finish()

    def read_for(self, query: torch.Tensor, causal: torch.Tensor | None, valid: torch.Tensor | None,
                 scaling: float) -> torch.Tensor:
        """Another layer's ``[B, Hq, q, D]`` queries over this layer's entries as this forward's own attention
        read them (this chunk stored, nothing of it evicted or encoded yet); returns ``[B, q, Hq, D]``.

        Every path reads what it would for this layer's own queries (encoded regions, merged masses, a key
        basis, per-head storage). Nothing is recorded: the policy scores entries by this layer's queries. The
        last reader releases the held-back eviction (:meth:`finish_forward`).
        """
        if self.deferred is None or self.readers_left <= 0:
            raise RuntimeError(f"layer {self.layer_idx} is read by a layer above it before its own attention ran "
                               "in this forward")
        q_len = query.shape[2]
        if self.ragged is not None:
            output = self.ragged.attend(query, causal, scaling)
        elif self.key_basis is not None:  # the new keys are already rotated into the basis
            output = self._attend_low_rank_scored(query, causal, q_len, scaling)
        else:
            output, _ = self._route(query, causal, valid, q_len, scaling, set(), None)
        self.readers_left -= 1
        if self.readers_left == 0:
            self.finish_forward()
        return output

    def _record_positions(self, position_ids: torch.Tensor | None, valid: torch.Tensor | None, batch: int,
                          q_len: int, device: torch.device) -> torch.Tensor:
        """``[B, q]`` int32 true positions of the new tokens (``-1`` for padding); updates ``next_position``."""
        if position_ids is None:
            position_ids = torch.arange(self.seen - q_len, self.seen, device=device).unsqueeze(0)
        new_positions = position_ids.to(torch.int32).expand(batch, -1)
        if valid is not None:
            new_positions = new_positions.masked_fill(~valid, -1)
            if not bool(valid.all()):
                self.has_padding = True
        self.next_position = torch.maximum(self.next_position, new_positions.max(dim=-1).values.long() + 1)
        return new_positions

    def _route(
        self, query: torch.Tensor, causal: torch.Tensor | None, valid: torch.Tensor | None, q_len: int,
        scaling: float, needs: set[str], shared: SharedPromptAttention | SharedChunkAttention | None,
    ) -> tuple[torch.Tensor, AttentionStats]:
        """This forward's attention output ``[B, q, Hq, D]`` and statistics, by what the layer holds."""
        method = self.owner.method
        if shared is not None:
            if isinstance(shared, SharedPromptAttention) and self.length != q_len:
                raise RuntimeError("a shared prompt attention applies only to a first forward into an empty layer")
            return shared.output, shared.stats(needs, method.window_queries())
        if self.key_basis is not None:
            self._rotate_new_keys(q_len)
            return self._attend_low_rank_scored(query, causal, q_len, scaling), AttentionStats()
        if self.encoded_entries():
            return self._attend_encoded(query, causal, valid, q_len, scaling, needs, method.window_queries())
        if self.demoted is not None and self.demoted.length:
            return self._attend_demoted(query, causal, valid, q_len, scaling, needs, method.window_queries())
        if self.log_mass_name() is not None:
            return self._attend_with_mass(query, causal, valid, q_len, scaling, needs, method.window_queries())
        keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        if method.uses_cache_positions():
            keys, query = self._cache_position_view(keys, query, q_len)
        past_valid = (self.positions[:, :, : self.length - q_len] >= 0) if self.has_padding else None
        return attention_with_stats(
            query, keys, values, causal, past_valid, scaling, needs, method.window_queries(), query_valid=valid
        )

    def log_mass_name(self) -> str | None:
        """The per-entry state holding ``log(mass)`` once entries have been merged (None: every entry weighs 1)."""
        return self.owner.method.mass_state if self.merged else None

    def _after_attention(self, stats: AttentionStats, compress_now: bool, q_len: int) -> None:
        """The policy observes the statistics, then eviction (when due), the key basis and the codec's flush."""
        method = self.owner.method
        if method.allocates_layers and self.owner.layer_budgets is None:
            self.owner.record_layer_statistic(self.layer_idx, method.layer_statistic(self._view(stats, budget=0)))
        if method.state_names:
            view = self._view(stats, budget=0)
            method.observe(view)
            self._store_state(view)
        lower = self.owner.magnitude_lower.get(self.layer_idx)
        if lower is not None:  # the upper layer of a merged pair: store the pair's shared rows, not its own
            start = self.length - q_len
            shared_keys, shared_values = self.owner.layers[lower].absorb(
                self.keys[:, :, start : self.length], self.values[:, :, start : self.length])
            self.keys[:, :, start : self.length] = shared_keys
            self.values[:, :, start : self.length] = shared_values
        if compress_now:
            self._compress(stats)
        if method.sparse_attention and self.key_basis is None and not self.owner.more_prompt_follows:
            self._fit_key_basis()  # before any flush: the basis is fitted to every prompt key
        holds_prompt = method.compresses() or (method.sparse_attention and self.key_basis is None)
        if self.region is not None and not (holds_prompt and self.owner.more_prompt_follows):
            # The last chunk of a prompt is stored without growth room: decoding adds it when it needs it
            # (end_prompt would trim it anyway), so the prompt's peak holds no spare slots.
            self._flush(exact=q_len > 1 and not self.owner.more_prompt_follows)


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
            if self.key_basis is not None:  # the slots are in the key basis; the region in the model's
                keys = keys @ self.key_basis.transpose(-1, -2)
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
        return forward_plan(self.owner.method, self.compressed, self.owner.more_prompt_follows, self.seen, q_len)

    def holds_every_token(self) -> bool:
        """True while this layer holds every token it was given, unpadded, as dense full-precision slots: no
        eviction yet, no head-wise storage, no encoded or demoted entries, no key basis. Caches whose layers
        all do (and read the same tokens) hold the same keys and values, so a chunk's attention over them
        can be computed once (:class:`SharedChunkAttention`)."""
        return (
            self.ragged is None and not self.has_padding and self.key_basis is None and not self.encoded_entries()
            and (self.demoted is None or not self.demoted.length) and self.length == self.seen
        )


