"""Cross-layer KV sharing (taxonomy §2, CLA): an upper layer attends with a lower layer's keys and values.

``cla(layers=N)`` makes ``N`` layers share: each chosen upper layer ``l + 1`` drops its key and value
projections and attends with layer ``l``'s keys and values (Brandon et al., 2024, share adjacent layers). The
pairs are chosen on calibration text, a layer never both giving and taking, by ``choose``:

* ``'model'`` (the default): what sharing costs the whole model, greedily: at each step the adjacent pair
  that, added to those already chosen, moves the next-token distribution least from the original model's
  (mean KL on the calibration text), as KVSharer checks each candidate on the model's output (one forward
  per candidate). On SmolLM2-135M, 4 shared layers cost perplexity 15.92 -> 27.74 this way, and -> 1,436.67
  by the attention-output rule below.
* ``'attention'``: what sharing costs each layer alone, for every adjacent pair the relative error of the
  upper layer's attention output when it reads the lower layer's keys and values instead of its own, on the
  model's own inputs to that layer; the cheapest pairs are taken.

``cla(pairs='5:4,9:8')`` gives the map (upper:lower, lower below upper) instead; a lower layer may give to
several upper layers (CLA's sharing factor 3 and more, or a KVSharer map: ``pairs='16:11,27:11'``).

The model changes in place of its attention modules, not its classes: the upper layer's ``self_attn`` becomes
a :class:`SharedKVAttention` (its query and output projections, no key or value projection) and the lower
layer's key and value projections become :class:`ExportingLinear`, which keep their last output for the
upper layer of the same forward. With a cache, the upper layer reads the lower layer's entries: a kvstack
cache (``make_cache`` sees ``config.kvstack_shared_kv`` and gives the layer a zero-byte reusing layer) or
transformers' ``DynamicCache`` (the lower layer's tensors, never copied). The map is recorded in the record
and in ``config.kvstack_shared_kv`` (``{"upper": lower}``).

Shapes: ``B`` sequences, ``T`` tokens, ``H`` KV heads, ``Hq`` query heads, ``D`` head dimension, ``h`` hidden.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

from kvstack.lazy_import import lazy_module
from kvstack.spec import SpecError, register
from kvstack.transforms.base import Transform, TransformError, adopt_attention_settings, attention_layers

torch = lazy_module("torch")

__all__ = ["CLA", "exporting_linear", "model_choice", "parse_pairs", "restore_sharing", "shared_kv_attention",
           "shared_layers"]

CHOOSES = ("attention", "model")


def parse_pairs(text: str) -> dict[int, int]:
    """``'5:4,9:8'`` -> ``{5: 4, 9: 8}`` (upper: lower); a malformed map is a one-line :class:`SpecError`."""
    pairs: dict[int, int] = {}
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise SpecError(f"pairs must be 'upper:lower,...' with layer numbers, e.g. '5:4,9:8'; got {text!r}")
        upper, lower = int(parts[0]), int(parts[1])
        if lower >= upper:
            raise SpecError(f"in pairs {text!r}: layer {upper} can only share the keys and values of a layer below "
                            f"it, not {lower}")
        if upper in pairs:
            raise SpecError(f"in pairs {text!r}: layer {upper} is given twice")
        pairs[upper] = lower
    givers = set(pairs.values())
    if givers & set(pairs):
        raise SpecError(f"in pairs {text!r}: layer {min(givers & set(pairs))} both shares another layer's keys and "
                        "values and gives its own")
    return pairs


def shared_layers(config: Any) -> dict[int, int]:
    """The ``{upper: lower}`` map of a model transformed by ``cla`` (empty for any other model)."""
    return {int(upper): int(lower) for upper, lower in (getattr(config, "kvstack_shared_kv", None) or {}).items()}


@register(
    "cla",
    category="model/cross_layer",
    description=(
        "Model transform (kvstack.transform): `layers` upper layers drop their K/V projections and attend with "
        "the layer below's keys and values (CLA); pairs chosen on calibration text or given as pairs='5:4'."
    ),
)
@dataclasses.dataclass
class CLA(Transform):
    """Let layers attend with the keys and values of the layer below (see the module docstring).

    Parameters
    ----------
    layers:
        How many layers share (each saves its whole cache); ignored when ``pairs`` is given.
    pairs:
        An explicit map ``'upper:lower,...'`` instead of the calibrated choice.
    tokens:
        Calibration tokens read to choose the pairs.
    choose:
        ``'model'`` (greedy, the whole model's KL; one forward of the calibration text per candidate) or
        ``'attention'`` (each layer's own cost; a forward per layer pair, much cheaper, much worse on SmolLM2).
    """

    layers: int = 8
    pairs: str = ""
    tokens: int = 2048
    choose: str = "model"

    needs_calibration: ClassVar[bool] = True
    calibration: ClassVar[str] = "ids"

    def __post_init__(self) -> None:
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise SpecError(f"layers must be a positive number of layers that share, got {self.layers!r}")
        if not isinstance(self.pairs, str):
            raise SpecError(f"pairs must be a text map 'upper:lower,...', got {self.pairs!r}")
        if self.pairs:
            parse_pairs(self.pairs)
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise SpecError(f"tokens must be a positive number of calibration tokens, got {self.tokens!r}")
        if self.choose not in CHOOSES:
            raise SpecError(f"choose must be one of {', '.join(map(repr, CHOOSES))}, got {self.choose!r}")

    def uses_calibration(self) -> bool:
        return not self.pairs

    def check(self, model: Any) -> None:
        """Refuse a map outside the model, too many layers, or a model that already shares (one line)."""
        count = model.config.num_hidden_layers
        if shared_layers(model.config):
            raise TransformError("this model's layers already share keys and values (cla); apply cla once")
        if getattr(model.config, "kvstack_latent_kv", None):
            raise TransformError("cla cannot follow mla (its layers have no K/V projections); apply one of them")
        if self.pairs:
            outside = [layer for pair in parse_pairs(self.pairs).items() for layer in pair if layer >= count]
            if outside:
                raise TransformError(f"pairs {self.pairs!r} name layer {max(outside)}, outside the model's layers "
                                     f"0 to {count - 1}")
        elif self.layers > count // 2:
            raise TransformError(f"layers={self.layers}: at most {count // 2} of the model's {count} layers can "
                                 "share (each needs a layer below that keeps its own)")

    def apply(self, model: Any, inputs: Any) -> dict[str, Any]:
        modules = attention_layers(model)
        self.check(model)
        costs: dict[int, float] = {}
        if self.pairs:
            pairs = parse_pairs(self.pairs)
        elif self.choose == "model":
            pairs, costs = model_choice(model, inputs, self.layers)
        else:
            costs = sharing_costs(model, inputs)
            pairs = {}
            for upper in sorted(costs, key=costs.__getitem__):
                lower = upper - 1
                if len(pairs) == self.layers:
                    break
                if lower in pairs or upper in pairs.values():
                    continue
                pairs[upper] = lower
        layer_modules = [layer for layer in model.model.layers]
        for upper, lower in sorted(pairs.items()):
            _share(layer_modules, modules, upper, lower)
        model.config.kvstack_shared_kv = {str(upper): lower for upper, lower in sorted(pairs.items())}
        changed: dict[int, list[str]] = {}
        for upper, lower in sorted(pairs.items()):
            changed[upper] = ["o_proj", "q_proj"]
            changed[lower] = ["k_proj", "v_proj"]
        return {"pairs": {str(upper): lower for upper, lower in sorted(pairs.items())},
                "costs": {str(upper): cost for upper, cost in sorted(costs.items())},
                "calibration_tokens": int(inputs.numel()) if inputs is not None else 0, "changed": changed}


def restore_sharing(model: Any) -> None:
    """Give a model built from a ``cla`` model's config the sharing its config names (``kvstack_shared_kv``):
    the upper layers' attention reads the lower layers' keys and values. No-op for any other model."""
    modules = attention_layers(model)
    layer_modules = list(model.model.layers)
    for upper, lower in sorted(shared_layers(model.config).items()):
        _share(layer_modules, modules, upper, lower)


def _share(layer_modules: list[Any], modules: list[Any], upper: int, lower: int) -> tuple[Any, Any, Any]:
    """Let layer ``upper`` attend with layer ``lower``'s keys and values; return what it replaced
    (``lower``'s key and value projections, ``upper``'s attention) so that :func:`_unshare` can put it back."""
    source = modules[lower]
    replaced = (source.k_proj, source.v_proj, layer_modules[upper].self_attn)
    if not isinstance(source.k_proj, _module_classes()[0]):  # a layer giving to several keeps one export
        source.k_proj = exporting_linear(source.k_proj)
        source.v_proj = exporting_linear(source.v_proj)
    layer_modules[upper].self_attn = shared_kv_attention(modules[upper], source, lower)
    return replaced


def _unshare(layer_modules: list[Any], modules: list[Any], upper: int, lower: int, replaced: tuple) -> None:
    """Undo :func:`_share`: put back ``lower``'s projections and ``upper``'s attention module."""
    modules[lower].k_proj, modules[lower].v_proj, layer_modules[upper].self_attn = replaced


def model_choice(model: Any, ids: Any, count: int) -> tuple[dict[int, int], dict[int, float]]:
    """Greedy whole-model choice of ``count`` adjacent pairs on ``ids`` ``[N, T]``: ``({upper: lower},
    {upper: mean KL of the model with the pairs chosen up to and including this one})``. ``model`` ends as it
    began (every trial is undone)."""
    modules = attention_layers(model)
    layer_modules = list(model.model.layers)

    def log_probabilities() -> list[Any]:
        with torch.no_grad():
            return [torch.log_softmax(model(input_ids=row.unsqueeze(0), use_cache=False).logits.float(), -1)
                    for row in ids]

    target = log_probabilities()

    def divergence() -> float:
        predicted = log_probabilities()
        return sum(float((t.exp() * (t - p)).sum(-1).mean()) for t, p in zip(target, predicted, strict=True)) / len(ids)

    chosen: dict[int, int] = {}
    costs: dict[int, float] = {}
    installed = []
    try:
        for _ in range(count):
            trials = {}
            for upper in range(1, len(modules)):
                lower = upper - 1
                if upper in chosen or upper in chosen.values() or lower in chosen:
                    continue
                replaced = _share(layer_modules, modules, upper, lower)
                trials[upper] = divergence()
                _unshare(layer_modules, modules, upper, lower, replaced)
            if not trials:
                break
            best = min(trials, key=trials.__getitem__)
            chosen[best], costs[best] = best - 1, trials[best]
            installed.append((best, best - 1, _share(layer_modules, modules, best, best - 1)))
    finally:
        for upper, lower, replaced in reversed(installed):
            _unshare(layer_modules, modules, upper, lower, replaced)
    return chosen, costs


def sharing_costs(model: Any, ids: Any) -> dict[int, float]:
    """``{upper: error}`` for every adjacent pair: the relative error of layer ``upper``'s attention output
    when it reads layer ``upper - 1``'s keys and values, on the model's inputs to it (``ids`` ``[N, T]``)."""
    modules = attention_layers(model)
    captured: dict[int, dict[str, Any]] = {index: {} for index in range(len(modules))}
    handles = []

    def hook_for(index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[index].update(hidden=hidden.detach(), output=output[0].detach(),
                                   rotary=kwargs["position_embeddings"])
        return hook

    for index, module in enumerate(modules):
        handles.append(module.register_forward_hook(hook_for(index), with_kwargs=True))
    errors: dict[int, list[Any]] = {index: [] for index in range(1, len(modules))}
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row.unsqueeze(0), use_cache=False)
                for upper in range(1, len(modules)):
                    lower = modules[upper - 1]
                    below, here = captured[upper - 1], captured[upper]
                    keys = _heads(lower.k_proj(below["hidden"]), lower.head_dim)
                    values = _heads(lower.v_proj(below["hidden"]), lower.head_dim)
                    output = attend(modules[upper], here["hidden"], keys, values, here["rotary"])
                    errors[upper].append((output - here["output"]).pow(2).sum() / here["output"].pow(2).sum())
    finally:
        for handle in handles:
            handle.remove()
    return {upper: float(torch.stack(values).mean()) for upper, values in errors.items()}


def _heads(projected: Any, head_dim: int) -> Any:
    """``[B, T, H D]`` -> ``[B, H, T, D]``."""
    return projected.view(*projected.shape[:-1], -1, head_dim).transpose(1, 2)


def attend(module: Any, hidden: Any, keys: Any, values: Any, rotary: tuple[Any, Any]) -> Any:
    """``module``'s causal attention output ``[B, T, h]`` for its inputs ``hidden`` over pre-RoPE ``keys`` and
    ``values`` ``[B, H, T, D]`` of the same tokens (no cache)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = rotary
    query, keys = apply_rotary_pos_emb(_heads(module.q_proj(hidden), module.head_dim), keys, cos, sin)
    groups = query.shape[1] // keys.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1), is_causal=True,
        scale=module.scaling)
    return module.o_proj(out.transpose(1, 2).reshape(*hidden.shape[:-1], -1))


@functools.cache
def _module_classes() -> tuple[type, type]:
    """``(ExportingLinear, SharedKVAttention)``, defined on first use so that importing transforms imports no
    torch."""

    class ExportingLinear(torch.nn.Linear):
        """A lower layer's key or value projection: an ordinary ``nn.Linear`` (same parameters, same
        state-dict names) that keeps its last output ``[B, T, H D]`` for the upper layer of the same forward."""

        def forward(self, hidden: Any) -> Any:
            output = super().forward(hidden)
            self.exported = output
            return output

    class SharedKVAttention(torch.nn.Module):
        """An upper layer's attention without key or value projections: it reads the keys and values of the
        ``source`` layer below (this forward's chunk from its ``ExportingLinear`` projections, the past from
        the cache)."""

        def __init__(self, original: Any, source: Any, source_index: int) -> None:
            super().__init__()
            adopt_attention_settings(self, original)
            self.q_proj = original.q_proj
            self.o_proj = original.o_proj
            self.source_index = source_index
            object.__setattr__(self, "source", source)  # not a submodule: its weights are its own layer's

        def forward(self, hidden_states: Any, position_embeddings: tuple[Any, Any] | None = None,
                    attention_mask: Any = None, cache: Any = None, **kwargs: Any) -> tuple[Any, Any]:
            """``hidden_states`` ``[B, T, h]`` -> (``[B, T, h]``, attention weights or None), as
            ``LlamaAttention``."""
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

            if cache is None:
                cache = kwargs.pop("past_key_values", None)
            exported_keys = getattr(self.source.k_proj, "exported", None)
            exported_values = getattr(self.source.v_proj, "exported", None)
            if exported_keys is None or exported_keys.shape[:-1] != hidden_states.shape[:-1]:
                raise RuntimeError(f"layer {self.layer_idx} shares layer {self.source_index}'s keys and values, "
                                   "which did not run on this input first")
            cos, sin = position_embeddings
            query, keys = apply_rotary_pos_emb(_heads(self.q_proj(hidden_states), self.head_dim),
                                               _heads(exported_keys, self.head_dim), cos, sin)
            values = _heads(exported_values, self.head_dim)
            if cache is not None:
                layers = getattr(cache, "layers", None)
                own = layers[self.layer_idx] if layers is not None and len(layers) > self.layer_idx else None
                if getattr(own, "source", None) == self.source_index:  # a kvstack layer reading its source's store
                    keys, values = cache.update(keys, values, self.layer_idx)
                elif type(own).__name__ == "DynamicLayer" and getattr(layers[self.source_index], "keys",
                                                                      None) is not None:
                    keys, values = layers[self.source_index].keys, layers[self.source_index].values
                else:
                    raise RuntimeError(f"layer {self.layer_idx} shares layer {self.source_index}'s cache: use "
                                       "transformers' DynamicCache or kvstack.make_cache(model, 'full')")
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                        eager_attention_forward)
            output, weights = attention_interface(self, query, keys, values, attention_mask, dropout=0.0,
                                                  scaling=self.scaling, **kwargs)
            return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    return ExportingLinear, SharedKVAttention


def exporting_linear(linear: Any) -> Any:
    """``linear`` as an ``ExportingLinear`` sharing its parameters."""
    new = _module_classes()[0](linear.in_features, linear.out_features, bias=linear.bias is not None,
                               device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight = linear.weight
    if linear.bias is not None:
        new.bias = linear.bias
    return new


def shared_kv_attention(original: Any, source: Any, source_index: int) -> Any:
    """A ``SharedKVAttention`` replacing ``original``: its q/o projections, reading ``source``'s keys and
    values (layer ``source_index``)."""
    return _module_classes()[1](original, source, source_index)
