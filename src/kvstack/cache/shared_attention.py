"""One prompt forward's (or prompt chunk's) attention, computed once for several caches reading that prompt.

:class:`SharedPromptAttention` serves caches that compress once, after the prompt; :class:`SharedChunkAttention`
serves a 512-token chunk read by caches whose statistics one attention call computes. Their statistics are
read-only for every member (:mod:`kvstack.cache.shared` runs the shared forward).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from kvstack.cache.attention_stats import (
    ROUTE_SDPA,
    _block_mask,
    _sdpa_output,
    _trailing_query_stats,
    attention_route,
    attention_with_stats,
)
from kvstack.contract import STAT_BELOW_MEAN, STAT_LAST, STAT_WINDOW, AttentionStats


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
