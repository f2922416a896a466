"""``KVStackCache``: a transformers ``Cache`` of :class:`KVStackLayer` driven by one method."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from kvstack.cache.cross_layer import MagnitudeLayer, ReusingLayer
from kvstack.cache.latent_layer import LatentLayer
from kvstack.cache.layer import KVStackLayer
from kvstack.cache.page_tier import TieredLayer
from kvstack.contract import LINK_KINDS, LINK_MAGNITUDE, LINK_REUSE, CodecSpec, LayerLink, Policy


class KVStackCache(Cache):
    """A cache that holds exactly what ``method`` keeps, and says how many bytes that is.

    Create it with :func:`kvstack.make_cache`, then pass it to ``model.generate(past_key_values=...)``
    or to a forward loop.

    Parameters
    ----------
    method:
        A parsed method (see :func:`kvstack.spec.parse`).
    num_layers, num_q_heads, num_kv_heads:
        The model's attention geometry.
    rope_inv_freq:
        ``[D/2]`` RoPE inverse frequencies (needed for in-cache position re-assignment and pre-RoPE codecs).
    codec:
        A codec (:mod:`kvstack.methods.quantization`) encoding the entries that leave its full-precision
        window, or None to keep every entry in the model's dtype.
    calibration:
        The model's :class:`~kvstack.calibration.Calibration`, for codecs that need one (``palu``).
    label:
        The spec this cache applies (the parsed spec's label), as :meth:`label` returns it.
    seed:
        Seed of the generator random methods draw from.
    layer_links:
        ``{layer: LayerLink}`` of the layers that store through another layer's store (cross-layer policies:
        :mod:`kvstack.cache.cross_layer`); every other layer stores its own entries.
    tier_dir:
        For page-reading policies (``method.reads_pages``): the directory of the slow tier's files (checked
        writable by the caller, :func:`kvstack.cache.page_tier.check_tier_dir`).
    latent, head_dim:
        ``latent``: the model's attention caches latents and rotary keys (an ``mla`` model); every layer is
        then a :class:`~kvstack.cache.latent_layer.LatentLayer`, whose uncompressed reference has
        ``num_kv_heads`` heads of ``head_dim``.
    artefacts:
        ``{path: sha256 of its bytes}`` of the calibration files the method and codec were built from (head
        maps, layer maps, statistics), kept as :attr:`artefacts` for results to record.
    """

    def __init__(
        self,
        method: Policy,
        *,
        num_layers: int,
        num_q_heads: int,
        num_kv_heads: int,
        rope_inv_freq: torch.Tensor | None = None,
        seed: int = 0,
        codec: CodecSpec | None = None,
        calibration: Any = None,
        label: str,
        layer_links: dict[int, LayerLink] | None = None,
        tier_dir: str | None = None,
        latent: bool = False,
        head_dim: int | None = None,
        artefacts: dict[str, str] | None = None,
    ) -> None:
        self.method = method
        self.artefacts = dict(artefacts or {})
        self._label = label
        self.codec = codec
        self.calibration = calibration
        self.num_layers = num_layers
        self.group_size = num_q_heads // num_kv_heads
        self.rope_inv_freq = rope_inv_freq
        self.generator = torch.Generator().manual_seed(seed)
        self.context_length: int | None = None
        self.more_prompt_follows = False
        self.layer_statistics: dict[int, torch.Tensor] = {}  # layer -> [B] statistic of its first forward
        # per-layer budgets a layer-allocating policy chose (None for a layer that reads another's entries)
        self.layer_budgets: list[int | None] | None = None
        self.tier_dir = tier_dir
        if latent and (head_dim is None or layer_links or method.reads_pages):
            raise ValueError("a latent cache needs the head dimension, and takes no layer links or page tier")
        self.latent_geometry = (num_kv_heads, head_dim) if latent else None
        self.layer_links = check_layer_links(layer_links or {}, num_layers)
        # upper layer -> the lower layer holding magnitudes over its rows (MiniCache pairs)
        self.magnitude_lower = {link.source: layer for layer, link in self.layer_links.items()
                                if link.kind == LINK_MAGNITUDE}
        # lower layer -> how many layers above read its entries (each forward, it evicts after they have)
        self.readers: dict[int, int] = {}
        for link in self.layer_links.values():
            if link.kind == LINK_REUSE:
                self.readers[link.source] = self.readers.get(link.source, 0) + 1
        super().__init__(layers=[self._new_layer(i) for i in range(num_layers)])

    def _new_layer(self, layer_idx: int) -> KVStackLayer | ReusingLayer | MagnitudeLayer | TieredLayer | LatentLayer:
        if self.latent_geometry is not None:
            return LatentLayer(self, layer_idx, *self.latent_geometry, codec=self.codec)
        if self.method.reads_pages and not self.method.reads_every_page(layer_idx):
            if self.tier_dir is None:
                raise ValueError(f"{self._label} reads pages from a slow tier: give the cache a tier_dir")
            return TieredLayer(self, layer_idx, self.tier_dir)
        link = self.layer_links.get(layer_idx)
        if link is None:
            return KVStackLayer(self, layer_idx)
        if link.kind == LINK_REUSE:
            return ReusingLayer(self, layer_idx, link.source)
        return MagnitudeLayer(self, layer_idx, link.source)

    # ------------------------------------------------------------------ prompt bookkeeping
    def begin_prompt(self, prompt_length: int) -> None:
        """Declare the prompt length before a chunked prefill, so ratio budgets refer to the whole prompt."""
        self.context_length = prompt_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.context_length is None:
            self.context_length = key_states.shape[2]  # a single-forward prefill: the prompt is this forward
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self) -> None:
        """Empty every layer and forget the prompt length, so a reused cache starts afresh."""
        super().reset()
        self.context_length = None
        self.more_prompt_follows = False
        self.layer_statistics = {}
        self.layer_budgets = None

    # ------------------------------------------------------------------ layer budgets
    def layer_budget(self, layer_idx: int, context_length: int) -> int | None:
        """Entries layer ``layer_idx`` keeps: the policy's own answer, or what it allocated across layers."""
        if self.layer_budgets is not None:
            return self.layer_budgets[layer_idx]
        return self.method.layer_budget(context_length, layer_idx, self.num_layers)

    def record_layer_statistic(self, layer_idx: int, statistic: torch.Tensor) -> None:
        """Keep a layer's first-forward statistic (``[B]``); once every storing layer has one, the policy
        allocates per-layer budgets (:meth:`Policy.allocate_layers`), which hold from the next eviction on.

        A layer that reads another layer's entries (a cla model's sharing layer) stores nothing and takes no
        budget: the policy spreads its budget over the storing layers only."""
        self.layer_statistics.setdefault(layer_idx, statistic.float().mean())
        storing = [i for i in range(self.num_layers)
                   if i not in self.layer_links or self.layer_links[i].kind != LINK_REUSE]
        if all(i in self.layer_statistics for i in storing):
            statistics = torch.stack([self.layer_statistics[i] for i in storing])
            context = self.context_length or self.layers[0].seen
            budgets: list[int | None] = [None] * self.num_layers
            for layer, budget in zip(storing, self.method.allocate_layers(statistics, context), strict=True):
                budgets[layer] = budget
            self.layer_budgets = budgets

    def end_prompt(self) -> None:
        """Release spare capacity once the prompt has been read (called by :func:`kvstack.prefill`)."""
        for layer in self.layers:
            layer.shrink_to_fit()

    # ------------------------------------------------------------------ accounting
    def kv_bytes(self) -> int:
        """Bytes of every tensor the cache holds: keys, values, positions, method state, bookkeeping."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def tier_bytes(self) -> int:
        """Bytes held in a slower tier instead of memory (page-reading policies; 0 for every other cache)."""
        return sum(layer.tier_bytes() for layer in self.layers)

    def full_kv_bytes(self) -> int:
        """Bytes an uncompressed cache (transformers' ``DynamicCache``) of the same tokens would hold."""
        return sum(layer.full_kv_bytes() for layer in self.layers)

    def kept_entries(self) -> int:
        """Entries held, summed over layers, sequences and KV heads."""
        return sum(layer.kept_entries() for layer in self.layers)

    def tokens_seen(self) -> int:
        """Tokens the cache has been given (logical length, padding included)."""
        return self.layers[0].seen if self.layers else 0

    def tokens_kept(self) -> float:
        """Average entries held per (layer, sequence, KV head): the effective context length."""
        layer = self.layers[0]
        if not layer.is_initialized:
            return 0.0
        return self.kept_entries() / (self.num_layers * layer.batch * layer.heads)

    def theoretical_kv_bytes(self) -> int:
        """Bytes of the kept keys and values alone: ``entries * D * 2 * element size`` (no metadata)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                element = torch.empty((), dtype=layer.dtype).element_size()
                total += layer.kept_entries() * layer.head_dim * 2 * element
        return total

    def label(self) -> str:
        """The spec string of what this cache applies (selection and codec)."""
        return self._label

    def bits_per_element(self) -> float:
        """``8 * kv_bytes / (entries * D * 2)``: bits held per kept key/value element, all metadata included."""
        elements = sum(layer.kept_entries() * layer.head_dim * 2 for layer in self.layers if layer.is_initialized)
        return 8.0 * self.kv_bytes() / elements if elements else 0.0

    def summary(self) -> dict[str, float]:
        """Numbers for reports: tokens kept / seen, bytes held / full, compression ratio."""
        full = self.full_kv_bytes()
        held = self.kv_bytes()
        return {
            "tokens_kept": self.tokens_kept(),
            "tokens_seen": self.tokens_seen(),
            "kv_bytes": held,
            "full_kv_bytes": full,
            "compression_ratio": 1.0 - held / full if full else 0.0,
            "tier_bytes": self.tier_bytes(),
        }


def check_layer_links(links: dict[int, LayerLink], num_layers: int) -> dict[int, LayerLink]:
    """``links`` if storage can build them; a policy's bad map is a ``ValueError`` naming the link.

    A reusing layer reads a layer below it that stores its own entries; a magnitude layer's source is the
    layer right above it, which stores its own entries and is the upper layer of no other pair.
    """
    uppers: set[int] = set()
    for layer, link in sorted(links.items()):
        if not 0 <= layer < num_layers or not 0 <= link.source < num_layers:
            raise ValueError(f"layer link {layer} -> {link.source} is outside the model's {num_layers} layers")
        if link.source in links:
            raise ValueError(f"layer {layer} links to layer {link.source}, which stores through a link itself")
        if link.kind == LINK_REUSE and link.source >= layer:
            raise ValueError(f"layer {layer} reuses layer {link.source}; it must read a layer below it")
        if link.kind not in LINK_KINDS:
            raise ValueError(f"unknown layer link kind {link.kind!r}; one of {', '.join(LINK_KINDS)}")
        if link.kind == LINK_MAGNITUDE:
            if link.source != layer + 1 or link.source in uppers:
                raise ValueError(f"layer {layer} merges with layer {link.source}; a pair is a layer and the one "
                                 "right above it, each in one pair")
            uppers.add(link.source)
    return dict(links)
