"""Latent (MLA-style) KV caching (taxonomy §2, TransMLA / MHA2MLA): keys and values through one low-rank latent.

``mla(rank=r, rope_dims=d)`` converts every layer's attention so that its cache holds, per token, a latent of
``r`` numbers shared by all KV heads and a small rotary key of ``d`` dimensions per KV head; a prompt's attention
rebuilds the keys and values from the latent (an up-projection), and a decoding step absorbs the up-projection
into its query and output instead, so nothing else is cached and nothing is rebuilt per step.

Two steps per layer, both training-free (``+ repair()`` fits the new projections afterwards):

* **Partial RoPE** (MHA2MLA). RoPE is kept on ``d / 2`` rotary frequency pairs per KV head and removed from
  the others, whose key dimensions then no longer depend on the position and can go into the latent. Which
  pairs stay is ``keep``: ``'norm'`` the pairs whose query and key norms contribute most to the scores
  (MHA2MLA's 2-norm rule, ``sqrt(E|q_f|^2 E|k_f|^2)`` on calibration text, queries averaged over the KV
  head's group), ``'high'`` the fastest-rotating pairs, or ``'cost'`` (the default) the 2-norm weighted by how
  far the pair rotates over :data:`ROTATION_SPAN` tokens, ``mean_t (1 - cos(theta_f t))``: a slowly rotating
  pair loses almost nothing without RoPE, whatever its norm.
* **Joint low rank** (TransMLA / MHA2MLA's joint SVD). The position-free key rows of every KV head and all
  the value rows are stacked (``[H (2D - d), h]``), each half scaled to the same activation-weighted norm
  (so that neither dominates), and approximated at rank ``r`` by an SVD weighted by the layer inputs' second
  moment: ``kv_down`` ``[r, h]`` makes the latent, ``kv_up`` ``[H (2D - d), r]`` rebuilds keys and values.

The query projection's rows are permuted per head to ``[position-free dims; rotary dims]`` in the same order
as the rebuilt keys (scores are unchanged by a shared permutation). The cache receives the rotary keys
``[B, H, T, d]`` in the key slot and the latents ``[B, 1, T, r]`` in the value slot: transformers'
``DynamicCache`` stores them as they are, and ``make_cache`` (seeing ``config.kvstack_latent_kv``) gives
every layer a latent store that counts exactly those bytes. The model is not a plain checkpoint: the new
attention modules exist only in kvstack (:mod:`kvstack.transforms.checkpoint` saves and loads it).

Shapes: ``B`` sequences, ``T`` tokens, ``H`` KV heads, ``Hq`` query heads, ``D`` head dimension, ``d`` rotary
dimensions per KV head, ``r`` latent rank, ``h`` hidden size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

from kvstack.lazy_import import lazy_module
from kvstack.spec import SpecError, register
from kvstack.transforms.base import (
    AttentionInputs,
    Transform,
    TransformError,
    adopt_attention_settings,
    attention_layers,
)
from kvstack.transforms.grouping import augmented_weight, root_and_inverse
from kvstack.transforms.sharing import shared_layers

torch = lazy_module("torch")

__all__ = ["MLA", "latent_geometry", "restore_latent"]

KEEPS = ("cost", "norm", "high")
ROTATION_SPAN = 2048  # tokens over which 'cost' averages how far a rotary pair turns


def latent_geometry(config: Any) -> dict[str, int] | None:
    """``{"rank": r, "rope_dims": d}`` of a model transformed by ``mla`` (None for any other model)."""
    latent = getattr(config, "kvstack_latent_kv", None)
    return {"rank": int(latent["rank"]), "rope_dims": int(latent["rope_dims"])} if latent else None


@register(
    "mla",
    category="model/latent",
    description=(
        "Model transform (kvstack.transform): keys and values through one rank-`rank` latent per token, plus "
        "`rope_dims` rotary key dimensions per KV head (partial RoPE, joint SVD; TransMLA / MHA2MLA)."
    ),
)
@dataclasses.dataclass
class MLA(Transform):
    """Cache a latent instead of keys and values (see the module docstring).

    Parameters
    ----------
    rank:
        Latent size ``r`` per token and layer, shared by every KV head's key and value.
    rope_dims:
        Rotary key dimensions ``d`` kept per KV head (even, at most the head dimension).
    keep:
        Which rotary pairs keep RoPE: ``'cost'``, ``'norm'`` or ``'high'``.
    tokens:
        Calibration tokens read (input second moments for the SVD and the pair choice).
    """

    rank: int = 96
    rope_dims: int = 16
    keep: str = "cost"
    tokens: int = 2048

    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SpecError(f"rank must be a positive latent size, got {self.rank!r}")
        if (isinstance(self.rope_dims, bool) or not isinstance(self.rope_dims, int) or self.rope_dims < 2
                or self.rope_dims % 2):
            raise SpecError(f"rope_dims must be an even number of rotary dimensions, at least 2, got "
                            f"{self.rope_dims!r}")
        if self.keep not in KEEPS:
            raise SpecError(f"keep must be one of {', '.join(map(repr, KEEPS))}, got {self.keep!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise SpecError(f"tokens must be a positive number of calibration tokens, got {self.tokens!r}")

    def check(self, model: Any) -> None:
        """Refuse a rank or rotary size the model's geometry cannot take, or a model already converted."""
        config = model.config
        if latent_geometry(config):
            raise TransformError("this model already caches latents (mla); apply mla once")
        if shared_layers(config):
            raise TransformError("mla cannot follow cla (its sharing layers have no K/V projections); apply mla "
                                 "alone")
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if self.rope_dims > head_dim:
            raise TransformError(f"rope_dims={self.rope_dims} is above the head dimension {head_dim}; choose an even "
                                 f"number from 2 to {head_dim}")
        factored = heads * (2 * head_dim - self.rope_dims)  # position-free key rows and value rows
        full = 2 * heads * head_dim
        limit = min(factored, full - heads * self.rope_dims - 1)  # a latent that saves at least one number
        if self.rank > limit:
            raise TransformError(f"rank={self.rank} is too large: a layer caches {full} numbers per token ({heads} KV "
                                 f"heads x {head_dim} dims x 2), so with rope_dims={self.rope_dims} the latent must "
                                 f"be 1 to {limit}")

    def apply(self, model: Any, inputs: AttentionInputs | None) -> dict[str, Any]:
        modules = attention_layers(model)
        self.check(model)
        config = model.config
        heads, queries = config.num_key_value_heads, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // queries
        inverse_frequencies = _inverse_frequencies(model, head_dim)
        layers = model.model.layers
        kept, errors = [], []
        for index, module in enumerate(modules):
            covariance = inputs.covariance(index) if inputs is not None else None
            pairs = self._rotary_pairs(module, heads, head_dim, queries // heads, covariance, inverse_frequencies)
            new, error = _latent_attention(module, pairs, self.rank, heads, head_dim, covariance)
            layers[index].self_attn = new
            kept.append(pairs.tolist())
            errors.append(error)
        config.kvstack_latent_kv = {"rank": self.rank, "rope_dims": self.rope_dims}
        names = ["q_proj", "k_rope_proj", "kv_down", "kv_up"]
        return {"rank": self.rank, "rope_dims": self.rope_dims, "keep": self.keep, "rotary_pairs": kept,
                "latent_error": errors, "calibration_tokens": inputs.tokens if inputs is not None else 0,
                "changed": {index: names for index in range(len(modules))}}

    def _rotary_pairs(self, module: Any, heads: int, head_dim: int, group: int, covariance: Any,
                      inverse_frequencies: Any) -> Any:
        """``[H, d / 2]`` sorted frequency indices (``0 .. D/2 - 1``) of the rotary pairs each KV head keeps."""
        half, count = head_dim // 2, self.rope_dims // 2
        if self.keep == "high":  # pair f turns at inverse_frequencies[f], fastest first
            order = torch.argsort(inverse_frequencies, descending=True)[:count]
            return order.sort().values.expand(heads, -1).clone()
        keys = _pair_energy(augmented_weight(module.k_proj).view(heads, head_dim, -1), covariance)  # [H, D/2]
        query_rows = augmented_weight(module.q_proj).view(heads * group, head_dim, -1)
        query_energy = _pair_energy(query_rows, covariance).view(heads, group, half).mean(1)
        score = (keys * query_energy).sqrt()
        if self.keep == "cost":
            score = score * rotation_fraction(inverse_frequencies)
        return torch.topk(score, count, dim=1).indices.sort(dim=1).values


def _inverse_frequencies(model: Any, head_dim: int) -> Any:
    """``[D/2]`` RoPE inverse frequencies of the model's rotary embedding."""
    for module in model.modules():
        frequencies = getattr(module, "inv_freq", None)
        if frequencies is not None and frequencies.numel() == head_dim // 2:
            return frequencies.detach().double().cpu()
    raise TransformError("mla needs the model's RoPE inverse frequencies (a rotary embedding with inv_freq)")


def _pair_energy(rows: Any, covariance: Any) -> Any:
    """``[N, D/2]`` mean squared norm of each rotary pair ``(f, f + D/2)`` of ``rows`` ``[N, D, h + 1]`` over the
    inputs (``covariance`` ``[h + 1, h + 1]``; plain weight norms without one)."""
    if covariance is None:
        energy = rows.pow(2).sum(-1)
    else:
        energy = torch.einsum("ndh,hk,ndk->nd", rows, covariance, rows)
    half = rows.shape[1] // 2
    return energy[:, :half] + energy[:, half:]


def _latent_attention(module: Any, pairs: Any, rank: int, heads: int, head_dim: int,
                      covariance: Any) -> tuple[Any, float]:
    """The latent attention replacing ``module`` (rotary pairs ``[H, d/2]`` per KV head), and the relative
    activation-weighted error of its rank-``r`` keys and values."""
    half = head_dim // 2
    group = module.q_proj.out_features // (heads * head_dim)
    rotary = torch.cat((pairs, pairs + half), dim=1)  # [H, d]: dims in rotate_half layout
    free = torch.stack([torch.tensor([dim for dim in range(head_dim) if dim not in set(row.tolist())], dtype=torch.long)
                        for row in rotary])  # [H, D - d]
    keys = augmented_weight(module.k_proj).view(heads, head_dim, -1)
    values = augmented_weight(module.v_proj).view(heads * head_dim, -1)
    position_free = torch.cat([keys[h, free[h]] for h in range(heads)])  # [H (D - d), h + 1]
    rotary_keys = torch.cat([keys[h, rotary[h]] for h in range(heads)])  # [H d, h + 1]
    if covariance is None:
        covariance = torch.eye(keys.shape[-1], dtype=torch.float64)
    root, inverse_root = root_and_inverse(covariance)
    key_norm = float((position_free @ root).norm()) or 1.0
    value_norm = float((values @ root).norm()) or 1.0
    stacked = torch.cat((position_free / key_norm, values / value_norm)) @ root
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    down = vh[:rank] @ inverse_root  # [r, h + 1]
    up = u[:, :rank] * s[:rank]  # [H (2D - d), r], balanced
    error = float(s[rank:].pow(2).sum() / s.pow(2).sum())
    split = position_free.shape[0]
    up[:split] *= key_norm
    up[split:] *= value_norm
    order = torch.cat((free, rotary), dim=1)  # [H, D]: each KV head's query dims, position-free first
    query = augmented_weight(module.q_proj).view(heads, group, head_dim, -1)
    query = torch.stack([query[h][:, order[h]] for h in range(heads)]).reshape(heads * group * head_dim, -1)
    return _module_class()(module, query, rotary_keys, down, up, pairs), error


def restore_latent(model: Any) -> None:
    """Give a model built from an ``mla`` model's config its latent attention modules, of the shapes the config
    names, for a state dict to fill (the rotary pairs are buffers in it). No-op for any other model."""
    geometry = latent_geometry(model.config)
    if geometry is None:
        return
    config = model.config
    heads, rank, rope_dims = config.num_key_value_heads, geometry["rank"], geometry["rope_dims"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for index, module in enumerate(attention_layers(model)):
        like = module.q_proj.weight
        inputs = like.shape[1] + 1  # augmented: the last column is the bias
        pairs = torch.zeros(heads, rope_dims // 2, dtype=torch.long, device=like.device)
        model.model.layers[index].self_attn = _module_class()(
            module, like.new_zeros(module.q_proj.out_features, inputs), like.new_zeros(heads * rope_dims, inputs),
            like.new_zeros(rank, inputs), like.new_zeros(heads * (2 * head_dim - rope_dims), rank), pairs)


def _linear(augmented: Any, bias: bool, like: Any) -> Any:
    """An ``nn.Linear`` holding ``augmented`` ``[out, in + 1]`` (the last column is the bias, kept if ``bias``)."""
    layer = torch.nn.Linear(augmented.shape[1] - 1, augmented.shape[0], bias=bias, device=like.device,
                            dtype=like.dtype)
    with torch.no_grad():
        layer.weight.copy_(augmented[:, :-1])
        if bias:
            layer.bias.copy_(augmented[:, -1])
    return layer


# attention implementations kvstack registers (kvstack.attention, kvstack.engine.runner), named here because a
# transform imports neither: the cache's function takes the latents themselves, the engine's its own path
KVSTACK_ATTENTION = "kvstack"
PAGED_ATTENTION = "kvstack_paged"


@functools.cache
def _module_class() -> type:
    """``LatentAttention``, defined on first use so that importing transforms imports no torch."""
    from transformers.models.llama.modeling_llama import rotate_half

    class LatentAttention(torch.nn.Module):
        """An attention whose cache holds a latent and a rotary key per token; keys and values are rebuilt.

        Parameters: ``q_proj`` (rows permuted, see the module docstring), ``k_rope_proj`` ``[H d, h]``,
        ``kv_down`` ``[r, h]``, ``kv_up`` ``[H (2D - d), r]`` and the original ``o_proj``; the buffer
        ``rotary_index`` ``[Hq, d]`` names the frequency of each query head's rotary dims (its KV head's).
        """

        def __init__(self, original: Any, query: Any, rotary_keys: Any, down: Any, up: Any, pairs: Any) -> None:
            super().__init__()
            weight = original.q_proj.weight
            bias = original.k_proj.bias is not None
            adopt_attention_settings(self, original)
            self.kv_heads = pairs.shape[0]
            self.rope_dims = 2 * pairs.shape[1]
            self.rank = down.shape[0]
            self.q_proj = _linear(query, original.q_proj.bias is not None, weight)
            self.k_rope_proj = _linear(rotary_keys, bias, weight)
            # a bias even for a bias-free model: the weighted SVD's best rank-r map has an affine part
            self.kv_down = _linear(down, True, weight)
            self.kv_up = _linear(torch.cat((up, up.new_zeros(up.shape[0], 1)), dim=1), False, weight)
            self.o_proj = original.o_proj
            per_kv_head = torch.cat((pairs, pairs), dim=1)  # [H, d]: cos/sin of pair f sit at f and f + D/2
            # in the state dict: a saved model rebuilt by another calibration still rotates the pairs it was fitted on
            self.register_buffer("rotary_index", per_kv_head.repeat_interleave(self.num_key_value_groups, 0))
            self.register_buffer("key_rotary_index", per_kv_head)
            # decoding steps attend with the up-projection absorbed (False: rebuild the context, as prefill does)
            self.absorb_decoding = True

        def rebuild(self, rotary_keys: Any, latents: Any) -> tuple[Any, Any]:
            """Keys and values ``[B, H, N, D]`` each (position-free dims first, then the rotary ones, as the
            query's) from the cached rotary keys ``[B, H, N, d]`` and latents ``[B, 1, N, r]``."""
            batch, free = latents.shape[0], self.head_dim - self.rope_dims
            rebuilt = self.kv_up(latents[:, 0])  # [B, N, H (2D - d)]
            tokens = rebuilt.shape[1]
            split = self.kv_heads * free
            keys = torch.cat((rebuilt[..., :split].view(batch, tokens, self.kv_heads, free).transpose(1, 2),
                              rotary_keys), dim=-1)
            values = rebuilt[..., split:].view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            return keys, values

        def attend_absorbed(self, query: Any, rotary_keys: Any, latents: Any, attention_mask: Any,
                            scaling: float) -> Any:
            """``[B, q, Hq, D]`` attention of ``query`` ``[B, Hq, q, D]`` (position-free dims, then rotary) over the
            cached rotary keys ``[B, H, N, d]`` and latents ``[B, 1, N, r]``, with ``kv_up`` absorbed: the query's
            position-free part is mapped into the latent space (``W_k^T q``) and the probabilities weight the
            latents before ``W_v`` maps them back, so no key or value of the context is rebuilt. For a few
            queries over a long context this reads ``r + d`` numbers per token and query head instead of
            rebuilding ``H (2D - d)`` per token. ``attention_mask``: ``[B, 1, q, N]`` bool (True attends) or
            additive float, or None (every token)."""
            batch, _, length, _ = query.shape
            heads, free = self.kv_heads, self.head_dim - self.rope_dims
            group = query.shape[1] // heads
            weight = self.kv_up.weight  # [H (2D - d), r]
            key_up = weight[: heads * free].view(heads, free, -1)  # [H, free, r]
            value_up = weight[heads * free :].view(heads, self.head_dim, -1)  # [H, D, r]
            grouped = query.view(batch, heads, group * length, self.head_dim)  # query head h G + g reads KV head h
            absorbed = torch.einsum("bhnf,hfr->bhnr", grouped[..., :free], key_up)  # [B, H, G q, r]
            # the latent is one per token for every head: the heads fold into one matmul, nothing is broadcast
            rows = heads * group * length
            scores = torch.bmm(absorbed.reshape(batch, rows, -1), latents[:, 0].transpose(1, 2))
            scores = scores.view(batch, heads, group * length, -1) + grouped[..., free:] @ rotary_keys.transpose(-1, -2)
            scores = (scores.float() * scaling).view(batch, heads, group, length, -1)  # [B, H, G, q, N]
            if attention_mask is not None:
                mask = attention_mask[:, :, None]  # [B, 1, 1, q, N]
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            weights = scores.softmax(dim=-1).to(latents.dtype).view(batch, rows, -1)
            mixed = torch.bmm(weights, latents[:, 0]).view(batch, heads, group * length, -1)  # [B, H, G q, r]
            output = torch.einsum("bhnr,hdr->bhnd", mixed, value_up)  # [B, H, G q, D]
            return output.reshape(batch, heads * group, length, self.head_dim).transpose(1, 2)

        def forward(self, hidden_states: Any, position_embeddings: tuple[Any, Any] | None = None,
                    attention_mask: Any = None, cache: Any = None, **kwargs: Any) -> tuple[Any, Any]:
            """``hidden_states`` ``[B, T, h]`` -> (``[B, T, h]``, attention weights or None), as
            ``LlamaAttention``; the cache (if any) receives ``([B, H, T, d], [B, 1, T, r])``."""
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            from transformers.models.llama.modeling_llama import eager_attention_forward

            if cache is None:
                cache = kwargs.pop("past_key_values", None)
            batch, length, _ = hidden_states.shape
            free = self.head_dim - self.rope_dims
            query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
            rotary_keys = self.k_rope_proj(hidden_states).view(batch, length, self.kv_heads, self.rope_dims)
            latents = self.kv_down(hidden_states).unsqueeze(1)  # [B, 1, T, r]
            cos, sin = position_embeddings  # [B, T, D]
            query_rotary = _rotate(query[..., free:], cos, sin, self.rotary_index)
            rotary_keys = _rotate(rotary_keys.transpose(1, 2), cos, sin, self.key_rotary_index)
            if cache is not None:
                rotary_keys, latents = cache.update(rotary_keys, latents, self.layer_idx)
            query = torch.cat((query[..., :free], query_rotary), dim=-1)
            implementation = self.config._attn_implementation
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
            if length == 1 and self.absorb_decoding and implementation != PAGED_ATTENTION:
                # a decoding step reads the latents with the up-projection absorbed instead of rebuilding the
                # context; kvstack's attention function keeps its cache's handshake and asks this module
                if implementation == KVSTACK_ATTENTION:
                    output, weights = attention_interface(self, query, rotary_keys, latents, attention_mask,
                                                          dropout=0.0, scaling=self.scaling, latents_given=True,
                                                          **kwargs)
                else:
                    output, weights = self.attend_absorbed(query, rotary_keys, latents, attention_mask,
                                                           self.scaling), None
            else:
                keys, values = self.rebuild(rotary_keys, latents)
                output, weights = attention_interface(self, query, keys, values, attention_mask, dropout=0.0,
                                                      scaling=self.scaling, **kwargs)
            return self.o_proj(output.reshape(batch, length, -1).contiguous()), weights

    def _rotate(states: Any, cos: Any, sin: Any, index: Any) -> Any:
        """RoPE on ``states`` ``[B, N, T, d]`` whose dims are the pairs ``index`` ``[N, d]`` names."""
        cos = cos[:, :, index].transpose(1, 2)  # [B, T, N, d] -> [B, N, T, d]
        sin = sin[:, :, index].transpose(1, 2)
        return states * cos + rotate_half(states) * sin

    return LatentAttention


def rotation_fraction(inverse_frequencies: Any, span: int = ROTATION_SPAN) -> Any:
    """``[D/2]`` ``mean_t (1 - cos(theta_f t))`` over ``t < span``: how far each rotary pair turns (0: never)."""
    angles = inverse_frequencies.double()[:, None] * torch.arange(span, dtype=torch.float64)
    return (1 - torch.cos(angles)).mean(1)

