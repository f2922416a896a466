"""Calibration text: the stdlib's Python documentation (default), the end of the KJV, or a file."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from kvstack.calibration.artefact import CalibrationError
from kvstack.errors import KVStackError

__all__ = ["DEFAULT_SOURCE", "SOURCES", "calibration_text_ids", "check_source", "source_label"]

DEFAULT_SOURCE = "python-docs"
"""Default calibration text: the stdlib's ``pydoc_data.topics`` (disjoint from the benchmark's prose)."""
SOURCES: dict[str, str] = {
    "python-docs": "Python language-reference topics (stdlib pydoc_data.topics); disjoint from the KJV prose",
    "kjv-end": "the last chapters of the King James Bible (overlaps the default perplexity prose)",
}
"""Named calibration sources; any other source string is the path of a UTF-8 text file."""


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
