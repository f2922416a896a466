"""The engine loop: requests in, tokens out, over the paged scheduler, KV pool and model runner.

Each :meth:`Engine.step` asks the :class:`~kvstack.engine.scheduler.Scheduler` for a batch, runs one packed
forward of the :class:`~kvstack.engine.runner.ModelRunner` over it, samples the next token of every sequence
whose chunk completed its known tokens (greedy, or temperature + top-p with a per-request seeded generator),
and reports the tokens back to the scheduler. :meth:`Engine.generate` is the offline loop on top.

Storage tiers
-------------
With ``host_mb > 0`` (and optionally ``disk_dir``) the engine owns a :class:`~kvstack.engine.tiers.TieredStore`.
When the block pool evicts a cached prefix block to reuse it, the block's KV (if the model has computed it)
is exported to the host tier first; the host tier spills its least recently used blocks to the disk
directory. A prompt whose prefix misses the pool continues its lookup in the tiers and loads each hit into
a new block instead of recomputing it. Disk-resident blocks of a new request's prompt are prefetched on a
background thread as soon as the request is added, so the file reads and checksums overlap with the steps
it waits through. :meth:`Engine.close` writes the pool's cached blocks and the host tier down to disk, so
a restarted engine with the same ``disk_dir`` and ``namespace`` finds the whole prefix cache there.

Preemption therefore works as a swap for full blocks when tiers are on: a preempted sequence's full,
computed blocks stay cached, go to the host tier if the pool needs their space, and are loaded back when
the sequence is readmitted; only its last, partial block is recomputed. Without tiers it is a recompute
(cached blocks that survive in the pool are still reused).

Timing
------
Each request records its arrival (:meth:`Engine.add_request`), its first token and its finish on
``time.perf_counter``; :meth:`Engine.request_timing` gives TTFT, TPOT and end-to-end latency.

Stop conditions
---------------
A request finishes at ``max_new_tokens``, on a stop token (``stop_token_ids``), or, with a tokenizer given to
the engine, as soon as its decoded output contains a stop string (``stop``; finish reason ``"stop"``).

Limitations
-----------
* ``n > 1`` cannot be combined with a compression method, nor used with :meth:`Engine.stream`.
* :meth:`Engine.stream` drives the engine from the caller's thread; there is no background serving loop.
* If the model forward raises, the scheduler's batch stays pending and the engine cannot step further.
* Finished requests stay in the scheduler (their outputs remain readable through :meth:`Engine.get_output`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from kvstack.engine.blocks import BlockManager, OutOfBlocksError
from kvstack.engine.compression import SequenceCompression, engine_method, window_weights
from kvstack.engine.paged import BYTES_PER_MB, PagedKVPool
from kvstack.engine.runner import ModelRunner, SequenceChunk
from kvstack.engine.scheduler import FinishReason, Request, Scheduler
from kvstack.engine.tiers import DiskTier, HostTier, TieredStore
from kvstack.errors import KVStackError
from kvstack.models import model_geometry

__all__ = ["Engine", "RequestOutput", "RequestTiming", "SamplingParams", "default_namespace"]


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


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request.

    Attributes
    ----------
    request_id : hashable
        The request.
    new_token_ids : list of int
        Tokens generated in this step (empty when it finished by abort).
    finished : bool
        Whether the request is finished.
    finish_reason : str or None
        ``"length"``, ``"eos"`` (a stop token), ``"stop"`` (a stop string) or ``"aborted"`` once finished,
        else None.
    parent_id : hashable or None
        For a parallel sample (``n > 1``) forked from a request, that request's id.
    """

    request_id: Hashable
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    parent_id: Hashable | None = None


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
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


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """Latency of one request, in seconds of ``time.perf_counter``.

    Attributes
    ----------
    ttft : float or None
        Arrival to first generated token (None before it).
    tpot : float or None
        Mean time per output token after the first: ``(finish - first) / (tokens - 1)``; None before the
        request finished or when it produced one token.
    e2e : float or None
        Arrival to finish (None while running).
    num_output_tokens : int
        Tokens generated so far.
    """

    ttft: float | None
    tpot: float | None
    e2e: float | None
    num_output_tokens: int


