"""The two-line API: ``make_cache(model, spec)``, then ``model.generate(..., cache=cache)`` (``past_key_values=``
before transformers 5.24; :func:`cache_kwargs` picks the keyword).

Also :func:`prefill` (chunked prompt reading, so dynamic methods hold their budget while the prompt
streams in) and :func:`generate` (greedy decoding with timings and the cache's accounting), which the
CLI, the bench and the examples use.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from pathlib import Path
from typing import Any

import torch

from kvstack import attention
from kvstack.cache.cache import KVStackCache
from kvstack.cache.latent_layer import latent_codec_refusal, latent_policy_refusal
from kvstack.cache.page_tier import check_tier_dir
from kvstack.contract import LINK_REUSE, LayerLink
from kvstack.errors import InputError
from kvstack.methods.base import Composed, Method
from kvstack.methods.full import Full
from kvstack.models import attention_placements, model_geometry
from kvstack.spec import parse
from kvstack.transforms.latent import latent_geometry
from kvstack.transforms.sharing import shared_layers

DEFAULT_CHUNK = 512  # prefill chunk for methods that evict while the prompt streams in


@functools.cache
def _cache_keyword(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument passing ``cache`` to ``model``'s ``forward`` or ``generate``.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in a later
    release); this gives ``{"cache": cache}`` where the model takes the new name and
    ``{"past_key_values": cache}`` where it does not, so one call works on every supported version::

        model.generate(ids, **kvstack.cache_kwargs(model, cache), max_new_tokens=32)
    """
    return {_cache_keyword(type(model)): cache}


def make_cache(model: torch.nn.Module, spec: str | Method = "full", *, seed: int = 0) -> KVStackCache:
    """Build a cache applying ``spec`` to ``model`` and select kvstack's attention function on the model.

    Parameters
    ----------
    model:
        A HuggingFace causal LM (Llama, Qwen2, Mistral ...).
    spec:
        A method spec such as ``"snapkv(ratio=0.5)"`` (see ``kvstack methods``) or a parsed method.
    seed:
        Seed for methods that draw random numbers.

    Examples
    --------
    >>> cache = kvstack.make_cache(model, "streamingllm(budget=512)")
    >>> out = model.generate(ids, **kvstack.cache_kwargs(model, cache), max_new_tokens=32)
    """
    method = parse(spec)
    label = method.label()
    if getattr(method, "is_transform", False):
        raise InputError(f"{label} is a model transform, not a cache method: apply it with "
                         "kvstack.transform(model, spec) (or `kvstack transform`), then make a cache on the new model")
    codec = None
    if isinstance(method, Composed):
        method, codec = method.selection, method.codec
    config = getattr(model, "config", None)  # None for a module that is no model: model_geometry refuses it
    latent = latent_geometry(config)
    if latent is not None:
        # its attention rebuilds keys and values from latents: a policy scores the rebuilt keys, a codec
        # encodes the latents and rotary keys
        refusal = None if isinstance(method, Full) else latent_policy_refusal(method, codec)
        if refusal:
            raise InputError(f"this model caches latents (mla), so {label} does not apply: {refusal}")
        refusal = latent_codec_refusal(codec) if codec is not None else None
        if refusal:
            raise InputError(f"this model caches latents (mla), so {codec.label()} does not apply: {refusal}; "
                             "kivi(...) or quant(...) do")
    shared = shared_layers(config)
    refusal = shared_model_refusal(method) if shared else None
    if refusal:  # a cla model: before any artefact of the method is looked for
        raise InputError(f"this model's layers share keys and values (cla), so {label} does not apply: {refusal}")
    geometry = model_geometry(model)
    if codec is not None and latent is not None:  # it encodes rotary keys and latents, not keys and values
        codec.key_format().check(latent["rope_dims"], "rotary keys")
        codec.value_format().check(latent["rank"], "latents")
    elif codec is not None:
        codec.check(geometry.head_dim)
        if codec.pre_rope() and geometry.rope_inv_freq is None:
            raise InputError(f"{codec.label()} quantizes keys before RoPE and needs a model with plain RoPE")
    calibration = None
    artefact_files: list[Path] = []  # the calibration files the cache is built from
    if codec is not None and codec.needs_calibration():
        from kvstack.calibration import calibration_path, get_calibration, model_key

        calibration = get_calibration(model)  # a missing or foreign artefact is a one-line CalibrationError
        artefact_files.append(calibration_path(model_key(model)))
    if method.demotion_codec() is not None:  # mikv: its low-precision groups must tile the head dimension
        method.demotion_codec().check(geometry.head_dim)
    if method.sparse_attention and method.rank > geometry.head_dim:
        raise InputError(f"rank {method.rank} is above the head dimension {geometry.head_dim}; choose 1 to "
                         f"{geometry.head_dim}")
    if method.uses_cache_positions() and geometry.rope_inv_freq is None:
        raise InputError("positions='cache' needs a model with plain RoPE (inv_freq, no attention scaling)")
    layer_links = None
    if method.uses_model_artefact or method.cross_layer:  # their artefacts are keyed by the model
        from kvstack.calibration import model_key

        key = model_key(model)
        if method.uses_model_artefact:
            method.load_artefacts(key, geometry.num_layers, geometry.num_kv_heads)
        if method.cross_layer:
            layer_links = method.layer_links(geometry.num_layers, key)
        artefact_files.extend(method.artefact_files(key))
    if shared:  # a cla model: its sharing layers read what the layer below keeps, and hold nothing
        layer_links = {upper: LayerLink(lower, LINK_REUSE) for upper, lower in shared.items()}
    tier_dir = None
    if method.reads_pages:
        if all(method.reads_every_page(layer) for layer in range(geometry.num_layers)):
            raise InputError(f"{method.label()} leaves none of the model's {geometry.num_layers} layers reading pages; "
                             "use 'full', or fewer dense_layers")
        if codec is not None:
            raise InputError(f"{method.label()} keeps its pages in full precision and does not compose with a codec "
                             "yet; use it alone")
        tier_dir = check_tier_dir(method.tier_dir)
    attention.register()
    if getattr(model.config, "_attn_implementation", None) != attention.ATTENTION_NAME:
        model.set_attn_implementation(attention.ATTENTION_NAME)
    return KVStackCache(
        method,
        num_layers=geometry.num_layers,
        num_q_heads=geometry.num_q_heads,
        num_kv_heads=geometry.num_kv_heads,
        rope_inv_freq=geometry.rope_inv_freq,
        seed=seed,
        codec=codec,
        calibration=calibration,
        label=label,
        layer_links=layer_links,
        tier_dir=tier_dir,
        latent=latent is not None,
        head_dim=geometry.head_dim,
        artefacts=_artefact_digests(artefact_files),
    )


