"""KV-cache merging within a layer (taxonomy §1.3): what an eviction method drops is folded into what it keeps.

Each method wraps an eviction method (its *base*), which still decides which entries stay and how many;
instead of dropping the others, the merging method changes the kept entries so they carry the evicted
ones' contribution (:meth:`merge`), then storage evicts as usual, so the savings are the base's, measured
the same way. The spec reads ``cam(h2o(ratio=0.75))``.

* ``cam``: CaM (Zhang et al., ICML 2024). An evicted value is added to the values of the kept entries that
  follow it, scaled so that the attention output keeps the evicted entry's share (values only).
* ``d2o``: D2O (Wan et al., 2024). Layer budgets from each layer's attention density; an evicted key is
  averaged into its most similar kept key when the cosine similarity beats an exponential moving average
  of past best similarities, else dropped.
* ``kvmerger``: KVMerger (Wang et al., 2024). Runs of consecutive keys whose neighbours are similar form
  merging sets; a set's evicted members are merged into its most-attended kept member with Gaussian-kernel
  weights.

With ``proportional=True`` (D2O, KVMerger) a merged entry carries ``log(mass)``, the log of how many tokens
it stands for, as per-entry state; storage adds it to the entry's attention logit, so merging ``n``
identical entries changes no attention output (the papers' plain averages do not keep that count).
The extra state is counted by ``kv_bytes()``.

Shapes: ``B`` batch, ``H`` KV heads, ``L`` entries of the layer (the view's order), ``E`` evicted entries per
head, ``K`` kept, ``D`` head dimension.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from kvstack.lazy_import import lazy_module
from kvstack.methods.base import (
    STAT_COLSUM,
    BudgetedMethod,
    LayerView,
    MergeUpdate,
    WrapperMethod,
    check_sizes,
)
from kvstack.spec import SpecError, register

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

LOG_MASS = "log_mass"
BASES = "snapkv, pyramidkv, h2o, tova, scissorhands, streamingllm, keynorm or random"


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False) -> float:
    """Return ``value`` as a float if it is a number within the interval; :class:`SpecError` otherwise."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise SpecError(f"{name} must be a number in {interval}, got {value!r}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise SpecError(f"{name} must be in {interval}, got {value}")
    return float(value)


@dataclasses.dataclass
class MergingMethod(WrapperMethod):
    """Base of the intra-layer merging methods: an eviction base decides, the subclass merges."""

    inner: Any = dataclasses.field(default=None)

    merges = True
    extra_needs: ClassVar[frozenset[str]] = frozenset()  # statistics the merge reads besides the base's

    def __post_init__(self) -> None:
        name = self.spec_name
        example = f"e.g. {name}(h2o(ratio=0.75))"
        if self.inner is None:
            raise SpecError(f"{name} merges what an eviction method drops: give it one, {example}")
        inner = self.inner
        if getattr(inner, "headwise", False) or getattr(inner, "sparse_attention", False) or getattr(
                inner, "merges", False) or (hasattr(inner, "demotion_codec") and inner.demotion_codec() is not None):
            raise SpecError(f"{name} needs one uniform budget per layer and entries it can drop: wrap one of {BASES}, "
                            f"not {inner.label()!r}")
        if not isinstance(inner, BudgetedMethod) or not inner.compresses():
            raise SpecError(f"{name} wraps an eviction method with a budget ({BASES}), {example}; "
                            f"got {inner.label()!r}")
        if self.inner.uses_cache_positions():
            raise SpecError(f"{name} needs true positions: use streamingllm with positions='original' inside it")
        self.adopt_inner()
        self.needs = frozenset(self.inner.needs) | self.extra_needs  # type: ignore[misc]
        self.dynamic = self.inner.dynamic  # type: ignore[misc]
        if getattr(self, "proportional", False):
            self.state_names = (*self.inner.state_names, LOG_MASS)  # type: ignore[misc]
            self.mass_state = LOG_MASS  # type: ignore[misc]


