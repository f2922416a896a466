"""Token-level KV-cache methods, one file per family; importing this package registers them all."""

from kvstack.methods import (  # noqa: F401  (registration)
    allocation,
    compose,
    cross_layer,
    full,
    lowrank,
    merging,
    quantization,
    retrieval,
    selection,
)
from kvstack.methods.base import BudgetedMethod, Method

__all__ = ["BudgetedMethod", "Method"]
