"""One prompt forward shared by several caches (kvstack.prefill_shared) leaves each exactly as its own prefill.

The independent expectation is each method's own :func:`kvstack.prefill` on the same model and prompt:
logits, the entries every layer keeps, the bytes held, and the logits of the tokens decoded afterwards
must all be equal, bit for bit.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from conftest import build_peaky, random_ids
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.cache.attention_stats import attention_route, attention_with_stats
from kvstack.cache.shared import chunk_share_key, share_blocker
from kvstack.cache.shared_attention import SharedChunkAttention

SHAREABLE = [
    "full",
    "snapkv(budget={b}, window=8)",
    "snapkv(budget={b}, window=4)",
    "keynorm(budget={b})",
    "random(budget={b})",
    "pyramidkv(budget={b}, window=4)",
    "adakv(snapkv(budget={b}, window=4), floor=0.2)",
    "loki(budget={b}, rank=4)",
]


def _decode(model: torch.nn.Module, cache: kvstack.KVStackCache, logits: torch.Tensor, steps: int) -> list:
    """Greedy tokens and their logits for ``steps`` steps after a prefill."""
    outputs = []
    token = logits.argmax(dim=-1, keepdim=True)
    for _ in range(steps):
        out = model(input_ids=token, **kvstack.cache_kwargs(model, cache), use_cache=True)
        outputs.append(out.logits[:, -1].clone())
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    return outputs


def _kept(cache: kvstack.KVStackCache) -> list:
    return [[p.tolist() for p in row] for layer in cache.layers for row in layer.kept_positions()]


def _state(cache: kvstack.KVStackCache) -> list:
    return [[(name, tensor[:, :, : layer.length].tolist()) for name, tensor in sorted(layer.state.items())]
            for layer in cache.layers if layer.ragged is None]


def _check_shared_equals_own(model: torch.nn.Module, ids: torch.Tensor, specs: list[str], steps: int = 4) -> None:
    own = []
    for spec in specs:
        cache = kvstack.make_cache(model, spec, seed=3)
        logits = kvstack.prefill(model, ids, cache)
        own.append((cache, logits, cache.kv_bytes(), _kept(cache), _state(cache)))
    caches = [kvstack.make_cache(model, spec, seed=3) for spec in specs]
    shared_logits = kvstack.prefill_shared(model, ids, caches)
    for spec, cache, (own_cache, own_logits, own_bytes, own_kept, own_state) in zip(specs, caches, own, strict=True):
        assert torch.equal(shared_logits, own_logits), spec
        assert cache.kv_bytes() == own_bytes, spec
        assert _kept(cache) == own_kept, spec
        assert _state(cache) == own_state, spec
        assert cache.summary() == own_cache.summary(), spec
        for a, b in zip(_decode(model, cache, shared_logits, steps), _decode(model, own_cache, own_logits, steps),
                        strict=True):
            assert torch.equal(a, b), spec


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_static_method_ends_a_shared_prefill_exactly_as_its_own(arch: str) -> None:
    model = build_peaky(arch, num_hidden_layers=3)
    ids = random_ids(48, seed=5)
    _check_shared_equals_own(model, ids, [spec.format(b=12) for spec in SHAREABLE])


@pytest.mark.parametrize("specs", [
    ["loki(budget=12, rank=4)", "snapkv(budget=12, window=4)"],  # Loki rotates its keys in place
    ["snapkv(budget=47, window=4)", "snapkv(budget=12, window=8)"],  # one entry evicted: a slot overwritten
])
def test_a_member_changing_its_keys_in_place_does_not_change_what_the_others_see(specs: list[str]) -> None:
    """The first member's keys are the shared attention's; every statistic is taken before any member
    compresses, so the order of the caches does not matter."""
    model = build_peaky("llama", num_hidden_layers=2)
    _check_shared_equals_own(model, random_ids(48, seed=11), specs, steps=2)


def test_a_shared_prefill_of_a_batch_equals_each_own_prefill() -> None:
    model = build_peaky("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    ids = random_ids(40, batch=2, seed=7)
    _check_shared_equals_own(model, ids, ["full", "snapkv(budget=10, window=4)", "keynorm(ratio=0.5)"], steps=2)


@settings(max_examples=8, deadline=None)
@given(length=st.integers(min_value=8, max_value=70), budget=st.integers(min_value=6, max_value=40),
       seed=st.integers(min_value=0, max_value=10_000))
def test_shared_prefill_matches_own_prefill_on_random_prompts_and_budgets(length: int, budget: int, seed: int) -> None:
    model = build_peaky("llama", seed=seed % 3)
    ids = random_ids(length, seed=seed)
    specs = ["full", f"snapkv(budget={budget}, window=4)", f"random(budget={budget})",
             f"adakv(snapkv(budget={budget}, window=4), floor=0.2)"]
    _check_shared_equals_own(model, ids, specs, steps=2)


# Static methods with per-entry state (Ada-KV over H2O or Scissorhands: scores accumulated over the whole
# prompt, applied once) share a forward that computes those statistics, with caches asking for the same.
STATS_GROUPS = [
    ["adakv(h2o(budget={b}))", "adakv(h2o(budget={b2}))", "adakv(h2o(budget={b}, recent=3), floor=0.5)"],
    ["adakv(scissorhands(budget={b}, history=4))", "adakv(scissorhands(budget={b2}, history=4))"],
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("group", STATS_GROUPS)
def test_static_methods_with_state_end_a_shared_prefill_exactly_as_their_own(arch: str, group: list[str]) -> None:
    model = build_peaky(arch, num_hidden_layers=3)
    _check_shared_equals_own(model, random_ids(48, seed=5), [spec.format(b=12, b2=30) for spec in group])


@settings(max_examples=8, deadline=None)
@given(length=st.integers(min_value=6, max_value=70), budgets=st.lists(st.integers(min_value=4, max_value=60),
                                                                        min_size=2, max_size=2),
       group=st.sampled_from(STATS_GROUPS), seed=st.integers(min_value=0, max_value=10_000))
def test_shared_stats_prefill_matches_own_prefill_on_random_prompts(length: int, budgets: list[int],
                                                                   group: list[str], seed: int) -> None:
    model = build_peaky("llama", seed=seed % 3)
    specs = [spec.format(b=budgets[0], b2=budgets[1]) for spec in group]
    _check_shared_equals_own(model, random_ids(length, seed=seed), specs, steps=2)


@pytest.mark.parametrize(("specs", "message"), [
    (["full", "adakv(h2o(budget=8))"], r"cache 1 \(.*\) .*accumulates per-entry state.*same statistics"),
    (["adakv(h2o(budget=8))", "full"], r"cache 0 \(.*\) .*accumulates per-entry state.*same statistics"),
    (["adakv(h2o(budget=8))", "adakv(scissorhands(budget=8))"], r"cache 0 .*same statistics"),
    (["adakv(h2o(budget=8))", "h2o(budget=8)"], r"cache 0 .*same statistics"),
])
def test_a_static_method_with_state_shares_only_with_the_same_statistics(specs: list[str], message: str) -> None:
    model = build_peaky("llama")
    caches = [kvstack.make_cache(model, spec) for spec in specs]
    with pytest.raises(kvstack.InputError, match=message):
        kvstack.prefill_shared(model, random_ids(24), caches)
    assert all(cache.tokens_seen() == 0 for cache in caches)


def test_a_shared_stats_prefill_refuses_a_cache_that_already_holds_tokens() -> None:
    model = build_peaky("llama")
    used = kvstack.make_cache(model, "adakv(h2o(budget=8))")
    kvstack.prefill(model, random_ids(8), used)
    with pytest.raises(kvstack.InputError, match=r"cache 1 .*already holds tokens"):
        kvstack.prefill_shared(model, random_ids(16), [kvstack.make_cache(model, "adakv(h2o(budget=4))"), used])


@pytest.mark.parametrize(("spec", "reason"), [
    ("h2o(budget=8)", "evicts while the prompt is read"),
    ("kivi(bits=2)", "encodes entries with kivi"),
    ("snapkv(budget=8, window=4) + kivi(bits=4)", "encodes entries with kivi"),
    ("mikv(snapkv(budget=8, window=4))", "low precision"),
])
def test_prefill_shared_refuses_a_method_that_cannot_share_and_says_why(spec: str, reason: str) -> None:
    model = build_peaky("llama", hidden_size=128)  # head dimension 32: one KIVI group
    ids = random_ids(24)
    caches = [kvstack.make_cache(model, "full"), kvstack.make_cache(model, spec)]
    with pytest.raises(kvstack.InputError, match=rf"cache 1 \(.*\) cannot share a prompt forward: .*{reason}"):
        kvstack.prefill_shared(model, ids, caches)
    assert all(cache.tokens_seen() == 0 for cache in caches)  # refused before anything ran


def test_prefill_shared_refuses_a_cache_that_already_holds_tokens() -> None:
    model = build_peaky("llama")
    used = kvstack.make_cache(model, "full")
    kvstack.prefill(model, random_ids(8), used)
    assert share_blocker(used) == "it already holds tokens"
    with pytest.raises(kvstack.InputError, match="already holds tokens"):
        kvstack.prefill_shared(model, random_ids(16), [kvstack.make_cache(model, "full"), used])
    with pytest.raises(kvstack.InputError, match="at least one cache"):
        kvstack.prefill_shared(model, random_ids(16), [])


@pytest.mark.parametrize("spec", ["full", "snapkv(budget=10, window=4)", "adakv(snapkv(budget=10, window=4))",
                                  "h2o(budget=10)", "loki(budget=10, rank=4)", "kivi(bits=2, group_size=8, residual=8)",
                                  "mikv(h2o(budget=10), group_size=8)"])
def test_a_dropped_cache_is_freed_at_once_without_the_garbage_collector(spec: str) -> None:
    """No reference cycle keeps a used cache's tensors alive: benchmarks that make a cache per sample
    would otherwise hold every earlier sample's cache until the collector's next full pass."""
    import gc
    import weakref

    model = build_peaky("llama", hidden_size=128)
    caches = [kvstack.make_cache(model, spec), kvstack.make_cache(model, "full")]
    logits = kvstack.prefill(model, random_ids(40), caches[0])
    _decode(model, caches[0], logits, 2)
    kvstack.prefill_shared(model, random_ids(40), [caches[1], kvstack.make_cache(model, "keynorm(budget=8)")])
    alive = [weakref.ref(cache) for cache in caches]
    gc.collect()
    gc.disable()
    try:
        caches.clear()
        assert [ref() for ref in alive] == [None, None]
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------------------ dynamic methods
# Methods that evict as they read share the prompt chunks read before each first evicts
# (kvstack.prefill_shared_chunks); the expectation is again each method's own chunked prefill.

DYNAMIC_GROUPS = [  # one group per share key: statistics one attention call computes
    ["streamingllm(budget={b})", "streamingllm(budget={b2}, sinks=2)"],
    ["tova(budget={b})", "tova(budget={b2})"],
    ["h2o(budget={b})", "h2o(budget={b2})", "h2o(budget={b}, recent=3)"],
    ["scissorhands(budget={b}, history=4)", "scissorhands(budget={b2}, history=4)"],
    # column sums and below-mean counts come from one pass; the last query's weights apart from the output
    ["h2o(budget={b})", "scissorhands(budget={b2}, history=4)", "scissorhands(budget={b}, history=4)",
     "h2o(budget={b2}, recent=3)"],
    ["tova(budget={b})", "streamingllm(budget={b2})", "streamingllm(budget={b}, sinks=2)", "tova(budget={b2})"],
]


def _check_shared_chunks_equal_own(model: torch.nn.Module, ids: torch.Tensor, specs: list[str], chunk: int,
                                   steps: int = 3) -> list:
    own = []
    for spec in specs:
        cache = kvstack.make_cache(model, spec, seed=3)
        logits = kvstack.prefill(model, ids, cache, chunk_size=chunk)
        own.append((cache, logits, cache.kv_bytes(), _kept(cache), _state(cache)))
    caches = [kvstack.make_cache(model, spec, seed=3) for spec in specs]
    reads = kvstack.prefill_shared_chunks(model, ids, caches, chunk_size=chunk)
    for spec, cache, read, (own_cache, own_logits, own_bytes, own_kept, own_state) in zip(
            specs, caches, reads, own, strict=True):
        assert torch.equal(read.logits, own_logits), spec
        assert cache.kv_bytes() == own_bytes, spec
        assert _kept(cache) == own_kept, spec
        assert _state(cache) == own_state, spec
        assert cache.summary() == own_cache.summary(), spec
        for a, b in zip(_decode(model, cache, read.logits, steps), _decode(model, own_cache, own_logits, steps),
                        strict=True):
            assert torch.equal(a, b), spec
    return reads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("group", DYNAMIC_GROUPS)
def test_dynamic_methods_end_a_shared_chunked_prefill_exactly_as_their_own(arch: str, group: list[str]) -> None:
    model = build_peaky(arch, num_hidden_layers=3)
    ids = random_ids(64, seed=5)
    reads = _check_shared_chunks_equal_own(model, ids, [spec.format(b=20, b2=40) for spec in group], chunk=16)
    # chunks of 16: a budget of 20 evicts after the second chunk, 40 after the third; until then the group
    # reads together
    shared = {spec.format(b=20, b2=40): read.chunks_shared for spec, read in zip(group, reads, strict=True)}
    assert max(shared.values()) >= 2 and all(read.chunks == 4 for read in reads)


@settings(max_examples=10, deadline=None)
@given(length=st.integers(min_value=6, max_value=90), chunk=st.integers(min_value=3, max_value=24),
       budgets=st.lists(st.integers(min_value=8, max_value=60), min_size=2, max_size=3),
       group=st.sampled_from(DYNAMIC_GROUPS), seed=st.integers(min_value=0, max_value=10_000))
def test_shared_chunks_match_own_chunked_prefill_on_random_prompts(length: int, chunk: int, budgets: list[int],
                                                                   group: list[str], seed: int) -> None:
    model = build_peaky("llama", seed=seed % 3)
    ids = random_ids(length, seed=seed)
    specs = [spec.format(b=budgets[0], b2=budgets[1]) for spec in group]
    if len(budgets) > 2:
        specs.append(group[0].format(b=budgets[2], b2=budgets[2]))
    _check_shared_chunks_equal_own(model, ids, specs, chunk=chunk, steps=2)


def test_methods_share_chunks_when_one_attention_call_computes_their_statistics() -> None:
    model = build_peaky("llama")
    keys = {spec: chunk_share_key(kvstack.make_cache(model, spec)) for spec in (
        "h2o(budget=8)", "scissorhands(budget=8)", "h2o(budget=20, recent=3)", "tova(budget=8)",
        "streamingllm(budget=8)", "streamingllm(budget=30, sinks=2)")}
    assert len({keys["h2o(budget=8)"], keys["scissorhands(budget=8)"], keys["h2o(budget=20, recent=3)"]}) == 1
    assert len({keys["tova(budget=8)"], keys["streamingllm(budget=8)"], keys["streamingllm(budget=30, sinks=2)"]}) == 1
    assert keys["h2o(budget=8)"] != keys["tova(budget=8)"]


def test_a_one_token_chunk_that_tova_and_streamingllm_would_attend_differently_splits_their_group() -> None:
    # 33 tokens in chunks of 16: the last chunk is one token, where TOVA's forward takes the last query's
    # weights eagerly and StreamingLLM's does not; with budgets that never evict, all read the first two
    # chunks together, and the two TOVA caches the last one too
    model = build_peaky("llama", num_hidden_layers=3)
    specs = ["tova(budget=40)", "streamingllm(budget=40)", "tova(budget=50)"]
    reads = _check_shared_chunks_equal_own(model, random_ids(33, seed=2), specs, chunk=16)
    assert [(read.chunks_shared, read.chunks) for read in reads] == [(3, 3), (2, 3), (3, 3)]


def test_with_bf16_statistics_h2o_shares_chunks_with_h2o_and_scissorhands_reads_alone(monkeypatch) -> None:
    # bf16 statistics: H2O's column sums alone come from a transposed flash call, Scissorhands' do not
    monkeypatch.setenv("KVSTACK_STATS_PRECISION", "bf16")
    model = build_peaky("llama", num_hidden_layers=3)
    specs = ["h2o(budget=20)", "scissorhands(budget=40, history=4)", "h2o(budget=40)"]
    reads = _check_shared_chunks_equal_own(model, random_ids(48, seed=4), specs, chunk=16)
    # chunks of 16: the budget of 20 evicts at the second chunk, after which the other H2O cache reads alone
    assert [read.chunks_shared for read in reads] == [2, 0, 2]


def test_under_cpu_autocast_h2o_and_scissorhands_read_and_share_chunks_as_their_own() -> None:
    # bf16 autocast: values arrive in bf16 beside float32 queries and keys (RoPE promotes those); the fused
    # kernel widens them and runs with autocast off, so each cache's own prefill runs (it used to raise a
    # dtype error) and the shared chunks still end each cache exactly as its own
    model = build_peaky("llama", num_hidden_layers=3)
    specs = ["h2o(budget=20)", "scissorhands(budget=40, history=4)", "h2o(budget=40)"]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        reads = _check_shared_chunks_equal_own(model, random_ids(48, seed=4), specs, chunk=16)
    assert [read.chunks_shared for read in reads] == [2, 3, 3]


def _random_chunk(seed: int, q_len: int, past: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 4, q_len, 8, generator=generator) * 2
    keys = torch.randn(1, 2, past + q_len, 8, generator=generator) * 2
    return query, keys, torch.randn(1, 2, past + q_len, 8, generator=generator)


@settings(max_examples=40, deadline=None)
@given(q_len=st.integers(min_value=1, max_value=40), past=st.integers(min_value=0, max_value=40),
       family=st.sampled_from([[{"colsum"}, {"below_mean"}, {"colsum", "below_mean"}], [set(), {"last"}]]),
       padding=st.sampled_from(["none", "mask", "queries"]), kernels_on=st.booleans(),
       precision=st.sampled_from(["auto", "fp32", "bf16"]), seed=st.integers(min_value=0, max_value=10_000))
def test_a_shared_chunk_gives_each_request_what_its_own_attention_computes(
        q_len: int, past: int, family: list[set[str]], padding: str, kernels_on: bool, precision: str,
        seed: int) -> None:
    query, keys, values = _random_chunk(seed, q_len, past)
    causal = query_valid = None
    if padding == "mask":  # a chunk mask with the chunk's first entry hidden from every later query
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril().view(1, 1, q_len, q_len).clone()
        causal[..., :, 0] = torch.arange(q_len) == 0
    elif padding == "queries":  # the chunk's first queries are padding
        query_valid = (torch.arange(q_len) >= q_len // 3).view(1, q_len)
    requests = [(needs, 0) for needs in family]
    environment = {"KVSTACK_KERNELS": "1" if kernels_on else "0", "KVSTACK_STATS_PRECISION": precision}
    with mock.patch.dict(os.environ, environment):
        routes = {attention_route(needs, q_len=q_len, length=past + q_len, num_q_heads=4, device="cpu",
                                  dtype=torch.float32, padded=causal is not None,
                                  query_padded=query_valid is not None)
                  for needs in [*family, frozenset().union(*family)]}
        if len(routes) > 1:  # the requests' own forwards would compute the attention by different calls
            with pytest.raises(ValueError, match="another way"):
                SharedChunkAttention(query, keys, values, causal, query_valid, 0.35, requests)
            return
        shared = SharedChunkAttention(query, keys, values, causal, query_valid, 0.35, requests)
        for needs, window in requests:
            output, stats = attention_with_stats(query, keys, values, causal, None, 0.35, set(needs), window,
                                                 query_valid=query_valid)
            assert torch.equal(shared.output, output), sorted(needs)
            got = shared.stats(needs, window)
            for field in ("window", "colsum", "below_mean", "queries_seen", "last"):
                mine, theirs = getattr(got, field), getattr(stats, field)
                assert (mine is None) == (theirs is None), (sorted(needs), field)
                assert mine is None or torch.equal(mine, theirs), (sorted(needs), field)


def test_a_shared_chunk_refuses_a_request_it_was_not_computed_for() -> None:
    query, keys, values = _random_chunk(0, 6, 4)
    shared = SharedChunkAttention(query, keys, values, None, None, 0.35, [({"colsum"}, 0)])
    with pytest.raises(ValueError, match="computed for"):
        shared.stats({"below_mean"}, 0)
    with pytest.raises(ValueError, match="one query window"):
        SharedChunkAttention(query, keys, values, None, None, 0.35, [({"colsum"}, 0), ({"colsum"}, 2)])


@pytest.mark.parametrize(("specs", "message"), [
    (["h2o(budget=8)", "snapkv(budget=8, window=4)"], "evict as they read"),
    (["h2o(budget=8)", "adakv(h2o(budget=8))"], "evict as they read"),  # Ada-KV compresses once
    (["h2o(budget=8)", "streamingllm(budget=8)"], "same attention statistics"),
    (["h2o(budget=8)", "h2o(budget=8) + kivi(bits=2)"], "without a codec"),
    (["streamingllm(budget=8, positions='cache')", "streamingllm(budget=8)"], "evict as they read"),
])
def test_prefill_shared_chunks_refuses_caches_that_cannot_share(specs: list[str], message: str) -> None:
    model = build_peaky("llama", hidden_size=128)
    caches = [kvstack.make_cache(model, spec) for spec in specs]
    with pytest.raises(kvstack.InputError, match=message):
        kvstack.prefill_shared_chunks(model, random_ids(24), caches, chunk_size=8)
    assert all(cache.tokens_seen() == 0 for cache in caches)
