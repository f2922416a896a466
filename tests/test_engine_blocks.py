"""Paged KV bookkeeping: block pool states, hash-chain prefix cache, block tables, fork and copy-on-write.

The state machine keeps its own model of every live sequence (tokens and block table) and of what each
physical block *contains* (the full token prefix written up to the end of that block), and checks the
manager against it: a prefix hit must hand back blocks whose simulated contents equal the prompt, a write
must go to a block no other live sequence holds, ref counts must equal the number of tables holding a block.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvstack.engine import BlockManager, BlockPool, BlockStateError, CopyOnWrite, OutOfBlocksError, block_hash
from kvstack.errors import KVStackError

# --------------------------------------------------------------------------------------------------
# Stateful test
# --------------------------------------------------------------------------------------------------

BLOCK_SIZE = 4
NUM_BLOCKS = 16
SHARED_PREFIXES = (
    tuple(range(100, 109)),  # 2 full blocks + 1 token
    tuple(range(200, 212)),  # 3 full blocks
    (100, 101, 102, 103, 7, 7, 7, 7, 7),  # shares its first block with the first prefix
)


def _snapshot(manager: BlockManager) -> tuple:
    pool = manager.pool
    return (
        pool.num_free,
        pool.num_cached,
        pool.num_used,
        pool.evictions,
        manager.metrics(),
        {sid: (manager.block_table(sid), manager.token_ids(sid)) for sid in manager.seq_ids()},
        [pool.ref_count(b) for b in range(pool.num_blocks)],
        pool.cached_blocks_lru(),
    )


class BlockManagerMachine(RuleBasedStateMachine):
    """Random prompts (shared prefixes + tails), appends, forks and frees over a small pool."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE, namespace="model-x")
        self.caching = True
        self.tokens: dict[int, list[int]] = {}
        self.tables: dict[int, list[int]] = {}
        self.contents: dict[int, tuple[int, ...]] = {}  # block id -> whole token prefix ending in this block
        self.next_id = 0
        self.freed_ids: list[int] = []
        self.history: list[tuple[int, ...]] = []  # token lists of every sequence seen, to replay as prompts
        self.queries = 0
        self.hits = 0

    @initialize(caching=st.sampled_from([True, True, False]))
    def choose_mode(self, caching: bool) -> None:
        self.caching = caching
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE, namespace="model-x", enable_prefix_caching=caching)

    # ---------------------------------------------------------------- helpers
    def _holders(self, block_id: int, exclude: int | None = None) -> int:
        return sum(table.count(block_id) for sid, table in self.tables.items() if sid != exclude)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    # ---------------------------------------------------------------- rules
    @rule(
        prefix=st.sampled_from(SHARED_PREFIXES),
        cut=st.integers(0, 12),
        tail=st.lists(st.integers(0, 2), max_size=6),
    )
    def allocate_prompt(self, prefix: tuple[int, ...], cut: int, tail: list[int]) -> None:
        self._allocate(list(prefix[:cut]) + tail)

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data(), cut=st.integers(1, 16), tail=st.lists(st.integers(0, 2), max_size=3))
    def replay_earlier_tokens(self, data: st.DataObject, cut: int, tail: list[int]) -> None:
        """Prompt with (a prefix of) an earlier sequence's tokens, generated ones included: hits on decode blocks."""
        earlier = data.draw(st.sampled_from(self.history))
        self._allocate(list(earlier[:cut]) + tail)

    def _allocate(self, prompt: list[int]) -> None:
        seq_id = self._new_id()
        if not prompt:
            before = _snapshot(self.manager)
            with pytest.raises(ValueError, match="empty"):
                self.manager.allocate_prompt(seq_id, prompt)
            assert _snapshot(self.manager) == before
            return
        before = _snapshot(self.manager)
        try:
            cached = self.manager.allocate_prompt(seq_id, prompt)
        except OutOfBlocksError:
            assert _snapshot(self.manager) == before, "OutOfBlocksError changed the manager's state"
            blocks_needed = -(-len(prompt) // BLOCK_SIZE)
            assert blocks_needed > self.manager.pool.num_free
            return
        table = self.manager.block_table(seq_id)
        assert len(table) == -(-len(prompt) // BLOCK_SIZE)
        assert cached % BLOCK_SIZE == 0
        assert 0 <= cached < len(prompt), "the last prompt token must stay uncached"
        if not self.caching:
            assert cached == 0
        hit_blocks = cached // BLOCK_SIZE
        for index, block_id in enumerate(table):
            if index < hit_blocks:
                # A prefix hit must hand back a block holding exactly this prompt's prefix.
                assert self.contents.get(block_id) == tuple(prompt[: (index + 1) * BLOCK_SIZE])
            else:
                assert self._holders(block_id) == 0, f"fresh block {block_id} is still held by a live sequence"
                self.contents[block_id] = tuple(prompt[: min(len(prompt), (index + 1) * BLOCK_SIZE)])
        self.tokens[seq_id] = list(prompt)
        self.tables[seq_id] = table
        self.history.append(tuple(prompt))
        self.queries += len(prompt)
        self.hits += cached

    @precondition(lambda self: bool(self.tables))
    @rule(data=st.data(), token=st.integers(0, 2))
    def append_token(self, data: st.DataObject, token: int) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tables)))
        position = len(self.tokens[seq_id])
        old_table = list(self.tables[seq_id])
        before = _snapshot(self.manager)
        shared_last = position % BLOCK_SIZE != 0 and self._holders(old_table[-1]) > 1
        try:
            copy = self.manager.append_token(seq_id, token)
        except OutOfBlocksError:
            assert _snapshot(self.manager) == before, "OutOfBlocksError changed the manager's state"
            assert position % BLOCK_SIZE == 0 or shared_last
            assert self.manager.pool.num_free + self.manager.pool.num_cached == 0
            return
        table = self.manager.block_table(seq_id)
        index = position // BLOCK_SIZE
        if position % BLOCK_SIZE == 0:
            assert copy is None
            assert table[:-1] == old_table and len(table) == len(old_table) + 1
            assert self._holders(table[-1], exclude=seq_id) == 0
        elif shared_last:
            assert copy == CopyOnWrite(src_block=old_table[-1], dst_block=table[-1])
            assert table[:-1] == old_table[:-1] and table[-1] != old_table[-1]
            assert self._holders(table[-1], exclude=seq_id) == 0
            self.contents[table[-1]] = self.contents[old_table[-1]]
        else:
            assert copy is None
            assert table == old_table
        written = table[index]
        assert self._holders(written, exclude=seq_id) == 0, f"block {written} written while another sequence holds it"
        self.tokens[seq_id].append(token)
        self.tables[seq_id] = table
        self.contents[written] = tuple(self.tokens[seq_id])

    @precondition(lambda self: bool(self.tables))
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(sorted(self.tables)))
        child = self._new_id()
        before_free = self.manager.pool.num_free
        self.manager.fork(parent, child)
        assert self.manager.block_table(child) == self.tables[parent]
        assert self.manager.pool.num_free == before_free, "fork must not allocate"
        self.tokens[child] = list(self.tokens[parent])
        self.tables[child] = list(self.tables[parent])

    @precondition(lambda self: bool(self.tables))
    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        """Token eviction: keep ``kept`` of the first ``computed`` slots in fresh blocks, the rest pending."""
        seq_id = data.draw(st.sampled_from(sorted(self.tables)))
        total = len(self.tokens[seq_id])
        computed = data.draw(st.integers(0, total), label="computed")
        kept = data.draw(st.integers(0, computed), label="kept")
        old_table = list(self.tables[seq_id])
        before = _snapshot(self.manager)
        copies: list[tuple[list[int], list[int]]] = []
        needed = -(-(kept + total - computed) // BLOCK_SIZE)
        try:
            freed = self.manager.compact(seq_id, computed, kept, lambda old, new: copies.append((old, new)))
        except OutOfBlocksError:
            assert _snapshot(self.manager) == before, "OutOfBlocksError changed the manager's state"
            assert needed > self.manager.pool.num_free + self.manager.pool.num_cached
            return
        table = self.manager.block_table(seq_id)
        assert copies == [(old_table, table)], "copy must run once, with the old and the new table"
        assert len(table) == needed and freed == len(old_table) - needed
        for block_id in table:
            assert self._holders(block_id, exclude=seq_id) == 0, f"compaction reused held block {block_id}"
            self.contents[block_id] = ("compacted", seq_id, block_id)  # never a prefix hit: not registered
        self.tokens[seq_id] = [-1] * kept + self.tokens[seq_id][computed:]
        self.tables[seq_id] = table

    @precondition(lambda self: bool(self.tables))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.tables)))
        self.manager.free(seq_id)
        if -1 not in self.tokens[seq_id]:  # a compacted sequence's slots are no token prefix to replay
            self.history.append(tuple(self.tokens[seq_id]))
        del self.tokens[seq_id]
        del self.tables[seq_id]
        self.freed_ids.append(seq_id)

    @precondition(lambda self: bool(self.freed_ids))
    @rule(data=st.data())
    def free_again_is_refused(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(self.freed_ids))
        before = _snapshot(self.manager)
        with pytest.raises(KVStackError, match="unknown sequence"):
            self.manager.free(seq_id)
        assert _snapshot(self.manager) == before

    # ---------------------------------------------------------------- invariants
    @invariant()
    def counts_partition_the_pool(self) -> None:
        pool = self.manager.pool
        assert pool.num_free + pool.num_cached + pool.num_used == NUM_BLOCKS
        held = {b for table in self.tables.values() for b in table}
        assert pool.num_used == len(held)
        assert pool.usage == pytest.approx(len(held) / NUM_BLOCKS)
        if not self.caching:
            assert pool.num_cached == 0

    @invariant()
    def ref_counts_match_live_tables(self) -> None:
        pool = self.manager.pool
        for block_id in range(NUM_BLOCKS):
            refs = pool.ref_count(block_id)
            assert refs >= 0
            assert refs == self._holders(block_id), f"block {block_id}: ref_count {refs} != holders"
        for seq_id, table in self.tables.items():
            assert self.manager.block_table(seq_id) == table
            assert self.manager.num_tokens(seq_id) == len(self.tokens[seq_id])
            assert len(table) == -(-len(self.tokens[seq_id]) // BLOCK_SIZE)

    @invariant()
    def metrics_count_tokens(self) -> None:
        metrics = self.manager.metrics()
        assert metrics["prefix_cache_queries_tokens"] == self.queries
        assert metrics["prefix_cache_hits_tokens"] == self.hits
        assert metrics["num_free"] + metrics["num_cached"] + metrics["num_used"] == NUM_BLOCKS

    @invariant()
    def internal_invariants_hold(self) -> None:
        self.manager.check_invariants()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None, derandomize=True
)
TestBlockManagerStateMachine = BlockManagerMachine.TestCase


