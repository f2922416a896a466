"""Token-level quantization codecs (taxonomy §1.4): *how* kept entries are encoded, not *which* are kept.

A codec is the second term of a spec (``snapkv(ratio=0.5) + kivi(bits=2)``) or a spec on its own
(``kivi(bits=2)``, which keeps every token). The cache layer keeps the newest entries in full precision
(the residual window, plus optional attention sinks) and encodes older ones, chunk by chunk, into
packed integer storage (:mod:`kvstack.cache.quantized`); selection always acts on every entry, encoded
or not.

Formats
-------
Keys and values each have a :class:`TensorFormat`: ``bits`` (2, 4 or 8), ``group_size`` and ``along``:

* ``along="channels"``: per-token quantization, one scale and zero point per ``group_size`` channels
  of a token (FlexGen; KIVI's values).
* ``along="tokens"``: per-channel quantization, one scale and zero point per channel for each group of
  ``group_size`` consecutive tokens (KIVI's and KVQuant's keys, whose outliers sit in fixed channels).

Scales and zero points are float16; :meth:`KVStackCache.kv_bytes` counts them with the payload, the
full-precision window, positions and any sparse outliers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from kvstack.contract import CodecError, TensorFormat, check_bits
from kvstack.methods.base import WrapperMethod, check_sizes
from kvstack.spec import MethodInfo, SpecError, register

__all__ = ["KIVI", "Codec", "KVQuant", "Quant", "TensorFormat"]

CHUNK_TOKENS = 32  # tokens encoded at a time by per-token codecs (whole key groups for per-channel ones)
ROTATIONS = (None, "hadamard", "hadamard-values")


@dataclasses.dataclass
class Codec:
    """Base of every codec. Subclasses are dataclasses registered under the name users type.

    Attributes every codec has
    --------------------------
    residual:
        Newest tokens kept in full precision (KIVI's ``R``); encoding happens whole chunks at a time, so
        between ``residual`` and ``residual + chunk - 1`` tokens are in full precision.
    """

    spec_name: ClassVar[str]
    info: ClassVar[MethodInfo]
    is_codec: ClassVar[bool] = True

    def stream_kind(self) -> str:
        """``"packed"``: integer codes (:class:`~kvstack.cache.quantized.PackedStream`); ``"latent"``: low rank."""
        return "packed"

    def key_format(self) -> TensorFormat:
        raise NotImplementedError

    def value_format(self) -> TensorFormat:
        raise NotImplementedError

    def residual_tokens(self) -> int:
        return int(getattr(self, "residual", 0))

    def sink_tokens(self) -> int:
        """Oldest tokens kept in full precision (attention sinks)."""
        return 0

    def pre_rope(self) -> bool:
        """True when keys are quantized before RoPE (KVQuant): un-rotated to encode, re-rotated to decode."""
        return False

    def rotation(self) -> str | None:
        """``"hadamard"``: keys and values are stored rotated by a randomized Hadamard matrix (QuaRot-style);
        ``"hadamard-values"``: only the values (keys keep their channels, e.g. for ``outlier_channels``)."""
        return None

    def smoothing(self) -> float | None:
        """SmoothAttention's migration strength ``alpha`` (keys divided per channel pair), or None."""
        return getattr(self, "smooth", None)

    def needs_calibration(self) -> bool:
        """True when the codec reads the model's calibration artefact (smoothing scales, projections)."""
        return self.smoothing() is not None

    def outlier_fraction(self) -> float:
        """Fraction of elements kept exactly as sparse float16 outliers (dense-and-sparse)."""
        return 0.0

    def key_outlier_channels(self) -> tuple[int, int]:
        """``(channels, bits)``: key channels stored at more bits than the rest (0 channels: none)."""
        return 0, 0

    def residual_rank(self) -> int:
        """Rank of the low-rank approximation of the quantization error kept per span (GEAR; 0: none)."""
        return 0

    def chunk_tokens(self) -> int:
        """Tokens encoded together: a multiple of the key and value token groups."""
        chunk = CHUNK_TOKENS
        for fmt in (self.key_format(), self.value_format()):
            if fmt.along == "tokens":
                chunk = max(chunk, fmt.group_size)
                if chunk % fmt.group_size:
                    chunk = fmt.group_size * -(-chunk // fmt.group_size)
        return chunk

    def check(self, head_dim: int) -> None:
        """Validate the codec against a model's head dimension (raises :class:`CodecError`)."""
        self.key_format().check(head_dim, "keys")
        self.value_format().check(head_dim, "values")
        channels, wide_bits = self.key_outlier_channels()
        if channels:
            narrow_bits = self.key_format().bits
            packs = (channels * wide_bits) % 8 == 0 and ((head_dim - channels) * narrow_bits) % 8 == 0
            if channels >= head_dim or not packs:
                raise CodecError(
                    f"outlier_channels {channels} does not fit the head dimension {head_dim}: both channel sets "
                    f"must pack into whole bytes and the outliers be fewer than {head_dim}; choose a multiple "
                    f"of 8 below {head_dim}, e.g. {max(8, head_dim // 4)}"
                )
        if self.rotation() is not None and head_dim & (head_dim - 1):
            raise CodecError(f"rotate={self.rotation()!r} needs a power-of-two head dimension, got {head_dim}")

    def label(self) -> str:
        """The canonical spec string of this codec with its non-default parameters."""
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.init and getattr(self, f.name) != f.default
        ]
        return f"{self.spec_name}({', '.join(parts)})" if parts else self.spec_name


def _check_group(value: Any, name: str = "group_size") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CodecError(f"{name} must be a positive integer, got {value!r}")


def check_outlier_fraction(value: Any) -> None:
    """Raise :class:`CodecError` unless ``value`` is a sparse-outlier fraction in ``[0, 0.5)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 0.5:
        raise CodecError(f"outliers must be a fraction in [0, 0.5), e.g. 0.01; got {value!r}")


def _check_rotation(value: Any) -> None:
    if value not in ROTATIONS:
        raise CodecError(f"rotate must be None, 'hadamard' or 'hadamard-values', got {value!r}")


def _check_smooth(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
        raise CodecError(f"smooth must be None or a migration strength in (0, 1], e.g. 0.5; got {value!r}")


@dataclasses.dataclass
class MinMaxCodec(Codec):
    """Shared parameters of the min-max codecs: width, group, residual window, rotation, smoothing."""

    bits: int = 2
    group_size: int = 32
    residual: int = 0
    rotate: str | None = None
    smooth: float | None = None
    sinks: int = 0
    key_bits: int | None = None
    value_bits: int | None = None
    value_group_size: int | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        _check_group(self.group_size)
        if self.value_group_size is not None:
            _check_group(self.value_group_size, "value_group_size")
        check_sizes(residual=self.residual, sinks=self.sinks)
        _check_rotation(self.rotate)
        _check_smooth(self.smooth)

    def rotation(self) -> str | None:
        return self.rotate

    def sink_tokens(self) -> int:
        return self.sinks

    def key_width(self) -> int:
        """Bits per key element: ``key_bits`` when set (e.g. KIVI's K4V2), else ``bits``."""
        return self.bits if self.key_bits is None else self.key_bits

    def value_width(self) -> int:
        """Bits per value element: ``value_bits`` when set, else ``bits``."""
        return self.bits if self.value_bits is None else self.value_bits

    def value_group(self) -> int:
        """Group size of the values: ``value_group_size`` when set, else ``group_size``."""
        return self.group_size if self.value_group_size is None else self.value_group_size


@register(
    "quant",
    category="token/quantization/fixed",
    description="Fixed precision (FlexGen-style): keys and values per token, min-max in groups of group_size channels.",
)
@dataclasses.dataclass
class Quant(MinMaxCodec):
    """Fixed-precision, per-token group-wise asymmetric min-max quantization (FlexGen, Sheng et al., 2023).

    Both keys and values are quantized per token in groups of ``group_size`` channels; ``int8`` is
    ``quant(bits=8)``, ``int4`` is ``quant(bits=4)``. Per-token groups are where outlier channels hurt
    most, so ``rotate='hadamard'`` (QuaRot-style, see :class:`KIVI`) and ``smooth=alpha``
    (SmoothAttention-style, see :class:`KIVI`) are available here too.
    """

    bits: int = 8
    group_size: int = 64
    residual: int = 0

    def key_format(self) -> TensorFormat:
        return TensorFormat(self.key_width(), self.group_size, "channels")

    def value_format(self) -> TensorFormat:
        return TensorFormat(self.value_width(), self.value_group(), "channels")


@register(
    "kivi",
    category="token/quantization/fixed",
    description=(
        "KIVI: keys per channel (groups of group_size tokens), values per token; the newest `residual` "
        "tokens stay in full precision."
    ),
)
@dataclasses.dataclass
class KIVI(MinMaxCodec):
    """KIVI (Liu et al., 2024): tuning-free asymmetric 2/4-bit KV quantization.

    Keys are quantized per channel, each channel's scale and zero point shared by ``group_size``
    consecutive tokens (key outliers sit in a few fixed channels); values per token, in groups of
    ``group_size`` channels. The newest ``residual`` tokens stay in full precision and are flushed one
    whole group at a time. The paper uses ``group_size=32`` and ``residual`` from 32 to 128; at float32
    each 32 tokens of residual cost 0.25 bits per element at 4k tokens. ``rotate='hadamard'`` stores
    keys and values rotated by one randomized Hadamard matrix per layer (QuaRot-style), which spreads
    outlier channels over all channels; they are rotated back when read, so queries need no change.
    ``rotate='hadamard-values'`` rotates only the values (per-token groups gain; the keys keep their
    channels, which ``outlier_channels`` needs).
    ``smooth=alpha`` (SmoothAttention, QServe) divides each key channel pair by
    ``lambda = max|K|^alpha / max|Q|^(1 - alpha)`` from the model's calibration (``kvstack calibrate``)
    before quantizing and multiplies it back when reading; one factor per RoPE pair, so it commutes
    with RoPE. Per-token groups gain most; per-channel groups are nearly invariant to it.
    ``sinks=N`` keeps the first ``N`` tokens (attention sinks, which every head attends to heavily) in
    full precision, as KVQuant does; the paper's KIVI is ``sinks=0``. ``key_bits`` / ``value_bits`` override
    ``bits`` for one side (the paper's K4V2 is ``kivi(key_bits=4, value_bits=2)``), and
    ``value_group_size`` the values' group (``group_size`` otherwise).

    ``outlier_channels=C`` stores, per KV head, the ``C`` key channels with the widest range at
    ``outlier_bits`` instead of ``key_bits``. They are chosen in RoPE pairs (channels ``i`` and
    ``i + D/2`` rotate together, so a pair's range survives RoPE) from the first chunk a head encodes,
    usually the prompt, and stay fixed: KIVI's observation is that key outliers sit in a few persistent
    channels, which per-channel 2-bit groups then spend their whole range on. The channel order costs
    ``D`` bytes per head.
    """

    bits: int = 2
    group_size: int = 32
    residual: int = 32
    outlier_channels: int = 0
    outlier_bits: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        channels = self.outlier_channels
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 0 or channels % 2:
            raise CodecError(f"outlier_channels must be an even number >= 0 (whole RoPE pairs), got {channels!r}")
        check_bits(self.outlier_bits, "outlier_bits")

    def key_format(self) -> TensorFormat:
        return TensorFormat(self.key_width(), self.group_size, "tokens")

    def value_format(self) -> TensorFormat:
        return TensorFormat(self.value_width(), self.value_group(), "channels")

    def key_outlier_channels(self) -> tuple[int, int]:
        return self.outlier_channels, self.outlier_bits


@register(
    "kvquant",
    category="token/quantization/outlier",
    description=(
        "KVQuant-style: per-channel keys quantized before RoPE, dense-and-sparse outliers kept in float16, "
        "attention sinks in full precision."
    ),
)
@dataclasses.dataclass
class KVQuant(Codec):
    """KVQuant-style quantization (Hooper et al., 2024).

    Keys are quantized per channel *before* RoPE (their channel structure is cleaner there): stored
    un-rotated, re-rotated at their true positions when read. A fraction ``outliers`` of the elements
    of every encoded chunk, those furthest from their quantization group's mean in units of its
    standard deviation, is kept exactly as sparse float16 values with int16 indices, and excluded from
    the group's range. The first ``sinks`` tokens stay in full precision.
    """

    bits: int = 4
    group_size: int = 32
    residual: int = 32
    outliers: float = 0.01
    sinks: int = 1

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_group(self.group_size)
        check_sizes(residual=self.residual, sinks=self.sinks)
        check_outlier_fraction(self.outliers)

    def key_format(self) -> TensorFormat:
        return TensorFormat(self.bits, self.group_size, "tokens")

    def value_format(self) -> TensorFormat:
        return TensorFormat(self.bits, self.group_size, "channels")

    def sink_tokens(self) -> int:
        return self.sinks

    def pre_rope(self) -> bool:
        return True

    def outlier_fraction(self) -> float:
        return float(self.outliers)


@dataclasses.dataclass
class DemotionQuant(Quant):
    """The per-token format MiKV demotes evicted entries to: :class:`Quant` encoded one entry at a time.

    Entries arrive a few at a time, in any order of positions (whatever a selection method evicts), so
    this codec has no token groups and no residual window: its chunk is one token.
    """

    def chunk_tokens(self) -> int:
        return 1


@register(
    "mikv",
    category="token/quantization/mixed",
    description=(
        "MiKV: entries the inner selection method would evict stay in the cache at `bits` bits (per token, "
        "groups of group_size channels); the entries it keeps stay in full precision."
    ),
    wraps=True,
)
@dataclasses.dataclass
class MiKV(WrapperMethod):
    """Mixed-precision KV cache (MiKV, Yang et al., 2024, "No Token Left Behind").

    The inner method (``h2o``, ``snapkv``, ``streamingllm`` ...) ranks entries exactly as it does alone and
    keeps its budget in full precision; instead of being discarded, the entries it evicts are quantized to
    ``bits`` bits per element (asymmetric min-max per token, groups of ``group_size`` channels, float16
    scales and zero points) and kept, so every query still attends to every token. Evicted entries are
    never promoted back. ``rotate='hadamard'`` rotates the demoted keys and values first (QuaRot-style, as
    for the codecs), spreading outlier channels before the per-token quantization. The bytes are the
    full-precision budget plus the low-precision remainder, all counted by ``kv_bytes()``.
    """

    inner: Any = dataclasses.field(default=None)
    bits: int = 2
    group_size: int = 32
    rotate: str | None = None

    def __post_init__(self) -> None:
        from kvstack.methods.base import BudgetedMethod

        if not isinstance(self.inner, BudgetedMethod) or self.inner.headwise or self.inner.sparse_attention:
            raise SpecError("mikv wraps a uniform selection method with a budget, e.g. mikv(h2o(ratio=0.75), bits=2)")
        if self.inner.uses_cache_positions():
            raise SpecError("mikv needs true positions: use streamingllm with positions='original' inside it")
        check_bits(self.bits)
        _check_group(self.group_size)
        _check_rotation(self.rotate)
        self.adopt_inner()
        self.dynamic = self.inner.dynamic  # type: ignore[misc]

    def demotion_codec(self) -> DemotionQuant:
        """The low-precision format of the demoted entries."""
        return DemotionQuant(bits=self.bits, group_size=self.group_size, rotate=self.rotate)

