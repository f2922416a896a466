"""What policy (``kvstack.methods``) and storage (``kvstack.cache``) agree on; imports neither.

Today: the parameters a codec may ask storage for (bit widths, group sizes) and how they are validated.
"""

from __future__ import annotations

from kvstack.spec import SpecError

__all__ = ["VALID_BITS", "CodecError", "check_bits", "check_group_size"]

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