# --------------------------------------------------------------------------------------------------
# Unit tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt_len", "expected_hit"), [(10, 8), (8, 4), (9, 8), (4, 0), (3, 0), (1, 0)])
def test_second_prompt_hits_every_full_block_but_the_one_holding_the_last_token(prompt_len, expected_hit):
    manager = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(1000, 1000 + prompt_len))
    assert manager.allocate_prompt("a", prompt) == 0
    assert manager.allocate_prompt("b", prompt) == expected_hit
    shared = expected_hit // 4
    assert manager.block_table("b")[:shared] == manager.block_table("a")[:shared]
    assert set(manager.block_table("b")[shared:]).isdisjoint(manager.block_table("a"))
    manager.check_invariants()


def test_prefix_cache_metrics_are_counted_in_tokens():
    manager = BlockManager(num_blocks=16, block_size=4)
    manager.allocate_prompt(1, list(range(10)))  # 10 queried, 0 hit
    manager.allocate_prompt(2, list(range(10)))  # 10 queried, 8 hit
    manager.allocate_prompt(3, [*range(6), 99, 98])  # 8 queried, first block (4 tokens) hit
    metrics = manager.metrics()
    assert metrics["prefix_cache_queries_tokens"] == 28
    assert metrics["prefix_cache_hits_tokens"] == 12
    assert metrics["prefix_cache_hit_rate"] == pytest.approx(12 / 28)
    assert metrics["kv_usage"] == pytest.approx(manager.pool.num_used / 16)
    assert set(metrics) == {
        "prefix_cache_queries_tokens", "prefix_cache_hits_tokens", "prefix_cache_hit_rate",
        "prefix_cache_tier_hits_tokens", "kv_usage", "evictions", "num_free", "num_cached", "num_used",
    }


