"""One prompt forward for several caches: every static method of a comparison reads the prompt once.

A method that compresses once, when the prompt has been read (SnapKV, PyramidKV, Ada-KV over SnapKV,
key norm, random, Loki, the full cache), sees exactly the same prompt forward as the full cache: every
layer attends to every prompt token, and only afterwards is the layer's cache cut down. When several
such methods are compared on one prompt, that forward (about nine tenths of a 2k-token cell on a CPU) can
run once. :class:`SharedPrefillCache` is the transformers ``Cache`` that forward is given: it stores each
layer's new keys and values in every member cache, computes the layer's attention once
(:class:`~kvstack.cache.shared_attention.SharedPromptAttention`), and lets each member do its own bookkeeping and
compression with the statistics its method asks for. Afterwards each member is an ordinary cache, in
exactly the state its own prefill would leave it (the tests compare them tensor by tensor), and decodes
on its own.

Methods that evict while the prompt is read, accumulate per-entry state, need column statistics of the
whole attention matrix, or encode with a codec cannot share that one forward: :func:`share_blocker` says
why. Static methods with state or whole-matrix statistics (Ada-KV over H2O, which compresses once with
the scores H2O accumulates over the prompt) can share a forward that computes those statistics, with
caches that ask for the same ones (:func:`method_stats_share_key`): one method at several ratios.

Methods that evict while the prompt is read (StreamingLLM, H2O, TOVA, Scissorhands) read it in chunks,
and until a cache first exceeds its budget it holds every token, exactly as the full cache does. Caches
whose methods' statistics one attention call computes can share those chunks
(``SharedPrefillCache(caches, chunked=True)``, one chunk per forward; :func:`kvstack.prefill_shared_chunks`
drives it): each chunk's attention runs once, with every statistic a member asks for
(:class:`~kvstack.cache.shared_attention.SharedChunkAttention`), and every cache evicts for itself with exactly the
statistics its own forward computes; a cache that has evicted leaves the group and reads the rest of the
prompt on its own. :func:`chunk_share_key` says which caches can share: one method at several ratios, H2O
with Scissorhands (column sums and below-mean counts come from one pass), StreamingLLM with TOVA. At ratio
0.25 of a 2k prompt read in 512-token chunks, every chunk is shared.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvstack.cache.attention_stats import attention_route
from kvstack.cache.cache import KVStackCache
from kvstack.cache.layer import KVStackLayer, chunk_masks
from kvstack.cache.pending import set_pending
from kvstack.cache.shared_attention import SharedChunkAttention, SharedPromptAttention
from kvstack.contract import STAT_BELOW_MEAN, STAT_COLSUM, STAT_LAST, STAT_WINDOW

__all__ = [
    "SharedPrefillCache", "chunk_route_groups", "chunk_share_key", "method_chunk_share_key", "method_share_blocker",
    "method_stats_share_key", "share_blocker", "shared_chunk_statistics",
]


def method_share_blocker(method: Any, codec: Any = None) -> str | None:
    """Why caches of ``method`` (with ``codec``) cannot read a prompt in a shared forward, or None."""
    if codec is not None:
        return f"it encodes entries with {codec.label()}"
    if method.cross_layer:
        return "its layers store through other layers' stores (a layer's attention depends on another's)"
    if method.reads_pages:
        return "its method keeps its entries in pages in a slow tier"
    if method.dynamic:
        return "its method evicts while the prompt is read"
    if method.state_names:
        return f"its method accumulates per-entry state ({', '.join(method.state_names)})"
    if set(method.needs) - {STAT_WINDOW, STAT_LAST}:
        return f"its method needs statistics of the whole attention matrix ({', '.join(sorted(method.needs))})"
    if method.uses_cache_positions():
        return "its method re-assigns positions inside the cache"
    if method.demotion_codec() is not None:
        return "its method stores evicted entries at low precision"
    return None


StatsShareKey = tuple[frozenset[str], int]  # the attention statistics a method asks for, its query window


def _statistics_key(method: Any, codec: Any, dynamic: bool) -> StatsShareKey | None:
    """``method``'s statistics and trailing-query window if it is ``dynamic`` as asked and attends over
    plain dense entries (no codec, in-cache positions, low-precision demotion or sparse attention); else None."""
    if codec is not None or method.dynamic != dynamic or method.uses_cache_positions():
        return None
    if method.demotion_codec() is not None or method.sparse_attention or method.cross_layer or method.reads_pages:
        return None
    return frozenset(method.needs), int(method.window_queries())


def method_stats_share_key(method: Any, codec: Any = None) -> StatsShareKey | None:
    """What caches of a static ``method`` with per-entry state or whole-matrix statistics must agree on to
    read a prompt in one shared forward, or None if such caches cannot share one.

    Ada-KV over H2O (or Scissorhands) compresses once, after the prompt, with the scores its inner method
    accumulates over the whole prompt forward. That forward computes the column statistics of every
    layer's attention, the costly part of its prefill; caches whose methods ask for the same statistics
    (one method at several ratios) can share it. The key is those statistics and the trailing-query window.
    None for methods that can share the plain prompt forward (no :func:`method_share_blocker`), dynamic
    methods, codecs, in-cache positions and low-precision demotion.
    """
    if method_share_blocker(method, codec) is None:
        return None
    return _statistics_key(method, codec, dynamic=False)


COLUMN_STATISTICS = frozenset({STAT_COLSUM, STAT_BELOW_MEAN})
LAST_QUERY_STATISTICS = frozenset({STAT_LAST})


def shared_chunk_statistics(needs: frozenset[str]) -> frozenset[str]:
    """The statistics a chunk shared by a method asking for ``needs`` computes: what caches sharing it agree on.

    Column sums and below-mean counts come from one pass over the weights, and the column sums do not
    depend on whether the counts are also taken: H2O (column sums) and Scissorhands (counts) share chunks
    computing both. A chunk's output does not depend on the last query's weights being taken (they are
    computed apart from it): StreamingLLM (no statistics) and TOVA (the last query's weights) share chunks
    too. Any other request is shared only with equal ones.
    """
    if needs and needs <= COLUMN_STATISTICS:
        return COLUMN_STATISTICS
    if needs <= LAST_QUERY_STATISTICS:
        return LAST_QUERY_STATISTICS
    return needs


def method_chunk_share_key(method: Any, codec: Any = None) -> StatsShareKey | None:
    """What caches of a dynamic ``method`` must agree on to share prompt chunks, or None if they cannot.

    The key is the statistics the shared chunks compute (:func:`shared_chunk_statistics` of those the method
    asks for at every chunk) and its trailing-query window (which also fixes where the prompt's chunks end):
    caches with equal keys compute their attention over the same entries by one call, each taking the
    statistics its own forward would, until one of them evicts. Static methods, codecs, in-cache positions
    and low-precision demotion cannot share chunks (static methods share their single prompt forward instead).
    """
    key = _statistics_key(method, codec, dynamic=True)
    return None if key is None else (shared_chunk_statistics(key[0]), key[1])


AttentionPlacement = tuple[torch.device, torch.dtype]  # where, and in what dtype, a layer's queries are


def chunk_route_groups(caches: list[KVStackCache], *, q_len: int, length: int, num_q_heads: int,
                       placements: set[AttentionPlacement]) -> list[list[int]]:
    """Indices of ``caches`` (equal :func:`chunk_share_key`, each holding every token) grouped so that one
    :class:`SharedChunkAttention` serves each group's next chunk: ``q_len`` unpadded queries, ``length``
    entries in all, on the ``placements`` (device, dtype) of the model's attention layers.

    A group's members' own forwards, and the shared one computing all their statistics, take one route
    (:func:`attention_route`) on every placement, before and at the chunk that compresses. Equal keys
    disagree only in corner cases, where a cache ends in a group of its own: a one-token chunk (TOVA takes
    the last query's weights eagerly, StreamingLLM does not), or bf16 statistics on a CPU (asked for, or
    chosen for a bf16 model or without the fused kernels: H2O's column sums alone then come from a
    transposed flash call, Scissorhands' do not).
    """
    def routes(needs: frozenset[str]) -> tuple[str, ...]:
        return tuple(attention_route(needs, q_len=q_len, length=length, num_q_heads=num_q_heads, device=device,
                                     dtype=dtype) for device, dtype in sorted(placements, key=str))

    by_routes: dict[tuple[str, ...] | None, list[int]] = {}
    for index, cache in enumerate(caches):
        needs = frozenset(cache.method.needs)
        before, at = routes(needs - {STAT_WINDOW}), routes(needs)  # before and at the chunk that compresses
        by_routes.setdefault(before if before == at else None, []).append(index)
    groups = []
    for taken, indices in by_routes.items():
        union = frozenset().union(*(caches[i].method.needs for i in indices))
        if taken is not None and routes(union) == taken and routes(union - {STAT_WINDOW}) == taken:
            groups.append(indices)
        else:
            groups += [[i] for i in indices]
    return groups


def chunk_share_key(cache: KVStackCache) -> StatsShareKey | None:
    """:func:`method_chunk_share_key` of ``cache``, or None once it no longer holds every token it read."""
    key = method_chunk_share_key(cache.method, cache.codec)
    if key is None or not all(layer.holds_every_token() for layer in cache.layers if layer.is_initialized):
        return None
    return key


def share_blocker(cache: KVStackCache) -> str | None:
    """Why ``cache`` cannot read its prompt in a shared forward, or None when it can."""
    reason = method_share_blocker(cache.method, cache.codec)
    if reason is None and cache.tokens_seen():
        return "it already holds tokens"
    return reason


class SharedPrefillLayer(CacheLayerMixin):
    """Layer ``layer_idx`` of a :class:`SharedPrefillCache`: the member caches' layers, attended once.

    ``member_stats``: compute the attention with the statistics the members' methods ask for
    (:class:`SharedChunkAttention`: a prompt chunk, or a whole prompt of methods with state) rather than
    the plain prompt attention with trailing-query statistics (:class:`SharedPromptAttention`).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, layer_idx: int, members: list[KVStackLayer], member_stats: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.members = members
        self.member_stats = member_stats

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to set up: the member layers initialise themselves."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        """Store the chunk in every member; see :meth:`SharedPrefillCache.update`."""
        results = [member.update(key_states, value_states, *args, **kwargs) for member in self.members]
        set_pending(self)  # the attention function hands the queries to this layer, not to the last member
        return results[0]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.members[0].get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.members[0].get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def attend(
        self,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Attention once for every member, then each member's own bookkeeping and compression.

        ``query`` ``[B, Hq, q, D]``; returns ``[B, q, Hq, D]`` (the same for every member).
        """
        first = self.members[0]
        batch, _, q_len, _ = query.shape
        causal, valid = chunk_masks(attention_mask, batch, q_len, query.device)
        # Each member refuses the shared result unless it holds every token (for a first forward: the prompt).
        if self.member_stats:
            requests = [(member.forward_needs(q_len)[1], member.owner.method.window_queries())
                        for member in self.members]
            shared: SharedPromptAttention | SharedChunkAttention = SharedChunkAttention(
                query, first.keys[:, :, : first.length], first.values[:, :, : first.length], causal, valid,
                scaling, requests,
            )
        else:
            shared = SharedPromptAttention(query, first.keys[:, :, :q_len], first.values[:, :, :q_len], causal,
                                           scaling)
            # Every member's statistics before any member compresses: a compressing member may change its
            # keys in place (Loki rotates them, a single eviction overwrites a slot), and the first member's
            # keys are the ones the statistics are taken from.
            for member in self.members:
                shared.stats(member.forward_needs(q_len)[1], member.owner.method.window_queries())
        for member in self.members:
            member.attend(query, attention_mask, position_ids, scaling, shared=shared)
        return shared.output


class SharedPrefillCache(Cache):
    """A transformers ``Cache`` that feeds one prompt forward to several empty :class:`KVStackCache` s.

    Pass it to the model for one unpadded prompt forward (:func:`kvstack.prefill_shared` does); the
    member caches then hold what their own prefill would have left, and are used on their own.

    Parameters
    ----------
    caches:
        Empty caches of the same model whose methods can share (see :func:`share_blocker`), or empty caches
        of static methods with equal :func:`method_stats_share_key` (Ada-KV over H2O at several ratios);
        with ``chunked``, caches of dynamic methods with equal :func:`chunk_share_key` that hold every token
        they have read (the same tokens: the caller feeds them the same chunks).
    chunked:
        One chunk of a prompt read in chunks, not a whole prompt in one forward.

    Raises
    ------
    ValueError
        For no caches, caches of different models, or a cache that cannot share (the message says why).
    """

    def __init__(self, caches: list[KVStackCache], chunked: bool = False) -> None:
        if not caches:
            raise ValueError("a shared prefill needs at least one cache")
        shapes = {(len(cache.layers), cache.group_size) for cache in caches}
        if len(shapes) > 1:
            raise ValueError("the caches of a shared prefill must belong to the same model")
        if chunked:
            keys = [chunk_share_key(cache) for cache in caches]
            for index, key in enumerate(keys):
                if key is None:
                    raise ValueError(f"cache {index} ({caches[index].label()}) cannot share prompt chunks: its method "
                                     "is not one that evicts as it reads (without a codec), or it has evicted already")
            if len(set(keys)) > 1:
                raise ValueError("caches sharing prompt chunks must ask for the same attention statistics, or ones "
                                 "a single attention call computes (kvstack.cache.shared.shared_chunk_statistics)")
            if len({cache.tokens_seen() for cache in caches}) > 1:
                raise ValueError("caches sharing prompt chunks must have read the same tokens")
            member_stats = True
        else:
            # Methods with state or whole-matrix statistics share a forward computing those statistics, with
            # caches asking for the same ones; every other member shares the plain prompt attention.
            stats_keys = [method_stats_share_key(cache.method, cache.codec) for cache in caches]
            member_stats = stats_keys[0] is not None and len(set(stats_keys)) == 1
            for index, cache in enumerate(caches):
                if member_stats:  # every method can share this forward: only a used cache cannot
                    reason = "it already holds tokens" if cache.tokens_seen() else None
                else:
                    reason = share_blocker(cache)
                    if reason is not None and stats_keys[index] is not None:
                        reason += " (it can share one only with caches of methods asking for the same statistics)"
                if reason is not None:
                    raise ValueError(f"cache {index} ({cache.label()}) cannot share a prompt forward: {reason}")
        self.caches = list(caches)
        super().__init__(layers=[SharedPrefillLayer(i, [cache.layers[i] for cache in caches], member_stats)
                                 for i in range(len(caches[0].layers))])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``[B, H, q, D]`` keys and values in every member (each keeps its own copy)."""
        for cache in self.caches:
            if cache.context_length is None:
                cache.context_length = key_states.shape[2]
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
