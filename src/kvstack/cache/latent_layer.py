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
transformers' ``DynamicLayer``); kvstack's attention function runs that attention as SDPA and then tells the
layer its forward is done (:meth:`LatentLayer.finish_forward`). No eviction applies (``make_cache`` refuses
it for such a model).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from kvstack.cache.owned_layer import OwnedLayer
from kvstack.cache.pending import set_pending
from kvstack.cache.quantized import growth_tokens
from kvstack.cache.streams import PackedStream
from kvstack.contract import CodecSpec

if TYPE_CHECKING:
    from kvstack.cache.cache import KVStackCache

__all__ = ["LatentLayer", "latent_codec_refusal"]


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


class LatentLayer(OwnedLayer):
    """Every token's rotary keys ``[B, H, N, d]`` and latents ``[B, 1, N, r]``, in full precision or encoded.

    Token order is sinks (full precision, the codec's first tokens), then the encoded tokens (``encoded``
    of them, in two :class:`~kvstack.cache.streams.PackedStream`), then the recent tokens (full precision,
    ``keys`` and ``values``). Without a codec every token is recent.

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

    def reset(self) -> None:
        self.__init__(self.owner, self.layer_idx, self.kv_heads, self.kv_head_dim, self.codec)  # type: ignore[misc]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, self.head_dim = key_states.shape[0], self.kv_heads, self.kv_head_dim
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.sink_keys, self.sink_latents = self.keys, self.values
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
        self.seen += key_states.shape[2]
        if self.codec is not None:
            room = max(0, self.codec.sink_tokens() - self.sink_keys.shape[2])
            if room:
                self.sink_keys = torch.cat((self.sink_keys, key_states[:, :, :room]), dim=2)
                self.sink_latents = torch.cat((self.sink_latents, value_states[:, :, :room]), dim=2)
                key_states, value_states = key_states[:, :, room:], value_states[:, :, room:]
        # concatenation allocates exactly what is held: the byte count has no growth slack to explain
        self.keys = torch.cat((self.keys, key_states), dim=2)
        self.values = torch.cat((self.values, value_states), dim=2)
        if self.codec is None:
            return self.keys, self.values
        set_pending(self)  # the attention function calls finish_forward once the module has attended
        return self.tokens()

    attends_rebuilt = True  # the attention function attends over the module's rebuilt keys and values

    def finish_forward(self, query_length: int) -> None:
        """After this forward's attention, which read its own chunk exactly: encode what left the window (as a
        codec's flush follows attention in every kvstack layer); at the end of a prompt, drop spare chunks."""
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
        """The mask covers every cached token and the new chunk (the attention module reads them all)."""
        return self.seen + query_length, 0

    def kv_bytes(self) -> int:
        """Bytes held: full-precision sinks and recent tokens, the streams' codes, scales, zeros and outliers."""
        if not self.is_initialized:
            return 0
        held = sum(t.nbytes for t in (self.keys, self.values, self.sink_keys, self.sink_latents))
        if self.key_stream is not None:
            held += self.key_stream.nbytes() + self.latent_stream.nbytes()
        return held

    def kept_entries(self) -> int:
        """Tokens held, counted per sequence and KV head as for any other layer."""
        return self.seen * self.batch * self.kv_heads if self.is_initialized else 0