def test_a_freed_prompt_is_reused_from_the_cache():
    manager = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    manager.allocate_prompt("a", prompt)
    first_blocks = manager.block_table("a")[:2]
    manager.free("a")
    assert manager.pool.num_cached == 2 and manager.pool.num_used == 0
    assert manager.allocate_prompt("b", prompt) == 8
    assert manager.block_table("b")[:2] == first_blocks
    assert manager.pool.num_cached == 0
    manager.check_invariants()


def test_pool_evicts_the_least_recently_released_cached_block_first():
    pool = BlockPool(num_blocks=3, block_size=2)
    blocks = pool.allocate(3)
    keys = {b: block_hash(None, [b, b], "ns") for b in blocks}
    for b in blocks:
        assert pool.register(b, keys[b])
    release_order = [blocks[2], blocks[0], blocks[1]]
    for b in release_order:
        pool.decref(b)
    assert pool.num_cached == 3 and pool.num_free == 0
    assert pool.cached_blocks_lru() == release_order
    for expected_evictions, victim in enumerate(release_order, start=1):
        assert pool.allocate(1) == [victim]
        assert pool.evictions == expected_evictions
        assert pool.lookup(keys[victim]) is None
        pool.check_invariants()


def test_on_release_hears_of_a_block_when_it_is_freed_or_evicted_and_not_when_it_is_cached():
    pool = BlockPool(num_blocks=4, block_size=2)
    released: list[int] = []
    pool.on_release = released.append
    hashed, plain, shared = pool.allocate(3)
    assert pool.register(hashed, block_hash(None, [1, 1], "ns"))
    pool.incref(shared)
    pool.decref(hashed)  # cached: it still holds its tokens
    pool.decref(plain)  # free
    pool.decref(shared)  # another reference remains
    assert released == [plain]
    pool.decref(shared)
    assert released == [plain, shared]
    pool.allocate(3)  # the one never used, the two free ones, then the cached one evicted
    assert released == [plain, shared]
    pool.allocate(1)
    assert released == [plain, shared, hashed]


