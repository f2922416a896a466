"""Host and disk KV storage tiers: bit-exact round trips, corruption detection, restart, LRU eviction,
spill on eviction, promotion, prefetch, configuration errors, and a property test against a dict model."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstack.engine import DiskTier, HostTier, TieredStore, TierError, block_hash

SHAPES = ((1,), (2, 3), (2, 2, 4, 8), (3, 1, 5, 7))
Block = dict[str, torch.Tensor]


def make_block(seed: int, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = (2, 2, 4, 8)) -> Block:
    """A deterministic block ``{"keys", "values"}`` of random normal tensors."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(shape, generator=generator).to(dtype)
    values = torch.randn(shape, generator=generator).to(dtype)
    return {"keys": keys, "values": values}


def key_of(index: int) -> bytes:
    """The block hash of block ``index`` (a one-block chain of token ``index``)."""
    return block_hash(None, [index], "test-model")


def assert_same(got: Block | None, expected: Block) -> None:
    """``got`` holds exactly the tensors of ``expected``: same names, dtypes, shapes and bits."""
    assert got is not None
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype
        assert got[name].shape == tensor.shape
        assert torch.equal(got[name].flatten().view(torch.uint8), tensor.flatten().view(torch.uint8)), name


def file_of(disk: DiskTier, key: bytes) -> Path:
    return Path(disk.path) / f"{key.hex()}.kvb"


def block_nbytes(block: Block) -> int:
    return sum(t.nbytes for t in block.values())


# --------------------------------------------------------------------------------------------------
# Disk tier
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    disk = DiskTier(tmp_path, "model/dtype")
    blocks = {key_of(i): make_block(i, dtype, shape) for i, shape in enumerate(SHAPES)}
    for key, block in blocks.items():
        assert disk.put(key, block) is True
    assert disk.put(key_of(0), blocks[key_of(0)]) is False  # idempotent
    assert len(disk) == len(SHAPES)
    for key, block in blocks.items():
        assert disk.contains(key)
        assert_same(disk.get(key), block)
    metrics = disk.metrics()
    assert metrics["writes"] == len(SHAPES)
    assert metrics["hits"] == len(SHAPES)
    assert metrics["corrupt"] == 0
    assert metrics["bytes"] == disk.nbytes() == sum(file_of(disk, key).stat().st_size for key in blocks)
    assert disk.get(key_of(99)) is None
    assert disk.metrics()["misses"] == 1
    assert not list(Path(disk.path).glob("*.tmp"))


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 11])


def _bad_magic(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"NOTMAGIC" + data[8:])


