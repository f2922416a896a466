"""Token-level policies inside the paged engine: the core's methods, evicting by compaction, freeing blocks.

With ``block_size=1`` the engine compacts after every step, exactly when the core cache evicts, so its greedy
outputs must equal ``make_cache(model, spec)`` + ``generate``: the independent expectation for the selection.
With larger blocks the budget is held to within one block.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, prompt_of, reference_generate

import kvstack
from kvstack.engine import Engine, SamplingParams
from kvstack.errors import KVStackError

VOCAB = 200
PROMPT = prompt_of(40, 1, VOCAB)
SPECS = ["streamingllm(budget=12, sinks=2)", "h2o(budget=12)", "tova(budget=12)", "snapkv(budget=16, window=4)",
         "keynorm(budget=16)", "random(ratio=0.5)"]


def tiny() -> torch.nn.Module:
    return build_model("llama", seed=0, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.1)


def core_generate(spec: str, prompt: list[int], max_new: int) -> list[int]:
    model = tiny()
    cache = kvstack.make_cache(model, spec)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kvstack.cache_kwargs(model, cache),
                             max_new_tokens=max_new,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def run(engine: Engine, prompt: list[int], max_new: int, method: str | None, on_step=None) -> list[int]:
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=max_new), method=method)
    while engine.has_unfinished():
        engine.step()
        if on_step is not None:
            on_step(rid)
    return engine.get_output(rid)


@pytest.mark.parametrize("spec", SPECS)
def test_block_size_one_equals_the_core_cache(spec: str) -> None:
    engine = Engine(tiny(), memory_mb=1.0, block_size=1, enable_prefix_caching=False)
    assert run(engine, PROMPT, 10, spec) == core_generate(spec, PROMPT, 10)
    assert engine.metrics()["compression_evicted_tokens"] > 0


@pytest.mark.parametrize("spec", ["streamingllm(budget=12, sinks=2)", "h2o(budget=12)", "tova(budget=12)"])
def test_dynamic_methods_hold_the_budget_within_one_block(spec: str) -> None:
    block_size, budget = 4, 12
    engine = Engine(tiny(), memory_mb=1.0, block_size=block_size, enable_prefix_caching=False,
                    max_num_batched_tokens=8)  # chunked prefill: the budget holds during the prompt too
    peaks = []

    def check(rid: int) -> None:
        seq = engine.scheduler.get_sequence(rid)
        if seq.is_finished:
            return
        computed_slots = seq.num_computed_tokens - seq.num_evicted
        peaks.append(computed_slots)
        assert computed_slots < budget + block_size
        if seq.output_token_ids:  # decoding: only the kept slots and the pending token hold blocks
            assert len(engine.block_manager.block_table(rid)) <= -(-(budget + block_size) // block_size)

    run(engine, PROMPT, 12, spec, check)
    metrics = engine.metrics()
    assert metrics["compression_evicted_tokens"] == len(PROMPT) + 11 - engine_kept(metrics, len(PROMPT) + 11)
    assert metrics["compression_freed_blocks"] > 0
    assert max(peaks) < budget + block_size


def engine_kept(metrics: dict, total: int) -> int:
    """Tokens still held at the end = total computed - evicted (consistency of the counters)."""
    return total - metrics["compression_evicted_tokens"]


def test_streamingllm_keeps_the_sinks_and_the_most_recent_tokens() -> None:
    engine = Engine(tiny(), memory_mb=1.0, block_size=4, enable_prefix_caching=False)
    seen = []

    def check(rid: int) -> None:
        compression = engine._compression.get(rid)
        if compression is not None and compression.compressed and compression.slots == 12:
            positions = sorted(compression.positions[0, 0].tolist())
            newest = compression.positions.max().item()
            assert positions == [0, 1, *range(newest - 9, newest + 1)]
            assert (compression.positions == compression.positions[:1, :1]).all()  # same tokens in every head
            seen.append(newest)

    run(engine, PROMPT, 12, "streamingllm(budget=12, sinks=2)", check)
    assert seen


def test_compression_frees_blocks_and_leaves_a_shared_prefix_to_others() -> None:
    shared = prompt_of(32, 5, VOCAB)
    full_prompt, compressed_prompt = shared + prompt_of(6, 6, VOCAB), shared + prompt_of(6, 7, VOCAB)
    engine = Engine(tiny(), memory_mb=1.0, block_size=4)
    full_id = engine.add_request(full_prompt, SamplingParams(max_new_tokens=6))
    engine.step()  # the shared prefix is computed and cached by the full request
    compressed_id = engine.add_request(compressed_prompt, SamplingParams(max_new_tokens=6),
                                       method="snapkv(budget=12, window=4)")
    while engine.has_unfinished():
        engine.step()
        seq = engine.scheduler.get_sequence(compressed_id)
        if seq.output_token_ids and not seq.is_finished:  # 12 kept + the outputs so far, in blocks of 4
            assert len(engine.block_manager.block_table(compressed_id)) == -(-(12 + len(seq.output_token_ids)) // 4)
    reference = tiny()
    assert engine.get_output(full_id) == reference_generate(reference, full_prompt, 6)
    assert engine.get_output(compressed_id) == core_generate("snapkv(budget=12, window=4)", compressed_prompt, 6)
    metrics = engine.metrics()
    assert metrics["prefix_cache_hits_tokens"] == 32
    assert metrics["compression_freed_blocks"] == 10 - 4  # 38 prompt slots + 1 pending in 10 blocks -> 13 in 4
    engine.block_manager.check_invariants()


def test_a_compressed_request_survives_preemption() -> None:
    prompts = [prompt_of(30, 20 + i, VOCAB) for i in range(3)]
    engine = Engine(tiny(), memory_mb=0.04, block_size=4, enable_prefix_caching=False)  # 10 blocks
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=12), method="h2o(budget=16)") for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert all(len(engine.get_output(rid)) == 12 for rid in ids)
    assert engine.metrics()["preemptions"] > 0
    engine.block_manager.check_invariants()


@pytest.mark.parametrize(("spec", "needle"), [
    ("pyramidkv(budget=16, window=4)", "one budget for every layer"),
    ("adakv(snapkv(budget=16, window=4))", "cannot run in the paged engine"),
    ("streamingllm(budget=16, positions='cache')", "cannot run in the paged engine"),
    ("kivi(bits=2)", "codecs are not supported in the engine"),
    ("snapkv(budget=16, window=4) + kivi(bits=2)", "codecs are not supported in the engine"),
    ("scissorhands(budget=16)", "statistics"),
    ("snapkv(budgt=16)", "budgt"),
    ("nosuch(budget=3)", "nosuch"),
])
def test_unsupported_methods_are_refused_in_one_line(spec: str, needle: str) -> None:
    engine = Engine(tiny(), memory_mb=1.0, block_size=4)
    with pytest.raises(KVStackError) as info:
        engine.add_request(PROMPT, SamplingParams(max_new_tokens=2), method=spec)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not engine.has_unfinished()


def test_full_method_compresses_nothing() -> None:
    engine = Engine(tiny(), memory_mb=1.0, block_size=4)
    assert run(engine, PROMPT, 5, "full") == reference_generate(tiny(), PROMPT, 5)
    assert engine.metrics()["compression_evicted_tokens"] == 0


def test_blocks_released_mid_prefill_are_not_trusted_before_they_are_computed() -> None:
    """A dynamic method compacts during chunked prefill, releasing prompt blocks registered in the prefix cache
    whose KV was never computed; a later request with the same prompt must compute them, not reuse them."""
    engine = Engine(tiny(), memory_mb=1.0, block_size=4, max_num_batched_tokens=8)
    compressed = engine.add_request(PROMPT, SamplingParams(max_new_tokens=3), method="streamingllm(budget=8, sinks=2)")
    for _ in range(3):  # 24 of the 40 prompt tokens computed; compacted at 12 and 20 slots
        engine.step()
    assert engine.scheduler.get_sequence(compressed).num_evicted > 0
    plain = engine.add_request(PROMPT, SamplingParams(max_new_tokens=6))
    while engine.has_unfinished():
        engine.step()
    assert engine.get_output(plain) == reference_generate(tiny(), PROMPT, 6)
