"""Bench tasks: RULER-style synthetic tasks, passkey, a needle grid and long-text perplexity.

Every task is generated offline and deterministically from a seed, then sized to a target length in
tokens of the model's own tokenizer, counting exactly what the model reads: the chat template (when
the tokenizer has one and chat is on) around the prompt, plus the answer prefix that starts the
assistant's reply. Sizing searches the one size knob a task exposes (haystack words, list items...)
for the prompt closest to the target; the result is within 2% of it or generation fails loudly.

A new task is one small class::

    @register_task
    class Capital(Task):
        name = "capital"
        scorer = "string_match_part"
        max_new_tokens = 8

        def build(self, rng, size, length):
            city = rng.choice(["Paris", "Rome"])
            context = place(noise_words(size), [(rng.random(), f"The capital we want is {city}.")])
            return Parts("Read the text.", context, "Which capital do we want?", [city], "The capital is")

``build(rng, size, length)`` must use only ``rng`` for randomness and grow the prompt with ``size``.

From the command line, ``kvstack bench --task-module mytasks.py`` (or a dotted module name) imports such
a module first; an installed package can also declare its tasks under the ``kvstack.tasks`` entry-point
group, and they load when a task name is not found (and for ``--list-tasks``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import string
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

from kvstack.bench.config import DEFAULT_DEPTHS, QUERY_MODES, BenchError
from kvstack.prose import prose_paragraphs, prose_words, source_id

__all__ = [
    "NOISE_TEXT",
    "TASKS",
    "Parts",
    "Sample",
    "Task",
    "build_input_ids",
    "get_task",
    "import_task_module",
    "load_task_plugins",
    "make_tasks",
    "noise_words",
    "place",
    "register_task",
    "render",
]

LENGTH_TOLERANCE = 0.02
"""Generated prompts are within this fraction of their target length."""

NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""The repetitive filler of the passkey test and of RULER's noise haystack."""

_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "cold", "crimson", "curious",
    "daring", "dusty", "eager", "early", "fancy", "fierce", "gentle", "golden", "grand", "hidden", "hollow",
    "humble", "icy", "jolly", "kind", "lively", "lonely", "lucky", "merry", "misty", "modern", "noble",
    "odd", "pale", "patient", "polite", "proud", "quick", "quiet", "rapid", "rough", "royal", "rusty",
    "sandy", "scarlet", "shiny", "silent", "silver", "sleepy", "smooth", "solid", "spicy", "steady",
    "stormy", "sunny", "swift", "tender", "tidy", "tiny", "vast", "velvet", "warm", "wild", "wise", "young",
)
_NOUNS = (
    "anchor", "apple", "arrow", "badge", "barrel", "basket", "beacon", "bell", "blanket", "bridge", "bucket",
    "candle", "canyon", "castle", "cherry", "cloud", "comet", "compass", "cookie", "cottage", "crystal",
    "desert", "dolphin", "dragon", "engine", "falcon", "feather", "forest", "fountain", "garden", "glacier",
    "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon", "meadow", "mirror",
    "needle", "orchard", "otter", "palace", "pebble", "pepper", "piano", "pillow", "planet", "pocket",
    "puzzle", "rabbit", "ribbon", "river", "saddle", "shadow", "spoon", "statue", "teapot", "thunder",
    "tiger", "tower", "tunnel", "valley", "violin", "wagon", "whistle", "window", "wizard",
)


# --------------------------------------------------------------------------------------------------------
# Samples and prompt assembly
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Parts:
    """What a task's ``build`` returns: the pieces of one prompt and its answers.

    Attributes
    ----------
    instruction:
        Text before everything else (may be empty).
    context:
        The long part: haystack with needles, list, coded text...
    question:
        Asked after the context; with ``query_mode="both"`` also before it.
    answers:
        Reference answers, scored by the task's scorer.
    answer_prefix:
        Text the model's reply starts with (RULER's answer prefix); dropped when prefixes are off.
    metadata:
        JSON-able facts about the sample (depths, keys...), stored with the results.
    """

    instruction: str
    context: str
    question: str
    answers: list[str]
    answer_prefix: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Sample:
    """One generated sample, ready for the model.

    Attributes
    ----------
    prompt_text:
        The user message (instruction, context, question), or the raw text excerpt for perplexity.
    answers:
        Reference answers (empty for perplexity).
    answer_prefix:
        Appended after the assistant turn's start; empty when not used.
    metadata:
        JSON-able facts: ``depth``/``depths``, ``tokens``, ``size``, ``query_mode``, ``chat``...
    input_ids:
        The token ids the model reads (``T`` of them, ``T`` within 2% of the target length).
    """

    prompt_text: str
    answers: list[str]
    answer_prefix: str = ""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_ids: list[int] = dataclasses.field(default_factory=list)