def _kept_mask(view: LayerView, evicted: torch.Tensor) -> torch.Tensor:
    """``[B, H, L]`` True for the entries that stay (not evicted, not padding)."""
    kept = torch.ones_like(view.positions, dtype=torch.bool).scatter_(-1, evicted, False)
    return kept & (view.positions >= 0)


def _rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, D]`` rows of ``tensor`` ``[B, H, L, D]`` at ``index`` ``[B, H, n]``."""
    return tensor.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def _add_rows(tensor: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``tensor`` ``[B, H, L, D]`` with ``rows`` ``[B, H, n, D]`` added at ``index`` ``[B, H, n]`` (repeats add up)."""
    return tensor.scatter_add(2, index.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]), rows)


def _merged_log_mass(view: LayerView, evicted: torch.Tensor, target: torch.Tensor,
                     merged: torch.Tensor) -> torch.Tensor:
    """``[B, H, L]`` log-masses once the evicted entries flagged ``merged`` ``[B, H, E]`` join ``target``."""
    log_mass = view.state[LOG_MASS]
    mass = log_mass.exp()
    moved = log_mass.gather(-1, evicted).exp() * merged
    return mass.scatter_add(-1, target, moved).log()


# ------------------------------------------------------------------------------------------------ CaM
@register(
    "cam",
    category="token/merging/intra-layer",
    description=(
        "CaM: an evicted value is added to the next `recipients` kept values, scaled by its attention "
        "share, so the attention output keeps it."
    ),
    wraps=True,
)
@dataclasses.dataclass
class CaM(MergingMethod):
    """Cache Merging (CaM; Zhang et al., ICML 2024) around an eviction method.

    The evicted entry ``e`` gives ``a_e v_e`` to the attention output (``a`` the attention this forward's queries
    paid each entry, from the column sums). Its value is added to the values of the ``recipients`` kept
    entries that follow it in position (the last ones when it is newer than all but a few), each taking
    ``c = min(1, a_e / mean_R a) / m`` of it. Since ``sum_R a_j c = min(a_e, mean_R a)``, the recipients give
    back exactly the evicted share ``a_e v_e`` whenever ``a_e`` is at most their mean attention; beyond that
    the share is capped, as the paper's merge probability is. ``sampling='bernoulli'`` is the paper's
    stochastic form: the value is added (as ``v_e / m``) with probability ``min(1, a_e / mean_R a)``, the same
    in expectation. Keys are not changed.

    ``proportional=True`` keeps the same numerator as a weight instead of a sum: a recipient's mass grows by
    ``c * mass_e`` and its value becomes the mass-weighted average, so ``mass * value`` gains exactly
    CaM's ``c v_e`` while the entry's ``log(mass)`` enters its attention logit. Under a base that evicts at
    every step, values then stay convex combinations instead of piling up additions. The recent entries
    then receive from every eviction and their mass grows without bound; ``max_mass`` (0: no cap) scales a
    recipient's intake down so that its mass never passes the cap (an entry already above it takes nothing).
    """

    recipients: int = 16
    sampling: str = "expected"
    proportional: bool = False
    max_mass: float = 0.0

    extra_needs = frozenset({STAT_COLSUM})

    def __post_init__(self) -> None:
        check_sizes(recipients=self.recipients)
        if self.recipients < 1:
            raise SpecError(f"recipients must be >= 1 kept entry, got {self.recipients}")
        if self.sampling not in ("expected", "bernoulli"):
            raise SpecError(f"sampling must be 'expected' or 'bernoulli', got {self.sampling!r}")
        if isinstance(self.max_mass, bool) or not isinstance(self.max_mass, (int, float)) or not (
                self.max_mass == 0 or self.max_mass >= 1):
            raise SpecError(f"max_mass must be 0 (no cap) or a mass >= 1, got {self.max_mass!r}")
        if self.max_mass and not self.proportional:
            raise SpecError("max_mass caps the mass proportional=True gives entries; add proportional=True")
        super().__post_init__()

    def merge(self, view: LayerView, evicted: torch.Tensor) -> MergeUpdate:
        attention = view.stats.colsum  # [B, H, L]
        assert attention is not None, "cam needs the column-sum statistic"
        kept = _kept_mask(view, evicted)
        recipients, usable = _following_kept(view.positions, kept, evicted, self.recipients)  # [B, H, E, m]
        share = attention.gather(-1, recipients.flatten(2)).view(recipients.shape) * usable
        count = usable.sum(dim=-1).clamp(min=1)  # [B, H, E]
        mean = share.sum(dim=-1) / count
        evicted_attention = attention.gather(-1, evicted)
        ratio = torch.where(mean > 0, evicted_attention / mean.clamp(min=1e-30), (evicted_attention > 0).float())
        ratio = ratio.clamp(max=1.0)
        if self.sampling == "bernoulli":
            ratio = torch.bernoulli(ratio.cpu(), generator=view.generator).to(ratio.device)
        valid = (view.positions.gather(-1, evicted) >= 0) & usable.any(dim=-1)
        coefficient = (ratio / count * valid).unsqueeze(-1) * usable  # [B, H, E, m]
        values = view.values.float()
        evicted_values = _rows(values, evicted)  # [B, H, E, D]
        if self.proportional:
            mass = view.state[LOG_MASS].exp()  # [B, H, L]
            moved = coefficient * mass.gather(-1, evicted).unsqueeze(-1)  # [B, H, E, m]
            new_mass = mass.scatter_add(-1, recipients.flatten(2), moved.flatten(2))
            added = moved.unsqueeze(-1) * evicted_values.unsqueeze(3)  # [B, H, E, m, D]
            gained = _add_rows(torch.zeros_like(values), recipients.flatten(2), added.flatten(2, 3))
            if self.max_mass:  # scale each recipient's intake down so that its mass stays within the cap
                capped = torch.minimum(new_mass, torch.maximum(mass, torch.full_like(mass, self.max_mass)))
                intake = new_mass - mass
                scale = torch.where(intake > 0, (capped - mass) / intake.clamp(min=1e-30), torch.ones_like(mass))
                gained, new_mass = gained * scale.unsqueeze(-1), capped
            weighted = values * mass.unsqueeze(-1) + gained
            touched = (new_mass > mass).unsqueeze(-1)  # untouched entries stay bit-exact
            merged = torch.where(touched, weighted / new_mass.unsqueeze(-1), values)
            return MergeUpdate(values=merged.to(view.values.dtype), state={LOG_MASS: new_mass.log()})
        added = coefficient.unsqueeze(-1) * evicted_values.unsqueeze(3)  # [B, H, E, m, D]
        merged = _add_rows(values, recipients.flatten(2), added.flatten(2, 3))
        return MergeUpdate(values=merged.to(view.values.dtype))


