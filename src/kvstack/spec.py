"""The spec language: one string names a method and its parameters, everywhere.

Grammar (a safe subset of Python expressions, parsed with :mod:`ast`, never evaluated)::

    spec     := term ("+" term)*
    term     := NAME | NAME "(" [inner ","] [key "=" literal ("," key "=" literal)*] ")"
    inner    := term                      # for wrappers, e.g. adakv(snapkv(ratio=0.5))
    literal  := int | float | str | True | False | None

Examples: ``full``, ``snapkv(ratio=0.5)``, ``streamingllm(budget=512, sinks=4)``,
``adakv(h2o(ratio=0.75), floor=0.2)``, ``snapkv(ratio=0.5) + kivi(bits=2)``. ``+`` composes one
selection method with one codec; a codec alone (``kivi(bits=2)``) keeps every token.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from kvstack.errors import KVStackError

__all__ = ["MethodInfo", "SpecError", "describe", "list_methods", "parse", "register", "register_composer", "registry"]


class SpecError(KVStackError):
    """A method spec that cannot be parsed or validated; the message is one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """What ``kvstack methods`` prints for one method."""

    name: str
    category: str
    description: str
    parameters: dict[str, Any]  # name -> default ("required" when it has none)
    wraps: bool  # takes another method as its first, positional argument

    def signature(self) -> str:
        """``name(param=default, ...)`` with the inner method shown as ``METHOD`` for wrappers."""
        parts = ["METHOD"] if self.wraps else []
        parts += [f"{key}={value!r}" for key, value in self.parameters.items()]
        return f"{self.name}({', '.join(parts)})"


_REGISTRY: dict[str, tuple[type, MethodInfo]] = {}
_COMPOSER: Callable[[list[Any], str], Any] | None = None
_TRANSFORM_COMPOSER: Callable[[list[Any], str], Any] | None = None

T = TypeVar("T")


