"""The engine loop: requests in, tokens out, over the paged scheduler, KV pool and model runner.

:class:`Engine` schedules a batch, runs one packed forward, samples and reports back every step, with storage
tiers, token-level compression, stop strings and per-request timing. Design and limitations:
``docs/engine-design.md`` (section "Engine").
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch

from kvstack.engine.batch import ScheduledBatch, ScheduledSequence
from kvstack.engine.blocks import BlockManager, OutOfBlocksError
from kvstack.engine.compression import SequenceCompression, compaction_copy, engine_method
from kvstack.engine.latent_pool import PagedLatentPool
from kvstack.engine.outputs import RequestOutput, RequestTiming
from kvstack.engine.paged import PagedKVPool
from kvstack.engine.pool_tiers import PoolTiers, build_store
from kvstack.engine.runner import ModelRunner, SequenceChunk, stored_layers
from kvstack.engine.sampling import SamplingParams, new_generator, sample
from kvstack.engine.scheduler import Scheduler
from kvstack.engine.sequence import FinishReason, Request
from kvstack.engine.threads import ThreadGovernor
from kvstack.engine.tiers import TieredStore
from kvstack.errors import KVStackError
from kvstack.methods.base import Method
from kvstack.models import attention_modules, model_geometry
from kvstack.transforms.latent import latent_geometry
from kvstack.transforms.sharing import shared_layers

__all__ = ["Engine", "RequestOutput", "RequestTiming", "SamplingParams", "default_namespace"]

logger = logging.getLogger(__name__)

Forks = dict[Hashable, list[tuple[Hashable, int]]]  # request id -> its forked children (child id, first token)


def default_namespace(model: torch.nn.Module) -> str:
    """Prefix-cache key space of a model: its name or path, architecture, geometry and dtype.

    Two engines agree on block hashes (and share a disk tier) only for the same weights and dtype.
    """
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")
    geometry = model_geometry(model)
    dtype = next(model.parameters()).dtype
    kind = getattr(config, "model_type", type(model).__name__)
    # A cla or mla model keeps its original name and geometry but stores other tensors from other weights.
    shared = "".join(f"/cla{upper}:{lower}" for upper, lower in sorted(shared_layers(config).items()))
    latent = latent_geometry(config)
    shared += f"/mla{latent['rank']}r{latent['rope_dims']}" if latent is not None else ""
    return (f"{os.path.basename(name.rstrip('/')) or kind}/{kind}/L{geometry.num_layers}H{geometry.num_kv_heads}"
            f"D{geometry.head_dim}/{str(dtype).removeprefix('torch.')}{shared}")


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
    threads : int or None, optional
        Intra-op threads of the forward; None follows the CPUs the process may use (affinity, cgroup quota)
        and the load other processes put on them (:class:`~kvstack.engine.threads.ThreadGovernor`). It is
        applied in whichever thread calls :meth:`step`.

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
        threads: int | None = None,
    ) -> None:
        for value, name in ((host_mb, "host_mb"), (disk_mb, "disk_mb")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise KVStackError(f"{name} must be a number of MB >= 0, got {value!r}")
        self.threads = ThreadGovernor(threads)
        geometry = model_geometry(model)
        latent = latent_geometry(model.config)
        # A cla model's storing layers compress as any layer (each sharing layer reads what its source keeps),
        # and Quest's sharing layers select their source's blocks by their own queries (the bounds are of the
        # same keys). An mla model's policy scores the keys its modules rebuild from the pool's latents, and
        # keeps whole tokens; Quest has no bounds over latents.
        self._shares_layers = bool(shared_layers(model.config))
        self._latent_modules = attention_modules(model) if latent is not None else None
        namespace = default_namespace(model) if namespace is None else str(namespace)
        parameter = next(model.parameters())
        self.pool: PagedKVPool | PagedLatentPool
        if latent is not None:  # mla: per token and layer, rotary keys and one latent
            self.pool = PagedLatentPool.from_budget(
                memory_mb, geometry.num_layers, geometry.num_kv_heads, latent["rope_dims"], latent["rank"],
                block_size=block_size, dtype=parameter.dtype, device=parameter.device,
            )
        else:  # cla: only the layers that keep their own keys and values
            self.pool = PagedKVPool.from_budget(
                memory_mb,
                len(stored_layers(model)),
                geometry.num_kv_heads,
                geometry.head_dim,
                block_size=block_size,
                dtype=parameter.dtype,
                device=parameter.device,
            )
        self.namespace = namespace
        self.store: TieredStore | None = None
        self._tiers: PoolTiers | None = None
        if enable_prefix_caching and (host_mb or disk_dir is not None):
            self.store = build_store(namespace, host_mb, disk_dir, disk_mb)
            self._tiers = PoolTiers(self.store, self.pool)
        self.block_manager = BlockManager(
            self.pool.num_blocks, block_size, namespace=namespace, enable_prefix_caching=enable_prefix_caching,
            tiers=self._tiers,
            # Quest's block bounds are kept only while their block holds what they bound
            on_release=self.pool.release_block_bounds if isinstance(self.pool, PagedKVPool) else None,
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
        self._page_readers: dict[Hashable, Method] = {}  # requests whose decoding reads selected blocks (Quest)
        self._children: dict[Hashable, list[Hashable]] = {}
        self._method_generator = torch.Generator().manual_seed(0)
        self._group_size = geometry.num_q_heads // geometry.num_kv_heads
        self._compression_totals = {"evicted_tokens": 0, "freed_blocks": 0, "compactions": 0}
        self._errors: dict[Hashable, str] = {}  # failed requests not reported yet: what was raised
        self._num_failed = 0

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
        prompt = _token_ids(prompt_token_ids)
        self._check_prompt(prompt, params)
        compression, reader = self._method_state(method, prompt, params)
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
        self._generators[request_id] = new_generator(params, 0)
        if compression is not None:
            self._compression[request_id] = compression
        if reader is not None:
            self._page_readers[request_id] = reader
        self._arrived[request_id] = time.perf_counter()
        if self.store is not None and self.store.disk is not None:
            hashes = self.block_manager.prompt_block_hashes(prompt)
            pool = self.block_manager.pool
            self.store.prefetch(key for key in hashes if pool.lookup(key) is None)
        return request_id

    def _check_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise :class:`KVStackError` on an empty prompt, a token outside the vocabulary, or a prompt (plus
        ``max_new_tokens``) past the model's context."""
        if not prompt:
            raise KVStackError("the prompt is empty; give at least one token")
        if self.vocab_size is not None:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise KVStackError(f"prompt token {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if self.max_context is None:
            return
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

    def _method_state(
        self, method: str | None, prompt: list[int], params: SamplingParams
    ) -> tuple[SequenceCompression | None, Method | None]:
        """``(compression, page_reader)`` of a new request with ``method``: the compression state of a method
        that evicts, or the page-reading method (Quest: it keeps everything and changes only what a decoding
        step reads); ``(None, None)`` when it keeps and reads everything."""
        if params.n > 1 and method is not None and method != "full":
            raise KVStackError(f"n={params.n} parallel samples cannot be combined with a compression method "
                               f"({method!r}) yet; use n=1 or no method")
        if method is None:
            return None, None
        chosen = engine_method(method, len(prompt), self.pool.num_layers, self.pool.block_size)
        if chosen is None:
            return None, None
        if chosen.reads_pages:
            if self._latent_modules is not None:
                raise KVStackError(f"this model caches latents (mla); the engine keeps no block bounds over latents, "
                                   f"so {chosen.label()} does not run on it (eviction methods do)")
            if getattr(chosen, "select", "bound") != "bound":
                raise KVStackError(f"the engine ranks blocks by the key bounds it keeps beside its pool; "
                                   f"{chosen.label()} ranks pages by low-rank keys it does not keep; use "
                                   "select='bound'")
            if self._shares_layers and getattr(chosen, "dense_layers", 0):
                # dense layers are counted in the pool's layers, which on a cla model are not the model's
                raise KVStackError(f"this model's layers share keys and values (cla); {chosen.label()} keeps "
                                   "dense layers, which the engine does not map onto shared layers yet; use "
                                   "dense_layers=0")
            return None, chosen
        budget = chosen.layer_budget(len(prompt), 0, self.pool.num_layers)
        assert budget is not None
        return SequenceCompression(chosen, len(prompt), budget, self.pool.num_layers, self.pool.num_kv_heads), None

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

    def release(self, request_id: Hashable) -> None:
        """Forget a finished request and its samples: its outputs and timing are no longer readable.

        A long-running engine (``kvstack serve``) calls it once a request is reported, so that memory does
        not grow with the number of requests served.

        Raises
        ------
        KVStackError
            If the id is unknown, or the request or one of its samples has not finished.
        """
        ids = [request_id, *self._children.get(request_id, [])]
        for rid in ids:
            if not self.scheduler.get_sequence(rid).is_finished:
                raise KVStackError(f"request {rid!r} has not finished; abort it before releasing it")
        for rid in ids:
            self.scheduler.forget(rid)
            for table in (self._params, self._generators, self._arrived, self._first_token, self._finished_at,
                          self._compression, self._page_readers, self._errors):
                table.pop(rid, None)
        self._children.pop(request_id, None)

    def children(self, request_id: Hashable) -> list[Hashable]:
        """Ids of the parallel samples forked from a request (empty until its prompt is computed, or n = 1)."""
        return list(self._children.get(request_id, []))

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Schedule, run one packed forward, sample, and report; return each request's new tokens.

        A failure inside the step fails only the requests it concerns (finish reason ``"error"``, blocks
        freed) and the engine keeps serving: a chunk that cannot be prepared, a forward that raises (the batch
        is rerun one request at a time to find which), a compression or sampling error. Requests reading
        blocks a failed request was writing in the same step fail with it. Anything else that raises fails
        the whole batch rather than leave the scheduler waiting for an update.

        Returns
        -------
        list of RequestOutput
            One per scheduled request whose step produced a token or finished it, in batch order.
        """
        batch = self.scheduler.schedule()
        self._last_step_empty = batch.is_empty
        if batch.is_empty:
            return []
        self.threads.tick()
        try:
            return self._run_batch(batch)
        except Exception as error:  # an engine fault: fail this batch, never leave the loop wedged
            return self._fail_batch(batch, error)

    def _run_batch(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """The body of :meth:`step` for a non-empty batch, each request's failure isolated."""
        chunks: dict[Hashable, SequenceChunk] = {}
        for entry in batch.scheduled:
            try:
                chunks[entry.request_id] = self._chunk_of(entry)
            except Exception as error:
                self._fail(entry.request_id, error)
        rows = self._forward(batch, chunks)
        completes: dict[Hashable, bool] = {}
        for entry in batch.scheduled:
            rid = entry.request_id
            if rid not in rows:
                continue
            chunk = chunks[rid]
            completes[rid] = chunk.start + chunk.num_tokens == self.scheduler.get_sequence(rid).num_tokens
            compression = self._compression.get(rid)
            if compression is not None:
                try:
                    end = chunk.start + chunk.num_tokens
                    compression.after_forward(chunk.start, chunk.num_tokens, rows[rid][1], end,
                                              self._method_generator, self._group_size)
                except Exception as error:
                    self._fail(rid, error)
        outputs, forks = self._sample_batch(batch, completes, rows)
        for copy in self.scheduler.update(outputs, forks):
            self.pool.copy_block(copy.src_block, copy.dst_block)
        self._drop_aborted_forks(forks)
        for entry in batch.scheduled:
            for rid in [entry.request_id, *(child for child, _ in forks.get(entry.request_id, []))]:
                try:
                    if self._params[rid].stop and self._hit_stop_string(rid):
                        self.scheduler.stop(rid)
                    if rid in self._compression:
                        self._maybe_compress(rid)
                except Exception as error:
                    self._fail(rid, error)
        return self._step_outputs(batch, outputs, forks)

    def _forward(
        self, batch: ScheduledBatch, chunks: dict[Hashable, SequenceChunk]
    ) -> dict[Hashable, tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]]:
        """Run the chunks in one packed forward: each request's ``(logits [vocab], statistics)``.

        If the packed forward raises, each chunk is rerun alone in batch order (rewriting the same KV slots) so
        that only the requests whose forward raises fail, with those that read blocks they were writing.
        """
        live = [entry.request_id for entry in batch.scheduled if self._still_running(entry.request_id)]
        if not live:
            return {}
        try:
            logits = self.runner.step([chunks[rid] for rid in live])
            return {rid: (logits[row], self.runner.last_stats[row]) for row, rid in enumerate(live)}
        except Exception as error:
            if len(live) == 1:
                self._fail(live[0], error)
                return {}
        rows = {}
        for position, rid in enumerate(live):
            if not self._still_running(rid):  # failed with a request it was reading from
                continue
            try:
                logits = self.runner.step([chunks[rid]])
                rows[rid] = (logits[0], self.runner.last_stats[0])
            except Exception as error:
                self._fail(rid, error)
                half_written = {block for block in self.block_manager.block_table(rid)
                                if not self.scheduler.is_computed(block)}
                for later in live[position + 1 :]:
                    if half_written.intersection(self.block_manager.block_table(later)):
                        self._fail(later, KVStackError(f"it reads KV blocks that failed request {rid!r} was writing"))
        return rows

    def _still_running(self, request_id: Hashable) -> bool:
        """Whether a scheduled request has not been failed or aborted during this step."""
        seq = self.scheduler.get_sequence(request_id)
        return not seq.is_finished and not seq.finishing

    def _fail(self, request_id: Hashable, error: BaseException) -> None:
        """Fail one request (reason ``"error"``), keeping what was raised for its output and the log."""
        message = f"{type(error).__name__}: {error}"
        if self.scheduler.fail(request_id):
            self._errors[request_id] = message
            self._num_failed += 1
            logger.error("request %r failed: %s", request_id, message, exc_info=error)

    def _fail_batch(self, batch: ScheduledBatch, error: BaseException) -> list[RequestOutput]:
        """Fail every request of ``batch`` and its samples after an error outside any one request's work."""
        rids = [rid for entry in batch.scheduled
                for rid in [entry.request_id, *self._children.get(entry.request_id, [])]]
        for rid in rids:
            if rid in self.scheduler:
                self._fail(rid, error)
        if self.scheduler.pending_batch is not None:
            self.scheduler.update({})
        results = []
        for rid in rids:
            if rid in self._errors:
                self._finished_at[rid] = time.perf_counter()
                self._generators.pop(rid, None)
                self._compression.pop(rid, None)
                self._page_readers.pop(rid, None)
                results.append(RequestOutput(rid, [], True, FinishReason.ERROR.value, error=self._errors.pop(rid)))
        return results

    def _chunk_of(self, entry: ScheduledSequence) -> SequenceChunk:
        """What the runner computes for one scheduled entry (and the statistics its compression needs)."""
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
        return SequenceChunk(list(table), start, tokens, start - seq.num_evicted, wanted,
                             self._page_readers.get(entry.request_id))

    def _sample_batch(
        self, batch: ScheduledBatch, completes: dict[Hashable, bool],
        rows: dict[Hashable, tuple[torch.Tensor, Any]],
    ) -> tuple[dict[Hashable, int | None], Forks]:
        """The sampled token of every entry whose chunk completed its tokens (None for the others and for failed
        requests), and the forks of requests with ``n > 1`` whose prompt completed: ``(outputs, forks)`` for the
        scheduler's update."""
        outputs: dict[Hashable, int | None] = {}
        forks: Forks = {}
        for entry in batch.scheduled:
            rid = entry.request_id
            outputs[rid] = None
            if not completes.get(rid, False) or not self._still_running(rid):
                continue
            params = self._params[rid]
            logits = rows[rid][0]
            try:
                token = sample(logits, params, self._generators[rid])
                seq = self.scheduler.get_sequence(rid)
                if params.n > 1 and seq.parent_id is None and not seq.output_token_ids:
                    forks[rid] = self._fork_samples(rid, logits, params)
            except Exception as error:
                self._fail(rid, error)
                continue
            outputs[rid] = token
        return outputs, forks

    def _fork_samples(self, rid: Hashable, logits: torch.Tensor, params: SamplingParams) -> list[tuple[Hashable, int]]:
        """The ``n - 1`` children of request ``rid``, each with its own generator and first token from ``logits``."""
        children = []
        for index in range(1, params.n):
            child_id = next(self._ids)
            generator = new_generator(params, index)
            children.append((child_id, sample(logits, params, generator)))
            self._params[child_id] = params
            self._generators[child_id] = generator
            self._arrived[child_id] = self._arrived[rid]
        self._children[rid] = [child_id for child_id, _ in children]
        return children

    def _drop_aborted_forks(self, forks: Forks) -> None:
        """Forget the children of requests aborted or failed during the step (the scheduler took no samples)."""
        for rid in list(forks):
            if self.scheduler.get_sequence(rid).finish_reason in (FinishReason.ABORTED, FinishReason.ERROR):
                for child_id, _ in forks.pop(rid):
                    self._params.pop(child_id)
                    self._generators.pop(child_id)
                    self._arrived.pop(child_id)
                self._children.pop(rid)

    def _step_outputs(
        self, batch: ScheduledBatch, outputs: dict[Hashable, int | None], forks: Forks
    ) -> list[RequestOutput]:
        """What the step produced for each request, children after their parent; records first-token and finish
        times."""
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
            results.append(RequestOutput(rid, new, seq.is_finished, reason, error=self._errors.pop(rid, None)))
            if seq.is_finished:
                self._generators.pop(rid, None)
            for child_id, token in forks.get(rid, []):
                child = self.scheduler.get_sequence(child_id)
                self._first_token[child_id] = now
                if child.is_finished:
                    self._finished_at[child_id] = now
                    self._generators.pop(child_id, None)
                child_reason = child.finish_reason.value if child.finish_reason is not None else None
                results.append(RequestOutput(child_id, [token], child.is_finished, child_reason, parent_id=rid,
                                             error=self._errors.pop(child_id, None)))
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
            If a prompt is invalid (then none of them is queued), or once all have finished, if a step failed
            any of them (the message names each with what was raised; the engine keeps serving).
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
        failures: list[str] = []
        while pending:
            failures.extend(f"request {out.request_id!r}: {out.error}" for out in self.step() if out.error)
            if self._last_step_empty:  # pragma: no cover - the scheduler always makes progress
                raise KVStackError("the scheduler made no progress; the engine cannot finish these requests")
            # A parent's samples are forked in the step it samples its first token, so finished means all done.
            pending = {
                rid for rid in pending
                if not all(self.scheduler.get_sequence(r).is_finished for r in [rid, *self._children.get(rid, [])])
            }
        if failures:
            raise KVStackError(f"{len(failures)} request(s) failed: " + "; ".join(failures))
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
    def _rebuild(self, layer: int, rotary_keys: torch.Tensor, latents: torch.Tensor) -> tuple:
        """An mla model's keys and values ``[H, S, D]`` of layer ``layer`` from its pool's rotary keys ``[H, S, d]``
        and latents ``[1, S, r]``, for the policy to score."""
        module = self._latent_modules[layer]
        dtype = module.q_proj.weight.dtype
        with torch.no_grad():
            keys, values = module.rebuild(rotary_keys[None].to(dtype), latents[None].to(dtype))
        return keys[0], values[0]

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
        table = self.block_manager.block_table(request_id)
        kept = compression.choose_all(self.pool, table, seq.num_computed_tokens, self._method_generator,
                                      self._group_size, rebuild=self._rebuild if self._latent_modules else None)
        try:
            freed = self.scheduler.compact(request_id, compression.budget, compaction_copy(self.pool, kept, slots))
        except OutOfBlocksError:
            return  # no room for the new blocks this step; try again after the next one
        self._compression_totals["evicted_tokens"] += slots - compression.budget
        self._compression_totals["freed_blocks"] += freed
        self._compression_totals["compactions"] += 1
        compression.keep(kept, freed)
        compression.window_queries = [None] * self.pool.num_layers

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
        """Scheduler counters plus block-manager metrics (see :meth:`Scheduler.metrics`), ``failed_requests``
        (finished by an error in a step), ``threads`` (of the forward), ``compression_*`` totals, and with tiers
        ``tier_offloaded_blocks``, ``tier_loaded_blocks`` and the store's counters prefixed ``tier_``."""
        metrics = self.scheduler.metrics()
        metrics["failed_requests"] = self._num_failed
        metrics["threads"] = self.threads.threads
        metrics.update({f"compression_{name}": value for name, value in self._compression_totals.items()})
        if self._tiers is not None and self.store is not None:
            metrics["tier_offloaded_blocks"] = self._tiers.offloaded
            metrics["tier_loaded_blocks"] = self._tiers.loaded
            metrics.update({f"tier_{name}": value for name, value in self.store.metrics().items()})
        return metrics

    def close(self) -> None:
        """Write the pool's cached (computed) blocks and the host tier down to disk, and stop the prefetch
        thread. Without tiers it does nothing. Safe to call twice; the engine must not step afterwards."""
        if self._tiers is not None:
            self._tiers.close(self.block_manager.pool)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _token_ids(tokens: Sequence[Any]) -> list[int]:
    """The prompt as Python ints; numpy and torch integers are accepted, anything else is a one-line error."""
    try:
        return [operator.index(token) for token in tokens]
    except TypeError:
        bad = next(token for token in tokens if not hasattr(token, "__index__"))
        raise KVStackError(f"prompt tokens must be integers, got {bad!r} ({type(bad).__name__})") from None