def _bad_version(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] = 99
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [_flip_payload_byte, _truncate, _bad_magic, _bad_version],
    ids=["flipped-payload-byte", "truncated", "bad-magic", "bad-version"],
)
def test_disk_detects_damaged_file(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    disk = DiskTier(tmp_path, "m")
    key, block = key_of(1), make_block(1, torch.bfloat16)
    disk.put(key, block)
    damage(file_of(disk, key))
    assert disk.get(key) is None
    assert not file_of(disk, key).exists()
    assert not disk.contains(key)
    metrics = disk.metrics()
    assert metrics["corrupt"] == 1
    assert metrics["bytes"] == 0
    assert disk.put(key, block) is True
    assert_same(disk.get(key), block)


def test_disk_detects_file_renamed_to_another_hash(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, "m")
    key_a, key_b = key_of(1), key_of(2)
    block_a, block_b = make_block(1), make_block(2)
    disk.put(key_a, block_a)
    disk.put(key_b, block_b)
    os.replace(file_of(disk, key_a), file_of(disk, key_b))  # b's file now holds a's content
    assert disk.get(key_b) is None
    assert not file_of(disk, key_b).exists()
    assert disk.metrics()["corrupt"] == 1
    assert disk.get(key_a) is None  # its file is gone: a plain miss
    assert disk.metrics()["corrupt"] == 1
    assert len(disk) == 0 and disk.nbytes() == 0
    assert disk.put(key_b, block_b) is True
    assert_same(disk.get(key_b), block_b)


def test_disk_survives_restart_and_namespaces_are_separate(tmp_path: Path) -> None:
    first = DiskTier(tmp_path, "llama/bfloat16")
    blocks = {key_of(i): make_block(i, torch.bfloat16) for i in range(3)}
    for key, block in blocks.items():
        first.put(key, block)
    stray = Path(first.path) / ".deadbeef-crash.tmp"
    stray.write_bytes(b"half a file")
    second = DiskTier(tmp_path, "llama/bfloat16")
    assert not stray.exists()
    assert second.metrics()["stale_temp"] == 1
    assert len(second) == 3 and second.nbytes() == first.nbytes()
    for key, block in blocks.items():
        assert_same(second.get(key), block)
    other = DiskTier(tmp_path, "qwen/bfloat16")
    assert len(other) == 0
    assert all(other.get(key) is None for key in blocks)
    lookalike = DiskTier(tmp_path, "llama_bfloat16")  # sanitises to the same text, still distinct
    assert lookalike.path != first.path and len(lookalike) == 0


def test_disk_restart_orders_lru_by_mtime(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, "m")
    for index in range(3):
        disk.put(key_of(index), make_block(index))
    size = file_of(disk, key_of(0)).stat().st_size
    for index, mtime in ((0, 3_000_000), (1, 1_000_000), (2, 2_000_000)):
        os.utime(file_of(disk, key_of(index)), (mtime, mtime))
    restarted = DiskTier(tmp_path, "m", capacity_bytes=2 * size)  # one file too many: the oldest goes
    assert not restarted.contains(key_of(1))
    assert restarted.contains(key_of(0)) and restarted.contains(key_of(2))
    assert restarted.metrics()["evictions"] == 1


def test_disk_capacity_evicts_least_recently_used(tmp_path: Path) -> None:
    probe = DiskTier(tmp_path / "probe", "m")
    probe.put(key_of(0), make_block(0))
    size = probe.nbytes()
    disk = DiskTier(tmp_path, "m", capacity_bytes=3 * size + size // 2)
    for index in range(3):
        disk.put(key_of(index), make_block(index))
    assert disk.get(key_of(0)) is not None  # 0 is now the most recent, 1 the least
    disk.put(key_of(3), make_block(3))
    assert not disk.contains(key_of(1))
    assert not file_of(disk, key_of(1)).exists()
    assert all(disk.contains(key_of(i)) for i in (0, 2, 3))
    for index in range(4, 10):
        disk.put(key_of(index), make_block(index))
        assert disk.nbytes() <= disk.capacity_bytes
        on_disk = sum(p.stat().st_size for p in Path(disk.path).glob("*.kvb"))
        assert on_disk == disk.nbytes()
    assert disk.metrics()["evictions"] == 7
    small = DiskTier(tmp_path / "small", "m", capacity_bytes=size // 2)
    assert small.put(key_of(0), make_block(0)) is False
    assert small.metrics()["rejected"] == 1 and len(small) == 0


# --------------------------------------------------------------------------------------------------
# Host tier
# --------------------------------------------------------------------------------------------------


def test_host_lru_spills_to_disk_and_counts_bytes(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, "m")
    blocks = [
        make_block(i, dtype, shape)
        for i, (dtype, shape) in enumerate(
            [(torch.float32, (2, 2, 4, 8)), (torch.bfloat16, (2, 2, 4, 8)), (torch.float32, (2, 3))]
        )
    ]
    sizes = [block_nbytes(block) for block in blocks]
    assert sizes == [1024, 512, 48]
    host = HostTier(2048, next_tier=disk)
    for index, block in enumerate(blocks):
        host.put(key_of(index), block)
    assert host.nbytes() == sum(sizes) == sum(block_nbytes(host.get(key_of(i))) for i in range(3))
    assert host.keys() == [key_of(0), key_of(1), key_of(2)]
    host.get(key_of(0))  # order now 1, 2, 0
    new_block = make_block(7, torch.float32, (2, 2, 4, 8))
    host.put(key_of(7), new_block)  # 1584 + 1024 > 2048: evicts 1 (512 bytes), then 2 (48 bytes), keeps 0
    assert host.keys() == [key_of(0), key_of(7)]
    assert host.nbytes() == block_nbytes(blocks[0]) + block_nbytes(new_block)
    assert_same(disk.get(key_of(1)), blocks[1])
    assert_same(disk.get(key_of(2)), blocks[2])
    assert not disk.contains(key_of(0))
    metrics = host.metrics()
    assert metrics["evictions"] == 2 and metrics["spills"] == 2 and metrics["bytes"] == host.nbytes()
    assert_same(host.pop(key_of(0)), blocks[0])
    assert host.pop(key_of(0)) is None
    assert host.nbytes() == block_nbytes(new_block) and not disk.contains(key_of(0))


def test_host_stores_copies_and_drops_without_next_tier() -> None:
    block = make_block(1)
    expected = {name: tensor.clone() for name, tensor in block.items()}
    host = HostTier(block_nbytes(block))
    host.put(key_of(1), block)
    block["keys"].add_(1.0)  # the caller reuses its memory
    assert_same(host.get(key_of(1)), expected)
    host.put(key_of(2), make_block(2))
    assert not host.contains(key_of(1))
    assert host.metrics()["dropped"] == 1
    assert host.get(key_of(1)) is None
    zero = HostTier(0)
    zero.put(key_of(3), make_block(3))
    assert len(zero) == 0 and zero.nbytes() == 0


# --------------------------------------------------------------------------------------------------
# Tiered store
# --------------------------------------------------------------------------------------------------


def _store(tmp_path: Path, host_blocks: int) -> TieredStore:
    disk = DiskTier(tmp_path, "m")
    host = HostTier(host_blocks * block_nbytes(make_block(0)), next_tier=disk)
    return TieredStore(host, disk)


def test_tiered_store_host_hit_disk_hit_with_promotion_and_miss(tmp_path: Path) -> None:
    with _store(tmp_path, host_blocks=2) as store:
        blocks = {key_of(i): make_block(i) for i in range(4)}
        for key, block in blocks.items():
            store.put(key, block)
        assert store.host.keys() == [key_of(2), key_of(3)]
        assert store.disk is not None and store.disk.contains(key_of(0)) and store.disk.contains(key_of(1))
        assert_same(store.get(key_of(3)), blocks[key_of(3)])  # host hit
        assert_same(store.get(key_of(0)), blocks[key_of(0)])  # disk hit, promoted
        assert store.host.contains(key_of(0))
        assert store.host.keys() == [key_of(3), key_of(0)]  # 2 spilled to make room
        assert store.get(key_of(42)) is None
        metrics = store.metrics()
        assert metrics["host_hits"] == 1 and metrics["disk_hits"] == 1 and metrics["misses"] == 1
        assert metrics["spills"] == 3 and metrics["corrupt"] == 0
        assert metrics["host_bytes"] == store.host.nbytes() and metrics["disk_bytes"] == store.disk.nbytes()
        assert_same(store.get(key_of(0)), blocks[key_of(0)])
        assert store.metrics()["host_hits"] == 2


def test_prefetch_then_get_matches_plain_get(tmp_path: Path) -> None:
    store = _store(tmp_path, host_blocks=1)  # bfloat16 blocks are half the float32 size: host holds two
    blocks = {key_of(i): make_block(i, torch.bfloat16) for i in range(5)}
    for key, block in blocks.items():
        store.put(key, block)
    assert store.host.keys() == [key_of(3), key_of(4)]
    on_disk = [key_of(i) for i in range(3)]
    assert store.prefetch([*on_disk, key_of(4), key_of(77)]) == 3  # 4 is in host, 77 nowhere
    assert store.prefetch(on_disk) == 0  # already pending
    assert store.disk is not None
    for key in on_disk:
        prefetched = store.get(key)
        assert_same(prefetched, blocks[key])
        assert_same(prefetched, store.disk.get(key))
    metrics = store.metrics()
    assert metrics["prefetched"] == 3 and metrics["prefetch_hits"] == 3 and metrics["disk_hits"] == 3
    store.close()
    store.close()  # idempotent
    with pytest.raises(TierError, match="closed"):
        store.prefetch(on_disk)
    assert_same(store.get(key_of(0)), blocks[key_of(0)])  # plain get still works


def test_prefetch_of_corrupt_file_is_a_miss(tmp_path: Path) -> None:
    with _store(tmp_path, host_blocks=1) as store:
        store.put(key_of(0), make_block(0))
        store.put(key_of(1), make_block(1))
        assert store.disk is not None
        _flip_payload_byte(file_of(store.disk, key_of(0)))
        assert store.prefetch([key_of(0)]) == 1
        assert store.get(key_of(0)) is None
        assert store.metrics()["corrupt"] == 1 and store.metrics()["misses"] == 1


def test_memory_only_store(tmp_path: Path) -> None:
    store = TieredStore(HostTier(block_nbytes(make_block(0))), None)
    store.put(key_of(0), make_block(0))
    store.put(key_of(1), make_block(1))
    assert store.prefetch([key_of(0)]) == 0
    assert store.get(key_of(0)) is None
    assert_same(store.get(key_of(1)), make_block(1))
    store.close()


# --------------------------------------------------------------------------------------------------
# Configuration errors
# --------------------------------------------------------------------------------------------------


def _one_line(excinfo: pytest.ExceptionInfo[TierError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_bad_configuration_raises_one_line_tier_error(tmp_path: Path) -> None:
    with pytest.raises(TierError) as excinfo:
        DiskTier(tmp_path, "m", capacity_bytes=-1)
    assert "capacity_bytes" in _one_line(excinfo)
    with pytest.raises(TierError) as excinfo:
        HostTier(-5)
    assert "capacity_bytes" in _one_line(excinfo)
    with pytest.raises(TierError) as excinfo:
        HostTier(1.5)  # type: ignore[arg-type]
    _one_line(excinfo)
    regular_file = tmp_path / "not-a-dir"
    regular_file.write_text("x")
    with pytest.raises(TierError) as excinfo:
        DiskTier(regular_file / "sub", "m")
    assert "writable" in _one_line(excinfo)
    for namespace in ("", "   "):
        with pytest.raises(TierError) as excinfo:
            DiskTier(tmp_path, namespace)
        assert "namespace" in _one_line(excinfo)
    disk = DiskTier(tmp_path, "m")
    with pytest.raises(TierError) as excinfo:
        TieredStore(HostTier(10), disk)
    assert "next_tier" in _one_line(excinfo)
    with pytest.raises(TierError) as excinfo:
        disk.put(b"", make_block(0))
    _one_line(excinfo)
    with pytest.raises(TierError) as excinfo:
        disk.put(key_of(0), {})
    _one_line(excinfo)
    assert isinstance(excinfo.value, ValueError)


# --------------------------------------------------------------------------------------------------
# Property test
# --------------------------------------------------------------------------------------------------

NUM_KEYS = 6
PROPERTY_SHAPES = ((2, 1, 4, 4), (1, 2, 4, 4), (2, 3))


def property_block(index: int) -> Block:
    """The content named by hash ``index`` (a hash determines its content)."""
    dtype = torch.bfloat16 if index % 2 else torch.float32
    return make_block(1000 + index, dtype, PROPERTY_SHAPES[index % len(PROPERTY_SHAPES)])


def _damage_any(path: Path, mode: int) -> None:
    (_flip_payload_byte, _truncate, _bad_magic)[mode](path)


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "get", "get", "corrupt", "prefetch"]),
        st.integers(0, NUM_KEYS - 1),
        st.integers(0, 2),
    ),
    min_size=15,
    max_size=50,
)


@settings(deadline=None, derandomize=True, max_examples=30)
@given(operations=OPERATIONS)
def test_property_get_is_exact_or_miss(operations: list[tuple[str, int, int]]) -> None:
    largest = max(block_nbytes(property_block(i)) for i in range(NUM_KEYS))
    with tempfile.TemporaryDirectory() as directory:
        # Host holds one or two blocks, disk about three files: every kind of eviction happens.
        disk = DiskTier(directory, "prop", capacity_bytes=3 * (largest + 250), durable=False)
        store = TieredStore(HostTier(largest, next_tier=disk), disk)
        model: dict[bytes, Block] = {}  # what was put (content is a function of the hash)
        corrupted: set[bytes] = set()  # hashes whose disk file was damaged since it was last clean
        evictions_at_put: dict[bytes, int] = {}

        def check_get(key: bytes) -> None:
            got = store.get(key)
            if got is not None:
                assert key in model
                assert_same(got, model[key])
            elif key in model:
                evicted = disk.metrics()["evictions"] > evictions_at_put[key]
                assert evicted or key in corrupted, "a block was lost without eviction or corruption"
                assert not store.contains(key)

        try:
            for op, index, mode in operations:
                key = key_of(index)
                if op == "put":
                    if not disk.contains(key):
                        corrupted.discard(key)  # any future file for it is freshly written
                    store.put(key, property_block(index))
                    model[key] = property_block(index)
                    evictions_at_put[key] = disk.metrics()["evictions"]
                elif op == "corrupt":
                    path = Path(disk.path) / f"{key.hex()}.kvb"
                    if path.exists():
                        _damage_any(path, mode)
                        corrupted.add(key)
                        if mode == 0:  # read it back at once (the other modes may be read later or never)
                            check_get(key)
                elif op == "prefetch":
                    store.prefetch([key])
                else:
                    check_get(key)
                assert disk.nbytes() <= disk.capacity_bytes
                assert store.host.nbytes() <= store.host.capacity_bytes
            for index in range(NUM_KEYS):
                check_get(key_of(index))
        finally:
            store.close()


def test_namespace_digest_in_directory_name(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, "org/model:bf16")
    digest = hashlib.sha256(b"org/model:bf16").hexdigest()[:16]
    assert Path(disk.path).parent == tmp_path
    assert Path(disk.path).name == f"org_model_bf16-{digest}"
