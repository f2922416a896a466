"""Calibration artefacts for KV-cache quantisation and low-rank codecs.

A calibration is a set of per-layer, per-KV-head statistics of a model's keys, values and queries,
collected from one pass over calibration text and stored once per model under
``<kvstack_home()>/calibration/<model_key>.safetensors``. Codecs read it instead of recomputing it:

- second moments and means of the pre-RoPE keys and of the values, and their eigen-decompositions
  (``key_basis`` / ``key_spectrum``: the right singular vectors and squared singular values of the
  stacked pre-RoPE keys, so ``K ~= K @ V[:, :r] @ V[:, :r].T``), for low-rank projections;
- per-channel key maxima and per-RoPE-pair maxima of keys and queries, for quantisation scales and
  for bounding attention logits.

Statistics are accumulated in float64 from forward hooks on every attention module's ``q_proj``,
``k_proj`` and ``v_proj`` (``q_norm`` / ``k_norm`` instead, where a model normalises heads before RoPE),
so no activation is kept. The artefact is saved as float32.

Calibration text
----------------
The perplexity benchmark (:class:`kvstack.bench.tasks.Perplexity`) reads excerpts starting at a random
paragraph of the *whole* default prose (the King James Bible), so no part of that text is guaranteed to
be unseen by it. The default calibration source is therefore a different text that ships with Python
itself: the language-reference topics of ``pydoc_data.topics`` (English technical prose with code
examples), disjoint from the benchmark by construction. ``source="kjv-end"`` takes the last chapters of
the KJV instead (only disjoint when the benchmark runs on another ``--prose-file``), and any other value
is read as the path of a UTF-8 text file. The text used is recorded in :attr:`Calibration.source`.

Example
-------
>>> from kvstack.calibration import get_calibration
>>> cal = get_calibration(model, tokenizer=tokenizer, calibrate_if_missing=True)  # doctest: +SKIP
>>> cal.key_basis.shape  # [layers, kv_heads, head_dim, head_dim]  # doctest: +SKIP
"""

from kvstack.calibration.artefact import Calibration, CalibrationError
from kvstack.calibration.fit import DEFAULT_SEQUENCE_LENGTH, DEFAULT_TOKENS, calibrate
from kvstack.calibration.identity import model_key
from kvstack.calibration.store import calibration_path, get_calibration, load_calibration, save_calibration
from kvstack.calibration.text import DEFAULT_SOURCE, SOURCES, calibration_text_ids, check_source, source_label

__all__ = [
    "DEFAULT_SEQUENCE_LENGTH",
    "DEFAULT_SOURCE",
    "DEFAULT_TOKENS",
    "SOURCES",
    "Calibration",
    "CalibrationError",
    "calibrate",
    "calibration_path",
    "calibration_text_ids",
    "check_source",
    "get_calibration",
    "load_calibration",
    "model_key",
    "save_calibration",
    "source_label",
]
