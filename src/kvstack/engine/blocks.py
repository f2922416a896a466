"""Paged KV-cache bookkeeping: a fixed block pool, a hash-chain prefix cache and per-sequence block tables.

This is the memory-management layer of a paged serving engine. It tracks *which* physical KV blocks a
sequence uses and which blocks hold reusable prompt prefixes; it never touches the KV tensors themselves
(a runner that owns the tensors copies contents when told to, see :class:`CopyOnWrite`).

Design
------
* :class:`BlockPool` owns block ids ``0 .. num_blocks - 1``. Every block is in exactly one state:

  - **free**: never used, or released without a hash; holds nothing worth keeping;
  - **used**: ``ref_count > 0``, referenced by one or more sequences' block tables;
  - **cached**: ``ref_count == 0`` but the block holds a *full* block of tokens registered under its hash;
    it is kept for reuse and sits in an LRU list, evictable least-recently-released first.

  Allocation takes free blocks first and only then evicts cached ones, so cached prefixes survive as long
  as memory allows. Every failing operation checks before it mutates: an :class:`OutOfBlocksError` leaves
  the pool exactly as it was.
* :func:`block_hash` keys a full block by ``sha256(parent hash, namespace, token ids of the block)``. The
  parent is the hash of the previous block of the same sequence, so a block's hash identifies its *whole
  prefix*, not only its own tokens; the namespace (e.g. a model name) keeps two models from sharing KV.
* :class:`BlockManager` holds one block table per sequence. A new prompt walks its blocks computing the
  hash chain and reuses cached blocks up to the first miss; the rest are allocated fresh. Generated tokens
  fill the last block, a new block is allocated when it is full, and each block that becomes full is
  registered under its hash. :meth:`BlockManager.fork` shares every block with a child sequence (parallel
  sampling); the first write into a shared, partially filled last block triggers copy-on-write.

Why a block-hash chain (vLLM style) rather than a radix tree (SGLang style)
---------------------------------------------------------------------------
* Fixed-size blocks map one-to-one onto the paged KV pool, so the prefix cache and the allocator are the
  same structure: a cached prefix *is* a set of pool blocks, no token-granular tree nodes to split or merge.
* A block's identity is its whole prefix, so a lookup is a flat walk of ``len(prompt) / block_size`` dict
  hits with no tree traversal, and there is no per-node parent/child bookkeeping to keep consistent.
* Eviction is a flat LRU over unreferenced blocks. A radix tree must evict leaves first to keep the tree
  well formed; here a chain whose middle block was evicted simply stops matching there (later blocks of
  that chain become unreachable and age out of the LRU on their own).
* The hashes are content addresses independent of process state, so the same keys can index a disk or
  remote tier across restarts.

The trade-off is granularity: only full blocks are shared. A partial last block is never cached, so a
prompt of ``k * block_size + r`` tokens can reuse at most ``k`` blocks, where a radix tree would share
down to single tokens.

Limitations
-----------
* A prompt's full blocks are registered when the prompt is allocated, before the runner has computed
  their KV (as in nano-vllm). A caller must compute a sequence's prefill before scheduling another
  sequence that may hit those blocks, or run them in the same batch in order.
* When a block becomes full with content that another block already holds under the same hash, the
  existing block keeps the mapping and the new one stays unregistered (it is freed, not cached, on
  release). The two are not merged.
* Freeing a sequence releases its blocks last-to-first, so the tail of a chain sits at the LRU's old end
  and is evicted before the shared head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

from kvstack.errors import KVStackError

__all__ = [
    "BlockManager",
    "BlockPool",
    "BlockStateError",
    "BlockTiers",
    "CopyOnWrite",
    "OutOfBlocksError",
    "block_hash",
]

_HASH_DOMAIN = b"kvstack.engine.block_hash.v1\x00"


class OutOfBlocksError(KVStackError):
    """An allocation needs more KV blocks than are free or evictable; nothing was changed."""


class BlockStateError(RuntimeError):
    """A block operation that contradicts the block's state (freed twice, reused while free): a caller bug."""


