"""Engine benchmark workloads: synthetic generators, JSONL round trips and Mooncake-style trace replay.

Expectations come from the workloads' definitions (lengths, which requests share which tokens, arrival
times), not from the generators' code; ``shared_prefix_tokens`` is checked against a brute-force
pairwise computation.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstack.bench.workload import (
    Workload,
    WorkloadRequest,
    load_mooncake_trace,
    mooncake_workload,
    multi_turn_workload,
    poisson_arrivals,
    shared_prefix_workload,
    synthetic_mooncake_trace,
    write_mooncake_trace,
)
from kvstack.errors import KVStackError

VOCAB = 49152


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def brute_force_shared(prompts: list[tuple[int, ...]]) -> int:
    return sum(max((common_prefix(p, q) for q in prompts[:i]), default=0) for i, p in enumerate(prompts))


def request(rid: str, prompt: list[int], arrival: float = 0.0) -> WorkloadRequest:
    return WorkloadRequest(request_id=rid, arrival_time=arrival, prompt_token_ids=tuple(prompt), max_new_tokens=4)


# ---------------------------------------------------------------------------------------------- shared prefix
def test_shared_prefix_lengths_and_token_range() -> None:
    w = shared_prefix_workload(
        vocab_size=VOCAB, num_requests=64, system_prompt_tokens=1024, unique_tokens=64, output_tokens=32
    )
    assert len(w) == w.num_requests == 64
    assert all(len(r.prompt_token_ids) == 1088 and r.max_new_tokens == 32 for r in w)
    assert w.total_prompt_tokens == 64 * 1088 and w.total_output_tokens == 64 * 32
    tokens = [t for r in w for t in r.prompt_token_ids]
    assert 100 <= min(tokens) and max(tokens) < VOCAB
    assert len({r.request_id for r in w}) == 64
    assert w.duration == 0.0 and all(r.arrival_time == 0.0 for r in w)


def test_shared_prefix_custom_token_range() -> None:
    w = shared_prefix_workload(
        vocab_size=1000, num_requests=8, system_prompt_tokens=16, unique_tokens=8, token_range=(500, 520)
    )
    assert {t for r in w for t in r.prompt_token_ids} <= set(range(500, 520))


def test_same_system_prompt_shares_exactly_its_length() -> None:
    system = 48
    w = shared_prefix_workload(
        vocab_size=VOCAB, num_requests=12, system_prompt_tokens=system, unique_tokens=5, num_system_prompts=3
    )
    by_system: dict[tuple[int, ...], list[WorkloadRequest]] = {}
    for r in w:
        by_system.setdefault(r.prompt_token_ids[:system], []).append(r)
    assert sorted(len(group) for group in by_system.values()) == [4, 4, 4]
    for group in by_system.values():
        for a in group:
            for b in group:
                if a is not b:
                    assert common_prefix(a.prompt_token_ids, b.prompt_token_ids) == system
    heads = [group[0].prompt_token_ids for group in by_system.values()]
    assert len({h[0] for h in heads}) == 3  # different system prompts differ from the first token
    assert w.shared_prefix_tokens == (12 - 3) * system == brute_force_shared([r.prompt_token_ids for r in w])


def test_shared_prefix_without_system_prompt_shares_nothing() -> None:
    w = shared_prefix_workload(vocab_size=VOCAB, num_requests=10, system_prompt_tokens=0, unique_tokens=3)
    assert all(len(r.prompt_token_ids) == 3 for r in w)
    assert w.shared_prefix_tokens == 0


def test_shared_prefix_is_deterministic_by_seed() -> None:
    kwargs = {"vocab_size": VOCAB, "num_requests": 6, "system_prompt_tokens": 32, "unique_tokens": 8, "rate_per_s": 4}
    assert shared_prefix_workload(**kwargs, seed=3) == shared_prefix_workload(**kwargs, seed=3)
    a, b = shared_prefix_workload(**kwargs, seed=3), shared_prefix_workload(**kwargs, seed=4)
    assert a[0].prompt_token_ids != b[0].prompt_token_ids
    assert [r.arrival_time for r in a] != [r.arrival_time for r in b]


def test_shared_prefix_tiny_vocab_too_small_for_distinct_requests() -> None:
    # [64, 128) holds 64 ids: 64 requests fit, 65 cannot all differ right after the system prompt.
    assert len(shared_prefix_workload(vocab_size=128, num_requests=64, system_prompt_tokens=4, unique_tokens=2)) == 64
    with pytest.raises(KVStackError, match="token_range"):
        shared_prefix_workload(vocab_size=128, num_requests=65, system_prompt_tokens=4, unique_tokens=2)


# ---------------------------------------------------------------------------------------------- arrivals
def test_poisson_gaps_have_mean_one_over_rate() -> None:
    times = poisson_arrivals(20001, 5.0, seed=1)
    assert times[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0 for g in gaps)
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 0.2) < 0.2 * 0.05  # std of the mean is 0.2 / sqrt(20000) ~ 0.7 %
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert abs(std - 0.2) < 0.2 * 0.1  # exponential: std == mean


def test_poisson_arrivals_determinism_and_offline() -> None:
    assert poisson_arrivals(50, 2.0, seed=7) == poisson_arrivals(50, 2.0, seed=7)
    assert poisson_arrivals(50, 2.0, seed=7) != poisson_arrivals(50, 2.0, seed=8)
    assert poisson_arrivals(5, None) == [0.0] * 5
    assert poisson_arrivals(5, math.inf) == [0.0] * 5
    assert poisson_arrivals(0, 1.0) == []


@pytest.mark.parametrize("rate", [0, -1.0, math.nan, "fast"])
def test_poisson_rejects_bad_rate(rate: object) -> None:
    with pytest.raises(KVStackError, match="rate_per_s"):
        poisson_arrivals(3, rate)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- multi-turn
def test_multi_turn_prompts_grow_as_strict_prefixes() -> None:
    s, u, o, turns = 20, 6, 4, 5
    w = multi_turn_workload(
        vocab_size=VOCAB,
        num_conversations=3,
        turns=turns,
        system_prompt_tokens=s,
        user_tokens=u,
        output_tokens=o,
        think_time_s=2.5,
        rate_per_s=1.0,
        seed=5,
    )
    assert len(w) == 3 * turns
    chats: dict[str, list[WorkloadRequest]] = {}
    for r in w:
        chats.setdefault(r.conversation_id, []).append(r)  # type: ignore[arg-type]
    assert len(chats) == 3
    for chat in chats.values():
        chat.sort(key=lambda r: r.turn)
        assert [r.turn for r in chat] == list(range(turns))
        for t, r in enumerate(chat):
            assert len(r.prompt_token_ids) == s + (t + 1) * u + t * o
            assert r.max_new_tokens == o
            assert r.arrival_time == pytest.approx(chat[0].arrival_time + 2.5 * t)
        for prev, nxt in itertools.pairwise(chat):
            assert len(prev.prompt_token_ids) < len(nxt.prompt_token_ids)
            assert nxt.prompt_token_ids[: len(prev.prompt_token_ids)] == prev.prompt_token_ids
    firsts = [chat[0].prompt_token_ids for chat in chats.values()]
    for a in firsts:
        for b in firsts:
            if a is not b:
                assert common_prefix(a, b) == s
    expected = (3 - 1) * s + 3 * sum(s + t * u + (t - 1) * o for t in range(1, turns))
    assert w.shared_prefix_tokens == expected == brute_force_shared([r.prompt_token_ids for r in w])
    assert [r.arrival_time for r in w] == sorted(r.arrival_time for r in w)


def test_multi_turn_deterministic_by_seed() -> None:
    kwargs = {"vocab_size": VOCAB, "num_conversations": 2, "turns": 2, "system_prompt_tokens": 8, "user_tokens": 4}
    assert multi_turn_workload(**kwargs, seed=1) == multi_turn_workload(**kwargs, seed=1)
    assert multi_turn_workload(**kwargs, seed=1) != multi_turn_workload(**kwargs, seed=2)


# ---------------------------------------------------------------------------------------------- Workload, JSONL
def test_workload_sorts_by_arrival_and_keeps_tie_order() -> None:
    w = Workload((request("b", [1], 2.0), request("a", [2], 1.0), request("c", [3], 1.0)))
    assert [r.request_id for r in w] == ["a", "c", "b"]
    assert w.duration == 1.0
    with pytest.raises(KVStackError, match="duplicate request_id 'a'"):
        Workload((request("a", [1]), request("a", [2])))
    assert Workload().summary() == {
        "num_requests": 0,
        "total_prompt_tokens": 0,
        "total_output_tokens": 0,
        "duration": 0.0,
        "shared_prefix_tokens": 0,
    }


def test_shared_prefix_tokens_small_example() -> None:
    w = Workload(
        (
            request("r0", [1, 2, 3], 0.0),
            request("r1", [1, 2, 4], 1.0),  # 2 with r0
            request("r2", [1, 2, 3, 5], 2.0),  # 3 with r0
            request("r3", [9], 3.0),  # 0
            request("r4", [1, 2, 3], 4.0),  # all 3 (same as r0)
            request("r5", [1], 5.0),  # 1
        )
    )
    assert w.shared_prefix_tokens == 2 + 3 + 0 + 3 + 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 10, allow_nan=False), st.lists(st.integers(0, 2), min_size=1, max_size=12)),
        min_size=1,
        max_size=25,
    )
)
def test_shared_prefix_tokens_matches_brute_force(items: list[tuple[float, list[int]]]) -> None:
    w = Workload(tuple(request(f"r{i}", prompt, t) for i, (t, prompt) in enumerate(items)))
    prompts = [r.prompt_token_ids for r in w]  # arrival order
    assert w.shared_prefix_tokens == brute_force_shared(prompts)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    for w in (
        shared_prefix_workload(vocab_size=VOCAB, num_requests=5, system_prompt_tokens=7, unique_tokens=3, rate_per_s=3),
        multi_turn_workload(vocab_size=VOCAB, num_conversations=2, turns=3, system_prompt_tokens=5, rate_per_s=1.5),
    ):
        path = tmp_path / "w.jsonl"
        w.to_jsonl(path)
        assert Workload.from_jsonl(path) == w
        first = json.loads(path.read_text().splitlines()[0])
        assert {"request_id", "arrival_time", "prompt_token_ids", "max_new_tokens"} <= set(first)
        assert first["prompt_token_ids"] == list(w[0].prompt_token_ids)


def test_jsonl_without_chat_fields_writes_exactly_four_keys(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    Workload((request("x", [5, 6]),)).to_jsonl(path)
    assert json.loads(path.read_text()) == {
        "request_id": "x",
        "arrival_time": 0.0,
        "prompt_token_ids": [5, 6],
        "max_new_tokens": 4,
    }


GOOD = '{"request_id": "a", "arrival_time": 0, "prompt_token_ids": [1, 2], "max_new_tokens": 3}'


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"request_id": "b", "arrival_time": 0, "prompt_token_ids": [1]}', "missing key"),
        ('{"request_id": "b", "arrival_time": 0, "prompt_token_ids": [1], "max_new_tokens": 1, "x": 1}', "unknown key"),
        ('{"request_id": "b", "arrival_time": -1, "prompt_token_ids": [1], "max_new_tokens": 1}', "arrival_time"),
        ('{"request_id": "b", "arrival_time": 0, "prompt_token_ids": [], "max_new_tokens": 1}', "empty"),
        ('{"request_id": "b", "arrival_time": 0, "prompt_token_ids": [1.5], "max_new_tokens": 1}', "integers"),
        ('{"request_id": "b", "arrival_time": 0, "prompt_token_ids": [1], "max_new_tokens": 0}', "max_new_tokens"),
        (GOOD, "duplicate request_id"),
    ],
)
def test_from_jsonl_errors_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n\n" + bad_line + "\n")
    with pytest.raises(KVStackError, match=message) as info:
        Workload.from_jsonl(path)
    assert "line 3" in str(info.value) and "bad.jsonl" in str(info.value) and "\n" not in str(info.value)


def test_from_jsonl_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(KVStackError, match="cannot read"):
        Workload.from_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(KVStackError, match="no request"):
        Workload.from_jsonl(tmp_path / "empty.jsonl")


# ---------------------------------------------------------------------------------------------- Mooncake
def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


TRACE = [
    {"timestamp": 27482, "input_length": 1536, "output_length": 52, "hash_ids": [46, 47, 48]},
    {"timestamp": 27982, "input_length": 1200, "output_length": 10, "hash_ids": [46, 47, 49]},  # partial 49
    {"timestamp": 29482, "input_length": 100, "output_length": 1, "hash_ids": [46]},  # partial 46
    {"timestamp": 30482, "input_length": 1024, "output_length": 7, "hash_ids": [50, 51], "extra": "ignored"},
]


def test_mooncake_shared_hash_ids_share_blocks(tmp_path: Path) -> None:
    w = load_mooncake_trace(write_lines(tmp_path / "trace.jsonl", TRACE), vocab_size=VOCAB)
    a, b, c, d = (r.prompt_token_ids for r in w)
    assert [len(p) for p in (a, b, c, d)] == [1536, 1200, 100, 1024]
    assert [r.max_new_tokens for r in w] == [52, 10, 1, 7]
    assert [r.request_id for r in w] == ["trace-1", "trace-2", "trace-3", "trace-4"]
    assert a[:1024] == b[:1024]  # hash ids 46, 47
    assert a[1024:1200] != b[1024:1200]  # 48 vs 49
    assert c == a[:100]  # partial block 46 is a prefix of the full one
    blocks = {a[:512], a[512:1024], a[1024:1536], b[1024:1200], d[:512], d[512:]}
    assert len(blocks) == 6  # different hash ids, different blocks
    assert w.shared_prefix_tokens == 1024 + 100 + 0
    assert all(100 <= t < VOCAB for p in (a, b, c, d) for t in p)


def test_mooncake_times_in_seconds_and_scale(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "trace.jsonl", TRACE)
    w = load_mooncake_trace(path, vocab_size=VOCAB)
    assert [r.arrival_time for r in w] == pytest.approx([0.0, 0.5, 2.0, 3.0])
    w = load_mooncake_trace(path, vocab_size=VOCAB, time_scale=0.5)
    assert [r.arrival_time for r in w] == pytest.approx([0.0, 0.25, 1.0, 1.5])
    assert len(load_mooncake_trace(path, vocab_size=VOCAB, max_requests=2)) == 2


def test_mooncake_seed_and_block_size(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "trace.jsonl", TRACE)
    w0, w1 = (load_mooncake_trace(path, vocab_size=VOCAB, seed=s) for s in (0, 1))
    assert w0 == load_mooncake_trace(path, vocab_size=VOCAB, seed=0)
    assert w0[0].prompt_token_ids != w1[0].prompt_token_ids
    small = [{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, 2, 3]}]
    w = load_mooncake_trace(write_lines(tmp_path / "small.jsonl", small), vocab_size=VOCAB, block_tokens=4)
    assert len(w[0].prompt_token_ids) == 10


BAD_MOONCAKE = [
    ("{oops", "invalid JSON"),
    ('{"timestamp": 1, "input_length": 10, "output_length": 1}', "missing key"),
    ('{"timestamp": 1, "input_length": 0, "output_length": 1, "hash_ids": []}', "input_length"),
    ('{"timestamp": 1, "input_length": 10, "output_length": -2, "hash_ids": [1]}', "output_length"),
    ('{"timestamp": 1, "input_length": 10, "output_length": 0, "hash_ids": [1]}', "output_length"),
    ('{"timestamp": -5, "input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp"),
    ('{"timestamp": 1, "input_length": 600, "output_length": 1, "hash_ids": [1]}', "needs ceil"),
    ('{"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": [1, 2]}', "needs ceil"),
    ('{"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": "1"}', "hash_ids"),
    ('{"timestamp": 1, "input_length": 10.5, "output_length": 1, "hash_ids": [1]}', "input_length"),
]


@pytest.mark.parametrize(("bad_line", "message"), BAD_MOONCAKE)
def test_mooncake_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(json.dumps(TRACE[0]) + "\n" + json.dumps(TRACE[1]) + "\n" + bad_line + "\n")
    with pytest.raises(KVStackError, match=message) as info:
        load_mooncake_trace(path, vocab_size=VOCAB)
    assert "trace.jsonl, line 3" in str(info.value) and "\n" not in str(info.value)


def test_synthetic_trace_is_valid_shared_and_replayable(tmp_path: Path) -> None:
    kwargs = {"num_requests": 40, "num_prefixes": 3, "prefix_blocks": 3, "block_tokens": 16}
    records = synthetic_mooncake_trace(**kwargs, seed=2)
    assert records == synthetic_mooncake_trace(**kwargs, seed=2)
    assert records != synthetic_mooncake_trace(**kwargs, seed=3)
    for r in records:
        assert len(r["hash_ids"]) == math.ceil(r["input_length"] / 16)
    assert [r["timestamp"] for r in records] == sorted(r["timestamp"] for r in records)
    heads = [tuple(r["hash_ids"][:1]) for r in records]
    assert len(set(heads)) <= 3 < len(heads)  # every request starts with one of the 3 prefixes
    path = tmp_path / "synthetic.jsonl"
    write_mooncake_trace(path, records, block_tokens=16)
    from_file = load_mooncake_trace(path, vocab_size=VOCAB, block_tokens=16)
    assert from_file == mooncake_workload(records, vocab_size=VOCAB, block_tokens=16)
    assert from_file.shared_prefix_tokens == brute_force_shared([r.prompt_token_ids for r in from_file]) > 0


def test_synthetic_trace_without_prefixes_shares_nothing() -> None:
    records = synthetic_mooncake_trace(num_requests=10, num_prefixes=0, block_tokens=8)
    ids = [h for r in records for h in r["hash_ids"]]
    assert len(ids) == len(set(ids))


def test_write_mooncake_trace_rejects_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with pytest.raises(KVStackError, match=r"record 2: .*needs ceil"):
        write_mooncake_trace(path, [TRACE[0], {**TRACE[0], "input_length": 5000}])
    assert not path.exists()


# ---------------------------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_requests": 0}, "num_requests must be an integer >= 1"),
        ({"system_prompt_tokens": -1}, "system_prompt_tokens must be an integer >= 0"),
        ({"unique_tokens": 0}, "unique_tokens"),
        ({"output_tokens": 0}, "output_tokens"),
        ({"num_system_prompts": 0}, "num_system_prompts"),
        ({"rate_per_s": 0}, "rate_per_s"),
        ({"seed": -1}, "seed"),
        ({"vocab_size": 1}, "vocab_size must be an integer >= 2"),
        ({"token_range": (10, 10)}, "token_range must satisfy"),
        ({"token_range": (0, VOCAB + 1)}, "token_range must satisfy"),
        ({"num_requests": 2.0}, "num_requests"),
    ],
)
def test_shared_prefix_argument_errors(kwargs: dict, message: str) -> None:
    full = {"vocab_size": VOCAB, "num_requests": 4, "system_prompt_tokens": 4, "unique_tokens": 2, **kwargs}
    with pytest.raises(KVStackError, match=message):
        shared_prefix_workload(**full)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_conversations": 0}, "num_conversations"),
        ({"turns": 0}, "turns"),
        ({"user_tokens": 0}, "user_tokens"),
        ({"think_time_s": -1.0}, "think_time_s"),
        ({"rate_per_s": -2.0}, "rate_per_s"),
    ],
)
def test_multi_turn_argument_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(KVStackError, match=message):
        multi_turn_workload(vocab_size=VOCAB, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_tokens": 0}, "block_tokens"),
        ({"time_scale": -1.0}, "time_scale"),
        ({"max_requests": 0}, "max_requests"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_mooncake_argument_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = write_lines(tmp_path / "trace.jsonl", TRACE)
    with pytest.raises(KVStackError, match=message):
        load_mooncake_trace(path, **{"vocab_size": VOCAB, **kwargs})


def test_mooncake_missing_or_empty_trace(tmp_path: Path) -> None:
    with pytest.raises(KVStackError, match="cannot read"):
        load_mooncake_trace(tmp_path / "nope.jsonl", vocab_size=VOCAB)
    with pytest.raises(KVStackError, match="no request"):
        mooncake_workload([], vocab_size=VOCAB)
    with pytest.raises(KVStackError, match="trace records, record 2: output_length"):
        mooncake_workload([TRACE[0], {**TRACE[0], "output_length": 0}], vocab_size=VOCAB)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"request_id": ""}, "request_id"),
        ({"arrival_time": math.inf}, "arrival_time"),
        ({"prompt_token_ids": (1, -2)}, "integers >= 0"),
        ({"prompt_token_ids": (True,)}, "integers >= 0"),
        ({"prompt_token_ids": "abc"}, "sequence of token ids"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"conversation_id": 3}, "conversation_id"),
        ({"turn": -1}, "turn"),
    ],
)
def test_workload_request_validation(kwargs: dict, message: str) -> None:
    base = {"request_id": "r", "arrival_time": 0.0, "prompt_token_ids": (1, 2), "max_new_tokens": 1, **kwargs}
    with pytest.raises(KVStackError, match=message):
        WorkloadRequest(**base)


def test_workload_request_normalizes_types() -> None:
    r = WorkloadRequest(request_id="r", arrival_time=1, prompt_token_ids=np.array([3, 4]), max_new_tokens=np.int64(2))
    assert r.prompt_token_ids == (3, 4) and type(r.prompt_token_ids[0]) is int
    assert type(r.arrival_time) is float and type(r.max_new_tokens) is int
