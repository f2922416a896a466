"""Fewer KV heads (taxonomy §2, attention grouping): convert a model's ``H`` KV heads per layer to ``H'``.

``gqa(kv_heads=H', how=...)`` merges groups of ``r = H / H'`` KV heads into one:

* ``how='mean'``: adjacent KV heads, key and value projections mean-pooled (the GQA paper's conversion,
  Ainslie et al., 2023).
* ``how='similarity'``: which KV heads share a group is chosen on calibration prose (the heads whose keys and
  values are most alike, by the cosine similarity of their outputs computed from each layer's input second
  moment), then mean-pooled. The query heads are permuted so each new group's query heads are contiguous
  (``q_proj`` rows and ``o_proj`` columns move together, so the output does not change by the permutation).
* ``how='svd'``: grouped as by similarity, then merged by an activation-aware SVD whose per-head factors are
  absorbed exactly into the queries and the output projection. Values: the stacked ``[r D, h]`` value
  projection is approximated at rank ``D`` (weighted by the inputs' second moment); each old head's ``[D, D]``
  factor is folded into its query heads' ``o_proj`` columns. Keys: RoPE only commutes with a complex scalar
  per rotary pair, so each pair's stacked ``[r, h]`` complex projection is approximated at rank 1 and each old
  head's complex factor is folded into its query heads' ``q_proj`` rows (``conj(c) q``): attention scores
  are then exactly those of the approximated keys. A group whose heads are such multiples of one another
  converts without any change of output.

The result is an ordinary checkpoint of the same architecture with ``num_key_value_heads = H'``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from kvstack.lazy_import import lazy_module
from kvstack.spec import SpecError, register
from kvstack.transforms.base import AttentionInputs, Transform, TransformError, attention_layers

torch = lazy_module("torch")

HOWS = ("mean", "similarity", "svd")
RIDGE = 1e-6  # relative ridge on the inputs' second moment before its inverse square root


@register(
    "gqa",
    category="model/grouping",
    description=(
        "Model transform (kvstack.transform): KV heads merged into `kv_heads` per layer, by mean-pooling, "
        "calibrated similarity grouping, or an SVD absorbed into the queries and output."
    ),
)
@dataclasses.dataclass
class GQA(Transform):
    """Convert a model to ``kv_heads`` KV heads per layer (see the module docstring).

    Parameters
    ----------
    kv_heads:
        KV heads per layer after the conversion; must divide the model's KV heads (1 is MQA).
    how:
        ``'mean'``, ``'similarity'`` or ``'svd'``.
    tokens:
        Calibration tokens read for ``'similarity'`` and ``'svd'``.
    """

    kv_heads: int = 1
    how: str = "mean"
    tokens: int = 2048

    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
            raise SpecError(f"kv_heads must be a positive number of KV heads, got {self.kv_heads!r}")
        if self.how not in HOWS:
            raise SpecError(f"how must be one of {', '.join(map(repr, HOWS))}, got {self.how!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise SpecError(f"tokens must be a positive number of calibration tokens, got {self.tokens!r}")

    def uses_calibration(self) -> bool:
        return self.how != "mean"

    def check(self, model: Any) -> None:
        """Refuse a head count the model cannot take (one line)."""
        config = model.config
        if getattr(config, "kvstack_shared_kv", None) or getattr(config, "kvstack_latent_kv", None):
            raise TransformError("gqa cannot follow cla or mla (their layers have no K/V projections); apply gqa "
                                 "first, e.g. 'gqa(kv_heads=1) + cla(layers=4)'")
        old, queries = config.num_key_value_heads, config.num_attention_heads
        if queries % self.kv_heads or old % self.kv_heads:
            choices = [n for n in range(1, old + 1) if old % n == 0]
            raise TransformError(f"kv_heads={self.kv_heads} does not divide the model's {old} KV heads ({queries} "
                                 f"query heads); choose one of {', '.join(map(str, choices))}")

    def apply(self, model: Any, inputs: AttentionInputs | None) -> dict[str, Any]:
        modules = attention_layers(model)
        self.check(model)
        config = model.config
        old = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        groups_per_layer = []
        for index, module in enumerate(modules):
            covariance = inputs.covariance(index) if inputs is not None else None
            groups = self._groups(module, old, head_dim, covariance)
            _merge_layer(module, groups, head_dim, config.num_attention_heads // old, self.how, covariance)
            module.num_key_value_groups = config.num_attention_heads // self.kv_heads
            groups_per_layer.append(groups)
        config.num_key_value_heads = self.kv_heads
        # what a later repair() may fit: the merged projections, and the folded ones for svd
        projections = ["q_proj", "k_proj", "v_proj", "o_proj"] if self.how == "svd" else ["k_proj", "v_proj"]
        return {"kv_heads": [old, self.kv_heads], "how": self.how, "groups": groups_per_layer,
                "calibration_tokens": inputs.tokens if inputs is not None else 0,
                "changed": {} if old == self.kv_heads else {index: projections for index in range(len(modules))}}

    def _groups(self, module: Any, old: int, head_dim: int, covariance: Any) -> list[list[int]]:
        """Old KV heads merged into each new one: adjacent for ``mean``, by similarity otherwise."""
        size = old // self.kv_heads
        if self.how == "mean" or size == 1 or self.kv_heads == 1:
            return [list(range(g * size, (g + 1) * size)) for g in range(self.kv_heads)]
        similarity = (_head_similarity(module.k_proj, old, head_dim, covariance)
                      + _head_similarity(module.v_proj, old, head_dim, covariance)) / 2
        remaining = list(range(old))
        groups = []
        while remaining:  # greedy: the first remaining head and the heads most like it
            seed = remaining.pop(0)
            ranked = sorted(remaining, key=lambda other: -float(similarity[seed, other]))
            chosen = ranked[: size - 1]
            remaining = [head for head in remaining if head not in chosen]
            groups.append([seed, *sorted(chosen)])
        return groups


def augmented_weight(linear: Any) -> Any:
    """``[out, h + 1]`` float64: the weight with the bias (or zeros) as its last column."""
    weight = linear.weight.detach().double()
    bias = linear.bias.detach().double() if linear.bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat((weight, bias.unsqueeze(1)), dim=1)


def _head_similarity(linear: Any, heads: int, head_dim: int, covariance: Any) -> Any:
    """``[H, H]`` cosine similarity of the heads' outputs over the calibration inputs: ``tr(W_i C W_j^T)``,
    normalised."""
    weight = augmented_weight(linear).view(heads, head_dim, -1)
    gram = torch.einsum("idh,hk,jdk->ij", weight, covariance, weight)
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    return gram / (norms[:, None] * norms[None, :])


def root_and_inverse(covariance: Any) -> tuple[Any, Any]:
    """``C^(1/2)`` and ``C^(-1/2)`` of a second moment, with a small relative ridge."""
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp(min=0) + RIDGE * float(values.max())
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def _set_linear(linear: Any, augmented: Any) -> Any:
    """A new ``nn.Linear`` holding ``augmented`` ``[out, h + 1]`` (weight, then bias if the old one had one)."""
    new = torch.nn.Linear(augmented.shape[1] - 1, augmented.shape[0], bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(augmented[:, :-1])
        if linear.bias is not None:
            new.bias.copy_(augmented[:, -1])
    return new


def _merge_layer(module: Any, groups: list[list[int]], head_dim: int, group_size: int, how: str,
                 covariance: Any) -> None:
    """Replace one attention module's projections by the merged ones (``groups``: old KV heads per new head)."""
    old = sum(len(group) for group in groups)
    keys = augmented_weight(module.k_proj).view(old, head_dim, -1)
    values = augmented_weight(module.v_proj).view(old, head_dim, -1)
    queries = augmented_weight(module.q_proj).view(old, group_size, head_dim, -1)  # old KV head -> its query heads
    output = module.o_proj.weight.detach().double().view(-1, old, group_size, head_dim)  # [h, H, G, D]
    new_keys, new_values, new_queries, new_output = [], [], [], []
    if how == "svd":
        root, inverse_root = root_and_inverse(covariance)
    for group in groups:
        if how != "svd":
            new_keys.append(keys[group].mean(0))
            new_values.append(values[group].mean(0))
            new_queries.extend(queries[head] for head in group)
            new_output.extend(output[:, head] for head in group)
            continue
        # values: rank-D approximation of the stacked projections, factors folded into o_proj
        stacked = values[group].reshape(-1, values.shape[-1])  # [r D, h + 1]
        u, s, vh = torch.linalg.svd(stacked @ root, full_matrices=False)
        new_values.append((s[:head_dim, None] * vh[:head_dim]) @ inverse_root)
        factors = u[:, :head_dim].view(len(group), head_dim, head_dim)  # [r, D, D]: old value = factor @ new value
        new_output.extend(output[:, head] @ factors[i] for i, head in enumerate(group))
        # keys: per rotary pair, a rank-1 complex approximation; factors folded into the queries as conj(c) q
        half = head_dim // 2
        complex_rows = torch.complex(keys[group][:, :half], keys[group][:, half:])  # [r, D/2, h + 1]
        weighted = complex_rows @ root.to(complex_rows.dtype)
        u, s, vh = torch.linalg.svd(weighted.permute(1, 0, 2), full_matrices=False)  # per pair: [r, h + 1]
        scale = u[:, :, 0] * s[:, :1]  # [D/2, r] complex factor of each old head
        shared = vh[:, 0, :] @ inverse_root.to(vh.dtype)  # [D/2, h + 1]
        new_keys.append(torch.cat((shared.real, shared.imag), dim=0))
        for i, head in enumerate(group):
            q = queries[head]  # [G, D, h + 1]
            a = scale[:, i].real.view(1, half, 1)
            b = scale[:, i].imag.view(1, half, 1)
            real, imaginary = q[:, :half], q[:, half:]
            new_queries.append(torch.cat((a * real + b * imaginary, a * imaginary - b * real), dim=1))
    module.k_proj = _set_linear(module.k_proj, torch.cat(new_keys))
    module.v_proj = _set_linear(module.v_proj, torch.cat(new_values))
    module.q_proj = _set_linear(module.q_proj, torch.cat([q.reshape(-1, q.shape[-1]) for q in new_queries]))
    output_weight = torch.stack(new_output, dim=1).reshape(output.shape[0], -1)  # [h, Hq D]
    with torch.no_grad():
        module.o_proj.weight.copy_(output_weight.to(module.o_proj.weight.dtype))