def render(parts: Parts, query_mode: str = "after") -> str:
    """The user message of ``parts``: instruction, [question,] context, question, blank-line separated."""
    if query_mode not in QUERY_MODES:
        raise BenchError(f"unknown query mode {query_mode!r}; choose one of {', '.join(QUERY_MODES)}")
    blocks = [parts.instruction]
    if query_mode == "both":
        blocks.append(parts.question)
    blocks += [parts.context, parts.question]
    return "\n\n".join(block for block in blocks if block)


def uses_chat(tokenizer: Any, chat: bool) -> bool:
    """True when the chat template is applied: ``chat`` is on and the tokenizer has a template."""
    return bool(chat and getattr(tokenizer, "chat_template", None))


def build_input_ids(tokenizer: Any, prompt_text: str, answer_prefix: str = "", chat: bool = True) -> list[int]:
    """Token ids the model reads for ``prompt_text``: ``T`` ints.

    With a chat template, the prompt is the user turn (:func:`kvstack.api.encode_prompt`, generation
    prompt added) and ``answer_prefix`` starts the assistant turn. Without one, the prefix follows the
    prompt after a blank line.
    """
    if uses_chat(tokenizer, chat):
        from kvstack.api import encode_prompt

        ids = [int(i) for i in encode_prompt(tokenizer, prompt_text, chat=True)[0].tolist()]
        if answer_prefix:
            ids += list(tokenizer(answer_prefix, add_special_tokens=False)["input_ids"])
        return ids
    text = f"{prompt_text}\n\n{answer_prefix}" if answer_prefix else prompt_text
    return list(tokenizer(text)["input_ids"])


# --------------------------------------------------------------------------------------------------------
# Haystacks
# --------------------------------------------------------------------------------------------------------


def noise_words(count: int) -> list[str]:
    """``count`` words of the repetitive noise haystack (:data:`NOISE_TEXT` repeated)."""
    words = NOISE_TEXT.split()
    return [words[i % len(words)] for i in range(count)]


def prose_slice(source: str | None, start: int, count: int) -> list[str]:
    """``count`` consecutive words of the prose from word ``start`` on (wrapping around at the end)."""
    words = prose_words(source)
    if count <= len(words) - start:
        return list(words[start : start + count])
    return [words[(start + i) % len(words)] for i in range(count)]


def _sentence_start(words: Sequence[str], index: int, reach: int = 120) -> int:
    """The nearest word index ``<= index`` that starts a sentence (within ``reach`` words), else ``index``."""
    index = max(0, min(index, len(words)))
    for i in range(index, max(0, index - reach) - 1, -1):
        if i == 0 or words[i - 1].endswith((".", "!", "?", '."', "?'")):
            return i
    return index


def place(words: Sequence[str], items: Sequence[tuple[float, str]]) -> str:
    """Insert each ``(depth, text)`` into the haystack ``words`` at a sentence start near ``depth``.

    ``depth`` is the fraction of the haystack before the item (0: first, 1: last). Items at the same
    spot keep their given order. Returns the joined text.
    """
    cuts = sorted(
        ((_sentence_start(words, round(depth * len(words))), order, text) for order, (depth, text) in enumerate(items)),
    )
    out: list[str] = []
    previous = 0
    for index, _, text in cuts:
        out.extend(words[previous:index])
        out.append(text)
        previous = index
    out.extend(words[previous:])
    return " ".join(out)


def _word_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            return value


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# --------------------------------------------------------------------------------------------------------
# The task base class and registry
# --------------------------------------------------------------------------------------------------------


