"""Dynamic selection without permanent eviction (taxonomy §1.1-1.2): keep every entry, read only what a step needs.

* ``quest``: Quest (Tang et al., ICML 2024). Entries are kept in pages of ``page`` tokens; each page keeps,
  resident, the element-wise minimum and maximum of its keys. A decoding step bounds every page's attention
  score for its query (``sum_d max(q_d min_d, q_d max_d)``, never below the score of any key in the page),
  per KV head over the query heads of its group (the largest bound), and attends exactly to the top pages
  within ``budget`` tokens plus the newest, still-filling page. The full pages live in a slower tier (a
  checksummed memory-mapped file under ``tier_dir``); ``kv_bytes()`` counts what stays resident and
  ``tier_bytes()`` what the tier holds.

Shapes: ``B`` batch, ``H`` KV heads, ``G`` query heads per KV head, ``P`` pages, ``D`` head dimension.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvstack.lazy_import import lazy_module
from kvstack.methods.base import Method
from kvstack.spec import SpecError, register

torch = lazy_module("torch")


@register(
    "quest",
    category="token/retrieval",
    description=(
        "Quest: every entry kept in pages of `page` tokens in a slower tier (a file under `tier_dir`); each "
        "decoding step reads the top pages by a key min/max bound, `budget` tokens, plus the newest page."
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
    tier_dir:
        Directory of the tier's files (None: the system's temporary directory).
    """

    budget: int = 512
    page: int = 16
    tier_dir: str | None = None

    reads_pages: ClassVar[bool] = True

    def __post_init__(self) -> None:
        power_of_two = isinstance(self.page, int) and self.page >= 1 and not self.page & (self.page - 1)
        if isinstance(self.page, bool) or not power_of_two:
            raise SpecError(f"page must be a positive power of two (1, 2, 4, ... 16, 32 ...), got {self.page!r}")
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < self.page:
            raise SpecError(f"budget must be at least one page ({self.page} tokens), got {self.budget!r}")
        if self.tier_dir is not None and (not isinstance(self.tier_dir, str) or not self.tier_dir):
            raise SpecError(f"tier_dir must be a directory path, got {self.tier_dir!r}")

    def compresses(self) -> bool:
        return False  # nothing is evicted: the bytes moved are the tier's

    def page_size(self) -> int:
        return self.page

    def pages_read(self, full_pages: int) -> int:
        return min(full_pages, self.budget // self.page)

    def page_scores(self, query: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
        """``[B, H, P]``: the largest, over the group's query heads, of ``sum_d max(q_d min_d, q_d max_d)``.

        ``query`` ``[B, H, G, D]``; ``page_min``, ``page_max`` ``[B, H, P, D]``. For any key ``k`` of a page,
        ``q . k <= bound``, since each ``q_d k_d`` is at most the larger of ``q_d min_d`` and ``q_d max_d``.
        """
        q = query.float().unsqueeze(3)  # [B, H, G, 1, D]
        low, high = page_min.float().unsqueeze(2), page_max.float().unsqueeze(2)  # [B, H, 1, P, D]
        bound = torch.maximum(q * low, q * high).sum(dim=-1)  # [B, H, G, P]
        return bound.amax(dim=2)
