"""Engine loop: greedy outputs must equal ``model.generate(do_sample=False)`` under every scheduling regime.

References come from a second model instance with identical weights and transformers' default attention.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import build_model as shared_build_model
from conftest import prompt_of as shared_prompt_of
from conftest import reference_generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedModel

from kvstack.engine import BYTES_PER_MB, Engine, SamplingParams
from kvstack.errors import KVStackError

VOCAB = 200
BLOCK_SIZE = 4
MAX_CONTEXT = 64
# 2 layers x (K, V) x 2 kv heads x 4 tokens x 16 dims x 4 bytes
BLOCK_BYTES = 2 * 2 * 2 * BLOCK_SIZE * 16 * 4


def build_model(seed: int = 0) -> PreTrainedModel:
    """A tiny random Llama (hidden 64, 4 query heads, 2 KV heads), no EOS so generation never stops early."""
    return shared_build_model("llama", seed=seed, vocab_size=VOCAB, max_position_embeddings=MAX_CONTEXT,
                              initializer_range=0.1)


def mb(num_blocks: int) -> float:
    return num_blocks * BLOCK_BYTES / BYTES_PER_MB


def prompt_of(length: int, seed: int) -> list[int]:
    return shared_prompt_of(length, seed, VOCAB)


@pytest.fixture(scope="module")
def reference() -> PreTrainedModel:
    return build_model()


def make_engine(**kwargs: object) -> Engine:
    options: dict[str, object] = {"memory_mb": mb(64), "block_size": BLOCK_SIZE}
    options.update(kwargs)
    return Engine(build_model(), **options)  # type: ignore[arg-type]


SHARED = prompt_of(13, seed=100)
PROMPTS = [
    SHARED + prompt_of(3, seed=1),
    SHARED + prompt_of(6, seed=2),
    prompt_of(9, seed=3),
    SHARED + prompt_of(1, seed=4),
]


@pytest.mark.parametrize(
    ("name", "options", "max_new"),
    [
        ("prefix_cache", {"enable_prefix_caching": True}, 8),
        ("no_prefix_cache", {"enable_prefix_caching": False}, 8),
        ("chunked_prefill", {"max_num_batched_tokens": 7}, 8),
        ("lpm", {"policy": "lpm", "max_num_batched_tokens": 10}, 6),
    ],
)
def test_greedy_matches_generate(
    reference: PreTrainedModel, name: str, options: dict[str, object], max_new: int
) -> None:
    engine = make_engine(**options)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=max_new))
    expected = [reference_generate(reference, p, max_new) for p in PROMPTS]
    assert outputs == expected, name
    metrics = engine.metrics()
    assert metrics["num_finished"] == len(PROMPTS)
    assert metrics["num_used"] == 0
    if options.get("enable_prefix_caching", True):
        assert metrics["prefix_cache_hits_tokens"] > 0
    else:
        assert metrics["prefix_cache_hits_tokens"] == 0
    engine.block_manager.check_invariants()


def test_greedy_with_preemption(reference: PreTrainedModel) -> None:
    prompts = [prompt_of(10, seed=10 + i) for i in range(4)]
    max_new = 12  # each sequence needs up to ceil(21 / 4) = 6 blocks; the pool has 8
    engine = make_engine(memory_mb=mb(8))
    assert engine.pool.num_blocks == 8
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new))
    assert engine.metrics()["preemptions"] > 0
    assert outputs == [reference_generate(reference, p, max_new) for p in prompts]


def test_step_streams_tokens_and_stop_tokens(reference: PreTrainedModel) -> None:
    prompt = PROMPTS[2]
    expected = reference_generate(reference, prompt, 6)
    engine = make_engine()
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=6, stop_token_ids=(expected[3],)))
    streamed: list[int] = []
    reasons = []
    while engine.has_unfinished():
        for output in engine.step():
            assert output.request_id == rid
            streamed.extend(output.new_token_ids)
            reasons.append(output.finish_reason)
    stop_at = expected.index(expected[3]) + 1
    assert streamed == expected[:stop_at]
    assert reasons[-1] == "eos"


def test_abort_leaves_others_running(reference: PreTrainedModel) -> None:
    engine = make_engine()
    keep = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6))
    drop = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=6))
    engine.step()
    engine.step()
    assert engine.abort(drop)
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.get_sequence(drop).finish_reason.value == "aborted"
    assert engine.get_output(keep) == reference_generate(reference, PROMPTS[0], 6)
    assert engine.metrics()["num_used"] == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n must be"),
        ({"n": 1.5}, "n must be"),
    ],
)
def test_bad_sampling_params(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(KVStackError, match=match) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_budget_too_small_for_a_block() -> None:
    with pytest.raises(KVStackError, match="holds no block") as info:
        make_engine(memory_mb=mb(1) / 2)
    assert "\n" not in str(info.value)


def test_bad_requests_do_not_disturb_running(reference: PreTrainedModel) -> None:
    engine = make_engine(memory_mb=mb(8))
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=6))
    engine.step()
    bad = [
        ([], SamplingParams(max_new_tokens=4), "empty"),
        (prompt_of(MAX_CONTEXT + 1, seed=7), SamplingParams(max_new_tokens=1), "longer than the model's context"),
        (prompt_of(MAX_CONTEXT - 2, seed=7), SamplingParams(max_new_tokens=8), "past the model's context"),
        (prompt_of(30, seed=8), SamplingParams(max_new_tokens=8), "can never fit"),  # needs 10 > 8 blocks
        ([5, VOCAB + 3], SamplingParams(max_new_tokens=2), "outside the vocabulary"),
        ([5, np.int64(-1)], SamplingParams(max_new_tokens=2), "token -1 is outside the vocabulary"),  # numpy ints too
        ([5, torch.tensor(VOCAB)], SamplingParams(max_new_tokens=2), "outside the vocabulary"),
        ([5, 2.0], SamplingParams(max_new_tokens=2), "must be integers, got 2.0"),
    ]
    for prompt, params, match in bad:
        with pytest.raises(KVStackError, match=match) as info:
            engine.add_request(prompt, params)
        assert "\n" not in str(info.value)
    with pytest.raises(KVStackError, match="empty"):
        engine.generate([PROMPTS[0], []], SamplingParams(max_new_tokens=2))
    while engine.has_unfinished():
        engine.step()
    assert engine.get_output(rid) == reference_generate(reference, PROMPTS[2], 6)
    assert engine.metrics()["num_used"] == 0


def test_sampling_is_reproducible_with_seed() -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=1234)
    first = make_engine().generate(PROMPTS[:2], params)
    second = make_engine(max_num_batched_tokens=5).generate(PROMPTS[:2], params)
    assert first == second
    greedy = make_engine().generate(PROMPTS[:2], SamplingParams(max_new_tokens=10))
    assert first != greedy
    other = make_engine().generate(PROMPTS[:2], dataclasses.replace(params, seed=99))
    assert other != first


# --------------------------------------------------------------------------------------------------
# storage tiers, streaming, timing
# --------------------------------------------------------------------------------------------------


def test_evicted_prefix_is_offloaded_to_host_and_loaded_back(reference: PreTrainedModel) -> None:
    shared = prompt_of(24, seed=200)  # 6 full blocks
    first = shared + prompt_of(3, seed=201)
    others = [prompt_of(20, seed=202 + i) for i in range(2)]  # fill the pool: the shared blocks get evicted
    engine = make_engine(memory_mb=mb(12), host_mb=1.0)
    assert engine.generate([first], SamplingParams(max_new_tokens=4)) == [reference_generate(reference, first, 4)]
    for prompt in others:
        engine.generate([prompt], SamplingParams(max_new_tokens=4))
    before = engine.metrics()
    assert before["tier_offloaded_blocks"] > 0
    again = shared + prompt_of(2, seed=210)
    assert engine.generate([again], SamplingParams(max_new_tokens=5)) == [reference_generate(reference, again, 5)]
    metrics = engine.metrics()
    # The whole shared prefix is reused: blocks still in the pool plus blocks loaded back from the host tier.
    assert metrics["prefix_cache_hits_tokens"] - before["prefix_cache_hits_tokens"] == 24
    loaded = metrics["tier_loaded_blocks"] - before["tier_loaded_blocks"]
    assert loaded >= 1
    assert metrics["prefix_cache_tier_hits_tokens"] - before["prefix_cache_tier_hits_tokens"] == loaded * BLOCK_SIZE
    engine.block_manager.check_invariants()


def test_disk_tier_survives_a_restart(reference: PreTrainedModel, tmp_path) -> None:
    prompt = prompt_of(30, seed=300)
    expected = reference_generate(reference, prompt, 4)
    with make_engine(host_mb=1.0, disk_dir=tmp_path) as engine:
        assert engine.generate([prompt], SamplingParams(max_new_tokens=4)) == [expected]
    assert list(tmp_path.rglob("*.kvb"))  # the cached blocks were written down on close
    with make_engine(host_mb=1.0, disk_dir=tmp_path) as restarted:
        assert restarted.generate([prompt], SamplingParams(max_new_tokens=4)) == [expected]
        metrics = restarted.metrics()
    assert metrics["prefix_cache_tier_hits_tokens"] == (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert metrics["tier_disk_hits"] > 0


def test_corrupt_disk_block_is_recomputed_not_served(reference: PreTrainedModel, tmp_path) -> None:
    prompt = prompt_of(30, seed=301)
    expected = reference_generate(reference, prompt, 4)
    with make_engine(host_mb=1.0, disk_dir=tmp_path) as engine:
        engine.generate([prompt], SamplingParams(max_new_tokens=4))
    files = sorted(tmp_path.rglob("*.kvb"))
    for path in files:  # flip one payload byte in every block file
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    with make_engine(host_mb=1.0, disk_dir=tmp_path) as restarted:
        assert restarted.generate([prompt], SamplingParams(max_new_tokens=4)) == [expected]
        metrics = restarted.metrics()
    assert metrics["prefix_cache_tier_hits_tokens"] == 0
    assert metrics["tier_corrupt"] >= 1


def test_preemption_with_a_host_tier_matches_generate(reference: PreTrainedModel) -> None:
    prompts = [prompt_of(10, seed=10 + i) for i in range(4)]
    engine = make_engine(memory_mb=mb(8), host_mb=1.0)
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    metrics = engine.metrics()
    assert metrics["preemptions"] > 0
    assert metrics["tier_offloaded_blocks"] > 0
    assert outputs == [reference_generate(reference, p, 12) for p in prompts]
    engine.block_manager.check_invariants()


def test_stream_yields_the_generate_tokens_and_closing_aborts(reference: PreTrainedModel) -> None:
    engine = make_engine()
    prompt = PROMPTS[0]
    assert list(engine.stream(prompt, SamplingParams(max_new_tokens=5))) == reference_generate(reference, prompt, 5)
    stream = engine.stream(PROMPTS[1], SamplingParams(max_new_tokens=20))
    next(stream)
    stream.close()
    assert not engine.has_unfinished()
    assert engine.metrics()["num_used"] == 0


def test_request_timing_orders_arrival_first_token_and_finish() -> None:
    engine = make_engine()
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=3))
    assert engine.request_timing(rid).ttft is None
    while engine.has_unfinished():
        engine.step()
    timing = engine.request_timing(rid)
    assert timing.num_output_tokens == 3
    assert 0 < timing.ttft <= timing.e2e
    assert timing.tpot is not None and timing.tpot >= 0
    with pytest.raises(KVStackError, match="unknown request"):
        engine.request_timing(12345)


def test_negative_tier_size_is_refused() -> None:
    with pytest.raises(KVStackError, match="host_mb must be a number of MB >= 0"):
        make_engine(host_mb=-1)



# --------------------------------------------------------------------------------------------------
# parallel sampling (n > 1): fork + copy-on-write
# --------------------------------------------------------------------------------------------------


def sample_alone(prompt: list[int], params: SamplingParams, seed: int) -> list[int]:
    """One sample with ``seed`` on its own engine: what sample ``i`` of an ``n > 1`` request must produce."""
    engine = make_engine(enable_prefix_caching=False)
    return engine.generate([prompt], dataclasses.replace(params, seed=seed, n=1))[0]


@pytest.mark.parametrize("length", [13, 16])  # last prompt block partial (copy-on-write) or full (new blocks)
def test_parallel_samples_share_the_prompt_and_equal_independent_runs(length: int) -> None:
    prompt = prompt_of(length, seed=400)
    params = SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.9, seed=5, n=3)
    engine = make_engine(enable_prefix_caching=False)
    blocks_before = engine.block_manager.pool.num_free
    rid = engine.add_request(prompt, params)
    engine.step()  # the prompt is computed once, then forked
    children = engine.children(rid)
    assert len(children) == 2
    prompt_blocks = length // BLOCK_SIZE  # full prompt blocks are shared by the three samples
    used = blocks_before - engine.block_manager.pool.num_free
    assert used == prompt_blocks + 3  # + one last block of each sample's own
    for child in children:
        assert engine.block_manager.block_table(child)[:prompt_blocks] == engine.block_manager.block_table(rid)[
            :prompt_blocks]
    while engine.has_unfinished():
        engine.step()
    samples = engine.get_outputs(rid)
    assert samples == [sample_alone(prompt, params, 5 + index) for index in range(3)]
    assert len({tuple(s) for s in samples}) > 1
    assert engine.metrics()["num_used"] == 0
    engine.block_manager.check_invariants()


def test_generate_with_n_returns_every_sample_and_greedy_samples_agree(reference: PreTrainedModel) -> None:
    engine = make_engine()
    outputs = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5, n=2))
    assert outputs == [[reference_generate(reference, p, 5)] * 2 for p in PROMPTS[:2]]


def test_parallel_samples_under_preemption_all_finish() -> None:
    prompts = [prompt_of(10, seed=500 + i) for i in range(3)]
    engine = make_engine(memory_mb=mb(16))  # one family needs 13 blocks: the three take turns
    params = SamplingParams(max_new_tokens=10, temperature=0.8, seed=1, n=3)
    outputs = engine.generate(prompts, params)
    assert engine.metrics()["preemptions"] > 0
    assert all(len(samples) == 3 and all(len(s) == 10 for s in samples) for samples in outputs)
    engine.block_manager.check_invariants()


def test_abort_aborts_the_samples_and_n_with_a_method_is_refused() -> None:
    engine = make_engine()
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=20, n=3))
    engine.step()
    assert engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert all(engine.scheduler.get_sequence(c).finish_reason.value == "aborted" for c in engine.children(rid))
    assert engine.metrics()["num_used"] == 0
    with pytest.raises(KVStackError, match="parallel samples cannot be combined"):
        engine.add_request(PROMPTS[0], SamplingParams(n=2), method="h2o(budget=8)")


# --------------------------------------------------------------------------------------------------
# stop strings
# --------------------------------------------------------------------------------------------------


def word_tokenizer() -> object:
    """A real word-level tokenizer over the tiny model's vocabulary: token i decodes to ``w{i}``."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0")


