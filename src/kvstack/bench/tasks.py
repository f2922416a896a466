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
import math
import random
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

from kvstack.bench.config import QUERY_MODES, BenchError
from kvstack.prose import prose_words, source_id

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

ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "cold", "crimson", "curious",
    "daring", "dusty", "eager", "early", "fancy", "fierce", "gentle", "golden", "grand", "hidden", "hollow",
    "humble", "icy", "jolly", "kind", "lively", "lonely", "lucky", "merry", "misty", "modern", "noble",
    "odd", "pale", "patient", "polite", "proud", "quick", "quiet", "rapid", "rough", "royal", "rusty",
    "sandy", "scarlet", "shiny", "silent", "silver", "sleepy", "smooth", "solid", "spicy", "steady",
    "stormy", "sunny", "swift", "tender", "tidy", "tiny", "vast", "velvet", "warm", "wild", "wise", "young",
)
NOUNS = (
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


def word_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def magic_number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            return value


def random_uuid(rng: random.Random) -> str:
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