def register(name: str, *, category: str, description: str, wraps: bool = False) -> Callable[[type[T]], type[T]]:
    """Class decorator that registers a method dataclass under the name users type.

    Parameters
    ----------
    name:
        The spec name, lower case (``"snapkv"``).
    category:
        Taxonomy category, e.g. ``"token/selection/static"``.
    description:
        One line for ``kvstack methods``.
    wraps:
        True for wrappers (budget allocators) whose first field ``inner`` is another method.
    """

    def decorate(cls: type[T]) -> type[T]:
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        params: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not field.init or field.name == "inner":
                continue
            if field.default is not dataclasses.MISSING:
                params[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                params[field.name] = field.default_factory()
            else:
                params[field.name] = "required"
        info = MethodInfo(name=name, category=category, description=description, parameters=params, wraps=wraps)
        cls.spec_name = name  # type: ignore[attr-defined]
        cls.info = info  # type: ignore[attr-defined]
        _REGISTRY[name] = (cls, info)
        return cls

    return decorate


def register_composer(compose: Callable[[list[Any], str], Any], *, transforms: bool = False) -> None:
    """Set the function that joins the terms of a ``+`` spec into one method: cache methods (one selection
    method, one codec) or, with ``transforms=True``, model transforms applied in order.

    The method and transform families register them when ``kvstack`` is imported, so the parser names no
    method module.
    """
    global _COMPOSER, _TRANSFORM_COMPOSER
    if transforms:
        _TRANSFORM_COMPOSER = compose
    else:
        _COMPOSER = compose


def registry() -> dict[str, tuple[type, MethodInfo]]:
    """All registered methods (``import kvstack`` registers the method families)."""
    return dict(_REGISTRY)


def list_methods() -> list[MethodInfo]:
    """Every registered method, sorted by taxonomy category then name."""
    return sorted((info for _, info in registry().values()), key=lambda i: (i.category, i.name))


def describe() -> str:
    """A plain-text table of every method: category, signature with defaults, description."""
    rows = [(i.category, i.signature(), i.description) for i in list_methods()]
    width_cat = max(len(r[0]) for r in rows)
    lines = []
    for category, signature, description in rows:
        lines.append(f"{category:<{width_cat}}  {signature}\n{'':<{width_cat}}      {description}")
    return "\n".join(lines)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Unquoted(str):
    """A bare word given as a parameter value: the method's own check says what the value should be."""


def _literal(node: ast.AST, spec: str) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        value = node.operand.value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    if isinstance(node, ast.Name) and node.id.lower() not in registry():
        return _Unquoted(node.id)
    if isinstance(node, (ast.Call, ast.Name)):
        return _build(node, spec)
    raise SpecError(f"in {spec!r}: parameter values must be numbers, strings, True/False/None or a method")


def _build(node: ast.AST, spec: str) -> Any:
    methods = registry()
    if isinstance(node, ast.Name):
        name, args, keywords = node.id, [], []
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, args, keywords = node.func.id, node.args, node.keywords
    else:
        raise SpecError(f"cannot parse {spec!r}: expected name(key=value, ...), e.g. 'snapkv(ratio=0.5)'")
    key = name.lower()
    if key not in methods:
        names = sorted(methods)
        raise SpecError(f"unknown method {name!r}{_suggest(key, names)}; valid methods: {', '.join(names)}")
    cls, info = methods[key]
    kwargs: dict[str, Any] = {}
    if info.wraps:
        if len(args) != 1:
            raise SpecError(f"{key} wraps one method given first, e.g. {key}(snapkv(ratio=0.5)); got {len(args)}")
        kwargs["inner"] = _build(args[0], spec)
    elif args:
        raise SpecError(f"{key} takes keyword parameters only: {info.signature()}")
    for keyword in keywords:
        if keyword.arg is None:
            raise SpecError(f"in {spec!r}: '**' is not allowed")
        if keyword.arg not in info.parameters:
            valid = ", ".join(info.parameters) or "none"
            raise SpecError(
                f"unknown parameter {keyword.arg!r} for {key}{_suggest(keyword.arg, list(info.parameters))}; "
                f"valid parameters: {valid}"
            )
        kwargs[keyword.arg] = _literal(keyword.value, spec)
    missing = [p for p, d in info.parameters.items() if d == "required" and p not in kwargs]
    if missing:
        raise SpecError(f"{key} needs {', '.join(missing)}: {info.signature()}")
    try:
        method = cls(**kwargs)
    except SpecError:
        raise
    except (TypeError, ValueError) as err:
        raise SpecError(f"{key}: {err}") from None
    for name, value in kwargs.items():
        if isinstance(value, _Unquoted):  # a text parameter took it: still ask for quotes, to keep specs exact
            raise SpecError(f"in {spec!r}: {str(value)!r} is not a method; quote text values, e.g. {name}='{value}'")
    return method


def _terms(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _terms(node.left) + _terms(node.right)
    return [node]


def parse(spec: str | Any) -> Any:
    """Parse a spec string into a method object (an already-built method passes through).

    Raises
    ------
    SpecError
        With one line naming the problem and the valid choices.
    """
    if not isinstance(spec, str):
        return spec
    text = spec.strip()
    if not text:
        raise SpecError("empty method spec; try 'full' or 'snapkv(ratio=0.5)' (see `kvstack methods`)")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise SpecError(f"cannot parse {spec!r}: expected name(key=value, ...), e.g. 'snapkv(ratio=0.5)'") from None
    terms = _terms(tree)
    built = [_build(term, text) for term in terms]
    if len(built) == 1 and not getattr(built[0], "is_codec", False):
        return built[0]
    transforms = [getattr(term, "is_transform", False) for term in built]
    if any(transforms):
        if not all(transforms):
            raise SpecError(f"cannot join model transforms and cache methods in {spec!r}: apply the transform with "
                            "kvstack.transform, then give the cache method to make_cache")
        if _TRANSFORM_COMPOSER is None:
            raise RuntimeError("no transform composer registered: import kvstack (it registers the transforms)")
        return _TRANSFORM_COMPOSER(built, text)
    if _COMPOSER is None:
        raise RuntimeError("no composer registered: import kvstack (it registers the method families)")
    return _COMPOSER(built, text)
