"""The paged KV tensor pool: one preallocated tensor holding every layer's KV in fixed-size blocks.

:class:`~kvstack.engine.blocks.BlockManager` decides which block ids a sequence uses; :class:`PagedKVPool` holds
the tensors those ids index, writes new keys/values and reads them back (attention over it:
:mod:`kvstack.engine.paged_attention`). Layout and design: ``docs/engine-design.md`` (section "Paged KV").
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from kvstack.errors import KVStackError

__all__ = ["BYTES_PER_MB", "BlockTable", "PagedKVPool", "table_to_list"]

BYTES_PER_MB = 1024 * 1024
"""Bytes in one "MB" of :meth:`PagedKVPool.from_budget` budgets (a mebibyte)."""

BlockTable = Sequence[int] | torch.Tensor

_KV_NAMES = ("keys", "values")


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVStackError(f"{name} must be a positive integer, got {value!r}")
    return value


def _bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: ``num_layers * 2 * num_kv_heads * block_size * head_dim * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * num_kv_heads * block_size * head_dim * itemsize


def table_to_list(block_table: BlockTable, needed: int, num_blocks: int, what: str) -> list[int]:
    """The first ``needed`` entries of a block table as ints, each checked to be a valid block id.

    Raises
    ------
    KVStackError
        If the table has fewer than ``needed`` entries or one of them is not in ``0 .. num_blocks - 1``.
    """
    if isinstance(block_table, torch.Tensor):
        if block_table.dim() != 1:
            raise KVStackError(f"a block table must be 1-D, got shape {tuple(block_table.shape)}")
        entries = block_table.tolist()
    else:
        entries = list(block_table)
    if needed > len(entries):
        raise KVStackError(
            f"{what} needs {needed} blocks of the block table but it has only {len(entries)}; "
            "grow the table before writing or reading those positions"
        )
    used = entries[:needed]
    for block in used:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < num_blocks:
            raise KVStackError(f"block table entries must be block ids in 0..{num_blocks - 1}, got {block!r}")
    return used


class PagedKVPool:
    """The KV cache of every layer, stored in fixed-size blocks of one preallocated tensor.

    Parameters
    ----------
    num_blocks : int
        Number of physical blocks; block ids are ``0 .. num_blocks - 1`` (as in
        :class:`~kvstack.engine.blocks.BlockPool`).
    num_layers : int
        Transformer layers whose KV the pool holds.
    num_kv_heads : int
        KV heads ``H`` per layer (GQA query heads share them; they are never repeated in storage).
    head_dim : int
        Head dimension ``D``.
    block_size : int, optional
        Token positions per block (16).
    dtype : torch.dtype, optional
        Storage dtype (float32).
    device : str or torch.device, optional
        Where the pool lives ("cpu"; e.g. "cuda" for an accelerator).

    Notes
    -----
    Storage is ``[num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]`` (index 0 of the third
    dimension is keys, 1 is values), zero-initialised.
    """

    def __init__(
        self,
        num_blocks: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self._num_blocks = _check_positive_int(num_blocks, "num_blocks")
        self._num_layers = _check_positive_int(num_layers, "num_layers")
        self._num_kv_heads = _check_positive_int(num_kv_heads, "num_kv_heads")
        self._head_dim = _check_positive_int(head_dim, "head_dim")
        self._block_size = _check_positive_int(block_size, "block_size")
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
            raise KVStackError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self._kv = torch.zeros(
            (num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim), dtype=dtype, device=device
        )
        # Per (layer, block) key minimum and maximum for page-reading policies (Quest), only for the blocks a
        # policy has asked about: each such block holds a row of the bounds table until it is released (freed
        # or evicted by the allocator), so a pool serving few Quest requests keeps few bounds. A write marks the
        # block's bounds stale and they are recomputed when next asked for.
        self._bound_rows = torch.full((num_blocks,), -1, dtype=torch.long, device=device)  # [num_blocks]
        self._free_bound_rows: list[int] = []
        self._row_owner = torch.empty(0, dtype=torch.long, device=device)  # [rows]: the block holding a row, or -1
        self._bounds: torch.Tensor | None = None  # [L, rows, 2, H, D]
        self._stale: torch.Tensor | None = None  # [L, rows] bool

    @classmethod
    def from_budget(
        cls,
        memory_mb: float,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> PagedKVPool:
        """A pool with as many blocks as fit in ``memory_mb`` mebibytes.

        Parameters
        ----------
        memory_mb : float
            Memory budget for the KV tensor in MB of :data:`BYTES_PER_MB` (2**20) bytes.
        num_layers, num_kv_heads, head_dim, block_size, dtype, device
            As for :class:`PagedKVPool`.

        Returns
        -------
        PagedKVPool
            ``floor(memory_mb * BYTES_PER_MB / bytes_per_block)`` blocks.

        Raises
        ------
        KVStackError
            If the budget does not hold a single block (the message names the minimum budget).
        """
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, (int, float)) or not math.isfinite(memory_mb):
            raise KVStackError(f"memory_mb must be a finite number of MB, got {memory_mb!r}")
        for value, name in (
            (num_layers, "num_layers"),
            (num_kv_heads, "num_kv_heads"),
            (head_dim, "head_dim"),
            (block_size, "block_size"),
        ):
            _check_positive_int(value, name)
        if not isinstance(dtype, torch.dtype):
            raise KVStackError(f"dtype must be a torch.dtype, got {dtype!r}")
        per_block = _bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
        budget_bytes = math.floor(memory_mb * BYTES_PER_MB)
        num_blocks = budget_bytes // per_block if budget_bytes > 0 else 0
        if num_blocks < 1:
            raise KVStackError(
                f"a KV budget of {memory_mb} MB holds no block of {per_block} bytes; "
                f"the minimum is {per_block / BYTES_PER_MB:.6g} MB ({per_block} bytes)"
            )
        return cls(num_blocks, num_layers, num_kv_heads, head_dim, block_size=block_size, dtype=dtype, device=device)

    # ------------------------------------------------------------------------------------------------
    # Geometry
    # ------------------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Number of physical blocks."""
        return self._num_blocks

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return self._num_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads ``H`` per layer."""
        return self._num_kv_heads

    @property
    def head_dim(self) -> int:
        """Head dimension ``D``."""
        return self._head_dim

    @property
    def block_size(self) -> int:
        """Token positions per block."""
        return self._block_size

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype."""
        return self._kv.dtype

    @property
    def device(self) -> torch.device:
        """Device of the storage tensor."""
        return self._kv.device

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, keys and values."""
        return _bytes_per_block(self._num_layers, self._num_kv_heads, self._head_dim, self._block_size, self.dtype)

    @property
    def kv(self) -> torch.Tensor:
        """The storage tensor ``[num_blocks, num_layers, 2, H, block_size, D]`` (a live view, not a copy)."""
        return self._kv

    def nbytes(self) -> int:
        """Bytes actually allocated by the storage tensor (``num_blocks * bytes_per_block``)."""
        return int(self._kv.nbytes)

    # ------------------------------------------------------------------------------------------------
    # Token-level access
    # ------------------------------------------------------------------------------------------------

    def write(
        self, layer: int, block_table: BlockTable, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store the keys/values of ``n`` consecutive tokens of one sequence in one layer.

        Parameters
        ----------
        layer : int
            Layer index.
        block_table : sequence of int or 1-D tensor
            The sequence's block table; position ``p`` goes to block ``block_table[p // block_size]``,
            slot ``p % block_size``.
        start : int
            Position of the first token (``>= 0``).
        keys, values : torch.Tensor
            ``[H, n, D]`` keys and values of positions ``start .. start + n - 1`` (cast to the pool's dtype
            and device).

        Raises
        ------
        KVStackError
            On a bad layer, start or shape, or if the positions run past the block table.

        Notes
        -----
        One vectorised ``index_put`` per tensor: block ids ``[n]`` and slots ``[n]`` index the layer's
        ``[num_blocks, H, block_size, D]`` view, assigning ``[n, H, D]``.
        """
        self._check_layer(layer)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise KVStackError(f"start must be a non-negative integer position, got {start!r}")
        expected = (self._num_kv_heads, None, self._head_dim)
        for tensor, name in ((keys, "keys"), (values, "values")):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[0] != expected[0] or (
                tensor.shape[2] != expected[2]
            ):
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise KVStackError(
                    f"{name} must be [num_kv_heads={self._num_kv_heads}, n, head_dim={self._head_dim}], got {got}"
                )
        if keys.shape != values.shape:
            raise KVStackError(f"keys and values must have the same shape, got {tuple(keys.shape)} and "
                               f"{tuple(values.shape)}")
        count = keys.shape[1]
        if count == 0:
            return
        end = start + count
        table = table_to_list(block_table, -(-end // self._block_size), self._num_blocks,
                               f"writing positions {start}..{end - 1}")
        positions = torch.arange(start, end, device=self.device)
        table_tensor = torch.tensor(table, dtype=torch.long, device=self.device)
        blocks = table_tensor[positions // self._block_size]  # [n]
        slots = positions % self._block_size  # [n]
        self._mark_written(layer, blocks)
        for index, tensor in enumerate((keys, values)):
            layer_view = self._kv[:, layer, index]  # [num_blocks, H, block_size, D], a view
            # Advanced indices separated by a slice put the indexed dimension first: the target is [n, H, D].
            layer_view[blocks, :, slots] = tensor.to(device=self.device, dtype=self.dtype).transpose(0, 1)

    def write_packed(
        self, layer: int, blocks: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Store the keys/values of ``T`` tokens of any sequences at given (block, slot) pairs, in one write each.

        Parameters
        ----------
        layer : int
            Layer index.
        blocks, slots : torch.Tensor
            ``[T]`` int64 block ids and slots (from :class:`PackedPlan`; not checked again here).
        keys, values : torch.Tensor
            ``[H, T, D]``.
        """
        self._check_layer(layer)
        self._mark_written(layer, blocks)
        for index, tensor in enumerate((keys, values)):
            layer_view = self._kv[:, layer, index]  # [num_blocks, H, block_size, D], a view
            layer_view[blocks, :, slots] = tensor.to(device=self.device, dtype=self.dtype).transpose(0, 1)

    def gather(self, layer: int, block_table: BlockTable, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` tokens' keys and values of one sequence in one layer, contiguous.

        Parameters
        ----------
        layer : int
            Layer index.
        block_table : sequence of int or 1-D tensor
            The sequence's block table.
        length : int
            Number of tokens (``>= 0``).

        Returns
        -------
        keys, values : torch.Tensor
            ``[H, length, D]`` each, new tensors (not views of the pool).
        """
        self._check_layer(layer)
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise KVStackError(f"length must be a non-negative integer, got {length!r}")
        needed = -(-length // self._block_size)
        table = table_to_list(block_table, needed, self._num_blocks, f"reading {length} tokens")
        index = torch.tensor(table, dtype=torch.long, device=self.device)
        blocks = self._kv[:, layer].index_select(0, index)  # [n_blocks, 2, H, block_size, D]
        heads, dim = self._num_kv_heads, self._head_dim
        # [2, H, n_blocks, block_size, D] -> [2, H, n_blocks * block_size, D], then keep the first `length`.
        dense = blocks.permute(1, 2, 0, 3, 4).reshape(2, heads, needed * self._block_size, dim)[:, :, :length]
        return dense[0].contiguous(), dense[1].contiguous()

    # ------------------------------------------------------------------------------------------------
    # Block-level access
    # ------------------------------------------------------------------------------------------------

    def copy_block(self, src: int, dst: int) -> None:
        """Copy block ``src`` into block ``dst`` in every layer, keys and values (copy-on-write).

        Apply a :class:`~kvstack.engine.blocks.CopyOnWrite` as ``pool.copy_block(cow.src_block, cow.dst_block)``.
        """
        src_id = self._check_block_id(src)
        dst_id = self._check_block_id(dst)
        if src_id != dst_id:
            self._kv[dst_id].copy_(self._kv[src_id])
            self._mark_written(slice(None), dst_id)

    def export_block(self, block: int) -> dict[str, torch.Tensor]:
        """CPU copies of one block for the storage tiers.

        Returns
        -------
        dict of str to torch.Tensor
            ``{"keys": [L, H, block_size, D], "values": [L, H, block_size, D]}``, contiguous CPU tensors of
            the pool's dtype that never alias the pool.
        """
        block_id = self._check_block_id(block)
        data = self._kv[block_id]  # [L, 2, H, block_size, D]
        return {name: data[:, index].to("cpu", copy=True).contiguous() for index, name in enumerate(_KV_NAMES)}

    def import_block(self, block: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load a block exported by :meth:`export_block` (e.g. read back from a tier) into block ``block``.

        Parameters
        ----------
        block : int
            Destination block id.
        tensors : mapping of str to torch.Tensor
            Exactly ``{"keys", "values"}``, each ``[L, H, block_size, D]`` of the pool's dtype (any device).

        Raises
        ------
        KVStackError
            If the names, shapes or dtypes do not match the pool; the block is then left unchanged.
        """
        block_id = self._check_block_id(block)
        if not isinstance(tensors, Mapping) or set(tensors) != set(_KV_NAMES):
            got = sorted(map(str, tensors)) if isinstance(tensors, Mapping) else type(tensors).__name__
            raise KVStackError(f"an imported block must have exactly the tensors ['keys', 'values'], got {got}")
        shape = (self._num_layers, self._num_kv_heads, self._block_size, self._head_dim)
        for name in _KV_NAMES:
            tensor = tensors[name]
            if not isinstance(tensor, torch.Tensor):
                raise KVStackError(f"imported block {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
                raise KVStackError(
                    f"imported block {name!r} must be [L, H, block_size, D]={list(shape)} of {self.dtype}, "
                    f"got {list(tensor.shape)} of {tensor.dtype}"
                )
        for index, name in enumerate(_KV_NAMES):
            self._kv[block_id, :, index].copy_(tensors[name])
        self._mark_written(slice(None), block_id)

    # ------------------------------------------------------------------------------------------------
    # Block metadata for page-reading policies
    # ------------------------------------------------------------------------------------------------

    def block_key_bounds(self, layer: int, blocks: torch.Tensor) -> torch.Tensor:
        """Element-wise key minimum and maximum of full blocks, as Quest keeps per page.

        Parameters
        ----------
        layer : int
            Layer index.
        blocks : torch.Tensor
            ``[n]`` int64 ids of blocks whose every slot holds a token (a partial block's unused slots would
            enter its bounds).

        Returns
        -------
        torch.Tensor
            ``[n, 2, H, D]``: index 0 the minimum over the block's slots, 1 the maximum (the pool's dtype).

        Notes
        -----
        Kept beside the pool only for the blocks asked about (``2 / block_size`` of their keys' bytes), in a
        table that grows by half when full; a block keeps its row until :meth:`release_block_bounds`, and the
        table is freed when no block holds one. A block's bounds are recomputed when asked after any write to
        it.
        """
        self._check_layer(layer)
        blocks = blocks.to(device=self.device, dtype=torch.long)
        rows = self._bound_rows[blocks]
        if bool((rows < 0).any()):
            self._assign_bound_rows(blocks[rows < 0].unique())
            rows = self._bound_rows[blocks]
        assert self._bounds is not None and self._stale is not None
        stale = rows[self._stale[layer, rows]].unique()
        if stale.numel():
            keys = self._kv[:, layer, 0].index_select(0, self._row_owner[stale])  # [s, H, block_size, D]
            self._bounds[layer, stale, 0] = keys.amin(dim=2)
            self._bounds[layer, stale, 1] = keys.amax(dim=2)
            self._stale[layer, stale] = False
        return self._bounds[layer, rows]

    def release_block_bounds(self, block_id: int) -> None:
        """Forget a block's bounds (the allocator freed or evicted it): its row goes back to the table, and the
        table itself is freed when no block holds a row."""
        if self._bounds is None:  # no block is bounded: the common case, free of any tensor access
            return
        row = int(self._bound_rows[block_id])
        if row < 0:
            return
        self._bound_rows[block_id] = -1
        self._row_owner[row] = -1
        self._free_bound_rows.append(row)
        if len(self._free_bound_rows) == self._row_owner.numel():
            self._bounds = self._stale = None
            self._row_owner = self._row_owner.new_empty(0)
            self._free_bound_rows = []

    def bounds_nbytes(self) -> int:
        """Bytes of the block bounds kept beside the pool: the table's rows, in use or free (the most blocks
        bounded at once since the table was last empty, plus growth); 0 while no block is bounded."""
        return 0 if self._bounds is None else int(self._bounds.nbytes)

    def bounded_blocks(self) -> int:
        """How many blocks hold a row of the bounds table now."""
        return int((self._bound_rows >= 0).sum())

    def _assign_bound_rows(self, blocks: torch.Tensor) -> None:
        """Give each of ``blocks`` (``[m]``, without a row) a row of the bounds table, marked stale."""
        needed = blocks.numel() - len(self._free_bound_rows)
        if needed > 0:
            self._grow_bounds(needed)
        rows = torch.tensor([self._free_bound_rows.pop() for _ in range(blocks.numel())], dtype=torch.long,
                            device=self.device)
        self._bound_rows[blocks] = rows
        self._row_owner[rows] = blocks
        assert self._stale is not None
        self._stale[:, rows] = True

    def _grow_bounds(self, needed: int) -> None:
        old = 0 if self._bounds is None else self._bounds.shape[1]
        size = min(self._num_blocks, max(old + needed, old + old // 2))
        shape = (self._num_layers, size, 2, self._num_kv_heads, self._head_dim)
        bounds = torch.zeros(shape, dtype=self.dtype, device=self.device)
        stale = torch.ones((self._num_layers, size), dtype=torch.bool, device=self.device)
        owner = torch.full((size,), -1, dtype=torch.long, device=self.device)
        if self._bounds is not None and self._stale is not None:
            bounds[:, :old] = self._bounds
            stale[:, :old] = self._stale
            owner[:old] = self._row_owner
        self._bounds, self._stale, self._row_owner = bounds, stale, owner
        self._free_bound_rows.extend(range(size - 1, old - 1, -1))

    def _mark_written(self, layer: int | slice, blocks: torch.Tensor | int) -> None:
        if self._stale is not None:
            rows = self._bound_rows[blocks]
            if isinstance(rows, torch.Tensor) and rows.dim():
                rows = rows[rows >= 0]
            elif int(rows) < 0:
                return
            self._stale[layer, rows] = True

    # ------------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self._num_layers:
            raise KVStackError(f"layer must be an integer in 0..{self._num_layers - 1}, got {layer!r}")

    def _check_block_id(self, block: int) -> int:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self._num_blocks:
            raise KVStackError(f"block must be a block id in 0..{self._num_blocks - 1}, got {block!r}")
        return block

    def __repr__(self) -> str:
        return (
            f"PagedKVPool(num_blocks={self._num_blocks}, num_layers={self._num_layers}, "
            f"num_kv_heads={self._num_kv_heads}, head_dim={self._head_dim}, block_size={self._block_size}, "
            f"dtype={self.dtype}, device={self.device})"
        )
