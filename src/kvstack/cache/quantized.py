"""A layer's encoded entries: what a codec has encoded, held in streams (:mod:`kvstack.cache.streams`).

A :class:`QuantizedRegion` holds, for keys and for values, a stream of bit-packed codes (or low-rank latents),
plus each entry's true position and method state. It grows by whole chunks (``codec.chunk_tokens()`` tokens,
a multiple of every token group), decodes one block (``BLOCK_TOKENS``) at a time for
:func:`kvstack.cache.blockwise.blockwise_attention`, and reads its codes in place through the fused kernels
when one token is decoded.

Shapes: ``B`` batch, ``H`` KV heads, ``Hq = G * H`` query heads, ``N`` encoded entries, ``D`` head dim.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvstack.cache import kernels
from kvstack.cache.codecs import unpack_float
from kvstack.cache.streams import (
    ChannelSplitStream,
    LatentStream,
    LowRankResidualStream,
    PackedStream,
    random_hadamard,
    smoothing_factors,
)
from kvstack.contract import CodecSpec, TensorFormat

BLOCK_TOKENS = 1024  # entries decoded at a time by attention (rounded to whole chunks)
ENCODE_TOKENS = 512  # tokens encoded per step when a long prompt is flushed
FUSED_KERNELS = True  # decode one token with the compiled kernels when they are available


def growth_tokens(length: int, chunk: int) -> int:
    """Spare encoded slots kept when the region grows: one chunk or about 3%, whichever is larger."""
    return max(chunk, chunk * (length // (32 * chunk)))


class QuantizedRegion:
    """The encoded entries of one layer: packed keys and values, positions and method state.

    Parameters
    ----------
    codec:
        The codec (formats, outliers, rotation, pre-RoPE).
    batch, heads, head_dim, dtype, device:
        Geometry of the layer and the dtype entries decode to.
    per_head_positions:
        True when heads may hold different tokens (a selection method evicts); otherwise positions are
        shared by the heads: implicit while the entries are consecutive tokens at the same positions in every
        sequence (``position_start + index``, no tensor held), else stored once per sequence, ``[B, 1, N]``.
    state_names:
        Per-entry float32 method state kept alongside (e.g. H2O's accumulated attention).
    rope_inv_freq:
        ``[D/2]`` RoPE inverse frequencies, needed by pre-RoPE codecs.
    layer_idx:
        Seeds the layer's random rotation.
    """

    def __init__(
        self,
        codec: CodecSpec,
        batch: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        per_head_positions: bool,
        state_names: tuple[str, ...] = (),
        rope_inv_freq: torch.Tensor | None = None,
        layer_idx: int = 0,
        calibration: Any = None,
    ) -> None:
        self.codec = codec
        self.batch, self.heads, self.head_dim, self.dtype, self.device = batch, heads, head_dim, dtype, device
        self.chunk = codec.chunk_tokens()
        outliers = math.ceil(codec.outlier_fraction() * self.chunk * head_dim)
        self.keys: PackedStream | ChannelSplitStream | LowRankResidualStream | LatentStream
        self.values: PackedStream | LowRankResidualStream | LatentStream
        if codec.stream_kind() == "latent":
            if calibration is None:
                raise ValueError(f"{codec.label()} needs the model's calibration (kvstack calibrate --model ...)")
            key_rank, value_rank = codec.ranks()
            self.keys = LatentStream(calibration.key_basis[layer_idx, :, :, :key_rank], batch, heads, dtype, device)
            self.values = LatentStream(
                calibration.value_basis[layer_idx, :, :, :value_rank], batch, heads, dtype, device
            )
        else:
            channels, wide_bits = codec.key_outlier_channels()
            if channels:
                narrow = codec.key_format()
                wide = TensorFormat(wide_bits, narrow.group_size, narrow.along)
                self.keys = ChannelSplitStream(wide, narrow, channels, batch, heads, head_dim, self.chunk, device)
            else:
                self.keys = PackedStream(codec.key_format(), batch, heads, head_dim, self.chunk, outliers, device)
            self.values = PackedStream(codec.value_format(), batch, heads, head_dim, self.chunk, outliers, device)
            if codec.residual_rank():
                self.keys = LowRankResidualStream(self.keys, codec.residual_rank(), self.chunk, device)
                self.values = LowRankResidualStream(self.values, codec.residual_rank(), self.chunk, device)
        self.positions = torch.empty((batch, heads if per_head_positions else 1, 0), dtype=torch.int32, device=device)
        self.per_head_positions = per_head_positions
        self.implicit_positions = not per_head_positions  # positions are position_start + index, none stored
        self.position_start = 0
        self.state = {name: torch.empty((batch, heads, 0), dtype=torch.float32, device=device) for name in state_names}
        self.length = 0
        self.capacity = 0
        # The randomized Hadamard matrix, held as its [D, D] int8 signs (its entries are +-1/sqrt(D)); applied
        # to the values, and to the keys unless rotate='hadamard-values'.
        self.rotation_signs: torch.Tensor | None = None
        self.rotates_keys = codec.rotation() == "hadamard"
        if codec.rotation() is not None:
            hadamard = random_hadamard(head_dim, seed=1000 + layer_idx) * math.sqrt(head_dim)
            self.rotation_signs = hadamard.round().to(torch.int8).to(device)
        self.smoothing: torch.Tensor | None = None  # [1, H, 1, D] per-channel key divisors
        if codec.smoothing() is not None:
            if calibration is None:
                raise ValueError(f"{codec.label()} needs the model's calibration (kvstack calibrate --model ...)")
            self.smoothing = smoothing_factors(calibration, layer_idx, float(codec.smoothing())).to(device)
        self.rope_inv_freq = rope_inv_freq
        if codec.pre_rope() and rope_inv_freq is None:
            raise ValueError(f"{codec.label()} quantizes keys before RoPE and needs the model's RoPE frequencies")

    # ------------------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes held: packed payload, scales, zero points, outliers, positions, state, rotation, smoothing."""
        total = self.keys.nbytes() + self.values.nbytes() + self.positions.nbytes
        total += sum(t.nbytes for t in self.state.values())
        return total + sum(t.nbytes for t in (self.rotation_signs, self.smoothing) if t is not None)

    @property
    def rotation(self) -> torch.Tensor | None:
        """``[D, D]`` float32 randomized Hadamard rotation (a transient built from the stored signs), or None."""
        if self.rotation_signs is None:
            return None
        return self.rotation_signs.float() * self.head_dim ** -0.5

    # ------------------------------------------------------------------------------ key transforms
    def _encode_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from kvstack.cache.rope import rope_shift

        if self.codec.pre_rope():
            keys = rope_shift(keys, -positions.expand(keys.shape[:3]).float(), self.rope_inv_freq)
        if self.smoothing is not None:
            keys = keys.float() / (self.smoothing if keys.shape[1] == self.heads else self.smoothing[:, :1])
        if self.rotates_keys:
            keys = keys.float() @ self.rotation
        return keys

    def _rotate(self, values: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation
        return values if rotation is None else values.float() @ rotation

    def _unrotate(self, values: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation
        return values if rotation is None else values @ rotation.T.to(values.dtype)

    def _decode_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from kvstack.cache.rope import rope_shift

        if self.rotates_keys:
            keys = self._unrotate(keys)
        if self.smoothing is not None:
            keys = keys * self.smoothing.to(keys.dtype)
        if self.codec.pre_rope():
            keys = rope_shift(keys, positions.expand(keys.shape[:3]).float(), self.rope_inv_freq)
        return keys

    # ------------------------------------------------------------------------------ storage
    def flushable(self, full_precision: int) -> int:
        """How many of ``full_precision`` waiting entries to encode now: whole chunks, after the codec's sinks
        and before its residual window (0 when there is not a whole chunk yet)."""
        count = full_precision - self.codec.sink_tokens() - self.codec.residual_tokens()
        return max(0, count // self.chunk * self.chunk)

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, state: dict[str, torch.Tensor],
        exact: bool = False,
    ) -> None:
        """Encode ``[B, H, n, D]`` entries (``n`` a multiple of the chunk) after the existing ones.

        ``positions`` ``[B, H or 1, n]`` int32; ``state`` maps each state name to ``[B, H, n]``. ``exact``:
        grow to exactly the entries held (no spare chunks), as at the end of a prompt.
        """
        n = keys.shape[2]
        assert n % self.chunk == 0, (n, self.chunk)
        needed = self.length + n
        if needed > self.capacity:
            self._resize(needed + (0 if exact else growth_tokens(needed, self.chunk)))
        start = self.length
        if self.implicit_positions:
            self._keep_positions_implicit(positions[:, :1])
        step = max(self.chunk, ENCODE_TOKENS // self.chunk * self.chunk)
        for offset in range(0, n, step):  # in slabs, so encoding temporaries stay small
            part = slice(offset, min(offset + step, n))
            self.keys.encode(self._encode_keys(keys[:, :, part], positions[:, :, part]), start + offset)
            self.values.encode(self._rotate(values[:, :, part]), start + offset)
        if not self.implicit_positions:
            self.positions[:, :, start:needed] = positions[:, : self.positions.shape[1]]
        for name, tensor in self.state.items():
            tensor[:, :, start:needed] = state[name]
        self.length = needed

    def _keep_positions_implicit(self, positions: torch.Tensor) -> None:
        """Check that new entries' ``[B, 1, n]`` positions continue the implicit run; store them all if not."""
        if positions.shape[-1] == 0:
            return
        first = self.position_start if self.length else int(positions[0, 0, 0])
        expected = torch.arange(first + self.length, first + self.length + positions.shape[-1],
                                dtype=positions.dtype, device=positions.device)
        if bool((positions == expected).all()):
            self.position_start = first
            return
        stored = torch.empty((self.batch, 1, self.capacity), dtype=torch.int32, device=self.device)
        stored[:, :, : self.length] = self.positions_between(0, self.length)
        self.positions, self.implicit_positions = stored, False

    def positions_between(self, start: int, stop: int) -> torch.Tensor:
        """``[B, H or 1, stop - start]`` int32 true positions of encoded entries ``start:stop``."""
        if self.implicit_positions:
            run = torch.arange(self.position_start + start, self.position_start + stop, dtype=torch.int32,
                               device=self.device)
            return run.expand(self.batch, 1, -1)
        return self.positions[:, :, start:stop]

    def _resize(self, capacity: int) -> None:
        live = self.length
        self.keys.resize(capacity, live)
        self.values.resize(capacity, live)

        def grown(tensor: torch.Tensor) -> torch.Tensor:
            new = tensor.new_empty((*tensor.shape[:2], capacity))
            new[:, :, :live] = tensor[:, :, :live]
            return new

        if not self.implicit_positions:
            self.positions = grown(self.positions)
        self.state = {name: grown(t) for name, t in self.state.items()}
        self.capacity = capacity

    def shrink_to_fit(self) -> None:
        """Release every spare slot (after a prompt); the next append grows with room to spare."""
        if self.capacity > self.length:
            self._resize(self.length)

    def live_positions(self) -> torch.Tensor:
        """``[B, H, N]`` int32 true positions of the encoded entries."""
        return self.positions_between(0, self.length).expand(self.batch, self.heads, -1)

    def block_bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each attention block: ``BLOCK_TOKENS`` rounded to whole chunks."""
        step = max(self.chunk, BLOCK_TOKENS // self.chunk * self.chunk)
        return [(start, min(start + step, self.length)) for start in range(0, self.length, step)]

    def decode(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, stop - start, D]`` of tokens ``start:stop`` (whole chunks), model dtype."""
        keys = self.keys.decode(start, stop, torch.float32)
        keys = self._decode_keys(keys, self.positions_between(start, stop)).to(self.dtype)
        values = self._unrotate(self.values.decode(start, stop, torch.float32)).to(self.dtype)
        return keys, values

    def decode_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every encoded entry decoded (a transient full-precision copy: for selection, never for attention)."""
        if self.length == 0:
            empty = torch.empty((self.batch, self.heads, 0, self.head_dim), dtype=self.dtype, device=self.device)
            return empty, empty.clone()
        return self.decode(0, self.length)

    def clear(self) -> None:
        """Drop every encoded entry and release the storage."""
        self.length = 0
        self._resize(0)
        if not self.per_head_positions:  # the next entries may again be a consecutive run
            self.positions = self.positions[:, :, :0]
            self.implicit_positions = True

    def replace_entry(
        self, b: int, h: int, slot: int, key: torch.Tensor, value: torch.Tensor, position: int,
        state: dict[str, float],
    ) -> None:
        """Put a new entry (``key``/``value`` ``[D]``) into ``slot`` of one head, re-encoding its chunk.

        Only possible with per-head positions (the evicting methods). The chunk is decoded, the entry
        replaced and the chunk encoded again, so the chunk's other entries keep their values up to one
        more rounding where the group's range changes.
        """
        start = slot // self.chunk * self.chunk
        stop = start + self.chunk
        chunk_positions = self.positions[b, h, start:stop].clone()
        chunk_positions[slot - start] = position
        keys = self.keys.decode_head(b, h, start, stop, torch.float32)
        encoded_key = key.float().view(1, 1, 1, -1)
        if self.smoothing is not None:  # _encode_keys divides by every head's factors; keep head h's
            encoded_key = encoded_key.expand(1, self.heads, 1, -1)
        encoded = self._encode_keys(encoded_key, torch.tensor(position).view(1, 1, 1))
        keys[slot - start] = encoded[0, h if self.smoothing is not None else 0, 0]
        values = self.values.decode_head(b, h, start, stop, torch.float32)
        values[slot - start] = self._rotate(value.float().view(1, -1))[0]
        self.keys.encode_head(b, h, keys, start)
        self.values.encode_head(b, h, values, start)
        self.positions[b, h, slot] = position
        for name, tensor in self.state.items():
            tensor[b, h, slot] = state[name]


    # ------------------------------------------------------------------------------ decoding fast path
    @kernels.without_cpu_autocast
    def attend_one(
        self, query: torch.Tensor, tail_keys: torch.Tensor, tail_values: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Attention of one new token per sequence over ``[region | tail]``, nothing masked, no statistics.

        Two passes over the blocks: scores of every block (:meth:`scores`), one softmax over the
        ``[B, Hq, N + P]`` weights, then the values block by block (:meth:`weighted_values`), in float32
        with CPU autocast off; the output is cast back to the query's dtype.

        Parameters
        ----------
        query:
            ``[B, Hq, 1, D]``.
        tail_keys, tail_values:
            ``[B, H, P, D]`` full-precision entries after the region (the new token among them).

        Returns
        -------
        torch.Tensor
            ``[B, 1, Hq, D]``.
        """
        batch, num_q_heads, _, head_dim = query.shape
        grouped = (query.float() * scaling).view(batch, self.heads, num_q_heads // self.heads, head_dim)
        scores = torch.cat((self.scores(grouped), grouped @ tail_keys.float().transpose(-1, -2)), dim=-1)
        weights = torch.softmax(scores, dim=-1)
        encoded = self.length
        output = self.weighted_values(weights[..., :encoded]) + weights[..., encoded:] @ tail_values.float()
        return output.to(query.dtype).view(batch, num_q_heads, 1, head_dim).transpose(1, 2)

    @kernels.without_cpu_autocast
    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Dot products of query rows with every encoded key, in the model's basis.

        Keys are never rescaled element by element when the fused kernels run; otherwise one block is
        decoded at a time. A Hadamard rotation and smoothing are folded into the query.

        Parameters
        ----------
        query:
            ``[B, H, R, D]`` float32 rows per KV head (e.g. the ``G`` query heads of a group, times scaling);
            a narrower dtype (bf16 under CPU autocast) is widened, and autocast is off here, so the rotation
            and the scores are float32 either way.

        Returns
        -------
        torch.Tensor
            ``[B, H, R, N]`` float32.
        """
        query = query.float()
        rotated = query * self.smoothing if self.smoothing is not None else query  # q.(k'l) = (q l).k'
        rotated = rotated @ self.rotation if self.rotates_keys else rotated
        encoded = self.length
        if self._fused_decoding():
            if isinstance(self.keys, ChannelSplitStream):  # q.k = q_wide.k_wide + q_narrow.k_narrow
                wide, narrow = self.keys.permute_query(rotated)
                return _packed_scores(self.keys.wide, wide, encoded) + _packed_scores(self.keys.narrow, narrow, encoded)
            return _packed_scores(self.keys, rotated, encoded)
        scores = torch.empty((*query.shape[:3], encoded), device=query.device)
        for start, stop in self.block_bounds():
            keys = self.keys.decode(start, stop, torch.float32)
            if self.codec.pre_rope():  # _decode_keys undoes rotation and smoothing too
                keys = self._decode_keys(keys, self.positions_between(start, stop))
                scores[..., start:stop] = query @ keys.transpose(-1, -2)
            else:
                scores[..., start:stop] = rotated @ keys.transpose(-1, -2)
        return scores

    @kernels.without_cpu_autocast
    def weighted_values(self, weights: torch.Tensor) -> torch.Tensor:
        """``[B, H, R, N]`` float32 weights over every encoded entry applied to their values: ``[B, H, R, D]``
        float32 in the model's basis (value scales and zero points are folded into the weights); narrower
        weights are widened, and CPU autocast is off here."""
        weights = weights.float()
        values = self.values
        if self._fused_decoding():
            out = kernels.packed_weighted_values(
                values.codes, values.scale, values.zero, weights.contiguous(), self.length, values.fmt.bits,
                values.fmt.group_size, values.fmt.along == "tokens",
            )
        else:
            out = torch.zeros((*weights.shape[:3], self.head_dim), device=weights.device)
            for start, stop in self.block_bounds():
                out += self._weighted_values(weights[..., start:stop], start, stop)
        return self._unrotate(out)

    def _fused_decoding(self) -> bool:
        """Whether the compiled kernels (:mod:`kvstack.cache.kernels`) can decode this region."""
        streams = (self.keys, self.values)
        return (
            self.device.type == "cpu" and not self.codec.pre_rope() and FUSED_KERNELS
            and all(isinstance(s, (PackedStream, ChannelSplitStream)) and not s.outliers for s in streams)
            and kernels.available()
        )

    def _weighted_values(self, weights: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``weights @ values[start:stop]`` (``[B, H, G, n]`` -> ``[B, H, G, D]``) in the stored (rotated) basis."""
        stream = self.values
        if not isinstance(stream, PackedStream) or stream.outliers or stream.fmt.along != "channels":
            return weights @ stream.decode(start, stop, torch.float32)
        fmt = stream.fmt
        codes = unpack_float(stream.codes[:, :, start:stop], fmt.bits)  # [B, H, n, D]
        scale = stream.scale[:, :, start:stop].float()  # [B, H, n, J]
        zero = stream.zero[:, :, start:stop].float()
        width = fmt.group_size
        parts = [
            (weights * scale[..., j].unsqueeze(2)) @ codes[..., j * width : (j + 1) * width]
            for j in range(scale.shape[-1])
        ]
        offsets = (weights @ zero).repeat_interleave(width, dim=-1)  # [B, H, G, D]
        return torch.cat(parts, dim=-1) + offsets


def _packed_scores(stream: PackedStream, query: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H, R, N]`` dot products of ``query`` ``[B, H, R, D]`` with a packed stream's first ``N`` entries."""
    fmt = stream.fmt
    return kernels.packed_scores(stream.codes, stream.scale, stream.zero, query, length, fmt.bits, fmt.group_size,
                                 fmt.along == "tokens")


