"""ModelRunner: packed paged forwards must reproduce transformers' own greedy decoding and logits exactly.

References come from a second model instance with identical weights running transformers' default
attention and cache (``model.generate(do_sample=False)`` / a plain ``model(input_ids)`` forward), so the
runner's attention switch never touches them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from conftest import build_model as shared_build_model
from conftest import prompt_of as shared_prompt_of
from conftest import reference_generate
from transformers import PreTrainedModel

from kvstack.engine import BlockManager, ModelRunner, PagedKVPool, SequenceChunk
from kvstack.errors import KVStackError

VOCAB = 200
BLOCK_SIZE = 4
ARCHS = ("llama", "qwen2")


def build_model(arch: str, seed: int = 0, num_layers: int = 2) -> PreTrainedModel:
    """A tiny random causal LM (hidden 64, 4 query heads, 2 KV heads), no EOS so generation never stops early."""
    return shared_build_model(arch, seed=seed, vocab_size=VOCAB, num_hidden_layers=num_layers,
                              max_position_embeddings=256, initializer_range=0.1)


def make_runner(arch: str, num_blocks: int = 64) -> tuple[ModelRunner, BlockManager]:
    model = build_model(arch)
    pool = PagedKVPool(num_blocks, num_layers=2, num_kv_heads=2, head_dim=16, block_size=BLOCK_SIZE)
    return ModelRunner(model, pool), BlockManager(num_blocks, BLOCK_SIZE)


def prompt_of(length: int, seed: int) -> list[int]:
    return shared_prompt_of(length, seed, VOCAB)


def run_greedy(
    runner: ModelRunner,
    manager: BlockManager,
    prompts: Sequence[list[int]],
    max_new: int,
    chunk_size: int,
    arrivals: Sequence[int] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """A minimal engine loop: every live sequence adds one chunk (prefill) or one token (decode) per step.

    Returns the generated tokens of each sequence and the number of prompt tokens found cached.
    """
    arrivals = list(arrivals) if arrivals is not None else [0] * len(prompts)
    computed = [0] * len(prompts)  # positions whose KV is in the pool
    generated: list[list[int]] = [[] for _ in prompts]
    cached = [0] * len(prompts)
    live: list[int] = []
    step = 0
    while any(len(g) < max_new for g in generated):
        for index, arrival in enumerate(arrivals):
            if arrival == step:
                cached[index] = computed[index] = manager.allocate_prompt(index, prompts[index])
                live.append(index)
        batch: list[SequenceChunk] = []
        owners: list[int] = []
        for index in live:
            table = manager.block_table(index)
            prompt = prompts[index]
            if computed[index] < len(prompt):
                tokens = prompt[computed[index] : computed[index] + chunk_size]
            else:
                tokens = [generated[index][-1]]
            batch.append(SequenceChunk(table, computed[index], tokens))
            owners.append(index)
        if batch:
            logits = runner.step(batch)
            assert logits.shape == (len(batch), VOCAB)
            for row, index in enumerate(owners):
                computed[index] = batch[row].context_len
                if computed[index] < len(prompts[index]):
                    continue  # mid-prompt chunk: its logits are not sampled
                token = int(logits[row].argmax())
                generated[index].append(token)
                if len(generated[index]) == max_new:
                    live.remove(index)
                    manager.free(index)
                else:
                    copy = manager.append_token(index, token)
                    if copy is not None:
                        runner.pool.copy_block(copy.src_block, copy.dst_block)
        step += 1
        assert step < 500
    return generated, cached


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_size", [64, 5])
def test_single_sequence_matches_generate(arch: str, chunk_size: int) -> None:
    """One sequence, prefilled in one chunk (64) or chunked prefill (5 tokens per step), then decoded."""
    runner, manager = make_runner(arch)
    prompt = prompt_of(13, seed=1)
    generated, _ = run_greedy(runner, manager, [prompt], max_new=12, chunk_size=chunk_size)
    assert generated[0] == reference_generate(build_model(arch), prompt, 12)
    manager.check_invariants()


@pytest.mark.parametrize("arch", ARCHS)
def test_continuous_batching_matches_generate(arch: str) -> None:
    """Three sequences of different lengths, arriving at different steps, prefilled and decoded in shared steps."""
    runner, manager = make_runner(arch)
    prompts = [prompt_of(9, seed=2), prompt_of(3, seed=3), prompt_of(17, seed=4)]
    generated, _ = run_greedy(runner, manager, prompts, max_new=10, chunk_size=6, arrivals=[0, 1, 2])
    reference = build_model(arch)
    for prompt, tokens in zip(prompts, generated, strict=True):
        assert tokens == reference_generate(reference, prompt, 10)


def test_shared_prefix_reuses_blocks_and_matches_generate() -> None:
    """The second prompt shares two full blocks with the first: it reuses their block ids and computes the rest."""
    runner, manager = make_runner("llama")
    first = prompt_of(11, seed=5)
    second = first[: 2 * BLOCK_SIZE] + prompt_of(6, seed=6)
    tables: dict[int, list[int]] = {}
    original_step = runner.step

    def spy(batch: Sequence[SequenceChunk]) -> torch.Tensor:
        for chunk in batch:
            tables.setdefault(len(tables), chunk.block_table)
        return original_step(batch)

    runner.step = spy  # type: ignore[method-assign]  # an instance attribute, not the class
    # The first sequence arrives at step 0 and is prefilled in one chunk; the second arrives at step 1.
    generated, cached = run_greedy(runner, manager, [first, second], max_new=8, chunk_size=64, arrivals=[0, 1])
    assert cached == [0, 2 * BLOCK_SIZE]
    assert tables[0][:2] == tables[2][:2]  # step 0: seq 0; step 1: seq 0 then seq 1
    reference = build_model("llama")
    assert generated[0] == reference_generate(reference, first, 8)
    assert generated[1] == reference_generate(reference, second, 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_prefill_logits_match_plain_forward(arch: str) -> None:
    runner, manager = make_runner(arch)
    prompts = [prompt_of(7, seed=7), prompt_of(1, seed=8), prompt_of(14, seed=9)]
    batch = []
    for index, prompt in enumerate(prompts):
        manager.allocate_prompt(index, prompt)
        batch.append(SequenceChunk(manager.block_table(index), 0, prompt))
    logits = runner.step(batch)
    reference = build_model(arch)
    with torch.no_grad():
        expected = torch.stack([reference(torch.tensor([p])).logits[0, -1] for p in prompts])
    assert logits.shape == (3, VOCAB)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # The pool holds exactly the keys/values transformers caches.
    with torch.no_grad():
        cache = reference(torch.tensor([prompts[2]]), use_cache=True).past_key_values
    for layer in range(2):
        keys, values = runner.pool.gather(layer, manager.block_table(2), len(prompts[2]))
        torch.testing.assert_close(keys, cache.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, cache.layers[layer].values[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("layers", "kv_heads", "head_dim"), [(3, 2, 16), (2, 4, 16), (2, 2, 8)], ids=["layers", "heads", "dim"]
)
def test_pool_model_mismatch_raises_one_line_error(layers: int, kv_heads: int, head_dim: int) -> None:
    pool = PagedKVPool(8, num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, block_size=BLOCK_SIZE)
    with pytest.raises(KVStackError) as info:
        ModelRunner(build_model("llama"), pool)
    message = str(info.value)
    assert "\n" not in message and "pool" in message


def test_bad_chunks_raise() -> None:
    runner, manager = make_runner("llama")
    manager.allocate_prompt("a", [5, 6, 7])
    table = manager.block_table("a")
    with pytest.raises(KVStackError):
        runner.step([])
    with pytest.raises(KVStackError):
        runner.step([SequenceChunk(table, 0, [])])
    with pytest.raises(KVStackError, match="block table"):
        runner.step([SequenceChunk(table, 2, [5, 6, 7, 8])])  # positions 2..5 need 2 blocks, the table has 1


def test_model_outside_runner_fails_clearly_then_restores() -> None:
    runner, _ = make_runner("llama")
    with pytest.raises(KVStackError, match="ModelRunner"), torch.no_grad():
        runner.model(torch.tensor([[5, 6, 7]]))
    runner.restore()
    with torch.no_grad():
        logits = runner.model(torch.tensor([[5, 6, 7]])).logits
    with torch.no_grad():
        expected = build_model("llama")(torch.tensor([[5, 6, 7]])).logits
    torch.testing.assert_close(logits, expected)


def test_a_step_cache_is_freed_at_once_without_the_garbage_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's PagedBatchCache and its layers form no reference cycle: it goes when the step ends."""
    import gc
    import weakref

    from kvstack.engine import runner as runner_module

    made: list[weakref.ref] = []

    class Recorded(runner_module.PagedBatchCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(runner_module, "PagedBatchCache", Recorded)
    runner, manager = make_runner("llama")
    prompt = prompt_of(6, seed=3)
    manager.allocate_prompt("a", prompt)
    gc.collect()
    gc.disable()
    try:
        logits = runner.step([SequenceChunk(manager.block_table("a"), 0, prompt)])
        assert logits.shape == (1, VOCAB) and len(made) == 1
        assert made[0]() is None
    finally:
        gc.enable()
    chunk = SequenceChunk(manager.block_table("a"), 0, prompt)
    layer = runner_module.PagedCacheLayer(Recorded(runner.pool, [chunk]), 0)
    with pytest.raises(RuntimeError, match="no longer exists"):
        _ = layer.owner


def reference_statistics(query: torch.Tensor, keys: torch.Tensor, first_slot: int, scaling: float) -> dict:
    """Explicit float64 softmax of ``[Hq, q, D]`` queries at slots ``first_slot ..`` over ``[H, L, D]`` keys."""
    num_q_heads, num_new, _ = query.shape
    heads, length, _ = keys.shape
    group = num_q_heads // heads
    repeated = keys.double().repeat_interleave(group, dim=0)  # [Hq, L, D]
    scores = torch.matmul(query.double(), repeated.transpose(-1, -2)) * scaling  # [Hq, q, L]
    allowed = torch.arange(length)[None, :] <= (first_slot + torch.arange(num_new))[:, None]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    colsum = weights.sum(dim=1).view(heads, group, length).sum(dim=1)  # over queries and the group's heads
    return {"colsum": colsum, "last": weights[:, -1]}


@pytest.mark.parametrize(("first_slot", "num_new"), [(0, 1), (0, 9), (13, 1), (13, 7), (5, 300)])
def test_chunk_statistics_match_an_explicit_softmax(first_slot: int, num_new: int) -> None:
    """The runner's statistics (the cache's attention_with_stats) for a chunk at slots first_slot .. over its
    sequence's paged slots: column sums over queries and each KV group's query heads, the last query's weights."""
    from kvstack.engine.runner import chunk_statistics

    generator = torch.Generator().manual_seed(first_slot * 1000 + num_new)
    heads, num_q_heads, dim, length = 2, 6, 16, first_slot + num_new
    pool = PagedKVPool(96, num_layers=1, num_kv_heads=heads, head_dim=dim, block_size=BLOCK_SIZE)
    table = torch.randperm(96, generator=generator)[: -(-length // BLOCK_SIZE)].tolist()
    keys = torch.randn(heads, length, dim, generator=generator) * 2
    pool.write(0, table, 0, keys, torch.randn(heads, length, dim, generator=generator))
    query = torch.randn(num_q_heads, num_new, dim, generator=generator) * 2
    scaling = dim**-0.5
    expected = reference_statistics(query, keys, first_slot, scaling)
    for wanted in ({"colsum"}, {"last"}, {"colsum", "last", "queries"}):
        chunk = SequenceChunk(table, first_slot + 4, list(range(num_new)), slot_start=first_slot,
                              stats=frozenset(wanted))
        stats = chunk_statistics(query, pool, 0, chunk, scaling)
        assert set(stats) == wanted | ({"scaling"} if "queries" in wanted else set())
        for name in wanted & {"colsum", "last"}:
            assert stats[name].dtype == torch.float32
            torch.testing.assert_close(stats[name].double(), expected[name], rtol=1e-5, atol=1e-6)
        if "queries" in wanted:
            torch.testing.assert_close(stats["queries"], query)


def test_a_step_leaves_nothing_pending_in_the_shared_handshake() -> None:
    """The runner's layers hand themselves to its attention function through kvstack.cache.pending, the same
    handshake as make_cache's layers; a stale entry is dropped and a step leaves none behind."""
    from kvstack.cache.pending import set_pending, take_pending

    runner, manager = make_runner("llama")
    prompt = prompt_of(6, seed=4)
    manager.allocate_prompt("a", prompt)
    set_pending(object())  # left by a forward that failed on this thread
    logits = runner.step([SequenceChunk(manager.block_table("a"), 0, prompt)])
    assert logits.shape == (1, VOCAB)
    assert take_pending() is None
