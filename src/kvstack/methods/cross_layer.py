"""KV-cache merging across layers (taxonomy §1.3): layers that store their entries through another layer's.

* ``minicache``: MiniCache (Liu et al., NeurIPS 2024). From a start layer (the middle by default) up to the
  last, adjacent layer pairs ``(l, l + 1)`` share one direction per token: the SLERP, at ``t``, of the two
  layers' normalised rows, while each layer keeps its own magnitude. The token pairs whose angle is widest
  (a ``retain`` fraction of the prompt's, per head) are kept unmerged. Storage keeps the shared row once,
  scaled by the upper layer's magnitude, in the upper layer's own store (so a codec encodes it as any
  entry), and the lower layer's magnitude as a scale over it: ``lower = (|lower| / |upper|) * shared``.
* ``kvsharer``: KVSharer (Yang et al., 2024). A calibration search (``kvstack calibrate --kvsharer N``)
  ranks layer pairs by how *dissimilar* their caches are and lets a layer reuse a lower layer's cache, pair
  by pair, while the model's last hidden states stay above a cosine similarity to the full model's; the
  map is a calibration artefact keyed by the model. A reusing layer stores nothing.

Neither evicts: every token stays, and the bytes saved are the linked layers'. Shapes: ``B`` batch, ``H`` KV
heads, ``q`` tokens of a chunk, ``D`` head dimension.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

from kvstack.contract import LINK_MAGNITUDE, LINK_REUSE, LayerLink, LayerPairMerge
from kvstack.lazy_import import lazy_module
from kvstack.methods.base import Method
from kvstack.spec import SpecError, register

torch = lazy_module("torch")

# Below this, an angle (radians) or a norm is treated as zero: SLERP falls back to the normalised linear
# interpolation, and a zero row is kept unmerged (it has no direction to share).
TINY = 1e-6


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise SpecError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def slerp(lower: torch.Tensor, upper: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical interpolation of the directions of ``lower`` and ``upper`` (``[..., D]``), ``t`` toward upper.

    Returns the unit direction ``[..., D]`` and the angle between the two rows ``[...]`` (radians).
    """
    lower_unit = lower / lower.norm(dim=-1, keepdim=True).clamp(min=TINY)
    upper_unit = upper / upper.norm(dim=-1, keepdim=True).clamp(min=TINY)
    cosine = (lower_unit * upper_unit).sum(dim=-1).clamp(-1.0, 1.0)
    angle = torch.arccos(cosine)
    sine = torch.sin(angle)
    curved = sine > TINY
    safe = torch.where(curved, sine, torch.ones_like(sine))
    lower_weight = torch.where(curved, torch.sin((1.0 - t) * angle) / safe, torch.full_like(angle, 1.0 - t))
    upper_weight = torch.where(curved, torch.sin(t * angle) / safe, torch.full_like(angle, t))
    direction = lower_weight.unsqueeze(-1) * lower_unit + upper_weight.unsqueeze(-1) * upper_unit
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=TINY)
    return direction, angle


