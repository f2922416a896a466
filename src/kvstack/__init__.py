"""kvstack: KV-cache management for large language models.

    import kvstack
    model, tokenizer = kvstack.load_model("smollm2-135m")
    cache = kvstack.make_cache(model, "snapkv(ratio=0.5)")
    out = model.generate(ids, **kvstack.cache_kwargs(model, cache), max_new_tokens=32)
    cache.kv_bytes(), cache.full_kv_bytes()

Importing kvstack registers every method (the method families import no torch at module level) and
nothing heavier: the names below that need torch or transformers import them when first used, so the
CLI's help, ``kvstack methods`` and spec errors answer at once.
"""

from __future__ import annotations

from kvstack import methods as _methods  # noqa: F401  (registers every method under its spec name)
from kvstack import transforms as _transforms  # noqa: F401  (registers the model transforms)
from kvstack.lazy_import import deferred_attributes
from kvstack.spec import SpecError, describe, list_methods, parse

# name -> module that defines it, imported on first use (PEP 562)
_DEFERRED = {
    "InputError": "kvstack.errors",
    "cache_kwargs": "kvstack.api",
    "generate": "kvstack.api",
    "make_cache": "kvstack.api",
    "prefill": "kvstack.api",
    "prefill_shared": "kvstack.api",
    "prefill_shared_chunks": "kvstack.api",
    "KVStackCache": "kvstack.cache",
    "load_model": "kvstack.models",
    "transform": "kvstack.transforms",
}


__getattr__, __dir__ = deferred_attributes(__name__, _DEFERRED)

__all__ = [
    "InputError",
    "KVStackCache",
    "SpecError",
    "cache_kwargs",
    "describe",
    "generate",
    "list_methods",
    "load_model",
    "make_cache",
    "parse",
    "prefill",
    "prefill_shared",
    "prefill_shared_chunks",
    "transform",
]
__version__ = "0.1.0"
