"""The paged pool of a model that caches latents (``mla``): per token and layer, rotary keys and one latent.

A model converted by ``mla`` (:mod:`kvstack.transforms.latent`) caches, per token and layer, a rotary key of
``d`` dimensions per KV head and one latent of ``r`` numbers, and rebuilds keys and values from them.
:class:`PagedLatentPool` stores exactly those numbers in the engine's fixed-size blocks, so a memory budget
holds ``2 H D / (H d + r)`` times as many tokens as :class:`~kvstack.engine.paged.PagedKVPool` would; the runner
rebuilds each sequence's keys and values from its blocks when it attends (``docs/engine-design.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from kvstack.engine.paged import BYTES_PER_MB, BlockTable, table_to_list
from kvstack.errors import KVStackError

__all__ = ["PagedLatentPool"]

_NAME = "latents"  # the one tensor of an exported block


class PagedLatentPool:
    """Every layer's rotary keys and latents, in fixed-size blocks of one preallocated tensor.

    Parameters
    ----------
    num_blocks, num_layers, block_size : int
        As for :class:`~kvstack.engine.paged.PagedKVPool`.
    num_kv_heads : int
        KV heads ``H`` (each has its own rotary key).
    rope_dims : int
        Rotary dimensions ``d`` per KV head.
    rank : int
        Latent size ``r`` (one latent per token, shared by the KV heads).
    dtype, device
        Storage dtype and device.

    Notes
    -----
    Storage is ``[num_blocks, num_layers, block_size, H d + r]``: a token's rotary keys (head-major) then its
    latent, zero-initialised.
    """

    def __init__(self, num_blocks: int, num_layers: int, num_kv_heads: int, rope_dims: int, rank: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        for value, name in ((num_blocks, "num_blocks"), (num_layers, "num_layers"), (num_kv_heads, "num_kv_heads"),
                            (rope_dims, "rope_dims"), (rank, "rank"), (block_size, "block_size")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVStackError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise KVStackError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self._num_blocks, self._num_layers, self._block_size = num_blocks, num_layers, block_size
        self.num_kv_heads, self.rope_dims, self.rank = num_kv_heads, rope_dims, rank
        self.width = num_kv_heads * rope_dims + rank
        self._data = torch.zeros((num_blocks, num_layers, block_size, self.width), dtype=dtype, device=device)

    @classmethod
    def from_budget(cls, memory_mb: float, num_layers: int, num_kv_heads: int, rope_dims: int, rank: int,
                    block_size: int = 16, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> PagedLatentPool:
        """A pool with as many blocks as fit in ``memory_mb`` mebibytes (at least one, else a one-line error)."""
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float)) or not math.isfinite(memory_mb):
            raise KVStackError(f"memory_mb must be a finite number of MB, got {memory_mb!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_block = num_layers * block_size * (num_kv_heads * rope_dims + rank) * itemsize
        num_blocks = max(0, math.floor(memory_mb * BYTES_PER_MB)) // per_block
        if num_blocks < 1:
            raise KVStackError(f"a KV budget of {memory_mb} MB holds no block of {per_block} bytes; the minimum is "
                               f"{per_block / BYTES_PER_MB:.6g} MB ({per_block} bytes)")
        return cls(num_blocks, num_layers, num_kv_heads, rope_dims, rank, block_size, dtype, device)

    @property
    def num_blocks(self) -> int:
        """Number of physical blocks."""
        return self._num_blocks

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return self._num_layers

    @property
    def block_size(self) -> int:
        """Token positions per block."""
        return self._block_size

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype."""
        return self._data.dtype

    @property
    def device(self) -> torch.device:
        """Device of the storage tensor."""
        return self._data.device

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers."""
        return self._num_layers * self._block_size * self.width * self._data.element_size()

    def nbytes(self) -> int:
        """Bytes allocated by the storage tensor."""
        return int(self._data.nbytes)

    def write_packed(self, layer: int, blocks: torch.Tensor, slots: torch.Tensor, rotary_keys: torch.Tensor,
                     latents: torch.Tensor) -> None:
        """Store ``T`` tokens' rotary keys ``[H, T, d]`` and latents ``[1, T, r]`` at (block, slot) pairs ``[T]``."""
        self._check_layer(layer)
        heads, count, dims = rotary_keys.shape
        if (heads, dims) != (self.num_kv_heads, self.rope_dims) or tuple(latents.shape) != (1, count, self.rank):
            raise KVStackError(f"a latent layer writes rotary keys [H={self.num_kv_heads}, T, d={self.rope_dims}] and "
                               f"latents [1, T, r={self.rank}], got {tuple(rotary_keys.shape)} and "
                               f"{tuple(latents.shape)}")
        entry = torch.cat((rotary_keys.transpose(0, 1).reshape(count, heads * dims), latents[0]), dim=-1)
        self._data[blocks, layer, slots] = entry.to(device=self.device, dtype=self.dtype)

    def write(self, layer: int, block_table: BlockTable, start: int, rotary_keys: torch.Tensor,
              latents: torch.Tensor) -> None:
        """Store ``n`` consecutive tokens of one sequence from position ``start``: rotary keys ``[H, n, d]`` and
        latents ``[1, n, r]`` (as :meth:`PagedKVPool.write` stores keys and values)."""
        count = rotary_keys.shape[1]
        needed = -(-(start + count) // self._block_size)
        table = table_to_list(block_table, needed, self._num_blocks, f"writing {count} tokens from {start}")
        positions = torch.arange(start, start + count, device=self.device)
        blocks = torch.tensor(table, dtype=torch.long, device=self.device)[positions // self._block_size]
        self.write_packed(layer, blocks, positions % self._block_size, rotary_keys, latents)

    def gather(self, layer: int, block_table: BlockTable, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` tokens of one sequence in one layer: rotary keys ``[H, length, d]`` and latents
        ``[1, length, r]`` (new tensors)."""
        self._check_layer(layer)
        needed = -(-length // self._block_size)
        table = table_to_list(block_table, needed, self._num_blocks, f"reading {length} tokens")
        index = torch.tensor(table, dtype=torch.long, device=self.device)
        dense = self._data[:, layer].index_select(0, index).reshape(needed * self._block_size, self.width)[:length]
        split = self.num_kv_heads * self.rope_dims
        rotary = dense[:, :split].reshape(length, self.num_kv_heads, self.rope_dims).transpose(0, 1).contiguous()
        return rotary, dense[None, :, split:].contiguous()

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block ``src`` into block ``dst`` in every layer (copy-on-write)."""
        src_id, dst_id = self._check_block_id(src), self._check_block_id(dst)
        if src_id != dst_id:
            self._data[dst_id].copy_(self._data[src_id])

    def export_block(self, block: int) -> dict[str, torch.Tensor]:
        """``{"latents": [L, block_size, H d + r]}``, a contiguous CPU copy of one block for the storage tiers."""
        return {_NAME: self._data[self._check_block_id(block)].to("cpu", copy=True).contiguous()}

    def import_block(self, block: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load a block exported by :meth:`export_block`; a block of another shape or dtype is refused (one line)
        and the pool is left unchanged."""
        block_id = self._check_block_id(block)
        shape = (self._num_layers, self._block_size, self.width)
        tensor = tensors.get(_NAME) if isinstance(tensors, Mapping) and set(tensors) == {_NAME} else None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
            got = ({name: tuple(t.shape) for name, t in tensors.items()} if isinstance(tensors, Mapping)
                   else type(tensors).__name__)
            raise KVStackError(f"an imported latent block must be {{'latents': {list(shape)} of {self.dtype}}}, "
                               f"got {got}")
        self._data[block_id].copy_(tensor)

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self._num_layers:
            raise KVStackError(f"layer must be in 0..{self._num_layers - 1}, got {layer!r}")

    def _check_block_id(self, block: int) -> int:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self._num_blocks:
            raise KVStackError(f"block id must be in 0..{self._num_blocks - 1}, got {block!r}")
        return block

    def __repr__(self) -> str:
        return (f"PagedLatentPool(num_blocks={self._num_blocks}, num_layers={self._num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, rope_dims={self.rope_dims}, rank={self.rank}, "
                f"block_size={self._block_size}, dtype={self.dtype})")
