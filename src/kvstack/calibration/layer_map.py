"""KVSharer's layer map: the artefact that keeps it (the search that finds it: :mod:`.layer_search`).

The search (Yang et al., 2024, "KVSharer"): on calibration prose, each layer's cache is summarised by its mean
key and value rows; layer pairs are ranked by the Euclidean distance between those summaries, the most
*dissimilar* first; taking the pairs in that order, the upper layer of a pair reuses the lower layer's cache
when, with every share accepted so far, the model's last hidden states keep a mean cosine similarity of at
least ``threshold`` to the full model's. The search stops when ``layers`` layers share (or the pairs run out).

A reused layer must store its own cache (it is no one's reuser), and a reusing layer is no one's source, so
every reusing layer reads a stored cache directly.

The map is a JSON artefact keyed by the model (:func:`~kvstack.calibration.identity.model_key`) under
``<kvstack_home()>/calibration/<model_key>.kvsharer-<layers>-<threshold>.json``; ``kvsharer(...)`` refuses a
map made for another model with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvstack.calibration.artefact import CalibrationError
from kvstack.calibration.json_artefact import write_json_atomically
from kvstack.models import kvstack_home

__all__ = ["MAP_FORMAT", "MAP_VERSION", "layer_map_file", "layer_map_path", "load_layer_map", "save_layer_map"]

MAP_FORMAT = "kvstack-kvsharer-map"
MAP_VERSION = 1


def layer_map_path(model_key: str, layers: int, threshold: float) -> Path:
    """Where the model's map for ``layers`` shared layers at ``threshold`` lives."""
    return kvstack_home() / "calibration" / f"{model_key}.kvsharer-{layers}-{threshold:g}.json"


def layer_map_file(model_key: str, layers: int, threshold: float, path: str | None = None) -> Path:
    """The layer map kvsharer reads: ``path`` (user directory expanded), or the model's own file."""
    return Path(path).expanduser() if path is not None else layer_map_path(model_key, layers, threshold)


def _make_hint(layers: int, threshold: float) -> str:
    return f"kvstack calibrate --model MODEL --kvsharer {layers} --kvsharer-threshold {threshold:g}"


def load_layer_map(model_key: str | None, num_layers: int, layers: int, threshold: float,
                   path: str | None = None) -> dict[int, int]:
    """``{reusing layer: reused layer}`` from the artefact at ``path`` (None: the model's own file).

    Raises :class:`CalibrationError` (one line) when the file is missing, unreadable, made for another model,
    or names a layer outside the model.
    """
    if model_key is None:
        raise CalibrationError("kvsharer needs the model's identity to find its layer map")
    target = layer_map_file(model_key, layers, threshold, path)
    if not target.is_file():
        raise CalibrationError(f"no kvsharer map at {target}; make it with `{_make_hint(layers, threshold)}`")
    try:
        record = json.loads(target.read_text())
        made_for, pairs = record["model_key"], record["map"]
        if record.get("format") != MAP_FORMAT:
            raise ValueError("not a kvsharer map")
        layer_map = {int(layer): int(source) for layer, source in pairs.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CalibrationError(f"{target} is not a readable kvsharer map ({err})") from None
    if made_for != model_key:
        raise CalibrationError(f"the kvsharer map {target} was made for model {made_for}, not this one ({model_key}); "
                               f"make one for it with `{_make_hint(layers, threshold)}`")
    for layer, source in layer_map.items():
        if not (0 <= source < layer < num_layers):
            raise CalibrationError(f"the kvsharer map {target} links layer {layer} to {source}, outside the model's "
                                   f"{num_layers} layers or not below it")
    return layer_map


def save_layer_map(record: dict[str, Any], path: Path) -> Path:
    """Write a record atomically (temporary file, then rename)."""
    return write_json_atomically(record, path)
