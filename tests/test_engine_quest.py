"""Quest inside the paged engine: Quest's page is the engine's block, decoding reads only the selected blocks.

Independent expectations: with a budget covering every block, the full engine's (and transformers') greedy
outputs; with a small budget, the core cache's Quest (``make_cache(model, "quest(...)")`` + ``generate``), whose
pages, bounds and newest entries are the same ones; the block bounds against a direct minimum and maximum.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, prompt_of, reference_generate
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.cache import kernels
from kvstack.engine import Engine, SamplingParams
from kvstack.engine.paged import PagedKVPool
from kvstack.engine.paged_attention import PackedPlan
from kvstack.engine.quest_attention import quest_decode_attention, quest_decode_batch, select_blocks
from kvstack.errors import KVStackError
from kvstack.methods.retrieval import Quest

VOCAB = 200


def tiny() -> torch.nn.Module:
    return build_model("llama", seed=0, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1)


def engine_outputs(prompts: list[list[int]], max_new: int, method: str | list[str | None] | None,
                   block_size: int = 4) -> list[list[int]]:
    """Greedy outputs of the engine for ``prompts`` admitted together, with ``method`` on each (or one each)."""
    engine = Engine(tiny(), memory_mb=2.0, block_size=block_size)
    methods = method if isinstance(method, list) else [method] * len(prompts)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=max_new), method=m)
           for p, m in zip(prompts, methods, strict=True)]
    while engine.has_unfinished():
        engine.step()
    return [engine.get_output(rid) for rid in ids]


def core_quest(prompt: list[int], max_new: int, spec: str) -> list[int]:
    model = tiny()
    cache = kvstack.make_cache(model, spec)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kvstack.cache_kwargs(model, cache),
                             max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(params=[True, False], ids=["kernel", "pytorch"])
def kernel_path(request, monkeypatch) -> bool:
    if request.param and not kernels.available():
        pytest.skip("the fused CPU kernel is not built here")
    if not request.param:
        monkeypatch.setattr(kernels, "available", lambda: False)
    return request.param


def test_a_budget_covering_every_block_gives_the_full_engines_outputs(kernel_path) -> None:
    prompts = [prompt_of(37, seed, VOCAB) for seed in (1, 2)]
    full = engine_outputs(prompts, 10, None)
    assert engine_outputs(prompts, 10, "quest(budget=1024, page=4)") == full
    assert full[0] == reference_generate(tiny(), prompts[0], 10)


@pytest.mark.parametrize("spec", ["quest(budget=8, page=4)", "quest(budget=16, page=4)",
                                  "quest(budget=8, page=4, dense_layers=1)"])
def test_a_small_budget_reads_what_the_core_cache_quest_reads(kernel_path, spec) -> None:
    prompts = [prompt_of(61, 3, VOCAB), prompt_of(45, 4, VOCAB)]
    got = engine_outputs(prompts, 12, spec)
    want = [core_quest(prompt, 12, spec) for prompt in prompts]
    assert got == want
    assert got != engine_outputs(prompts, 12, None)  # the budget does change what is read


def test_requests_with_different_budgets_in_one_step_each_read_what_their_own_quest_reads(kernel_path) -> None:
    prompts = [prompt_of(61, 5, VOCAB), prompt_of(45, 6, VOCAB), prompt_of(53, 7, VOCAB)]
    specs = ["quest(budget=8, page=4)", "quest(budget=16, page=4)", "quest(budget=8, page=4)"]
    got = engine_outputs(prompts, 12, specs)
    assert got == [core_quest(prompt, 12, spec) for prompt, spec in zip(prompts, specs, strict=True)]


def test_decode_attention_reads_the_top_blocks_per_head_and_the_newest(kernel_path) -> None:
    torch.manual_seed(0)
    pool = PagedKVPool(num_blocks=12, num_layers=1, num_kv_heads=2, head_dim=8, block_size=4)
    table = [7, 2, 9, 4, 0, 11]
    context_len = 22  # five full blocks, two entries in the newest
    keys, values = torch.randn(2, 22, 8), torch.randn(2, 22, 8)
    pool.write(0, table, 0, keys, values)
    query = torch.randn(6, 1, 8)  # three query heads per KV head
    reader = Quest(budget=8, page=4)
    chosen = select_blocks(query, pool, 0, table, 5, 2, reader)  # [H, 2] block ids
    if kernel_path:  # the engine's kernel path: read in place, [S, Hq, D] queries
        output = quest_decode_batch(query.transpose(0, 1), pool, 0, [(table, context_len, reader)], 0.5)
        output = output.transpose(0, 1)
    else:
        output = quest_decode_attention(query, pool, 0, table, context_len, reader, 0.5)
    for head in range(2):
        bounds = []
        for index in range(5):
            block = keys[head, index * 4 : index * 4 + 4]
            group = query[head * 3 : head * 3 + 3, 0]
            bounds.append(max(float((q.clamp(min=0) * block.amax(0) + q.clamp(max=0) * block.amin(0)).sum())
                              for q in group))
        top = sorted(sorted(range(5), key=lambda i: -bounds[i])[:2])
        assert chosen[head].tolist() == [table[i] for i in top]
        slots = [s for i in top for s in range(i * 4, i * 4 + 4)] + [20, 21]
        for g in range(3):
            q = query[head * 3 + g, 0]
            weights = torch.softmax(keys[head, slots] @ q * 0.5, dim=0)
            torch.testing.assert_close(output[head * 3 + g, 0], weights @ values[head, slots])


# one operation on a pool of 6 blocks: ("ask", blocks asked about), ("write", block), ("copy", block), ("release",
# block)
OPERATION = st.one_of(
    st.tuples(st.just("ask"), st.lists(st.integers(0, 5), min_size=1, max_size=6)),
    st.tuples(st.sampled_from(["write", "copy", "release"]), st.integers(0, 5)),
)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), operations=st.lists(OPERATION, min_size=1, max_size=12))
def test_block_bounds_follow_every_write_copy_and_release(seed, operations) -> None:
    generator = torch.Generator().manual_seed(seed)
    pool = PagedKVPool(num_blocks=6, num_layers=2, num_kv_heads=2, head_dim=4, block_size=2)
    bounded: set[int] = set()
    for step, (kind, argument) in enumerate(operations):
        layer = step % 2
        if kind == "ask":
            got = pool.block_key_bounds(layer, torch.tensor(argument))
            stored = pool.kv[argument, layer, 0]  # [n, H, size, D]
            assert torch.equal(got, torch.stack((stored.amin(dim=2), stored.amax(dim=2)), dim=1))
            bounded.update(argument)
        elif kind == "write":
            keys = torch.randn(2, 2, 4, generator=generator)
            pool.write(layer, [argument], 0, keys, keys)
        elif kind == "copy":
            pool.copy_block(argument, (argument + 1) % 6)
        else:
            pool.release_block_bounds(argument)
            bounded.discard(argument)
        assert pool.bounded_blocks() == len(bounded)
    # every block is asked about once more, on both layers: nothing computed before a write is served after it
    for layer in range(2):
        stored = pool.kv[:, layer, 0]
        want = torch.stack((stored.amin(dim=2), stored.amax(dim=2)), dim=1)
        assert torch.equal(pool.block_key_bounds(layer, torch.arange(6)), want)
    assert pool.bounds_nbytes() == 2 * 6 * 2 * 2 * 4 * 4  # the table never holds more rows than blocks


def test_the_bounds_cover_only_the_blocks_quest_requests_read_and_leave_with_them() -> None:
    engine = Engine(tiny(), memory_mb=2.0, block_size=4, enable_prefix_caching=False)
    per_block = engine.pool.num_layers * 2 * engine.pool.num_kv_heads * engine.pool.head_dim * 4  # float32
    full = [engine.add_request(prompt_of(40, seed, VOCAB), SamplingParams(max_new_tokens=3)) for seed in range(3)]
    spec = "quest(budget=8, page=4)"
    quest = engine.add_request(prompt_of(40, 7, VOCAB), SamplingParams(max_new_tokens=3), method=spec)
    most = 0
    while engine.has_unfinished():
        engine.step()
        most = max(most, engine.pool.bounds_nbytes())
    assert all(len(engine.get_output(rid)) == 3 for rid in [*full, quest])
    # one request of 40 + 2 tokens has at most 10 full blocks; the pool holds many more
    assert 0 < most <= 10 * per_block < engine.pool.num_blocks * per_block // 4
    # finished: its blocks were freed, their rows with them, and the empty table
    assert engine.pool.bounded_blocks() == 0 and engine.pool.bounds_nbytes() == 0


def test_a_plan_sends_only_decoding_steps_that_read_less_than_everything_to_quest() -> None:
    pool = PagedKVPool(num_blocks=20, num_layers=1, num_kv_heads=1, head_dim=4, block_size=4)
    reader = Quest(budget=8, page=4)
    tables = [list(range(0, 6)), list(range(6, 9)), list(range(9, 15))]
    plan = PackedPlan.build(pool, tables, [1, 1, 9], [22, 10, 22], [reader, reader, reader])
    assert [(row, index, length) for row, index, _, length, _ in plan.selected] == [(0, 0, 22)]  # reads 2 of 5


@pytest.mark.parametrize(("spec", "needle"), [
    ("quest(budget=64, page=16)", "must be the engine's block size (4)"),
    ("infllm(budget=128)", "cannot run in the paged engine"),
    ("quest(budget=2, page=4)", "at least one page"),
    ("quest(budget=8, page=4, select='lowrank')", "ranks pages by low-rank keys it does not keep"),
])
def test_bad_quest_requests_are_refused_in_one_line(spec: str, needle: str) -> None:
    engine = Engine(tiny(), memory_mb=1.0, block_size=4)
    with pytest.raises(KVStackError) as info:
        engine.add_request(prompt_of(20, 1, VOCAB), SamplingParams(max_new_tokens=2), method=spec)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not engine.has_unfinished()