def test_stop_string_finishes_the_request_at_the_token_that_completes_it(reference: PreTrainedModel) -> None:
    tokenizer = word_tokenizer()
    prompt = PROMPTS[2]
    expected = reference_generate(reference, prompt, 10)
    stop = f"w{expected[4]} w{expected[5]}"  # two words: it appears when the 6th token is decoded
    text_until = [tokenizer.decode(expected[: i + 1]) for i in range(10)]
    first = next(i for i, text in enumerate(text_until) if stop in text)
    engine = make_engine(tokenizer=tokenizer)
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=10, stop=(stop,)))
    finished = []
    while engine.has_unfinished():
        finished += [out for out in engine.step() if out.finished]
    assert engine.get_output(rid) == expected[: first + 1]
    assert finished[0].finish_reason == "stop"
    assert engine.metrics()["num_used"] == 0


def test_stop_strings_need_a_tokenizer() -> None:
    with pytest.raises(KVStackError, match="stop strings need the tokenizer"):
        make_engine().add_request(PROMPTS[0], SamplingParams(stop=("w1",)))
    with pytest.raises(KVStackError, match="stop must be non-empty strings"):
        SamplingParams(stop=("",))


def test_parallel_samples_on_a_tiny_pool_complete_free_their_blocks_and_match_a_large_pool() -> None:
    # 20 prompts with n=3 on 16 blocks: the forks find no block for their first token; they wait and are
    # recomputed instead of failing the step (and leaving every block used).
    prompts = [prompt_of(10, seed=i) for i in range(20)]
    params = SamplingParams(n=3, max_new_tokens=6, temperature=0.8, seed=1)
    engine = make_engine(memory_mb=mb(16))
    outputs = engine.generate(prompts, params)
    assert outputs == make_engine(memory_mb=mb(512)).generate(prompts, params)
    assert all(len(samples) == 3 and all(len(s) == 6 for s in samples) for samples in outputs)
    assert engine.metrics()["num_used"] == 0
    assert engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=3)) == [
        make_engine().generate([PROMPTS[2]], SamplingParams(max_new_tokens=3))[0]
    ]


