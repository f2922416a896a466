"""``full``: the uncompressed cache, the baseline every method is measured against."""

from __future__ import annotations

import dataclasses

from kvstack.methods.base import Method
from kvstack.spec import register


@register(
    "full", category="baseline", description="No compression: keeps every entry (equals transformers' DynamicCache)."
)
@dataclasses.dataclass
class Full(Method):
    """Keep everything."""

    def compresses(self) -> bool:
        return False