def test_a_hit_on_the_oldest_cached_block_is_not_evicted_by_its_own_prompt():
    manager = BlockManager(num_blocks=4, block_size=2)
    manager.allocate_prompt("a", [1, 2, 3])
    manager.allocate_prompt("c", [5, 6, 7])
    head_a, head_c = manager.block_table("a")[0], manager.block_table("c")[0]
    manager.free("a")
    manager.free("c")
    manager.allocate_prompt("x", [9, 9, 9, 9])  # takes the two free blocks
    assert manager.pool.num_free == 0 and manager.pool.cached_blocks_lru() == [head_a, head_c]
    assert manager.allocate_prompt("b", [1, 2, 8]) == 2  # hits head_a, the LRU's oldest entry
    assert manager.block_table("b") == [head_a, head_c]
    assert manager.pool.evictions == 1
    assert manager.pool.lookup(block_hash(None, [5, 6])) is None
    manager.check_invariants()


def test_touching_a_cached_block_protects_it_from_eviction():
    pool = BlockPool(num_blocks=2, block_size=2)
    a, b = pool.allocate(2)
    pool.register(a, b"ka")
    pool.register(b, b"kb")
    pool.decref(a)
    pool.decref(b)
    pool.touch(a)  # the LRU's oldest entry is reused, so b is the victim
    assert pool.ref_count(a) == 1
    assert pool.allocate(1) == [b]
    assert pool.lookup(b"ka") == a and pool.lookup(b"kb") is None


