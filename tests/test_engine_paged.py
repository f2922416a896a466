"""Paged KV pool and paged attention: write/gather through shuffled block tables, attention against dense
``scaled_dot_product_attention`` (decode, prefill, chunks at an offset, batches, GQA, a property test),
copy-on-write, export/import for the tiers and budget sizing."""

from __future__ import annotations

import math
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstack.cache import kernels
from kvstack.engine import BYTES_PER_MB, BlockManager, PagedKVPool, paged_attention
from kvstack.engine.paged_attention import paged_attention_packed
from kvstack.errors import KVStackError

ATOL = 1e-5


def shuffled_tables(counts: list[int], num_blocks: int, seed: int) -> list[list[int]]:
    """Disjoint block tables of ``counts[i]`` blocks each, drawn from a random permutation of the pool."""
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, used = [], 0
    for count in counts:
        tables.append(order[used:used + count])
        used += count
    return tables


def dense_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: int,
                    scaling: float) -> torch.Tensor:
    """SDPA over dense, GQA-expanded KV: query ``[Hq, q, D]``, keys/values ``[H, T, D]`` -> ``[Hq, q, D]``.

    Query ``j`` sits at position ``offset + j`` and sees key positions ``<= offset + j``.
    """
    group = query.shape[0] // keys.shape[0]
    expanded_keys = keys.repeat_interleave(group, dim=0)  # [Hq, T, D]
    expanded_values = values.repeat_interleave(group, dim=0)
    num_new, length = query.shape[1], keys.shape[1]
    allowed = torch.arange(length)[None, :] <= (offset + torch.arange(num_new))[:, None]  # [q, T]
    out = F.scaled_dot_product_attention(
        query[None], expanded_keys[None], expanded_values[None], attn_mask=allowed, scale=scaling
    )
    return out[0]


