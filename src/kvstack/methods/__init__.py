"""Token-level KV-cache methods, one file per family; importing this package registers them all."""

from kvstack.methods import allocation, full, lowrank, quantization, selection  # noqa: F401  (registration)
from kvstack.methods.base import BudgetedMethod, Method

__all__ = ["BudgetedMethod", "Method"]
