"""Saving and loading a transformed model whose attention exists only in kvstack (``mla``, ``cla``).

A ``gqa`` model is an ordinary checkpoint (``save_pretrained``). A model with latent or shared-KV attention is
written as its config (which carries ``kvstack_latent_kv`` / ``kvstack_shared_kv``) and its state dict in
:data:`WEIGHTS`, not ``model.safetensors``: plain transformers then refuses the directory instead of loading
it with freshly initialised key and value projections. :func:`load_transformed` builds the architecture from
the config, gives it the transformed attention modules the config names, and loads every tensor strictly;
it is registered with :mod:`kvstack.checkpoint_formats`, so :func:`kvstack.models.load_model` reads such a
directory.
"""

from __future__ import annotations

import pathlib
from typing import Any

from kvstack.checkpoint_formats import register_checkpoint_format
from kvstack.transforms.latent import latent_geometry, restore_latent
from kvstack.transforms.sharing import restore_sharing, shared_layers

__all__ = ["WEIGHTS", "is_plain", "is_transformed_checkpoint", "load_transformed", "save_transformed"]

WEIGHTS = "kvstack_model.safetensors"


def is_plain(model: Any) -> bool:
    """Whether ``model`` runs in plain transformers (no latent or shared-KV attention)."""
    return latent_geometry(model.config) is None and not shared_layers(model.config)


def save_transformed(model: Any, directory: str | pathlib.Path) -> None:
    """Write ``model`` to ``directory``: ``save_pretrained`` when plain, else its config and :data:`WEIGHTS`."""
    from safetensors.torch import save_model

    directory = pathlib.Path(directory)
    if is_plain(model):
        model.save_pretrained(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS))  # tied tensors (embeddings and head) are written once


def is_transformed_checkpoint(directory: str | pathlib.Path) -> bool:
    """Whether ``directory`` holds a model written by :func:`save_transformed` in kvstack's own format."""
    return (pathlib.Path(directory) / WEIGHTS).is_file()


def load_transformed(directory: str | pathlib.Path, dtype: Any) -> Any:
    """The model :func:`save_transformed` wrote to ``directory`` (``dtype`` parameters, on the CPU)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = pathlib.Path(directory)
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    restore_sharing(model)
    restore_latent(model)
    load_model(model, str(directory / WEIGHTS), strict=True)
    return model


register_checkpoint_format(is_transformed_checkpoint, load_transformed)