POISON = VOCAB - 1  # a token in the vocabulary whose forward raises: a fault inside the step


def poison(engine: Engine) -> Engine:
    """Make the engine's model raise inside the forward of any batch holding the token POISON; its output layer
    loses POISON's row, so that a clean request can never sample it."""
    model = engine.runner.model
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, POISON, bias=False)
    model.lm_head.weight.data.copy_(head.weight.data[:POISON])
    forward = model.forward

    def poisoned_forward(*args: object, **kwargs: object) -> object:
        if (kwargs["input_ids"] == POISON).any():
            raise RuntimeError("poisoned token in the batch")
        return forward(*args, **kwargs)

    model.forward = poisoned_forward
    return engine


def clean_prompt_of(length: int, seed: int) -> list[int]:
    return [token % POISON for token in prompt_of(length, seed)]


def test_a_forward_that_raises_fails_only_its_request_and_the_engine_keeps_serving(
    reference: PreTrainedModel,
) -> None:
    engine = poison(make_engine())
    clean = [clean_prompt_of(9, seed=1), clean_prompt_of(14, seed=2)]
    bad = [*clean_prompt_of(11, seed=3), POISON]
    ids = [engine.add_request(clean[0], SamplingParams(max_new_tokens=5)),
           engine.add_request(bad, SamplingParams(max_new_tokens=5)),
           engine.add_request(clean[1], SamplingParams(max_new_tokens=5))]
    reports: dict[int, list] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            reports[out.request_id].append(out)
    assert reports[ids[1]][-1].finish_reason == "error"
    assert "RuntimeError: poisoned token in the batch" in reports[ids[1]][-1].error
    assert engine.get_output(ids[1]) == []
    for rid, prompt in ((ids[0], clean[0]), (ids[2], clean[1])):
        assert reports[rid][-1].finish_reason == "length" and reports[rid][-1].error is None
        assert engine.get_output(rid) == reference_generate(reference, prompt, 5)
    assert engine.metrics()["num_used"] == 0
    engine.block_manager.check_invariants()
    # The failed prompt's blocks were never trusted: the same prompt without the poison is computed afresh.
    assert engine.generate([bad[:-1]], SamplingParams(max_new_tokens=4)) == [reference_generate(reference, bad[:-1], 4)]
    with pytest.raises(KVStackError, match=r"1 request\(s\) failed: request \d+: RuntimeError: poisoned"):
        engine.generate([clean[0], bad], SamplingParams(max_new_tokens=3))
    assert engine.generate([clean[1]], SamplingParams(max_new_tokens=3)) == [reference_generate(reference, clean[1], 3)]