class _PoolTiers:
    """The :class:`~kvstack.engine.blocks.BlockTiers` of an engine: KV pool blocks <-> a TieredStore."""

    def __init__(self, store: TieredStore, pool: PagedKVPool) -> None:
        self.store = store
        self.pool = pool
        self.scheduler: Scheduler | None = None  # set once built: it knows which blocks hold computed KV
        self.offloaded = 0
        self.loaded = 0

    def offload(self, block_id: int, hash_value: bytes) -> None:
        if self.scheduler is not None and self.scheduler.is_computed(block_id):
            self.store.put(hash_value, self.pool.export_block(block_id))
            self.offloaded += 1

    def contains(self, hash_value: bytes) -> bool:
        return self.store.contains(hash_value)

    def load(self, hash_value: bytes, block_id: int) -> bool:
        tensors = self.store.get(hash_value)
        if tensors is None:
            return False
        try:
            self.pool.import_block(block_id, tensors)
        except KVStackError:  # a block of another geometry or dtype under this namespace: compute instead
            return False
        self.loaded += 1
        return True


def default_namespace(model: torch.nn.Module) -> str:
    """Prefix-cache key space of a model: its name or path, architecture, geometry and dtype.

    Two engines agree on block hashes (and share a disk tier) only for the same weights and dtype.
    """
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")
    geometry = model_geometry(model)
    dtype = next(model.parameters()).dtype
    kind = getattr(config, "model_type", type(model).__name__)
    return (f"{os.path.basename(name.rstrip('/')) or kind}/{kind}/L{geometry.num_layers}H{geometry.num_kv_heads}"
            f"D{geometry.head_dim}/{str(dtype).removeprefix('torch.')}")