@dataclasses.dataclass(frozen=True, slots=True)
class CopyOnWrite:
    """Instruction to the KV runner: copy block ``src_block``'s KV contents into ``dst_block``.

    Attributes
    ----------
    src_block : int
        The shared block the sequence was about to write into; it stays with the other sequences.
    dst_block : int
        The sequence's fresh private block, which now replaces ``src_block`` in its block table.
    """

    src_block: int
    dst_block: int


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVStackError(f"{name} must be a positive integer, got {value!r}")
    return value


def block_hash(parent: bytes | None, token_ids: Sequence[int], namespace: str = "") -> bytes:
    """Hash one full block of tokens chained to the hash of the block before it (vLLM-style hash chain).

    Parameters
    ----------
    parent : bytes or None
        Hash of the previous block of the same sequence, or None for the first block.
    token_ids : sequence of int
        The token ids of one *full* block (the caller guarantees its length is the block size).
    namespace : str, optional
        Key space, e.g. a model name: equal tokens under different namespaces never share a hash.

    Returns
    -------
    bytes
        A 32-byte SHA-256 digest identifying the whole prefix ending with this block.

    Raises
    ------
    KVStackError
        If ``token_ids`` is empty or a token id does not fit in a signed 64-bit integer.
    """
    tokens = list(token_ids)
    if not tokens:
        raise KVStackError("block_hash needs the token ids of a full block, got an empty sequence")
    parent_bytes = b"" if parent is None else bytes(parent)
    namespace_bytes = namespace.encode("utf-8")
    try:
        packed_tokens = struct.pack(f"<{len(tokens)}q", *tokens)
    except struct.error as exc:
        raise KVStackError(f"token ids must be integers in the signed 64-bit range, got {tokens!r}") from exc
    digest = hashlib.sha256(_HASH_DOMAIN)
    # Length prefixes keep the encoding unambiguous (no namespace/parent/tokens boundary can shift).
    digest.update(struct.pack("<Q", len(parent_bytes)))
    digest.update(parent_bytes)
    digest.update(struct.pack("<Q", len(namespace_bytes)))
    digest.update(namespace_bytes)
    digest.update(struct.pack("<Q", len(tokens)))
    digest.update(packed_tokens)
    return digest.digest()


class BlockTiers(Protocol):
    """Where cached blocks go when the device pool evicts them, and come back from on a prefix hit.

    The engine implements it over a :class:`~kvstack.engine.tiers.TieredStore` and the KV tensor pool; the
    block manager only calls it, it never sees tensors.
    """

    def offload(self, block_id: int, hash_value: bytes) -> None:
        """Save the content of cached block ``block_id`` (registered under ``hash_value``) before it is reused."""

    def contains(self, hash_value: bytes) -> bool:
        """Whether a lower tier holds the block keyed by ``hash_value``."""

    def load(self, hash_value: bytes, block_id: int) -> bool:
        """Write the block keyed by ``hash_value`` into the freshly allocated ``block_id``; False if it is gone or
        corrupt (the caller then computes it)."""


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


@dataclasses.dataclass
class _SequenceState:
    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[bytes]  # hash chain of the full blocks (empty when prefix caching is off)
    compacted: bool = False  # slots no longer hold a token prefix: nothing more is registered


