"""How a request's next token is chosen: :class:`SamplingParams`, greedy or temperature + top-p sampling.

``docs/engine-design.md`` (section "Engine") describes the engine loop that calls it.
"""

from __future__ import annotations

import dataclasses

import torch

from kvstack.errors import KVStackError

__all__ = ["SamplingParams", "new_generator", "sample"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    Parameters
    ----------
    max_new_tokens : int, optional
        Tokens to generate at most (``>= 1``).
    temperature : float, optional
        0 for greedy decoding (argmax); otherwise logits are divided by it before sampling.
    top_p : float, optional
        Nucleus sampling: sample among the smallest set of tokens whose probability reaches ``top_p``
        (in ``(0, 1]``; 1 keeps every token). Ignored when greedy.
    seed : int or None, optional
        Seed of the request's own generator (reproducible sampling); None draws a random seed.
    stop_token_ids : sequence of int, optional
        Sampling one of these finishes the request (the token is kept in the output).
    stop : sequence of str, optional
        Stop strings: the request finishes (reason ``"stop"``) as soon as its decoded output contains one;
        the token that completed it is the last one kept (outputs are token ids, so the text may run past
        the stop string within that token). Needs an engine built with a tokenizer.
    n : int, optional
        Completions per prompt (parallel sampling): the prompt is computed once, then ``n - 1`` children
        are forked sharing its KV blocks (copy-on-write), each sampling its own first token from the same
        logits with its own generator (seeded ``seed + i`` when ``seed`` is set).

    Raises
    ------
    KVStackError
        On ``max_new_tokens < 1``, a negative temperature, ``top_p`` outside ``(0, 1]`` or ``n < 1``.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise KVStackError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise KVStackError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise KVStackError(f"temperature must be a finite number >= 0 (0 for greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise KVStackError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise KVStackError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise KVStackError(f"n must be an integer >= 1, got {self.n!r}")
        try:
            stops = tuple(int(t) for t in self.stop_token_ids)
        except (TypeError, ValueError):
            raise KVStackError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}") from None
        object.__setattr__(self, "stop_token_ids", stops)
        strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(text, str) and text for text in strings):
            raise KVStackError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", strings)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy argmax, or temperature + top-p sampling with ``generator``."""
    if params.temperature == 0 or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly before each token
        sorted_probs = torch.where(before < params.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def new_generator(params: SamplingParams, index: int) -> torch.Generator | None:
    """The sampling generator of sample ``index`` of a request (None when greedy)."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed + index)
    return generator
