"""KV-cache selection (taxonomy §1.1): which entries to keep.

Static methods (``snapkv``, ``keynorm``, ``random``) compress once, when the prompt has been read.
Dynamic methods (``streamingllm``, ``h2o``, ``tova``, ``scissorhands``) hold their budget at every forward:
through chunked prefill and through decoding, with permanent eviction.
"""

from __future__ import annotations

import dataclasses

from kvstack.lazy_import import lazy_module
from kvstack.methods.base import (
    STAT_BELOW_MEAN,
    STAT_COLSUM,
    STAT_LAST,
    STAT_WINDOW,
    BudgetedMethod,
    LayerView,
    check_sizes,
    group_mean,
    recent_mask,
    sink_mask,
)
from kvstack.spec import SpecError, register

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


def pool_along_positions(
    scores: torch.Tensor, positions: torch.Tensor, kernel: int, mode: str, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Smooth ``[B, H, L]`` scores with a 1-D pool of width ``kernel`` over entries ordered by position.

    Entries may sit in any slot order inside the cache, so they are sorted by position, pooled
    (stride 1, same length) and put back. Padding and ``exclude`` (``[B, H, L]`` bool, e.g. SnapKV's
    observation window, which is kept anyway) take no part in any neighbourhood; a neighbourhood
    averages over the entries it has.
    """
    if kernel <= 1:
        return scores
    order = positions.argsort(dim=-1)
    ordered = scores.gather(-1, order)
    usable = positions >= 0 if exclude is None else (positions >= 0) & ~exclude
    valid = usable.gather(-1, order).to(scores.dtype)
    batch, heads, length = ordered.shape
    flat = ordered.reshape(batch * heads, 1, length)
    flat_valid = valid.reshape(batch * heads, 1, length)
    if mode == "max":
        flat = flat.masked_fill(flat_valid == 0, float("-inf"))
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        total = F.avg_pool1d(flat * flat_valid, kernel, stride=1, padding=kernel // 2)
        count = F.avg_pool1d(flat_valid, kernel, stride=1, padding=kernel // 2)
        pooled = total / count.clamp(min=1e-12)
    pooled = pooled[..., :length].reshape(batch, heads, length)
    return torch.empty_like(scores).scatter_(-1, order, pooled)


@register(
    "snapkv",
    category="token/selection/static",
    description=(
        "SnapKV: attention of the last `window` prompt queries, pooled over `kernel` "
        "neighbours; keeps the top entries plus the window."
    ),
)
@dataclasses.dataclass
class SnapKV(BudgetedMethod):
    """SnapKV (Li et al., 2024).

    For each KV head, sum the softmax weights the last ``window`` prompt queries (an observation
    window) give each earlier entry, averaged over the query heads of the group, smooth with a 1-D
    pool of width ``kernel``, and keep the top entries; the window itself is always kept.
    """

    window: int = 32
    kernel: int = 7
    pooling: str = "avg"

    needs = frozenset({STAT_WINDOW})

    def __post_init__(self) -> None:
        check_sizes(window=self.window, kernel=self.kernel)
        if self.pooling not in ("avg", "max"):
            raise SpecError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        super().__post_init__()

    def min_budget(self) -> int:
        return self.window

    def kept_parts(self) -> str:
        return f"observation window {self.window}"

    def window_queries(self) -> int:
        return self.window

    def protect(self, view: LayerView) -> torch.Tensor:
        return recent_mask(view, self.window)

    def score(self, view: LayerView) -> torch.Tensor:
        weights = view.stats.window  # [B, Hq, W, L]
        assert weights is not None, "snapkv needs the window statistic"
        per_kv_head = group_mean(weights.sum(dim=2), view.num_kv_heads)  # [B, H, L]
        window = recent_mask(view, self.window)  # pooled over the prefix only, as in the paper's code
        return pool_along_positions(per_kv_head, view.positions, self.kernel, self.pooling, exclude=window)


@register(
    "keynorm",
    category="token/selection/static",
    description="Key-norm (L2): keeps the keys with the lowest L2 norm; needs no attention weights.",
)
@dataclasses.dataclass
class KeyNorm(BudgetedMethod):
    """Keep the entries whose keys have the smallest L2 norm (Devoto et al., 2024)."""

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)


@register("random", category="token/selection/static", description="Random selection: the honest baseline (seeded).")
@dataclasses.dataclass
class RandomSelection(BudgetedMethod):
    """Keep a uniformly random subset of entries (seeded by the cache's generator)."""

    def score(self, view: LayerView) -> torch.Tensor:
        return torch.rand(view.positions.shape, generator=view.generator, device="cpu").to(view.positions.device)


@register(
    "streamingllm",
    category="token/selection/dynamic",
    description=(
        "StreamingLLM: `sinks` first tokens + the most recent ones; positions='cache' "
        "re-assigns RoPE positions by cache slot."
    ),
)
@dataclasses.dataclass
class StreamingLLM(BudgetedMethod):
    """StreamingLLM (Xiao et al., 2024): attention sinks plus a window of recent tokens.

    ``positions="original"`` keeps every token at its true RoPE position. ``positions="cache"`` is the
    paper's scheme: inside the cache, entries take positions by their slot (sinks ``0..s-1``, then the
    window in order) and the query takes the next one, so relative distances never exceed the budget.
    """

    sinks: int = 4
    positions: str = "original"

    dynamic = True

    def __post_init__(self) -> None:
        check_sizes(sinks=self.sinks)
        if self.positions not in ("original", "cache"):
            raise SpecError(f"positions must be 'original' or 'cache', got {self.positions!r}")
        super().__post_init__()

    def min_budget(self) -> int:
        return self.sinks + 1

    def kept_parts(self) -> str:
        return f"{self.sinks} sinks + at least 1 recent token"

    def protect(self, view: LayerView) -> torch.Tensor:
        return sink_mask(view, self.sinks) | recent_mask(view, view.budget - self.sinks)

    def score(self, view: LayerView) -> torch.Tensor:
        return view.positions.float()  # most recent first

    def uses_cache_positions(self) -> bool:
        return self.positions == "cache"


def _recent_count(budget: int, recent: int | None) -> int:
    return budget // 2 if recent is None else min(recent, budget)


@register(
    "h2o",
    category="token/selection/dynamic",
    description=(
        "H2O: heavy hitters by accumulated attention + a recent window (half "
        "the budget unless `recent` is set)."
    ),
)
@dataclasses.dataclass
class H2O(BudgetedMethod):
    """Heavy-Hitter Oracle (Zhang et al., 2023).

    Every KV head accumulates the attention each entry receives (summed over its group's query heads
    and over all queries so far). The budget is a recent window plus the entries with the largest
    accumulated attention; at each forward the others are evicted.
    """

    recent: int | None = None

    needs = frozenset({STAT_COLSUM})
    dynamic = True
    state_names = ("accumulated",)

    def __post_init__(self) -> None:
        check_sizes(recent=self.recent)
        super().__post_init__()

    def min_budget(self) -> int:
        return self.recent or 0

    def kept_parts(self) -> str:
        return f"recent window {self.recent}"

    def protect(self, view: LayerView) -> torch.Tensor:
        return recent_mask(view, _recent_count(view.budget, self.recent))

    def observe(self, view: LayerView) -> None:
        assert view.stats.colsum is not None
        view.state["accumulated"] += view.stats.colsum

    def score(self, view: LayerView) -> torch.Tensor:
        return view.state["accumulated"]


@register(
    "tova",
    category="token/selection/dynamic",
    description=(
        "TOVA: evicts the entry with the lowest attention from the current "
        "query, averaged over the layer's heads."
    ),
)
@dataclasses.dataclass
class TOVA(BudgetedMethod):
    """Token Omission Via Attention (Oren et al., 2024): a layer-wise decision from the last query."""

    needs = frozenset({STAT_LAST})
    dynamic = True

    def score(self, view: LayerView) -> torch.Tensor:
        last = view.stats.last  # [B, Hq, L]
        assert last is not None
        return last.mean(dim=1, keepdim=True).expand(-1, view.num_kv_heads, -1)


@register(
    "scissorhands",
    category="token/selection/dynamic",
    description=(
        "Scissorhands: drops the non-recent entries most often given below-average "
        "attention over a history of `history` queries."
    ),
)
@dataclasses.dataclass
class Scissorhands(BudgetedMethod):
    """Scissorhands (Liu et al., 2023): persistence of importance.

    Each entry carries the fraction of recent queries that gave it less than the average attention
    (``1 / visible entries``), as an exponential moving average whose span is ``history`` queries (a
    smooth stand-in for the paper's fixed history window). Entries outside the ``recent`` window with
    the highest fraction are dropped first.
    """

    recent: int | None = None
    history: int = 32

    needs = frozenset({STAT_BELOW_MEAN})
    dynamic = True
    state_names = ("unimportance",)

    def __post_init__(self) -> None:
        check_sizes(recent=self.recent, history=self.history)
        if self.history < 1:
            raise SpecError(f"history must be >= 1 query, got {self.history}")
        super().__post_init__()

    def min_budget(self) -> int:
        return self.recent or 0

    def kept_parts(self) -> str:
        return f"recent window {self.recent}"

    def protect(self, view: LayerView) -> torch.Tensor:
        return recent_mask(view, _recent_count(view.budget, self.recent))

    def observe(self, view: LayerView) -> None:
        stats = view.stats
        assert stats.below_mean is not None and stats.queries_seen is not None
        seen = stats.queries_seen
        fraction = torch.where(seen > 0, stats.below_mean / seen.clamp(min=1), torch.zeros_like(seen))
        # Each forward brings `seen / G` queries; weight the update as that many EMA steps.
        steps = seen / view.group_size
        keep = (1.0 - 1.0 / self.history) ** steps
        state = view.state["unimportance"]
        state.mul_(keep).add_((1.0 - keep) * fraction)

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.state["unimportance"]