class Task:
    """A bench task. Subclasses set the class attributes and implement :meth:`build`.

    Attributes
    ----------
    name:
        What users type in ``--tasks``.
    description:
        One line for ``kvstack bench --list-tasks``.
    scorer:
        ``string_match_all``, ``string_match_part`` (see :mod:`kvstack.bench.scoring`) or ``perplexity``.
    kind:
        ``generate`` (greedy decoding, scored against answers) or ``perplexity`` (teacher-forced).
    max_new_tokens:
        Decode limit.
    version:
        Bumped when the task's prompts change; part of its cells' keys from 2 on (see :meth:`params`).
    variant:
        Set by tasks that expand into several cells (the needle grid: ``depth=0.50``); "" otherwise.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    scorer: ClassVar[str] = "string_match_all"
    kind: ClassVar[str] = "generate"
    max_new_tokens: ClassVar[int] = 32
    version: ClassVar[int] = 1

    def __init__(self, prose: str | None = None) -> None:
        self.prose = prose
        self.variant = ""

    def __repr__(self) -> str:
        variant = f", {self.variant}" if self.variant else ""
        return f"<task {self.name}{variant}>"

    # -- to implement -----------------------------------------------------------------------------
    def build(self, rng: random.Random, size: int, length: int) -> Parts:
        """The prompt pieces for haystack size ``size`` (``length``: the target, for tasks that scale).

        Must be deterministic given ``rng``'s state and grow (weakly) with ``size``; ``size`` 0 is the
        smallest prompt the task can make.
        """
        raise NotImplementedError

    def size_guess(self, length: int) -> int:
        """A first guess of the size that reaches ``length`` tokens (sizing refines it)."""
        return max(1, length // 2)

    # -- provided ---------------------------------------------------------------------------------
    def variants(self) -> list[Task]:
        """The tasks this one expands into, one cell each (default: itself)."""
        return [self]

    def params(self) -> dict[str, Any]:
        """What distinguishes this task's samples beyond its name, for result keys (with ``version`` once a
        task's prompts have changed, so that its old cells are run again and no other task's are)."""
        params = {"variant": self.variant, "prose": source_id(self.prose) if self.uses_prose() else None}
        if self.version > 1:
            params["version"] = self.version
        return params

    def uses_prose(self) -> bool:
        """True when samples depend on the prose source."""
        return False

    def generate(
        self,
        tokenizer: Any,
        length: int,
        rng: random.Random,
        query_mode: str = "after",
        chat: bool = True,
        answer_prefix: bool = True,
    ) -> Sample:
        """A sample whose prompt is ``length`` tokens (within 2%) in ``tokenizer``'s tokens.

        Parameters
        ----------
        tokenizer:
            The model's tokenizer (a HF tokenizer: callable, with ``apply_chat_template`` when chatting).
        length:
            Target prompt length in tokens, chat template and answer prefix included.
        rng:
            Source of randomness; one 64-bit draw seeds every candidate prompt, so the needles and
            answers do not depend on the haystack size.
        query_mode:
            ``after`` or ``both`` (see :data:`kvstack.bench.config.QUERY_MODES`).
        chat:
            Apply the tokenizer's chat template when it has one.
        answer_prefix:
            Start the reply with the task's answer prefix.

        Raises
        ------
        BenchError
            If ``length`` is shorter than the task's smallest prompt, or cannot be reached within 2%.
        """
        if query_mode not in QUERY_MODES:
            raise BenchError(f"unknown query mode {query_mode!r}; choose one of {', '.join(QUERY_MODES)}")
        seed = rng.getrandbits(64)
        made: dict[int, tuple[Parts, str, str, list[int]]] = {}

        def make(size: int) -> tuple[Parts, str, str, list[int]]:
            if size not in made:
                parts = self.build(random.Random(seed), size, length)
                text = render(parts, query_mode)
                prefix = parts.answer_prefix if answer_prefix else ""
                made[size] = (parts, text, prefix, build_input_ids(tokenizer, text, prefix, chat))
            return made[size]

        smallest = len(make(0)[3])
        if smallest > length:
            raise BenchError(
                f"task {self.name}: length {length} is shorter than its smallest prompt ({smallest} tokens); "
                f"use lengths >= {math.ceil(smallest / (1 - LENGTH_TOLERANCE))}"
            )
        low, high = 0, max(1, self.size_guess(length))
        while len(make(high)[3]) <= length:  # grow until too long
            low, high = high, high * 2
            if high > 1 << 40:
                raise BenchError(f"task {self.name} does not grow with its size; cannot reach {length} tokens")
        while high - low > 1:  # invariant: make(low) fits, make(high) is too long
            middle = (low + high) // 2
            if len(make(middle)[3]) <= length:
                low = middle
            else:
                high = middle
        tolerance = max(1.0, LENGTH_TOLERANCE * length)
        best = low if length - len(make(low)[3]) <= tolerance else high  # prefer not to exceed the target
        parts, text, prefix, ids = make(best)
        if abs(len(ids) - length) > tolerance:
            raise BenchError(
                f"task {self.name}: cannot size a prompt to {length} tokens within 2% (got {len(ids)}); "
                "use a longer length"
            )
        metadata = {**parts.metadata, "size": best, "tokens": len(ids), "query_mode": query_mode,
                    "chat": uses_chat(tokenizer, chat)}
        return Sample(prompt_text=text, answers=list(parts.answers), answer_prefix=prefix, metadata=metadata,
                      input_ids=ids)


TASKS: dict[str, type[Task]] = {}
"""Registered task classes by name."""


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task class to :data:`TASKS` under ``cls.name``."""
    if not cls.name or not cls.name.replace("_", "").isalnum():
        raise ValueError(f"task class {cls.__name__} needs a name made of letters, digits and '_'")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} registered twice")
    if cls.kind not in ("generate", "perplexity"):
        raise ValueError(f"task {cls.name}: kind must be 'generate' or 'perplexity', got {cls.kind!r}")
    TASKS[cls.name] = cls
    return cls