def test_a_request_reading_blocks_a_failed_request_was_writing_fails_with_it(reference: PreTrainedModel) -> None:
    engine = poison(make_engine())
    shared = clean_prompt_of(12, seed=7)  # three full blocks the second request finds in the prefix cache
    first = engine.add_request([*shared, POISON], SamplingParams(max_new_tokens=3))
    second = engine.add_request(shared + clean_prompt_of(3, seed=8), SamplingParams(max_new_tokens=3))
    outputs = {}
    while engine.has_unfinished():
        outputs.update({out.request_id: out for out in engine.step()})
    assert outputs[first].finish_reason == outputs[second].finish_reason == "error"
    assert f"failed request {first!r} was writing" in outputs[second].error
    assert engine.metrics()["num_used"] == 0
    prompt = shared + clean_prompt_of(3, seed=8)
    assert engine.generate([prompt], SamplingParams(max_new_tokens=3)) == [reference_generate(reference, prompt, 3)]


def test_a_sampling_error_fails_its_request_alone(reference: PreTrainedModel, monkeypatch) -> None:
    from kvstack.engine import engine as engine_module

    real_sample = engine_module.sample

    def sample_or_raise(logits, params, generator):
        if params.seed == 666:
            raise FloatingPointError("no finite logits")
        return real_sample(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", sample_or_raise)
    engine = make_engine()
    good = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=4))
    bad = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=4, seed=666))
    finished = {}
    while engine.has_unfinished():
        finished.update({out.request_id: out for out in engine.step() if out.finished})
    assert finished[bad].finish_reason == "error" and "FloatingPointError" in finished[bad].error
    assert finished[good].finish_reason == "length"
    assert engine.get_output(good) == reference_generate(reference, PROMPTS[0], 4)
    assert engine.metrics()["num_used"] == 0


