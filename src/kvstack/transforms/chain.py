"""``+`` between model transforms: steps applied in order (``gqa(kv_heads=1, how='svd') + repair()``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from kvstack.spec import SpecError, register_composer
from kvstack.transforms.base import Transform, TransformError

__all__ = ["TransformChain", "compose_transforms", "transform_steps"]


@dataclasses.dataclass
class TransformChain:
    """Transforms applied one after the other by :func:`kvstack.transform`; a ``repair`` step fits what the
    steps before it changed."""

    steps: list[Transform]

    is_transform: ClassVar[bool] = True

    def label(self) -> str:
        """The spec of every step, joined by ``+``."""
        return " + ".join(step.label() for step in self.steps)


def compose_transforms(terms: list[Any], spec: str) -> TransformChain:
    """Join the terms of a ``+`` spec of transforms; a repair needs a structural transform before it."""
    if getattr(terms[0], "is_repair", False):
        raise SpecError(f"in {spec!r}: {terms[0].label()} fits what a transform changed, so it comes after one, "
                        "e.g. \"gqa(kv_heads=1, how='svd') + repair()\"")
    return TransformChain(steps=list(terms))


def transform_steps(method: Transform | TransformChain) -> list[Transform]:
    """The steps of a parsed transform spec, refusing a lone ``repair`` (it has nothing to fit; one line)."""
    steps = list(method.steps) if isinstance(method, TransformChain) else [method]
    if getattr(steps[0], "is_repair", False):
        raise TransformError(f"{steps[0].label()} fits what a transform changed: put it after one, e.g. "
                             "\"gqa(kv_heads=1, how='svd') + repair()\"")
    return steps


register_composer(compose_transforms, transforms=True)
