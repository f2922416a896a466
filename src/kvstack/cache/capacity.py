"""How much room storage leaves to grow: at most 1/64 spare slots, so reallocations stay rare."""

from __future__ import annotations


def growth_slack(length: int) -> int:
    """Spare slots added when a buffer grows: about 1.6%, so reallocation is rare and bytes stay honest."""
    return max(1, length // 64)
