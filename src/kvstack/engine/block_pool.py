"""The block pool: KV block ids with reference counts, the hash map of full blocks and the LRU of cached ones.

Block ids only, never tensors; the states free / used / cached and why allocation evicts the least recently
released cached block are described in ``docs/engine-design.md`` (section "Blocks").
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from kvstack.errors import KVStackError

__all__ = ["BlockPool", "BlockStateError", "OutOfBlocksError"]


class OutOfBlocksError(KVStackError):
    """An allocation needs more KV blocks than are free or evictable; nothing was changed."""


class BlockStateError(RuntimeError):
    """A block operation that contradicts the block's state (freed twice, reused while free): a caller bug."""


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVStackError(f"{name} must be a positive integer, got {value!r}")
    return value


class BlockPool:
    """A fixed pool of KV block ids with reference counts, a hash map of full blocks and an LRU of cached ones.

    Parameters
    ----------
    num_blocks : int
        Number of physical blocks; ids are ``0 .. num_blocks - 1``.
    block_size : int
        Tokens per block (recorded for callers; the pool itself never sees tokens).

    Attributes
    ----------
    on_evict : callable or None
        Called as ``on_evict(block_id, hash)`` just before a cached block is evicted to be reused (the
        engine writes its KV to the host tier there); None by default.
    on_release : callable or None
        Called as ``on_release(block_id)`` when a block stops holding what it held: it becomes free, or it is
        evicted from the cache to be reused (the engine drops the block's Quest bounds there); None by default.

    Notes
    -----
    States: *free* (``ref_count == 0``, no hash, in the free queue), *used* (``ref_count > 0``) and
    *cached* (``ref_count == 0``, registered hash, in the LRU). Failing operations change nothing.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self._num_blocks = _check_positive_int(num_blocks, "num_blocks")
        self._block_size = _check_positive_int(block_size, "block_size")
        self._ref_counts: list[int] = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently released first
        self._hash_to_block: dict[bytes, int] = {}
        self._num_used = 0
        self._evictions = 0
        self.on_evict: Callable[[int, bytes], None] | None = None
        self.on_release: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ counts
    @property
    def num_blocks(self) -> int:
        """Total number of blocks in the pool."""
        return self._num_blocks

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def num_free(self) -> int:
        """Blocks holding nothing (never used, or released without a hash)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for prefix reuse (evictable)."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        """Blocks with a positive reference count."""
        return self._num_used

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free plus cached (evictable)."""
        return len(self._free) + len(self._lru)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use (``num_used / num_blocks``); cached blocks do not count."""
        return self._num_used / self._num_blocks

    @property
    def evictions(self) -> int:
        """Number of cached blocks evicted (hash dropped) to satisfy allocations so far."""
        return self._evictions

    def ref_count(self, block_id: int) -> int:
        """Return the reference count of ``block_id``."""
        return self._ref_counts[self._check_id(block_id)]

    def hash_of(self, block_id: int) -> bytes | None:
        """Return the hash ``block_id`` is registered under, or None."""
        return self._hashes[self._check_id(block_id)]

    def is_cached(self, block_id: int) -> bool:
        """Whether ``block_id`` is an unreferenced block kept for reuse."""
        return self._check_id(block_id) in self._lru

    def cached_blocks_lru(self) -> list[int]:
        """Cached block ids, the next to be evicted first."""
        return list(self._lru)

    # ------------------------------------------------------------------ allocation and reference counts
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, free ones first, then by evicting least-recently-used cached ones.

        Parameters
        ----------
        n : int
            Number of blocks (``>= 0``).

        Returns
        -------
        list of int
            The block ids, each with ``ref_count == 1`` and no hash.

        Raises
        ------
        OutOfBlocksError
            If fewer than ``n`` blocks are free or cached; the pool is unchanged.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise KVStackError(f"the number of blocks to allocate must be a non-negative integer, got {n!r}")
        if n > self.num_available:
            raise OutOfBlocksError(
                f"out of KV blocks: need {n} but only {self.num_available} are available "
                f"({self.num_free} free + {self.num_cached} cached of {self._num_blocks}); "
                "free finished sequences or use a larger num_blocks"
            )
        blocks: list[int] = []
        for _ in range(n):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._lru.popitem(last=False)
                evicted_hash = self._hashes[block_id]
                if evicted_hash is not None and self.on_evict is not None:
                    self.on_evict(block_id, evicted_hash)
                if evicted_hash is not None and self._hash_to_block.get(evicted_hash) == block_id:
                    del self._hash_to_block[evicted_hash]
                self._hashes[block_id] = None
                self._evictions += 1
                if self.on_release is not None:
                    self.on_release(block_id)
            self._ref_counts[block_id] = 1
            self._num_used += 1
            blocks.append(block_id)
        return blocks

    def incref(self, block_id: int) -> None:
        """Add a reference to a used block (use :meth:`touch` to reuse a cached one).

        Raises
        ------
        BlockStateError
            If the block is not in use.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            state = "cached (reuse it with touch())" if block_id in self._lru else "free (allocate it first)"
            raise BlockStateError(f"cannot incref block {block_id}: it is not in use but {state}")
        self._ref_counts[block_id] += 1

    def decref(self, block_id: int) -> None:
        """Drop a reference; at zero a hashed block becomes cached (most recent) and an unhashed one free.

        Raises
        ------
        BlockStateError
            If the block's ``ref_count`` is already 0 (the block is being freed twice).
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise BlockStateError(
                f"block {block_id} freed twice: its ref_count is already 0; release each reference exactly once"
            )
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._num_used -= 1
            if self._hashes[block_id] is not None:
                self._lru[block_id] = None
            else:
                self._free.append(block_id)
                if self.on_release is not None:
                    self.on_release(block_id)

    def touch(self, block_id: int) -> None:
        """Reuse a block found by :meth:`lookup`: cached -> used with ``ref_count`` 1 (leaves the LRU); used -> incref.

        Raises
        ------
        BlockStateError
            If the block is free (it holds nothing to reuse).
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] > 0:
            self._ref_counts[block_id] += 1
        elif block_id in self._lru:
            del self._lru[block_id]
            self._ref_counts[block_id] = 1
            self._num_used += 1
        else:
            raise BlockStateError(f"cannot touch block {block_id}: it is free and holds no reusable content")

    # ------------------------------------------------------------------ hashes
    def register(self, block_id: int, hash_value: bytes) -> bool:
        """Record that the used, full block ``block_id`` holds the content keyed by ``hash_value``.

        Parameters
        ----------
        block_id : int
            A block with ``ref_count > 0``.
        hash_value : bytes
            The block's hash-chain key (see :func:`block_hash`).

        Returns
        -------
        bool
            True if ``block_id`` now carries the hash; False if another block already holds it (the
            existing mapping is kept and ``block_id`` stays unregistered).

        Raises
        ------
        BlockStateError
            If the block is not in use, or is already registered under a different hash.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise BlockStateError(f"cannot register block {block_id}: only a used block can be registered")
        current = self._hashes[block_id]
        if current is not None:
            if current != hash_value:
                raise BlockStateError(
                    f"block {block_id} is already registered under another hash; a full block is never rewritten"
                )
            return True
        if hash_value in self._hash_to_block:
            return False
        self._hashes[block_id] = hash_value
        self._hash_to_block[hash_value] = block_id
        return True

    def lookup(self, hash_value: bytes) -> int | None:
        """Return the block registered under ``hash_value`` (used or cached), or None."""
        return self._hash_to_block.get(hash_value)

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Check the pool's internal consistency.

        Raises
        ------
        AssertionError
            With a message naming the first broken invariant (state partition, ref counts, hash map).
        """
        free = list(self._free)
        free_set = set(free)
        if len(free_set) != len(free):
            raise AssertionError(f"a block appears twice in the free queue: {sorted(free)}")
        overlap = free_set & self._lru.keys()
        if overlap:
            raise AssertionError(f"blocks {sorted(overlap)} are both free and cached")
        used = [b for b in range(self._num_blocks) if self._ref_counts[b] > 0]
        if len(used) != self._num_used:
            raise AssertionError(f"num_used counter is {self._num_used} but {len(used)} blocks have ref_count > 0")
        if len(free) + len(self._lru) + len(used) != self._num_blocks:
            raise AssertionError(
                f"free {len(free)} + cached {len(self._lru)} + used {len(used)} != total {self._num_blocks}"
            )
        for block_id in range(self._num_blocks):
            refs = self._ref_counts[block_id]
            if refs < 0:
                raise AssertionError(f"block {block_id} has a negative ref_count {refs}")
            if refs > 0 and (block_id in free_set or block_id in self._lru):
                raise AssertionError(f"block {block_id} is used (ref_count {refs}) but also free or cached")
            if refs == 0 and block_id not in free_set and block_id not in self._lru:
                raise AssertionError(f"block {block_id} has ref_count 0 but is neither free nor cached")
            block_key = self._hashes[block_id]
            if block_id in free_set and block_key is not None:
                raise AssertionError(f"free block {block_id} still carries a hash")
            if block_id in self._lru and block_key is None:
                raise AssertionError(f"cached block {block_id} carries no hash")
            if block_key is not None and self._hash_to_block.get(block_key) != block_id:
                raise AssertionError(f"block {block_id} carries a hash that the hash map points elsewhere")
        for key, block_id in self._hash_to_block.items():
            if not 0 <= block_id < self._num_blocks:
                raise AssertionError(f"the hash map points at block {block_id}, outside the pool")
            if self._hashes[block_id] != key:
                raise AssertionError(f"the hash map points at block {block_id}, which does not carry that hash")

    def _check_id(self, block_id: int) -> int:
        if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < self._num_blocks:
            raise KVStackError(f"block id must be an integer in 0..{self._num_blocks - 1}, got {block_id!r}")
        return block_id
