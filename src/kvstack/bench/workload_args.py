"""Checks of the workload generators' arguments: one-line :class:`~kvstack.errors.KVStackError` messages
naming the argument, and the range token ids are drawn from."""

from __future__ import annotations

import math

import numpy as np

from kvstack.errors import KVStackError

__all__ = [
    "DEFAULT_FIRST_TOKEN",
    "check_token_range",
    "int_arg",
    "is_int",
    "is_number",
    "nonnegative_float",
    "rate_arg",
    "seed_arg",
]

DEFAULT_FIRST_TOKEN = 100
"""Lowest token id of the default token range (capped at ``vocab_size // 2``), above usual special tokens."""


def is_int(value: object) -> bool:
    """Whether ``value`` is a Python or numpy integer (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def int_arg(name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum``, else a one-line :class:`KVStackError`."""
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        raise KVStackError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def is_number(value: object) -> bool:
    """Whether ``value`` is a Python or numpy integer or float (not a bool)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def rate_arg(rate_per_s: float | None) -> float | None:
    """None for "all at once" (None or inf), else the rate; one-line error unless a positive number."""
    if rate_per_s is None:
        return None
    if not is_number(rate_per_s) or math.isnan(rate_per_s) or rate_per_s <= 0:
        raise KVStackError(f"rate_per_s must be a number > 0 (requests per second) or None/inf, got {rate_per_s!r}")
    return None if math.isinf(rate_per_s) else float(rate_per_s)


def nonnegative_float(name: str, value: object) -> float:
    """``value`` as a finite float ``>= 0``, else a one-line :class:`KVStackError`."""
    if not is_number(value) or not math.isfinite(value) or value < 0:  # type: ignore[arg-type,operator]
        raise KVStackError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_token_range(vocab_size: object, token_range: tuple[int, int] | None) -> tuple[int, int]:
    """The half-open ``[low, high)`` range token ids are drawn from, checked against ``vocab_size``."""
    vocab = int_arg("vocab_size", vocab_size, 2)
    if token_range is None:
        return min(DEFAULT_FIRST_TOKEN, vocab // 2), vocab
    try:
        low, high = token_range
    except (TypeError, ValueError):
        raise KVStackError(f"token_range must be a pair (low, high), got {token_range!r}") from None
    if not (is_int(low) and is_int(high) and 0 <= low < high <= vocab):
        raise KVStackError(
            f"token_range must satisfy 0 <= low < high <= vocab_size={vocab} (high exclusive), got {token_range!r}"
        )
    return int(low), int(high)


def seed_arg(seed: object) -> int:
    """``seed`` as an int ``>= 0``, else a one-line :class:`KVStackError`."""
    return int_arg("seed", seed, 0)