@register(
    "minicache",
    category="token/merging/cross-layer",
    description=(
        "MiniCache: from `start` (default the middle) up, adjacent layers share a SLERP direction per token and "
        "keep their own magnitudes; the widest-angle `retain` fraction stays unmerged."
    ),
)
@dataclasses.dataclass
class MiniCache(Method):
    """MiniCache (Liu et al., NeurIPS 2024): cross-layer merging of adjacent layer pairs.

    Parameters
    ----------
    start:
        First layer of the first pair (None: ``num_layers // 2``); pairs ``(start, start + 1)``,
        ``(start + 2, start + 3)`` ... up to the last layer.
    t:
        SLERP position between the lower (0) and the upper (1) layer's direction; the paper uses 0.6.
    retain:
        Fraction of token pairs kept unmerged, per head: those whose angle exceeds the ``1 - retain``
        quantile of the first chunk's angles (the prompt's); that cutoff then holds while decoding.
    """

    start: int | None = None
    t: float = 0.6
    retain: float = 0.05

    cross_layer: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.start is not None and (isinstance(self.start, bool) or not isinstance(self.start, int)
                                       or self.start < 0):
            raise SpecError(f"start must be a layer index >= 0 (or None for the middle layer), got {self.start!r}")
        self.t = _check_fraction("t", self.t)
        self.retain = _check_fraction("retain", self.retain)

    def compresses(self) -> bool:
        return False  # no entry is evicted: the bytes saved are the pairs' shared rows

    def start_layer(self, num_layers: int) -> int:
        """The first layer of the first pair, checked against the model's ``num_layers``."""
        start = num_layers // 2 if self.start is None else self.start
        if not 0 <= start <= num_layers - 2:
            raise SpecError(f"start={start} is outside the model: a pair needs the start layer and the one above "
                            f"it; choose 0 to {num_layers - 2} (the model has {num_layers} layers)")
        return start

    def layer_links(self, num_layers: int, model_key: str | None) -> dict[int, LayerLink]:
        start = self.start_layer(num_layers)
        return {lower: LayerLink(source=lower + 1, kind=LINK_MAGNITUDE)
                for lower in range(start, num_layers - 1, 2)}

    def merge_layer_pair(self, lower: torch.Tensor, upper: torch.Tensor, valid: torch.Tensor,
                         cutoff: torch.Tensor | None) -> LayerPairMerge:
        """Merge a chunk's ``[B, H, q, D]`` rows of a pair; see :class:`~kvstack.contract.LayerPairMerge`."""
        lower32, upper32 = lower.float(), upper.float()
        lower_norm, upper_norm = lower32.norm(dim=-1), upper32.norm(dim=-1)
        direction, angle = slerp(lower32, upper32, self.t)
        distance = angle / math.pi  # [B, H, q] in [0, 1]
        if cutoff is None:
            cutoff = self._cutoff(distance, valid)
        retained = (distance > cutoff.unsqueeze(-1)) | (upper_norm <= TINY) | (lower_norm <= TINY)
        shared = torch.where(retained.unsqueeze(-1), upper32, upper_norm.unsqueeze(-1) * direction)
        scale = torch.where(retained, torch.ones_like(lower_norm), lower_norm / upper_norm.clamp(min=TINY))
        return LayerPairMerge(shared=shared.to(upper.dtype), scale=scale, retained=retained & valid, cutoff=cutoff)

    def _cutoff(self, distance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` the ``1 - retain`` quantile of the valid tokens' angular distances (above 1: retain none)."""
        if self.retain == 0.0:
            return torch.full(distance.shape[:2], 2.0, device=distance.device)
        if self.retain == 1.0:
            return torch.full(distance.shape[:2], -1.0, device=distance.device)
        masked = torch.where(valid, distance, torch.full_like(distance, float("nan")))
        cutoff = torch.nanquantile(masked, 1.0 - self.retain, dim=-1)
        return torch.nan_to_num(cutoff, nan=2.0)


@register(
    "kvsharer",
    category="token/merging/cross-layer",
    description=(
        "KVSharer: `layers` layers reuse a dissimilar lower layer's cache, by a calibrated map "
        "(`kvstack calibrate --kvsharer N`); shared layers store nothing."
    ),
)
@dataclasses.dataclass
class KVSharer(Method):
    """KVSharer (Yang et al., 2024): layers reuse another layer's cache by a calibrated map.

    Parameters
    ----------
    layers:
        How many layers share (the search's target; the artefact may hold fewer if the similarity threshold
        stopped it).
    threshold:
        The search's bound on the cosine similarity of the last hidden states to the full model's.
    artefact:
        Path of a map file; None reads the model's own (written by ``kvstack calibrate --kvsharer``).
    """

    layers: int = 8
    threshold: float = 0.9
    artefact: str | None = None

    cross_layer: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise SpecError(f"layers must be a positive number of layers to share, got {self.layers!r}")
        self.threshold = _check_fraction("threshold", self.threshold)
        if self.artefact is not None and (not isinstance(self.artefact, str) or not self.artefact):
            raise SpecError(f"artefact must be the path of a kvsharer map file, got {self.artefact!r}")

    def compresses(self) -> bool:
        return False  # nothing is evicted: the shared layers' caches are never stored

    def artefact_files(self, model_key: str) -> tuple[Path, ...]:
        from kvstack.calibration.layer_map import layer_map_file

        return (layer_map_file(model_key, self.layers, self.threshold, self.artefact),)

    def layer_links(self, num_layers: int, model_key: str | None) -> dict[int, LayerLink]:
        from kvstack.calibration.layer_map import load_layer_map

        layer_map = load_layer_map(model_key, num_layers, self.layers, self.threshold, self.artefact)
        return {layer: LayerLink(source=source, kind=LINK_REUSE) for layer, source in layer_map.items()}
