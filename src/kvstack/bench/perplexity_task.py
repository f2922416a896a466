"""Long-text perplexity on real public-domain prose, teacher-forced through the compressed cache.
Importing this module registers the task."""

from __future__ import annotations

import random
from typing import Any, ClassVar

from kvstack.bench.config import BenchError
from kvstack.bench.tasks import (
    Parts,
    Sample,
    Task,
    register_task,
)
from kvstack.prose import prose_paragraphs

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
