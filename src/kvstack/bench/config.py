"""What one bench run measures: :class:`BenchConfig`, and :class:`BenchError` for bad input."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvstack.errors import KVStackError

__all__ = ["DEFAULT_DEPTHS", "QUERY_MODES", "QUICK", "BenchConfig", "BenchError", "split_top_level"]

QUERY_MODES = ("after", "both")
"""``after``: the question follows the context (default); ``both``: it is also asked before the context."""

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Needle depths of the ``niah`` grid (fraction of the context before the needle)."""


class BenchError(KVStackError):
    """A bench usage error (unknown task, bad length or sample count, unwritable output...): one line."""


QUICK: dict[str, Any] = {
    "methods": ["full", "streamingllm(ratio={ratio})", "snapkv(ratio={ratio})", "h2o(ratio={ratio})"],
    "ratios": [0.5],
    "budgets": [],
    "tasks": ["passkey", "vt", "niah", "perplexity"],
    "lengths": [512, 1024],
    "samples": 2,
    "depths": [0.0, 0.5, 1.0],
}
"""The ``--quick`` run: about 3 minutes on 2 idle CPU cores with SmolLM2-135M (benchmarks/results/quick)."""


@dataclasses.dataclass
class BenchConfig:
    """Everything that defines a bench run. Cells are keyed by the parts of this that change results.

    Attributes
    ----------
    model:
        Model name or local HF directory for :func:`kvstack.models.load_model`; also the model's name in
        results when :func:`kvstack.bench.run_bench` is given a model object.
    methods:
        Method specs. ``{ratio}`` / ``{budget}`` placeholders are filled from ``ratios`` / ``budgets``;
        a bare name (``snapkv``) means ``snapkv(ratio={ratio})`` (and ``budget={budget}``) for each value.
        ``full`` runs once per (task, length) and is always added as the baseline.
    ratios, budgets:
        Compression ratios (fraction evicted, in ``[0, 1)``) and absolute budgets (entries kept per head).
    tasks:
        Task names (see ``kvstack bench --list-tasks``).
    lengths:
        Target prompt lengths in tokens of the model's own tokenizer (chat template included).
    samples:
        Samples per cell (>= 1); the same samples are reused by every method.
    seed:
        Seed of sample generation and of random methods.
    query_modes:
        ``after`` and/or ``both`` (see :data:`QUERY_MODES`).
    chat:
        Apply the tokenizer's chat template (when it has one).
    answer_prefix:
        Start the answer with the task's answer prefix (RULER style).
    depths:
        Needle depths of the ``niah`` grid.
    max_new_tokens:
        Override of every task's decode limit (None: per-task defaults).
    ppl_chunk:
        Tokens per teacher-forced forward in the perplexity task, for methods that compress once after the
        prompt (they keep every streamed token, so the chunk does not change their result).
    ppl_stream_chunk:
        The same for methods that evict as the text streams in (``dynamic`` ones: StreamingLLM, H2O, TOVA,
        Scissorhands): a scored token sees at most the cache's budget plus ``ppl_stream_chunk - 1`` tokens of
        its own forward. 1 is StreamingLLM's token-by-token protocol; 8 is within about 1% of it on SmolLM2 at
        1k tokens and ratio 0.75, at a fifth of its time, where 256 is 9-13% optimistic
        (``benchmarks/ppl_chunk_check.py``).
    prose:
        A UTF-8 text file to use as prose instead of the default public-domain source.
    out_dir:
        Where ``results.jsonl``, ``summary.csv``, ``results.md`` and the plots go.
    device:
        ``cpu``/``cuda`` (None: cuda when available).
    baseline:
        Add ``full`` when it is not among ``methods``.
    plots, progress:
        Draw PNG plots; show a progress bar.
    share_prefill:
        Let the methods that compress once, after the prompt (SnapKV, PyramidKV, key norm, random, Loki,
        full ...) read each sample's prompt in one shared forward (:func:`kvstack.prefill_shared`; Ada-KV
        over H2O in another, with the ratios of the same method), and the methods that evict as they read
        share the prompt chunks read before each first evicts (:func:`kvstack.prefill_shared_chunks`).
        Their scores, bytes and decoding are exactly those of separate runs; their ``prefill_s`` is then
        the shared forward's time and their peak memory that of the whole group (records say
        ``prefill_shared_by``). Not part of cell keys.
    checkpoint_every:
        Save a cell's (or a shared batch's) progress every this many samples to ``partial.jsonl`` in
        ``out_dir``, so an interrupted run loses at most that many samples of the cell under way; the next
        run resumes each cell from its checkpoint (exactly the records of an uninterrupted run: every sample
        is generated and measured by its index). None: a cell is saved only when all its samples are done.
        Not part of cell keys.
    """

    model: str = "smollm2-135m"
    methods: list[str] = dataclasses.field(default_factory=lambda: list(QUICK["methods"]))
    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75])
    budgets: list[int] = dataclasses.field(default_factory=list)
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(QUICK["tasks"]))
    lengths: list[int] = dataclasses.field(default_factory=lambda: [1024, 2048, 4096])
    samples: int = 3
    seed: int = 0
    query_modes: list[str] = dataclasses.field(default_factory=lambda: ["after"])
    chat: bool = True
    answer_prefix: bool = True
    depths: list[float] = dataclasses.field(default_factory=lambda: list(DEFAULT_DEPTHS))
    max_new_tokens: int | None = None
    ppl_chunk: int = 256
    ppl_stream_chunk: int = 8
    prose: str | None = None
    out_dir: str = "bench-results"
    device: str | None = None
    baseline: bool = True
    plots: bool = True
    progress: bool = True
    share_prefill: bool = False
    checkpoint_every: int | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """The ``--quick`` configuration (:data:`QUICK`), with ``overrides`` applied."""
        values: dict[str, Any] = {key: list(value) if isinstance(value, list) else value
                                  for key, value in QUICK.items()}
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the configuration."""
        return dataclasses.asdict(self)


def split_top_level(text: str, separators: str = ",;") -> list[str]:
    """Split ``text`` at separators outside parentheses and quotes: method lists like ``a(x=1, y=2),b``.

    Examples
    --------
    >>> split_top_level("full, adakv(snapkv(ratio=0.5), floor=0.2);h2o")
    ['full', 'adakv(snapkv(ratio=0.5), floor=0.2)', 'h2o']
    """
    parts: list[str] = []
    depth = 0
    quote: str | None = None
    current: list[str] = []
    for char in text:
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char in separators and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return [p for p in parts if p]
