"""``+`` in a spec: one selection method joined with one codec (registered with the spec parser)."""

from __future__ import annotations

from typing import Any

from kvstack.methods.base import Composed
from kvstack.methods.full import Full
from kvstack.spec import SpecError, register_composer, registry

__all__ = ["compose"]


def compose(terms: list[Any], spec: str) -> Composed:
    """Combine the terms of a ``+`` spec: at most one selection method and exactly one codec.

    A lone codec (``kivi(bits=2)``) keeps every token: it is composed with ``full``.
    """
    codecs = [t for t in terms if getattr(t, "is_codec", False)]
    selections = [t for t in terms if not getattr(t, "is_codec", False)]
    names = ", ".join(t.label() for t in terms)
    if len(codecs) != 1 or len(selections) > 1:
        codecs_known = sorted(name for name, (cls, _) in registry().items() if getattr(cls, "is_codec", False))
        codec_names = ", ".join(codecs_known)
        raise SpecError(
            f"cannot compose {names} in {spec!r}: '+' joins at most one selection method with one codec "
            f"(codecs: {codec_names}), e.g. 'snapkv(ratio=0.5) + kivi(bits=2)'"
        )
    selection = selections[0] if selections else Full()
    if selection.demotion_codec() is not None:
        raise SpecError(
            f"cannot compose {names}: {selection.label()} already stores what it evicts at low precision; use it "
            "without a codec"
        )
    if getattr(selection, "compensation", False) is True:
        raise SpecError(
            f"cannot compose {names}: {selection.label()} folds what each head drops into one entry, which a codec "
            "would encode away; use it without a codec, or with compensation=False"
        )
    return Composed(selection, codecs[0])


register_composer(compose)