def _artefact_digests(files: list[Path]) -> dict[str, str]:
    """``{path: sha256}`` of the calibration files a cache was built from (read just now, so they exist)."""
    from kvstack.calibration.artefact import file_digest

    return {str(path.resolve()): file_digest(path) for path in files}


def shared_model_refusal(method: Method) -> str | None:
    """Why ``method`` cannot run on a model whose upper layers read a lower layer's cache (cla), or None.

    Eviction, merging and codecs apply to the layers that store, and the sharing layers read what they keep.
    """
    if method.cross_layer:
        return "it links layers itself; use a per-layer method"
    if method.reads_pages:
        return "its pages live in a slow tier that a sharing layer cannot read; use a method keeping entries resident"
    return None


def check_prompt(input_ids: torch.Tensor, model: torch.nn.Module, extra_tokens: int = 0) -> None:
    """Refuse an empty prompt, or one longer than the model's context (counting ``extra_tokens`` to generate)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError("the prompt is empty; give at least one token of text")
    limit = model_geometry(model).max_context
    if limit is not None and input_ids.shape[1] + extra_tokens > limit:
        raise InputError(
            f"the prompt has {input_ids.shape[1]} tokens (+{extra_tokens} to generate), more than the model's "
            f"context of {limit}; shorten it or lower --max-new-tokens"
        )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for a left-padded batch, as transformers' ``generate`` assigns them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def chunk_bounds(length: int, chunk_size: int | None, last_at_least: int) -> list[tuple[int, int]]:
    """Split ``range(length)`` into chunks; the last one is merged upward to hold ``last_at_least`` tokens."""
    if chunk_size is None or chunk_size >= length:
        return [(0, length)]
    bounds = [(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]
    while len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < last_at_least:
        (start, _), (_, stop) = bounds[-2], bounds[-1]
        bounds[-2:] = [(start, stop)]
    return bounds


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: KVStackCache,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int | str | None = "auto",
) -> torch.Tensor:
    """Read a prompt into ``cache``, in chunks when the method evicts while reading.

    Parameters
    ----------
    input_ids:
        ``[B, T]`` prompt tokens (left-padded for B > 1, with ``attention_mask``).
    attention_mask:
        ``[B, T]`` 1 for tokens, 0 for padding.
    chunk_size:
        Tokens per forward. ``"auto"``: 512 for dynamic methods (the cache never exceeds budget + one
        chunk), the whole prompt otherwise. None: one forward.

    Returns
    -------
    torch.Tensor
        ``[B, V]`` logits of the last prompt position.
    """
    check_prompt(input_ids, model)
    if chunk_size == "auto":
        chunk_size = DEFAULT_CHUNK if cache.method.dynamic else None
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    length = input_ids.shape[1]
    cache.begin_prompt(length)
    bounds = chunk_bounds(length, chunk_size, cache.method.window_queries())
    logits = _read_chunks(model, input_ids, cache, [cache], bounds, attention_mask)
    cache.end_prompt()
    return logits


def _read_chunks(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, members: list[KVStackCache],
                 bounds: list[tuple[int, int]], attention_mask: torch.Tensor | None = None,
                 limit: int | None = None) -> torch.Tensor:
    """Forward the prompt chunks ``bounds`` (the prompt's last ones; the first ``limit`` of them) through
    ``cache``; returns ``[B, V]`` logits of the last chunk read.

    ``members`` are the :class:`KVStackCache` s reading them (``[cache]``, or a shared cache's members);
    each chunk tells them whether more of the prompt follows.
    """
    positions = positions_from_mask(attention_mask) if attention_mask is not None else None
    logits = None
    try:
        for index, (start, stop) in enumerate(bounds[:limit]):
            for member in members:
                member.more_prompt_follows = index < len(bounds) - 1
            kwargs: dict[str, Any] = {}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask[:, :stop]
                kwargs["position_ids"] = positions[:, start:stop]
            out = model(input_ids=input_ids[:, start:stop], **cache_kwargs(model, cache), use_cache=True,
                        logits_to_keep=1, **kwargs)
            logits = out.logits[:, -1]
    finally:
        for member in members:
            member.more_prompt_follows = False
    return logits


@torch.no_grad()
def prefill_shared(model: torch.nn.Module, input_ids: torch.Tensor, caches: list[KVStackCache]) -> torch.Tensor:
    """Read one prompt into several caches with a single forward (see :mod:`kvstack.cache.shared`).

    Every cache ends exactly as :func:`prefill` would leave it; the prompt forward, the bulk of the work,
    runs once. The methods must compress once, after the prompt (SnapKV, PyramidKV, Ada-KV over SnapKV,
    key norm, random, Loki, full), without a codec. Methods of that kind with per-entry state or
    whole-matrix statistics (Ada-KV over H2O) share it only with caches asking for the same statistics
    (:func:`kvstack.cache.shared.method_stats_share_key`: one method at several ratios).

    Parameters
    ----------
    input_ids:
        ``[B, T]`` prompt tokens (no padding).
    caches:
        Empty caches made by :func:`make_cache` for ``model``.

    Returns
    -------
    torch.Tensor
        ``[B, V]`` logits of the last prompt position (the same for every cache).

    Raises
    ------
    InputError
        For no caches, or a cache whose method cannot share the forward (the message names it and why).
    """
    from kvstack.cache.shared import SharedPrefillCache

    check_prompt(input_ids, model)
    if not caches:
        raise InputError("prefill_shared needs at least one cache")
    if len(caches) == 1:
        return prefill(model, input_ids, caches[0])
    try:
        shared = SharedPrefillCache(caches)
    except ValueError as err:
        raise InputError(f"{err}; give it static methods without a codec, or use prefill() per cache") from None
    length = input_ids.shape[1]
    for cache in caches:
        cache.begin_prompt(length)
    out = model(input_ids=input_ids, **cache_kwargs(model, shared), use_cache=True, logits_to_keep=1)
    for cache in caches:
        cache.end_prompt()
    return out.logits[:, -1]


@dataclasses.dataclass
class PromptRead:
    """How one cache of :func:`prefill_shared_chunks` read its prompt.

    Attributes
    ----------
    logits:
        ``[B, V]`` logits of the last prompt position.
    seconds:
        Wall time of the forwards this cache took part in (the shared chunks counted whole, as its own).
    chunks_shared:
        Prompt chunks it read in a forward shared with other caches.
    chunks:
        Prompt chunks in all.
    """

    logits: torch.Tensor
    seconds: float
    chunks_shared: int
    chunks: int


@torch.no_grad()
def prefill_shared_chunks(model: torch.nn.Module, input_ids: torch.Tensor, caches: list[KVStackCache],
                          chunk_size: int | None = DEFAULT_CHUNK) -> list[PromptRead]:
    """Read one prompt into several caches of methods that evict as they read, sharing what they can.

    Each cache reads the prompt in the chunks :func:`prefill` gives it. Until a cache first exceeds its
    budget it holds every token, as the full cache does, so caches whose methods' statistics one attention
    call computes (:func:`kvstack.cache.shared.chunk_share_key`: one method at several ratios or budgets,
    H2O with Scissorhands, StreamingLLM with TOVA) read those chunks in one forward; each evicts for
    itself, and a cache that has evicted reads the rest alone. Before each chunk the caches still reading
    together are split by how their own forwards would compute its attention
    (:func:`kvstack.cache.shared.chunk_route_groups`: a one-token chunk, bf16 statistics); a cache left
    in a group of its own reads the rest alone. Every cache ends exactly as
    :func:`prefill` would leave it (tests/test_shared_prefill.py compares them tensor by tensor).

    Parameters
    ----------
    input_ids:
        ``[B, T]`` prompt tokens (no padding).
    caches:
        Empty caches made by :func:`make_cache` for ``model``, of methods with equal share keys.
    chunk_size:
        Tokens per chunk, as :func:`prefill`'s (512 by default for these methods; None: one forward).

    Returns
    -------
    list[PromptRead]
        One per cache, in order.

    Raises
    ------
    InputError
        For no caches, or caches that cannot share prompt chunks (the message says why).
    """
    from kvstack.cache.shared import chunk_route_groups, chunk_share_key

    check_prompt(input_ids, model)
    if not caches:
        raise InputError("prefill_shared_chunks needs at least one cache")
    keys = {chunk_share_key(cache) for cache in caches}
    if None in keys or len(keys) > 1 or any(cache.tokens_seen() for cache in caches):
        raise InputError("prefill_shared_chunks takes empty caches of methods that evict as they read, without a "
                         "codec, asking for the same attention statistics or ones a single attention call computes "
                         "(kvstack.cache.shared.chunk_share_key)")
    if chunk_size is not None and chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    length = input_ids.shape[1]
    reading = _SharedChunkReading(model, input_ids, caches,
                                  chunk_bounds(length, chunk_size, caches[0].method.window_queries()))
    for cache in caches:
        cache.begin_prompt(length)
    num_q_heads = model_geometry(model).num_q_heads
    placements = attention_placements(model)
    sharing = list(range(len(caches)))  # caches that hold every token and read each chunk with others
    for chunk, (chunk_start, chunk_stop) in enumerate(reading.bounds):
        if len(sharing) < 2:
            break
        groups = chunk_route_groups([caches[i] for i in sharing], q_len=chunk_stop - chunk_start,
                                    length=chunk_stop, num_q_heads=num_q_heads, placements=placements)
        still_sharing = []
        for group in ([sharing[j] for j in indices] for indices in groups):
            if len(group) == 1:  # its attention would be computed by another call than the others'
                reading.read_rest_alone(group[0], chunk)
            else:
                still_sharing += reading.read_together(group, chunk)
        sharing = still_sharing
    for i in range(len(caches)):
        if reading.reads[i] is None:
            reading.read_rest_alone(i, reading.chunks_shared[i])
    for cache in caches:
        cache.end_prompt()
    return [read for read in reading.reads if read is not None]


class _SharedChunkReading:
    """The progress of :func:`prefill_shared_chunks`: per cache, time spent, chunks shared, last logits."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, caches: list[KVStackCache],
                 bounds: list[tuple[int, int]]) -> None:
        self.model, self.input_ids, self.caches, self.bounds = model, input_ids, caches, bounds
        self.reads: list[PromptRead | None] = [None] * len(caches)
        self.seconds = [0.0] * len(caches)
        self.chunks_shared = [0] * len(caches)
        self.last_logits: list[torch.Tensor | None] = [None] * len(caches)

    def read_rest_alone(self, i: int, chunk: int) -> None:
        """Cache ``i`` reads chunks ``chunk`` onwards on its own."""
        start = time.perf_counter()
        logits = self.last_logits[i]
        if chunk < len(self.bounds):
            logits = _read_chunks(self.model, self.input_ids, self.caches[i], [self.caches[i]], self.bounds[chunk:])
        synchronize(self.input_ids.device)
        assert logits is not None
        self.reads[i] = PromptRead(logits, self.seconds[i] + time.perf_counter() - start, self.chunks_shared[i],
                                   len(self.bounds))

    def read_together(self, group: list[int], chunk: int) -> list[int]:
        """The caches ``group`` read chunk ``chunk`` in one forward; returns those that may go on sharing (a
        cache that has evicted reads the rest alone)."""
        from kvstack.cache.shared import SharedPrefillCache, chunk_share_key

        members = [self.caches[i] for i in group]
        start = time.perf_counter()
        logits = _read_chunks(self.model, self.input_ids, SharedPrefillCache(members, chunked=True), members,
                              self.bounds[chunk:], limit=1)
        synchronize(self.input_ids.device)
        took = time.perf_counter() - start
        still_sharing = []
        for i in group:
            self.seconds[i] += took
            self.chunks_shared[i] += 1
            self.last_logits[i] = logits
            if chunk_share_key(self.caches[i]) is None:  # evicted: the rest on its own
                self.read_rest_alone(i, chunk + 1)
            else:
                still_sharing.append(i)
        return still_sharing


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels on a CUDA ``device`` (no-op on CPU), so wall clocks are honest."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class GenerationResult:
    """One greedy generation with its timings and the cache's accounting."""

    text: str
    new_token_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    cache: dict[str, float]

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens generated after the first, per second of decoding."""
        steps = max(len(self.new_token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary_line(self) -> str:
        """``kept 512/8192 tokens | 11.8/188.7 MB | prefill 14520 ms | decode 12.3 tok/s``."""
        c = self.cache
        return (
            f"kept {c['tokens_kept']:.0f}/{c['tokens_seen']:.0f} tokens | "
            f"{c['kv_bytes'] / 1e6:.2f}/{c['full_kv_bytes'] / 1e6:.2f} MB held/full | "
            f"prefill {self.prefill_seconds * 1000:.0f} ms | decode {self.decode_tokens_per_second:.2f} tok/s"
        )


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = True) -> torch.Tensor:
    """Tokenise ``prompt`` (through the chat template when the tokenizer has one and ``chat``): ``[1, T]``."""
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty; give some text with --prompt or --prompt-file")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | torch.Tensor,
    method: str | Method = "full",
    *,
    max_new_tokens: int = 64,
    chunk_size: int | str | None = "auto",
    chat: bool = True,
    seed: int = 0,
) -> GenerationResult:
    """Greedy generation with ``method`` applied; times prefill and decoding separately.

    Parameters
    ----------
    prompt:
        Text (chat-templated when ``chat``) or ``[1, T]`` token ids.
    max_new_tokens:
        Upper bound on generated tokens; generation stops early at the end-of-sequence token.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ids = prompt if isinstance(prompt, torch.Tensor) else encode_prompt(tokenizer, prompt, chat)
    device = next(model.parameters()).device
    ids = ids.to(device)
    check_prompt(ids, model, extra_tokens=max_new_tokens)
    cache = make_cache(model, method, seed=seed)
    eos = set(_as_list(getattr(model.generation_config, "eos_token_id", None)))

    start = time.perf_counter()
    logits = prefill(model, ids, cache, chunk_size=chunk_size)
    token = logits.argmax(dim=-1, keepdim=True)
    prefill_seconds = time.perf_counter() - start

    generated = [int(token)]
    start = time.perf_counter()
    while len(generated) < max_new_tokens and generated[-1] not in eos:
        out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(int(token))
    decode_seconds = time.perf_counter() - start
    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationResult(
        text=text,
        new_token_ids=generated,
        prompt_tokens=ids.shape[1],
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        cache=cache.summary(),
    )


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
