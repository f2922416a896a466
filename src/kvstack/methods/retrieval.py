"""Dynamic selection without permanent eviction (taxonomy §1.1-1.2): keep every entry, read only what a step needs.

* ``quest``: Quest (Tang et al., ICML 2024). Entries are kept in pages of ``page`` tokens; each page keeps,
  resident, the element-wise minimum and maximum of its keys. A decoding step bounds every page's attention
  score for its query (``sum_d max(q_d min_d, q_d max_d)``, never below the score of any key in the page),
  per KV head over the query heads of its group (the largest bound), and attends exactly to the top pages
  within ``budget`` tokens plus the newest, still-filling page. The full pages live in a slower tier (a
  checksummed file under ``tier_dir``, read with ``preadv``); ``kv_bytes()`` counts what stays resident and
  ``tier_bytes()`` what the tier holds.
* ``infllm``: InfLLM (Xiao et al., 2024). Sinks and a local window stay resident; the distant context moves
  to the tier in blocks, each represented, resident, by the keys of its most-attended entries; a decoding
  step reads the blocks whose representatives score highest, through an LRU of recently read blocks.
* ``duo``: DuoAttention's split (Xiao et al., 2024) with the retrieval heads found by a calibration probe
  instead of trained gates: retrieval heads keep everything, the others sinks and recent entries.

Shapes: ``B`` batch, ``H`` KV heads, ``G`` query heads per KV head, ``P`` pages, ``D`` head dimension.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from kvstack.lazy_import import lazy_module
from kvstack.methods.base import (
    PAGE_SCORE_KEY_BOUND,
    PAGE_SCORE_LOWRANK,
    STAT_COLSUM,
    HeadCompensation,
    LayerView,
    Method,
    check_sizes,
)
from kvstack.spec import SpecError, register

torch = lazy_module("torch")


def _check_page(name: str, size: object) -> None:
    power_of_two = isinstance(size, int) and not isinstance(size, bool) and size >= 1 and not size & (size - 1)
    if not power_of_two:
        raise SpecError(f"{name} must be a positive power of two (1, 2, 4, ... 16, 32 ...), got {size!r}")


def _check_tier_dir(tier_dir: object) -> None:
    if tier_dir is not None and (not isinstance(tier_dir, str) or not tier_dir):
        raise SpecError(f"tier_dir must be a directory path, got {tier_dir!r}")


@register(
    "quest",
    category="token/retrieval",
    description=(
        "Quest: every entry kept in pages of `page` tokens in a slower tier (a file under `tier_dir`); each "
        "decoding step reads the top pages by a key min/max bound, `budget` tokens, plus the newest page, "
        "through an LRU of `cached` tokens."
    ),
)
@dataclasses.dataclass
class Quest(Method):
    """Quest (Tang et al., ICML 2024): query-aware page selection over a full cache in a slower tier.

    Parameters
    ----------
    budget:
        Tokens a decoding step reads from the tier (``budget // page`` pages), besides the newest page.
    page:
        Entries per page, a power of two.
    cached:
        Tokens of recently read pages kept resident per sequence and KV head, an LRU in front of the tier
        (None: as many as a step reads, ``budget``; 0: every page read from the tier; otherwise at least
        ``budget``, since a step's pages must fit it). Consecutive steps read
        mostly the same pages, so this is what makes a step's read cheap; it is counted in ``kv_bytes()``.
    tier_dir:
        Directory of the tier's files (None: the system's temporary directory).
    bounds:
        ``'float32'`` or ``'bfloat16'``: how the page minima and maxima are kept. ``'bfloat16'`` halves them,
        each minimum rounded down and each maximum up, so the bound is still never below a key's score (it
        is at most a few tenths of a percent looser per dimension). The paged engine keeps its own block
        bounds beside its pool, in the pool's dtype, whatever this says.
    dense_layers:
        The first layers that keep everything resident and attend to all of it (the paper's evaluation leaves
        its first two layers dense, ``dense_layers=2``: their attention is spread too thin for a few pages).
        They add their whole cache to the resident bytes and to what a step reads.
    select:
        How pages are ranked. ``'bound'`` (the paper's): the key minimum/maximum bound. ``'lowrank'``: each
        page's largest approximate score, every key and the query taken on the head's top ``rank`` principal
        directions (Loki's scoring, at page granularity; the basis is fitted per layer and head on the first
        keys that move to the tier, the prompt's). Resident per page: its keys' ``rank`` coordinates in
        float16 instead of two bounds (``2 rank`` bytes per entry and KV head: at ``rank=8`` half of what
        bfloat16 bounds take with pages of 8, a quarter of float32 ones). Not a bound: a page can hold a key
        scoring above its estimate. The engine ranks its blocks by their bounds only.
    rank:
        Principal directions per KV head for ``select='lowrank'`` (at least 1; the head dimension or more
        scores exactly).
    coordinates:
        ``'float16'`` or ``'int8'``: how ``select='lowrank'`` keeps its coordinates. ``'int8'`` halves them
        (``rank`` bytes per entry and KV head, plus one float32 scale per page and head: the page's largest
        coordinate over 127, rounded to the nearest step); a step's scoring reads half as many bytes. The
        rounding moves a score by at most ``scale / 2`` times the query's coordinates' absolute sum.
    """

    budget: int = 512
    page: int = 16
    cached: int | None = None
    tier_dir: str | None = None
    bounds: str = "float32"
    dense_layers: int = 0
    select: str = "bound"
    rank: int = 8
    coordinates: str = "float16"

    reads_pages: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_page("page", self.page)
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < self.page:
            raise SpecError(f"budget must be at least one page ({self.page} tokens), got {self.budget!r}")
        if self.cached is not None:
            check_sizes(cached=self.cached)
            if 0 < self.cached < self.budget:  # a step's pages must fit the LRU, or it is never used
                raise SpecError(f"cached must be 0 (no page cache) or at least the budget ({self.budget} tokens, "
                                f"what one step reads), got {self.cached}")
        _check_tier_dir(self.tier_dir)
        if self.bounds not in ("float32", "bfloat16"):
            raise SpecError(f"bounds must be 'float32' or 'bfloat16', got {self.bounds!r}")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise SpecError(f"dense_layers must be a number of layers >= 0, got {self.dense_layers!r}")
        if self.select not in QUEST_SELECTS:
            raise SpecError(f"select must be one of {', '.join(map(repr, QUEST_SELECTS))}, got {self.select!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SpecError(f"rank must be a number of principal directions >= 1, got {self.rank!r}")
        if self.coordinates not in QUEST_COORDINATES:
            raise SpecError(f"coordinates must be one of {', '.join(map(repr, QUEST_COORDINATES))}, "
                            f"got {self.coordinates!r}")

    def compresses(self) -> bool:
        return False  # nothing is evicted: the bytes moved are the tier's

    def page_size(self) -> int:
        return self.page

    def cached_pages(self) -> int:
        return (self.budget if self.cached is None else self.cached) // self.page

    def pages_read(self, full_pages: int) -> int:
        return min(full_pages, self.budget // self.page)

    def reads_every_page(self, layer_idx: int) -> bool:
        return layer_idx < self.dense_layers

    def layer_summary_names(self) -> tuple[str, ...]:
        return ("basis",) if self.select == "lowrank" else ()

    def page_summary(self, keys: torch.Tensor, valid: torch.Tensor, importance: torch.Tensor | None,
                     held: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each page's element-wise key minimum and maximum ``[B, H, n, D]`` (padding left out; a page of padding
        only gets bounds of 0: it may be read, and its entries are masked). With ``select='lowrank'``: its keys'
        coordinates ``[B, H, n, r, page]`` float16 (coordinate-major within a page) on the layer's ``basis``
        ``[B, H, D, r]`` (fitted here on the first pages, then ``held``); padding entries get zeros. With
        ``coordinates='int8'`` they are int8, beside each page's ``scale`` ``[B, H, n]`` float32."""
        if self.select == "lowrank":
            return self._lowrank_summary(keys, valid, held or {})
        mask = ~valid.unsqueeze(-1)  # [B, 1, n, page, 1]
        low = keys.masked_fill(mask, float("inf")).amin(dim=3)
        high = keys.masked_fill(mask, float("-inf")).amax(dim=3)
        low, high = low.masked_fill(torch.isinf(low), 0.0), high.masked_fill(torch.isinf(high), 0.0)
        if self.bounds == "bfloat16":
            low, high = bfloat16_outward(low, up=False), bfloat16_outward(high, up=True)
        return {"min": low, "max": high}

    def _lowrank_summary(self, keys: torch.Tensor, valid: torch.Tensor, held: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
        real = valid.unsqueeze(-1).to(keys.dtype)  # [B, 1, n, page, 1]
        flat = (keys.float() * real).flatten(2, 3)  # [B, H, n * page, D], padding entries zero
        basis = held.get("basis")
        if basis is None:  # each head's principal directions of these keys (eigenvectors of K^T K), largest last
            _, vectors = torch.linalg.eigh(flat.transpose(-1, -2) @ flat)
            basis = vectors[..., -min(self.rank, keys.shape[-1]):].contiguous()  # [B, H, D, r]
        coordinates = (flat @ basis).view(*keys.shape[:4], -1)  # [B, H, n, page, r]
        # held coordinate-major within each page, [B, H, n, r, page]: a page's score then runs along its keys
        coordinates = coordinates.transpose(-1, -2)
        if self.coordinates == "float16":
            return {"basis": basis, "coordinates": coordinates.to(torch.float16).contiguous()}
        scale = coordinates.abs().amax(dim=(-2, -1)) / 127  # [B, H, n]; 0 for a page of zeros
        steps = coordinates / scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None, None]
        return {"basis": basis, "coordinates": steps.round().clamp(-127, 127).to(torch.int8).contiguous(),
                "scale": scale.contiguous()}

    def page_scores(self, query: torch.Tensor, summary: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, H, P]``: the largest, over the group's query heads, of ``sum_d max(q_d min_d, q_d max_d)``.

        ``query`` ``[B, H, G, D]``; ``summary`` holds ``min`` and ``max`` ``[B, H, P, D]``. For any key ``k`` of
        a page, ``q . k <= bound``, since each ``q_d k_d`` is at most the larger of ``q_d min_d`` and
        ``q_d max_d``. With ``select='lowrank'``: the largest over the group's query heads and the page's keys
        of the approximate score ``(q B) . (k B)`` (``summary`` holds ``basis`` ``B`` and ``coordinates``).
        """
        if self.select == "lowrank":
            coordinates = summary["coordinates"].float()  # [B, H, P, r, page]
            if "scale" in summary:  # int8 steps of a scale per page
                coordinates = coordinates * summary["scale"][..., None, None]
            batch, heads, pages, rank, page = coordinates.shape
            by_coordinate = coordinates.transpose(2, 3).reshape(batch, heads, rank, pages * page)
            approximate = (query.float() @ summary["basis"]) @ by_coordinate  # [B, H, G, P * page]
            # the query heads first (a reduction over a middle dimension of G rows is the cheap one)
            return approximate.amax(dim=2).view(batch, heads, pages, page).amax(dim=-1)
        # max(q_d min_d, q_d max_d) is q_d max_d where q_d > 0 and q_d min_d elsewhere: two matrix products.
        q = query.float()
        positive, negative = q.clamp(min=0), q.clamp(max=0)  # [B, H, G, D]
        low, high = summary["min"].float(), summary["max"].float()  # [B, H, P, D]
        bound = positive @ high.transpose(-1, -2) + negative @ low.transpose(-1, -2)  # [B, H, G, P]
        return bound.amax(dim=2)

    def page_score_form(self) -> str | None:
        """Storage may score pages with a fused kernel: the bound or the low-rank estimate, as above."""
        return PAGE_SCORE_LOWRANK if self.select == "lowrank" else PAGE_SCORE_KEY_BOUND


QUEST_SELECTS = ("bound", "lowrank")
QUEST_COORDINATES = ("float16", "int8")


def bfloat16_outward(values: torch.Tensor, up: bool) -> torch.Tensor:
    """``values`` in bfloat16 rounded toward +inf (``up``) or -inf: never below (above) the value it stands for."""
    rounded = values.to(torch.bfloat16)
    wrong = rounded.float() < values.float() if up else rounded.float() > values.float()
    if not bool(wrong.any()):
        return rounded
    bits = rounded.view(torch.int16)
    # One bfloat16 step further out: bit patterns grow with the magnitude, so a step up is +1 for a positive
    # number and -1 for a negative one; from zero it is the smallest subnormal of the right sign.
    positive = rounded.float() > 0
    negative = rounded.float() < 0
    step = torch.where(positive == up, 1, -1).to(torch.int16)
    moved = torch.where(positive | negative, bits + step, torch.full_like(bits, 1 if up else -32767))
    return torch.where(wrong, moved, bits).view(torch.bfloat16)


@register(
    "infllm",
    category="token/retrieval",
    description=(
        "InfLLM: sinks and a local window resident; the distant context in blocks of `block` tokens in a slow "
        "tier, each scored by its `representatives` most-attended keys; the top blocks read through an LRU."
    ),
)
@dataclasses.dataclass
class InfLLM(Method):
    """InfLLM (Xiao et al., 2024): a context memory of blocks with representative keys, read through an LRU.

    The first ``sinks`` and the newest ``window`` entries always stay resident. Older entries move to the
    slow tier in blocks of ``block`` tokens; each block keeps, resident, the keys of its ``representatives``
    entries that received the most attention while resident (accumulated column sums). A decoding step
    scores each block by the sum of its representatives' dot products with the query, averaged over the query
    heads of a KV group (the paper's), or by the largest over the representatives and the group's query
    heads (``aggregate='max'``, as Quest ranks its pages: one matching key is not diluted by the others, nor
    one retrieving query head by the rest of its group), reads the top ``budget // block`` blocks (those
    among the ``cached_blocks`` most recently read come from memory, the rest from the tier) and attends
    exactly over them, the sinks and the window. Positions stay the true ones (the paper's memory positions
    are for extrapolating beyond the trained context, which kvstack does not do). With ``representatives=block``
    every key of a block represents it, so which keys were attended does not matter: the cache then collects no
    attention statistics, and decoding attends through the fused kernel.

    Parameters
    ----------
    budget:
        Distant-context tokens a decoding step reads.
    block:
        Entries per block, a power of two.
    representatives:
        Keys kept resident per block to score it.
    aggregate:
        ``'sum'`` (the paper's) or ``'max'`` of the representatives' dot products with the query (``max``: also
        over the group's query heads).
    precision:
        The representatives as the cache holds them (``'full'``) or in ``'int8'`` with a float32 scale per
        key (its largest coordinate over 127): a quarter of the bytes (fp32 cache), so a block can keep more.
        With ``aggregate='max'`` the int8 scores are the contract's low-rank form without a basis, which
        storage computes and ranks in one fused call.
    sinks, window:
        Entries always resident at the start and at the end.
    cached_blocks:
        Blocks read recently that stay resident (an LRU): None, the blocks one step reads; 0, every block read
        from the tier; otherwise at least one step's blocks (a smaller LRU would never be used).
    tier_dir:
        Directory of the tier's files (None: the system's temporary directory).
    """

    budget: int = 512
    block: int = 128
    representatives: int = 4
    aggregate: str = "sum"
    precision: str = "full"
    sinks: int = 64
    window: int = 512
    cached_blocks: int | None = None
    tier_dir: str | None = None

    reads_pages: ClassVar[bool] = True

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """The column sums choose each block's representatives; with every key one, nothing is needed."""
        return frozenset() if self.representatives == self.block else frozenset({STAT_COLSUM})

    def __post_init__(self) -> None:
        _check_page("block", self.block)
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < self.block:
            raise SpecError(f"budget must be at least one block ({self.block} tokens), got {self.budget!r}")
        if isinstance(self.representatives, bool) or not isinstance(self.representatives, int) or not (
                1 <= self.representatives <= self.block):
            raise SpecError(f"representatives must be 1 to block={self.block} keys, got {self.representatives!r}")
        if self.aggregate not in INFLLM_AGGREGATES:
            raise SpecError(f"aggregate must be one of {', '.join(INFLLM_AGGREGATES)}, got {self.aggregate!r}")
        if self.precision not in INFLLM_PRECISIONS:
            raise SpecError(f"precision must be one of {', '.join(INFLLM_PRECISIONS)}, got {self.precision!r}")
        check_sizes(sinks=self.sinks, window=self.window)
        if self.cached_blocks is not None:
            check_sizes(cached_blocks=self.cached_blocks)
            if 0 < self.cached_blocks < self.budget // self.block:  # a step's blocks must fit the LRU, or it is unused
                raise SpecError(f"cached_blocks must be 0 (no block cache) or at least the {self.budget // self.block} "
                                f"blocks one step reads (budget // block), got {self.cached_blocks}")
        _check_tier_dir(self.tier_dir)

    def compresses(self) -> bool:
        return False

    def page_size(self) -> int:
        return self.block

    def pages_read(self, full_pages: int) -> int:
        return min(full_pages, self.budget // self.block)

    def resident_entries(self) -> tuple[int, int]:
        return self.sinks, self.window

    def cached_pages(self) -> int:
        return self.budget // self.block if self.cached_blocks is None else self.cached_blocks

    def page_summary(self, keys: torch.Tensor, valid: torch.Tensor, importance: torch.Tensor | None,
                     held: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``representatives``: the keys ``[B, H, n, r, D]`` of each block's ``r`` most-attended valid entries
        (padding: zeros under ``sum``, the block's top key under ``max``); under ``int8``, their codes
        coordinate-major as ``coordinates`` ``[B, H, n, D, r]`` (the contract's low-rank layout) and ``scale``
        ``[B, H, n, r]``. ``importance`` is None when every key represents its block."""
        if importance is None:  # representatives == block: every valid key, in any order
            assert self.representatives == self.block, "infllm needs the column-sum statistic"
            importance = torch.zeros(keys.shape[:-1], device=keys.device)
        score = importance.float().masked_fill(~valid, float("-inf"))
        top = score.topk(self.representatives, dim=-1).indices  # [B, H, n, r]
        chosen = keys.gather(3, top.unsqueeze(-1).expand(-1, -1, -1, -1, keys.shape[-1]))
        real = valid.expand_as(score).gather(3, top).unsqueeze(-1)
        if self.aggregate == "max":  # a padding slot repeats the block's top key, so it never raises the maximum
            chosen = torch.where(real, chosen, chosen[:, :, :, :1]) * real[:, :, :, :1]
        else:
            chosen = chosen * real
        if self.precision == "full":
            return {"representatives": chosen}
        scale = chosen.float().abs().amax(dim=-1) / 127  # [B, H, n, r]
        codes = (chosen.float() / scale.clamp_min(1e-30).unsqueeze(-1)).round().clamp(-127, 127)
        return {"coordinates": codes.to(torch.int8).transpose(-1, -2).contiguous(), "scale": scale}

    def page_scores(self, query: torch.Tensor, summary: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, H, P]`` from ``query`` ``[B, H, G, D]``: under ``sum``, the sum over a block's representatives of
        ``q . k``, averaged over the group's query heads (the paper's); under ``max``, the largest ``q . k`` over
        the representatives and the group's query heads."""
        if "coordinates" in summary:  # int8 codes [B, H, P, D, r]: a key's scale multiplies its dot products
            scores = torch.einsum("bhgd,bhpdr->bhgpr", query.float(), summary["coordinates"].float())
            scores = scores * summary["scale"].unsqueeze(2)
        else:
            scores = torch.einsum("bhgd,bhprd->bhgpr", query.float(), summary["representatives"].float())
        if self.aggregate == "sum":
            return scores.sum(dim=-1).mean(dim=2)
        return scores.amax(dim=(2, 4))  # one query head of the group matching one key is enough, as Quest's

    def page_score_form(self) -> str | None:
        """int8 keys with the maximum: the contract's low-rank form without a basis (a scale per key)."""
        return PAGE_SCORE_LOWRANK if self.precision == "int8" and self.aggregate == "max" else None


INFLLM_AGGREGATES = ("sum", "max")
INFLLM_PRECISIONS = ("full", "int8")


@register(
    "duo",
    category="token/retrieval",
    description=(
        "Retrieval heads (`kvstack calibrate --retrieval-heads`): the top `heads` fraction of KV heads keeps every "
        "entry, the others keep `sinks` + `recent`; stored per head."
    ),
)
@dataclasses.dataclass
class Duo(Method):
    """DuoAttention-style split of the heads (Xiao et al., 2024), with retrieval heads found by a probe.

    The KV heads with the highest retrieval scores (:mod:`kvstack.calibration.head_map`: how often a head's
    strongest attention lands on the needle token the model is copying) keep every entry; the other heads keep
    their first ``sinks`` and last ``recent`` entries. The heads are chosen over the whole model (``heads``
    of all its KV heads), as DuoAttention's gates are. It compresses once, when the prompt has been read;
    the answer's tokens are then appended to every head. Storage is per head, so each keeps exactly its count.

    Parameters
    ----------
    heads:
        Fraction of all KV heads kept whole, in ``(0, 1]``.
    sinks, recent:
        What the other heads keep.
    artefact:
        Path of a retrieval-head artefact; None reads the model's own.
    compensation:
        RazorAttention's compensation token (Tang et al., 2024): each streaming head folds the entries it drops
        into one entry, their mean key and mean value, which weighs in attention as the ``n`` entries it stands
        for (``log n`` added to its logit), so a uniform share of the dropped context still reaches the output.
        One entry more per streaming head; not with a codec.
    """

    heads: float = 0.5
    sinks: int = 16
    recent: int = 64
    artefact: str | None = None
    compensation: bool = False

    headwise: ClassVar[bool] = True
    uses_model_artefact: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, (int, float)) or not 0 < self.heads <= 1:
            raise SpecError(f"heads must be the fraction of KV heads kept whole, in (0, 1], got {self.heads!r}")
        check_sizes(sinks=self.sinks, recent=self.recent)
        if self.artefact is not None and (not isinstance(self.artefact, str) or not self.artefact):
            raise SpecError(f"artefact must be the path of a retrieval-head file, got {self.artefact!r}")
        if not isinstance(self.compensation, bool):
            raise SpecError(f"compensation must be True or False, got {self.compensation!r}")
        self.retrieval: list[list[bool]] | None = None  # [L][H], set by load_artefacts

    def load_artefacts(self, model_key: str | None, num_layers: int, num_kv_heads: int) -> None:
        from kvstack.calibration.head_map import load_head_scores

        scores = torch.tensor(load_head_scores(model_key, num_layers, num_kv_heads, self.artefact))
        count = max(1, round(self.heads * scores.numel()))
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[scores.flatten().topk(count).indices] = True
        self.retrieval = chosen.view(num_layers, num_kv_heads).tolist()

    def artefact_files(self, model_key: str) -> tuple[Path, ...]:
        from kvstack.calibration.head_map import head_map_file

        return (head_map_file(model_key, self.artefact),)

    def layer_budget(self, context_length: int, layer_idx: int, num_layers: int) -> int | None:
        return context_length  # compress once, after the prompt; each head's count is allocate_heads'

    def score(self, view: LayerView) -> torch.Tensor:
        """Recency (the true position) for streaming heads; ``+inf`` (keep all) for retrieval heads."""
        if self.retrieval is None:
            raise RuntimeError("duo's retrieval heads are not loaded; build caches with kvstack.make_cache")
        whole = torch.tensor(self.retrieval[view.layer_idx], device=view.positions.device).view(1, -1, 1)
        return torch.where(whole, torch.full_like(view.positions, float("inf"), dtype=torch.float32),
                           view.positions.float())

    def allocate_heads(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """``[H, L]``: everything on retrieval heads; the first ``sinks`` and last ``recent`` valid entries on
        the others (``scores`` are their positions, ``-inf`` for padding)."""
        valid = torch.isfinite(scores) | (scores > 0)
        whole = torch.isinf(scores) & (scores > 0)
        keep = whole.clone()
        order = torch.where(valid, scores, torch.full_like(scores, float("inf"))).argsort(dim=-1)  # oldest first
        counts = valid.sum(dim=-1)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))
        streaming = (rank < self.sinks) | (rank >= (counts.unsqueeze(-1) - self.recent))
        return torch.where(whole.any(dim=-1, keepdim=True), keep, streaming & valid)

    def compensate_heads(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                         keep: torch.Tensor) -> HeadCompensation | None:
        """With ``compensation``: each head's dropped entries (valid, not in ``keep`` ``[H, L]``) become one
        entry, the mean of their keys and of their values (``[H, L, D]`` in), weighing as their count and stored
        at the first dropped position (between the sinks and the recent entries)."""
        if not self.compensation:
            return None
        dropped = (positions >= 0) & ~keep  # [H, L]
        count = dropped.sum(dim=-1)  # [H]
        weights = dropped.to(keys.dtype) / count.clamp_min(1).unsqueeze(-1).to(keys.dtype)  # [H, L]
        first = torch.where(dropped, positions, positions.max() + 1).amin(dim=-1)
        return HeadCompensation(
            keys=torch.einsum("hl,hld->hd", weights, keys), values=torch.einsum("hl,hld->hd", weights, values),
            positions=first, log_mass=count.clamp_min(1).float().log(), present=count > 0,
        )