def _following_kept(positions: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor, count: int) -> tuple:
    """The ``count`` kept entries following each evicted one in position order (the newest ``count`` kept when
    fewer follow it).

    Returns ``[B, H, E, m]`` indices into the view (``m = count``) and a bool of which are real (a head keeping
    fewer than ``count`` entries repeats its last).
    """
    order_key = torch.where(kept, positions.float(), torch.full_like(positions, torch.inf, dtype=torch.float32))
    sorted_positions, order = order_key.sort(dim=-1)  # kept entries first, by position
    kept_count = kept.sum(dim=-1, keepdim=True)  # [B, H, 1]
    evicted_positions = positions.gather(-1, evicted).float().contiguous()
    after = torch.searchsorted(sorted_positions.contiguous(), evicted_positions)  # kept entries older than e
    start = torch.minimum(after, (kept_count - count).clamp(min=0))
    steps = torch.arange(count, device=positions.device)
    rank = start.unsqueeze(-1) + steps  # [B, H, E, m]
    usable = rank < kept_count.unsqueeze(-1)
    rank = torch.minimum(rank, (kept_count.unsqueeze(-1) - 1).clamp(min=0))
    return order.gather(-1, rank.flatten(2)).view(rank.shape), usable


# ------------------------------------------------------------------------------------------------ D2O
@register(
    "d2o",
    category="token/merging/intra-layer",
    description=(
        "D2O: layer budgets from attention density; an evicted key joins its most similar kept key when the "
        "cosine similarity beats an EMA threshold."
    ),
    wraps=True,
)
@dataclasses.dataclass
class D2O(MergingMethod):
    """Dynamic Discriminative Operations (D2O; Wan et al., 2024) around an eviction method.

    *Layer level* (``layers='density'``): each layer's attention density is measured on its first forward
    (the effective fraction of the entries its heads attend to, ``exp(entropy) / n`` of the mean attention
    over the forward's queries); the layers then share the base's total budget in proportion to it (no layer
    below a quarter of the base budget nor above the context), from their next eviction on. Dense layers
    keep more, sparse layers less; the total is the base's, exactly.

    *Token level*: each evicted key is compared by cosine similarity with the kept keys of its head; its best
    similarity joins an exponential moving average (``ema`` the weight of the past) of each head's mean best
    similarity, the threshold. An evicted entry whose best similarity reaches the threshold is merged into
    that kept entry, with weights ``exp(s_e) / (sum exp(s) + e)`` for the evicted and ``e / (sum exp(s) + e)``
    for the kept one (its own similarity 1), keys and values alike; the others are dropped.
    """

    ema: float = 0.7
    layers: str = "density"
    proportional: bool = True

    extra_needs = frozenset({STAT_COLSUM})
    layer_state_names = ("threshold", "updates")

    def __post_init__(self) -> None:
        _check_number("ema", self.ema, 0.0, 1.0, high_open=True)
        if self.layers not in ("density", "uniform"):
            raise SpecError(f"layers must be 'density' or 'uniform', got {self.layers!r}")
        if not isinstance(self.proportional, bool):
            raise SpecError(f"proportional must be True or False, got {self.proportional!r}")
        super().__post_init__()
        self.allocates_layers = self.layers == "density"  # type: ignore[misc]

    # -- layer level
    def layer_statistic(self, view: LayerView) -> torch.Tensor:
        colsum = view.stats.colsum  # [B, H, L]
        assert colsum is not None, "d2o needs the column-sum statistic"
        valid = view.positions >= 0
        total = colsum.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        p = (colsum / total).clamp(min=0)
        entropy = -(p * p.clamp(min=1e-30).log()).sum(dim=-1)  # [B, H]
        count = valid.sum(dim=-1).clamp(min=1)
        return (entropy.exp() / count).mean(dim=-1)  # [B]

    def allocate_layers(self, statistics: torch.Tensor, context_length: int) -> list[int]:
        num_layers = statistics.shape[0]
        base = self.inner.layer_budget(context_length, 0, num_layers)
        if base is None:
            return [context_length] * num_layers
        low = min(max(self.inner.min_budget(), math.ceil(base / 4)), base)
        return proportional_budgets(statistics.tolist(), base * num_layers, low, max(context_length, base))

    # -- token level
    def merge(self, view: LayerView, evicted: torch.Tensor) -> MergeUpdate:
        kept = _kept_mask(view, evicted)
        keys, values = view.keys.float(), view.values.float()
        unit = F.normalize(keys, dim=-1)
        similarity = _rows(unit, evicted) @ unit.transpose(-1, -2)  # [B, H, E, L]
        similarity = similarity.masked_fill(~kept.unsqueeze(2), float("-inf"))
        best, target = similarity.max(dim=-1)  # [B, H, E]
        real = (view.positions.gather(-1, evicted) >= 0) & torch.isfinite(best)
        threshold, updates = view.layer_state["threshold"], view.layer_state["updates"]
        step_mean = torch.where(real.any(dim=-1), (best * real).nan_to_num(0.0).sum(-1) / real.sum(-1).clamp(min=1),
                                threshold)
        first = updates == 0
        threshold.copy_(torch.where(first, step_mean, self.ema * threshold + (1 - self.ema) * step_mean))
        updates.add_(real.any(dim=-1).float())
        merged = real & (best >= threshold.unsqueeze(-1))
        weight = torch.where(merged, best.clamp(min=-1.0).exp(), torch.zeros_like(best))  # [B, H, E]
        denominator = torch.full_like(view.positions, math.e, dtype=torch.float32).scatter_add(-1, target, weight)
        new_keys = _add_rows(keys * math.e, target, weight.unsqueeze(-1) * _rows(keys, evicted))
        new_values = _add_rows(values * math.e, target, weight.unsqueeze(-1) * _rows(values, evicted))
        touched = (denominator > math.e).unsqueeze(-1)  # untouched entries stay bit-exact
        scale = denominator.unsqueeze(-1)
        new_keys = torch.where(touched, new_keys / scale, keys)
        new_values = torch.where(touched, new_values / scale, values)
        state = {LOG_MASS: _merged_log_mass(view, evicted, target, merged)} if self.proportional else {}
        return MergeUpdate(keys=new_keys.to(view.keys.dtype), values=new_values.to(view.values.dtype), state=state)