def run_case(lengths: list[int], new_tokens: list[int], block_size: int, heads: int, group: int, dim: int,
             seed: int, num_layers: int = 2, layer: int = 1, chunked_write: bool = False) -> None:
    """Write random KV of several sequences through shuffled tables, attend, compare with dense SDPA."""
    generator = torch.Generator().manual_seed(seed)
    counts = [-(-length // block_size) for length in lengths]
    num_blocks = sum(counts) + 3
    pool = PagedKVPool(num_blocks, num_layers, heads, dim, block_size=block_size)
    tables = shuffled_tables(counts, num_blocks, seed)
    dense = []
    for table, length in zip(tables, lengths, strict=True):
        keys = torch.randn(heads, length, dim, generator=generator)
        values = torch.randn(heads, length, dim, generator=generator)
        if chunked_write:  # prefix then the new tokens, as an engine step would
            split = length // 2
            pool.write(layer, table, 0, keys[:, :split], values[:, :split])
            pool.write(layer, table, split, keys[:, split:], values[:, split:])
        else:
            pool.write(layer, table, 0, keys, values)
        # Noise in the other layer must not leak into this one.
        pool.write(1 - layer, table, 0, torch.randn(heads, length, dim, generator=generator) * 100,
                   torch.randn(heads, length, dim, generator=generator) * 100)
        dense.append((keys, values))
    queries = [torch.randn(heads * group, q, dim, generator=generator) for q in new_tokens]
    scaling = dim**-0.5
    outputs = paged_attention(queries, pool, layer, tables, lengths, scaling)
    assert len(outputs) == len(lengths)
    packed_query = torch.cat(queries, dim=1).transpose(0, 1)  # [T, Hq, D]
    packed = {}
    for use_kernel in (False, True) if kernels.available() else (False,):
        with mock.patch.object(kernels, "available", lambda use=use_kernel: use):
            packed[use_kernel] = paged_attention_packed(packed_query, pool, layer, tables, new_tokens, lengths, scaling)
    offsets = [0]
    for q in new_tokens:
        offsets.append(offsets[-1] + q)
    for index, (query, output, (keys, values), length) in enumerate(zip(queries, outputs, dense, lengths, strict=True)):
        expected = dense_reference(query, keys, values, length - query.shape[1], scaling)
        assert output.shape == query.shape
        torch.testing.assert_close(output, expected, atol=ATOL, rtol=0)
        for result in packed.values():  # [T, Hq, D]: this sequence's rows
            torch.testing.assert_close(result[offsets[index]:offsets[index + 1]].transpose(0, 1), expected, atol=ATOL,
                                       rtol=0)


# --------------------------------------------------------------------------------------------------
# write / gather
# --------------------------------------------------------------------------------------------------


def test_write_gather_roundtrip_through_shuffled_tables():
    heads, dim, block_size, num_blocks = 2, 4, 4, 12
    pool = PagedKVPool(num_blocks, 2, heads, dim, block_size=block_size)
    generator = torch.Generator().manual_seed(0)
    table_a, table_b = shuffled_tables([3, 2], num_blocks, seed=1)
    keys_a, values_a = torch.randn(2, heads, 10, dim, generator=generator)  # ends mid-block (10 = 2*4 + 2)
    keys_b, values_b = torch.randn(2, heads, 7, dim, generator=generator)
    # A in uneven chunks that start and end mid-block; B in one go.
    for start, stop in ((0, 3), (3, 4), (4, 10)):
        pool.write(0, table_a, start, keys_a[:, start:stop], values_a[:, start:stop])
    pool.write(0, torch.tensor(table_b), 0, keys_b, values_b)

    for table, keys, values in ((table_a, keys_a, values_a), (table_b, keys_b, values_b)):
        length = keys.shape[1]
        got_keys, got_values = pool.gather(0, table, length)
        assert got_keys.shape == (heads, length, dim)
        assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
        for position in range(length):  # the documented placement, slot by slot
            block, slot = table[position // block_size], position % block_size
            assert torch.equal(pool.kv[block, 0, 0, :, slot], keys[:, position])
            assert torch.equal(pool.kv[block, 0, 1, :, slot], values[:, position])
    # Shorter prefixes and an empty read.
    assert torch.equal(pool.gather(0, table_a, 5)[0], keys_a[:, :5])
    assert pool.gather(0, table_a, 0)[1].shape == (heads, 0, dim)
    # Unused blocks, unused slots of A's last block and the other layer are untouched.
    unused = sorted(set(range(num_blocks)) - set(table_a) - set(table_b))
    assert not pool.kv[unused].any()
    assert not pool.kv[table_a[2], 0, :, :, 2:].any()
    assert not pool.kv[:, 1].any()


def test_write_does_not_touch_another_sequence():
    pool = PagedKVPool(4, 1, 1, 2, block_size=2)
    other = torch.arange(8, dtype=torch.float32).reshape(1, 4, 2)
    pool.write(0, [2, 0], 0, other, -other)
    before = pool.kv.clone()
    pool.write(0, [1, 3], 1, torch.ones(1, 3, 2), torch.ones(1, 3, 2))
    assert torch.equal(pool.kv[[2, 0]], before[[2, 0]])
    assert torch.equal(pool.gather(0, [2, 0], 4)[0], other)


def test_write_and_gather_errors():
    pool = PagedKVPool(4, 1, 2, 4, block_size=4)
    keys = torch.zeros(2, 5, 4)
    with pytest.raises(KVStackError, match="needs 3 blocks of the block table but it has only 2"):
        pool.write(0, [0, 1], 4, keys, keys)  # positions 4..8 need blocks 0..2
    with pytest.raises(KVStackError, match="num_kv_heads=2"):
        pool.write(0, [0, 1], 0, torch.zeros(3, 2, 4), torch.zeros(3, 2, 4))
    with pytest.raises(KVStackError, match="layer must be"):
        pool.write(1, [0, 1], 0, keys, keys)
    with pytest.raises(KVStackError, match=re.escape("block ids in 0..3")):
        pool.gather(0, [0, 9], 6)
    with pytest.raises(KVStackError, match="has only 1"):
        pool.gather(0, [0], 5)
    assert not pool.kv.any()


# --------------------------------------------------------------------------------------------------
# paged_attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize(
    ("name", "lengths", "new_tokens"),
    [
        ("decode", [13], [1]),
        ("prefill_from_zero", [11], [11]),
        ("chunk_at_offset", [19], [6]),
        ("chunk_ending_on_block_boundary", [16], [5]),
        ("mixed_batch", [1, 9, 23, 4], [1, 9, 7, 1]),
        ("longer_than_one_fallback_run", [300, 5], [3, 5]),  # 75 blocks: two runs of the PyTorch path
    ],
)
def test_paged_attention_matches_dense_sdpa(name, lengths, new_tokens, group):
    run_case(lengths, new_tokens, block_size=4, heads=2, group=group, dim=8, seed=len(name), chunked_write=True)


@settings(deadline=None, derandomize=True, max_examples=30)
@given(
    data=st.data(),
    block_size=st.sampled_from([1, 2, 3, 4, 8]),
    heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    dim=st.sampled_from([4, 8]),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_property(data, block_size, heads, group, dim, batch, seed):
    lengths = data.draw(st.lists(st.integers(1, 40), min_size=batch, max_size=batch), label="lengths")
    new_tokens = [data.draw(st.integers(1, length), label="q") for length in lengths]
    run_case(lengths, new_tokens, block_size, heads, group, dim, seed)


def test_paged_attention_explicit_causal_offsets():
    heads, group, dim, block_size = 1, 2, 4, 3
    pool = PagedKVPool(6, 1, heads, dim, block_size=block_size)
    generator = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, heads, 12, dim, generator=generator)
    table = shuffled_tables([4], 6, seed=3)[0]
    pool.write(0, table, 0, keys, values)
    query = torch.randn(heads * group, 4, dim, generator=generator)
    (output,) = paged_attention([query], pool, 0, [table], [12], 0.5, causal_offsets=[3])
    torch.testing.assert_close(output, dense_reference(query, keys, values, 3, 0.5), atol=ATOL, rtol=0)


def test_the_fused_paged_kernel_attends_the_same_under_cpu_autocast():
    # bf16 autocast around an engine step: the kernel runs with autocast off, so decode rows are the same
    # float32 attention as without it (to the bit) and still match dense SDPA
    if not kernels.available():
        pytest.skip("no C++ compiler for the fused kernels")
    generator = torch.Generator().manual_seed(5)
    lengths, new_tokens, heads, group, dim = [13, 7], [1, 1], 2, 3, 8
    pool = PagedKVPool(8, 1, heads, dim, block_size=4)
    tables = shuffled_tables([4, 2], 8, seed=5)
    dense = []
    for table, length in zip(tables, lengths, strict=True):
        keys, values = torch.randn(2, heads, length, dim, generator=generator)
        pool.write(0, table, 0, keys, values)
        dense.append((keys, values))
    query = torch.randn(sum(new_tokens), heads * group, dim, generator=generator)  # [T, Hq, D]
    plain = paged_attention_packed(query, pool, 0, tables, new_tokens, lengths, 0.35)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = paged_attention_packed(query, pool, 0, tables, new_tokens, lengths, 0.35)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, atol=0, rtol=0)
    for row, ((keys, values), length) in enumerate(zip(dense, lengths, strict=True)):
        expected = dense_reference(query[row:row + 1].transpose(0, 1), keys, values, length - 1, 0.35)
        torch.testing.assert_close(under_autocast[row:row + 1].transpose(0, 1), expected, atol=ATOL, rtol=0)


def test_paged_attention_errors():
    pool = PagedKVPool(4, 1, 2, 4, block_size=4)
    query = torch.zeros(4, 2, 4)
    with pytest.raises(KVStackError, match="multiple of num_kv_heads=2"):
        paged_attention([torch.zeros(3, 1, 4)], pool, 0, [[0]], [1], 1.0)
    with pytest.raises(KVStackError, match="one entry per sequence"):
        paged_attention([query], pool, 0, [[0], [1]], [2], 1.0)
    with pytest.raises(KVStackError, match="has only 1"):
        paged_attention([query], pool, 0, [[0]], [6], 1.0)
    with pytest.raises(KVStackError, match=r"causal_offsets\[0\] must be an integer in 0..4"):
        paged_attention([query], pool, 0, [[0, 1]], [6], 1.0, causal_offsets=[5])
    with pytest.raises(KVStackError, match=r"context_lens\[0\]"):
        paged_attention([query], pool, 0, [[0]], [1], 1.0)


# --------------------------------------------------------------------------------------------------
# Blocks: copy-on-write, export / import
# --------------------------------------------------------------------------------------------------


def random_pool(seed: int = 0, dtype: torch.dtype = torch.float32) -> PagedKVPool:
    pool = PagedKVPool(8, 3, 2, 4, block_size=4, dtype=dtype)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def test_copy_block_copies_every_layer():
    pool = random_pool()
    before = pool.kv.clone()
    pool.copy_block(2, 5)
    for layer in range(3):
        assert torch.equal(pool.kv[5, layer], before[2, layer])
    others = [b for b in range(8) if b != 5]
    assert torch.equal(pool.kv[others], before[others])


def test_copy_block_applies_block_manager_copy_on_write():
    manager = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    pool = PagedKVPool(6, 2, 1, 2, block_size=4)
    manager.allocate_prompt("parent", [1, 2, 3, 4, 5, 6])
    prompt_keys = torch.arange(12, dtype=torch.float32).reshape(1, 6, 2)
    for layer in range(2):
        pool.write(layer, manager.block_table("parent"), 0, prompt_keys + layer, -prompt_keys)
    manager.fork("parent", "child")
    cow = manager.append_token("child", 7)
    assert cow is not None
    pool.copy_block(cow.src_block, cow.dst_block)
    new_key = torch.full((1, 1, 2), 99.0)
    pool.write(1, manager.block_table("child"), 6, new_key, new_key)
    child_keys, _ = pool.gather(1, manager.block_table("child"), 7)
    parent_keys, _ = pool.gather(1, manager.block_table("parent"), 6)
    assert torch.equal(child_keys[:, :6], prompt_keys + 1)
    assert torch.equal(child_keys[:, 6:], new_key)
    assert torch.equal(parent_keys, prompt_keys + 1)
    assert torch.equal(pool.gather(0, manager.block_table("child"), 6)[0], prompt_keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_import_round_trip_is_exact(dtype):
    pool = random_pool(dtype=dtype)
    exported = pool.export_block(3)
    assert set(exported) == {"keys", "values"}
    for index, name in enumerate(("keys", "values")):
        tensor = exported[name]
        assert tensor.shape == (3, 2, 4, 4) and tensor.dtype == dtype and tensor.device.type == "cpu"
        assert torch.equal(tensor, pool.kv[3, :, index])
    snapshot = pool.kv[3].clone()
    pool.kv[3].zero_()  # the export is a copy, not a view
    assert torch.equal(exported["keys"], snapshot[:, 0])
    fresh = random_pool(seed=1, dtype=dtype)
    fresh.import_block(6, exported)
    assert torch.equal(fresh.kv[6], snapshot)
    assert torch.equal(fresh.export_block(6)["values"], exported["values"])


def test_import_block_rejects_wrong_tensors():
    pool = random_pool()
    before = pool.kv.clone()
    good = pool.export_block(0)
    with pytest.raises(KVStackError, match=re.escape("[L, H, block_size, D]=[3, 2, 4, 4]")):
        pool.import_block(1, {"keys": good["keys"][:2], "values": good["values"][:2]})
    with pytest.raises(KVStackError, match=re.escape("torch.bfloat16")):
        pool.import_block(1, {name: tensor.bfloat16() for name, tensor in good.items()})
    with pytest.raises(KVStackError, match="exactly the tensors"):
        pool.import_block(1, {"keys": good["keys"]})
    with pytest.raises(KVStackError, match=re.escape("block must be a block id in 0..7")):
        pool.import_block(8, good)
    assert torch.equal(pool.kv, before)


# --------------------------------------------------------------------------------------------------
# Sizing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("memory_mb", "dtype", "itemsize"), [(0.01, torch.float32, 4), (0.01, torch.bfloat16, 2),
                                                               (1, torch.float32, 4)])