def test_manager_frees_tails_first_so_shared_heads_survive_longer():
    manager = BlockManager(num_blocks=6, block_size=2)
    manager.allocate_prompt("a", [1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] [5]
    head, middle, _ = manager.block_table("a")
    manager.free("a")
    assert manager.pool.cached_blocks_lru() == [middle, head]
    manager.allocate_prompt("b", [9] * 12)  # needs 6 blocks: 4 free, then evicts middle, then head
    assert manager.pool.evictions == 2
    manager.check_invariants()


def test_allocation_prefers_free_blocks_over_evicting_cached_ones():
    pool = BlockPool(num_blocks=4, block_size=2)
    a, b = pool.allocate(2)
    pool.register(a, b"ka")
    pool.decref(a)
    pool.decref(b)  # unhashed: goes back to free
    assert pool.num_cached == 1 and pool.num_free == 3
    taken = pool.allocate(3)
    assert a not in taken and pool.evictions == 0
    assert pool.allocate(1) == [a] and pool.evictions == 1


def test_copy_on_write_after_fork_leaves_the_parent_table_unchanged():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate_prompt("parent", [1, 2, 3, 4, 5, 6])  # one full block + a half-filled one
    full, partial = manager.block_table("parent")
    manager.fork("parent", "child")
    assert manager.pool.ref_count(full) == 2 and manager.pool.ref_count(partial) == 2

    copy = manager.append_token("child", 42)
    assert isinstance(copy, CopyOnWrite)
    assert copy.src_block == partial
    assert copy.dst_block not in (full, partial)
    assert manager.block_table("child") == [full, copy.dst_block]
    assert manager.block_table("parent") == [full, partial]
    assert manager.pool.ref_count(partial) == 1 and manager.pool.ref_count(copy.dst_block) == 1
    assert manager.pool.ref_count(full) == 2

    assert manager.append_token("parent", 43) is None  # the parent now owns its last block alone
    assert manager.block_table("parent") == [full, partial]
    assert manager.num_tokens("parent") == manager.num_tokens("child") == 7
    manager.check_invariants()


def test_fork_on_a_full_last_block_needs_no_copy():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate_prompt("parent", list(range(8)))
    manager.fork("parent", "child")
    assert manager.append_token("child", 1) is None
    assert manager.block_table("child")[:2] == manager.block_table("parent")
    assert len(manager.block_table("child")) == 3
    manager.check_invariants()


def test_generated_full_blocks_are_registered_and_reusable():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.allocate_prompt("a", [1, 2, 3])
    for token in (4, 5, 6, 7, 8):
        manager.append_token("a", token)
    manager.free("a")
    assert manager.allocate_prompt("b", [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8


def test_disabled_prefix_caching_gives_no_hits():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prompt = list(range(9))
    manager.allocate_prompt("a", prompt)
    assert manager.allocate_prompt("b", prompt) == 0
    manager.free("a")
    assert manager.pool.num_cached == 0
    assert manager.allocate_prompt("c", prompt) == 0
    metrics = manager.metrics()
    assert metrics["prefix_cache_hits_tokens"] == 0 and metrics["prefix_cache_queries_tokens"] == 27
    assert metrics["prefix_cache_hit_rate"] == 0.0


def test_namespaces_never_share_blocks():
    tokens = [5, 6, 7, 8]
    assert block_hash(None, tokens, "model-a") != block_hash(None, tokens, "model-b")
    assert block_hash(None, tokens, "model-a") == block_hash(None, tokens, "model-a")
    manager = BlockManager(num_blocks=8, block_size=4, namespace="model-a")
    manager.allocate_prompt("a", [*tokens, 9])
    (stored,) = manager.block_table("a")[:1]
    assert manager.pool.lookup(block_hash(None, tokens, "model-a")) == stored
    assert manager.pool.lookup(block_hash(None, tokens, "model-b")) is None
    assert manager.pool.lookup(block_hash(None, tokens)) is None


def test_block_hash_chains_on_the_whole_prefix():
    first = block_hash(None, [1, 2])
    assert len(first) == 32
    # Same block tokens after different prefixes are different blocks.
    assert block_hash(first, [3, 4]) != block_hash(block_hash(None, [9, 9]), [3, 4])
    assert block_hash(None, [3, 4]) != block_hash(first, [3, 4])
    # Encoding is unambiguous: the namespace cannot bleed into the tokens.
    assert block_hash(None, [1], "a") != block_hash(None, [1], "a\x00")
    with pytest.raises(KVStackError):
        block_hash(None, [])


def test_register_keeps_an_existing_mapping():
    pool = BlockPool(num_blocks=3, block_size=2)
    a, b = pool.allocate(2)
    assert pool.register(a, b"same")
    assert not pool.register(b, b"same")
    assert pool.lookup(b"same") == a and pool.hash_of(b) is None
    pool.decref(b)
    assert pool.num_free == 2  # b was never registered, so it is free rather than cached
    pool.decref(a)
    assert pool.num_cached == 1
    pool.check_invariants()


def test_decref_below_zero_raises():
    pool = BlockPool(num_blocks=2, block_size=4)
    (block,) = pool.allocate(1)
    pool.decref(block)
    with pytest.raises(BlockStateError, match="freed twice"):
        pool.decref(block)
    with pytest.raises(BlockStateError):
        pool.decref(1)  # never allocated
    with pytest.raises(BlockStateError):
        pool.incref(block)
    with pytest.raises(BlockStateError):
        pool.touch(block)  # free: nothing to reuse
    pool.check_invariants()


def test_freeing_a_sequence_twice_is_refused():
    manager = BlockManager(num_blocks=4, block_size=4)
    manager.allocate_prompt("a", [1, 2])
    manager.free("a")
    with pytest.raises(ValueError, match="unknown sequence"):
        manager.free("a")
    manager.check_invariants()


def test_empty_prompt_and_duplicate_seq_id_raise_value_error():
    manager = BlockManager(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        manager.allocate_prompt("a", [])
    manager.allocate_prompt("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already exists"):
        manager.allocate_prompt("a", [4])
    with pytest.raises(ValueError, match="already exists"):
        manager.fork("a", "a")
    assert manager.block_table("a") == [0] and manager.num_tokens("a") == 3


def test_out_of_blocks_error_is_one_line_and_changes_nothing():
    manager = BlockManager(num_blocks=3, block_size=2)
    manager.allocate_prompt("a", [1, 2, 3, 4])
    manager.free("a")  # [1,2] and [3,4] are cached, one block is free
    before = _snapshot(manager)
    assert not manager.can_allocate(7)
    with pytest.raises(OutOfBlocksError) as excinfo:
        manager.allocate_prompt("b", list(range(50, 57)))
    message = str(excinfo.value)
    assert "\n" not in message and "out of KV blocks" in message and "num_blocks" in message
    assert isinstance(excinfo.value, KVStackError) and isinstance(excinfo.value, ValueError)
    assert _snapshot(manager) == before
    assert "b" not in manager

    # A cached block the prompt itself hits is not evictable space for that prompt: [1,2] is hit,
    # 3 more blocks are needed and only 2 remain (1 free + the cached [3,4]).
    with pytest.raises(OutOfBlocksError):
        manager.allocate_prompt("b", [1, 2, 9, 9, 9, 9, 5])
    assert _snapshot(manager) == before
    assert manager.allocate_prompt("c", [1, 2, 3, 4, 5]) == 4
    manager.check_invariants()

    pool = BlockPool(num_blocks=2, block_size=2)
    pool.allocate(2)
    with pytest.raises(OutOfBlocksError) as excinfo:
        pool.allocate(1)
    assert "\n" not in str(excinfo.value)


def test_append_out_of_blocks_changes_nothing():
    manager = BlockManager(num_blocks=2, block_size=2)
    manager.allocate_prompt("a", [1, 2, 3, 4])
    before = _snapshot(manager)
    assert not manager.can_append("a")
    with pytest.raises(OutOfBlocksError):
        manager.append_token("a", 5)
    assert _snapshot(manager) == before


def test_check_invariants_detects_corruption():
    pool = BlockPool(num_blocks=3, block_size=2)
    a, _ = pool.allocate(2)
    pool.register(a, b"k")
    pool.check_invariants()
    pool._ref_counts[a] = -1
    with pytest.raises(AssertionError):
        pool.check_invariants()
    pool._ref_counts[a] = 1
    pool._hash_to_block[b"other"] = 2  # the map points at a block that does not carry the hash
    with pytest.raises(AssertionError, match="does not carry"):
        pool.check_invariants()
    del pool._hash_to_block[b"other"]
    pool._hash_to_block[b"k"] = 1  # the block carries a hash the map points elsewhere
    with pytest.raises(AssertionError, match="points elsewhere"):
        pool.check_invariants()
    pool._hash_to_block[b"k"] = a
    pool.check_invariants()
    pool._free.append(a)  # a used block also in the free queue
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_invalid_sizes_are_rejected():
    with pytest.raises(KVStackError, match="num_blocks"):
        BlockPool(0, 4)
    with pytest.raises(KVStackError, match="block_size"):
        BlockManager(4, 0)