def proportional_budgets(weights: list[float], total: int, low: int, high: int) -> list[int]:
    """Integer budgets proportional to ``weights``, each in ``[low, high]``, summing to ``total`` exactly.

    Budgets are ``clamp(scale * weight, low, high)`` with the scale found by bisection so that they sum to
    the total (water-filling); the rounding remainder goes to the largest fractional parts.
    """
    count = len(weights)
    total = max(min(total, high * count), low * count)
    weights = [max(w, 0.0) if math.isfinite(w) else 0.0 for w in weights]
    top = max(weights)
    # Relative weights (a tiny or denormal largest weight would underflow the floor below), and a small floor
    # on each that lets every budget reach `high` as the scale grows, so any total is reachable.
    weights = [w / top if top > 0 else 1.0 for w in weights]
    epsilon = 1e-6
    weights = [w + epsilon for w in weights]

    def shares_at(scale: float) -> list[float]:
        return [min(max(scale * w, low), high) for w in weights]

    lo, hi = 0.0, high / epsilon
    for _ in range(200):  # bisection on the scale: the clamped sum grows with it
        mid = (lo + hi) / 2
        if sum(shares_at(mid)) < total:
            lo = mid
        else:
            hi = mid
    shares = shares_at(hi)
    floors = [math.floor(s) for s in shares]
    remainder = total - sum(floors)
    order = sorted(range(count), key=lambda i: shares[i] - floors[i], reverse=True)
    while remainder > 0:  # the rounding remainder, largest fractional parts first
        for i in order:
            if remainder > 0 and floors[i] < high:
                floors[i] += 1
                remainder -= 1
    while remainder < 0:
        for i in reversed(order):
            if remainder < 0 and floors[i] > low:
                floors[i] -= 1
                remainder += 1
    return floors


