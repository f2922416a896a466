"""The store of a layer whose attention caches a latent instead of keys and values (MLA-style models).

A model converted by ``mla`` (:mod:`kvstack.transforms.latent`) hands its cache, per token, a rotary key of
``d`` dimensions per KV head (in the key slot, ``[B, H, q, d]``) and one latent of ``r`` numbers shared by the
KV heads (in the value slot, ``[B, 1, q, r]``), and rebuilds keys and values from everything the store
returns. :class:`LatentLayer` holds exactly those tensors, every token; its bytes are theirs.

With a codec (``mla(...)`` then ``kivi(bits=4)``), the layer encodes them as the codec encodes keys and
values: the rotary keys in the codec's key format, the latents in its value format (a latent is what the
values are rebuilt from, and like a value it is read whole). The codec's sinks and its residual window of
recent tokens stay in full precision; older tokens are encoded in whole chunks after each forward's attention
(which reads its own chunk exactly, as in every kvstack layer), and every forward hands the module the
decoded tokens (a transient copy, as block-wise attention decodes).

The module attends over the keys and values it rebuilds, with a mask over every cached token (as
transformers' ``DynamicLayer``); kvstack's attention function runs that attention as SDPA (or, for a decoding
step, asks the module to attend with its up-projection absorbed) and then tells the layer its forward is done
(:meth:`LatentLayer.finish_forward`).

With an evicting policy (``snapkv``, ``h2o``, ``streamingllm``, ...), the attention function hands the layer
the query and the rebuilt keys and values (:meth:`LatentLayer.attend_rebuilt`): it attends with the
statistics the policy needs, lets the policy observe and score the rebuilt keys, and keeps whole tokens (a
latent is shared by the KV heads, so scores are summed over them); the tokens it drops leave memory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from kvstack.cache.attention_stats import attention_with_stats
from kvstack.cache.layer import forward_plan
from kvstack.cache.owned_layer import OwnedLayer
from kvstack.cache.pending import set_pending, take_pending
from kvstack.cache.quantized import growth_tokens
from kvstack.cache.streams import PackedStream
from kvstack.contract import AttentionStats, CodecSpec, LayerView

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache

__all__ = ["LatentLayer", "latent_codec_refusal", "latent_policy_refusal", "whole_token_scores"]


def latent_codec_refusal(codec: CodecSpec) -> str | None:
    """Why ``codec`` cannot encode a latent layer's rotary keys and latents, or None when it can.

    Plain group-wise integer codes (with sinks, a residual window and sparse outliers) apply to any tensor;
    what needs the key's own geometry (un-rotating RoPE, rotating or smoothing key channels, wider outlier
    channels) or a fitted basis (low-rank streams and residuals) has no meaning on a latent.
    """
    if codec.stream_kind() != "packed":
        return "its low-rank latents are fitted to the model's keys and values, not to an mla latent"
    if codec.pre_rope():
        return "it un-rotates keys before encoding, and an mla latent carries no rotary position"
    if codec.rotation() is not None or codec.smoothing() is not None or codec.key_outlier_channels()[0]:
        return "it rotates, smooths or widens key channels, which an mla latent does not have"
    if codec.residual_rank():
        return "its low-rank residual is fitted per key and value head"
    return None


def latent_policy_refusal(policy: Any, codec: CodecSpec | None) -> str | None:
    """Why ``policy`` cannot evict from a latent layer, or None when it can.

    A latent layer evicts whole tokens (its latent is shared by the KV heads), by the policy's scores of the
    rebuilt keys; what needs per-head storage, merged or demoted entries, pages, layer links, cache positions
    or per-layer budgets from every layer's statistics does not apply to it yet.
    """
    flags = ("headwise", "merges", "sparse_attention", "reads_pages", "cross_layer", "allocates_layers",
             "uses_model_artefact")
    if any(getattr(policy, flag, False) for flag in flags) or policy.layer_state_names or policy.mass_state:
        return "a latent layer evicts whole tokens by score and supports no per-head, merged, paged or linked storage"
    if policy.demotion_codec() is not None or policy.uses_cache_positions():
        return "a latent layer keeps no demoted entries and no in-cache positions"
    return None


def whole_token_scores(scores: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` one score per token from a policy's per-head ``[..., H, N]`` scores, for storage whose
    heads share each token (an mla latent): the sum over the heads (a token's attention from every query head,
    for attention-based scores), and ``inf`` for a token protected (``inf``) on any head."""
    total = scores.clamp(min=torch.finfo(torch.float32).min).sum(-2)
    return total.masked_fill(scores.isposinf().any(-2), float("inf"))


def gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[B, K]`` of ``tensor`` ``[B, H, N]`` or ``[B, H, N, D]``, alike for every head: a new
    tensor, so the storage of the tokens left out is freed."""
    index = index.unsqueeze(1).expand(-1, tensor.shape[1], -1)
    if tensor.dim() == 4:
        index = index.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[3])
    return tensor.gather(2, index)


class LatentLayer(OwnedLayer):
    """Every token's rotary keys ``[B, H, N, d]`` and latents ``[B, 1, N, r]``, in full precision or encoded.

    Token order is sinks (full precision, the codec's first tokens), then the encoded tokens (``encoded``
    of them, in two :class:`~kvstack.cache.streams.PackedStream`), then the recent tokens (full precision,
    ``keys`` and ``values``). Without a codec every token is recent. A policy that evicts while decoding puts
    the oldest recent token in an encoded victim's place (re-encoding its chunk), so encoded tokens need not
    be in arrival order; ``positions`` say where each one is.

    Parameters
    ----------
    heads, head_dim:
        The KV heads and head dimension the rebuilt keys and values have: what an uncompressed cache of the
        same tokens would hold (:meth:`full_kv_bytes`) and how entries are counted.
    codec:
        Encodes the tokens older than its residual window (``latent_codec_refusal(codec)`` must be None).
    """

    def __init__(self, owner: KVStackCache, layer_idx: int, heads: int, head_dim: int,
                 codec: CodecSpec | None = None) -> None:
        super().__init__(owner, layer_idx)
        self.kv_heads, self.kv_head_dim, self.codec = heads, head_dim, codec
        self.keys: torch.Tensor | None = None  # [B, H, n, d] recent rotary keys
        self.values: torch.Tensor | None = None  # [B, 1, n, r] recent latents
        self.sink_keys: torch.Tensor | None = None  # [B, H, s, d]
        self.sink_latents: torch.Tensor | None = None  # [B, 1, s, r]
        self.key_stream: PackedStream | None = None
        self.latent_stream: PackedStream | None = None
        self.encoded = 0  # tokens in the streams
        self.capacity = 0  # tokens the streams have room for
        # with an evicting policy: each held token's true position ([B, 1, N] int32, -1 for padding), the
        # policy's per-entry state ([B, H, N] float32) and the next position of each sequence ([B])
        self.evicts = owner.method.compresses()
        self.positions: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.next_position: torch.Tensor | None = None
        self.compressed = False

    def reset(self) -> None:
        self.__init__(self.owner, self.layer_idx, self.kv_heads, self.kv_head_dim, self.codec)  # type: ignore[misc]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, self.head_dim = key_states.shape[0], self.kv_heads, self.kv_head_dim
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.sink_keys, self.sink_latents = self.keys, self.values
        if self.evicts:
            self.positions = torch.empty((self.batch, 1, 0), dtype=torch.int32, device=self.device)
            self.state = {name: torch.empty((self.batch, self.kv_heads, 0), dtype=torch.float32, device=self.device)
                          for name in self.owner.method.state_names}
            self.next_position = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        if self.codec is not None:
            chunk = self.codec.chunk_tokens()
            fraction = self.codec.outlier_fraction()
            rotary_dims, rank = key_states.shape[3], value_states.shape[3]
            self.key_stream = PackedStream(self.codec.key_format(), self.batch, key_states.shape[1], rotary_dims,
                                           chunk, math.ceil(fraction * chunk * rotary_dims), self.device)
            self.latent_stream = PackedStream(self.codec.value_format(), self.batch, 1, rank, chunk,
                                              math.ceil(fraction * chunk * rank), self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        """Take the chunk's rotary keys ``[B, H, q, d]`` and latents ``[B, 1, q, r]``; return every token's
        (``[B, H, N, d]``, ``[B, 1, N, r]``), the encoded ones decoded."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:  # the last forward's attention never reached this layer: its flush or eviction is lost
            take_pending()  # and no later attention on this thread may take a stale layer
            raise RuntimeError("kvstack cache used without the kvstack attention function; create caches with "
                               "kvstack.make_cache(model, spec), which selects it")
        chunk = key_states.shape[2]
        self.seen += chunk
        if self.codec is not None:
            room = max(0, self.codec.sink_tokens() - self.sink_keys.shape[2])
            if room:
                self.sink_keys = torch.cat((self.sink_keys, key_states[:, :, :room]), dim=2)
                self.sink_latents = torch.cat((self.sink_latents, value_states[:, :, :room]), dim=2)
                key_states, value_states = key_states[:, :, room:], value_states[:, :, room:]
        # concatenation allocates exactly what is held: the byte count has no growth slack to explain
        self.keys = torch.cat((self.keys, key_states), dim=2)
        self.values = torch.cat((self.values, value_states), dim=2)
        if self.evicts:
            for name, tensor in self.state.items():  # a new entry's state starts at zero
                self.state[name] = torch.cat((tensor, tensor.new_zeros(*tensor.shape[:2], chunk)), 2)
            self.pending = True
            set_pending(self)  # the attention function hands this layer the query and the rebuilt keys
            return self.tokens()
        if self.codec is None:
            return self.keys, self.values
        self.pending = True
        set_pending(self)  # the attention function calls finish_forward once the module has attended
        return self.tokens()

    attends_rebuilt = True  # the attention function attends over the module's rebuilt keys and values

    def finish_forward(self, query_length: int) -> None:
        """After this forward's attention, which read its own chunk exactly: encode what left the window (as a
        codec's flush follows attention in every kvstack layer); at the end of a prompt, drop spare chunks."""
        self.pending = False
        if self.codec is None:
            return
        self._flush()
        if query_length > 1 and not self.owner.more_prompt_follows:
            self.shrink_to_fit()

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's rotary keys ``[B, H, N, d]`` and latents ``[B, 1, N, r]``, the encoded ones decoded
        (a transient copy; without a codec, the tensors held)."""
        if self.codec is None:
            return self.keys, self.values
        parts = [(self.sink_keys, self.sink_latents)]
        if self.encoded:
            parts.append((self.key_stream.decode(0, self.encoded, self.dtype),
                          self.latent_stream.decode(0, self.encoded, self.dtype)))
        parts.append((self.keys, self.values))
        return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)

    def attend_rebuilt(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                       scaling: float) -> torch.Tensor:
        """Attention of ``query`` ``[B, Hq, q, D]`` over the keys and values ``[B, H, N, D]`` the module rebuilt
        from every held token (this chunk's last), with the statistics the policy needs; then the policy
        observes and, when due, evicts. Returns ``[B, q, Hq, D]``.

        The latent is shared by the KV heads, so a token is kept or evicted for all of them: the policy's
        ``[B, H, N]`` scores are summed over the heads (for attention-based scores, the token's attention
        from every query head) and the top ``budget`` tokens stay.
        """
        method = self.owner.method
        causal, valid, chunk_positions = self.start_attention(query, attention_mask, position_ids, None)
        q_len = query.shape[2]
        self.positions = torch.cat((self.positions, chunk_positions.unsqueeze(1)), dim=2)
        self.next_position = torch.maximum(self.next_position, chunk_positions.max(dim=-1).values.long() + 1)
        compress_now, needs = forward_plan(method, self.compressed, self.owner.more_prompt_follows, self.seen, q_len)
        past_valid = None
        if self.has_padding:
            past_valid = (self.positions[:, :, : self.positions.shape[2] - q_len] >= 0).expand(-1, self.kv_heads, -1)
        output, stats = attention_with_stats(query, keys, values, causal, past_valid, scaling, needs,
                                             method.window_queries(), query_valid=valid)
        if method.state_names:
            method.observe(self._view(stats, keys, values, budget=0))  # updates the state tensors in place
        if compress_now:
            self._evict(self._view(stats, keys, values, budget=0))
        if self.codec is not None and self.compressed:  # nothing is encoded before the prompt's one eviction
            self.finish_forward(q_len)
        return output

    def _view(self, stats: AttentionStats, keys: torch.Tensor, values: torch.Tensor, budget: int) -> LayerView:
        """What the policy sees: the rebuilt ``keys`` and ``values`` ``[B, H, N, D]``, each token's position on
        every head, the per-entry state and this forward's statistics."""
        return LayerView(
            kv_source=lambda: (keys, values), positions=self.positions.expand(-1, self.kv_heads, -1),
            next_position=self.next_position, state=self.state, stats=stats, layer_idx=self.layer_idx,
            num_layers=self.owner.num_layers, generator=self.owner.generator, group_size=self.owner.group_size,
            budget=budget, layer_state={},
        )

    def _evict(self, view: LayerView) -> None:
        """Keep the ``budget`` tokens with the highest scores summed over the KV heads; the rest leave memory."""
        method = self.owner.method
        budget = self.owner.layer_budget(self.layer_idx, self.owner.context_length or self.seen)
        self.compressed = True
        held = self.positions.shape[2]
        if budget is None or held <= budget:
            return
        view.budget = budget
        scores = method.score(view).float()
        protect = method.protect(view)
        if protect is not None:
            scores = scores.masked_fill(protect, float("inf"))
        # padding: never kept over a real token
        total = whole_token_scores(scores).masked_fill(self.positions[:, 0] < 0, float("-inf"))  # [B, N]
        keep = total.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values  # [B, K]
        if self.codec is not None and self.encoded:  # a policy evicting while decoding reaches encoded tokens
            leaving = torch.ones_like(total, dtype=torch.bool).scatter_(1, keep, False)
            victims = leaving.nonzero()[:, 1].view(self.batch, held - budget)  # [B, held - budget] ascending
            if victims.shape[1] == 1 and bool((victims >= self.sink_keys.shape[2]).all()):
                self._replace_one(victims[:, 0])
                return
            self._unflush()  # many leave at once (a prompt chunk): decode, evict as below, encode again
        if self.codec is not None:  # nothing is encoded now: the sinks rejoin the others
            self.keys = torch.cat((self.sink_keys, self.keys), dim=2)
            self.values = torch.cat((self.sink_latents, self.values), dim=2)

        self.keys, self.values = gather_tokens(self.keys, keep), gather_tokens(self.values, keep)
        self.positions = gather_tokens(self.positions, keep)
        self.state = {name: gather_tokens(tensor, keep) for name, tensor in self.state.items()}
        if self.codec is not None:  # the codec's sinks are the first tokens kept
            sinks = min(self.codec.sink_tokens(), budget)
            self.sink_keys, self.keys = self.keys[:, :, :sinks].clone(), self.keys[:, :, sinks:].clone()
            self.sink_latents, self.values = self.values[:, :, :sinks].clone(), self.values[:, :, sinks:].clone()

    def _replace_one(self, victims: torch.Tensor) -> None:
        """Evict one token per sequence (``victims`` ``[B]`` indices over sinks, encoded and recent tokens, none
        a sink). A sequence whose victim is encoded puts its oldest recent token in the victim's place,
        re-encoding that chunk (its other tokens keep their values up to one more rounding where a group's
        range changes); every sequence then drops one recent token, so all keep the same counts."""
        sinks, chunk = self.sink_keys.shape[2], self.codec.chunk_tokens()
        first_recent = sinks + self.encoded
        leaving = victims - first_recent  # [B] index among the recent tokens
        for b, victim in enumerate(victims.tolist()):
            if victim >= first_recent:
                continue
            slot = victim - sinks
            start = slot // chunk * chunk
            for stream, recent in ((self.key_stream, self.keys), (self.latent_stream, self.values)):
                for h in range(stream.heads):
                    rows = stream.decode_head(b, h, start, start + chunk, torch.float32)
                    rows[slot - start] = recent[b, h, 0].float()
                    stream.encode_head(b, h, rows, start)
            self.positions[b, :, victim] = self.positions[b, :, first_recent]
            for tensor in self.state.values():
                tensor[b, :, victim] = tensor[b, :, first_recent]
            leaving[b] = 0
        recent = self.keys.shape[2]
        stays = torch.ones(self.batch, recent, dtype=torch.bool, device=self.device)
        stays[torch.arange(self.batch), leaving] = False
        kept = stays.nonzero()[:, 1].view(self.batch, recent - 1)  # [B, n - 1]
        kept_all = torch.cat((torch.arange(first_recent, device=self.device).expand(self.batch, -1),
                              kept + first_recent), dim=-1)  # [B, N - 1] over every held token
        self.keys, self.values = gather_tokens(self.keys, kept), gather_tokens(self.values, kept)
        self.positions = gather_tokens(self.positions, kept_all)
        self.state = {name: gather_tokens(tensor, kept_all) for name, tensor in self.state.items()}

    def _unflush(self) -> None:
        """Decode every encoded token back in front of the recent ones (before a many-token eviction)."""
        self.keys = torch.cat((self.key_stream.decode(0, self.encoded, self.dtype), self.keys), dim=2)
        self.values = torch.cat((self.latent_stream.decode(0, self.encoded, self.dtype), self.values), dim=2)
        self.encoded = 0

    def _flush(self) -> None:
        """Encode the recent tokens older than the codec's residual window, in whole chunks."""
        chunk = self.codec.chunk_tokens()
        count = (self.keys.shape[2] - self.codec.residual_tokens()) // chunk * chunk
        if count <= 0:
            return
        needed = self.encoded + count
        if needed > self.capacity:
            self.capacity = needed + growth_tokens(needed, chunk)
            self.key_stream.resize(self.capacity, self.encoded)
            self.latent_stream.resize(self.capacity, self.encoded)
        self.key_stream.encode(self.keys[:, :, :count], self.encoded)
        self.latent_stream.encode(self.values[:, :, :count], self.encoded)
        self.encoded = needed
        # copies, so the flushed tokens' full-precision storage is freed, not kept alive under a view
        self.keys, self.values = self.keys[:, :, count:].clone(), self.values[:, :, count:].clone()

    def shrink_to_fit(self) -> None:
        """Drop the streams' spare chunks (as at the end of a prompt)."""
        if self.key_stream is not None and self.capacity > self.encoded:
            self.capacity = self.encoded
            self.key_stream.resize(self.capacity, self.encoded)
            self.latent_stream.resize(self.capacity, self.encoded)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Without eviction the mask covers every cached token and the new chunk (the attention module reads
        them all); with eviction it covers the chunk, and held tokens are masked by their positions."""
        if self.evicts:
            return super().get_mask_sizes(query_length)
        return self.seen + query_length, 0

    def kv_bytes(self) -> int:
        """Bytes held: full-precision sinks and recent tokens, the streams' codes, scales, zeros and outliers."""
        if not self.is_initialized:
            return 0
        held = sum(t.nbytes for t in (self.keys, self.values, self.sink_keys, self.sink_latents))
        if self.evicts:
            held += self.positions.nbytes + self.next_position.nbytes + sum(t.nbytes for t in self.state.values())
        if self.key_stream is not None:
            held += self.key_stream.nbytes() + self.latent_stream.nbytes()
        return held

    def kept_entries(self) -> int:
        """Tokens held, counted per sequence and KV head as for any other layer."""
        if not self.is_initialized:
            return 0
        held = self.positions.shape[2] if self.evicts else self.seen
        return held * self.batch * self.kv_heads
