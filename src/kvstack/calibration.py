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

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvstack.errors import InputError, KVStackError
from kvstack.models import MODEL_ALIASES, Geometry, attention_modules, kvstack_home, model_geometry

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

DEFAULT_TOKENS = 4096
"""Calibration tokens used when none are given."""

DEFAULT_SEQUENCE_LENGTH = 1024
"""Tokens per forward pass during calibration."""

DEFAULT_SOURCE = "python-docs"
"""Default calibration text: the stdlib's ``pydoc_data.topics`` (disjoint from the benchmark's prose)."""

SOURCES: dict[str, str] = {
    "python-docs": "Python language-reference topics (stdlib pydoc_data.topics); disjoint from the KJV prose",
    "kjv-end": "the last chapters of the King James Bible (overlaps the default perplexity prose)",
}
"""Named calibration sources; any other source string is the path of a UTF-8 text file."""

FORMAT = "kvstack-calibration"
FORMAT_VERSION = 1
_METADATA_KEY = "kvstack_calibration"

_TENSOR_FIELDS: tuple[str, ...] = (
    "key_second_moment",
    "key_mean",
    "value_second_moment",
    "value_mean",
    "key_absmax",
    "key_pair_norm_max",
    "query_pair_norm_max",
    "key_basis",
    "key_spectrum",
    "value_basis",
    "value_spectrum",
)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_ALIAS_KEYS = frozenset(alias.lower() for alias in MODEL_ALIASES)


class CalibrationError(KVStackError):
    """A calibration artefact is missing, corrupt or made for another model; the message is one line."""


