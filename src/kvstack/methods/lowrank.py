"""Low-rank KV codecs (taxonomy §1.5): cache rank-``r`` latents, reconstruct keys and values from them.

``palu(rank=32)`` follows Palu (Chang et al., 2025): per layer and KV head, a projection onto the top
``rank`` principal directions of the keys (taken *before* RoPE, where they are low-rank) and of the
values, fitted on a calibration run (:mod:`kvstack.calibration`, ``kvstack calibrate --model ...``).
Entries leaving the full-precision window are stored as ``[rank]`` latents in the model's dtype and
reconstructed block by block at attention time (keys re-rotated at their true positions). At
``rank = D / 2`` the encoded entries take half the bytes.

``gear(bits=2, rank=2)`` follows GEAR (Kang et al., 2024): a KIVI backbone plus, per KV head, a rank-``r``
SVD of the quantization error of each encoded span, and optionally sparse exact outliers.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvstack.contract import CodecError
from kvstack.lazy_import import lazy_module
from kvstack.methods.base import BudgetedMethod, check_sizes
from kvstack.methods.quantization import CHUNK_TOKENS, KIVI, Codec, check_outlier_fraction
from kvstack.spec import register

torch = lazy_module("torch")

__all__ = ["GEAR", "Loki", "Palu"]


@register(
    "palu",
    category="token/lowrank",
    description=(
        "Palu-style SVD latents: keys (before RoPE) and values projected on their top `rank` calibrated "
        "principal directions; needs `kvstack calibrate`."
    ),
)
@dataclasses.dataclass
class Palu(Codec):
    """Rank-``rank`` latents of keys and values from calibrated per-head projections.

    Parameters
    ----------
    rank:
        Latent dimension per KV head, ``1 <= rank <= D``, for keys and values alike.
    residual:
        Newest tokens kept in full precision.
    key_rank, value_rank:
        Separate ranks (default: ``rank``). Keys before RoPE are far more compressible than values
        (SmolLM2: the top 16 of 64 directions hold 94% of the key energy, 61% of the value energy), so
        ``key_rank=16, value_rank=48`` holds the same bytes as ``rank=32`` with less error.
    """

    rank: int = 32
    residual: int = 32
    key_rank: int | None = None
    value_rank: int | None = None

    def __post_init__(self) -> None:
        check_sizes(rank=self.rank, residual=self.residual, key_rank=self.key_rank, value_rank=self.value_rank)
        for name, value in (("rank", self.rank), ("key_rank", self.key_rank), ("value_rank", self.value_rank)):
            if value is not None and value < 1:
                raise CodecError(f"{name} must be >= 1, got {value}")

    def ranks(self) -> tuple[int, int]:
        """``(key rank, value rank)``."""
        return self.key_rank or self.rank, self.value_rank or self.rank

    def check(self, head_dim: int) -> None:
        for value in self.ranks():
            if value > head_dim:
                raise CodecError(f"rank {value} is above the head dimension {head_dim}; choose 1 to {head_dim}")

    def needs_calibration(self) -> bool:
        return True

    def chunk_tokens(self) -> int:
        return CHUNK_TOKENS

    def pre_rope(self) -> bool:
        return True

    def stream_kind(self) -> str:
        return "latent"


@register(
    "gear",
    category="token/lowrank",
    description=(
        "GEAR: KIVI-quantized keys and values plus a rank-`rank` SVD of each encoded span's quantization "
        "error per head; `outliers` > 0 also keeps that fraction of elements exactly (GEAR vs GEAR-L)."
    ),
)
@dataclasses.dataclass
class GEAR(KIVI):
    """GEAR (Kang et al., 2024): quantization, low-rank error and sparse outliers, ``X ~ Q + L + S``.

    The backbone ``Q`` is KIVI (keys per channel in groups of ``group_size`` tokens, values per token,
    every KIVI option applies). Each time entries are encoded (the prompt, in slabs of up to 512
    tokens, then every chunk leaving the full-precision window while decoding) the error ``X - Q`` of
    each (sequence, KV head) is factorised by SVD and its top ``rank`` directions kept: a ``[rank, D]``
    float16 basis per span and ``[rank]`` float16 coordinates per token, about ``16 * rank / D`` extra
    bits per element. ``outliers=s`` keeps the fraction ``s`` of each chunk's elements, those furthest
    from their group's mean, exactly (float16 value + int16 index, 32 bits each) and out of the
    quantization range; the paper's GEAR uses ``s = 0.02``, its cheaper GEAR-L ``s = 0`` (the default).

    Parameters
    ----------
    rank:
        Rank of the error approximation per span and head, ``1 <= rank <= D``.
    outliers:
        Fraction in ``[0, 0.5)`` of elements kept exactly; not combinable with ``outlier_channels``.
    """

    rank: int = 2
    outliers: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sizes(rank=self.rank)
        if self.rank < 1:
            raise CodecError(f"rank must be >= 1 (rank 0 is plain kivi), got {self.rank}")
        check_outlier_fraction(self.outliers)
        if self.outliers and self.outlier_channels:
            raise CodecError("gear: choose either sparse `outliers` or `outlier_channels`, not both")

    def check(self, head_dim: int) -> None:
        super().check(head_dim)
        if self.rank > head_dim:
            raise CodecError(f"rank {self.rank} is above the head dimension {head_dim}; choose 1 to {head_dim}")

    def outlier_fraction(self) -> float:
        return float(self.outliers)

    def residual_rank(self) -> int:
        return self.rank


@register(
    "loki",
    category="token/lowrank",
    description=(
        "Loki: each query attends only to its top entries by approximate scores in the keys' top-`rank` "
        "per-head PCA directions (fitted online on the prompt); keeps every entry."
    ),
)
@dataclasses.dataclass
class Loki(BudgetedMethod):
    """Loki (Singhania et al., 2024): low-rank keys for approximate attention scoring.

    When the prompt has been read, each layer fits a per-head PCA basis to its cached keys (an
    eigen-decomposition of ``K^T K``) and stores the keys, and every later key, rotated into it; queries
    are rotated the same way, so exact scores are unchanged. Each query then scores every entry with
    the first ``rank`` coordinates only, keeps its top entries (``ratio`` of the visible ones skipped,
    or ``budget`` attended), and attends exactly over those. Nothing is evicted: Loki saves attention
    work, not memory, and kvstack reports its bytes as the full cache's plus the bases.
    """

    rank: int = 16

    sparse_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_sizes(rank=self.rank)
        if self.rank < 1:
            raise CodecError(f"rank must be >= 1, got {self.rank}")
        super().__post_init__()

    def compresses(self) -> bool:
        return False

    def attended(self, visible: int) -> int:
        """Entries a query with ``visible`` entries attends to."""
        return max(1, min(visible, self.base_budget(visible)))

    def key_basis(self, keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Each head's PCA basis of its prompt keys (eigenvectors of ``K^T K``), principal directions first."""
        keys = keys.float()
        if valid is not None:
            keys = keys * valid.unsqueeze(-1)
        _, vectors = torch.linalg.eigh(keys.transpose(-1, -2) @ keys)  # ascending eigenvalues
        return vectors.flip(-1)

    def approximate_dims(self, head_dim: int) -> int:
        return min(self.rank, head_dim)
