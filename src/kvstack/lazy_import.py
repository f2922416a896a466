"""Heavy libraries imported on first use.

The method dataclasses, the spec parser and the CLI's help must answer without importing torch (seconds on a
busy machine): a module that needs torch only inside its functions binds ``torch = lazy_module("torch")``.
The first attribute read imports the real module; every attribute read is then cached on the stand-in, so
later reads cost what a plain module attribute costs.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["deferred_attributes", "lazy_module"]


class _LazyModule(types.ModuleType):
    """Stands for the module ``__name__`` until an attribute is read; never placed in ``sys.modules``."""

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)  # keep introspection (copy, pickle, inspect) from importing torch
        value = getattr(importlib.import_module(self.__name__), attribute)
        setattr(self, attribute, value)
        return value


def lazy_module(name: str) -> Any:
    """A stand-in for module ``name`` (e.g. ``"torch"``) that imports it when an attribute is first read."""
    return _LazyModule(name)


def deferred_attributes(
    package: str, deferred: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) for names imported from their modules on first use.

    ``deferred`` maps each name to the module that defines it; a name read once is then set on the package.
    """

    def get(name: str) -> Any:
        module = deferred.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def names() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(deferred))

    return get, names
