"""RULER-style synthetic tasks: the needle family (NIAH variants, passkey, the depth grid), variable tracking
and word extraction (common and frequent words). Importing this module registers them."""

from __future__ import annotations

import functools
import math
import random
import string
from collections.abc import Sequence
from typing import Any, ClassVar

from kvstack.bench.config import DEFAULT_DEPTHS, BenchError
from kvstack.bench.tasks import (
    ADJECTIVES,
    NOUNS,
    Parts,
    Task,
    magic_number,
    noise_words,
    place,
    prose_slice,
    random_uuid,
    register_task,
    word_key,
)
from kvstack.prose import prose_words

# --------------------------------------------------------------------------------------------------------
# Needle tasks (RULER's NIAH family, passkey, the depth grid)
# --------------------------------------------------------------------------------------------------------


class NeedleTask(Task):
    """Needles ``One of the special magic numbers for KEY is: VALUE.`` hidden in a haystack.

    Class attributes choose the RULER variant: ``haystack`` (``noise``/``prose``), ``keys`` planted,
    ``values_per_key``, ``queries`` (keys asked about, the first ones planted), ``uuid`` (UUID keys and
    values) and ``distractor_tokens`` (one UUID distractor needle per that many target tokens; the count
    depends on the target length, not on the haystack size, so sizing stays fine-grained).
    """

    haystack: ClassVar[str] = "prose"
    keys: ClassVar[int] = 1
    values_per_key: ClassVar[int] = 1
    queries: ClassVar[int] = 1
    uuid: ClassVar[bool] = False
    distractor_tokens: ClassVar[int] = 0
    max_new_tokens: ClassVar[int] = 16

    def uses_prose(self) -> bool:
        return self.haystack == "prose"

    def _haystack(self, rng: random.Random, size: int) -> list[str]:
        if self.haystack == "noise":
            return noise_words(size)
        start = rng.randrange(max(1, len(prose_words(self.prose)) // 2))
        return prose_slice(self.prose, start, size)

    def _depths(self, rng: random.Random, count: int) -> list[float]:
        return [rng.random() for _ in range(count)]

    def build(self, rng: random.Random, size: int, length: int) -> Parts:
        kind = "uuids" if self.uuid else "numbers"
        singular = kind[:-1]
        taken: set[str] = set()
        planted: list[tuple[str, str]] = []
        keys = []
        for _ in range(self.keys):
            key = random_uuid(rng) if self.uuid else word_key(rng, taken)
            keys.append(key)
            for _ in range(self.values_per_key):
                planted.append((key, random_uuid(rng) if self.uuid else magic_number(rng, 7, taken)))
        depths = self._depths(rng, len(planted))
        haystack = self._haystack(rng, size)
        items = [(d, f"One of the special magic {kind} for {k} is: {v}.")
                 for d, (k, v) in zip(depths, planted, strict=True)]
        if self.distractor_tokens:
            count = max(2, length // self.distractor_tokens)
            for i in range(count):  # evenly spread, jittered
                depth = min(1.0, (i + rng.random()) / count)
                items.append((depth, f"One of the special magic {kind} for {random_uuid(rng)} is: {random_uuid(rng)}."))
        context = place(haystack, items)
        asked = keys[: self.queries]
        answers = [v for k, v in planted if k in asked]
        listed = ", ".join(asked[:-1]) + f" and {asked[-1]}" if len(asked) > 1 else asked[0]
        if len(answers) == 1:
            question = f"What is the special magic {singular} for {listed} mentioned in the provided text?"
            prefix = f"The special magic {singular} for {listed} mentioned in the provided text is"
        else:
            question = f"What are all the special magic {kind} for {listed} mentioned in the provided text?"
            prefix = f"The special magic {kind} for {listed} mentioned in the provided text are"
        instruction = (f"Some special magic {kind} are hidden within the following text. Memorise them "
                       f"carefully: you will be asked about them afterwards.")
        metadata = {"depths": [round(d, 4) for d in depths], "keys": asked}
        return Parts(instruction, context, question, answers, prefix, metadata)


@register_task
class NIAHSingleNoise(NeedleTask):
    """RULER niah_single_1: one needle in the repetitive noise haystack."""

    name = "niah_single_noise"
    description = "one 7-digit needle in a repetitive noise haystack (RULER niah_single_1)"
    haystack = "noise"


@register_task
class NIAHSingleProse(NeedleTask):
    """RULER niah_single_2: one needle in natural prose."""

    name = "niah_single_prose"
    description = "one 7-digit needle in natural public-domain prose (RULER niah_single_2)"


@register_task
class NIAHMultiKey(NeedleTask):
    """RULER niah_multikey_1: the queried needle among needles of three other keys."""

    name = "niah_multikey"
    description = "one queried needle among 3 distractor keys, in prose (RULER niah_multikey_1)"
    keys = 4


@register_task
class NIAHMultiKeyUUID(NeedleTask):
    """RULER niah_multikey_3-like: UUID key and value, among many UUID distractor needles."""

    name = "niah_multikey_uuid"
    description = "UUID key -> UUID value among many UUID distractor needles (RULER niah_multikey_3)"
    haystack = "noise"
    uuid = True
    distractor_tokens = 150
    max_new_tokens = 40


@register_task
class NIAHMultiValue(NeedleTask):
    """RULER niah_multivalue: four values planted under one key; all must be recalled."""

    name = "niah_multivalue"
    description = "4 values under one key, all to recall, in prose (RULER niah_multivalue)"
    values_per_key = 4
    max_new_tokens = 64


@register_task
class NIAHMultiQuery(NeedleTask):
    """RULER niah_multiquery: four keys planted and asked about at once."""

    name = "niah_multiquery"
    description = "4 keys asked at once, all values to recall, in prose (RULER niah_multiquery)"
    keys = 4
    queries = 4
    max_new_tokens = 64


@register_task
class Passkey(Task):
    """Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit key in repetitive noise."""

    name = "passkey"
    description = "a 5-digit pass key hidden at a random depth in repetitive noise"
    max_new_tokens = 12
    # Version 2: "The pass key is: KEY." and the answer prefix "The pass key is:". With version 1's
    # "The pass key is" prefix SmolLM2 mostly went on with words ("the pass key. The pass key is ...") and
    # scored 15% at 1k with the full cache; with the colon it gives the number (20/20 at 1k and 2k).
    version = 2

    def build(self, rng: random.Random, size: int, length: int) -> Parts:
        key = str(rng.randrange(10_000, 100_000))
        depth = rng.random()
        needle = f"The pass key is: {key}. Remember it. {key} is the pass key."
        context = place(noise_words(size), [(depth, needle)])
        instruction = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                       "Find it and memorise it: you will be asked about it.")
        return Parts(instruction, context, "What is the pass key?", [key], "The pass key is:",
                     {"depth": round(depth, 4)})


@register_task
class NeedleGrid(NeedleTask):
    """Needle in a haystack over a depth x length grid: one needle in prose at a fixed depth.

    ``depths`` lists the grid's depths; the task expands into one variant (one cell) per depth.
    """

    name = "niah"
    description = "needle-in-a-haystack grid: one needle in prose at each depth x length"

    def __init__(self, prose: str | None = None, depths: Sequence[float] | None = None,
                 depth: float | None = None) -> None:
        super().__init__(prose)
        self.depths = [float(d) for d in (DEFAULT_DEPTHS if depths is None else depths)]
        for value in self.depths:
            if not 0.0 <= value <= 1.0:
                raise BenchError(f"needle depth {value} is outside [0, 1]; give depths like 0,0.25,0.5,0.75,1")
        if not self.depths:
            raise BenchError("the niah grid needs at least one depth, e.g. --depths 0,0.5,1")
        self.depth = depth
        if depth is not None:
            self.variant = f"depth={depth:.2f}"

    def variants(self) -> list[Task]:
        if self.depth is not None:
            return [self]
        return [NeedleGrid(self.prose, self.depths, depth=d) for d in sorted(set(self.depths))]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "depth": self.depth}

    def _depths(self, rng: random.Random, count: int) -> list[float]:
        return [0.5 if self.depth is None else self.depth] * count

    def build(self, rng: random.Random, size: int, length: int) -> Parts:
        parts = super().build(rng, size, length)
        parts.metadata["depth"] = self.depth
        return parts


# --------------------------------------------------------------------------------------------------------
# Aggregation and tracing tasks (RULER's vt, cwe, fwe)
# --------------------------------------------------------------------------------------------------------


@register_task
class VariableTracking(Task):
    """RULER variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``... hidden in noise.

    The answer is every variable that ends up holding the value (1 + ``hops`` names).
    """

    name = "vt"
    description = "variable tracking: name every variable bound to a value through 4 hops (RULER vt)"
    hops: ClassVar[int] = 4
    max_new_tokens = 30

    def build(self, rng: random.Random, size: int, length: int) -> Parts:
        value = str(rng.randrange(10_000, 100_000))
        names: list[str] = []
        while len(names) < self.hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in names:
                names.append(name)
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in
                                                  range(1, len(names))]
        depths = sorted(rng.random() for _ in lines)
        context = place(noise_words(size), list(zip(depths, lines, strict=True)))
        instruction = "Memorise and track the chain of variable assignments hidden in the following text."
        question = f"Question: Find all variables that are assigned the value {value} in the provided text."
        prefix = (f"Answer: According to the chain of variable assignments in the provided text, {len(names)} "
                  f"variables are assigned the value {value}, they are:")
        return Parts(instruction, context, question, names, prefix, {"depths": [round(d, 4) for d in depths]})


