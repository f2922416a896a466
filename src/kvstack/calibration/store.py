"""Where artefacts live (one file per model under ``<kvstack_home()>/calibration``), and saving and loading them."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvstack.calibration.artefact import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_KEY,
    TENSOR_FIELDS,
    Calibration,
    CalibrationError,
)
from kvstack.calibration.fit import DEFAULT_SEQUENCE_LENGTH, DEFAULT_TOKENS, calibrate
from kvstack.calibration.identity import (
    SAFE_NAME,
    checked_geometry,
    fix_hint,
    identity_geometry,
    model_display_name,
    model_key,
)
from kvstack.calibration.text import DEFAULT_SOURCE
from kvstack.models import Geometry, kvstack_home

__all__ = ["calibration_path", "get_calibration", "load_calibration", "save_calibration"]

def calibration_path(model_key: str) -> Path:
    """Where the artefact of ``model_key`` lives: ``<kvstack_home()>/calibration/<model_key>.safetensors``."""
    if not model_key or SAFE_NAME.search(model_key) or model_key.startswith("."):
        raise CalibrationError(f"invalid model key {model_key!r}; use model_key(model)")
    return kvstack_home() / "calibration" / f"{model_key}.safetensors"


def save_calibration(cal: Calibration, path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``cal`` as float32 safetensors with its metadata, atomically (temporary file, then rename).

    Parameters
    ----------
    cal
        The calibration to save.
    path
        Target file; default :func:`calibration_path` of ``cal.model_key``.

    Returns
    -------
    Path
        The file written.
    """
    from safetensors.torch import save_file

    target = Path(path) if path is not None else calibration_path(cal.model_key)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in cal.tensors().items()}
    header = {"format": FORMAT, "version": FORMAT_VERSION, **cal.metadata()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.stem}-", suffix=".safetensors", dir=target.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
        with open(tmp_name, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def _read_file(path: Path) -> Calibration:
    """Read and validate one artefact file; any problem becomes a one-line :class:`CalibrationError`."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CalibrationError(f"no calibration file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                raise ValueError("no kvstack calibration metadata")
            header = json.loads(raw)
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError("not a kvstack calibration file")
            if header.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {header.get('version')!r}, this kvstack reads {FORMAT_VERSION}")
            names = set(fh.keys())
            missing = [name for name in TENSOR_FIELDS if name not in names]
            if missing:
                raise ValueError(f"missing tensors {', '.join(missing)}")
            tensors = {name: fh.get_tensor(name).to(torch.float32) for name in TENSOR_FIELDS}
        fields = {f.name for f in dataclasses.fields(Calibration)} - set(TENSOR_FIELDS)
        absent = sorted(fields - set(header))
        if absent:
            raise ValueError(f"missing metadata {', '.join(absent)}")
        cal = Calibration(**tensors, **{name: header[name] for name in fields})
    except CalibrationError as err:
        raise CalibrationError(f"calibration file {path} is invalid ({err}); delete it and calibrate again") from None
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:200]
        raise CalibrationError(
            f"calibration file {path} is unreadable or corrupt ({type(err).__name__}: {detail}); "
            "delete it or rerun `kvstack calibrate` with --force"
        ) from None
    for name, tensor in cal.tensors().items():
        if not bool(torch.isfinite(tensor).all()):
            raise CalibrationError(f"calibration file {path} is corrupt (non-finite values in {name}); "
                                   "delete it or rerun `kvstack calibrate` with --force")
    return cal


def load_calibration(
    path_or_model: str | os.PathLike[str] | nn.Module, expected_model_key: str | None = None
) -> Calibration:
    """Load a calibration artefact, checking that it belongs to the expected model.

    Parameters
    ----------
    path_or_model
        A file path, or a model: then its file is :func:`calibration_path` of :func:`model_key`, and the
        file's geometry and key must match the model.
    expected_model_key
        With a path: reject a file whose ``model_key`` differs (a model given as ``path_or_model`` sets it).

    Returns
    -------
    Calibration
        The artefact, float32 tensors on the CPU.

    Raises
    ------
    CalibrationError
        If the file is missing, unreadable or corrupt, or was made for another model (the message names
        both models and the command that fixes it).
    """
    model_name: str | None = None
    geometry: Geometry | None = None
    if isinstance(path_or_model, nn.Module):
        model = path_or_model
        geometry = checked_geometry(model)
        expected_model_key = model_key(model)
        model_name = model_display_name(model)
        path = calibration_path(expected_model_key)
        if not path.is_file():
            raise CalibrationError(
                f"no calibration for model {expected_model_key} at {path}; {fix_hint(model_name)}"
            )
    else:
        path = Path(path_or_model)
    cal = _read_file(path)
    hint = fix_hint(model_name) if model_name is not None else "calibrate that model"
    if geometry is not None and cal.geometry() != tuple(identity_geometry(geometry).values()):
        layers, kv_heads, q_heads, head_dim = cal.geometry()
        made_for = Geometry(num_layers=layers, num_q_heads=q_heads, num_kv_heads=kv_heads, head_dim=head_dim,
                            max_context=None, rope_inv_freq=None).describe()
        raise CalibrationError(
            f"calibration file {path} was made for model {cal.model_key} ({made_for}), not "
            f"{expected_model_key} ({geometry.describe()}); {hint}"
        )
    if expected_model_key is not None and cal.model_key != expected_model_key:
        raise CalibrationError(
            f"calibration file {path} was made for model {cal.model_key}, not {expected_model_key}; {hint}"
        )
    return cal


def get_calibration(
    model: nn.Module,
    *,
    tokenizer: Any = None,
    calibrate_if_missing: bool = False,
    tokens: int = DEFAULT_TOKENS,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    source: str = DEFAULT_SOURCE,
    progress: bool = True,
) -> Calibration:
    """The saved calibration of ``model``, or a new one when asked.

    Parameters
    ----------
    model
        The model; its artefact is found by :func:`model_key`.
    tokenizer
        Tokenizer for calibrating; default: loaded from the model's ``name_or_path`` (local files only).
    calibrate_if_missing
        Calibrate (and save) when no artefact exists or the existing one is unreadable; otherwise raise.
    tokens, sequence_length, source, progress
        Passed to :func:`calibrate` when calibrating.

    Returns
    -------
    Calibration
        The model's calibration.

    Raises
    ------
    CalibrationError
        If there is no usable artefact and ``calibrate_if_missing`` is false (the message gives the
        ``kvstack calibrate`` command to run), or calibration itself fails.
    """
    key = model_key(model)
    path = calibration_path(key)
    if path.is_file():
        try:
            return load_calibration(model)
        except CalibrationError as err:
            if not calibrate_if_missing:
                raise
            print(f"kvstack: {err}; calibrating again", file=sys.stderr, flush=True)
    elif not calibrate_if_missing:
        raise CalibrationError(f"no calibration for model {key} at {path}; {fix_hint(model_display_name(model))}")
    if tokenizer is None:
        tokenizer = _load_tokenizer(model)
    cal = calibrate(model, tokenizer, tokens=tokens, sequence_length=sequence_length, source=source,
                    progress=progress)
    save_calibration(cal)
    return cal


def _load_tokenizer(model: nn.Module) -> Any:
    from transformers import AutoTokenizer

    name = str(getattr(model.config, "name_or_path", "") or "")
    try:
        if not name:
            raise ValueError("the model has no name_or_path")
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as err:
        raise CalibrationError(
            f"cannot load a tokenizer for {name or 'the model'} ({type(err).__name__}); pass tokenizer= "
            "or input_ids= to calibrate()"
        ) from None
