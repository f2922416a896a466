"""Model-level transforms (taxonomy §2): conversions that make a pretrained model need less KV cache.

``kvstack.transform(model, "gqa(kv_heads=1, how='svd')", tokenizer=tokenizer)`` returns a new model (the
input is not modified) and a record of what changed; the new model is an ordinary transformers model of the
same architecture, which ``make_cache``, the bench and the engine run unchanged, and which
``save_pretrained`` writes as a checkpoint plain transformers loads. Importing this package registers the
transforms in the spec language (no torch at import).
"""

from kvstack.transforms import chain, checkpoint, grouping, latent, repair, sharing  # noqa: F401  (registration)
from kvstack.transforms.apply import transform
from kvstack.transforms.base import Transform, TransformError

__all__ = ["Transform", "TransformError", "transform"]
