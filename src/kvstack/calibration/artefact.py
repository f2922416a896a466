"""A calibration artefact: per-layer, per-KV-head statistics of a model's keys, values and queries."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from kvstack.errors import KVStackError

__all__ = ["FORMAT", "FORMAT_VERSION", "Calibration", "CalibrationError", "file_digest"]

FORMAT = "kvstack-calibration"
FORMAT_VERSION = 1
METADATA_KEY = "kvstack_calibration"
TENSOR_FIELDS: tuple[str, ...] = (
    "key_second_moment",
    "key_mean",
    "value_second_moment",
    "value_mean",
    "key_absmax",
    "key_pair_norm_max",
    "query_pair_norm_max",
    "key_basis",
    "key_spectrum",
    "value_basis",
    "value_spectrum",
)


class CalibrationError(KVStackError):
    """A calibration artefact is missing, corrupt or made for another model; the message is one line."""


def file_digest(path: Path) -> str:
    """The sha256 of the file's bytes, in hex: what a result records of the artefacts it was measured with."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Calibration:
    """Per-layer, per-KV-head statistics of a model's keys, values and queries (float32 tensors).

    ``L`` is the number of decoder layers, ``H`` the number of KV heads, ``Hq`` the number of query
    heads (query head ``j`` reads KV head ``j // (Hq // H)``) and ``D`` the head dimension. Keys are taken
    *before* RoPE. Channel ``c`` and ``c + D/2`` form the pair RoPE rotates (transformers' ``rotate_half``
    layout), so pair norms are the same before and after RoPE.

    Attributes
    ----------
    key_second_moment
        ``[L, H, D, D]``: ``sum_t k_t k_t^T`` over every calibration token (uncentred, not divided by
        ``tokens``).
    key_mean
        ``[L, H, D]``: mean pre-RoPE key.
    value_second_moment
        ``[L, H, D, D]``: ``sum_t v_t v_t^T``.
    value_mean
        ``[L, H, D]``: mean value.
    key_absmax
        ``[L, H, D]``: ``max_t |k_t[c]|`` per channel.
    key_pair_norm_max
        ``[L, H, D/2]``: ``max_t sqrt(k_t[c]^2 + k_t[c + D/2]^2)``.
    query_pair_norm_max
        ``[L, H, D/2]``: the same for queries, maximised over the ``Hq / H`` query heads of each KV group.
    key_basis
        ``[L, H, D, D]``: eigenvectors of ``key_second_moment`` as columns, by descending eigenvalue (the
        right singular vectors of the stacked keys). Each column's largest-magnitude entry is positive.
    key_spectrum
        ``[L, H, D]``: the matching eigenvalues, descending, non-negative (squared singular values: the
        key energy ``sum_t |k_t|^2`` captured by each direction).
    value_basis, value_spectrum
        The same for values.
    model_key
        :func:`model_key` of the model the statistics belong to.
    model_name
        The model's ``name_or_path`` (or its model type when it has none).
    num_layers, num_kv_heads, num_q_heads, head_dim
        ``L``, ``H``, ``Hq``, ``D``.
    tokens
        Number of calibration tokens.
    sequence_length
        Tokens per forward pass (the longest context seen).
    source
        Description of the calibration text, starting with ``source_label(source) + ":"``.
    created
        ISO-8601 UTC timestamp of the calibration.
    """

    key_second_moment: torch.Tensor
    key_mean: torch.Tensor
    value_second_moment: torch.Tensor
    value_mean: torch.Tensor
    key_absmax: torch.Tensor
    key_pair_norm_max: torch.Tensor
    query_pair_norm_max: torch.Tensor
    key_basis: torch.Tensor
    key_spectrum: torch.Tensor
    value_basis: torch.Tensor
    value_spectrum: torch.Tensor
    model_key: str
    model_name: str
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    tokens: int
    sequence_length: int
    source: str
    created: str

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "num_q_heads", "head_dim", "tokens", "sequence_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CalibrationError(f"calibration field {name} must be a positive integer, got {value!r}")
        if self.head_dim % 2:
            raise CalibrationError(f"head_dim must be even (RoPE channel pairs), got {self.head_dim}")
        if self.num_q_heads % self.num_kv_heads:
            raise CalibrationError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for name, shape in self.expected_shapes().items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise CalibrationError(f"calibration field {name} must be a tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape:
                raise CalibrationError(
                    f"calibration tensor {name} has shape {tuple(tensor.shape)}, expected {shape}"
                )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape every tensor field must have, from the geometry fields."""
        layers, heads, dim = self.num_layers, self.num_kv_heads, self.head_dim
        square, vector, half = (layers, heads, dim, dim), (layers, heads, dim), (layers, heads, dim // 2)
        return {
            "key_second_moment": square,
            "key_mean": vector,
            "value_second_moment": square,
            "value_mean": vector,
            "key_absmax": vector,
            "key_pair_norm_max": half,
            "query_pair_norm_max": half,
            "key_basis": square,
            "key_spectrum": vector,
            "value_basis": square,
            "value_spectrum": vector,
        }

    def geometry(self) -> tuple[int, int, int, int]:
        """``(num_layers, num_kv_heads, num_q_heads, head_dim)``."""
        return (self.num_layers, self.num_kv_heads, self.num_q_heads, self.head_dim)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by name."""
        return {name: getattr(self, name) for name in TENSOR_FIELDS}

    def metadata(self) -> dict[str, Any]:
        """Every non-tensor field by name (JSON-serialisable)."""
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in TENSOR_FIELDS
        }

    def energy_fraction(self, rank: int, kind: str = "key") -> torch.Tensor:
        """Fraction of the key (or value) energy captured by the top ``rank`` basis directions.

        Parameters
        ----------
        rank
            Number of leading directions, ``0 <= rank <= head_dim``.
        kind
            ``"key"`` or ``"value"``.

        Returns
        -------
        torch.Tensor
            ``[L, H]`` float32: ``sum(spectrum[..., :rank]) / sum(spectrum)`` (1 where the energy is 0).
        """
        if kind not in ("key", "value"):
            raise CalibrationError(f"kind must be 'key' or 'value', got {kind!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= self.head_dim:
            raise CalibrationError(f"rank must be an integer in [0, {self.head_dim}], got {rank!r}")
        spectrum = getattr(self, f"{kind}_spectrum").double()
        total = spectrum.sum(-1)
        top = spectrum[..., :rank].sum(-1)
        return torch.where(total > 0, top / total.clamp_min(1e-300), torch.ones_like(total)).float()

    def summary(self) -> str:
        """One line: model, tokens, geometry and the energy in the top ``D/2`` directions."""
        half = self.head_dim // 2
        keys = float(self.energy_fraction(half, "key").mean())
        values = float(self.energy_fraction(half, "value").mean())
        return (
            f"{self.model_key}: {self.tokens} tokens, {self.num_layers} layers x {self.num_kv_heads} KV heads x "
            f"{self.head_dim} dims; top {half}/{self.head_dim} directions hold {keys:.3f} of the pre-RoPE key "
            f"energy and {values:.3f} of the value energy (mean over layers and heads)"
        )