# --------------------------------------------------------------------------------------------------------
# The artefact
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
    """Per-layer, per-KV-head statistics of a model's keys, values and queries (float32 tensors).

    ``L`` is the number of decoder layers, ``H`` the number of KV heads, ``Hq`` the number of query
    heads (query head ``j`` reads KV head ``j // (Hq // H)``) and ``D`` the head dimension. Keys are taken
    *before* RoPE. Channel ``c`` and ``c + D/2`` form the pair RoPE rotates (transformers' ``rotate_half``
    layout), so pair norms are the same before and after RoPE.

    Attributes
    ----------
    key_second_moment
        ``[L, H, D, D]``: ``sum_t k_t k_t^T`` over every calibration token (uncentred, not divided by
        ``tokens``).
    key_mean
        ``[L, H, D]``: mean pre-RoPE key.
    value_second_moment
        ``[L, H, D, D]``: ``sum_t v_t v_t^T``.
    value_mean
        ``[L, H, D]``: mean value.
    key_absmax
        ``[L, H, D]``: ``max_t |k_t[c]|`` per channel.
    key_pair_norm_max
        ``[L, H, D/2]``: ``max_t sqrt(k_t[c]^2 + k_t[c + D/2]^2)``.
    query_pair_norm_max
        ``[L, H, D/2]``: the same for queries, maximised over the ``Hq / H`` query heads of each KV group.
    key_basis
        ``[L, H, D, D]``: eigenvectors of ``key_second_moment`` as columns, by descending eigenvalue (the
        right singular vectors of the stacked keys). Each column's largest-magnitude entry is positive.
    key_spectrum
        ``[L, H, D]``: the matching eigenvalues, descending, non-negative (squared singular values: the
        key energy ``sum_t |k_t|^2`` captured by each direction).
    value_basis, value_spectrum
        The same for values.
    model_key
        :func:`model_key` of the model the statistics belong to.
    model_name
        The model's ``name_or_path`` (or its model type when it has none).
    num_layers, num_kv_heads, num_q_heads, head_dim
        ``L``, ``H``, ``Hq``, ``D``.
    tokens
        Number of calibration tokens.
    sequence_length
        Tokens per forward pass (the longest context seen).
    source
        Description of the calibration text, starting with ``source_label(source) + ":"``.
    created
        ISO-8601 UTC timestamp of the calibration.
    """

    key_second_moment: torch.Tensor
    key_mean: torch.Tensor
    value_second_moment: torch.Tensor
    value_mean: torch.Tensor
    key_absmax: torch.Tensor
    key_pair_norm_max: torch.Tensor
    query_pair_norm_max: torch.Tensor
    key_basis: torch.Tensor
    key_spectrum: torch.Tensor
    value_basis: torch.Tensor
    value_spectrum: torch.Tensor
    model_key: str
    model_name: str
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    tokens: int
    sequence_length: int
    source: str
    created: str

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "num_q_heads", "head_dim", "tokens", "sequence_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CalibrationError(f"calibration field {name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise CalibrationError(f"head_dim must be even (RoPE channel pairs), got {self.head_dim}")
        if self.num_q_heads % self.num_kv_heads:
            raise CalibrationError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for name, shape in self.expected_shapes().items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise CalibrationError(f"calibration field {name} must be a tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape:
                raise CalibrationError(
                    f"calibration tensor {name} has shape {tuple(tensor.shape)}, expected {shape}"
                )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape every tensor field must have, from the geometry fields."""
        layers, heads, dim = self.num_layers, self.num_kv_heads, self.head_dim
        square, vector, half = (layers, heads, dim, dim), (layers, heads, dim), (layers, heads, dim // 2)
        return {
            "key_second_moment": square,
            "key_mean": vector,
            "value_second_moment": square,
            "value_mean": vector,
            "key_absmax": vector,
            "key_pair_norm_max": half,
            "query_pair_norm_max": half,
            "key_basis": square,
            "key_spectrum": vector,
            "value_basis": square,
            "value_spectrum": vector,
        }

    def geometry(self) -> tuple[int, int, int, int]:
        """``(num_layers, num_kv_heads, num_q_heads, head_dim)``."""
        return (self.num_layers, self.num_kv_heads, self.num_q_heads, self.head_dim)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by name."""
        return {name: getattr(self, name) for name in _TENSOR_FIELDS}

    def metadata(self) -> dict[str, Any]:
        """Every non-tensor field by name (JSON-serialisable)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in _TENSOR_FIELDS
        }

    def energy_fraction(self, rank: int, kind: str = "key") -> torch.Tensor:
        """Fraction of the key (or value) energy captured by the top ``rank`` basis directions.

        Parameters
        ----------
        rank
            Number of leading directions, ``0 <= rank <= head_dim``.
        kind
            ``"key"`` or ``"value"``.

        Returns
        -------
        torch.Tensor
            ``[L, H]`` float32: ``sum(spectrum[..., :rank]) / sum(spectrum)`` (1 where the energy is 0).
        """
        if kind not in ("key", "value"):
            raise CalibrationError(f"kind must be 'key' or 'value', got {kind!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= self.head_dim:
            raise CalibrationError(f"rank must be an integer in [0, {self.head_dim}], got {rank!r}")
        spectrum = getattr(self, f"{kind}_spectrum").double()
        total = spectrum.sum(-1)
        top = spectrum[..., :rank].sum(-1)
        return torch.where(total > 0, top / total.clamp_min(1e-300), torch.ones_like(total)).float()

    def summary(self) -> str:
        """One line: model, tokens, geometry and the energy in the top ``D/2`` directions."""
        half = self.head_dim // 2
        keys = float(self.energy_fraction(half, "key").mean())
        values = float(self.energy_fraction(half, "value").mean())
        return (
            f"{self.model_key}: {self.tokens} tokens, {self.num_layers} layers x {self.num_kv_heads} KV heads x "
            f"{self.head_dim} dims; top {half}/{self.head_dim} directions hold {keys:.3f} of the pre-RoPE key "
            f"energy and {values:.3f} of the value energy (mean over layers and heads)"
        )


# --------------------------------------------------------------------------------------------------------
# Model identity and geometry
# --------------------------------------------------------------------------------------------------------


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise CalibrationError(f"{type(model).__name__} has no config; calibration needs a transformers model")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _geometry(model: nn.Module) -> Geometry:
    """The model's geometry (:func:`kvstack.models.model_geometry`), refused unless calibration can fit it."""
    try:
        geometry = model_geometry(model)
    except InputError as err:
        raise CalibrationError(str(err)) from None
    layers, q_heads, kv_heads, head_dim = (geometry.num_layers, geometry.num_q_heads, geometry.num_kv_heads,
                                           geometry.head_dim)
    if min(layers, q_heads, kv_heads, head_dim) < 1 or q_heads % kv_heads or head_dim % 2:
        raise CalibrationError(
            f"unsupported attention geometry: {layers} layers, {q_heads} query heads, {kv_heads} KV heads, "
            f"head_dim {head_dim} (query heads must be a multiple of KV heads, head_dim even)"
        )
    return geometry


def _attention_modules(model: nn.Module, geometry: Geometry) -> list[nn.Module]:
    """The attention module of every decoder layer, ordered by ``layer_idx`` (each index exactly once)."""
    modules = attention_modules(model)
    indices = [int(module.layer_idx) for module in modules]
    if indices != list(range(geometry.num_layers)):
        raise CalibrationError(
            f"found attention modules (with q_proj, k_proj, v_proj, layer_idx) for layers {indices}, "
            f"expected 0..{geometry.num_layers - 1}; calibration supports Llama-style attention "
            "(Llama, Qwen2, Mistral)"
        )
    return modules


def _identity_geometry(geometry: Geometry) -> dict[str, int]:
    """The geometry fields a calibration artefact's model key is made of."""
    return {"num_layers": geometry.num_layers, "num_kv_heads": geometry.num_kv_heads,
            "num_q_heads": geometry.num_q_heads, "head_dim": geometry.head_dim}


def _model_name(model: nn.Module) -> str:
    config = _text_config(model)
    name = str(getattr(config, "name_or_path", "") or getattr(model.config, "name_or_path", "") or "")
    return name or str(getattr(config, "model_type", "") or "model")


def _short_name(model: nn.Module) -> str:
    name = _model_name(model).rstrip("/\\")
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _SAFE_NAME.sub("-", base).strip("-.") or "model"


def _fingerprint(tensor: torch.Tensor) -> bytes:
    """Bytes of ``tensor`` rounded to bfloat16 and widened to float32: equal for a model and its casts."""
    return tensor.detach().to("cpu").to(torch.bfloat16).to(torch.float32).contiguous().numpy().tobytes()


def model_key(model: nn.Module) -> str:
    """A stable identity of a model, used to name and check its calibration artefact.

    The key is ``<basename of name_or_path (or model type)>-<12 hex digits>``, the digits being the
    sha256 of the model type, the attention geometry, the hidden and vocabulary sizes, the first layer's
    ``k_proj`` weight and the first 16 rows of the input embedding. Weights are rounded to bfloat16 first,
    so a float32 model and its bfloat16 cast share a key; models with other weights (another seed,
    another fine-tune) get another key.

    Parameters
    ----------
    model
        A transformers causal LM with Llama-style attention modules.

    Returns
    -------
    str
        E.g. ``"smollm2-135m-3f9a0c1b2d4e"``; only ``[A-Za-z0-9._-]`` characters.

    Raises
    ------
    CalibrationError
        If the model's geometry or attention modules cannot be read.
    """
    geometry = _geometry(model)
    attention = _attention_modules(model, geometry)
    config = _text_config(model)
    identity = {
        "model_type": str(getattr(config, "model_type", "")),
        "geometry": _identity_geometry(geometry),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    digest.update(_fingerprint(attention[0].k_proj.weight))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        digest.update(_fingerprint(embeddings.weight[:16]))
    return f"{_short_name(model)}-{digest.hexdigest()[:12]}"


def _fix_hint(model_name: str) -> str:
    """How the user makes a calibration for ``model_name``."""
    base = model_name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    if base.lower() in _ALIAS_KEYS:
        return f"run `kvstack calibrate --model {base}`"
    if os.path.isdir(model_name):
        return f"run `kvstack calibrate --model {model_name}`"
    return ("run `kvstack calibrate --model <its name or directory>`, or kvstack.calibration.calibrate() "
            "and save_calibration() in Python")


# --------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------


def calibration_path(model_key: str) -> Path:
    """Where the artefact of ``model_key`` lives: ``<kvstack_home()>/calibration/<model_key>.safetensors``."""
    if not model_key or _SAFE_NAME.search(model_key) or model_key.startswith("."):
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
        save_file(tensors, tmp_name, metadata={_METADATA_KEY: json.dumps(header, sort_keys=True)})
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
            raw = (fh.metadata() or {}).get(_METADATA_KEY)
            if raw is None:
                raise ValueError("no kvstack calibration metadata")
            header = json.loads(raw)
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError("not a kvstack calibration file")
            if header.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {header.get('version')!r}, this kvstack reads {FORMAT_VERSION}")
            names = set(fh.keys())
            missing = [name for name in _TENSOR_FIELDS if name not in names]
            if missing:
                raise ValueError(f"missing tensors {', '.join(missing)}")
            tensors = {name: fh.get_tensor(name).to(torch.float32) for name in _TENSOR_FIELDS}
        fields = {f.name for f in dataclasses.fields(Calibration)} - set(_TENSOR_FIELDS)
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
        geometry = _geometry(model)
        expected_model_key = model_key(model)
        model_name = _model_name(model)
        path = calibration_path(expected_model_key)
        if not path.is_file():
            raise CalibrationError(
                f"no calibration for model {expected_model_key} at {path}; {_fix_hint(model_name)}"
            )
    else:
        path = Path(path_or_model)
    cal = _read_file(path)
    hint = _fix_hint(model_name) if model_name is not None else "calibrate that model"
    if geometry is not None and cal.geometry() != tuple(_identity_geometry(geometry).values()):
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
        raise CalibrationError(f"no calibration for model {key} at {path}; {_fix_hint(_model_name(model))}")
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


# --------------------------------------------------------------------------------------------------------
# Calibration text
# --------------------------------------------------------------------------------------------------------


def check_source(source: str) -> None:
    """Raise :class:`CalibrationError` unless ``source`` is a name in :data:`SOURCES` or a readable file."""
    if not isinstance(source, str) or not source:
        raise CalibrationError(f"source must be a non-empty string, got {source!r}")
    if source in SOURCES:
        return
    if not Path(source).expanduser().is_file():
        raise CalibrationError(
            f"unknown calibration source {source!r}: not one of {', '.join(SOURCES)} and no such file"
        )


def source_label(source: str) -> str:
    """The stable name of a source that starts :attr:`Calibration.source`: the name itself, or
    ``"file:<absolute path>"``."""
    if source in SOURCES:
        return source
    return "file:" + os.path.abspath(os.path.expanduser(source))


def _python_docs_paragraphs() -> tuple[list[str], str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    text = [topics[name].strip() for name in names]
    return text, (f"python-docs: pydoc_data.topics of Python {platform.python_version()} "
                  f"({len(names)} topics sorted by name, from the first)")


def _kjv_end_paragraphs(char_budget: int) -> tuple[list[str], str]:
    from kvstack.prose import prose_paragraphs

    paragraphs = prose_paragraphs(None)
    chosen: list[str] = []
    size = 0
    for paragraph in reversed(paragraphs):
        if size >= char_budget:
            break
        chosen.append(paragraph)
        size += len(paragraph) + 2
    chosen.reverse()
    first = len(paragraphs) - len(chosen)
    return chosen, f"kjv-end: KJV text from chapter {first + 1} of {len(paragraphs)} on (the end of the text)"


def _file_paragraphs(path: str) -> tuple[list[str], str]:
    from kvstack.prose import prose_paragraphs

    try:
        paragraphs = list(prose_paragraphs(path))
    except KVStackError as err:
        raise CalibrationError(str(err)) from None
    return paragraphs, f"{source_label(path)}: from the start of the file"


def calibration_text_ids(tokenizer: Any, tokens: int, source: str = DEFAULT_SOURCE) -> tuple[list[int], str]:
    """The first ``tokens`` token ids of the calibration text, and a description of it.

    Parameters
    ----------
    tokenizer
        A transformers tokenizer (called with ``add_special_tokens=False``).
    tokens
        Number of ids wanted.
    source
        A name in :data:`SOURCES` or the path of a UTF-8 text file (paragraphs separated by blank lines).

    Returns
    -------
    tuple of (list of int, str)
        Exactly ``tokens`` ids, and the source description recorded in :attr:`Calibration.source`.

    Raises
    ------
    CalibrationError
        If the source is unknown or unreadable, or holds fewer than ``tokens`` tokens.
    """
    check_source(source)
    budget = 6 * tokens + 64  # characters; English tokens average fewer than 6 characters
    ids: list[int] = []
    description = ""
    for attempt in range(6):
        if source == "python-docs":
            paragraphs, description = _python_docs_paragraphs()
        elif source == "kjv-end":
            paragraphs, description = _kjv_end_paragraphs(budget)
        else:
            paragraphs, description = _file_paragraphs(source)
        pieces: list[str] = []
        size = 0
        for paragraph in paragraphs:
            if size >= budget:
                break
            pieces.append(paragraph)
            size += len(paragraph) + 2
        ids = list(tokenizer("\n\n".join(pieces), add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= tokens or size < budget or attempt == 5:
            break
        budget *= 2
    if len(ids) < tokens:
        raise CalibrationError(
            f"calibration source {source!r} holds only {len(ids)} tokens, fewer than the {tokens} asked for; "
            "use fewer tokens or a longer source"
        )
    return ids[:tokens], description


# --------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------


class _LayerStats:
    """Running float64 statistics of one layer's keys, values and queries (nothing else is kept)."""

    def __init__(self, geometry: Geometry) -> None:
        heads, dim = geometry.num_kv_heads, geometry.head_dim
        self.heads, self.q_heads, self.dim = heads, geometry.num_q_heads, dim
        f64 = torch.float64
        self.key_sum = torch.zeros(heads, dim, dtype=f64)
        self.key_moment = torch.zeros(heads, dim, dim, dtype=f64)
        self.value_sum = torch.zeros(heads, dim, dtype=f64)
        self.value_moment = torch.zeros(heads, dim, dim, dtype=f64)
        self.key_absmax = torch.zeros(heads, dim, dtype=f64)
        self.key_pair = torch.zeros(heads, dim // 2, dtype=f64)
        self.query_pair = torch.zeros(heads, dim // 2, dtype=f64)
        self.key_count = 0
        self.value_count = 0

    def _rows(self, output: torch.Tensor, heads: int) -> torch.Tensor:
        """``output`` (``[..., heads * D]`` or ``[..., heads, D]``) as float64 ``[N, heads, D]`` on the CPU."""
        return output.detach().reshape(-1, heads, self.dim).to("cpu", torch.float64)

    def _pair_norms(self, rows: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        return torch.sqrt(rows[..., :half].square() + rows[..., half:].square())

    def add_keys(self, output: torch.Tensor) -> None:
        keys = self._rows(output, self.heads)  # [N, H, D]
        self.key_count += keys.shape[0]
        self.key_sum += keys.sum(0)
        self.key_moment += torch.einsum("nhc,nhd->hcd", keys, keys)
        self.key_absmax = torch.maximum(self.key_absmax, keys.abs().amax(0))
        self.key_pair = torch.maximum(self.key_pair, self._pair_norms(keys).amax(0))

    def add_values(self, output: torch.Tensor) -> None:
        values = self._rows(output, self.heads)
        self.value_count += values.shape[0]
        self.value_sum += values.sum(0)
        self.value_moment += torch.einsum("nhc,nhd->hcd", values, values)

    def add_queries(self, output: torch.Tensor) -> None:
        queries = self._rows(output, self.q_heads)  # [N, Hq, D]
        per_head = self._pair_norms(queries).amax(0)  # [Hq, D/2]
        grouped = per_head.view(self.heads, self.q_heads // self.heads, self.dim // 2).amax(1)
        self.query_pair = torch.maximum(self.query_pair, grouped)


def _eigen(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns) and eigenvalues of symmetric ``[..., D, D]``, descending, sign-normalised."""
    symmetric = 0.5 * (moment + moment.transpose(-1, -2))
    values, vectors = torch.linalg.eigh(symmetric)
    values, vectors = values.flip(-1).clamp_min(0.0), vectors.flip(-1)
    pivot = vectors.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -2, pivot))
    signs[signs == 0] = 1.0
    return vectors * signs, values


def _sequences(rows: torch.Tensor, tokens: int, sequence_length: int) -> list[torch.Tensor]:
    """Split ``rows`` ``[B, T]`` into ``[1, <= sequence_length]`` chunks holding ``tokens`` ids in total."""
    chunks: list[torch.Tensor] = []
    left = tokens
    for row in rows:
        for start in range(0, row.shape[0], sequence_length):
            if left <= 0:
                return chunks
            chunk = row[start : start + min(sequence_length, left)]
            chunks.append(chunk.unsqueeze(0))
            left -= chunk.shape[0]
    return chunks


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationError(f"{name} must be a positive integer, got {value!r}")
    return value


def _hook_target(attention: nn.Module, projection: str, norm: str) -> nn.Module:
    """The module whose output is the pre-RoPE head tensor: ``q_norm``/``k_norm`` when present, else the
    projection."""
    module = getattr(attention, norm, None)
    return module if isinstance(module, nn.Module) else getattr(attention, projection)


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    *,
    tokens: int | None = None,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
    progress: bool = True,
    input_ids: torch.Tensor | None = None,
    source: str = DEFAULT_SOURCE,
) -> Calibration:
    """Run ``model`` over calibration text and collect per-layer, per-KV-head statistics.

    Parameters
    ----------
    model
        A transformers causal LM with Llama-style attention (Llama, Qwen2, Mistral), on any device.
    tokenizer
        Tokenizes the calibration text; may be ``None`` when ``input_ids`` is given.
    tokens
        Calibration tokens: default :data:`DEFAULT_TOKENS` from the text, or all of ``input_ids``
        (at most ``tokens`` of them when given).
    sequence_length
        Tokens per forward pass; the text is cut into consecutive sequences of this length (the last
        may be shorter), each starting at position 0. A sequence longer than the model's
        ``max_position_embeddings`` is an error.
    progress
        Show a progress bar over sequences on stderr.
    input_ids
        ``[T]`` or ``[B, T]`` token ids to use instead of the text (each row is cut into sequences).
    source
        The calibration text when ``input_ids`` is not given: see :data:`SOURCES` (default
        ``"python-docs"``, disjoint from the perplexity benchmark's prose) or a text file path.

    Returns
    -------
    Calibration
        float32 statistics on the CPU (see :class:`Calibration` for their shapes).

    Raises
    ------
    CalibrationError
        On a bad argument, an unsupported model, or too short a text.
    """
    geometry = _geometry(model)
    attention = _attention_modules(model, geometry)
    _check_count("sequence_length", sequence_length)
    if input_ids is None:
        if tokenizer is None:
            raise CalibrationError("calibrate() needs a tokenizer, or input_ids")
        count = _check_count("tokens", DEFAULT_TOKENS if tokens is None else tokens)
        ids, description = calibration_text_ids(tokenizer, count, source)
        rows = torch.tensor([ids], dtype=torch.long)
    else:
        rows = torch.as_tensor(input_ids)
        if rows.dim() == 1:
            rows = rows.unsqueeze(0)
        if rows.dim() != 2 or rows.numel() == 0 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise CalibrationError(
                f"input_ids must be a non-empty integer tensor [T] or [B, T], got {rows.dtype} {tuple(rows.shape)}"
            )
        count = rows.numel() if tokens is None else min(_check_count("tokens", tokens), rows.numel())
        description = f"input_ids: {rows.shape[0]} x {rows.shape[1]} token ids given directly"
    chunks = _sequences(rows.to(torch.long), count, sequence_length)
    context = getattr(_text_config(model), "max_position_embeddings", None)
    longest = max(int(chunk.shape[1]) for chunk in chunks)
    if isinstance(context, int) and longest > context:
        raise CalibrationError(
            f"sequence_length {sequence_length} exceeds the model's context of {context} tokens; use a shorter one"
        )

    stats = [_LayerStats(geometry) for _ in attention]
    handles = []

    def hook(update: Callable[[torch.Tensor], None]) -> Callable[..., None]:
        def run(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            update(output)

        return run

    for layer, module in zip(stats, attention, strict=True):
        handles.append(_hook_target(module, "k_proj", "k_norm").register_forward_hook(hook(layer.add_keys)))
        handles.append(module.v_proj.register_forward_hook(hook(layer.add_values)))
        handles.append(_hook_target(module, "q_proj", "q_norm").register_forward_hook(hook(layer.add_queries)))

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the decoder stack: skips the LM head and its logits
    try:
        with torch.no_grad():
            for chunk in tqdm(chunks, desc="calibrating", unit="seq", disable=not progress, file=sys.stderr):
                body(input_ids=chunk.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    tokens_seen = sum(int(chunk.shape[1]) for chunk in chunks)
    for index, layer in enumerate(stats):
        if layer.key_count != tokens_seen or layer.value_count != tokens_seen:
            raise CalibrationError(
                f"layer {index} saw {layer.key_count} keys and {layer.value_count} values for {tokens_seen} "
                "tokens; unsupported model"
            )
    key_moment = torch.stack([s.key_moment for s in stats])
    value_moment = torch.stack([s.value_moment for s in stats])
    key_basis, key_spectrum = _eigen(key_moment)
    value_basis, value_spectrum = _eigen(value_moment)
    f32 = torch.float32
    return Calibration(
        key_second_moment=key_moment.to(f32),
        key_mean=(torch.stack([s.key_sum for s in stats]) / tokens_seen).to(f32),
        value_second_moment=value_moment.to(f32),
        value_mean=(torch.stack([s.value_sum for s in stats]) / tokens_seen).to(f32),
        key_absmax=torch.stack([s.key_absmax for s in stats]).to(f32),
        key_pair_norm_max=torch.stack([s.key_pair for s in stats]).to(f32),
        query_pair_norm_max=torch.stack([s.query_pair for s in stats]).to(f32),
        key_basis=key_basis.to(f32),
        key_spectrum=key_spectrum.to(f32),
        value_basis=value_basis.to(f32),
        value_spectrum=value_spectrum.to(f32),
        model_key=model_key(model),
        model_name=_model_name(model),
        num_layers=geometry.num_layers,
        num_kv_heads=geometry.num_kv_heads,
        num_q_heads=geometry.num_q_heads,
        head_dim=geometry.head_dim,
        tokens=tokens_seen,
        sequence_length=sequence_length,
        source=description,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
