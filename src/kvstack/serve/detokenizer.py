"""Incremental detokenization with stop strings: the text of a choice as its tokens arrive.

Each new token re-decodes the whole output and emits only the new suffix: decoding token by token would be
wrong for tokenizers whose text depends on the neighbours (leading spaces, byte-level BPE). Text ending in
U+FFFD (a character whose bytes have not all arrived yet) is held back until it is complete. With stop
strings, the last ``len(longest stop) - 1`` characters are held back too (they may be the start of a stop
string), and the text is cut where the first stop string begins: the engine finishes a request on a stop
string but keeps the whole token that completed it, whose text may run past it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """The text of one output, emitted piece by piece.

    Parameters
    ----------
    tokenizer
        Anything with ``decode(ids, skip_special_tokens=True)``.
    stop : sequence of str, optional
        Stop strings; the text ends where the first one begins (the stop string is not part of it).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(text for text in stop if text)
        self._hold = max((len(text) for text in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False  # a stop string was found: the text is final

    def add(self, token_ids: Sequence[int], *, final: bool = False) -> str:
        """Add new tokens; return the text they complete (possibly empty).

        Parameters
        ----------
        token_ids : sequence of int
            The output's new tokens.
        final : bool, optional
            The output is finished: emit everything held back (unless a stop string ends it).

        Returns
        -------
        str
            New text, to append to what was emitted before. Once a stop string is found (``stopped``), the
            text is final and further calls return ``""``.
        """
        if self.stopped:
            return ""
        self.token_ids.extend(int(token) for token in token_ids)
        decoded = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        end = len(decoded)
        cut = self._first_stop(decoded)
        if cut is not None:
            self.stopped = True
            end = cut
        elif not final:
            while end > 0 and decoded[end - 1] == REPLACEMENT_CHARACTER:  # an incomplete character: wait for it
                end -= 1
            end = min(end, len(decoded) - self._hold)
        if end <= len(self.text):
            return ""
        # The decoded text extends what was emitted, except when a tokenizer rewrites earlier characters;
        # then only the characters past what was emitted are sent (what was sent cannot be taken back).
        new = decoded[len(self.text) : end]
        self.text += new
        return new

    def _first_stop(self, decoded: str) -> int | None:
        """Where the earliest stop string begins in ``decoded`` (None if none does).

        Only the end is searched: the emitted text holds no stop string, and a stop string starting in it
        would have been found when its last character arrived.
        """
        if not self._stop:
            return None
        start = max(0, len(self.text) - self._hold)
        found = [index for text in self._stop if (index := decoded.find(text, start)) >= 0]
        return min(found) if found else None
