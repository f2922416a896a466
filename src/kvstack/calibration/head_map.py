"""Retrieval heads: the artefact keeping each KV head's retrieval score (the probe: :mod:`.head_probe`).

The probe (the retrieval score of Wu et al., 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality", as RazorAttention and HeadKV use it): synthetic needle prompts are built from calibration text
with a random number inserted at a random depth, and the model is asked to repeat it. At every decoding step
whose greedy token is a token of the needle, a query head *retrieves* when its strongest attention falls on
that token inside the needle. A query head's score is the fraction of such steps it retrieves; a KV head's
is the largest over its group's query heads (its cache serves them all). The probe's keyed prompts hide
several numbers under names and ask for one (``"method": "probe-keyed"``). DuoAttention's gates fitted with
the model frozen, and a greedy choice by the answer's gradient at duo's split (:mod:`.head_gates`), write the
same artefact with ``"method": "duo-gates"`` and ``"duo-greedy"``; the head search, a greedy choice by the
answer's loss with each candidate whole (:mod:`.head_search`), with ``"duo-search"``.

The scores are a JSON artefact keyed by the model under ``<kvstack_home()>/calibration/<model_key>.heads.json``
(``kvstack calibrate --retrieval-heads [probe|keyed|gates|greedy|search]``, or ``--out PATH``); ``duo(...)``
refuses one made for another model with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvstack.calibration.artefact import CalibrationError
from kvstack.calibration.json_artefact import write_json_atomically
from kvstack.models import kvstack_home

__all__ = ["HEADS_FORMAT", "head_map_file", "head_map_path", "load_head_scores", "save_head_scores"]

HEADS_FORMAT = "kvstack-retrieval-heads"


def head_map_path(model_key: str) -> Path:
    return kvstack_home() / "calibration" / f"{model_key}.heads.json"


def head_map_file(model_key: str, path: str | None = None) -> Path:
    """The head map duo reads: ``path`` (user directory expanded), or the model's own file."""
    return Path(path).expanduser() if path is not None else head_map_path(model_key)


def load_head_scores(model_key: str | None, num_layers: int, num_kv_heads: int,
                     path: str | None = None) -> list[list[float]]:
    """``[L][H]`` retrieval scores from the artefact at ``path`` (None: the model's own file); one line if it is
    missing, unreadable, made for another model or shaped for another geometry."""
    if model_key is None:
        raise CalibrationError("duo needs the model's identity to find its retrieval heads")
    target = head_map_file(model_key, path)
    hint = "make it with `kvstack calibrate --model MODEL --retrieval-heads`"
    if not target.is_file():
        raise CalibrationError(f"no retrieval-head scores at {target}; {hint}")
    try:
        record = json.loads(target.read_text())
        if record.get("format") != HEADS_FORMAT:
            raise ValueError("not a retrieval-head artefact")
        made_for, scores = record["model_key"], [[float(x) for x in row] for row in record["scores"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CalibrationError(f"{target} is not a readable retrieval-head artefact ({err})") from None
    if made_for != model_key:
        raise CalibrationError(f"the retrieval-head scores {target} were made for model {made_for}, not this one "
                               f"({model_key}); {hint}")
    if len(scores) != num_layers or any(len(row) != num_kv_heads for row in scores):
        raise CalibrationError(f"the retrieval-head scores {target} are not {num_layers} layers x {num_kv_heads} "
                               f"KV heads; {hint}")
    return scores


def save_head_scores(record: dict[str, Any], path: Path) -> Path:
    """Write a record atomically (temporary file, then rename)."""
    return write_json_atomically(record, path)
