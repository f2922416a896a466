"""Writing a JSON calibration artefact (KVSharer's layer map, retrieval-head scores) atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomically"]


def write_json_atomically(record: dict[str, Any], path: Path) -> Path:
    """Write ``record`` to ``path`` through a temporary file in the same directory, then rename it in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path
