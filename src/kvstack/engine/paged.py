"""The paged KV tensor pool and attention read straight through block tables.

:class:`~kvstack.engine.blocks.BlockManager` decides *which* physical blocks a sequence uses; this module
holds the KV tensors those block ids index, writes new keys/values into them and attends over them.

Layout
------
One preallocated tensor holds the KV cache of every layer::

    kv : [num_blocks, num_layers, 2, num_kv_heads, block_size, head_dim]
          block id    layer       0 = keys, 1 = values

Token position ``p`` of a sequence with block table ``table`` lives in block ``table[p // block_size]`` at
slot ``p % block_size``; a block holds ``block_size`` consecutive positions of one sequence for every layer,
both keys and values, every KV head.

Why one tensor for all layers
-----------------------------
* **One allocation, sized from a budget.** :meth:`PagedKVPool.from_budget` turns a memory budget into a
  block count once; there is no per-layer pool to keep in step and no fragmentation between layers.
* **A block id is valid across layers.** The block manager allocates an id once per ``block_size`` tokens,
  and that id addresses the same slot range in every layer, so a sequence has a single block table that
  every layer's :meth:`PagedKVPool.write` and :func:`paged_attention` read.
* **A block is one slice.** ``kv[block]`` (``[num_layers, 2, H, block_size, D]``) is all the KV of that
  block: copy-on-write (:meth:`PagedKVPool.copy_block`) is one ``copy_`` and export to / import from the
  host and disk tiers (:mod:`kvstack.engine.tiers`) is one slice per direction.

How the engine uses it
----------------------
For every scheduled sequence of a step, the block manager has already grown the block table to cover the
new tokens (applying :class:`~kvstack.engine.blocks.CopyOnWrite` instructions with
:meth:`PagedKVPool.copy_block`). Then, in each layer of the forward pass:

1. project the ``q_i`` new tokens to queries ``[Hq, q_i, D]`` and keys/values ``[H, q_i, D]`` (RoPE applied);
2. ``pool.write(layer, table, context_len - q_i, keys, values)`` stores them at their positions;
3. ``paged_attention(queries, pool, layer, tables, context_lens, scaling)`` attends every sequence's
   queries over its whole context (cached prefix + the new tokens, causal within the new tokens), reading
   the pool block by block, and returns ``[Hq, q_i, D]`` per sequence.

The same call covers a prefill chunk at offset 0, a later chunk of a chunked prefill, and decode
(``q_i = 1``). :meth:`PagedKVPool.gather` materialises a sequence's contiguous keys/values (debugging,
reference checks, models that need the dense cache). When the prefix cache evicts a full block,
:meth:`PagedKVPool.export_block` produces the ``{"keys", "values"}`` dict stored by the tiers, and
:meth:`PagedKVPool.import_block` loads it back into a freshly allocated block on a hit.

Limitations
-----------
* On the CPU with a float32 pool, :func:`paged_attention_packed` runs a fused C++ kernel
  (:func:`kvstack.cache.kernels.paged_attention_forward`) that reads K/V rows in place. Elsewhere (CUDA,
  half-precision pools, no compiler) :func:`paged_attention` is the PyTorch path: a Python loop over
  sequences, gathering up to :data:`FALLBACK_BLOCKS_PER_STEP` blocks at a time, in float32 whatever the
  pool dtype. There is no CUDA kernel yet.
* Validating a block table given as a device tensor reads it back to the host (a synchronisation); the
  engine normally keeps block tables as Python lists.
* No sliding window, ALiBi, logit soft-capping or quantised KV.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvstack.cache import kernels
from kvstack.errors import KVStackError

__all__ = [
    "BYTES_PER_MB",
    "PackedPlan",
    "PagedKVPool",
    "paged_attention",
    "paged_attention_packed",
]

FALLBACK_BLOCKS_PER_STEP = 64
"""Blocks gathered at once by the PyTorch path of :func:`paged_attention` (one online-softmax step each)."""

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


def _table_to_list(block_table: BlockTable, needed: int, num_blocks: int, what: str) -> list[int]:
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
        table = _table_to_list(block_table, -(-end // self._block_size), self._num_blocks,
                               f"writing positions {start}..{end - 1}")
        positions = torch.arange(start, end, device=self.device)
        table_tensor = torch.tensor(table, dtype=torch.long, device=self.device)
        blocks = table_tensor[positions // self._block_size]  # [n]
        slots = positions % self._block_size  # [n]
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
        table = _table_to_list(block_table, needed, self._num_blocks, f"reading {length} tokens")
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


def paged_attention(
    query: Sequence[torch.Tensor],
    pool: PagedKVPool,
    layer: int,
    block_tables: Sequence[BlockTable],
    context_lens: Sequence[int],
    scaling: float,
    causal_offsets: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Attention of a batch of sequences over their KV read block by block from the pool.

    Parameters
    ----------
    query : sequence of torch.Tensor
        One ``[Hq, q_i, D]`` tensor per sequence: the queries of its ``q_i`` new tokens. ``Hq`` is a multiple
        of the pool's ``H``; query head ``h * G + g`` (``G = Hq // H``) reads KV head ``h``.
    pool : PagedKVPool
        The KV pool; the new tokens' keys/values must already be written.
    layer : int
        Layer index.
    block_tables : sequence of block tables
        One block table (sequence of int or 1-D tensor) per sequence.
    context_lens : sequence of int
        Tokens stored per sequence, the new ones included.
    scaling : float
        Multiplier of the logits, usually ``head_dim ** -0.5``.
    causal_offsets : sequence of int, optional
        Position of the first query token of each sequence; query ``j`` sees key positions
        ``<= causal_offsets[i] + j``. Default ``context_lens[i] - q_i`` (the queries are the last ``q_i``
        tokens, as in prefill chunks and decode). Must lie in ``0 .. context_lens[i] - q_i``.

    Returns
    -------
    list of torch.Tensor
        One ``[Hq, q_i, D]`` output per sequence, in the query's dtype and on its device.

    Raises
    ------
    KVStackError
        On mismatched batch sizes, shapes, heads, lengths, offsets or block tables too short.

    Notes
    -----
    Online softmax (as in FlashAttention), per sequence, with the queries grouped per KV head,
    ``q : [H, G * q_i, D]`` (row ``g * q_i + j`` is query ``j`` of head ``h * G + g``), float32:

    * state: running max ``m : [H, G * q_i]``, running sum ``l : [H, G * q_i]``, accumulator
      ``acc : [H, G * q_i, D]``;
    * for each run of up to :data:`FALLBACK_BLOCKS_PER_STEP` blocks covering positions up to the last query's:
      ``k, v : [H, n, D]`` gathered from the pool (GQA by broadcasting, never repeated), scores
      ``s = q @ k^T * scaling : [H, G * q_i, n]`` with positions past the context or after the query masked
      to ``-inf``;
      ``m' = max(m, rowmax(s))``, ``p = exp(s - m')``, ``c = exp(m - m')``, ``l = l * c + rowsum(p)``,
      ``acc = acc * c + p @ v``, ``m = m'``;
    * output ``acc / l``, reshaped ``[H, G, q_i, D] -> [Hq, q_i, D]``.

    Transient memory is one run of scores, ``[H, G * q_i, n]``, however long the context.
    The engine's runner calls :func:`paged_attention_packed`, which uses the fused kernel when it can and this
    function otherwise.
    """
    batch = len(query)
    if len(block_tables) != batch or len(context_lens) != batch:
        raise KVStackError(
            f"query, block_tables and context_lens must have one entry per sequence, got {batch}, "
            f"{len(block_tables)} and {len(context_lens)}"
        )
    if causal_offsets is not None and len(causal_offsets) != batch:
        raise KVStackError(f"causal_offsets must have one entry per sequence, got {len(causal_offsets)} for {batch}")
    pool._check_layer(layer)
    heads, dim, block_size = pool.num_kv_heads, pool.head_dim, pool.block_size
    layer_kv = pool.kv[:, layer]  # [num_blocks, 2, H, block_size, D], a view
    outputs: list[torch.Tensor] = []
    for seq_index in range(batch):
        seq_query = query[seq_index]
        if not isinstance(seq_query, torch.Tensor) or seq_query.dim() != 3 or seq_query.shape[2] != dim or (
            seq_query.shape[0] % heads != 0
        ):
            got = tuple(seq_query.shape) if isinstance(seq_query, torch.Tensor) else type(seq_query).__name__
            raise KVStackError(
                f"query {seq_index} must be [Hq, q, head_dim={dim}] with Hq a multiple of num_kv_heads={heads}, "
                f"got {got}"
            )
        num_q_heads, num_new, _ = seq_query.shape
        group = num_q_heads // heads
        context_len = context_lens[seq_index]
        if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < num_new:
            raise KVStackError(
                f"context_lens[{seq_index}] must be an integer >= its {num_new} query tokens, got {context_len!r}"
            )
        offset = context_len - num_new if causal_offsets is None else causal_offsets[seq_index]
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= context_len - num_new:
            raise KVStackError(
                f"causal_offsets[{seq_index}] must be an integer in 0..{context_len - num_new}, got {offset!r}"
            )
        if num_new == 0:
            outputs.append(seq_query.new_empty(seq_query.shape))
            continue
        last_visible = offset + num_new  # keys at positions >= this are seen by no query
        num_seq_blocks = -(-last_visible // block_size)
        table = _table_to_list(block_tables[seq_index], num_seq_blocks, pool.num_blocks,
                               f"attending over {last_visible} tokens of sequence {seq_index}")

        # [Hq, q, D] -> [H, G, q, D] -> [H, G*q, D]: row g*q + j is query j of head h*G + g.
        grouped = seq_query.to(device=pool.device, dtype=torch.float32).reshape(heads, group * num_new, dim)
        query_positions = (offset + torch.arange(num_new, device=pool.device)).repeat(group)  # [G*q]
        running_max = torch.full((heads, group * num_new), float("-inf"), device=pool.device)
        running_sum = torch.zeros((heads, group * num_new), device=pool.device)
        accumulator = torch.zeros((heads, group * num_new, dim), device=pool.device)
        for first in range(0, len(table), FALLBACK_BLOCKS_PER_STEP):
            group_ids = torch.tensor(table[first : first + FALLBACK_BLOCKS_PER_STEP], device=pool.device)
            # [n, 2, H, block_size, D] -> [2, H, n * block_size, D]: keys and values of these blocks, contiguous.
            gathered = layer_kv.index_select(0, group_ids).permute(1, 2, 0, 3, 4).float()
            gathered = gathered.reshape(2, heads, len(group_ids) * block_size, dim)
            key_positions = first * block_size + torch.arange(len(group_ids) * block_size, device=pool.device)
            # [G*q, n*block_size]: causal (key <= query position) and inside the stored context.
            visible = (key_positions[None, :] <= query_positions[:, None]) & (key_positions[None, :] < context_len)
            scores = torch.matmul(grouped, gathered[0].transpose(-1, -2)) * scaling  # [H, G*q, n*block_size]
            scores = scores.masked_fill(~visible, float("-inf"))
            new_max = torch.maximum(running_max, scores.amax(dim=-1))  # [H, G*q]
            # A row with nothing visible yet keeps max -inf; subtract 0 there so exp gives 0, not NaN.
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = torch.exp(scores - safe_max[..., None])  # [H, G*q, n*block_size]
            correction = torch.exp(running_max - safe_max)  # [H, G*q]
            running_sum = running_sum * correction + probs.sum(dim=-1)
            accumulator = accumulator * correction[..., None] + torch.matmul(probs, gathered[1])
            running_max = new_max
        output = accumulator / running_sum[..., None]  # [H, G*q, D]
        outputs.append(output.reshape(num_q_heads, num_new, dim).to(device=seq_query.device, dtype=seq_query.dtype))
    return outputs


def paged_attention_packed(
    query: torch.Tensor,
    pool: PagedKVPool,
    layer: int,
    block_tables: Sequence[BlockTable],
    num_new_tokens: Sequence[int],
    context_lens: Sequence[int],
    scaling: float,
    plan: PackedPlan | None = None,
) -> torch.Tensor:
    """Attention of a packed row of new tokens from several sequences, each over its own paged context.

    Parameters
    ----------
    query : torch.Tensor
        ``[T, Hq, D]`` queries of the packed tokens: sequence ``i``'s ``q_i`` new tokens follow sequence
        ``i - 1``'s (``T = sum(q_i)``).
    pool : PagedKVPool
        The KV pool; the new tokens' keys/values must already be written.
    layer : int
        Layer index.
    block_tables : sequence of block tables
        One per sequence.
    num_new_tokens : sequence of int
        ``q_i`` per sequence (each ``>= 1``).
    context_lens : sequence of int
        Tokens stored per sequence, the new ones included; the new tokens are the last ``q_i``, causal.
    scaling : float
        Logit multiplier.
    plan : PackedPlan, optional
        The step's index tensors (:meth:`PackedPlan.build` of the same tables and lengths), shared by every
        layer; built here when None.

    Returns
    -------
    torch.Tensor
        ``[T, Hq, D]`` outputs in the query's dtype.

    Raises
    ------
    KVStackError
        On mismatched lengths, shapes or block tables too short.

    Notes
    -----
    With a float32 pool on the CPU and the fused kernels available (:func:`kvstack.cache.kernels.available`)
    every token attends in one call that reads the pool in place through the block tables
    (:func:`kvstack.cache.kernels.paged_attention_forward`); otherwise :func:`paged_attention` runs per
    sequence. Both compute exact softmax attention; they agree to float32 rounding.
    """
    total = sum(num_new_tokens)
    heads, dim = pool.num_kv_heads, pool.head_dim
    if query.dim() != 3 or query.shape[0] != total or query.shape[2] != dim or query.shape[1] % heads:
        raise KVStackError(
            f"query must be [T={total}, Hq, head_dim={dim}] with Hq a multiple of num_kv_heads={heads}, "
            f"got {tuple(query.shape)}"
        )
    if plan is None:
        plan = PackedPlan.build(pool, block_tables, num_new_tokens, context_lens)
    if not plan.use_kernel:
        per_sequence = list(torch.split(query.transpose(0, 1), list(num_new_tokens), dim=1))  # [Hq, q_i, D] each
        outputs = paged_attention(per_sequence, pool, layer, block_tables, context_lens, scaling)
        return torch.cat(outputs, dim=1).transpose(0, 1)
    pool._check_layer(layer)
    if not plan.dense:
        assert plan.tables is not None and plan.token_seq is not None and plan.token_pos is not None
        output = kernels.paged_attention_forward(
            query.float(), pool.kv, layer, plan.tables, plan.token_seq, plan.token_pos, float(scaling)
        )
        return output.to(query.dtype)
    output = torch.empty_like(query)
    if plan.tables is not None:
        assert plan.kernel_rows is not None and plan.token_seq is not None and plan.token_pos is not None
        output[plan.kernel_rows] = kernels.paged_attention_forward(
            query[plan.kernel_rows].float(), pool.kv, layer, plan.tables, plan.token_seq, plan.token_pos,
            float(scaling),
        ).to(query.dtype)
    for first, count, table, context_len in plan.dense:
        output[first : first + count] = _dense_chunk_attention(
            query[first : first + count], pool, layer, table, context_len, scaling
        )
    return output


@dataclass
class PackedPlan:
    """Index tensors of one packed step, built once and used by every layer.

    On the kernel path (float32 pool on the CPU, kernels available) a sequence with fewer than
    :data:`DENSE_MIN_QUERIES` new tokens (decodes) goes to the fused kernel; a longer chunk (prefill) is
    attended with one ``scaled_dot_product_attention`` over its gathered blocks, where matrix products beat
    the kernel's per-query loops.

    Attributes
    ----------
    use_kernel : bool
        Whether the fused CPU kernel path runs.
    kernel_rows : torch.Tensor or None
        ``[Tk]`` int64 packed-token indices the kernel attends (None: every token, or none on the other path).
    tables : torch.Tensor or None
        ``[Sk, max_blocks]`` int64 block tables of the kernel's sequences, padded with block 0.
    token_seq, token_pos : torch.Tensor or None
        ``[Tk]`` int64: each kernel token's row of ``tables`` and its slot.
    dense : list of tuple
        ``(first_row, count, block_table, context_len)`` of each chunk attended densely.
    write_blocks, write_slots : torch.Tensor
        ``[T]`` int64: the block and slot each packed token's new keys/values are written to.
    """

    use_kernel: bool
    kernel_rows: torch.Tensor | None
    tables: torch.Tensor | None
    token_seq: torch.Tensor | None
    token_pos: torch.Tensor | None
    dense: list[tuple[int, int, list[int], int]]
    write_blocks: torch.Tensor
    write_slots: torch.Tensor

    @classmethod
    def build(
        cls, pool: PagedKVPool, block_tables: Sequence[BlockTable], num_new_tokens: Sequence[int],
        context_lens: Sequence[int],
    ) -> PackedPlan:
        """Check the step's tables and lengths once and build its index tensors.

        Raises
        ------
        KVStackError
            On mismatched lengths, a sequence with no new token or a block table too short.
        """
        batch = len(num_new_tokens)
        if len(block_tables) != batch or len(context_lens) != batch:
            raise KVStackError(
                f"block_tables, num_new_tokens and context_lens must have one entry per sequence, got "
                f"{len(block_tables)}, {batch} and {len(context_lens)}"
            )
        use_kernel = (pool.device.type == "cpu" and pool.dtype == torch.float32 and pool.kv.is_contiguous()
                      and kernels.available())
        kernel_tables: list[list[int]] = []
        kernel_rows: list[int] = []
        token_seq: list[int] = []
        token_pos: list[int] = []
        dense: list[tuple[int, int, list[int], int]] = []
        blocks: list[int] = []
        slots: list[int] = []
        size = pool.block_size
        row = 0
        for index, (table, new, context_len) in enumerate(zip(block_tables, num_new_tokens, context_lens,
                                                              strict=True)):
            if isinstance(new, bool) or not isinstance(new, int) or new < 1 or not isinstance(context_len, int) or (
                context_len < new
            ):
                raise KVStackError(
                    f"sequence {index} needs num_new_tokens >= 1 and context_lens >= num_new_tokens, got {new!r} "
                    f"and {context_len!r}"
                )
            entries = _table_to_list(table, -(-context_len // size), pool.num_blocks,
                                     f"attending over {context_len} tokens of sequence {index}")
            positions = range(context_len - new, context_len)
            blocks.extend(entries[p // size] for p in positions)
            slots.extend(positions)
            if new >= DENSE_MIN_QUERIES:
                dense.append((row, new, entries, context_len))
            else:
                token_seq.extend([len(kernel_tables)] * new)
                kernel_tables.append(entries)
                kernel_rows.extend(range(row, row + new))
                token_pos.extend(positions)
            row += new
        table_tensor = seq_tensor = pos_tensor = rows_tensor = None
        if use_kernel and kernel_tables:
            width = max(len(table) for table in kernel_tables)
            table_tensor = torch.tensor([t + [0] * (width - len(t)) for t in kernel_tables], dtype=torch.long)
            seq_tensor = torch.tensor(token_seq, dtype=torch.long)
            pos_tensor = torch.tensor(token_pos, dtype=torch.long)
            if dense:
                rows_tensor = torch.tensor(kernel_rows, dtype=torch.long)
        slot_tensor = torch.tensor(slots, dtype=torch.long, device=pool.device)
        return cls(use_kernel, rows_tensor, table_tensor, seq_tensor, pos_tensor, dense if use_kernel else [],
                   torch.tensor(blocks, dtype=torch.long, device=pool.device), slot_tensor % size)


DENSE_MIN_QUERIES = 8
"""Chunks with at least this many new tokens are attended with a matrix-product SDPA, not the kernel."""


def _dense_chunk_attention(
    query: torch.Tensor, pool: PagedKVPool, layer: int, table: list[int], context_len: int, scaling: float
) -> torch.Tensor:
    """``[q, Hq, D]`` attention of one chunk's ``query`` ``[q, Hq, D]`` (the last ``q`` slots) over its blocks."""
    keys, values = pool.gather(layer, table, context_len)  # [H, L, D]
    count, num_q_heads, _ = query.shape
    heads_query = query.transpose(0, 1)[None].to(keys.dtype)  # [1, Hq, q, D]
    gqa = num_q_heads != keys.shape[0]
    if count == context_len:
        out = F.scaled_dot_product_attention(heads_query, keys[None], values[None], is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
    else:
        allowed = torch.arange(context_len)[None, :] <= (context_len - count + torch.arange(count))[:, None]
        out = F.scaled_dot_product_attention(heads_query, keys[None], values[None], attn_mask=allowed, scale=scaling,
                                             enable_gqa=gqa)
    return out[0].transpose(0, 1).to(query.dtype)  # [q, Hq, D]