class Engine:
    """Paged serving engine: continuous batching, chunked prefill, prefix caching, preemption by recompute.

    Parameters
    ----------
    model : torch.nn.Module
        A HuggingFace decoder-only causal LM; its attention implementation is switched to the runner's.
    memory_mb : float
        KV pool budget in MB (2**20 bytes); the pool holds as many blocks as fit.
    block_size : int, optional
        Tokens per KV block.
    max_num_batched_tokens : int, optional
        Token budget of one step (a longer prompt is prefilled in chunks).
    max_num_seqs : int, optional
        Maximum number of running sequences.
    policy : {"fcfs", "lpm"}, optional
        Admission order of the scheduler.
    enable_prefix_caching : bool, optional
        Reuse the KV of prompt prefixes already in the pool.
    namespace : str or None, optional
        Prefix-cache key space; None derives it from the model (:func:`default_namespace`).
    host_mb : float, optional
        Host-memory tier for evicted prefix blocks, in MB (0: none).
    disk_dir : str or os.PathLike or None, optional
        Disk tier directory below the host tier (needs ``host_mb > 0`` or passes blocks straight through a
        zero-capacity host tier); it survives restarts.
    disk_mb : float or None, optional
        Disk tier capacity in MB (None: unbounded).
    tokenizer : optional
        The model's tokenizer; needed only for stop strings (``SamplingParams.stop``).

    Raises
    ------
    KVStackError
        If the model is unsupported, the budget holds no block, or a limit, tier size or the policy is invalid.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        memory_mb: float,
        block_size: int = 16,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 64,
        policy: str = "fcfs",
        enable_prefix_caching: bool = True,
        namespace: str | None = None,
        host_mb: float = 0.0,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_mb: float | None = None,
        tokenizer: Any = None,
    ) -> None:
        for value, name in ((host_mb, "host_mb"), (disk_mb, "disk_mb")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise KVStackError(f"{name} must be a number of MB >= 0, got {value!r}")
        geometry = model_geometry(model)
        namespace = default_namespace(model) if namespace is None else str(namespace)
        parameter = next(model.parameters())
        self.pool = PagedKVPool.from_budget(
            memory_mb,
            geometry.num_layers,
            geometry.num_kv_heads,
            geometry.head_dim,
            block_size=block_size,
            dtype=parameter.dtype,
            device=parameter.device,
        )
        self.namespace = namespace
        self.store: TieredStore | None = None
        self._tiers: _PoolTiers | None = None
        if enable_prefix_caching and (host_mb or disk_dir is not None):
            disk = None
            if disk_dir is not None:
                capacity = None if disk_mb is None else int(disk_mb * BYTES_PER_MB)
                disk = DiskTier(disk_dir, namespace=namespace, capacity_bytes=capacity)
            self.store = TieredStore(HostTier(int(host_mb * BYTES_PER_MB), next_tier=disk), disk)
            self._tiers = _PoolTiers(self.store, self.pool)
        self.block_manager = BlockManager(
            self.pool.num_blocks, block_size, namespace=namespace, enable_prefix_caching=enable_prefix_caching,
            tiers=self._tiers,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            policy=policy,
        )
        if self._tiers is not None:
            self._tiers.scheduler = self.scheduler
        self.runner = ModelRunner(model, self.pool)
        self.max_context: int | None = geometry.max_context
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        self.vocab_size: int | None = getattr(config, "vocab_size", None)
        self._params: dict[Hashable, SamplingParams] = {}
        self._generators: dict[Hashable, torch.Generator | None] = {}
        self._ids = itertools.count()
        self._last_step_empty = False
        self._arrived: dict[Hashable, float] = {}
        self._first_token: dict[Hashable, float] = {}
        self._finished_at: dict[Hashable, float] = {}
        self.tokenizer = tokenizer
        self._compression: dict[Hashable, SequenceCompression] = {}
        self._children: dict[Hashable, list[Hashable]] = {}
        self._method_generator = torch.Generator().manual_seed(0)
        self._group_size = geometry.num_q_heads // geometry.num_kv_heads
        self._compression_totals = {"evicted_tokens": 0, "freed_blocks": 0, "compactions": 0}

    # ------------------------------------------------------------------ requests
    def add_request(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None, method: str | None = None
    ) -> int:
        """Queue one request.

        Parameters
        ----------
        prompt_token_ids : sequence of int
            The prompt (at least one token, each in the model's vocabulary).
        params : SamplingParams, optional
            Defaults to ``SamplingParams()``.
        method : str, optional
            A token-level selection method for this request's KV, e.g. ``"snapkv(budget=256)"`` or
            ``"h2o(ratio=0.5)"`` (see :mod:`kvstack.engine.compression`); None or ``"full"`` keeps everything.

        Returns
        -------
        int
            The new request's id.

        Raises
        ------
        KVStackError
            On an empty prompt, a token outside the vocabulary, a prompt (plus ``max_new_tokens``) past the
            model's context, a request the whole KV pool cannot hold, or a method the engine cannot run;
            nothing is changed.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise KVStackError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise KVStackError("stop strings need the tokenizer: build the Engine with tokenizer=...")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise KVStackError("the prompt is empty; give at least one token")
        if self.vocab_size is not None:
            bad = [t for t in prompt if isinstance(t, int) and not 0 <= t < self.vocab_size]
            if bad:
                raise KVStackError(f"prompt token {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if self.max_context is not None:
            if len(prompt) > self.max_context:
                raise KVStackError(
                    f"the prompt has {len(prompt)} tokens, longer than the model's context of {self.max_context}"
                )
            if len(prompt) + params.max_new_tokens - 1 > self.max_context:
                limit = self.max_context - len(prompt) + 1
                raise KVStackError(
                    f"{len(prompt)} prompt tokens plus max_new_tokens={params.max_new_tokens} run past the model's "
                    f"context of {self.max_context}; lower max_new_tokens to at most {limit}"
                )
        if params.n > 1 and method is not None and method != "full":
            raise KVStackError(f"n={params.n} parallel samples cannot be combined with a compression method "
                               f"({method!r}) yet; use n=1 or no method")
        compression = None
        if method is not None:
            chosen = engine_method(method, len(prompt), self.pool.num_layers)
            if chosen is not None:
                budget = chosen.layer_budget(len(prompt), 0, self.pool.num_layers)
                assert budget is not None
                compression = SequenceCompression(chosen, len(prompt), budget, self.pool.num_layers,
                                                  self.pool.num_kv_heads)
        request_id = next(self._ids)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            max_new_tokens=params.max_new_tokens,
            arrival_time=float(request_id),
            eos_token_ids=frozenset(params.stop_token_ids),
            n=params.n,
        )
        self.scheduler.add_request(request)
        self._params[request_id] = params
        self._generators[request_id] = self._new_generator(params, 0)
        if compression is not None:
            self._compression[request_id] = compression
        self._arrived[request_id] = time.perf_counter()
        if self.store is not None and self.store.disk is not None:
            hashes = self.block_manager.prompt_block_hashes(prompt)
            pool = self.block_manager.pool
            self.store.prefetch(key for key in hashes if pool.lookup(key) is None)
        return request_id

    @staticmethod
    def _new_generator(params: SamplingParams, index: int) -> torch.Generator | None:
        """The sampling generator of sample ``index`` of a request (None when greedy)."""
        if params.temperature == 0:
            return None
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed + index)
        return generator

    def abort(self, request_id: Hashable) -> bool:
        """Abort a request; see :meth:`~kvstack.engine.scheduler.Scheduler.abort`.

        Its parallel samples (``n > 1``) are aborted with it.

        Returns
        -------
        bool
            True if aborted (or will be at the next step's update), False if it had already finished.
        """
        aborted = self.scheduler.abort(request_id)
        for child in self._children.get(request_id, []):
            aborted = self.scheduler.abort(child) or aborted
        return aborted

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_unfinished()

    def get_output(self, request_id: Hashable) -> list[int]:
        """The tokens generated so far for a request (its first sample when ``n > 1``)."""
        return list(self.scheduler.get_sequence(request_id).output_token_ids)

    def get_outputs(self, request_id: Hashable) -> list[list[int]]:
        """The tokens of every sample of a request: its own, then its forked children's (``n > 1``)."""
        ids = [request_id, *self._children.get(request_id, [])]
        return [self.get_output(rid) for rid in ids]

    def children(self, request_id: Hashable) -> list[Hashable]:
        """Ids of the parallel samples forked from a request (empty until its prompt is computed, or n = 1)."""
        return list(self._children.get(request_id, []))

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Schedule, run one packed forward, sample, and report; return each request's new tokens.

        Returns
        -------
        list of RequestOutput
            One per scheduled request whose step produced a token or finished it, in batch order.
        """
        batch = self.scheduler.schedule()
        self._last_step_empty = batch.is_empty
        if batch.is_empty:
            return []
        chunks: list[SequenceChunk] = []
        completes: list[bool] = []
        for entry in batch.scheduled:
            seq = self.scheduler.get_sequence(entry.request_id)
            start = seq.num_computed_tokens
            tokens = seq.token_ids[start : start + entry.num_tokens]
            table = self.block_manager.block_table(entry.request_id)
            wanted: frozenset[str] = frozenset()
            compression = self._compression.get(entry.request_id)
            if compression is not None:
                if compression.preemptions_seen != seq.num_preemptions or compression.positions is None:
                    compression.reset(start - seq.num_evicted, seq.num_preemptions)
                wanted = compression.wanted_stats(entry.is_prefill)
            chunks.append(SequenceChunk(list(table), start, tokens, start - seq.num_evicted, wanted))
            completes.append(start + entry.num_tokens == seq.num_tokens)
        logits = self.runner.step(chunks)
        for row, entry in enumerate(batch.scheduled):
            compression = self._compression.get(entry.request_id)
            if compression is not None:
                chunk = chunks[row]
                compression.after_forward(chunk.start, chunk.num_tokens, self.runner.last_stats[row],
                                          chunk.start + chunk.num_tokens, self._method_generator, self._group_size)
        outputs: dict[Hashable, int | None] = {}
        forks: dict[Hashable, list[tuple[Hashable, int]]] = {}
        for row, entry in enumerate(batch.scheduled):
            rid = entry.request_id
            if not completes[row]:
                outputs[rid] = None
                continue
            params = self._params[rid]
            outputs[rid] = _sample(logits[row], params, self._generators[rid])
            seq = self.scheduler.get_sequence(rid)
            if params.n > 1 and seq.parent_id is None and not seq.output_token_ids:
                children = []
                for index in range(1, params.n):
                    child_id = next(self._ids)
                    generator = self._new_generator(params, index)
                    children.append((child_id, _sample(logits[row], params, generator)))
                    self._params[child_id] = params
                    self._generators[child_id] = generator
                    self._arrived[child_id] = self._arrived[rid]
                forks[rid] = children
                self._children[rid] = [child_id for child_id, _ in children]
        for copy in self.scheduler.update(outputs, forks):
            self.pool.copy_block(copy.src_block, copy.dst_block)
        for rid in list(forks):
            if self.scheduler.get_sequence(rid).finish_reason is FinishReason.ABORTED:  # aborted mid-step: no samples
                for child_id, _ in forks.pop(rid):
                    self._params.pop(child_id)
                    self._generators.pop(child_id)
                    self._arrived.pop(child_id)
                self._children.pop(rid)
        for entry in batch.scheduled:
            for rid in [entry.request_id, *(child for child, _ in forks.get(entry.request_id, []))]:
                if self._params[rid].stop and self._hit_stop_string(rid):
                    self.scheduler.stop(rid)
            if entry.request_id in self._compression:
                self._maybe_compress(entry.request_id)
        results: list[RequestOutput] = []
        now = time.perf_counter()
        for entry in batch.scheduled:
            rid = entry.request_id
            seq = self.scheduler.get_sequence(rid)
            aborted = seq.finish_reason is FinishReason.ABORTED
            token = outputs[rid]
            if token is None and not seq.is_finished:
                continue
            new = [] if token is None or aborted else [token]
            if new:
                self._first_token.setdefault(rid, now)
            if seq.is_finished:
                self._finished_at[rid] = now
            reason = seq.finish_reason.value if seq.finish_reason is not None else None
            results.append(RequestOutput(rid, new, seq.is_finished, reason))
            if seq.is_finished:
                self._generators.pop(rid, None)
            for child_id, token in forks.get(rid, []):
                child = self.scheduler.get_sequence(child_id)
                self._first_token[child_id] = now
                if child.is_finished:
                    self._finished_at[child_id] = now
                    self._generators.pop(child_id, None)
                child_reason = child.finish_reason.value if child.finish_reason is not None else None
                results.append(RequestOutput(child_id, [token], child.is_finished, child_reason, parent_id=rid))
        return results

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Any]:
        """Offline generation: queue every prompt, step until they all finish.

        Parameters
        ----------
        prompts : sequence of sequence of int
            The prompts.
        params : SamplingParams, optional
            Shared by every prompt (a seed is shared too).

        Returns
        -------
        list
            Generated tokens of each prompt, in prompt order: a list of int, or with ``params.n > 1`` a list
            of ``n`` such lists (the samples).

        Raises
        ------
        KVStackError
            If a prompt is invalid; then none of them is queued.
        """
        ids: list[int] = []
        try:
            for prompt in prompts:
                ids.append(self.add_request(prompt, params))
        except KVStackError:
            for rid in ids:
                self.scheduler.abort(rid)
            raise
        pending = set(ids)
        while pending:
            self.step()
            if self._last_step_empty:  # pragma: no cover - the scheduler always makes progress
                raise KVStackError("the scheduler made no progress; the engine cannot finish these requests")
            pending = {
                rid for rid in pending
                if not all(self.scheduler.get_sequence(r).is_finished for r in [rid, *self._children.get(rid, [])])
                or (self._params[rid].n > 1 and rid not in self._children)
            }
        if params is not None and params.n > 1:
            return [self.get_outputs(rid) for rid in ids]
        return [self.get_output(rid) for rid in ids]

    def _hit_stop_string(self, request_id: Hashable) -> bool:
        """Whether the running request's output now contains one of its stop strings (checked in the text of
        its last tokens, long enough to hold the longest stop string plus the new token)."""
        seq = self.scheduler.get_sequence(request_id)
        if seq.is_finished:
            return False
        stops = self._params[request_id].stop
        tokens = seq.output_token_ids
        window = max(len(text) for text in stops) + 8  # tokens are at least one character, usually more
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return any(text in tail for text in stops)

    # ------------------------------------------------------------------ compression
    def _maybe_compress(self, request_id: Hashable) -> None:
        """Compact a compressed request's KV down to its budget when it is due (see kvstack.engine.compression)."""
        compression = self._compression[request_id]
        seq = self.scheduler.get_sequence(request_id)
        if seq.is_finished:
            self._compression.pop(request_id, None)
            return
        prefill_done = bool(seq.output_token_ids) and seq.num_tokens - seq.num_computed_tokens <= 1
        if not compression.due(prefill_done, self.pool.block_size):
            return
        slots = compression.slots
        pool = self.pool
        table = self.block_manager.block_table(request_id)
        next_position = seq.num_computed_tokens
        kept: list[torch.Tensor] = []
        for layer in range(pool.num_layers):
            gathered = functools.cache(functools.partial(pool.gather, layer, table, slots))  # [H, S, D] x 2, once

            def kv_source(gathered: Any = gathered) -> tuple[torch.Tensor, torch.Tensor]:
                keys, values = gathered()
                return keys[None], values[None]

            window = None
            queries = compression.window_queries[layer] if compression.window_queries else None
            if queries is not None:
                keys, _ = gathered()
                scaling = float(compression.last_stats.get(layer, {}).get("scaling", keys.shape[-1] ** -0.5))
                window = window_weights(queries, keys, scaling)
            view = compression.view(layer, window, next_position, self._method_generator, self._group_size,
                                    kv_source)
            kept.append(compression.choose(layer, view))

        def copy(old_table: list[int], new_table: list[int]) -> None:
            for layer, index in enumerate(kept):
                keys, values = pool.gather(layer, old_table, slots)  # [H, S, D]
                expand = index[:, :, None].expand(-1, -1, keys.shape[-1])
                pool.write(layer, new_table, 0, keys.gather(1, expand), values.gather(1, expand))

        try:
            freed = self.scheduler.compact(request_id, compression.budget, copy)
        except OutOfBlocksError:
            return  # no room for the new blocks this step; try again after the next one
        self._compression_totals["evicted_tokens"] += slots - compression.budget
        self._compression_totals["freed_blocks"] += freed
        self._compression_totals["compactions"] += 1
        compression.keep(kept, freed)
        compression.window_queries = [None] * pool.num_layers

    def stream(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Add one request and yield its tokens as they are generated.

        Each ``next`` steps the whole engine (other requests advance too) until this request has a new token.
        Closing the generator early (``break``, ``.close()``) aborts the request and frees its blocks.

        Raises
        ------
        KVStackError
            If the request is invalid (raised at the first ``next``).
        """
        if params is not None and params.n > 1:
            raise KVStackError("stream() yields one sample; use n=1 (step() reports every sample of n > 1)")
        request_id = self.add_request(prompt_token_ids, params)
        yielded = 0
        try:
            while True:
                seq = self.scheduler.get_sequence(request_id)
                tokens = seq.output_token_ids
                while yielded < len(tokens):
                    yielded += 1
                    yield tokens[yielded - 1]
                if seq.is_finished:
                    return
                self.step()
                if self._last_step_empty:  # pragma: no cover - the scheduler always makes progress
                    raise KVStackError("the scheduler made no progress; the engine cannot finish this request")
        finally:
            if not self.scheduler.get_sequence(request_id).is_finished:
                self.abort(request_id)

    def request_timing(self, request_id: Hashable) -> RequestTiming:
        """TTFT, TPOT and end-to-end latency of a request (see :class:`RequestTiming`).

        Raises
        ------
        KVStackError
            If the id is unknown.
        """
        if request_id not in self._arrived:
            raise KVStackError(f"unknown request {request_id!r}")
        arrived = self._arrived[request_id]
        first = self._first_token.get(request_id)
        finished = self._finished_at.get(request_id)
        count = len(self.scheduler.get_sequence(request_id).output_token_ids)
        tpot = None
        if first is not None and finished is not None and count > 1:
            tpot = (finished - first) / (count - 1)
        return RequestTiming(
            ttft=None if first is None else first - arrived,
            tpot=tpot,
            e2e=None if finished is None else finished - arrived,
            num_output_tokens=count,
        )

    def metrics(self) -> dict[str, float | int]:
        """Scheduler counters plus block-manager metrics (see :meth:`Scheduler.metrics`), and with tiers
        ``tier_offloaded_blocks``, ``tier_loaded_blocks`` and the store's counters prefixed ``tier_``."""
        metrics = self.scheduler.metrics()
        metrics.update({f"compression_{name}": value for name, value in self._compression_totals.items()})
        if self._tiers is not None and self.store is not None:
            metrics["tier_offloaded_blocks"] = self._tiers.offloaded
            metrics["tier_loaded_blocks"] = self._tiers.loaded
            metrics.update({f"tier_{name}": value for name, value in self.store.metrics().items()})
        return metrics

    def close(self) -> None:
        """Write the pool's cached (computed) blocks and the host tier down to disk, and stop the prefetch
        thread. Without tiers it does nothing. Safe to call twice; the engine must not step afterwards."""
        if self._tiers is None or self.store is None:
            return
        pool = self.block_manager.pool
        if self.store.disk is not None:
            for block_id in pool.cached_blocks_lru():
                key = pool.hash_of(block_id)
                if key is not None and self.scheduler.is_computed(block_id) and not self.store.contains(key):
                    self.store.put(key, self.pool.export_block(block_id))
            self.store.flush()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
