"""Workloads for the engine benchmark: synthetic generators and replay of Mooncake-style traces.

A :class:`Workload` is a list of :class:`WorkloadRequest` (prompt token ids, tokens to generate, arrival time in
seconds from the workload's start) sorted by arrival. It saves to and loads from JSONL, one request a line with
the keys ``request_id``, ``arrival_time``, ``prompt_token_ids`` and ``max_new_tokens`` (plus ``conversation_id``
and ``turn`` for chats), so another engine can replay exactly the same requests. Its summary counts the prompt
tokens a perfect prefix cache would not recompute (:attr:`Workload.shared_prefix_tokens`).

The workloads, and what each exercises in the engine:

* :func:`shared_prefix_workload` -- every request is one of a few *system prompts* followed by tokens of its own.
  The prefix cache should prefill each system prompt once; ``shared_prefix_tokens`` is exactly
  ``(requests - system prompts used) * system_prompt_tokens``.
* :func:`multi_turn_workload` -- chats whose turn ``t`` prompt is turn ``t - 1``'s prompt, a stand-in for the
  assistant's reply, and a new user message: the prefix grows turn after turn, and a cache that keeps (or
  offloads to a host/disk tier) the KV of a conversation between its turns saves its whole history.
* :func:`mooncake_workload` / :func:`load_mooncake_trace` -- replay of a Mooncake-style trace (real arrival times,
  lengths and block-level sharing); :func:`synthetic_mooncake_trace` writes a small one with a few popular
  prefixes, so nothing needs downloading.

Arrivals are Poisson (:func:`poisson_arrivals`) or all at once (``rate_per_s=None``, an offline batch): bursts
test admission, batching and preemption under load, a trickle tests the latency of a lightly loaded engine.

Every generator is deterministic by its seed. Token ids are drawn from ``token_range``, by default
``[min(100, vocab_size // 2), vocab_size)``, which skips the special tokens at the low end of usual vocabularies.

Every name is importable from here; they live in :mod:`kvstack.bench.workload_requests` (the requests and JSONL),
:mod:`kvstack.bench.workload_synthetic` (arrivals and the synthetic workloads),
:mod:`kvstack.bench.workload_mooncake` (traces) and :mod:`kvstack.bench.workload_args` (argument checks).
"""

from __future__ import annotations

from kvstack.bench.workload_args import DEFAULT_FIRST_TOKEN
from kvstack.bench.workload_mooncake import (
    MOONCAKE_BLOCK_TOKENS,
    load_mooncake_trace,
    mooncake_workload,
    synthetic_mooncake_trace,
    write_mooncake_trace,
)
from kvstack.bench.workload_requests import Workload, WorkloadRequest
from kvstack.bench.workload_synthetic import multi_turn_workload, poisson_arrivals, shared_prefix_workload

__all__ = [
    "DEFAULT_FIRST_TOKEN",
    "MOONCAKE_BLOCK_TOKENS",
    "Workload",
    "WorkloadRequest",
    "load_mooncake_trace",
    "mooncake_workload",
    "multi_turn_workload",
    "poisson_arrivals",
    "shared_prefix_workload",
    "synthetic_mooncake_trace",
    "write_mooncake_trace",
]
