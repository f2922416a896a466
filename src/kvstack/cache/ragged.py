"""Per-head ragged storage: head-wise budgets (Ada-KV) keep one tensor per (sequence, KV head)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvstack.cache.blockwise import blockwise_attention
from kvstack.cache.capacity import growth_slack
from kvstack.cache.quantized import QuantizedRegion


class RaggedHeads:
    """Variable-length storage: one ``[capacity_i, D]`` keys/values tensor per (sequence, KV head).

    With a codec (``head_region`` builds one head's :class:`QuantizedRegion`), each head keeps its oldest
    entries encoded in its own region, a whole number of chunks, and the rest (its sinks and the newest
    ``residual`` to ``residual + chunk - 1`` entries) in full precision, exactly as a uniform layer does
    per layer.

    A head may hold merged entries (RazorAttention's compensation token): its ``log_mass`` ``[capacity_i]``
    float32 is the log of how many tokens each entry stands for (0 for an ordinary one), added to the entry's
    attention logit. Merged entries and a codec do not mix (the codec would encode the mass away).
    """

    def __init__(
        self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
        head_region: Callable[[], QuantizedRegion] | None = None,
    ) -> None:
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        count = batch * heads
        self.keys: list[torch.Tensor] = [torch.empty((0, head_dim), dtype=dtype, device=device)] * count
        self.values: list[torch.Tensor] = list(self.keys)
        self.positions: list[torch.Tensor] = [torch.empty(0, dtype=torch.int32, device=device)] * count
        self.lengths: list[int] = [0] * count  # full-precision entries per head
        self.log_mass: list[torch.Tensor | None] = [None] * count  # only heads holding a merged entry
        self.regions: list[QuantizedRegion] | None = None
        if head_region is not None:
            self.regions = [head_region() for _ in range(count)]

    def set_head(self, b: int, h: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 log_mass: torch.Tensor | None = None) -> None:
        """Store exactly these entries (``[n, D]``, ``[n, D]``, ``[n]``, oldest first) for one head, with the
        ``[n]`` log of how many tokens each stands for when some are merged (None: one each)."""
        i = b * self.heads + h
        if log_mass is not None and self.regions is not None:
            raise ValueError("merged entries cannot be stored beside a codec, which would encode their mass away")
        self.keys[i], self.values[i], self.positions[i] = keys.clone(), values.clone(), positions.clone()
        self.log_mass[i] = None if log_mass is None else log_mass.to(torch.float32).clone()
        self.lengths[i] = keys.shape[0]
        self._flush(i, room=0)  # the prompt is complete: hold exactly what is kept
        if self.regions is not None:
            self.regions[i].shrink_to_fit()

    def entries(self, i: int) -> int:
        """Entries held by head ``i`` (encoded + full precision)."""
        return self.lengths[i] + (self.regions[i].length if self.regions is not None else 0)

    def head_positions(self, i: int) -> torch.Tensor:
        """``[n]`` int32 true positions held by head ``i``: encoded ones first."""
        live = self.positions[i][: self.lengths[i]]
        if self.regions is None or not self.regions[i].length:
            return live
        return torch.cat((self.regions[i].live_positions()[0, 0], live))

    def nbytes(self) -> int:
        total = sum(t.nbytes for group in (self.keys, self.values, self.positions) for t in group)
        total += sum(t.nbytes for t in self.log_mass if t is not None)
        return total + (sum(region.nbytes() for region in self.regions) if self.regions is not None else 0)

    def _flush(self, i: int, room: int | None = None) -> None:
        """Encode whole chunks of head ``i``'s oldest full-precision entries, keeping its sinks and residual.

        The full-precision storage is reallocated with ``room`` spare slots (default: one chunk, the entries
        that arrive before the next flush)."""
        if self.regions is None:
            return
        region = self.regions[i]
        sinks, length = region.codec.sink_tokens(), self.lengths[i]
        count = region.flushable(length)
        if count == 0:
            return
        chosen = slice(sinks, sinks + count)
        region.append(self.keys[i][chosen].view(1, 1, count, -1), self.values[i][chosen].view(1, 1, count, -1),
                      self.positions[i][chosen].view(1, 1, count), {})
        kept = length - count  # the sinks, then the entries after the encoded ones
        capacity = kept + (region.chunk if room is None else room)
        for store in (self.keys, self.values, self.positions):
            new = store[i].new_empty((capacity, *store[i].shape[1:]))
            new[:sinks] = store[i][:sinks]
            new[sinks:kept] = store[i][sinks + count : length]
            store[i] = new
        self.lengths[i] = kept

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append ``[B, H, q, D]`` new entries (``positions`` ``[B, q]``) to every head."""
        q_len = keys.shape[2]
        for b in range(self.batch):
            for h in range(self.heads):
                i = b * self.heads + h
                length = self.lengths[i]
                needed = length + q_len
                if needed > self.keys[i].shape[0]:
                    capacity = needed + growth_slack(needed)
                    for store in (self.keys, self.values, self.positions, self.log_mass):
                        old = store[i]
                        if old is None:
                            continue
                        new = old.new_empty((capacity, *old.shape[1:]))
                        new[:length] = old[:length]
                        store[i] = new
                mass = self.log_mass[i]
                if mass is not None:
                    mass[length:needed] = 0.0  # new tokens stand for themselves
                self.keys[i][length:needed] = keys[b, h]
                self.values[i][length:needed] = values[b, h]
                self.positions[i][length:needed] = positions[b]
                self.lengths[i] = needed

    def flush(self) -> None:
        """Encode what each head's residual window has overflowed (after its attention)."""
        for i in range(len(self.lengths)):
            self._flush(i)

    def attend(self, query: torch.Tensor, causal: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``[B, Hq, q, D]`` queries over each head's own entries; returns ``[B, q, Hq, D]``.

        A head with encoded entries attends over ``[its region | its full-precision entries]`` one decoded
        block at a time (:func:`blockwise_attention`), or, for one new token with nothing masked, with the
        region's fused decoding (:meth:`QuantizedRegion.attend_one`).
        """
        _, num_q_heads, q_len, _ = query.shape
        group = num_q_heads // self.heads
        out = torch.empty_like(query)
        for b in range(self.batch):
            for h in range(self.heads):
                i = b * self.heads + h
                length = self.lengths[i]
                keys, values = self.keys[i][:length], self.values[i][:length]
                q = query[b, h * group : (h + 1) * group]  # [G, q, D]
                past = length - q_len
                mask = (self.positions[i][:length] >= 0).view(1, 1, length).expand(1, q_len, length).clone()
                tail = causal[b, 0] if causal is not None else torch.ones(q_len, q_len, dtype=torch.bool).tril()
                mask[:, :, past:] &= tail.to(mask.device)
                region = self.regions[i] if self.regions is not None else None
                if region is not None and region.length:
                    out[b, h * group : (h + 1) * group] = self._attend_encoded_head(
                        region, q, keys, values, mask, scaling
                    )
                    continue
                mass = self.log_mass[i]
                attn_mask = mask if mass is None else torch.where(
                    mask, mass[:length].view(1, 1, length).to(q.dtype), float("-inf"))
                out[b, h * group : (h + 1) * group] = F.scaled_dot_product_attention(
                    q, keys.unsqueeze(0).expand(group, -1, -1), values.unsqueeze(0).expand(group, -1, -1),
                    attn_mask=attn_mask, scale=scaling,
                )
        return out.transpose(1, 2)

    @staticmethod
    def _attend_encoded_head(
        region: QuantizedRegion, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
        mask: torch.Tensor, scaling: float,
    ) -> torch.Tensor:
        """One head's ``[G, q, D]`` queries over ``[region | keys/values [n, D]]`` (``mask`` ``[1, q, n]`` over
        the full-precision part); returns ``[G, q, D]``."""
        group, q_len, head_dim = query.shape
        tail_keys, tail_values = keys.view(1, 1, -1, head_dim), values.view(1, 1, -1, head_dim)
        region_valid = region.live_positions() >= 0  # [1, 1, N]
        if q_len == 1 and bool(mask.all()) and bool(region_valid.all()):
            output = region.attend_one(query.view(1, group, 1, head_dim), tail_keys, tail_values, scaling)
            return output.view(group, 1, head_dim)

        def blocks():
            for start, stop in region.block_bounds():
                block_keys, block_values = region.decode(start, stop)
                yield block_keys, block_values, region_valid[..., start:stop].unsqueeze(2)
            yield tail_keys, tail_values, mask.unsqueeze(0)  # [1, 1, q, n]

        output, _ = blockwise_attention(query.unsqueeze(0), blocks, scaling, set(), 0, None)  # [1, q, G, D]
        return output[0].transpose(0, 1)
