"""The model runner: one forward pass over a packed batch of sequences whose KV lives in the paged pool.

:class:`ModelRunner` packs every scheduled chunk into one ``[1, T]`` row; :class:`PagedCacheLayer` writes each
layer's new KV into the pool and the registered attention function attends per sequence over its block table.
A step, why one packed row, and the limitations: ``docs/engine-design.md`` (section "Model runner").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from kvstack.api import cache_kwargs
from kvstack.cache.attention_stats import attention_with_stats
from kvstack.cache.layer import WeakOwner
from kvstack.cache.pending import set_pending, take_pending
from kvstack.contract import STAT_COLSUM, STAT_LAST
from kvstack.engine.latent_pool import PagedLatentPool
from kvstack.engine.paged import PagedKVPool
from kvstack.engine.paged_attention import PackedPlan, chunk_attention, paged_attention_packed
from kvstack.errors import KVStackError
from kvstack.methods.base import Method
from kvstack.models import model_geometry
from kvstack.transforms.latent import latent_geometry
from kvstack.transforms.sharing import shared_layers

__all__ = [
    "ATTENTION_NAME",
    "ModelRunner",
    "PagedBatchCache",
    "PagedCacheLayer",
    "SequenceChunk",
    "stored_layers",
]

ATTENTION_NAME = "kvstack_paged"
"""Name under which the runner's attention and mask functions are registered with transformers."""


@dataclass(frozen=True)
class SequenceChunk:
    """New tokens of one sequence for one step.

    Parameters
    ----------
    block_table : list of int
        The sequence's block table, covering at least slots ``0 .. first_slot + len(token_ids) - 1``.
    start : int
        Position of the first new token (its RoPE position); the KV of the earlier tokens the sequence keeps
        is already in the pool.
    token_ids : list of int
        The new tokens (at least one), at positions ``start .. start + len(token_ids) - 1``.
    slot_start : int or None, optional
        Slot of the first new token in the block table; None means ``start`` (nothing evicted). A sequence
        whose KV was compacted by a token-level policy keeps fewer slots than positions.
    stats : frozenset of str, optional
        Attention statistics to collect for this chunk in every layer (``"colsum"``, ``"last"``), and
        ``"queries"`` to keep its queries; see :attr:`PagedBatchCache.stats`.
    page_reader : Method or None, optional
        A page-reading policy (``quest(...)``) whose decoding steps read only the blocks it selects
        (:mod:`kvstack.engine.quest_attention`); None attends over every block.
    """

    block_table: list[int]
    start: int
    token_ids: list[int]
    slot_start: int | None = None
    stats: frozenset[str] = frozenset()
    page_reader: Method | None = None

    @property
    def num_tokens(self) -> int:
        """Number of new tokens ``q``."""
        return len(self.token_ids)

    @property
    def first_slot(self) -> int:
        """Slot of the first new token."""
        return self.start if self.slot_start is None else self.slot_start

    @property
    def context_len(self) -> int:
        """Slots of the sequence stored after this step: ``first_slot + q``."""
        return self.first_slot + len(self.token_ids)