class BlockManager:
    """Per-sequence block tables over one :class:`BlockPool`, with hash-chain prefix caching.

    Parameters
    ----------
    num_blocks : int
        Blocks in the pool.
    block_size : int
        Tokens per block.
    namespace : str, optional
        Prefix-cache key space (e.g. the model name); managers with different namespaces never share hashes.
    enable_prefix_caching : bool, optional
        When False nothing is registered or looked up, so every prompt is allocated fresh.
    tiers : BlockTiers or None, optional
        Lower storage tiers (prefix caching only): evicted cached blocks are offloaded there, and a prompt
        whose prefix misses the pool continues its lookup there, loading each hit into a new block.

    Attributes
    ----------
    last_loaded_blocks : list of int
        Blocks the last :meth:`allocate_prompt` filled from the tiers (their KV is computed).

    Notes
    -----
    Prefix-cache metrics are counted in tokens: every prompt adds its length to the queries and its
    reused tokens to the hits (tier hits included, also counted on their own).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        namespace: str = "",
        enable_prefix_caching: bool = True,
        tiers: BlockTiers | None = None,
    ) -> None:
        self._pool = BlockPool(num_blocks, block_size)
        self._tiers = tiers if enable_prefix_caching else None
        if self._tiers is not None:
            self._pool.on_evict = self._tiers.offload
        self.last_loaded_blocks: list[int] = []
        self._tier_hits_tokens = 0
        self._block_size = self._pool.block_size
        self._namespace = namespace
        self._enable_prefix_caching = bool(enable_prefix_caching)
        self._sequences: dict[Hashable, _SequenceState] = {}
        self._queries_tokens = 0
        self._hits_tokens = 0

    @property
    def pool(self) -> BlockPool:
        """The underlying block pool (read its counts; do not mutate it behind the manager's back)."""
        return self._pool

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self._block_size

    @property
    def namespace(self) -> str:
        """The prefix-cache key space."""
        return self._namespace

    @property
    def enable_prefix_caching(self) -> bool:
        """Whether full blocks are registered and looked up."""
        return self._enable_prefix_caching

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._sequences

    def seq_ids(self) -> list[Hashable]:
        """The live sequence ids, in allocation order."""
        return list(self._sequences)

    # ------------------------------------------------------------------ sequence lifecycle
    def allocate_prompt(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Build the block table of a new sequence for its prompt, reusing the longest cached prefix.

        Parameters
        ----------
        seq_id : hashable
            A new sequence id.
        token_ids : sequence of int
            The prompt (at least one token).

        Returns
        -------
        int
            Prompt tokens whose KV is already cached: a multiple of ``block_size`` and always less than
            the prompt length (the last token is left for the model to compute its logits).

        Raises
        ------
        KVStackError
            (a ValueError) If the prompt is empty or ``seq_id`` already exists.
        OutOfBlocksError
            If the uncached blocks do not fit; nothing is changed.
        """
        if seq_id in self._sequences:
            raise KVStackError(f"sequence {seq_id!r} already exists; free it first or use a new id")
        tokens = [int(t) for t in token_ids]
        if not tokens:
            raise KVStackError(f"the prompt of sequence {seq_id!r} is empty; give at least one token")
        size = self._block_size
        num_blocks = -(-len(tokens) // size)
        num_full = len(tokens) // size

        hashes: list[bytes] = []
        # Reusable prefix, block by block: a pool block id, or None for a block to load from the tiers.
        prefix: list[int | None] = []
        if self._enable_prefix_caching:
            parent: bytes | None = None
            for index in range(num_full):
                parent = block_hash(parent, tokens[index * size : (index + 1) * size], self._namespace)
                hashes.append(parent)
            max_hit_blocks = (len(tokens) - 1) // size  # never cache the block holding the last token
            for key in hashes[:max_hit_blocks]:
                found = self._pool.lookup(key)
                if found is None and (self._tiers is None or not self._tiers.contains(key)):
                    break
                prefix.append(found)
        pool_hits = [block for block in prefix if block is not None]

        # Check before mutating: hits that are cached now leave the evictable set once touched.
        needed = num_blocks - len(pool_hits)
        hits_in_lru = sum(1 for b in pool_hits if self._pool.is_cached(b))
        available = self._pool.num_available - hits_in_lru
        if needed > available:
            raise OutOfBlocksError(
                f"out of KV blocks for sequence {seq_id!r}: its prompt of {len(tokens)} tokens needs {needed} "
                f"new blocks but only {available} are available; free finished sequences or use a larger num_blocks"
            )

        for block_id in pool_hits:
            self._pool.touch(block_id)
        new_blocks = iter(self._pool.allocate(needed))
        table = [block if block is not None else next(new_blocks) for block in prefix]
        # Load tier hits in order; the first one that fails (gone, corrupt) ends the reusable prefix.
        self.last_loaded_blocks = []
        reused = len(prefix)
        for index, block in enumerate(prefix):
            if block is None:
                assert self._tiers is not None
                if not self._tiers.load(hashes[index], table[index]):
                    reused = index
                    break
                self.last_loaded_blocks.append(table[index])
        table.extend(new_blocks)
        if self._enable_prefix_caching:
            for index in range(num_full):
                if index >= len(prefix) or prefix[index] is None:
                    self._pool.register(table[index], hashes[index])

        self._sequences[seq_id] = _SequenceState(token_ids=tokens, block_table=table, block_hashes=hashes)
        cached_tokens = reused * size
        self._queries_tokens += len(tokens)
        self._hits_tokens += cached_tokens
        self._tier_hits_tokens += len(self.last_loaded_blocks) * size
        return cached_tokens

    def append_token(self, seq_id: Hashable, token_id: int) -> CopyOnWrite | None:
        """Record one generated token of ``seq_id``, allocating or copying a block when needed.

        Parameters
        ----------
        seq_id : hashable
            A live sequence.
        token_id : int
            The token whose KV will be written at position ``num_tokens(seq_id)``.

        Returns
        -------
        CopyOnWrite or None
            When the last block was shared (after :meth:`fork`) and was about to be written, the copy the
            runner must perform before writing; None otherwise.

        Raises
        ------
        OutOfBlocksError
            If a new block is needed and none is free or cached; nothing is changed.
        """
        seq = self._get(seq_id)
        size = self._block_size
        position = len(seq.token_ids)
        copy: CopyOnWrite | None = None
        if position % size == 0:
            self._require_one_block(seq_id)
            seq.block_table.extend(self._pool.allocate(1))
        else:
            last = seq.block_table[-1]
            if self._pool.ref_count(last) > 1:
                self._require_one_block(seq_id)
                (fresh,) = self._pool.allocate(1)
                self._pool.decref(last)
                seq.block_table[-1] = fresh
                copy = CopyOnWrite(src_block=last, dst_block=fresh)
        seq.token_ids.append(int(token_id))
        if self._enable_prefix_caching and not seq.compacted and len(seq.token_ids) % size == 0:
            start = len(seq.token_ids) - size
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            key = block_hash(parent, seq.token_ids[start:], self._namespace)
            seq.block_hashes.append(key)
            self._pool.register(seq.block_table[-1], key)
        return copy

    def compact(
        self, seq_id: Hashable, computed: int, kept: int, copy: Callable[[list[int], list[int]], None]
    ) -> int:
        """Move a sequence into fresh blocks holding only ``kept`` of its first ``computed`` slots (KV eviction).

        The new table holds ``kept`` slots (filled by ``copy``) followed by the sequence's slots from
        ``computed`` on (tokens recorded but not computed yet, e.g. a just-appended token), so those keep their
        order. The old blocks are released after ``copy(old_table, new_table)`` has run: blocks shared with other
        sequences or cached prefixes stay for them, the rest become free. A compacted sequence's slots no
        longer hold a token prefix, so none of its blocks is registered in the prefix cache from then on.

        Parameters
        ----------
        seq_id : hashable
            A live sequence.
        computed : int
            Slots whose KV is computed (``kept <= computed <= num_tokens(seq_id)``).
        kept : int
            Slots kept.
        copy : callable
            ``copy(old_table, new_table)`` writes the kept entries into slots ``0 .. kept - 1`` of the new table.

        Returns
        -------
        int
            Blocks the sequence holds fewer than before (may be 0 or negative only when ``kept`` is close to
            ``computed``; callers compact when a whole block is saved).

        Raises
        ------
        OutOfBlocksError
            If the new blocks do not fit next to the old ones; nothing is changed.
        KVStackError
            On inconsistent counts.
        """
        seq = self._get(seq_id)
        total = len(seq.token_ids)
        if not 0 <= kept <= computed <= total:
            raise KVStackError(f"compact needs 0 <= kept <= computed <= {total} slots, got kept={kept}, "
                               f"computed={computed}")
        pending = seq.token_ids[computed:]
        slots = kept + len(pending)
        needed = -(-slots // self._block_size)
        if needed > self._pool.num_available:
            raise OutOfBlocksError(
                f"compacting sequence {seq_id!r} needs {needed} new blocks but only {self._pool.num_available} are "
                "available"
            )
        old_table = seq.block_table
        new_table = self._pool.allocate(needed)
        copy(list(old_table), list(new_table))
        for block_id in reversed(old_table):
            self._pool.decref(block_id)
        seq.block_table = new_table
        seq.token_ids = [-1] * kept + pending
        seq.block_hashes = []
        seq.compacted = True
        return len(old_table) - len(new_table)

    def can_append(self, seq_id: Hashable) -> bool:
        """Whether :meth:`append_token` on ``seq_id`` would succeed now (a scheduler's preemption check)."""
        seq = self._get(seq_id)
        position = len(seq.token_ids)
        needs_block = position % self._block_size == 0 or self._pool.ref_count(seq.block_table[-1]) > 1
        return not needs_block or self._pool.num_available >= 1

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Create ``child_id`` sharing every block of ``parent_id`` (parallel sampling over one prompt).

        Raises
        ------
        KVStackError
            If the parent does not exist or the child already does.
        """
        parent = self._get(parent_id)
        if child_id in self._sequences:
            raise KVStackError(f"sequence {child_id!r} already exists; fork into a new id")
        for block_id in parent.block_table:
            self._pool.incref(block_id)
        self._sequences[child_id] = _SequenceState(
            token_ids=list(parent.token_ids),
            block_table=list(parent.block_table),
            block_hashes=list(parent.block_hashes),
            compacted=parent.compacted,
        )

    def free(self, seq_id: Hashable) -> None:
        """Release every block of ``seq_id``, last block first; full hashed blocks become cached, the rest free.

        Raises
        ------
        KVStackError
            If the sequence does not exist (e.g. it was already freed).
        """
        seq = self._get(seq_id)
        for block_id in reversed(seq.block_table):
            self._pool.decref(block_id)
        del self._sequences[seq_id]

    # ------------------------------------------------------------------ queries
    def block_table(self, seq_id: Hashable) -> list[int]:
        """A copy of the block table of ``seq_id`` (block ``i`` holds tokens ``i*block_size ..``)."""
        return list(self._get(seq_id).block_table)

    def num_tokens(self, seq_id: Hashable) -> int:
        """Tokens recorded for ``seq_id`` (prompt plus generated)."""
        return len(self._get(seq_id).token_ids)

    def token_ids(self, seq_id: Hashable) -> list[int]:
        """A copy of the tokens recorded for ``seq_id``."""
        return list(self._get(seq_id).token_ids)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a prompt of ``num_tokens`` tokens fits even with no prefix hit."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise KVStackError(f"num_tokens must be a non-negative integer, got {num_tokens!r}")
        return -(-num_tokens // self._block_size) <= self._pool.num_available

    def cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """Prompt tokens :meth:`allocate_prompt` would find cached right now; changes no state or metric.

        Parameters
        ----------
        token_ids : sequence of int
            A prompt (an empty one has no cached prefix).

        Returns
        -------
        int
            A multiple of ``block_size``, always less than ``len(token_ids)`` (0 when prefix caching is off).
        """
        hits = 0
        for key in self.prompt_block_hashes(token_ids):
            if self._pool.lookup(key) is None:
                break
            hits += 1
        return hits * self._block_size

    def prompt_block_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Hash chain of the prompt blocks a prefix hit may cover (full blocks before the last token's).

        Empty when prefix caching is off. The engine prefetches these from the disk tier when a request
        arrives, so the reads overlap with the steps it waits through.
        """
        tokens = [int(t) for t in token_ids]
        if not tokens or not self._enable_prefix_caching:
            return []
        size = self._block_size
        parent: bytes | None = None
        hashes: list[bytes] = []
        for index in range((len(tokens) - 1) // size):  # the block holding the last token is never a hit
            parent = block_hash(parent, tokens[index * size : (index + 1) * size], self._namespace)
            hashes.append(parent)
        return hashes

    def metrics(self) -> dict[str, float | int]:
        """Prefix-cache and memory counters.

        Returns
        -------
        dict
            ``prefix_cache_queries_tokens``, ``prefix_cache_hits_tokens``, ``prefix_cache_hit_rate``
            (hits / queries, 0.0 before any query), ``prefix_cache_tier_hits_tokens`` (hits loaded from the
            tiers), ``kv_usage`` (used / total blocks), ``evictions``,
            ``num_free``, ``num_cached``, ``num_used``.
        """
        queries = self._queries_tokens
        return {
            "prefix_cache_queries_tokens": queries,
            "prefix_cache_hits_tokens": self._hits_tokens,
            "prefix_cache_hit_rate": self._hits_tokens / queries if queries else 0.0,
            "prefix_cache_tier_hits_tokens": self._tier_hits_tokens,
            "kv_usage": self._pool.usage,
            "evictions": self._pool.evictions,
            "num_free": self._pool.num_free,
            "num_cached": self._pool.num_cached,
            "num_used": self._pool.num_used,
        }

    def check_invariants(self) -> None:
        """Check the pool and that every ref count equals the number of block tables holding the block.

        Raises
        ------
        AssertionError
            With a message naming the first broken invariant.
        """
        self._pool.check_invariants()
        holders = [0] * self._pool.num_blocks
        for seq_id, seq in self._sequences.items():
            expected_blocks = -(-len(seq.token_ids) // self._block_size)
            if len(seq.block_table) != expected_blocks:
                raise AssertionError(
                    f"sequence {seq_id!r} has {len(seq.token_ids)} tokens but {len(seq.block_table)} blocks"
                )
            if len(set(seq.block_table)) != len(seq.block_table):
                raise AssertionError(f"sequence {seq_id!r} holds a block twice: {seq.block_table}")
            if (self._enable_prefix_caching and not seq.compacted
                    and len(seq.block_hashes) != len(seq.token_ids) // self._block_size):
                raise AssertionError(f"sequence {seq_id!r} has a hash chain of the wrong length")
            for block_id in seq.block_table:
                holders[block_id] += 1
        for block_id, count in enumerate(holders):
            if self._pool.ref_count(block_id) != count:
                raise AssertionError(
                    f"block {block_id} has ref_count {self._pool.ref_count(block_id)} "
                    f"but {count} block tables hold it"
                )

    # ------------------------------------------------------------------ helpers
    def _get(self, seq_id: Hashable) -> _SequenceState:
        seq = self._sequences.get(seq_id)
        if seq is None:
            raise KVStackError(f"unknown sequence {seq_id!r}; allocate_prompt() it first (or it was already freed)")
        return seq

    def _require_one_block(self, seq_id: Hashable) -> None:
        if self._pool.num_available < 1:
            raise OutOfBlocksError(
                f"out of KV blocks: sequence {seq_id!r} needs 1 new block but none is free or cached; "
                "free or preempt a sequence or use a larger num_blocks"
            )
