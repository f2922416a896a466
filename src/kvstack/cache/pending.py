"""The handshake between a cache layer's ``update`` and the attention function that runs right after it.

transformers calls ``cache.update(...)`` and then the attention function with the queries. A kvstack layer
records itself here in ``update``; :mod:`kvstack.attention` takes it back out and hands it the queries.
Thread-local, so models run on several threads do not see each other's layers.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["set_pending", "take_pending"]

_pending = threading.local()


def set_pending(layer: Any) -> None:
    """Called by a layer's ``update``: its attention is the next one to run on this thread."""
    _pending.layer = layer


def take_pending() -> Any | None:
    """The layer whose ``update`` ran last on this thread and whose attention has not run yet (then cleared)."""
    layer = getattr(_pending, "layer", None)
    _pending.layer = None
    return layer