@functools.lru_cache(maxsize=4)
def word_pool(source: str | None) -> tuple[str, ...]:
    """Distinct lower-case words (4-12 ASCII letters) of the prose, sorted."""
    words = (word.strip(".,;:!?'\"()").lower() for word in prose_words(source))
    return tuple(sorted({w for w in words if 4 <= len(w) <= 12 and w.isalpha() and w.isascii()}))


@register_task
class CommonWords(Task):
    """RULER common-words extraction: 10 words repeated often in a numbered list of rarer words.

    Words are the prose's own vocabulary. Common words appear ``clamp(length // 150, 5, 30)`` times
    each, uncommon ones at most 3 times.
    """

    name = "cwe"
    description = "common-word extraction: the 10 most frequent words of a numbered list (RULER cwe)"
    common: ClassVar[int] = 10
    uncommon_repeats: ClassVar[int] = 3
    max_new_tokens = 120

    def uses_prose(self) -> bool:
        return True

    def size_guess(self, length: int) -> int:
        return max(1, length // 5)

    def build(self, rng: random.Random, size: int, length: int) -> Parts:
        pool = list(word_pool(self.prose))
        rng.shuffle(pool)
        needed = self.common + math.ceil(size / self.uncommon_repeats)
        if needed > len(pool):  # a short prose file: add adjective+noun words
            taken = set(pool)
            pool += [w for w in (f"{a}{n}" for a in ADJECTIVES for n in NOUNS) if w not in taken]
        if needed > len(pool):
            raise BenchError(f"task {self.name}: not enough distinct words for {length} tokens; use a shorter length")
        common = pool[: self.common]
        repeats = min(30, max(5, length // 150))
        items = [w for w in common for _ in range(repeats)]
        items += [pool[self.common + i // self.uncommon_repeats] for i in range(size)]
        rng.shuffle(items)
        context = "\n".join(f"{i + 1}. {word}" for i, word in enumerate(items))
        instruction = ("Below is a numbered list of words. Some of them appear more often than the others. "
                       "Memorise the ones that appear most often.")
        question = f"Question: What are the {self.common} most common words in the list above?"
        prefix = f"Answer: The top {self.common} words that appear most often in the list are:"
        return Parts(instruction, context, question, common, prefix, {"common_repeats": repeats})


@register_task
class FrequentWords(Task):
    """RULER frequent-words extraction: coded words drawn from a Zipf law; name the 3 most frequent.

    Counts are the Zipf(``alpha``) expectation rounded by largest remainder, so the top 3 are unique.
    """

    name = "fwe"
    description = "frequent-word extraction: the 3 most frequent coded words of a Zipf text (RULER fwe)"
    alpha: ClassVar[float] = 2.0
    vocabulary: ClassVar[int] = 200
    minimum: ClassVar[int] = 60
    max_new_tokens = 50

    def build(self, rng: random.Random, size: int, length: int) -> Parts:
        total = self.minimum + size
        words: list[str] = []
        while len(words) < self.vocabulary:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6)))
            if word not in words:
                words.append(word)
        weights = [k ** -self.alpha for k in range(1, self.vocabulary + 1)]
        share = [total * w / sum(weights) for w in weights]
        counts = [int(s) for s in share]
        for k in sorted(range(len(share)), key=lambda k: counts[k] - share[k])[: total - sum(counts)]:
            counts[k] += 1
        items = [w for w, c in zip(words, counts, strict=True) for _ in range(c)]
        rng.shuffle(items)
        instruction = ("Read the following coded text and keep track of how often each coded word appears. "
                       "Find the three coded words that appear most frequently.")
        question = ("Question: Do not give any explanation. What are the three most frequently appearing coded "
                    "words in the coded text above?")
        prefix = "Answer: According to the coded text above, the three most frequently appearing words are:"
        return Parts(instruction, " ".join(items), question, words[:3], prefix, {"top_counts": counts[:4]})
