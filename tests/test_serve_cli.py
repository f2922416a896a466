"""``kvstack serve``: usage errors before the model loads, and the wiring of every flag into the engine and the
app (uvicorn replaced by an in-process client). tests/test_cli.py checks its parser imports nothing heavy."""

from __future__ import annotations

import pytest
from conftest import usage_error
from starlette.testclient import TestClient
from test_serve_support import BLOCK_SIZE, build_model, ids_of, mb, reference_tokens, word_tokenizer

import kvstack.engine
import kvstack.models
from kvstack import cli


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for this error")

    monkeypatch.setattr(kvstack.models, "load_model", refuse)


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--memory-mb", "0"], "--memory-mb must be > 0"),
    (["--block-size", "0"], "--block-size must be >= 1"),
    (["--max-queue", "0"], "--max-queue must be >= 1"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1"),
    (["--max-tokens-limit", "-3"], "--max-tokens-limit must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--host-mb", "-1"], "--host-mb must be >= 0"),
    (["--api-key", " "], "--api-key is empty"),
    (["--served-model-name", ""], "--served-model-name is empty"),
    (["--policy", "random"], "unknown --policy 'random'"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_arguments_are_one_line_usage_errors_before_the_model_loads(capsys, no_model, argv, message):
    assert message in usage_error(capsys, ["serve", *argv])


def test_the_api_key_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("KVSTACK_API_KEY", "from-env")
    assert cli.build_parser().parse_args(["serve"]).api_key == "from-env"
    monkeypatch.delenv("KVSTACK_API_KEY")
    assert cli.build_parser().parse_args(["serve"]).api_key is None


def test_every_flag_reaches_the_engine_and_the_app(monkeypatch, tmp_path, capsys):
    loads, engines, runs = [], [], []

    def load_model(name, device=None):
        loads.append((name, device))
        return build_model(), word_tokenizer()

    class RecordingEngine(kvstack.engine.Engine):
        def __init__(self, model, **options):
            self.options = options
            self.closed = False
            engines.append(self)
            super().__init__(model, **options)

        def close(self):
            self.closed = True
            super().close()

    def run(app, host, port, log_level):  # uvicorn.run, served in process instead
        assert not engines[0].closed
        with TestClient(app) as client:
            key = {"Authorization": "Bearer k3y"}
            runs.append({
                "where": (host, port, log_level),
                "models": client.get("/v1/models", headers=key).json(),
                "no_key": client.get("/v1/models").status_code,
                "too_many_tokens": client.post("/v1/completions", headers=key,
                                               json={"prompt": [5], "max_tokens": 11}).json(),
                "too_long": client.post("/v1/completions", headers=key, json={"prompt": [5] * 21}).json(),
                "ok": client.post("/v1/completions", headers=key, json={"model": "tiny", "prompt": [5, 6, 7],
                                                                        "max_tokens": 10, "temperature": 0}).json(),
                "stop_token_ids": app.state.kvstack.stop_token_ids,
            })

    import uvicorn

    monkeypatch.setattr(kvstack.models, "load_model", load_model)
    monkeypatch.setattr(kvstack.engine, "Engine", RecordingEngine)
    monkeypatch.setattr(uvicorn, "run", run)
    code = cli.main([
        "serve", "--model", "some-model", "--served-model-name", "tiny", "--host", "0.0.0.0", "--port", "0",
        "--memory-mb", str(mb(80)), "--block-size", str(BLOCK_SIZE), "--max-batched-tokens", "32", "--max-seqs", "4",
        "--policy", "lpm", "--host-mb", str(mb(8)), "--disk-dir", str(tmp_path / "tier"), "--max-prompt-tokens",
        "20", "--max-tokens-limit", "10", "--max-queue", "3", "--api-key", "k3y", "--threads", "1", "--device", "cpu",
        "--log-level", "warning",
    ])
    assert code == 0, capsys.readouterr().err
    assert loads == [("some-model", "cpu")]
    [engine] = engines
    assert engine.options == {
        "memory_mb": mb(80), "block_size": BLOCK_SIZE, "max_num_batched_tokens": 32, "max_num_seqs": 4,
        "policy": "lpm", "enable_prefix_caching": True, "host_mb": mb(8), "disk_dir": str(tmp_path / "tier"),
        "tokenizer": engine.options["tokenizer"], "threads": 1,
    }
    assert engine.pool.num_blocks == 80 and engine.closed  # closed once the server stopped
    [result] = runs
    assert result["where"] == ("0.0.0.0", 0, "warning")
    assert [card["id"] for card in result["models"]["data"]] == ["tiny"]
    assert result["no_key"] == 401
    assert "limit of 10" in result["too_many_tokens"]["error"]["message"]
    assert result["too_long"]["error"]["code"] == "context_length_exceeded"
    # the tiny model's generation config names token 2 as EOS (its word tokenizer has none)
    assert result["stop_token_ids"] == (2,)
    expected = reference_tokens([[5, 6, 7]], 10, stop_token_ids=(2,))[0]
    assert ids_of(result["ok"]["choices"][0]["text"]) == expected
    assert "'tiny' at http://0.0.0.0:0/v1 (80 KV blocks" in capsys.readouterr().err
