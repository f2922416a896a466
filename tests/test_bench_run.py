"""The bench runner and ``kvstack bench``: end to end on a tiny model, resumability, bad input, metrics."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from test_bench_helpers import model, prose_file, tiny_llama, tokenizer  # noqa: F401  (pytest fixtures)

import kvstack.models
from kvstack import SpecError, cli
from kvstack.bench import (
    BenchConfig,
    BenchError,
    expand_methods,
    latest_results,
    plan_cells,
    read_results,
    run_bench,
)
from kvstack.bench.config import split_top_level
from kvstack.bench.metrics import PeakMemory
from kvstack.bench.runner import CHECKPOINT_FILE, RESULTS_FILE, append_result

PLOTS = ("score_vs_compression_mean.png", "score_vs_compression.png", "needle_heatmap.png", "kv_bytes_vs_length.png",
         "decode_speed_vs_length.png")


def same_value(actual: object, expected: object, rel: float) -> bool:
    """Numbers equal within ``rel``; anything else (None for a perplexity cell's new_tokens) exactly equal."""
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return actual == pytest.approx(expected, rel=rel)
    return actual == expected


def small_config(out: Path, prose: str, **overrides) -> BenchConfig:
    values = dict(
        model="tiny-llama", methods=["streamingllm(ratio={ratio})", "snapkv(ratio={ratio})"], ratios=[0.5],
        tasks=["passkey", "niah", "perplexity"], depths=[0.0, 1.0], lengths=[160, 320], samples=2, seed=0,
        max_new_tokens=6, ppl_chunk=64, prose=prose, out_dir=str(out), progress=False, plots=False,
    )
    values.update(overrides)
    return BenchConfig(**values)


# ------------------------------------------------------------------------------------------------ methods


def test_methods_expand_placeholders_bare_names_and_add_the_full_baseline_once():
    runs = expand_methods(["snapkv(ratio={ratio})", "h2o", "adakv(snapkv(budget={budget}), floor=0.2)"],
                          ratios=[0.25, 0.5], budgets=[64])
    labels = [r.label for r in runs]
    assert labels == ["full", "snapkv(ratio=0.25)", "snapkv(ratio=0.5)", "h2o(ratio=0.25)", "h2o(ratio=0.5)",
                      "h2o(budget=64)", "adakv(snapkv(budget=64))"]
    assert {r.group for r in runs if r.label.startswith("snapkv")} == {"snapkv(ratio={ratio})"}
    assert runs[1].ratio == 0.25 and runs[-1].budget == 64 and runs[3].dynamic
    assert [r.label for r in expand_methods(["full", "full"], ratios=[0.5])] == ["full"]


def test_method_errors_are_one_line_usage_errors():
    with pytest.raises(SpecError, match="unknown method 'snapkvv'"):
        expand_methods(["snapkvv(ratio={ratio})"], ratios=[0.5])
    with pytest.raises(BenchError, match="give --ratios"):
        expand_methods(["snapkv(ratio={ratio})"])
    with pytest.raises(BenchError, match="needs --ratios or --budgets"):
        expand_methods(["snapkv"])


def test_method_lists_split_only_at_top_level_commas():
    assert split_top_level("full,adakv(snapkv(ratio=0.5), floor=0.2), h2o(ratio={ratio})") == [
        "full", "adakv(snapkv(ratio=0.5), floor=0.2)", "h2o(ratio={ratio})"]


def test_cell_keys_are_stable_and_distinct(tmp_path, prose_file):  # noqa: F811
    config = small_config(tmp_path, prose_file)
    cells = plan_cells(config)
    assert len(cells) == (3 * 2 + 2) * 3  # (passkey + 2 depths) x 2 lengths (+ perplexity x 2) x 3 methods
    assert len({c.key for c in cells}) == len(cells)
    assert [c.key for c in plan_cells(small_config(tmp_path / "other", prose_file))] == [c.key for c in cells]
    assert plan_cells(small_config(tmp_path, prose_file, seed=1))[0].key != cells[0].key
    repeated = small_config(tmp_path, prose_file, tasks=["passkey", "niah", "passkey", "perplexity"],
                            lengths=[160, 320, 160])
    assert [c.key for c in plan_cells(repeated)] == [c.key for c in cells]  # given twice, planned once


# ------------------------------------------------------------------------------------------------ end to end


def test_run_bench_end_to_end_on_a_tiny_model(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    config = small_config(tmp_path, prose_file, plots=True, query_modes=["after", "both"])
    result = run_bench(config, model, tokenizer)
    cells = plan_cells(config)
    assert result.ran == len(cells) and result.skipped == 0
    records = read_results(tmp_path / RESULTS_FILE)
    assert sorted(r["key"] for r in records) == sorted(c.key for c in cells)
    for r in records:
        assert r["samples"] == 2 and len(r["per_sample"]) == 2
        assert r["model"] == "tiny-llama" and r["kv_bytes"] > 0 and r["full_kv_bytes"] > 0
        assert r["peak_rss_bytes"] and r["prefill_s"] > 0
        if r["kind"] == "generate":
            assert 0 <= r["score"] <= 100 and r["ttft_s"] >= r["prefill_s"]
            assert abs(r["prompt_tokens"] - r["length"]) <= 0.02 * r["length"]
            assert r["query_mode"] in ("after", "both") and r["chat"] is True
        else:
            assert r["score"] > 1 and r["query_mode"] == "n/a"
        if r["method"] == "snapkv(ratio=0.5)" and r["kind"] == "generate":
            assert 0.3 < r["compression_ratio_prefill"] < 0.6 and r["kv_bytes"] < 0.7 * r["full_kv_bytes"]
        if r["method"] == "full":
            assert r["compression_ratio"] < 0.05
    assert {r["depth"] for r in records if r["task"] == "niah"} == {0.0, 1.0}
    for name in ("summary.csv", "results.md", *PLOTS):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(cells) and {"score", "compression_ratio", "decode_tokens_per_s"} <= set(rows[0])
    markdown = (tmp_path / "results.md").read_text()
    assert "## passkey" in markdown and "`snapkv(ratio=0.5)`" in markdown


def test_samples_are_shared_by_every_method_of_a_cell(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    run_bench(small_config(tmp_path, prose_file, tasks=["passkey"], lengths=[200]), model, tokenizer)
    records = read_results(tmp_path / RESULTS_FILE)
    answers = {tuple(tuple(s["answers"]) for s in r["per_sample"]) for r in records}
    tokens = {tuple(s["tokens"] for s in r["per_sample"]) for r in records}
    assert len(records) == 3 and len(answers) == 1 and len(tokens) == 1


# ------------------------------------------------------------------------------------------------ resuming


def test_an_interrupted_run_resumes_without_redoing_finished_cells(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    config = small_config(tmp_path, prose_file)
    first: list[str] = []

    def interrupt_after_four(record):
        first.append(record["key"])
        if len(first) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(config, model, tokenizer, on_cell=interrupt_after_four)
    saved = read_results(tmp_path / RESULTS_FILE)
    assert [r["key"] for r in saved] == first
    with open(tmp_path / RESULTS_FILE, "a") as fh:  # a write torn by the interruption
        fh.write('{"key": "torn-li')

    second: list[str] = []
    result = run_bench(config, model, tokenizer, on_cell=lambda r: second.append(r["key"]))
    total = len(plan_cells(config))
    assert result.skipped == 4 and result.ran == total - 4
    assert not set(first) & set(second) and len(set(first) | set(second)) == total
    again = read_results(tmp_path / RESULTS_FILE)
    assert again[:4] == saved  # finished cells untouched
    assert len({r["key"] for r in again}) == total

    third = run_bench(config, model, tokenizer, on_cell=lambda r: pytest.fail("nothing left to run"))
    assert third.ran == 0 and third.skipped == total


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import kvstack.bench.measure as measure
import kvstack.bench.runner as runner
from test_bench_helpers import tiny_llama, word_tokenizer
from test_bench_run import small_config

tokenizer = word_tokenizer({prose!r})
model = tiny_llama(len(tokenizer))
finished = []
generation_sample = measure._generation_sample

def killed_inside_the_third_cell(*args, **kwargs):
    if len(finished) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no exception: the process is gone mid-cell
    return generation_sample(*args, **kwargs)

measure._generation_sample = killed_inside_the_third_cell
runner.run_bench(small_config(runner.Path({out!r}), {prose!r}), model, tokenizer, on_cell=finished.append)
"""


def test_a_killed_run_keeps_its_finished_cells_and_resumes(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    import signal
    import subprocess
    import sys

    script = KILLED_RUN.format(tests=str(Path(__file__).parent), prose=prose_file, out=str(tmp_path))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = read_results(tmp_path / RESULTS_FILE)
    assert len(saved) == 2
    config = small_config(tmp_path, prose_file)
    result = run_bench(config, model, tokenizer)
    total = len(plan_cells(config))
    assert result.skipped == 2 and result.ran == total - 2
    assert read_results(tmp_path / RESULTS_FILE)[:2] == saved


def test_more_samples_extend_finished_cells_and_match_a_fresh_run(tmp_path, model, tokenizer, prose_file,  # noqa: F811
                                                                  monkeypatch):
    import kvstack.bench.runner as runner

    extend = {"methods": ["snapkv(ratio={ratio})"], "tasks": ["passkey", "perplexity"], "lengths": [160]}
    run_bench(small_config(tmp_path / "grown", prose_file, samples=2, **extend), model, tokenizer)
    measured: list[int] = []
    original = runner.run_cell

    def counting(model, tokenizer, cell, samples, config, model_name):
        measured.append(len(samples))
        return original(model, tokenizer, cell, samples, config, model_name)

    monkeypatch.setattr(runner, "run_cell", counting)
    grown = run_bench(small_config(tmp_path / "grown", prose_file, samples=3, **extend), model, tokenizer)
    assert grown.ran == 4 and measured == [1, 1, 1, 1]  # only sample 2 of each cell ran
    fresh = run_bench(small_config(tmp_path / "fresh", prose_file, samples=3, **extend), model, tokenizer)
    assert len(grown.records) == len(fresh.records) == 4  # the 2-sample records are superseded, not reported
    by_key = {r["key"]: r for r in fresh.records}
    for record in grown.records:
        expected = by_key[record["key"]]
        assert record["samples"] == 3 and record["extended_from"]["samples"] == 2
        assert [s["index"] for s in record["per_sample"]] == [0, 1, 2]
        predictions = [s.get("prediction") for s in record["per_sample"]]
        assert predictions == [s.get("prediction") for s in expected["per_sample"]]
        for name in ("score", "score_std", "kv_bytes", "full_kv_bytes", "compression_ratio", "tokens_kept",
                     "kv_bytes_prefill", "compression_ratio_prefill", "prompt_tokens", "new_tokens"):
            assert same_value(record[name], expected[name], rel=1e-9), name
    assert all(r["samples"] == 3 for r in latest_results(tmp_path / "grown" / RESULTS_FILE))


SHARED_METHODS = ["snapkv(ratio={ratio})", "keynorm(ratio={ratio})", "random(ratio={ratio})", "h2o(ratio={ratio})"]
COMPARED = ("score", "score_std", "kv_bytes", "full_kv_bytes", "compression_ratio", "tokens_kept",
            "kv_bytes_prefill", "compression_ratio_prefill", "prompt_tokens", "new_tokens", "samples")


def test_a_shared_prefill_gives_exactly_the_records_of_separate_runs(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    # Ada-KV over H2O compresses once with H2O's accumulated scores: its two ratios share their own forward
    values = {"methods": [*SHARED_METHODS, "adakv(h2o(ratio={ratio}))"], "ratios": [0.25, 0.5],
              "tasks": ["passkey", "perplexity"], "lengths": [160]}
    separate = run_bench(small_config(tmp_path / "separate", prose_file, **values), model, tokenizer)
    shared = run_bench(small_config(tmp_path / "shared", prose_file, share_prefill=True, **values), model, tokenizer)
    assert shared.ran == separate.ran == 22
    by_key = {r["key"]: r for r in separate.records}
    for record in shared.records:
        expected = by_key[record["key"]]  # the same cell keys: sharing is not part of a cell's configuration
        for name in COMPARED:
            assert record[name] == expected[name], (record["method"], name)
        for ours, theirs in zip(record["per_sample"], expected["per_sample"], strict=True):
            for name in ("score", "prediction", "new_tokens", "nll_sum", "kv_bytes"):
                assert ours.get(name) == theirs.get(name), (record["method"], name)
        assert expected["prefill_shared_by"] == 1
        assert record["prefill_shared_by"] == (2 if "h2o" in record["method"] else 7), record["method"]


def test_methods_that_evict_as_they_read_share_chunks_and_give_the_records_of_separate_runs(
        tmp_path, model, tokenizer, prose_file):  # noqa: F811
    # 1100 tokens: chunks of 512, 512 and 76; ratio 0.75 (budget 275) evicts after the first, ratio 0.25
    # (825) and a budget of 900 after the second. H2O and Scissorhands share chunks (column statistics, one
    # pass), StreamingLLM and TOVA another group (the last query's weights); the two groups do not mix.
    values = {"methods": ["h2o(ratio={ratio})", "h2o(budget=900)", "scissorhands(ratio={ratio})",
                          "streamingllm(ratio={ratio})", "tova(ratio={ratio})"],
              "ratios": [0.25, 0.75], "tasks": ["passkey", "perplexity"], "lengths": [1100], "samples": 2}
    separate = run_bench(small_config(tmp_path / "separate", prose_file, **values), model, tokenizer)
    shared = run_bench(small_config(tmp_path / "shared", prose_file, share_prefill=True, **values), model, tokenizer)
    by_key = {r["key"]: r for r in separate.records}
    expected_chunks = {"h2o(ratio=0.75)": 1, "h2o(ratio=0.25)": 2, "h2o(budget=900)": 2,
                       "scissorhands(ratio=0.75)": 1, "scissorhands(ratio=0.25)": 2,
                       "streamingllm(ratio=0.75)": 1, "streamingllm(ratio=0.25)": 2,
                       "tova(ratio=0.75)": 1, "tova(ratio=0.25)": 2}
    for record in shared.records:
        expected = by_key[record["key"]]
        for name in COMPARED:
            assert record[name] == expected[name], (record["method"], name)
        for ours, theirs in zip(record["per_sample"], expected["per_sample"], strict=True):
            for name in ("score", "prediction", "new_tokens", "nll_sum", "kv_bytes"):
                assert ours.get(name) == theirs.get(name), (record["method"], name)
        if record["method"] == "full":
            assert record["prefill_shared_by"] == 1
            continue
        column_statistics = record["method"].startswith(("h2o", "scissorhands"))
        assert record["prefill_shared_by"] == (5 if column_statistics else 4), record["method"]
        if record["task"] == "passkey":  # perplexity reads half the text as its prompt: 550 tokens, 2 chunks
            assert {row["prompt_chunks_shared"] for row in record["per_sample"]} == {expected_chunks[record["method"]]}


def test_a_shared_prefill_extends_finished_cells_with_only_the_missing_samples(
        tmp_path, model, tokenizer, prose_file, monkeypatch):  # noqa: F811
    import kvstack.bench.runner as runner

    values = {"methods": SHARED_METHODS[:2], "tasks": ["passkey"], "lengths": [160], "share_prefill": True}
    run_bench(small_config(tmp_path / "grown", prose_file, samples=1, **values), model, tokenizer)
    measured: list[tuple[int, int]] = []
    original = runner.run_cells_shared

    def counting(model, tokenizer, cells, samples, *args, **kwargs):
        measured.append((len(cells), len(samples)))
        return original(model, tokenizer, cells, samples, *args, **kwargs)

    monkeypatch.setattr(runner, "run_cells_shared", counting)
    grown = run_bench(small_config(tmp_path / "grown", prose_file, samples=2, **values), model, tokenizer)
    assert grown.ran == 3 and measured == [(3, 1)]  # full, snapkv, keynorm together, only sample 1
    fresh = run_bench(small_config(tmp_path / "fresh", prose_file, samples=2, **values), model, tokenizer)
    by_key = {r["key"]: r for r in fresh.records}
    for record in grown.records:
        assert record["extended_from"]["samples"] == 1
        for name in COMPARED:
            assert same_value(record[name], by_key[record["key"]][name], rel=1e-12), name


def test_a_callback_that_stops_the_run_loses_no_cell_of_a_shared_prefill(tmp_path, model, tokenizer,  # noqa: F811
                                                                          prose_file):  # noqa: F811
    config = small_config(tmp_path, prose_file, methods=SHARED_METHODS, tasks=["passkey"], lengths=[160],
                          share_prefill=True)

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(config, model, tokenizer, on_cell=stop)
    saved = read_results(tmp_path / RESULTS_FILE)
    assert len(saved) == 4 and {r["prefill_shared_by"] for r in saved} == {4}  # the whole shared batch


CHECKPOINTED = {"methods": ["snapkv(ratio={ratio})", "keynorm(ratio={ratio})", "h2o(ratio={ratio})"],
                "tasks": ["passkey", "perplexity"], "lengths": [160], "samples": 5}
PER_SAMPLE = ("score", "prediction", "new_tokens", "nll_sum", "kv_bytes", "index")


def _same_records(ours: list[dict], theirs: list[dict]) -> None:
    by_key = {r["key"]: r for r in theirs}
    assert sorted(by_key) == sorted(r["key"] for r in ours)
    for record in ours:
        expected = by_key[record["key"]]
        for name in COMPARED:
            assert same_value(record[name], expected[name], rel=1e-12), (record["method"], name)
        for mine, other in zip(record["per_sample"], expected["per_sample"], strict=True):
            for name in PER_SAMPLE:
                assert mine.get(name) == other.get(name), (record["method"], name)


@pytest.mark.parametrize("share", [False, True])
def test_a_run_stopped_between_checkpoints_resumes_from_them_and_matches_an_uninterrupted_run(
        tmp_path, model, tokenizer, prose_file, monkeypatch, share):  # noqa: F811
    import kvstack.bench.measure as measure

    values = {**CHECKPOINTED, "share_prefill": share}
    fresh = run_bench(small_config(tmp_path / "fresh", prose_file, **values), model, tokenizer)
    config = small_config(tmp_path / "stopped", prose_file, checkpoint_every=2, **values)
    checkpoints: list[list[dict]] = []

    def stop_at_the_second_checkpoint(records):
        checkpoints.append(records)
        if len(checkpoints) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(config, model, tokenizer, on_checkpoint=stop_at_the_second_checkpoint)
    # 2 of 5 samples of the first batch, then 4 of 5: the checkpoint file holds the latest, once per cell
    assert [{r["samples"] for r in batch} for batch in checkpoints] == [{2}, {4}]
    saved = read_results(tmp_path / "stopped" / CHECKPOINT_FILE)
    assert sorted(r["key"] for r in saved) == sorted(r["key"] for r in checkpoints[1])
    assert all(r["checkpoint"] and r["config"]["samples"] == 4 for r in saved)
    assert [s["index"] for s in saved[0]["per_sample"]] == [0, 1, 2, 3]
    assert not read_results(tmp_path / "stopped" / RESULTS_FILE)  # no cell is finished, none is reported

    measured: list[int] = []
    original = measure._generation_sample

    def counting(*args, **kwargs):
        measured.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(measure, "_generation_sample", counting)
    resumed = run_bench(config, model, tokenizer)
    cells_in_first_batch = len(checkpoints[1])
    passkey_cells = sum(1 for r in fresh.records if r["task"] == "passkey")
    # the stopped batch ran only its last sample; every other passkey cell all five
    assert len(measured) == cells_in_first_batch * 1 + (passkey_cells - cells_in_first_batch) * 5
    assert resumed.ran == len(fresh.records)
    _same_records(resumed.records, fresh.records)
    stopped_batch = {(r["method"], r["task"]) for r in checkpoints[1]}
    for record in resumed.records:
        assert "checkpoint" not in record and "extended_from" not in record
        assert ("resumed_from_checkpoint" in record) == ((record["method"], record["task"]) in stopped_batch)
    assert not read_results(tmp_path / "stopped" / CHECKPOINT_FILE)  # finished cells leave no checkpoint


def test_checkpoints_of_a_killed_run_survive_and_extend_a_finished_record(tmp_path, model, tokenizer,  # noqa: F811
                                                                          prose_file):  # noqa: F811
    values = {**CHECKPOINTED, "tasks": ["passkey"], "share_prefill": True}
    run_bench(small_config(tmp_path / "grown", prose_file, **{**values, "samples": 1}), model, tokenizer)
    config = small_config(tmp_path / "grown", prose_file, checkpoint_every=2, **values)

    def die(records):
        raise SystemExit(9)  # anything that ends the run after a checkpoint

    with pytest.raises(SystemExit):
        run_bench(config, model, tokenizer, on_checkpoint=die)
    saved = read_results(tmp_path / "grown" / CHECKPOINT_FILE)
    assert {r["samples"] for r in saved} == {3}  # the 1-sample records, extended by 2
    assert all(r["extended_from"]["samples"] == 1 for r in saved)
    grown = run_bench(config, model, tokenizer)
    fresh = run_bench(small_config(tmp_path / "fresh", prose_file, **values), model, tokenizer)
    _same_records(grown.records, fresh.records)
    stopped_batch = {r["method"] for r in saved}
    assert stopped_batch and len(stopped_batch) < len(grown.records)
    for record in grown.records:  # the origin is the finished 1-sample record, not the checkpoint
        assert record["extended_from"]["samples"] == 1
        resumed = record.get("resumed_from_checkpoint")
        assert ([r["samples"] for r in resumed] if resumed else None) == (
            [3] if record["method"] in stopped_batch else None)


def test_a_cell_stopped_twice_names_both_checkpoints_it_resumed_from(tmp_path, model, tokenizer,  # noqa: F811
                                                                     prose_file):  # noqa: F811
    values = {**CHECKPOINTED, "methods": ["snapkv(ratio={ratio})"], "tasks": ["passkey"], "baseline": False}
    config = small_config(tmp_path, prose_file, checkpoint_every=2, **values)

    def stop(records):
        raise KeyboardInterrupt

    for _ in range(2):  # stopped at 2 samples, then (resumed) at 4
        with pytest.raises(KeyboardInterrupt):
            run_bench(config, model, tokenizer, on_checkpoint=stop)
    (record,) = run_bench(config, model, tokenizer).records
    assert record["samples"] == 5 and [r["samples"] for r in record["resumed_from_checkpoint"]] == [2, 4]


def test_checkpoints_of_other_settings_and_bad_values_are_left_alone(tmp_path, model, tokenizer,  # noqa: F811
                                                                     prose_file):  # noqa: F811
    values = {**CHECKPOINTED, "methods": ["snapkv(ratio={ratio})"], "tasks": ["passkey"]}
    config = small_config(tmp_path, prose_file, checkpoint_every=2, seed=1, **values)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config, model, tokenizer, on_checkpoint=lambda records: (_ for _ in ()).throw(KeyboardInterrupt))
    other_seed = read_results(tmp_path / CHECKPOINT_FILE)
    result = run_bench(small_config(tmp_path, prose_file, checkpoint_every=2, **values), model, tokenizer)
    assert all(r["samples"] == 5 and "resumed_from_checkpoint" not in r for r in result.records)
    assert read_results(tmp_path / CHECKPOINT_FILE) == other_seed  # seed 1's progress is kept for its own run
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BenchError, match="checkpoint_every must be a positive integer"):
            run_bench(small_config(tmp_path, prose_file, checkpoint_every=bad, **values), model, tokenizer)


def test_append_result_removes_a_torn_last_line_before_writing(tmp_path, capsys):
    path = tmp_path / RESULTS_FILE
    path.write_text('{"key": "a"}\n{"key": "b", "trunc')
    append_result(path, {"key": "c"})
    assert path.read_text() == '{"key": "a"}\n{"key": "c"}\n'
    assert "removing a torn last line" in capsys.readouterr().err
    whole_torn = tmp_path / "torn-only.jsonl"
    whole_torn.write_text('{"key": "b", "trunc')
    append_result(whole_torn, {"key": "c"})
    assert whole_torn.read_text() == '{"key": "c"}\n'


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / RESULTS_FILE
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "trunc')
    assert [r["key"] for r in read_results(path)] == ["a", "b"]
    assert f"{path}:3: skipping a torn last line" in capsys.readouterr().err


@pytest.mark.parametrize("damaged", ['{"key": "b", "trunc', '{"key": "b"} garbage', '["no", "key"]', '{"cell": 1}'])
def test_a_damaged_line_before_the_last_is_an_error_naming_the_file_and_line(tmp_path, damaged):
    path = tmp_path / RESULTS_FILE
    path.write_text(f'{{"key": "a"}}\n{damaged}\n{{"key": "c"}}\n')
    with pytest.raises(BenchError, match=rf"{re.escape(str(path))}:2: "):
        read_results(path)


def test_latest_results_keep_the_last_record_of_each_cell(tmp_path):
    path = tmp_path / RESULTS_FILE
    for record in ({"key": "a", "score": 1}, {"key": "b", "score": 2}, {"key": "a", "score": 3}):
        append_result(path, record)
    assert latest_results(path) == [{"key": "a", "score": 3}, {"key": "b", "score": 2}]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def tiny_loader(monkeypatch, model, tokenizer):  # noqa: F811
    calls = []

    def load(name, device=None):
        calls.append(name)
        return model, tokenizer

    monkeypatch.setattr(kvstack.models, "load_model", load)
    return calls


def bench_args(out: Path, prose: str, *extra: str) -> list[str]:
    return ["bench", "--model", "tiny", "--tasks", "passkey", "--lengths", "160", "--samples", "1",
            "--methods", "snapkv(ratio={ratio})", "--ratios", "0.5", "--max-new-tokens", "4", "--out", str(out),
            "--prose-file", prose, "--no-progress", "--no-plots", *extra]


def test_cli_bench_runs_end_to_end_and_resumes(tmp_path, tiny_loader, prose_file, capsys):  # noqa: F811
    assert cli.main(bench_args(tmp_path, prose_file)) == 0
    out = capsys.readouterr().out
    assert "2 cells run, 0 already done" in out and tiny_loader == ["tiny"]
    assert cli.main(bench_args(tmp_path, prose_file)) == 0
    assert "0 cells run, 2 already done" in capsys.readouterr().out
    assert tiny_loader == ["tiny"]  # nothing left to run: the model is not even loaded
    assert cli.main(["bench", "--out", str(tmp_path), "--report-only", "--no-plots"]) == 0
    assert cli.main(["bench", "--list-tasks"]) == 0
    listing = capsys.readouterr().out
    assert "passkey" in listing and "niah_multikey_uuid" in listing


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "passkey,nope"], "unknown task 'nope'"),
        (["--samples", "0"], "samples must be a positive integer"),
        (["--lengths", "100000"], "beyond the model's context of 2048 tokens"),
        (["--lengths", "12"], "shorter than its smallest prompt"),
        (["--ratios", "1.5"], r"ratios are fractions evicted, in \[0, 1\)"),
        (["--methods", "snapkv(ratio=0.5"], "cannot parse"),
        (["--query-mode", "before"], "unknown mode 'before'"),
        (["--device", "gpu"], "invalid device 'gpu'; use 'cpu'"),
        (["--device", "cuda:99"], r"CUDA is not available on this machine|has \d+ CUDA device\(s\)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(tmp_path, tiny_loader, prose_file, capsys, extra, message):  # noqa: F811
    assert cli.main(bench_args(tmp_path, prose_file)) == 0
    before = (tmp_path / RESULTS_FILE).read_bytes()
    capsys.readouterr()
    assert cli.main(bench_args(tmp_path, prose_file, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvstack: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert (tmp_path / RESULTS_FILE).read_bytes() == before


def test_an_unwritable_output_directory_is_refused_before_loading(tmp_path, monkeypatch, prose_file, capsys):  # noqa: F811
    monkeypatch.setattr(kvstack.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    assert cli.main(bench_args(blocker / "out", prose_file)) == 2
    err = capsys.readouterr().err
    assert "cannot write to output directory" in err and "--out" in err


def test_errors_before_loading_do_not_load_the_model(tmp_path, monkeypatch, prose_file, capsys):  # noqa: F811
    monkeypatch.setattr(kvstack.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert cli.main(bench_args(tmp_path, prose_file, "--tasks", "bogus")) == 2
    assert cli.main(bench_args(tmp_path, prose_file, "--samples", "0")) == 2
    assert cli.main(bench_args(tmp_path, prose_file, "--device", "gpu")) == 2
    assert "valid tasks" in capsys.readouterr().err


def test_python_api_refuses_zero_samples_and_a_model_without_tokenizer(tmp_path, model, prose_file):  # noqa: F811
    with pytest.raises(BenchError, match="samples must be a positive integer"):
        run_bench(small_config(tmp_path, prose_file, samples=0), model, None)
    with pytest.raises(BenchError, match="without its tokenizer"):
        run_bench(small_config(tmp_path, prose_file), model, None)


def test_quick_config_is_small_and_overridable():
    quick = BenchConfig.quick(samples=1)
    assert quick.samples == 1 and "passkey" in quick.tasks and "perplexity" in quick.tasks
    assert {"full", "snapkv(ratio={ratio})", "h2o(ratio={ratio})", "streamingllm(ratio={ratio})"} <= set(quick.methods)
    assert quick.ratios == [0.5]


# ------------------------------------------------------------------------------------------------ metrics


def test_peak_memory_covers_only_the_block():
    big = torch.ones(40_000_000)  # 160 MB, freed before the block: must not count inside it
    del big
    with PeakMemory() as outside:
        pass
    with PeakMemory() as inside:
        block = torch.ones(40_000_000)
        block += 1
        del block
    assert inside.method in ("vmhwm-reset", "sampled-2ms", "ru_maxrss-lifetime")
    if inside.method == "vmhwm-reset":
        assert inside.peak_rss - inside.base_rss > 120e6
        assert outside.peak_rss - outside.base_rss < 60e6


def test_report_only_without_results_is_an_error(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path), "--report-only"]) == 2
    assert "no results" in capsys.readouterr().err


def test_results_jsonl_lines_are_plain_json(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    run_bench(small_config(tmp_path, prose_file, tasks=["perplexity"], lengths=[128]), model, tokenizer)
    lines = (tmp_path / RESULTS_FILE).read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        record = json.loads(line)
        chunk = 8 if record["dynamic"] else 64  # methods that evict as the text streams: ppl_stream_chunk
        assert record["config"]["ppl_chunk"] == chunk and record["task"] == "perplexity"


def test_the_streaming_chunk_applies_to_methods_that_evict_as_the_text_streams(tmp_path, prose_file):  # noqa: F811
    def keys(**overrides):
        cells = plan_cells(small_config(tmp_path, prose_file, tasks=["perplexity"], **overrides))
        return {cell.method.label: cell.key for cell in cells}

    base, other_chunk, other_stream = keys(), keys(ppl_chunk=32), keys(ppl_stream_chunk=1)
    dynamic = "streamingllm(ratio=0.5)"
    assert other_chunk[dynamic] == base[dynamic] != other_stream[dynamic]
    for static in ("full", "snapkv(ratio=0.5)"):
        assert other_stream[static] == base[static] != other_chunk[static]
    with pytest.raises(BenchError, match="ppl_stream_chunk must be a positive integer"):
        run_bench(small_config(tmp_path, prose_file, ppl_stream_chunk=0), None, None)


@pytest.mark.parametrize("chunk", [7, 64])
def test_the_full_cache_streamed_perplexity_is_the_model_s_own(tmp_path, model, tokenizer, prose_file, chunk):  # noqa: F811
    """Expected: one plain forward over the whole excerpt, no kvstack cache, scored on its second half."""
    from kvstack.bench.runner import _make_sample

    config = small_config(tmp_path, prose_file, methods=["full"], tasks=["perplexity"], lengths=[160], ppl_chunk=chunk)
    (record,) = run_bench(config, model, tokenizer).records
    (cell,) = plan_cells(config)
    nll, scored = 0.0, 0
    for index, row in enumerate(record["per_sample"]):
        ids = torch.tensor([_make_sample(cell, tokenizer, config, index).input_ids])
        context = row["context_tokens"]
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, context - 1:-1].float()
        expected = torch.nn.functional.cross_entropy(logits, ids[0, context:], reduction="sum").item()
        assert row["nll_sum"] == pytest.approx(expected, rel=1e-4)
        nll, scored = nll + expected, scored + ids.shape[1] - context
    assert record["score"] == pytest.approx(math.exp(nll / scored), rel=1e-4)


def test_another_model_is_not_labelled_as_the_default_one(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    with pytest.raises(BenchError, match=r"names the default model \(smollm2-135m\).*num_hidden_layers="):
        run_bench(small_config(tmp_path, prose_file, model="SmolLM2-135M-Instruct"), model, tokenizer)
    assert not (tmp_path / RESULTS_FILE).exists()


def test_a_tiny_context_model_is_refused_beyond_its_context(tmp_path, tokenizer, prose_file):  # noqa: F811
    short = tiny_llama(len(tokenizer), max_context=256)
    # prompts are sized within 2%: 247 may become 251 tokens, and 251 + 6 generated exceed 256
    with pytest.raises(BenchError, match="beyond the model's context of 256 tokens; use lengths <= 246"):
        run_bench(small_config(tmp_path, prose_file, tasks=["passkey"], lengths=[300]), short, tokenizer)
    with pytest.raises(BenchError, match="up to 251 tokens"):
        run_bench(small_config(tmp_path, prose_file, tasks=["passkey"], lengths=[247]), short, tokenizer)
    assert not (tmp_path / RESULTS_FILE).exists()
    result = run_bench(small_config(tmp_path, prose_file, tasks=["passkey"], lengths=[246], samples=1,
                                    methods=["full"]), short, tokenizer)
    (record,) = result.records
    assert all(row["tokens"] + row["new_tokens"] <= 256 for row in record["per_sample"])


def test_decoding_stops_only_once_the_substring_score_cannot_change():
    from kvstack.bench.runner import score_settled

    assert score_settled("string_match_all", "The keys are 12 and 7", ["12", "7"])
    assert not score_settled("string_match_all", "The keys are 12 and", ["12", "7"])  # 7 may still come
    assert score_settled("string_match_part", "maybe 7", ["12", "7"])
    assert not score_settled("string_match_part", "maybe", ["12", "7"])
    assert not score_settled("perplexity", "anything", ["x"])  # teacher-forced cells never decode
    # Appending text never lowers a settled score: every extension still contains the references.
    assert score_settled("string_match_all", "The keys are 12 and 7, then more text", ["12", "7"])


# ------------------------------------------------------------------------------------------------ what reports show


def _record(key: str, method: str, seed: int, finished_at: str, length: int = 160) -> dict:
    return {"key": key, "model": "tiny", "method": method, "task": "passkey", "variant": "", "length": length,
            "query_mode": "after", "seed": seed, "finished_at": finished_at}


def test_reports_show_one_measurement_per_cell_preferring_the_run_s_own():
    from kvstack.bench import reported_results

    records = [_record("a0", "full", 0, "2026-01-02"), _record("b0", "snapkv", 0, "2026-01-01"),
               _record("a1", "full", 1, "2026-01-01"), _record("c0", "full", 0, "2026-01-01", length=320)]
    shown, left_out = reported_results(records)  # no preference: the one finished last
    assert [r["key"] for r in shown] == ["a0", "b0", "c0"] and [r["key"] for r in left_out] == ["a1"]
    shown, left_out = reported_results(records, prefer={"a1"})
    assert [r["key"] for r in shown] == ["b0", "a1", "c0"] and [r["key"] for r in left_out] == ["a0"]


def test_a_second_seed_in_the_same_directory_is_reported_alone(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    settings = dict(tasks=["passkey"], lengths=[160], samples=1, methods=["snapkv(ratio={ratio})"])
    first = run_bench(small_config(tmp_path, prose_file, **settings), model, tokenizer)
    second = run_bench(small_config(tmp_path, prose_file, seed=1, **settings), model, tokenizer)
    assert first.left_out == 0 and second.left_out == 2 and len(read_results(tmp_path / RESULTS_FILE)) == 4
    assert {r["seed"] for r in second.records} == {1} and len(second.records) == 2
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert sorted(row["key"] for row in rows) == sorted(r["key"] for r in second.records)
    markdown = (tmp_path / "results.md").read_text()
    assert "2 other records in results.jsonl" in markdown
    full = next(r for r in second.records if r["method"] == "full")
    assert f"| `full` | {full['compression_ratio']:.2f} | {full['score']:.2f} |" in markdown  # not a mean of seeds
    # the first seed again: its own records are reported, nothing is re-run
    again = run_bench(small_config(tmp_path, prose_file, **settings), model, tokenizer)
    assert again.ran == 0 and {r["seed"] for r in again.records} == {0} and again.left_out == 2


# ------------------------------------------------------------------------------------------------ keys


def test_the_device_is_part_of_a_cell_key_and_cpu_keys_are_unchanged(tmp_path, prose_file):  # noqa: F811
    from kvstack.bench.runner import cell_key

    config = small_config(tmp_path, prose_file, tasks=["passkey"], lengths=[160])
    cpu = plan_cells(config, device="cpu")
    cuda = plan_cells(config, device=torch.device("cuda", 1))
    assert all("device" not in cell.config for cell in cpu)
    assert all(cell.config["device"] == "cuda" for cell in cuda)
    assert all(c.key != g.key and cell_key({k: v for k, v in g.config.items() if k != "device"}) == c.key
               for c, g in zip(cpu, cuda, strict=True))


@pytest.mark.parametrize(("method", "task", "variant", "length"), [
    ("full", "niah_single_noise", "", 1024),
    ("random(ratio=0.75)", "niah", "depth=1.00", 1024),
    ("adakv(h2o(ratio=0.5))", "niah_multikey", "", 2048),
    ("snapkv(ratio=0.5)", "perplexity", "", 2048),
    ("streamingllm(ratio=0.5)", "perplexity", "", 1024),  # the first one: streamed 256 tokens per forward
])
def test_the_committed_reference_cells_keep_their_keys(tmp_path, method, task, variant, length):
    """A change to what a key hashes would silently re-run every committed reference cell."""
    path = Path(__file__).parents[1] / "benchmarks" / "results" / "reference" / "results.jsonl"
    record = next(r for r in read_results(path)
                  if (r["method"], r["task"], r["variant"], r["length"]) == (method, task, variant, length))
    settings = record["config"]
    config = BenchConfig(
        model=settings["model"], methods=[method], tasks=[task], lengths=[length], samples=settings["samples"],
        seed=settings["seed"], depths=None if record["depth"] is None else [record["depth"]],
        ppl_stream_chunk=settings["ppl_chunk"] or 8, out_dir=str(tmp_path), progress=False,
    )
    planned = {(cell.method.label, cell.task.variant): cell.key for cell in plan_cells(config, device="cpu")}
    assert planned[(method, variant)] == record["key"]


def test_a_perplexity_excerpt_may_fill_the_whole_context(tmp_path, tokenizer, prose_file):  # noqa: F811
    short = tiny_llama(len(tokenizer), max_context=256)
    result = run_bench(small_config(tmp_path, prose_file, tasks=["perplexity"], lengths=[256], samples=1,
                                    methods=["full"]), short, tokenizer)
    (record,) = result.records
    assert record["prompt_tokens"] == 256 and math.isfinite(record["score"])
    with pytest.raises(BenchError, match="a passkey prompt of up to 261 tokens, sized within 2%"):
        run_bench(small_config(tmp_path, prose_file, tasks=["passkey"], lengths=[256]), short, tokenizer)


# ------------------------------------------------------------------------------------------------ task plugins

TASK_MODULE = '''
from kvstack.bench.tasks import Parts, Task, noise_words, place, register_task


@register_task
class {cls}(Task):
    name = "{name}"
    description = "which colour was named"
    scorer = "string_match_part"
    max_new_tokens = 4

    def build(self, rng, size, length):
        colour = rng.choice(["red", "blue", "green"])
        context = place(noise_words(size), [(rng.random(), f"The colour we want is {{colour}}.")])
        return Parts("Read the text.", context, "Which colour do we want?", [colour], "The colour is")
'''


@pytest.fixture
def fresh_task_registry(monkeypatch):
    from kvstack.bench import tasks

    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    monkeypatch.setattr(tasks, "_loaded_entry_points", set())
    return tasks


def test_cli_runs_a_task_from_a_task_module(tmp_path, tiny_loader, prose_file, capsys, fresh_task_registry):  # noqa: F811
    module = tmp_path / "colour_tasks.py"
    module.write_text(TASK_MODULE.format(cls="Colour", name="colour"))
    assert cli.main(["bench", "--task-module", str(module), "--list-tasks"]) == 0
    assert re.search(r"^colour +which colour was named  \[string_match_part\]$", capsys.readouterr().out, re.M)
    args = bench_args(tmp_path / "out", prose_file, "--task-module", str(module))
    args[args.index("--tasks") + 1] = "colour,passkey"
    assert cli.main(args) == 0
    assert "4 cells run, 0 already done" in capsys.readouterr().out
    assert {r["task"] for r in read_results(tmp_path / "out" / RESULTS_FILE)} == {"colour", "passkey"}


def test_a_task_module_that_cannot_be_imported_is_a_one_line_usage_error(tmp_path, capsys, fresh_task_registry):
    broken = tmp_path / "broken_tasks.py"
    broken.write_text("raise RuntimeError('no colours today')\n")
    for module, message in [(str(broken), "failed to import: RuntimeError: no colours today"),
                            (str(tmp_path / "missing.py"), "no such file"),
                            ("no_such_package.tasks", "failed to import: ModuleNotFoundError")]:
        assert cli.main(["bench", "--task-module", module, "--list-tasks"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_installed_package_s_tasks_load_from_their_entry_point(tmp_path, monkeypatch, fresh_task_registry):
    (tmp_path / "shade_pkg.py").write_text(TASK_MODULE.format(cls="Shade", name="shade"))
    info = tmp_path / "shade_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shade-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kvstack.tasks]\nshade = shade_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shade_pkg", raising=False)
    tasks = fresh_task_registry
    assert "shade" not in tasks.TASKS
    (task,) = tasks.make_tasks(["shade"])  # an unknown name loads the plugins, then resolves
    assert task.name == "shade" and tasks.load_task_plugins() == []  # each entry point loads once


def test_a_cell_whose_head_map_changed_is_measured_again(tmp_path, model, tokenizer, prose_file):  # noqa: F811
    """A record names the calibration files its caches were built from by their sha256; resuming measures the
    cell again when one now holds other bytes (the old record moved to stale.jsonl), and leaves it when the
    file is unchanged or gone (nothing to compare with)."""
    import hashlib

    from kvstack.bench.results import STALE_FILE
    from kvstack.calibration import model_key
    from kvstack.calibration.head_map import HEADS_FORMAT

    heads = tmp_path / "heads.json"

    def write_heads(whole: int) -> str:
        scores = [[0.0, 0.0], [0.0, 0.0]]
        scores[0][whole] = 1.0  # duo(heads=0.25) keeps this head of layer 0 whole
        heads.write_text(json.dumps({"format": HEADS_FORMAT, "version": 1, "model_key": model_key(model),
                                     "scores": scores}))
        return hashlib.sha256(heads.read_bytes()).hexdigest()

    first = write_heads(0)
    spec = f"duo(heads=0.25, sinks=2, recent=8, artefact={str(heads)!r})"
    config = small_config(tmp_path / "out", prose_file, methods=[spec], tasks=["passkey"], lengths=[160])
    assert run_bench(config, model, tokenizer).ran == 2
    records = {r["method"]: r for r in read_results(tmp_path / "out" / RESULTS_FILE)}
    assert records[spec]["artefacts"] == {str(heads.resolve()): first} and "artefacts" not in records["full"]
    assert run_bench(config, model, tokenizer).ran == 0

    second = write_heads(1)
    again = run_bench(config, model, tokenizer)
    assert (again.ran, again.skipped, again.changed_artefacts) == (1, 1, [str(heads.resolve())])
    records = read_results(tmp_path / "out" / RESULTS_FILE)
    assert sorted(r["method"] for r in records) == sorted([spec, "full"])
    assert [r["artefacts"] for r in records if r["method"] == spec] == [{str(heads.resolve()): second}]
    assert [r["artefacts"] for r in read_results(tmp_path / "out" / STALE_FILE)] == [{str(heads.resolve()): first}]

    heads.unlink()
    assert run_bench(config, model, tokenizer).ran == 0