TASK_ENTRY_POINTS = "kvstack.tasks"
"""Entry-point group of installed packages' tasks: each entry names a module (importing it registers its
tasks) or a :class:`Task` subclass (registered as it loads)."""

_loaded_entry_points: set[str] = set()


def load_task_plugins() -> list[str]:
    """Register the tasks of every installed package that declares them under :data:`TASK_ENTRY_POINTS`.

    A package's ``pyproject.toml`` says ``[project.entry-points."kvstack.tasks"] mine = "mypkg.tasks"``;
    each entry point is loaded once per process. Returns the names of the entry points loaded now.

    Raises
    ------
    BenchError
        If an entry point cannot be loaded (the message names it and the error).
    """
    from importlib.metadata import entry_points

    loaded = []
    for entry in entry_points(group=TASK_ENTRY_POINTS):
        if entry.value in _loaded_entry_points:
            continue
        _loaded_entry_points.add(entry.value)  # once, even when it fails: the error is raised, not retried
        try:
            target = entry.load()
        except Exception as error:  # a plugin's own failure, reported in one line
            raise BenchError(f"the task plugin {entry.name!r} ({entry.value}) failed to load: "
                             f"{type(error).__name__}: {error}") from None
        if isinstance(target, type) and issubclass(target, Task):
            register_task(target)
        loaded.append(entry.name)
    return loaded


def import_task_module(spec: str) -> list[str]:
    """Import a module of task classes (a dotted module name, or a path to a ``.py`` file) so that its
    ``@register_task`` classes are registered; returns the task names it added.

    Raises
    ------
    BenchError
        If the module cannot be found or fails to import (the message names it and the error).
    """
    import hashlib
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    before = set(TASKS)
    path = Path(spec)
    if spec.endswith(".py") and not path.is_file():
        raise BenchError(f"task module {spec!r}: no such file; give a .py file or a dotted module name")
    try:
        if spec.endswith(".py"):
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            name = f"kvstack_task_module_{path.stem}_{digest}"  # one module per file, whatever its stem
            if name in sys.modules:  # imported before in this process: its tasks are registered
                return []
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except BaseException:
                del sys.modules[name]  # a failed import is not remembered as done
                raise
        else:
            importlib.import_module(spec)
    except Exception as error:
        raise BenchError(f"task module {spec!r} failed to import: {type(error).__name__}: {error}") from None
    return sorted(set(TASKS) - before)