def test_from_budget_block_count(memory_mb, dtype, itemsize):
    layers, heads, dim, block_size = 2, 2, 8, 4
    expected_per_block = layers * 2 * heads * block_size * dim * itemsize
    pool = PagedKVPool.from_budget(memory_mb, layers, heads, dim, block_size=block_size, dtype=dtype)
    assert pool.bytes_per_block == expected_per_block
    assert pool.num_blocks == math.floor(memory_mb * 2**20 / expected_per_block)
    assert pool.block_size == block_size
    assert pool.nbytes() == pool.num_blocks * expected_per_block <= memory_mb * BYTES_PER_MB
    assert pool.kv.shape == (pool.num_blocks, layers, 2, heads, block_size, dim)


def test_from_budget_too_small_names_the_minimum():
    # One block is 2 * 2 * 2 * 4 * 8 * 4 = 1024 bytes.
    with pytest.raises(KVStackError, match=re.escape("the minimum is 0.000976562 MB (1024 bytes)")) as info:
        PagedKVPool.from_budget(0.0009, 2, 2, 8, block_size=4)
    assert "\n" not in str(info.value)
    with pytest.raises(KVStackError, match="memory_mb"):
        PagedKVPool.from_budget(float("nan"), 2, 2, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pool_matches_cpu():
    cpu = random_pool()
    gpu = PagedKVPool(8, 3, 2, 4, block_size=4, device="cuda")
    gpu.kv.copy_(cpu.kv)
    query = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(5))
    tables, lengths = [[4, 1, 6]], [11]
    (expected,) = paged_attention([query], cpu, 2, tables, lengths, 0.5)
    (got,) = paged_attention([query.cuda()], gpu, 2, tables, lengths, 0.5)
    torch.testing.assert_close(got.cpu(), expected, atol=ATOL, rtol=0)
    keys = torch.randn(2, 5, 4)
    cpu.write(0, [7, 0], 2, keys, keys)
    gpu.write(0, [7, 0], 2, keys, keys)
    assert torch.equal(gpu.gather(0, [7, 0], 7)[0].cpu(), cpu.gather(0, [7, 0], 7)[0])
    assert torch.equal(gpu.export_block(7)["keys"], cpu.export_block(7)["keys"])
