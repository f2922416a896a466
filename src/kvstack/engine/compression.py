"""Token-level KV compression inside the paged engine: the core's selection policies, per request, freeing blocks.

A request added with a method (``engine.add_request(prompt, params, method="snapkv(budget=256)")``) runs the
same :class:`~kvstack.methods.base.Method` objects as :func:`kvstack.make_cache`: their ``score``, ``protect``
and ``observe`` see a :class:`~kvstack.methods.base.LayerView` of the sequence's slots in one layer, built from
the paged pool, and the statistics they need (SnapKV's observation-window weights, H2O's accumulated
attention, TOVA's last-query weights) are computed by the runner for that sequence's chunks
(:func:`~kvstack.engine.runner.chunk_statistics`).

Eviction in a paged pool
------------------------
Every KV head of every layer keeps the same number of slots, ``budget``, but each head chooses *which*
tokens: keys are stored after RoPE at their true positions, so attention needs no positions, only slots.
Evicting is a **compaction** (:meth:`~kvstack.engine.scheduler.Scheduler.compact`): the kept entries of each
(layer, head) are copied into slots ``0 .. budget - 1`` of fresh blocks and the old blocks are released, so
blocks shared with other requests (a cached system prompt) stay for them and the rest return to the pool.
New tokens then take slots ``budget, budget + 1, ...`` while their RoPE positions keep counting
(:attr:`Sequence.num_evicted` is the gap).

When
----
* Static methods (SnapKV, key-norm, random) compress once, when the prompt has been computed, as in the core.
* Dynamic methods (StreamingLLM, H2O, TOVA) compress when the prompt has been computed and then whenever
  the sequence's slots reach ``budget + block_size`` (during chunked prefill too), back to ``budget``: the
  budget is held to within one block, which is the unit the pool can free. (The core's cache evicts one
  entry per step; the paged engine evicts a block's worth at once.)

Budgets given as a ratio are taken of the prompt length. Every request counts the tokens it evicted and
the blocks it released (``Engine.metrics()``: ``compression_evicted_tokens``, ``compression_freed_blocks``).

Limitations
-----------
* One budget for every layer: PyramidKV's layer-wise budgets are refused, as are head-wise allocation
  (Ada-KV), sparse attention without eviction (Loki), re-assigned positions (StreamingLLM
  ``positions='cache'``), codecs, and methods needing statistics other than the window, column sums and last
  query (Scissorhands).
* A prompt prefix reused from the prefix cache was computed for another request: H2O's accumulated
  attention for those tokens starts with what later queries give them (their own queries never ran here).
* A compressed request that is preempted is recomputed from its tokens and compressed again.
* Statistics are computed in PyTorch for the compressed requests' chunks (an extra pass over their keys).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvstack.errors import KVStackError
from kvstack.methods.base import (
    STAT_COLSUM,
    STAT_LAST,
    STAT_WINDOW,
    AttentionStats,
    Composed,
    LayerView,
    Method,
)
from kvstack.spec import parse

__all__ = ["SequenceCompression", "engine_method"]

SUPPORTED_STATS = frozenset({STAT_WINDOW, STAT_COLSUM, STAT_LAST})


def engine_method(spec: str | Method, prompt_length: int, num_layers: int) -> Method | None:
    """Parse and check a method for the engine; None when it keeps everything (``full``).

    Raises
    ------
    KVStackError
        On an unknown method or parameter, or a method the engine cannot run (see the module docstring),
        with one line naming the problem.
    """
    method: Any = parse(spec)
    if isinstance(method, Composed) or getattr(method, "is_codec", False):
        raise KVStackError(f"the engine runs one selection method per request, not {method.label()!r}: codecs are "
                           "not supported in the engine")
    if not isinstance(method, Method):
        raise KVStackError(f"expected a method spec such as 'snapkv(budget=256)', got {type(method).__name__}")
    if not method.compresses():
        return None
    name = method.label()
    if method.headwise or method.sparse_attention or method.uses_cache_positions():
        raise KVStackError(f"{name} cannot run in the paged engine (head-wise budgets, sparse attention and "
                           "in-cache positions need storage the pool does not have); use streamingllm, snapkv, "
                           "h2o, tova, keynorm or random")
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
        """Whether to compress now (see the module docstring)."""
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

    def choose(self, layer: int, view: LayerView) -> torch.Tensor:
        """``[H, budget]`` sorted slots to keep in one layer."""
        scores = self.method.score(view).float()
        protect = self.method.protect(view)
        if protect is not None:
            scores = scores.masked_fill(protect, float("inf"))
        return scores[0].topk(self.budget, dim=-1, sorted=False).indices.sort(dim=-1).values

    def keep(self, kept: list[torch.Tensor], freed_blocks: int) -> None:
        """Apply a compaction that kept slots ``kept[layer]`` (``[H, budget]``) of every layer."""
        assert self.positions is not None
        index = torch.stack(kept)  # [layers, H, budget]
        self.evicted_tokens += self.slots - self.budget
        self.positions = self.positions.gather(-1, index.to(torch.int64))
        self.state = {name: tensor.gather(-1, index) for name, tensor in self.state.items()}
        self.compressed = True
        self.freed_blocks += freed_blocks


def _no_kv() -> tuple[torch.Tensor, torch.Tensor]:
    raise KVStackError("a method's observe() read the keys; the engine only gives them when scoring")


def window_weights(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """SnapKV's window statistic: ``[1, Hq, W, S]`` softmax weights of the last ``W`` queries over ``S`` slots.

    ``queries`` ``[Hq, W, D]`` are the queries of slots ``S - W .. S - 1`` (the prompt's end; nothing has been
    evicted before a static method compresses), ``keys`` ``[H, S, D]``; query ``j`` sees slots
    ``<= S - W + j``.
    """
    num_q_heads, window, dim = queries.shape
    heads, length, _ = keys.shape
    group = num_q_heads // heads
    grouped = queries.float().reshape(heads, group * window, dim)
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2)) * scaling  # [H, G*W, S]
    query_slots = (length - window + torch.arange(window)).repeat(group)
    scores = scores.masked_fill(torch.arange(length)[None, :] > query_slots[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(num_q_heads, window, length)[None]
