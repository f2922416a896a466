"""Incremental detokenization: the pieces add up to the text of the whole output, incomplete characters are
held back, and stop strings cut the text where they begin, however the tokens arrive."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstack.serve.detokenizer import IncrementalDetokenizer

# Byte-level tokens: a multi-byte character may be split across tokens, as in byte-level BPE.
BYTE_TOKENS = [b"a", b"b", b" ", b"ab", b"\xc3", b"\xa9", "é".encode(), b"\xe2\x82", b"\xac", "€x".encode(), b"\n"]


class ByteTokenizer:
    """Token i is the bytes ``BYTE_TOKENS[i]``; decoding joins them and replaces incomplete UTF-8 with U+FFFD."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(BYTE_TOKENS[i] for i in ids).decode("utf-8", errors="replace")


def run(tokens: list[int], cuts: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """Feed ``tokens`` in batches split at ``cuts`` (the last batch final); the pieces and whether it stopped."""
    detokenizer = IncrementalDetokenizer(ByteTokenizer(), stop)
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(tokens))), len(tokens)]
    pieces = []
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        pieces.append(detokenizer.add(tokens[start:end], final=number == len(bounds) - 2))
    assert "".join(pieces) == detokenizer.text
    return pieces, detokenizer.stopped


def test_a_character_split_across_tokens_is_held_back_until_complete():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert detokenizer.add([0]) == "a"
    assert detokenizer.add([4]) == ""  # the first byte of "é": the text would end in U+FFFD
    assert detokenizer.add([5]) == "é"
    assert detokenizer.add([7]) == ""  # two of the three bytes of "€"
    assert detokenizer.add([8], final=True) == "€"


def test_an_output_ending_mid_character_emits_the_replacement_character_at_the_end():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert detokenizer.add([0, 7]) == "a"
    assert detokenizer.add([], final=True) == "\ufffd"


def test_a_stop_string_inside_one_token_cuts_the_text_before_it():
    # "€x" arrives in one token; the stop string "x" ends the text right after "€".
    pieces, stopped = run([0, 9, 0], [1, 2], stop=("x",))
    assert "".join(pieces) == "a€" and stopped


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_cannot():
    detokenizer = IncrementalDetokenizer(ByteTokenizer(), ("ab!",))
    assert detokenizer.add([0]) == ""  # "a" might start "ab!"
    assert detokenizer.add([1]) == ""  # "ab" too
    assert detokenizer.add([2]) == "a"  # "ab " cannot start it any more before the last two characters
    assert detokenizer.add([], final=True) == "b "


def test_the_earliest_of_several_stop_strings_wins_and_later_tokens_add_nothing():
    detokenizer = IncrementalDetokenizer(ByteTokenizer(), ("b", "a b"))
    text = detokenizer.add([0, 2, 1, 0])  # "a ba": "a b" begins at 0, "b" at 2
    assert text == "" and detokenizer.stopped
    assert detokenizer.add([0, 0], final=True) == ""


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, len(BYTE_TOKENS) - 1), max_size=20),
       cuts=st.lists(st.integers(0, 20), max_size=8),
       stop=st.sampled_from([(), ("b",), ("ab",), ("a a",), ("é",), ("€x", " "), ("\n",)]))
def test_pieces_add_up_to_the_whole_text_cut_at_the_first_stop_string(tokens, cuts, stop):
    pieces, stopped = run(tokens, cuts, stop)
    full = ByteTokenizer().decode(tokens)
    found = [full.find(text) for text in stop if text in full]
    expected = full[: min(found)] if found else full
    # Pieces are only ever appended: a U+FFFD emitted for a character still arriving would break this.
    assert "".join(pieces) == expected
    assert stopped == bool(found)
