"""kvstack: KV-cache management for large language models.

    import kvstack
    model, tokenizer = kvstack.load_model("smollm2-135m")
    cache = kvstack.make_cache(model, "snapkv(ratio=0.5)")
    out = model.generate(ids, **kvstack.cache_kwargs(model, cache), max_new_tokens=32)
    cache.kv_bytes(), cache.full_kv_bytes()
"""

from kvstack.api import (
    InputError,
    cache_kwargs,
    generate,
    make_cache,
    prefill,
    prefill_shared,
    prefill_shared_chunks,
)
from kvstack.cache import KVStackCache
from kvstack.spec import SpecError, describe, list_methods, parse


def load_model(*args, **kwargs):
    """Load a model and tokenizer; see :func:`kvstack.models.load_model`."""
    from kvstack.models import load_model as _load

    return _load(*args, **kwargs)


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
]
__version__ = "0.1.0"
