"""What policy (``kvstack.methods``) and storage (``kvstack.cache``) agree on; imports neither.

* the attention statistics a method may ask for (``STAT_*``) and the tensors that carry them
  (:class:`AttentionStats`);
* what a method sees of a layer when it scores (:class:`LayerView`);
* how a codec asks storage to lay out one of keys / values (:class:`TensorFormat`), and the checks of its
  bit widths and group sizes;
* the two protocols: what storage asks of a policy (:class:`Policy`) and of a codec (:class:`CodecSpec`).
  Storage calls these hooks and never names a method; ``docs/architecture.md`` draws the whole picture.

Shapes: ``B`` batch, ``H`` KV heads, ``Hq`` query heads (``Hq = H * G``), ``L`` cached entries in a layer,
``D`` head dimension. Statistics are per KV head unless said otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from kvstack.lazy_import import lazy_module
from kvstack.spec import SpecError

torch = lazy_module("torch")

__all__ = [
    "LINK_KINDS",
    "LINK_MAGNITUDE",
    "LINK_REUSE",
    "PAGE_SCORE_FORMS",
    "PAGE_SCORE_KEY_BOUND",
    "PAGE_SCORE_LOWRANK",
    "STAT_BELOW_MEAN",
    "STAT_COLSUM",
    "STAT_LAST",
    "STAT_WINDOW",
    "VALID_BITS",
    "AttentionStats",
    "CodecError",
    "CodecSpec",
    "HeadCompensation",
    "LayerLink",
    "LayerPairMerge",
    "LayerView",
    "MergeUpdate",
    "Policy",
    "TensorFormat",
    "check_bits",
    "check_group_size",
]

# The statistics a method can ask the attention function to collect (see AttentionStats).
STAT_WINDOW = "window"  # softmax weights of the last `window` queries of the prompt
STAT_COLSUM = "colsum"  # attention each entry received, summed over this forward's queries
STAT_BELOW_MEAN = "below_mean"  # how many (query, head) pairs gave an entry less than the mean weight
STAT_LAST = "last"  # softmax weights of this forward's last query


@dataclasses.dataclass
class AttentionStats:
    """Statistics of one forward's attention over a layer's entries (cached + new), all per KV head.

    Read-only for methods: caches reading a prompt together share these tensors
    (shared prefill), across methods too.

    Attributes
    ----------
    window:
        ``[B, Hq, W, L]`` softmax weights of the last ``W`` queries (only at the end of a prompt).
    colsum:
        ``[B, H, L]`` attention received by each entry, summed over queries and over the query heads
        of each KV group.
    below_mean:
        ``[B, H, L]`` number of (query, query-head) pairs whose weight on the entry is below
        ``1 / visible entries``.
    queries_seen:
        ``[B, H, L]`` number of (query, query-head) pairs that could see each entry in this forward.
    last:
        ``[B, Hq, L]`` softmax weights of the last query.
    """

    window: torch.Tensor | None = None
    colsum: torch.Tensor | None = None
    below_mean: torch.Tensor | None = None
    queries_seen: torch.Tensor | None = None
    last: torch.Tensor | None = None


@dataclasses.dataclass
class LayerView:
    """What a method sees of one layer when it scores.

    Attributes
    ----------
    keys, values:
        ``[B, H, L, D]`` cached entries (keys after RoPE at their true positions). Read lazily: for a
        layer whose older entries are encoded by a codec, they are decoded only if a method asks.
    positions:
        ``[B, H, L]`` int32 true positions; ``-1`` marks padding.
    next_position:
        ``[B]`` the position the next token of each sequence will take.
    state:
        Per-entry method state, each ``[B, H, L]`` float32 (e.g. H2O's accumulated attention).
    stats:
        Attention statistics of the forward that just ran.
    layer_idx, num_layers:
        Where this layer sits in the model.
    generator:
        The cache's seeded random generator.
    group_size:
        ``G = Hq / H``.
    budget:
        Entries this layer keeps per KV head after the eviction under way.
    kv_source:
        Returns ``(keys, values)``; called at most once, on first access.
    layer_state:
        Per-layer method state, each ``[B, H]`` float32 (D2O's similarity threshold): not tied to entries,
        never moved by eviction, counted by ``kv_bytes()``.
    """

    positions: torch.Tensor
    next_position: torch.Tensor
    state: dict[str, torch.Tensor]
    stats: AttentionStats
    layer_idx: int
    num_layers: int
    generator: torch.Generator
    group_size: int
    budget: int
    kv_source: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    layer_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def _kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv_source()

    @property
    def keys(self) -> torch.Tensor:
        return self._kv[0]

    @property
    def values(self) -> torch.Tensor:
        return self._kv[1]

    @property
    def num_kv_heads(self) -> int:
        return self.positions.shape[1]



@dataclasses.dataclass
class MergeUpdate:
    """What a merging policy makes of the entries it keeps, before storage evicts the rest.

    Every tensor covers all ``L`` entries of the view, in the view's order; storage copies the rows of the
    kept entries back and then evicts as usual, so what was evicted is gone from memory and what it was
    folded into holds its contribution.

    Attributes
    ----------
    keys, values:
        ``[B, H, L, D]`` the entries' new keys / values (after RoPE), or None when unchanged.
    state:
        New per-entry state (each ``[B, H, L]`` float32), e.g. the merged entry's ``mass``.
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class HeadCompensation:
    """What a head-wise policy folds the entries a head drops into: one extra entry per KV head of a sequence
    (RazorAttention's compensation token), stored among the head's entries by its position and weighing in
    attention as the ``exp(log_mass)`` tokens it stands for.

    Attributes
    ----------
    keys, values:
        ``[H, D]`` the extra entry of each head (keys after RoPE).
    positions:
        ``[H]`` int the position it is stored at (its place among the head's entries, oldest first).
    log_mass:
        ``[H]`` float32 log of how many entries it stands for.
    present:
        ``[H]`` bool: the heads that get one (a head that dropped nothing gets none).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    log_mass: torch.Tensor
    present: torch.Tensor


# Page scores of a standard form, which storage may compute with a fused kernel instead of calling the policy's
# page_scores (the pages chosen are the same: the top ones, equal scores to the lower page).
# key_bound: summary "min", "max" [B, H, P, D]; page p scores max over the G query heads of
#   sum_d max(q_d min_pd, q_d max_pd) (Quest's bound).
# lowrank: summary "basis" [B, H, D, r] and "coordinates" [B, H, P, r, S] (a page's S keys on the basis,
#   coordinate-major; float16, or int8 with a "scale" >= 0, [B, H, P] per page or [B, H, P, S] per key); page p
#   scores the max over the query heads and its keys of (q basis) . coordinates, each key's times its scale or
#   the max times the page's for int8. Without a "basis" the coordinates are the keys themselves (r = D).
PAGE_SCORE_KEY_BOUND = "key_bound"
PAGE_SCORE_LOWRANK = "lowrank"
PAGE_SCORE_FORMS = (PAGE_SCORE_KEY_BOUND, PAGE_SCORE_LOWRANK)

LINK_REUSE = "reuse"  # the layer attends over its source layer's entries and stores nothing (KVSharer, CLA)
LINK_MAGNITUDE = "magnitude"  # the layer stores per-entry magnitudes over its source's entries (MiniCache)
LINK_KINDS = (LINK_REUSE, LINK_MAGNITUDE)


@dataclasses.dataclass(frozen=True)
class LayerLink:
    """How one layer stores its entries through another layer's store (cross-layer policies).

    ``kind`` is :data:`LINK_REUSE` (the layer's own keys and values are never stored: attention reads the
    ``source`` layer's entries, ``source`` below the layer) or :data:`LINK_MAGNITUDE` (the layer keeps one
    scale per entry and the rows the policy retains, over the entries of ``source = layer + 1``, which stores
    the pair's shared rows; see :meth:`Policy.merge_layer_pair`).
    """

    source: int
    kind: str


@dataclasses.dataclass
class LayerPairMerge:
    """What a cross-layer merging policy makes of one chunk of a layer pair's keys (or values).

    Attributes
    ----------
    shared:
        ``[B, H, q, D]`` what the upper layer stores for the chunk (one row per token, shared by both).
    scale:
        ``[B, H, q]`` what the lower layer stores: its entry is ``scale * shared`` (unless retained).
    retained:
        ``[B, H, q]`` bool: tokens kept unmerged; the upper layer then stores its own row in ``shared``, and
        the lower layer stores its own row too.
    cutoff:
        ``[B, H]`` float32 per-layer state the policy asked to keep (its retention threshold), passed back
        at the pair's next chunk.
    """

    shared: torch.Tensor
    scale: torch.Tensor
    retained: torch.Tensor
    cutoff: torch.Tensor


VALID_BITS = (2, 4, 8)


class CodecError(SpecError):
    """A codec parameter that cannot work (bits, group size); the message names the valid choices."""


def check_bits(bits: object, name: str = "bits") -> int:
    """Return ``bits`` if it is 2, 4 or 8; raise :class:`CodecError` (naming parameter ``name``) otherwise."""
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise CodecError(f"{name} must be one of 2, 4 or 8, got {bits!r}")
    return int(bits)  # type: ignore[arg-type]


def check_group_size(group_size: object, axis_length: int, axis_name: str = "the quantized axis") -> int:
    """Return ``group_size`` if it is a positive integer dividing ``axis_length``; :class:`CodecError` otherwise."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise CodecError(f"group_size must be a positive integer, got {group_size!r}")
    if axis_length % group_size:
        divisors = [d for d in (16, 32, 64, 128) if axis_length % d == 0] or [axis_length]
        raise CodecError(
            f"group_size {group_size} does not divide {axis_name} of length {axis_length}; "
            f"choose a divisor, e.g. {' or '.join(map(str, divisors[:3]))}"
        )
    return group_size


@dataclasses.dataclass(frozen=True)
class TensorFormat:
    """How one of keys / values is quantized: ``bits``, ``group_size`` and the axis groups run ``along``."""

    bits: int
    group_size: int
    along: str  # "channels" (per token) or "tokens" (per channel)

    def check(self, head_dim: int, what: str) -> None:
        """Raise :class:`CodecError` if the groups cannot tile a ``head_dim``-channel vector."""
        if self.along == "channels":
            check_group_size(self.group_size, head_dim, f"the head dimension of the {what}")


class Policy(Protocol):
    """What storage asks of a token-level policy (every method of :mod:`kvstack.methods` is one).

    Which entries a layer keeps, reads or demotes is the policy's answer; where they live and in how many bytes
    is storage's. Class attributes: ``needs`` (the ``STAT_*`` statistics to collect), ``dynamic`` (holds its
    budget at every forward, else compresses once after the prompt), ``state_names`` (per-entry float32 state
    kept aligned with the entries), ``headwise`` (heads keep different counts: :meth:`allocate_heads`),
    ``sparse_attention`` (reads a subset per query without evicting: :meth:`key_basis`,
    :meth:`approximate_dims`, :meth:`attended`), ``merges`` (folds what it evicts into what it keeps:
    :meth:`merge`), ``mass_state`` (the per-entry state, if any, whose log storage adds to an entry's attention
    logit: a merged entry weighs as the tokens it stands for), ``layer_state_names`` (per-layer ``[B, H]``
    state), ``allocates_layers`` (per-layer budgets from a statistic of each layer's first forward:
    :meth:`layer_statistic`, :meth:`allocate_layers`).
    """

    needs: ClassVar[frozenset[str]]
    dynamic: ClassVar[bool]
    state_names: ClassVar[tuple[str, ...]]
    headwise: ClassVar[bool]
    sparse_attention: ClassVar[bool]
    merges: ClassVar[bool]
    mass_state: ClassVar[str | None]
    layer_state_names: ClassVar[tuple[str, ...]]
    allocates_layers: ClassVar[bool]
    cross_layer: ClassVar[bool]
    reads_pages: ClassVar[bool]
    uses_model_artefact: ClassVar[bool]

    def label(self) -> str: ...
    def compresses(self) -> bool: ...
    def window_queries(self) -> int: ...
    def uses_cache_positions(self) -> bool: ...
    def layer_budget(self, context_length: int, layer_idx: int, num_layers: int) -> int | None: ...

    def observe(self, view: LayerView) -> None:
        """Update per-entry state (``view.state``) from this forward's statistics."""

    def score(self, view: LayerView) -> torch.Tensor:
        """``[B, H, L]`` importance of each entry; the highest-scored are kept."""

    def protect(self, view: LayerView) -> torch.Tensor | None:
        """``[B, H, L]`` bool of entries always kept (sinks, windows), or None."""

    def allocate_heads(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """Head-wise policies: ``[H, L]`` bool of what each head of one sequence keeps."""

    def compensate_heads(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                         keep: torch.Tensor) -> HeadCompensation | None:
        """Head-wise policies: given one sequence's ``[H, L, D]`` keys and values, ``[H, L]`` positions (``< 0``:
        padding) and what :meth:`allocate_heads` keeps, the entry each head folds its dropped ones into, or
        None (they are simply dropped)."""

    def demotion_codec(self) -> Any | None:
        """A codec that keeps what the policy evicts at low precision (MiKV), or None (evicted = dropped)."""

    def key_basis(self, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Sparse-attention policies: ``[B, H, D, D]`` per-head basis the keys are stored in."""

    def approximate_dims(self, head_dim: int) -> int:
        """Sparse-attention policies: leading basis coordinates the approximate score reads."""

    def attended(self, visible: int) -> int:
        """Sparse-attention policies: entries a query attends to exactly, out of ``visible``."""

    def merge(self, view: LayerView, evicted: torch.Tensor) -> MergeUpdate:
        """Merging policies: fold the entries at ``evicted`` ``[B, H, E]`` (view indices) into the kept ones."""

    def layer_statistic(self, view: LayerView) -> torch.Tensor:
        """Layer-allocating policies: ``[B]`` statistic of one layer's first forward (D2O's attention density)."""

    def allocate_layers(self, statistics: torch.Tensor, context_length: int) -> list[int]:
        """Layer-allocating policies: per-layer budgets from ``[num_layers]`` statistics, summing to the total."""

    def layer_links(self, num_layers: int, model_key: str | None) -> dict[int, LayerLink]:
        """Cross-layer policies: which layers store through another layer's store (the others store their own).

        ``model_key`` identifies the model (a policy whose map is a calibration artefact checks it belongs)."""

    def merge_layer_pair(self, lower: torch.Tensor, upper: torch.Tensor, valid: torch.Tensor,
                         cutoff: torch.Tensor | None) -> LayerPairMerge:
        """Magnitude-linked layers: merge a chunk's ``[B, H, q, D]`` lower and upper rows (``valid`` ``[B, H, q]``:
        not padding); ``cutoff`` is what the last call returned for this pair (None at the first chunk)."""

    def load_artefacts(self, model_key: str | None, num_layers: int, num_kv_heads: int) -> None:
        """Artefact-reading policies: read what the policy needs for this model (one line if it is missing or
        made for another model)."""

    def page_size(self) -> int:
        """Page-reading policies: entries per page (a power of two)."""

    def pages_read(self, full_pages: int) -> int:
        """Page-reading policies: how many of ``full_pages`` stored pages a decoding step reads."""

    def reads_every_page(self, layer_idx: int) -> bool:
        """Page-reading policies: whether layer ``layer_idx`` reads no pages at all, everything it holds staying
        resident and attended (an ordinary full layer: storage gives it no tier)."""

    def resident_entries(self) -> tuple[int, int]:
        """Page-reading policies: ``(sinks, window)``, the first and the newest entries that always stay
        resident (pages move to the tier from between them)."""

    def cached_pages(self) -> int:
        """Page-reading policies: pages of the tier also kept resident, least recently read out first."""

    def layer_summary_names(self) -> tuple[str, ...]:
        """Page-reading policies: the summary entries that are the layer's, not a page's (Quest's low-rank
        basis): storage replaces them with what ``page_summary`` returns instead of appending along pages."""

    def page_summary(self, keys: torch.Tensor, valid: torch.Tensor, importance: torch.Tensor | None,
                     held: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Page-reading policies: what stays resident of pages about to move to the tier.

        ``keys`` ``[B, H, n, page, D]``, ``valid`` ``[B, 1, n, page]`` (not padding), ``importance``
        ``[B, H, n, page]`` (the attention each entry received while resident, when the policy needs
        ``STAT_COLSUM``), ``held`` the layer's summary so far (empty before its first pages); returns tensors
        ``[B, H, n, ...]`` (Quest: key minima and maxima) and the layer-wide entries of
        :meth:`layer_summary_names`, kept in the dtype returned (a policy may store them narrower than the
        cache) and counted in ``kv_bytes()``."""

    def page_scores(self, query: torch.Tensor, summary: dict[str, torch.Tensor]) -> torch.Tensor:
        """Page-reading policies: ``[B, H, P]`` relevance of each page for one decoding step's ``query``
        ``[B, H, G, D]`` (the ``G`` query heads of each KV head), from the summaries of all ``P`` pages;
        the top pages are read."""

    def page_score_form(self) -> str | None:
        """Page-reading policies: the standard form (``PAGE_SCORE_FORMS``) that ``page_scores`` computes, which
        storage may compute fused instead; None when it is the policy's own."""


class CodecSpec(Protocol):
    """What storage asks of a codec: how the entries leaving the full-precision window are encoded."""

    def label(self) -> str: ...
    def stream_kind(self) -> str: ...
    def key_format(self) -> TensorFormat: ...
    def value_format(self) -> TensorFormat: ...
    def residual_tokens(self) -> int: ...
    def sink_tokens(self) -> int: ...
    def chunk_tokens(self) -> int: ...
    def pre_rope(self) -> bool: ...
    def rotation(self) -> str | None: ...
    def smoothing(self) -> float | None: ...
    def outlier_fraction(self) -> float: ...
    def key_outlier_channels(self) -> tuple[int, int]: ...
    def residual_rank(self) -> int: ...
