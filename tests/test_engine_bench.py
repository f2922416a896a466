"""``replay`` and ``kvstack engine-bench`` on a tiny model: real-time arrivals, metrics, rejected requests."""

from __future__ import annotations

import json

import pytest
from conftest import build_model, reference_generate, usage_error

import kvstack.models
from kvstack import cli
from kvstack.bench.engine_replay import replay
from kvstack.bench.workload import Workload, WorkloadRequest, shared_prefix_workload
from kvstack.engine import Engine

VOCAB = 200


def tiny() -> object:
    return build_model("llama", seed=0, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.1)


def test_replay_outputs_equal_generate_and_counts_shared_prefix_hits() -> None:
    workload = shared_prefix_workload(vocab_size=VOCAB, num_requests=5, system_prompt_tokens=24, unique_tokens=5,
                                      output_tokens=4, rate_per_s=200.0, seed=3)
    engine = Engine(tiny(), memory_mb=1.0, block_size=4, max_num_batched_tokens=32)
    result = replay(engine, workload)
    reference = tiny()
    for request in workload:
        expected = reference_generate(reference, list(request.prompt_token_ids), request.max_new_tokens)
        assert result.outputs[request.request_id] == expected
    assert result.num_completed == 5 and not result.rejected
    assert result.output_tokens == 20
    assert result.prompt_tokens == workload.total_prompt_tokens
    # Every request after the first reuses the 24-token system prompt (6 blocks of 4).
    assert result.prefix_cache_hits_tokens == 4 * 24
    assert 0 < result.ttft_p50_s <= result.ttft_p99_s
    assert result.duration_s >= workload.duration  # arrivals are honoured in real time
    assert result.peak_kv_mb > 0
    summary = result.summary()
    assert "outputs" not in summary and summary["num_requests"] == 5
    assert "requests in" in result.summary_line()


def test_a_rejected_request_does_not_disturb_the_others() -> None:
    good = WorkloadRequest("good", 0.0, tuple(range(10, 20)), 3)
    too_long = WorkloadRequest("too-long", 0.0, tuple(range(10, 150)), 3)  # past the 128-token context
    engine = Engine(tiny(), memory_mb=1.0, block_size=4)
    result = replay(engine, Workload((good, too_long)), time_scale=0)
    assert set(result.rejected) == {"too-long"}
    assert "context" in result.rejected["too-long"]
    assert result.outputs["good"] == reference_generate(tiny(), list(good.prompt_token_ids), 3)


def test_cli_engine_bench_writes_a_result(tmp_path, monkeypatch, capsys) -> None:
    model = tiny()
    monkeypatch.setattr(kvstack.models, "load_model", lambda name, device=None: (model, None))
    code = cli.main(["engine-bench", "--requests", "3", "--system-tokens", "16", "--unique-tokens", "4",
                     "--output-tokens", "2", "--memory-mb", "1", "--block-size", "4", "--no-progress",
                     "--out", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["num_completed"] == 3 and record["output_tokens"] == 6
    assert record["command"].startswith("kvstack engine-bench")
    assert len(Workload.from_jsonl(tmp_path / "workload.jsonl")) == 3
    assert "3/3 requests" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "needle"), [
    (["--workload", "nowhere"], "--workload 'nowhere'"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--rate", "0"], "--rate must be > 0"),
    (["--policy", "sjf"], "unknown --policy 'sjf'"),
    (["--memory-mb", "-5"], "--memory-mb must be > 0"),
])
def test_cli_engine_bench_usage_errors(capsys, argv, needle) -> None:
    assert needle in usage_error(capsys, ["engine-bench", *argv])


def test_replay_with_a_method_reports_the_blocks_it_frees() -> None:
    workload = shared_prefix_workload(vocab_size=VOCAB, num_requests=3, system_prompt_tokens=32, unique_tokens=8,
                                      output_tokens=6, seed=4)
    engine = Engine(tiny(), memory_mb=1.0, block_size=4)
    result = replay(engine, workload, time_scale=0, method="streamingllm(budget=16, sinks=2)")
    assert result.num_completed == 3
    # Per request: 40 prompt tokens -> 16 at the end of the prompt (24 evicted); decoding computes 5 more, and
    # at 16 + 4 slots a block's worth (4) is evicted again.
    assert result.engine_metrics["compression_evicted_tokens"] == 3 * (24 + 4)
    assert result.engine_metrics["compression_freed_blocks"] > 0


def test_cli_refuses_a_bad_engine_method_before_loading(capsys) -> None:
    assert "codecs are not supported" in usage_error(capsys, ["engine-bench", "--method", "kivi(bits=2)"])
