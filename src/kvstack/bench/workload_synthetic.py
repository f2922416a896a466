"""Synthetic workloads: Poisson arrivals, requests sharing system prompts, and multi-turn chats."""

from __future__ import annotations

import numpy as np

from kvstack.bench.workload_args import check_token_range, int_arg, nonnegative_float, rate_arg, seed_arg
from kvstack.bench.workload_requests import Workload, WorkloadRequest
from kvstack.errors import KVStackError

__all__ = ["multi_turn_workload", "poisson_arrivals", "random_tokens", "shared_prefix_workload"]


def poisson_arrivals(num: int, rate_per_s: float | None, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process: the first at 0, then exponential gaps of mean ``1 / rate_per_s``.

    Parameters
    ----------
    num : int
        Number of arrivals (``>= 0``).
    rate_per_s : float or None
        Mean arrivals per second (``> 0``); None or ``inf`` puts every arrival at 0 (an offline batch).
    seed : int, optional
        Seed of the numpy generator.

    Returns
    -------
    list of float
        Non-decreasing times in seconds.

    Raises
    ------
    KVStackError
        On ``num < 0``, a rate that is not a positive number, or a negative seed.
    """
    num = int_arg("num", num, 0)
    rate = rate_arg(rate_per_s)
    seed = seed_arg(seed)
    if rate is None or num == 0:
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def random_tokens(rng: np.random.Generator, n: int, low: int, high: int) -> list[int]:
    """``n`` token ids drawn uniformly from ``[low, high)``."""
    return rng.integers(low, high, size=n).tolist()


def _distinct_tokens(rng: np.random.Generator, n: int, low: int, high: int, what: str) -> list[int]:
    """``n`` distinct token ids in ``[low, high)``, so ``n`` sequences starting with them differ at once."""
    if n > high - low:
        raise KVStackError(
            f"{n} {what} need distinct first tokens but token_range [{low}, {high}) has only {high - low} ids; "
            "widen the range (a larger vocab_size) or lower the count"
        )
    return rng.choice(np.arange(low, high), size=n, replace=False).tolist()


def _system_prompts(rng: np.random.Generator, num: int, length: int, low: int, high: int) -> list[list[int]]:
    """``num`` random prompts of ``length`` tokens that differ from each other at their first token."""
    if length == 0:
        return [[] for _ in range(num)]
    firsts = _distinct_tokens(rng, num, low, high, "system prompts")
    return [[first, *random_tokens(rng, length - 1, low, high)] for first in firsts]


def _first_tokens_by_group(rng: np.random.Generator, groups: list[int], low: int, high: int, what: str) -> list[int]:
    """A first token per item, distinct among the items of the same group."""
    out = [0] * len(groups)
    for group in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == group]
        for i, token in zip(members, _distinct_tokens(rng, len(members), low, high, what), strict=True):
            out[i] = token
    return out


def _openings(rng: np.random.Generator, count: int, num_system_prompts: int, system_prompt_tokens: int, low: int,
              high: int, what: str) -> list[list[int]]:
    """The first tokens of ``count`` prompts: item ``i``'s system prompt (``i % num_system_prompts``), then a first
    token of its own, distinct among the items sharing that system prompt (among all items when system prompts
    are empty)."""
    systems = _system_prompts(rng, num_system_prompts, system_prompt_tokens, low, high)
    assignment = [i % num_system_prompts for i in range(count)]
    # With empty system prompts every item starts at its own tokens: keep those distinct across all of them.
    groups = assignment if system_prompt_tokens > 0 else [0] * count
    firsts = _first_tokens_by_group(rng, groups, low, high, what)
    return [systems[assignment[i]] + [firsts[i]] for i in range(count)]


def shared_prefix_workload(
    *,
    vocab_size: int,
    num_requests: int = 64,
    system_prompt_tokens: int = 1024,
    unique_tokens: int = 64,
    output_tokens: int = 32,
    num_system_prompts: int = 1,
    rate_per_s: float | None = None,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
) -> Workload:
    """Requests made of a shared system prompt followed by tokens of their own.

    Request ``i`` (id ``"shared-{i}"``) uses system prompt ``i % num_system_prompts``. System prompts differ
    from each other at their first token, and the own tokens of requests with the same system prompt differ at
    their first token, so two requests share exactly ``system_prompt_tokens`` leading tokens when their system
    prompt is the same and none otherwise; ``shared_prefix_tokens`` is ``(num_requests - system prompts used)
    * system_prompt_tokens``.

    Parameters
    ----------
    vocab_size : int
        Vocabulary size of the model (token ids stay below it).
    num_requests : int, optional
        Number of requests (``>= 1``).
    system_prompt_tokens : int, optional
        Length of each system prompt (``>= 0``).
    unique_tokens : int, optional
        Tokens of each request after its system prompt (``>= 1``).
    output_tokens : int, optional
        ``max_new_tokens`` of every request (``>= 1``).
    num_system_prompts : int, optional
        Distinct system prompts (``>= 1``).
    rate_per_s : float or None, optional
        Poisson arrival rate; None sends every request at 0.
    seed : int, optional
        Seed of the token and arrival draws.
    token_range : (int, int), optional
        Half-open range of token ids; defaults to ``[min(100, vocab_size // 2), vocab_size)``.

    Returns
    -------
    Workload

    Raises
    ------
    KVStackError
        If an argument is out of range, or the token range has fewer ids than the distinct first tokens needed
        (``num_system_prompts``, and the requests sharing one system prompt).
    """
    num_requests = int_arg("num_requests", num_requests, 1)
    system_prompt_tokens = int_arg("system_prompt_tokens", system_prompt_tokens, 0)
    unique_tokens = int_arg("unique_tokens", unique_tokens, 1)
    output_tokens = int_arg("output_tokens", output_tokens, 1)
    num_system_prompts = int_arg("num_system_prompts", num_system_prompts, 1)
    low, high = check_token_range(vocab_size, token_range)
    seed = seed_arg(seed)
    arrivals = poisson_arrivals(num_requests, rate_per_s, seed)
    rng = np.random.default_rng([seed, 1])
    openings = _openings(rng, num_requests, num_system_prompts, system_prompt_tokens, low, high,
                         "requests sharing a system prompt")
    requests = [
        WorkloadRequest(
            request_id=f"shared-{i}",
            arrival_time=arrivals[i],
            prompt_token_ids=tuple(opening + random_tokens(rng, unique_tokens - 1, low, high)),
            max_new_tokens=output_tokens,
        )
        for i, opening in enumerate(openings)
    ]
    return Workload(tuple(requests))


def multi_turn_workload(
    *,
    vocab_size: int,
    num_conversations: int = 16,
    turns: int = 4,
    system_prompt_tokens: int = 256,
    user_tokens: int = 64,
    output_tokens: int = 32,
    think_time_s: float = 1.0,
    rate_per_s: float | None = None,
    num_system_prompts: int = 1,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
) -> Workload:
    """Multi-turn chats: each turn's prompt extends the previous turn's prompt.

    Turn 0 of conversation ``c`` (request id ``"conv{c}-turn0"``) is a system prompt (``c %
    num_system_prompts``) followed by ``user_tokens`` user tokens; turn ``t`` is turn ``t - 1``'s prompt, then
    ``output_tokens`` tokens standing in for the assistant's reply, then ``user_tokens`` new user tokens, so
    turn ``t``'s prompt has ``system_prompt_tokens + (t + 1) * user_tokens + t * output_tokens`` tokens.
    Conversations start at Poisson arrivals; turn ``t`` arrives ``think_time_s`` after turn ``t - 1``'s
    *arrival*. This is an open-loop replay: a closed-loop client would wait for the actual reply (and use it
    in the next prompt), whereas the fixed stand-in reply and arrival times keep prompts identical across engines
    and runs, so runs are comparable. Conversations differ from each other right after their system prompt.

    Parameters
    ----------
    vocab_size : int
        Vocabulary size of the model (token ids stay below it).
    num_conversations : int, optional
        Number of chats (``>= 1``).
    turns : int, optional
        Turns per chat (``>= 1``).
    system_prompt_tokens : int, optional
        Length of each system prompt (``>= 0``).
    user_tokens : int, optional
        Tokens of each user message (``>= 1``).
    output_tokens : int, optional
        ``max_new_tokens`` of every turn, and the length of the stand-in replies (``>= 1``).
    think_time_s : float, optional
        Seconds between the arrivals of consecutive turns of a chat (``>= 0``).
    rate_per_s : float or None, optional
        Poisson rate of conversation starts; None starts every chat at 0.
    num_system_prompts : int, optional
        Distinct system prompts (``>= 1``).
    seed : int, optional
        Seed of the token and arrival draws.
    token_range : (int, int), optional
        Half-open range of token ids; defaults to ``[min(100, vocab_size // 2), vocab_size)``.

    Returns
    -------
    Workload
        ``num_conversations * turns`` requests with ``conversation_id="conv{c}"`` and ``turn=t``.

    Raises
    ------
    KVStackError
        If an argument is out of range, or the token range is too small for the distinct first tokens needed.
    """
    num_conversations = int_arg("num_conversations", num_conversations, 1)
    turns = int_arg("turns", turns, 1)
    system_prompt_tokens = int_arg("system_prompt_tokens", system_prompt_tokens, 0)
    user_tokens = int_arg("user_tokens", user_tokens, 1)
    output_tokens = int_arg("output_tokens", output_tokens, 1)
    think_time_s = nonnegative_float("think_time_s", think_time_s)
    num_system_prompts = int_arg("num_system_prompts", num_system_prompts, 1)
    low, high = check_token_range(vocab_size, token_range)
    seed = seed_arg(seed)
    starts = poisson_arrivals(num_conversations, rate_per_s, seed)
    rng = np.random.default_rng([seed, 2])
    openings = _openings(rng, num_conversations, num_system_prompts, system_prompt_tokens, low, high,
                         "conversations sharing a system prompt")
    requests = []
    for c, opening in enumerate(openings):
        first_prompt = opening + random_tokens(rng, user_tokens - 1, low, high)
        requests += _conversation(rng, f"conv{c}", first_prompt, starts[c], turns, think_time_s, user_tokens,
                                  output_tokens, low, high)
    return Workload(tuple(requests))


def _conversation(rng: np.random.Generator, conversation_id: str, first_prompt: list[int], start: float, turns: int,
                  think_time_s: float, user_tokens: int, output_tokens: int, low: int,
                  high: int) -> list[WorkloadRequest]:
    """The ``turns`` requests of one chat: each turn's prompt is the previous one's, a stand-in reply of
    ``output_tokens`` tokens and ``user_tokens`` new user tokens; turn ``t`` arrives ``t * think_time_s`` after
    ``start``."""
    requests = []
    prompt = first_prompt
    for t in range(turns):
        if t > 0:
            prompt = prompt + random_tokens(rng, output_tokens, low, high) + random_tokens(rng, user_tokens, low, high)
        requests.append(
            WorkloadRequest(
                request_id=f"{conversation_id}-turn{t}",
                arrival_time=start + t * think_time_s,
                prompt_token_ids=tuple(prompt),
                max_new_tokens=output_tokens,
                conversation_id=conversation_id,
                turn=t,
            )
        )
    return requests
