"""KV-cache budget allocation (taxonomy §1.2): how much each layer or head keeps.

``pyramidkv`` shares a fixed total across layers (more at the bottom, less at the top) and selects
SnapKV-style inside a layer. ``adakv`` wraps a scoring method and lets the heads of one layer keep
different numbers of entries; the cache then stores each head variable-length, so the uneven budgets
really save memory.
"""

from __future__ import annotations

import dataclasses
import math

from kvstack.lazy_import import lazy_module
from kvstack.methods.base import BudgetedMethod, WrapperMethod
from kvstack.methods.selection import SnapKV
from kvstack.spec import SpecError, register

torch = lazy_module("torch")



def pyramid_budgets(average: int, window: int, context: int, num_layers: int, beta: float) -> list[int]:
    """Per-layer budgets shrinking linearly with depth, summing to ``average * num_layers``.

    The part above the always-kept ``window`` goes from ``2a - a/beta`` at layer 0 down to ``a/beta`` at
    the top (``a = average - window``), as in PyramidKV; no layer keeps more than ``context`` entries
    (the excess is handed to the layers below the cap), and rounding is settled so the total is exact.
    """
    total = min(average, context) * num_layers
    if num_layers == 1:
        return [min(average, context)]
    above = max(average - window, 0)
    low = above / beta
    high = 2 * above - low
    shares = [window + high - (high - low) * layer / (num_layers - 1) for layer in range(num_layers)]
    # Water-fill: cap at the context, give the excess to uncapped layers proportionally.
    capped = [False] * num_layers
    for _ in range(num_layers):
        excess = sum(max(s - context, 0.0) for s in shares)
        shares = [min(s, float(context)) for s in shares]
        capped = [s >= context for s in shares]
        if excess <= 1e-9 or all(capped):
            break
        room = sum(s for s, c in zip(shares, capped, strict=True) if not c)
        shares = [s if c else s + excess * s / room for s, c in zip(shares, capped, strict=True)]
    floors = [math.floor(s) for s in shares]
    remainder = total - sum(floors)
    order = sorted(range(num_layers), key=lambda i: shares[i] - floors[i], reverse=True)
    for i in order:
        if remainder <= 0:
            break
        if floors[i] < context:
            floors[i] += 1
            remainder -= 1
    return floors


@register(
    "pyramidkv",
    category="token/allocation/layer",
    description=(
        "PyramidKV: layer budgets shrink linearly with depth (same total), "
        "SnapKV selection inside each layer."
    ),
)
@dataclasses.dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024): pyramidal information funnelling.

    ``ratio``/``budget`` give the *average* per-layer budget; ``beta`` sets how small the top layer's
    share above the window is (``1/beta`` of the average).
    """

    beta: float = 20.0

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 1:
            raise SpecError(f"beta must be a number >= 1, got {self.beta!r}")
        super().__post_init__()

    def layer_budget(self, context_length: int, layer_idx: int, num_layers: int) -> int | None:
        average = self.base_budget(context_length)
        budgets = pyramid_budgets(average, self.window, context_length, num_layers, self.beta)
        return budgets[layer_idx]


@register(
    "adakv",
    category="token/allocation/head",
    description=(
        "Ada-KV: heads of a layer share the layer budget by a global top-k over their "
        "scores (floor per head); variable-length storage."
    ),
    wraps=True,
)
@dataclasses.dataclass
class AdaKV(WrapperMethod):
    """Ada-KV (Feng et al., 2024) around any scoring method (``snapkv``, ``h2o``, ``keynorm`` ...).

    At the end of the prompt, each head first keeps its top ``floor * budget`` entries (the safeguard),
    then the rest of the layer's ``heads * budget`` entries go to the best-scored remaining entries of
    any head. Dynamic inner methods (``h2o``) contribute their accumulated scores and are applied once.
    """

    inner: BudgetedMethod = dataclasses.field(default=None)  # type: ignore[assignment]
    floor: float = 0.2

    headwise = True

    def __post_init__(self) -> None:
        if not isinstance(self.inner, BudgetedMethod):
            raise SpecError("adakv wraps a method with a budget, e.g. adakv(snapkv(ratio=0.5))")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0.0 <= self.floor <= 1.0:
            raise SpecError(f"floor must be a number in [0, 1] (fraction of the per-head budget), got {self.floor!r}")
        self.adopt_inner()

    def allocate_heads(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """``[H, L]`` bool of the entries each head of one sequence keeps (see :func:`headwise_counts`)."""
        return headwise_counts(scores, budget, self.floor)


def headwise_counts(scores: torch.Tensor, budget: int, floor: float) -> torch.Tensor:
    """Ada-KV allocation for one sequence: how many entries each head keeps, and which.

    Parameters
    ----------
    scores:
        ``[H, L]`` scores (``+inf`` for protected entries, ``-inf`` for padding).
    budget:
        Average entries per head; the layer keeps ``min(H * budget, H * L)`` in total.
    floor:
        Each head first keeps its top ``ceil(floor * budget)`` entries.

    Returns
    -------
    torch.Tensor
        ``[H, L]`` bool, True for kept entries.
    """
    heads, length = scores.shape
    total = min(heads * budget, heads * length)
    reserved = min(math.ceil(floor * budget), length, budget)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if reserved > 0:
        top = scores.topk(reserved, dim=-1).indices
        keep.scatter_(-1, top, True)
    rest = total - heads * reserved
    if rest > 0:
        flat = scores.masked_fill(keep, float("-inf")).flatten()
        # Entries already kept are -inf here; never pick them again even if everything left is -inf.
        candidates = (~keep).flatten().nonzero().squeeze(-1)
        order = flat[candidates].argsort(descending=True, stable=True)[:rest]
        keep.view(-1)[candidates[order]] = True
    return keep