def chunk_statistics(
    query: torch.Tensor, pool: PagedKVPool, layer: int, chunk: SequenceChunk, scaling: float,
    keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Attention statistics of one chunk's queries over its sequence's slots (float32 tensors).

    Computed by :func:`kvstack.cache.attention_stats.attention_with_stats`, the cache's own implementation
    (and precision policy, ``KVSTACK_STATS_PRECISION``), so a method sees the same statistics in the engine as
    under :func:`kvstack.make_cache`.

    Parameters
    ----------
    query : torch.Tensor
        ``[Hq, q, D]`` the chunk's queries (RoPE applied).
    pool, layer, chunk, scaling
        Where the sequence's keys are, and the logit multiplier.
    keys_values : tuple of torch.Tensor, optional
        ``[H, L, D]`` keys and values to use instead of the pool's (an mla model's, rebuilt from its latents).

    Returns
    -------
    dict of str to torch.Tensor
        ``"colsum"``: ``[H, L]`` attention each slot received, summed over the chunk's queries and the query
        heads of its KV group; ``"last"``: ``[Hq, L]`` weights of the chunk's last query; ``"queries"``: the
        ``[Hq, q, D]`` queries (a copy) with ``"scaling"``. Only those asked for in ``chunk.stats``; ``L`` is
        ``chunk.context_len``.
    """
    wanted = chunk.stats
    result: dict[str, torch.Tensor] = {}
    if "queries" in wanted:
        result["queries"] = query.detach().float().clone()
        result["scaling"] = torch.tensor(float(scaling))
    needs = {name for name in (STAT_COLSUM, STAT_LAST) if name in wanted}
    if not needs:
        return result
    keys, values = keys_values or pool.gather(layer, chunk.block_table, chunk.context_len)  # [H, L, D]
    # The chunk's q queries sit at slots first_slot .. context_len - 1, the last q of the L slots: query j
    # sees slots 0 .. first_slot + j. That is attention_with_stats's mask with causal=None and
    # past_valid=None (lower-triangular over the chunk, every earlier slot visible); an explicit mask
    # would only send it down a slower route.
    _, stats = attention_with_stats(
        query.detach().float()[None], keys.float()[None], values.float()[None], causal=None, past_valid=None,
        scaling=float(scaling), needs=needs, window=0,
    )
    if STAT_COLSUM in needs:
        result["colsum"] = stats.colsum[0]  # [H, L]
    if STAT_LAST in needs:
        result["last"] = stats.last[0]  # [Hq, L]
    return result


class PagedCacheLayer(CacheLayerMixin):
    """One layer of a :class:`PagedBatchCache`: writes the step's keys/values into the pool, holds nothing.

    Parameters
    ----------
    owner : PagedBatchCache
        The cache this layer belongs to (it knows the pool and the step's chunks).
    layer_idx : int
        Model layer index.
    pool_layer : int, optional
        The pool layer its keys and values live in (``layer_idx`` when every model layer stores its own).
    source : int or None, optional
        For a layer of a ``cla`` model that shares the keys and values of the layer below: that layer's
        model index (its attention reads ``source``'s pool layer and this layer writes nothing); else None.
    """

    owner: WeakOwner[PagedBatchCache] = WeakOwner()  # the cache this layer belongs to
    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: PagedBatchCache, layer_idx: int, pool_layer: int | None = None,
                 source: int | None = None) -> None:
        super().__init__()
        self.owner = owner  # weak: the step's cache goes when the step ends
        self.layer_idx = layer_idx
        self.pool_layer = layer_idx if pool_layer is None else pool_layer
        self.source = source  # cla's SharedKVAttention routes its update here when this names its source layer
        self.pending = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype and device; nothing is allocated (the pool holds the KV)."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write every chunk's new keys/values into the pool and mark this layer pending.

        Parameters
        ----------
        key_states, value_states : torch.Tensor
            ``[1, H, T, D]`` keys (RoPE applied) and values of the step's ``T`` packed tokens.

        Returns
        -------
        tuple of torch.Tensor
            The inputs unchanged; the runner's attention function reads the pool instead.

        Raises
        ------
        KVStackError
            If the shapes do not match the packed batch.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        if key_states.dim() != 4 or key_states.shape[0] != 1 or key_states.shape[2] != owner.total_tokens:
            raise KVStackError(
                f"the paged cache expects keys [1, H, {owner.total_tokens}, D] for the packed batch, "
                f"got {tuple(key_states.shape)}"
            )
        if self.source is None:  # a sharing layer's keys are its source's, written there in this same forward
            plan = owner.plan
            owner.pool.write_packed(self.pool_layer, plan.write_blocks, plan.write_slots, key_states[0],
                                    value_states[0])
        self.pending = True
        set_pending(self)  # the cache's handshake: the attention function takes this layer back
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float, module: torch.nn.Module | None = None) -> torch.Tensor:
        """Attention of every chunk's queries over its paged context.

        Parameters
        ----------
        query : torch.Tensor
            ``[1, Hq, T, D]`` queries of the packed tokens (RoPE applied).
        scaling : float
            Logit multiplier.
        module : torch.nn.Module, optional
            The layer's attention module; with a :class:`PagedLatentPool` it rebuilds each sequence's keys and
            values from its cached latents (its ``rebuild``).

        Returns
        -------
        torch.Tensor
            ``[1, T, Hq, D]`` attention output.
        """
        owner = self.owner
        self.pending = False
        if isinstance(owner.pool, PagedLatentPool):
            return self._attend_latents(query, scaling, module)
        for index, (chunk, offset) in enumerate(zip(owner.chunks, owner.offsets, strict=True)):
            # statistics per pool layer: a cla model's sharing layer keeps no slots of its own to choose from
            if chunk.stats and self.source is None:
                chunk_query = query[0, :, offset : offset + chunk.num_tokens]  # [Hq, q_i, D]
                owner.stats[index][self.pool_layer] = chunk_statistics(
                    chunk_query, owner.pool, self.pool_layer, chunk, scaling
                )
        output = paged_attention_packed(
            query[0].transpose(0, 1),  # [T, Hq, D]
            owner.pool,
            self.pool_layer,
            [chunk.block_table for chunk in owner.chunks],
            [chunk.num_tokens for chunk in owner.chunks],
            [chunk.context_len for chunk in owner.chunks],
            scaling,
            plan=owner.plan,
        )
        return output.unsqueeze(0)  # [1, T, Hq, D]

    def _attend_latents(self, query: torch.Tensor, scaling: float, module: torch.nn.Module | None) -> torch.Tensor:
        """``[1, T, Hq, D]``: each chunk's queries over the keys and values ``module`` rebuilds from its blocks."""
        rebuild = getattr(module, "rebuild", None)
        if rebuild is None:
            raise KVStackError(f"layer {self.layer_idx} has a latent pool but its attention module cannot rebuild keys "
                               "and values from latents (an mla model's LatentAttention can)")
        owner = self.owner
        outputs = []
        absorbed = getattr(module, "attend_absorbed", None)
        for index, (chunk, offset) in enumerate(zip(owner.chunks, owner.offsets, strict=True)):
            rotary_keys, latents = owner.pool.gather(self.pool_layer, chunk.block_table, chunk.context_len)
            rotary_keys, latents = rotary_keys[None].to(query.dtype), latents[None].to(query.dtype)
            if chunk.num_tokens == 1 and absorbed is not None and not chunk.stats:
                # a decoding step: the module reads the latents with its up-projection absorbed (the one query
                # sees every slot), instead of rebuilding the whole context's keys and values
                outputs.append(absorbed(query[:, :, offset : offset + 1], rotary_keys, latents, None, scaling)[0])
                continue
            keys, values = rebuild(rotary_keys, latents)  # [1, H, L, D]
            if chunk.stats:  # a compressing request's statistics, over the rebuilt keys
                owner.stats[index][self.pool_layer] = chunk_statistics(
                    query[0, :, offset : offset + chunk.num_tokens], owner.pool, self.pool_layer, chunk, scaling,
                    keys_values=(keys[0], values[0]),
                )
            chunk_query = query[0, :, offset : offset + chunk.num_tokens].transpose(0, 1)  # [q, Hq, D]
            outputs.append(chunk_attention(chunk_query, keys[0], values[0], scaling))
        return torch.cat(outputs, dim=0).unsqueeze(0)  # [1, T, Hq, D]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset) = (query_length, 0)``; no mask is built (the mask function returns None)."""
        return query_length, 0

    def get_seq_length(self) -> int:
        """0: positions come from the explicit ``position_ids`` of each chunk, not from the cache."""
        return 0

    def get_max_length(self) -> int:
        """-1: no maximum of its own (the pool's block count is the limit)."""
        return -1

    def reset(self) -> None:
        """Forget a pending attention; the pool is left untouched."""
        self.pending = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Not supported: beams are separate sequences with their own block tables."""
        raise NotImplementedError("beam search is not supported by the paged runner; fork sequences instead")


class PagedBatchCache(Cache):
    """The ``past_key_values`` of one packed step: routes each layer's new KV into the pool.

    Parameters
    ----------
    pool : PagedKVPool
        The KV pool.
    chunks : sequence of SequenceChunk
        The step's chunks, in packing order.
    shared : mapping of int to int, optional
        ``{upper: lower}`` of a ``cla`` model (:func:`~kvstack.transforms.sharing.shared_layers`): each upper
        layer attends over its lower layer's pool layer; the pool holds only the other layers, in model order.

    Attributes
    ----------
    offsets : list of int
        Index of each chunk's first token in the packed row.
    total_tokens : int
        ``T``, the packed row length.
    stats : list of dict
        Per chunk, ``{layer: chunk_statistics(...)}`` for the chunks that asked for statistics.
    plan : PackedPlan
        Where every packed token is written and the kernel's index tensors, built once for all layers.

    Raises
    ------
    KVStackError
        If a block table does not cover its chunk.
    """

    def __init__(self, pool: PagedKVPool | PagedLatentPool, chunks: Sequence[SequenceChunk],
                 shared: Mapping[int, int] | None = None) -> None:
        self.pool = pool
        self.chunks = list(chunks)
        self.offsets: list[int] = []
        total = 0
        for chunk in self.chunks:
            self.offsets.append(total)
            total += chunk.num_tokens
        self.total_tokens = total
        self.stats: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in self.chunks]
        self.plan = PackedPlan.build(pool, [c.block_table for c in self.chunks], [c.num_tokens for c in self.chunks],
                                     [c.context_len for c in self.chunks], [c.page_reader for c in self.chunks])
        shared = dict(shared or {})
        model_layers = pool.num_layers + len(shared)
        pool_layer_of = {layer: index for index, layer in enumerate(
            layer for layer in range(model_layers) if layer not in shared)}
        super().__init__(layers=[
            PagedCacheLayer(self, layer, pool_layer_of[shared.get(layer, layer)], shared.get(layer))
            for layer in range(model_layers)
        ])


def paged_runner_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as :data:`ATTENTION_NAME`.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (its ``layer_idx`` is checked against the pending cache layer).
    query : torch.Tensor
        ``[1, Hq, T, D]`` packed queries.
    key, value : torch.Tensor
        ``[1, H, T, D]``, ignored: the KV is read from the pool.
    attention_mask : torch.Tensor or None
        Ignored (None: the runner's mask function builds nothing).
    scaling : float, optional
        Logit multiplier (``D ** -0.5`` if None).
    dropout : float, optional
        Must be 0 (inference only).

    Returns
    -------
    tuple
        ``([1, T, Hq, D] output, None)``.

    Raises
    ------
    KVStackError
        If the model runs with this implementation but without a :class:`PagedBatchCache`.
    """
    # One handshake with the cache's layers (kvstack.cache.pending): a layer's update and its attention run back
    # to back on one thread, so at most one layer is pending there, whichever kind; anything else is refused.
    layer = take_pending()
    if not isinstance(layer, PagedCacheLayer) or not layer.pending:
        raise KVStackError(
            f"attention {ATTENTION_NAME!r} ran without a paged cache update; run the model through "
            "ModelRunner.step, or call ModelRunner.restore() before using it directly"
        )
    module_layer = getattr(module, "layer_idx", layer.layer_idx)
    if module_layer != layer.layer_idx:
        raise KVStackError(
            f"paged cache layer {layer.layer_idx} was updated but attention ran for layer {module_layer}"
        )
    if dropout:
        raise KVStackError(f"the paged runner is inference-only; attention dropout must be 0, got {dropout}")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return layer.attend(query, scaling, module), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Mask function registered as :data:`ATTENTION_NAME`: the runner masks per sequence itself."""
    return None


def register() -> None:
    """Register the runner's attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, paged_runner_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def stored_layers(model: torch.nn.Module) -> list[int]:
    """The model layers whose keys and values the pool stores: all of them, except the upper layers of a
    ``cla`` model, which attend with the layer below's."""
    shared = shared_layers(model.config)
    return [layer for layer in range(model_geometry(model).num_layers) if layer not in shared]


class ModelRunner:
    """Runs a transformers causal LM one packed step at a time over a paged KV pool.

    Parameters
    ----------
    model : torch.nn.Module
        A HuggingFace decoder-only causal LM (Llama, Qwen2, Mistral ...). Its attention implementation is
        switched to :data:`ATTENTION_NAME`.
    pool : PagedKVPool
        The KV pool; its layers, KV heads and head dim must match the model. A ``cla`` model's pool holds only
        the layers that keep their own keys and values (:func:`stored_layers`).

    Raises
    ------
    KVStackError
        If the model is not supported or its geometry does not match the pool.
    """

    def __init__(self, model: torch.nn.Module, pool: PagedKVPool | PagedLatentPool) -> None:
        geometry = model_geometry(model)
        self.shared = shared_layers(model.config)
        latent = latent_geometry(model.config)
        if latent is not None:  # an mla model: its pool holds rotary keys and latents
            what = "(layers, kv_heads, rope_dims, rank)"
            expected = (geometry.num_layers, geometry.num_kv_heads, latent["rope_dims"], latent["rank"])
            got = ((pool.num_layers, pool.num_kv_heads, pool.rope_dims, pool.rank)
                   if isinstance(pool, PagedLatentPool) else "a PagedKVPool")
        else:
            what = "(layers, kv_heads, head_dim)"
            expected = (len(stored_layers(model)), geometry.num_kv_heads, geometry.head_dim)
            got = ((pool.num_layers, pool.num_kv_heads, pool.head_dim) if isinstance(pool, PagedKVPool)
                   else "a PagedLatentPool")
        if expected != got:
            raise KVStackError(
                f"the KV pool does not fit the model: model has {what}={expected}, pool has {got}; build the pool "
                "from model_geometry(model) and stored_layers(model) (an mla model: a PagedLatentPool)"
            )
        self.model = model
        self.pool = pool
        self.max_context = geometry.max_context
        config = getattr(model, "config", None)
        self.previous_attn_implementation: str | None = getattr(config, "_attn_implementation", None)
        self.last_stats: list[dict[int, dict[str, torch.Tensor]]] = []
        register()
        model.set_attn_implementation(ATTENTION_NAME)

    def restore(self) -> None:
        """Give the model back its previous attention implementation (the runner cannot step after this)."""
        if self.previous_attn_implementation is not None:
            self.model.set_attn_implementation(self.previous_attn_implementation)

    def _check(self, batch: Sequence[SequenceChunk]) -> None:
        if not batch:
            raise KVStackError("a step needs at least one SequenceChunk")
        for index, chunk in enumerate(batch):
            if not isinstance(chunk, SequenceChunk):
                raise KVStackError(f"batch item {index} must be a SequenceChunk, got {type(chunk).__name__}")
            if not chunk.token_ids:
                raise KVStackError(f"chunk {index} has no tokens; give at least one new token per chunk")
            if isinstance(chunk.start, bool) or not isinstance(chunk.start, int) or chunk.start < 0:
                raise KVStackError(f"chunk {index} start must be a non-negative integer, got {chunk.start!r}")
            slot = chunk.first_slot
            if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot <= chunk.start:
                raise KVStackError(
                    f"chunk {index} slot_start must be an integer in 0..start={chunk.start}, got {slot!r}"
                )
            end = chunk.start + chunk.num_tokens
            if self.max_context is not None and end > self.max_context:
                raise KVStackError(
                    f"chunk {index} reaches position {end - 1}, past the model's context of {self.max_context} tokens"
                )

    def step(self, batch: Sequence[SequenceChunk]) -> torch.Tensor:
        """Run one packed forward over ``batch`` and write its KV into the pool.

        Parameters
        ----------
        batch : sequence of SequenceChunk
            One chunk per scheduled sequence (distinct sequences); their tables must already cover the new
            positions.

        Returns
        -------
        torch.Tensor
            ``[num_chunks, vocab]`` logits of each chunk's last token (float, on the model's device). The
            statistics asked for by chunks (``SequenceChunk.stats``) are in :attr:`last_stats`.

        Raises
        ------
        KVStackError
            On an empty batch, an empty chunk, a bad start or slot, positions past the model's context or a
            block table too short.
        """
        self._check(batch)
        device = next(self.model.parameters()).device
        tokens: list[int] = []
        positions: list[int] = []
        last_indices: list[int] = []
        for chunk in batch:
            tokens.extend(int(t) for t in chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + chunk.num_tokens))
            last_indices.append(len(tokens) - 1)
        input_ids = torch.tensor([tokens], dtype=torch.long, device=device)  # [1, T]
        position_ids = torch.tensor([positions], dtype=torch.long, device=device)  # [1, T]
        keep = torch.tensor(last_indices, dtype=torch.long, device=device)  # [num_chunks]
        cache = PagedBatchCache(self.pool, batch, self.shared)
        take_pending()  # drop a layer left pending by a forward that failed on this thread
        try:
            with torch.no_grad():
                output = self.model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    **cache_kwargs(self.model, cache),
                    use_cache=True,
                    logits_to_keep=keep,
                )
        finally:
            take_pending()
        self.last_stats = cache.stats
        return output.logits[0]  # [num_chunks, vocab]