@pytest.mark.parametrize("where", ["_sample_batch", "_drop_aborted_forks"])  # before and after the update
def test_a_fault_outside_any_request_fails_the_batch_and_the_next_step_serves(
    reference: PreTrainedModel, monkeypatch, where: str
) -> None:
    engine = make_engine()
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=4))

    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(engine, where, bug)
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [(rid, "error")]
    assert "RuntimeError: bug" in outputs[0].error
    monkeypatch.undo()
    assert engine.scheduler.pending_batch is None and engine.metrics()["num_used"] == 0
    assert engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=4)) == [
        reference_generate(reference, PROMPTS[2], 4)
    ]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.integers(6, 24),
    requests=st.lists(
        st.tuples(st.integers(1, 20), st.integers(1, 3), st.integers(1, 6), st.sampled_from(["ok", "oov", "poison"]),
                  st.integers(0, 999)),
        min_size=1, max_size=8,
    ),
    abort_after=st.integers(0, 6),
)
def test_random_request_mixes_leave_every_block_free_or_cached(
    blocks: int, requests: list[tuple[int, int, int, str, int]], abort_after: int
) -> None:
    # Mixes of n > 1, an abort, tiny pools, out-of-vocabulary tokens (refused at the door) and poisoned tokens
    # (the forward raises mid-step): after every step the block tables and ref counts agree, and at the end
    # every block is free or held by the prefix cache only, and every clean request ran to its length.
    engine = poison(make_engine(memory_mb=mb(blocks)))
    admitted: dict[int, str] = {}
    for length, n, max_new, kind, seed in requests:
        prompt = clean_prompt_of(length, seed=seed)
        if kind == "oov":
            prompt[-1] = np.int64(VOCAB + seed)  # out of the vocabulary: refused, nothing changes
        elif kind == "poison":
            prompt[seed % length] = POISON
        try:
            rid = engine.add_request(prompt, SamplingParams(n=n, max_new_tokens=max_new, seed=seed, temperature=0.7))
            admitted[rid] = kind
        except KVStackError as err:  # an out-of-vocabulary token, or a request the whole pool can never hold
            assert ("outside the vocabulary" in str(err)) if kind == "oov" else ("can never fit" in str(err)), err
    aborted = next(iter(admitted), None)
    for step in range(300):
        if not engine.has_unfinished():
            break
        if step == abort_after and aborted is not None:
            engine.abort(aborted)
        engine.step()
        engine.block_manager.check_invariants()
    assert not engine.has_unfinished()
    assert engine.metrics()["num_used"] == 0  # every block is free or held by the prefix cache only
    for rid, kind in admitted.items():
        reasons = {engine.scheduler.get_sequence(r).finish_reason.value for r in [rid, *engine.children(rid)]}
        if kind == "poison":
            assert reasons <= {"error", "aborted"}, reasons
        elif rid != aborted:
            assert reasons == {"length"}, reasons  # a poisoned neighbour never fails a clean request


