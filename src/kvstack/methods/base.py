"""What every method is: a small dataclass the cache layer consults.

A method answers *which entries to keep* (``score`` + ``protect`` + ``layer_budget``); the cache layer
(``kvstack.cache.layer``) owns storage and performs the eviction, so any method works with any storage.

Shapes used throughout: ``B`` batch, ``H`` KV heads, ``Hq`` query heads (``Hq = H * G``), ``L`` cached
entries in a layer, ``D`` head dimension. Scores are per KV head: query-head statistics are aggregated
over the ``G`` query heads of each KV group before they reach a method.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

from kvstack.contract import (  # noqa: F401  (re-exported: methods import them from here)
    PAGE_SCORE_KEY_BOUND,
    PAGE_SCORE_LOWRANK,
    STAT_BELOW_MEAN,
    STAT_COLSUM,
    STAT_LAST,
    STAT_WINDOW,
    AttentionStats,
    HeadCompensation,
    LayerLink,
    LayerPairMerge,
    LayerView,
    MergeUpdate,
)
from kvstack.lazy_import import lazy_module
from kvstack.spec import MethodInfo, SpecError

torch = lazy_module("torch")


class BudgetError(SpecError):
    """A budget that cannot hold what the method always keeps (sinks, windows)."""


@dataclasses.dataclass
class Method:
    """Base class of every method. Subclasses are dataclasses registered with ``kvstack.spec.register``.

    Class attributes a subclass sets
    --------------------------------
    needs:
        Which ``STAT_*`` statistics the attention function must collect for it.
    dynamic:
        True when the method holds its budget at every forward (prefill chunks and decoding, permanent
        eviction); False when it compresses once, when the prompt has been read.
    state_names:
        Names of per-entry float32 state tensors the layer keeps aligned with the entries.
    headwise:
        True when heads of one layer may keep different numbers of entries (variable-length storage); such
        a method says which with :meth:`allocate_heads`.
    sparse_attention:
        True when the method restricts which entries each query attends to without evicting (Loki): it
        gives a key basis (:meth:`key_basis`), how many of its leading coordinates score
        (:meth:`approximate_dims`) and how many entries a query reads (:meth:`attended`).
    merges:
        True when what the method evicts is folded into what it keeps (:meth:`merge`).
    mass_state:
        Name of the per-entry state holding ``log(mass)``, the number of tokens a merged entry stands for;
        storage adds it to the entry's attention logit. None: every entry weighs as one token.
    layer_state_names:
        Names of per-layer ``[B, H]`` float32 state tensors (zero at first), kept by the layer.
    allocates_layers:
        True when the method sets per-layer budgets from a statistic of each layer's first forward
        (:meth:`layer_statistic`, :meth:`allocate_layers`).
    cross_layer:
        True when some layers store their entries through another layer's store (:meth:`layer_links`).
    reads_pages:
        True when every entry is kept, in pages in a slower tier, and each decoding step reads only the pages
        :meth:`page_scores` ranks highest (:meth:`page_size`, :meth:`pages_read`).
    uses_model_artefact:
        True when the method reads a calibration artefact keyed by the model (:meth:`load_artefacts`).
    """

    spec_name: ClassVar[str]
    info: ClassVar[MethodInfo]
    needs: ClassVar[frozenset[str]] = frozenset()
    dynamic: ClassVar[bool] = False
    sparse_attention: ClassVar[bool] = False
    state_names: ClassVar[tuple[str, ...]] = ()
    headwise: ClassVar[bool] = False
    merges: ClassVar[bool] = False
    mass_state: ClassVar[str | None] = None
    layer_state_names: ClassVar[tuple[str, ...]] = ()
    allocates_layers: ClassVar[bool] = False
    cross_layer: ClassVar[bool] = False
    reads_pages: ClassVar[bool] = False
    uses_model_artefact: ClassVar[bool] = False

    # -- budget -------------------------------------------------------------------------------------
    def allocate_heads(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Head-wise methods only: ``[H, L]`` bool of the entries each head of one sequence keeps.

        ``scores`` ``[H, L]`` (``+inf`` protected, ``-inf`` padding); ``budget`` the average per head.
        """
        raise NotImplementedError(f"{type(self).__name__} is not head-wise")

    def compensate_heads(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                         keep: torch.Tensor) -> HeadCompensation | None:
        """Head-wise methods: the entry each head folds what it drops into (``keys``/``values`` ``[H, L, D]``,
        ``positions`` and ``keep`` ``[H, L]``), or None: dropped entries are gone."""
        return None

    def demotion_codec(self) -> Any | None:
        """The low-precision codec that keeps what this method evicts (MiKV), or None: evicted entries are dropped."""
        return None

    def key_basis(self, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Sparse-attention methods only: ``[B, H, D, D]`` orthonormal per-head basis to store keys in.

        ``keys`` ``[B, H, L, D]`` are the prompt's cached keys, ``valid`` ``[B, H, L]`` bool (None: all valid).
        Storage keeps keys rotated into the basis and queries are rotated the same way, so exact scores do not
        change; approximate scores read the first :meth:`approximate_dims` coordinates.
        """
        raise NotImplementedError(f"{type(self).__name__} does not score in a key basis")

    def approximate_dims(self, head_dim: int) -> int:
        """Sparse-attention methods only: leading key-basis coordinates an approximate score reads."""
        return head_dim

    def attended(self, visible: int) -> int:
        """Sparse-attention methods only: entries a query with ``visible`` entries attends to exactly."""
        return visible

    def merge(self, view: LayerView, evicted: torch.Tensor) -> MergeUpdate:
        """Merging methods only: fold the entries at ``evicted`` ``[B, H, E]`` (indices into the view's entries,
        ascending) into the kept ones; returns what every entry becomes (storage then evicts as usual)."""
        raise NotImplementedError(f"{type(self).__name__} does not merge")

    def layer_statistic(self, view: LayerView) -> torch.Tensor:
        """Layer-allocating methods only: ``[B]`` statistic of a layer's first forward (``view.stats``)."""
        raise NotImplementedError(f"{type(self).__name__} does not allocate budgets across layers")

    def allocate_layers(self, statistics: torch.Tensor, context_length: int) -> list[int]:
        """Layer-allocating methods only: budgets of every layer from their ``[num_layers]`` statistics."""
        raise NotImplementedError(f"{type(self).__name__} does not allocate budgets across layers")

    def layer_links(self, num_layers: int, model_key: str | None) -> dict[int, LayerLink]:
        """Cross-layer methods only: ``{layer: LayerLink}`` of the layers that store through another one."""
        return {}

    def merge_layer_pair(self, lower: torch.Tensor, upper: torch.Tensor, valid: torch.Tensor,
                         cutoff: torch.Tensor | None) -> LayerPairMerge:
        """Cross-layer merging methods only: what a layer pair stores for one chunk (see the contract)."""
        raise NotImplementedError(f"{type(self).__name__} does not merge layer pairs")

    def load_artefacts(self, model_key: str | None, num_layers: int, num_kv_heads: int) -> None:
        """Artefact-reading methods only: read this model's artefact when the cache is built."""

    def artefact_files(self, model_key: str) -> tuple[Path, ...]:
        """The calibration files :meth:`load_artefacts` or :meth:`layer_links` read for the model ``model_key``
        (none for most methods): a result records their digests, so it is measured again when one changes."""
        return ()

    def page_size(self) -> int:
        """Page-reading methods only: entries per page."""
        raise NotImplementedError(f"{type(self).__name__} does not read pages")

    def pages_read(self, full_pages: int) -> int:
        """Page-reading methods only: how many stored pages a decoding step reads."""
        raise NotImplementedError(f"{type(self).__name__} does not read pages")

    def reads_every_page(self, layer_idx: int) -> bool:
        """Page-reading methods only: whether layer ``layer_idx`` keeps everything resident and attends to all of
        it (Quest's dense first layers)."""
        return False

    def resident_entries(self) -> tuple[int, int]:
        """Page-reading methods only: ``(sinks, window)`` entries always resident."""
        return 0, 0

    def cached_pages(self) -> int:
        """Page-reading methods only: tier pages also kept resident (least recently read out first)."""
        return 0

    def layer_summary_names(self) -> tuple[str, ...]:
        """Page-reading methods only: summary entries held once per layer, not per page (see the contract)."""
        return ()

    def page_summary(self, keys: torch.Tensor, valid: torch.Tensor, importance: torch.Tensor | None,
                     held: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Page-reading methods only: what stays resident of pages moving to the tier (see the contract)."""
        raise NotImplementedError(f"{type(self).__name__} does not read pages")

    def page_scores(self, query: torch.Tensor, summary: dict[str, torch.Tensor]) -> torch.Tensor:
        """Page-reading methods only: ``[B, H, P]`` relevance of each page (see the contract)."""
        raise NotImplementedError(f"{type(self).__name__} does not read pages")

    def page_score_form(self) -> str | None:
        """Page-reading methods only: the standard form of ``page_scores``, if it has one (see the contract)."""
        return None

    def compresses(self) -> bool:
        """False for methods that keep everything (``full``)."""
        return True

    def min_budget(self) -> int:
        """Entries the method always keeps (sinks + windows); a smaller budget is an error."""
        return 0

    def window_queries(self) -> int:
        """How many trailing prompt queries the ``window`` statistic needs (SnapKV's observation window)."""
        return 0

    def layer_budget(self, context_length: int, layer_idx: int, num_layers: int) -> int | None:
        """Entries this layer keeps (per KV head, on average for head-wise methods); None keeps all."""
        return None

    # -- selection ----------------------------------------------------------------------------------
    def protect(self, view: LayerView) -> torch.Tensor | None:
        """``[B, H, L]`` bool of entries that are always kept (sinks, recent windows), or None."""
        return None

    def score(self, view: LayerView) -> torch.Tensor:
        """``[B, H, L]`` importance of each entry; the highest-scored entries are kept."""
        raise NotImplementedError

    def observe(self, view: LayerView) -> None:
        """Update per-entry state (``view.state``) from ``view.stats`` after each forward."""

    def uses_cache_positions(self) -> bool:
        """True when RoPE positions are re-assigned by slot inside the cache (StreamingLLM's option)."""
        return False

    def label(self) -> str:
        """The canonical spec string of this method with its parameters."""
        fields = [f for f in dataclasses.fields(self) if f.init]
        parts = []
        for field in fields:
            value = getattr(self, field.name)
            if field.name == "inner":
                parts.insert(0, value.label())
            elif value != field.default:
                parts.append(f"{field.name}={value!r}")
        return f"{self.spec_name}({', '.join(parts)})" if parts else self.spec_name


@dataclasses.dataclass
class WrapperMethod(Method):
    """Base of methods written around another one (``adakv(snapkv(...))``, ``mikv(h2o(...))``).

    The wrapper adopts its inner method's statistics and state, and delegates budgets, protection,
    scoring and observation to it; a subclass changes what happens to the entries (where they are
    kept, how they are stored).
    """

    inner: Any = dataclasses.field(default=None)

    def adopt_inner(self) -> None:
        """Take the inner method's statistics and per-entry state (call from ``__post_init__``)."""
        self.needs = self.inner.needs  # type: ignore[misc]
        self.state_names = self.inner.state_names  # type: ignore[misc]

    def min_budget(self) -> int:
        return self.inner.min_budget()

    def window_queries(self) -> int:
        return self.inner.window_queries()

    def layer_budget(self, context_length: int, layer_idx: int, num_layers: int) -> int | None:
        return self.inner.layer_budget(context_length, layer_idx, num_layers)

    def protect(self, view: LayerView) -> torch.Tensor | None:
        return self.inner.protect(view)

    def score(self, view: LayerView) -> torch.Tensor:
        return self.inner.score(view)

    def observe(self, view: LayerView) -> None:
        self.inner.observe(view)


def _check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise SpecError(f"{name} must be >= 0, got {value}")


def check_sizes(**sizes: Any) -> None:
    """Validate named sizes: each a non-negative integer (or None)."""
    for name, value in sizes.items():
        if value is not None:
            _check_non_negative_int(name, value)


@dataclasses.dataclass
class BudgetedMethod(Method):
    """A method with a budget: ``ratio`` (fraction of the context evicted) or ``budget`` (tokens kept).

    ``ratio`` is the compression ratio, in ``[0, 1)``: ``ratio=0.75`` keeps a quarter of the context
    (``round(0.25 * context_length)`` entries per head). ``budget`` is an absolute count of kept entries
    per KV head. Exactly one of the two is given.
    """

    ratio: float | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.budget is None):
            raise SpecError(f"{self.spec_name} needs exactly one of ratio=R (0 <= R < 1) or budget=N tokens")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise SpecError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
            if not 0.0 <= float(self.ratio) < 1.0 or math.isnan(self.ratio):
                raise SpecError(f"ratio must be in [0, 1) (the fraction of tokens evicted), got {self.ratio}")
        if self.budget is not None:
            check_sizes(budget=self.budget)
            if self.budget < 1:
                raise BudgetError(f"{self.spec_name}: budget must be >= 1 entry per head, got {self.budget}")
            if self.budget < self.min_budget():
                raise BudgetError(
                    f"{self.spec_name}: budget {self.budget} is smaller than the {self.min_budget()} entries it "
                    f"always keeps ({self.kept_parts()}); use budget >= {self.min_budget()}"
                )

    def kept_parts(self) -> str:
        """Human description of what ``min_budget`` is made of."""
        return "nothing"

    def base_budget(self, context_length: int) -> int:
        """Entries kept per KV head for a context of ``context_length`` tokens."""
        if self.budget is not None:
            return self.budget
        kept = round((1.0 - float(self.ratio)) * context_length)  # type: ignore[arg-type]
        if kept < self.min_budget() and context_length > self.min_budget():
            raise BudgetError(
                f"{self.label()} keeps {kept} of {context_length} tokens, fewer than the {self.min_budget()} it "
                f"always keeps ({self.kept_parts()}); lower the ratio or the window"
            )
        return max(kept, min(self.min_budget(), context_length))

    def layer_budget(self, context_length: int, layer_idx: int, num_layers: int) -> int | None:
        return self.base_budget(context_length)


def recent_mask(view: LayerView, count: int) -> torch.Tensor:
    """``[B, H, L]`` True for the ``count`` most recent positions of each sequence."""
    if count <= 0:
        return torch.zeros_like(view.positions, dtype=torch.bool)
    return view.positions >= (view.next_position.view(-1, 1, 1) - count)


def sink_mask(view: LayerView, count: int) -> torch.Tensor:
    """``[B, H, L]`` True for the first ``count`` positions (attention sinks)."""
    return (view.positions >= 0) & (view.positions < count)


def group_mean(weights: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Average query-head statistics over each KV group: ``[B, Hq, ...]`` -> ``[B, H, ...]``."""
    batch, num_q_heads = weights.shape[:2]
    return weights.view(batch, num_kv_heads, num_q_heads // num_kv_heads, *weights.shape[2:]).mean(dim=2)


@dataclasses.dataclass
class Composed:
    """A selection method with a codec: ``snapkv(ratio=0.5) + kivi(bits=2)``.

    The selection decides which entries stay; the codec how the entries leaving its full-precision
    window are encoded. Attribute access falls through to the selection method (``dynamic``, ``ratio``
    ...), so a composed spec goes wherever a method goes; :func:`kvstack.make_cache` splits the two.
    """

    selection: Method
    codec: Any

    def __getattr__(self, name: str) -> Any:
        if name in ("selection", "codec") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.selection, name)

    def label(self) -> str:
        """``codec`` alone when nothing is selected, else ``selection + codec``."""
        if not self.selection.compresses():
            return self.codec.label()
        return f"{self.selection.label()} + {self.codec.label()}"
