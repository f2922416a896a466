"""Checkpoint formats other than a plain transformers directory, which :func:`kvstack.models.load_model` reads.

A higher layer registers a format (``kvstack.transforms`` registers the one its ``mla`` and ``cla`` models are
saved in) so that the model loader, lower in the package, reads it without importing that layer. Imports
nothing; torch-free.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

__all__ = ["CheckpointFormat", "reader_for", "register_checkpoint_format"]

CheckpointFormat = tuple[Callable[[pathlib.Path], bool], Callable[[pathlib.Path, Any], Any]]
_FORMATS: list[CheckpointFormat] = []


def register_checkpoint_format(recognises: Callable[[pathlib.Path], bool],
                               read: Callable[[pathlib.Path, Any], Any]) -> None:
    """Let :func:`kvstack.models.load_model` read a directory ``recognises`` accepts with ``read(directory,
    dtype)``, which returns the model (on the CPU)."""
    _FORMATS.append((recognises, read))


def reader_for(directory: pathlib.Path) -> Callable[[pathlib.Path, Any], Any] | None:
    """The registered reader of ``directory``, or None for a plain transformers directory."""
    for recognises, read in _FORMATS:
        if recognises(directory):
            return read
    return None