def get_task(name: str, **options: Any) -> Task:
    """An instance of the task ``name``; ``options`` (``prose``, ``depths``) go to its constructor.

    A name no task is registered under first loads the installed task plugins (:func:`load_task_plugins`).

    Raises
    ------
    BenchError
        If no task is registered under ``name``; the message lists the valid names.
    """
    if name not in TASKS:
        load_task_plugins()
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise BenchError(f"unknown task {name!r}{hint}; valid tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    accepted = {key: value for key, value in options.items() if key in _init_parameters(cls)}
    return cls(**accepted)


def _init_parameters(cls: type[Task]) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def make_tasks(names: Sequence[str], **options: Any) -> list[Task]:
    """Instances of every task in ``names``, expanded into their variants (e.g. needle depths)."""
    tasks: list[Task] = []
    for name in names:
        tasks.extend(get_task(name, **options).variants())
    return tasks


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
            key = _uuid(rng) if self.uuid else _word_key(rng, taken)
            keys.append(key)
            for _ in range(self.values_per_key):
                planted.append((key, _uuid(rng) if self.uuid else _number(rng, 7, taken)))
        depths = self._depths(rng, len(planted))
        haystack = self._haystack(rng, size)
        items = [(d, f"One of the special magic {kind} for {k} is: {v}.")
                 for d, (k, v) in zip(depths, planted, strict=True)]
        if self.distractor_tokens:
            count = max(2, length // self.distractor_tokens)
            for i in range(count):  # evenly spread, jittered
                depth = min(1.0, (i + rng.random()) / count)
                items.append((depth, f"One of the special magic {kind} for {_uuid(rng)} is: {_uuid(rng)}."))
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
            pool += [w for w in (f"{a}{n}" for a in _ADJECTIVES for n in _NOUNS) if w not in taken]
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


# --------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------


@register_task
class Perplexity(Task):
    """Long-text perplexity on real public-domain prose, teacher-forced through the compressed cache.

    A sample is an excerpt of exactly ``length`` tokens (no chat template) starting at a random
    paragraph. The runner reads the first ``context_fraction`` as a prompt (the method's own prompt
    behaviour: dynamic methods evict while it streams in, static ones compress once at its end), then
    streams the rest through the same cache (``ppl_stream_chunk`` tokens per forward for methods that evict
    as it streams, ``ppl_chunk`` otherwise) and scores every token of the rest: perplexity = exp(mean NLL),
    lower is better.
    """

    name = "perplexity"
    description = "teacher-forced perplexity of public-domain prose, streamed through the compressed cache"
    scorer = "perplexity"
    kind = "perplexity"
    max_new_tokens = 0
    context_fraction: ClassVar[float] = 0.5

    def uses_prose(self) -> bool:
        return True

    def params(self) -> dict[str, Any]:
        return {**super().params(), "context_fraction": self.context_fraction}

    def generate(
        self,
        tokenizer: Any,
        length: int,
        rng: random.Random,
        query_mode: str = "after",
        chat: bool = True,
        answer_prefix: bool = True,
    ) -> Sample:
        """An excerpt of exactly ``length`` tokens (``query_mode``, ``chat`` and prefixes do not apply)."""
        if length < 4:
            raise BenchError(f"task {self.name}: length {length} is too short; use lengths >= 4")
        paragraphs = prose_paragraphs(self.prose)
        index = rng.randrange(len(paragraphs))
        pieces: list[str] = []
        ids: list[int] = []
        budget = 6 * length + 64  # characters; tokens average fewer than 6 characters in English
        for _ in range(4):
            while sum(len(p) + 2 for p in pieces) < budget:
                pieces.append(paragraphs[(index + len(pieces)) % len(paragraphs)])
            ids = list(tokenizer("\n\n".join(pieces), add_special_tokens=False)["input_ids"])
            if len(ids) >= length:
                break
            budget *= 2
        if len(ids) < length:
            raise BenchError(f"task {self.name}: the prose is shorter than {length} tokens; use a shorter length")
        ids = ids[:length]
        metadata = {"paragraph": index, "tokens": length, "query_mode": "n/a", "chat": False,
                    "context_tokens": self.context_tokens(length)}
        return Sample(prompt_text=tokenizer.decode(ids), answers=[], metadata=metadata, input_ids=ids)

    def context_tokens(self, length: int) -> int:
        """Tokens read as the prompt before scoring starts."""
        return max(1, min(length - 1, round(self.context_fraction * length)))

    def build(self, rng: random.Random, size: int, length: int) -> Parts:  # pragma: no cover - not used
        raise NotImplementedError("perplexity samples are excerpts; see generate()")
