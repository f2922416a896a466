"""Per-sequence block tables over the block pool, with hash-chain prefix caching and copy-on-write.

:class:`BlockManager` decides which physical KV blocks each sequence uses; it never touches the tensors
(:mod:`kvstack.engine.paged` holds them). Design and limitations: ``docs/engine-design.md`` (section "Blocks").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

from kvstack.engine.block_pool import BlockPool, BlockStateError, OutOfBlocksError
from kvstack.engine.prefix_hash import block_hash, chain_hashes
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
    on_release : callable or None, optional
        Called as ``on_release(block_id)`` when a block is freed or evicted (:attr:`BlockPool.on_release`).

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
        on_release: Callable[[int], None] | None = None,
    ) -> None:
        self._pool = BlockPool(num_blocks, block_size)
        self._pool.on_release = on_release
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
        hashes = chain_hashes(tokens, size, num_full, self._namespace) if self._enable_prefix_caching else []
        prefix = self._reusable_prefix(hashes[: (len(tokens) - 1) // size])  # the last token's block never hits
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
        reused = self._load_tier_hits(prefix, table, hashes)
        table.extend(new_blocks)
        for index in range(len(hashes)):  # register the full blocks that did not come from the pool
            if index >= len(prefix) or prefix[index] is None:
                self._pool.register(table[index], hashes[index])

        self._sequences[seq_id] = _SequenceState(token_ids=tokens, block_table=table, block_hashes=hashes)
        cached_tokens = reused * size
        self._queries_tokens += len(tokens)
        self._hits_tokens += cached_tokens
        self._tier_hits_tokens += len(self.last_loaded_blocks) * size
        return cached_tokens

    def _reusable_prefix(self, hashes: list[bytes]) -> list[int | None]:
        """The reusable prefix of a prompt whose block hashes are ``hashes``, block by block: a pool block id, or
        None for a block to load from the tiers; it ends at the first block found in neither."""
        prefix: list[int | None] = []
        for key in hashes:
            found = self._pool.lookup(key)
            if found is None and (self._tiers is None or not self._tiers.contains(key)):
                break
            prefix.append(found)
        return prefix

    def _load_tier_hits(self, prefix: list[int | None], table: list[int], hashes: list[bytes]) -> int:
        """Load the tier hits of ``prefix`` into their new blocks of ``table``, in order; return how many blocks of
        the prefix are reusable (the first load that fails, block gone or corrupt, ends it). Sets
        :attr:`last_loaded_blocks`."""
        self.last_loaded_blocks = []
        for index, block in enumerate(prefix):
            if block is None:
                assert self._tiers is not None
                if not self._tiers.load(hashes[index], table[index]):
                    return index
                self.last_loaded_blocks.append(table[index])
        return len(prefix)

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
        # The block holding the last token is never a hit.
        return chain_hashes(tokens, self._block_size, (len(tokens) - 1) // self._block_size, self._namespace)

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
