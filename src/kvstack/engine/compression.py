"""Token-level KV compression inside the paged engine: the core's selection methods, per request, freeing blocks.

:class:`SequenceCompression` keeps a request's slot positions and method state and picks the slots to keep;
the engine compacts them into fresh blocks. When, how and what is refused: ``docs/engine-design.md`` (section
"Compression").
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from kvstack.cache.attention_stats import attention_with_stats
from kvstack.cache.latent_layer import whole_token_scores
from kvstack.contract import STAT_COLSUM, STAT_LAST, STAT_WINDOW, AttentionStats, LayerView
from kvstack.engine.latent_pool import PagedLatentPool
from kvstack.engine.paged import PagedKVPool
from kvstack.errors import KVStackError
from kvstack.methods.base import Composed, Method
from kvstack.spec import parse

__all__ = ["SequenceCompression", "compaction_copy", "engine_method", "window_weights"]

SUPPORTED_STATS = frozenset({STAT_WINDOW, STAT_COLSUM, STAT_LAST})


def engine_method(spec: str | Method, prompt_length: int, num_layers: int, block_size: int | None = None
                  ) -> Method | None:
    """Parse and check a method for the engine; None when it keeps everything (``full``).

    A page-reading method the engine runs (``quest``, whose page must be the pool's ``block_size``) is returned
    as it is: it keeps every block and changes only what a decoding step reads.

    Raises
    ------
    KVStackError
        On an unknown method or parameter, or a method the engine cannot run (see ``docs/engine-design.md``),
        with one line naming the problem.
    """
    method: Any = parse(spec)
    if isinstance(method, Composed) or getattr(method, "is_codec", False):
        raise KVStackError(f"the engine runs one selection method per request, not {method.label()!r}: codecs are "
                           "not supported in the engine")
    if not isinstance(method, Method):
        raise KVStackError(f"expected a method spec such as 'snapkv(budget=256)', got {type(method).__name__}")
    if method.reads_pages:
        if method.spec_name != "quest":
            raise KVStackError(f"{method.label()} cannot run in the paged engine: its blocks are scored through "
                               "summaries (representative keys, attention statistics) the pool does not keep; "
                               "the engine runs quest, or use "
                               f"{method.spec_name} with kvstack.make_cache")
        if block_size is not None and method.page_size() != block_size:
            raise KVStackError(f"quest's page ({method.page_size()}) must be the engine's block size ({block_size}): "
                               f"Quest's page is the engine's block; give page={block_size}")
        return method
    if method.cross_layer:
        raise KVStackError(f"{method.label()} cannot run in the paged engine: its layers store through other layers' "
                           "stores, which the pool's per-layer blocks do not have; use it with kvstack.make_cache")
    if not method.compresses():
        return None
    name = method.label()
    if method.headwise or method.sparse_attention or method.uses_cache_positions() or method.merges:
        raise KVStackError(f"{name} cannot run in the paged engine (head-wise budgets, sparse attention, "
                           "in-cache positions and merged entries need storage the pool does not have); use "
                           "streamingllm, snapkv, h2o, tova, keynorm or random")
    missing = set(method.needs) - SUPPORTED_STATS
    if missing:
        raise KVStackError(f"{name} needs attention statistics {sorted(missing)} the engine does not collect; "
                           "use streamingllm, snapkv, h2o, tova, keynorm or random")
    budgets = {method.layer_budget(prompt_length, layer, num_layers) for layer in range(num_layers)}
    if len(budgets) > 1:
        raise KVStackError(f"{name} gives layers different budgets; the paged engine needs one budget for every "
                           "layer (use snapkv instead of pyramidkv)")
    return method


@dataclasses.dataclass
class SequenceCompression:
    """Compression state of one request: the true position of every slot and the method's per-slot state.

    ``positions`` and every ``state`` tensor are ``[num_layers, H, S]`` for the ``S`` computed slots.
    """

    method: Method
    prompt_length: int
    budget: int
    num_layers: int
    num_kv_heads: int
    positions: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    window_queries: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    compressed: bool = False
    preemptions_seen: int = -1
    evicted_tokens: int = 0
    freed_blocks: int = 0
    last_stats: dict[int, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)

    @property
    def slots(self) -> int:
        """Computed slots ``S``."""
        return 0 if self.positions is None else int(self.positions.shape[-1])

    def reset(self, cached_slots: int, preemptions: int) -> None:
        """Start over (admission or re-admission): ``cached_slots`` prefix slots already computed."""
        shape = (self.num_layers, self.num_kv_heads, cached_slots)
        self.positions = torch.arange(cached_slots, dtype=torch.int32).expand(shape).clone()
        self.state = {name: torch.zeros(shape) for name in self.method.state_names}
        self.window_queries = [None] * self.num_layers
        self.compressed = False
        self.preemptions_seen = preemptions
        self.last_stats = {}

    def wanted_stats(self, is_prefill: bool) -> frozenset[str]:
        """Statistics the runner collects for this request's next chunk."""
        needs = set(self.method.needs)
        wanted = {name for name in (STAT_COLSUM, STAT_LAST) if name in needs}
        if STAT_WINDOW in needs and is_prefill and not self.compressed:
            wanted.add("queries")
        return frozenset(wanted)

    def after_forward(self, start: int, count: int, stats: dict[int, dict[str, torch.Tensor]],
                      next_position: int, generator: torch.Generator, group_size: int) -> None:
        """Record ``count`` newly computed tokens at positions ``start ..`` and let the method observe them."""
        assert self.positions is not None
        new = torch.arange(start, start + count, dtype=torch.int32).expand(self.num_layers, self.num_kv_heads, count)
        self.positions = torch.cat([self.positions, new], dim=-1)
        for name, tensor in self.state.items():
            self.state[name] = torch.cat([tensor, tensor.new_zeros(self.num_layers, self.num_kv_heads, count)], -1)
        window = self.method.window_queries()
        for layer, layer_stats in stats.items():
            queries = layer_stats.get("queries")
            if queries is not None:
                previous = self.window_queries[layer]
                joined = queries if previous is None else torch.cat([previous, queries], dim=1)
                self.window_queries[layer] = joined[:, -window:]
        self.last_stats = stats
        if self.state:
            for layer in range(self.num_layers):
                view = self.view(layer, None, next_position, generator, group_size, kv_source=_no_kv)
                self.method.observe(view)

    def due(self, prefill_done: bool, block_size: int) -> bool:
        """Whether to compress now (see ``docs/engine-design.md``, section "Compression")."""
        if self.slots <= self.budget:
            if prefill_done:
                self.compressed = self.compressed or not self.method.dynamic
            return False
        if not self.method.dynamic:
            return prefill_done and not self.compressed
        return (prefill_done and not self.compressed) or self.slots >= self.budget + block_size

    def view(self, layer: int, window: torch.Tensor | None, next_position: int, generator: torch.Generator,
             group_size: int, kv_source: Any) -> LayerView:
        """The method's view of one layer (batch of one)."""
        assert self.positions is not None
        stats = self.last_stats.get(layer, {})
        colsum = stats.get("colsum")
        last = stats.get("last")
        return LayerView(
            positions=self.positions[layer][None],
            next_position=torch.tensor([next_position]),
            state={name: tensor[layer][None] for name, tensor in self.state.items()},
            stats=AttentionStats(
                window=window,
                colsum=None if colsum is None else colsum[None],
                last=None if last is None else last[None],
            ),
            layer_idx=layer,
            num_layers=self.num_layers,
            generator=generator,
            group_size=group_size,
            budget=self.budget,
            kv_source=kv_source,
        )

    def choose(self, layer: int, view: LayerView, shared_heads: bool = False) -> torch.Tensor:
        """``[H, budget]`` sorted slots to keep in one layer; ``shared_heads``: the same slots for every head (an
        mla model's latent is one per token), those whose scores summed over the heads are highest."""
        scores = self.method.score(view).float()
        protect = self.method.protect(view)
        if protect is not None:
            scores = scores.masked_fill(protect, float("inf"))
        scores = scores[0]  # [H, S]
        if shared_heads:  # whole tokens, as kvstack.cache.latent_layer keeps them
            keep = whole_token_scores(scores).topk(self.budget, sorted=False).indices.sort().values
            return keep.expand(scores.shape[0], -1)
        return scores.topk(self.budget, dim=-1, sorted=False).indices.sort(dim=-1).values

    def choose_all(self, pool: PagedKVPool | PagedLatentPool, table: list[int], next_position: int,
                   generator: torch.Generator, group_size: int,
                   rebuild: Callable[[int, torch.Tensor, torch.Tensor], tuple] | None = None) -> list[torch.Tensor]:
        """``[H, budget]`` sorted slots to keep in every layer, for the sequence whose block table is ``table``.

        ``rebuild(layer, rotary_keys, latents)``: for an mla model's pool, its keys and values ``[H, S, D]``
        (the policy scores them); every head then keeps the same slots."""
        kept: list[torch.Tensor] = []
        for layer in range(pool.num_layers):
            def load(layer: int = layer) -> tuple[torch.Tensor, torch.Tensor]:
                stored = pool.gather(layer, table, self.slots)
                return stored if rebuild is None else rebuild(layer, *stored)

            gathered = functools.cache(load)  # [H, S, D] x 2, once

            def kv_source(gathered: Any = gathered) -> tuple[torch.Tensor, torch.Tensor]:
                keys, values = gathered()
                return keys[None], values[None]

            window = None
            queries = self.window_queries[layer] if self.window_queries else None
            if queries is not None:
                keys, values = gathered()
                scaling = float(self.last_stats.get(layer, {}).get("scaling", keys.shape[-1] ** -0.5))
                window = window_weights(queries, keys, values, scaling)
            view = self.view(layer, window, next_position, generator, group_size, kv_source)
            kept.append(self.choose(layer, view, shared_heads=rebuild is not None))
        return kept

    def keep(self, kept: list[torch.Tensor], freed_blocks: int) -> None:
        """Apply a compaction that kept slots ``kept[layer]`` (``[H, budget]``) of every layer."""
        assert self.positions is not None
        index = torch.stack(kept)  # [layers, H, budget]
        self.evicted_tokens += self.slots - self.budget
        self.positions = self.positions.gather(-1, index.to(torch.int64))
        self.state = {name: tensor.gather(-1, index) for name, tensor in self.state.items()}
        self.compressed = True
        self.freed_blocks += freed_blocks


def compaction_copy(pool: PagedKVPool | PagedLatentPool, kept: list[torch.Tensor],
                    slots: int) -> Callable[[list[int], list[int]], None]:
    """The ``copy(old_table, new_table)`` of a compaction: the ``kept[layer]`` (``[H, budget]``) of the first ``slots``
    slots of the old table, written into slots ``0 .. budget - 1`` of the new one, in every layer."""

    def copy(old_table: list[int], new_table: list[int]) -> None:
        for layer, index in enumerate(kept):
            # [H, S, D] each; an mla pool's rotary keys [H, S, d] and latents [1, S, r] (every head kept alike)
            keys, values = pool.gather(layer, old_table, slots)
            value_index = index[: values.shape[0]]
            pool.write(layer, new_table, 0, keys.gather(1, index[:, :, None].expand(-1, -1, keys.shape[-1])),
                       values.gather(1, value_index[:, :, None].expand(-1, -1, values.shape[-1])))

    return copy


def _no_kv() -> tuple[torch.Tensor, torch.Tensor]:
    raise KVStackError("a method's observe() read the keys; the engine only gives them when scoring")


def window_weights(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """SnapKV's window statistic: ``[1, Hq, W, S]`` softmax weights of the last ``W`` queries over ``S`` slots.

    ``queries`` ``[Hq, W, D]`` are the queries of slots ``S - W .. S - 1`` (the prompt's end; nothing has been
    evicted before a static method compresses), ``keys`` and ``values`` ``[H, S, D]``; query ``j`` sees slots
    ``<= S - W + j``: the trailing-chunk mask of :func:`kvstack.cache.attention_stats.attention_with_stats`
    (``causal=None``), which computes the statistic as the cache does.
    """
    window = queries.shape[1]
    _, stats = attention_with_stats(
        queries.float()[None], keys.float()[None], values.float()[None], causal=None, past_valid=None,
        scaling=float(scaling), needs={STAT_WINDOW}, window=window,
    )
    assert stats.window is not None
    return stats.window
