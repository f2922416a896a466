"""KV storage: transformers ``Cache``/``CacheLayerMixin`` subclasses with honest byte accounting."""

from kvstack.cache.cache import KVStackCache
from kvstack.cache.layer import KVStackLayer

__all__ = ["KVStackCache", "KVStackLayer"]