# ------------------------------------------------------------------------------------------------ KVMerger
@register(
    "kvmerger",
    category="token/merging/intra-layer",
    description=(
        "KVMerger: runs of consecutive similar keys form merging sets; evicted members merge into the set's "
        "most-attended kept member, Gaussian-kernel weights."
    ),
    wraps=True,
)
@dataclasses.dataclass
class KVMerger(MergingMethod):
    """KVMerger (Wang et al., 2024, "Model Tells You Where to Merge") around an eviction method.

    Entries of a head, in position order, are cut wherever the cosine similarity of two neighbouring keys
    is below ``threshold``: each run is a merging set. The set's pivot is its kept member the base scores
    highest (its most-attended); the set's evicted members are merged into it with Gaussian-kernel weights
    ``w = exp(-|k - k_pivot|^2 / (2 sigma^2))`` (the pivot's own weight 1), keys and values alike. ``sigma``
    None takes each set's root mean squared distance to its pivot. Evicted entries whose set keeps no member
    are dropped.
    """

    threshold: float = 0.8
    sigma: float | None = None
    proportional: bool = True

    def __post_init__(self) -> None:
        _check_number("threshold", self.threshold, -1.0, 1.0)
        if self.sigma is not None:
            _check_number("sigma", self.sigma, 0.0, math.inf, low_open=True, high_open=True)
        if not isinstance(self.proportional, bool):
            raise SpecError(f"proportional must be True or False, got {self.proportional!r}")
        super().__post_init__()

    def merge(self, view: LayerView, evicted: torch.Tensor) -> MergeUpdate:
        kept = _kept_mask(view, evicted)
        keys, values = view.keys.float(), view.values.float()
        batch, heads, length, _ = keys.shape
        valid = view.positions >= 0
        order = torch.where(valid, view.positions.float(), torch.full_like(keys[..., 0], -1.0)).argsort(dim=-1)
        sorted_keys = _rows(keys, order)
        sorted_valid = valid.gather(-1, order)
        neighbour = F.cosine_similarity(sorted_keys[:, :, 1:], sorted_keys[:, :, :-1], dim=-1)  # [B, H, L-1]
        joined = (neighbour >= self.threshold) & sorted_valid[:, :, 1:] & sorted_valid[:, :, :-1]
        cut = torch.cat((torch.ones_like(joined[..., :1]), ~joined), dim=-1)
        set_id = cut.long().cumsum(dim=-1) - 1  # [B, H, L] in sorted order, 0-based per head
        row = torch.arange(batch * heads, device=keys.device).view(batch, heads, 1) * length
        group = torch.empty_like(set_id).scatter_(-1, order, set_id) + row  # [B, H, L] global set id per entry
        # The pivot: the kept member the base scores highest (ties: the lowest index).
        score = self.inner.score(view).float().masked_fill(~kept, float("-inf"))
        best = torch.full((batch * heads * length,), float("-inf"), device=keys.device)
        best = best.scatter_reduce(0, group.flatten(), score.flatten(), "amax")
        is_best = kept & (score == best[group])
        index = torch.arange(length, device=keys.device).expand_as(group)
        candidate = torch.where(is_best, index, torch.full_like(index, length))
        pivot_of_set = torch.full((batch * heads * length,), length, device=keys.device, dtype=torch.long)
        pivot_of_set = pivot_of_set.scatter_reduce(0, group.flatten(), candidate.flatten(), "amin")
        target = pivot_of_set[group.gather(-1, evicted)]  # [B, H, E], == length: its set keeps nothing
        merged = (target < length) & (view.positions.gather(-1, evicted) >= 0)
        target = torch.where(merged, target, torch.zeros_like(target))
        distance = (_rows(keys, evicted) - _rows(keys, target)).pow(2).sum(dim=-1)  # [B, H, E]
        if self.sigma is not None:
            variance = torch.full_like(distance, self.sigma**2)
        else:  # per set: the mean squared distance of its merged members to the pivot
            total = torch.zeros_like(view.positions, dtype=torch.float32).scatter_add(-1, target, distance * merged)
            count = torch.zeros_like(total).scatter_add(-1, target, merged.float())
            variance = (total / count.clamp(min=1)).gather(-1, target)
        weight = torch.where(variance > 0, torch.exp(-distance / (2 * variance.clamp(min=1e-30))),
                             torch.ones_like(distance)) * merged
        denominator = torch.ones_like(view.positions, dtype=torch.float32).scatter_add(-1, target, weight)
        scale = denominator.unsqueeze(-1)
        new_keys = _add_rows(keys, target, weight.unsqueeze(-1) * _rows(keys, evicted)) / scale
        new_values = _add_rows(values, target, weight.unsqueeze(-1) * _rows(values, evicted)) / scale
        state = {LOG_MASS: _merged_log_mass(view, evicted, target, merged)} if self.proportional else {}
        return MergeUpdate(keys=new_keys.to(view.keys.dtype), values=new_values.to(view.values.dtype), state=state)