@pytest.mark.parametrize(("length", "max_new"), [(64, 1), (61, 4)])
def test_a_request_that_exactly_fills_the_pool_runs_and_matches_generate(
    reference: PreTrainedModel, length: int, max_new: int
) -> None:
    # 16 blocks of 4 slots: the prompt and every generated token but the last (whose KV is never stored) fill
    # the pool exactly, as the context check counts them.
    engine = make_engine(memory_mb=mb(16))
    prompt = prompt_of(length, seed=5)
    assert engine.generate([prompt], SamplingParams(max_new_tokens=max_new)) == [
        reference_generate(reference, prompt, max_new)
    ]
    assert engine.metrics()["num_used"] == 0
    with pytest.raises(KVStackError, match="can never fit"):  # one slot more than the pool holds
        make_engine(memory_mb=mb(15)).add_request(prompt_of(60, seed=5), SamplingParams(max_new_tokens=2))


def test_release_forgets_finished_requests_so_a_long_running_engine_does_not_grow() -> None:
    engine = make_engine()
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=3, n=2, temperature=0.5, seed=1))
    with pytest.raises(KVStackError, match="has not finished; abort it before releasing it"):
        engine.release(rid)
    while engine.has_unfinished():
        engine.step()
    samples = engine.get_outputs(rid)
    children = engine.children(rid)
    assert len(samples) == 2 and len(children) == 1
    engine.release(rid)
    for gone in (rid, *children):
        with pytest.raises(KVStackError, match="unknown"):
            engine.get_output(gone)
    assert not engine.scheduler.finished() and not engine._params and not engine._arrived
    again = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=3, n=2, temperature=0.5, seed=1))
    while engine.has_unfinished():
        engine.step()
    assert engine.get_outputs(again) == samples
