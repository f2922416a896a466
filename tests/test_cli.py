"""The ``kvstack`` command line, in process: usage errors exit 2 with one line and no traceback.

The real model is never loaded: ``kvstack.models.load_model`` is replaced either by a function that
fails the test (errors that must happen before loading) or by one returning a tiny random model and a
character-level stub tokenizer.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import build_model, usage_error

import kvstack.models
from kvstack import cli, list_methods


class CharTokenizer:
    """Minimal tokenizer: one token per character (ids 1..127), no chat template."""

    chat_template = None

    def __call__(self, text, return_tensors="pt"):
        ids = [ord(c) % 127 + 1 for c in text]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + int(i) % 90) for i in ids)


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for this error")

    monkeypatch.setattr(kvstack.models, "load_model", refuse)
    monkeypatch.setattr(kvstack.models, "load_tokenizer", lambda name: None)


@pytest.fixture
def tiny_loader(monkeypatch):
    calls = []

    def load(name, device=None):
        calls.append((name, device))
        return build_model("llama"), CharTokenizer()

    monkeypatch.setattr(kvstack.models, "load_model", load)
    monkeypatch.setattr(kvstack.models, "load_tokenizer", lambda name: None)  # the length check waits for the model
    return calls




# ------------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------------


def test_methods_prints_every_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for info in list_methods():
        assert info.signature() in out
        assert info.category in out
        assert info.description in out
    assert "snapkv(ratio=None, budget=None, window=32, kernel=7, pooling='avg')" in out
    assert "adakv(METHOD, floor=0.2)" in out


def test_methods_json(capsys):
    assert cli.main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {row["name"]: row for row in rows}
    assert {"full", "snapkv", "keynorm", "random", "streamingllm", "h2o", "tova", "scissorhands", "pyramidkv",
            "adakv"} <= set(by_name)
    assert by_name["streamingllm"]["parameters"] == {"ratio": None, "budget": None, "sinks": 4,
                                                     "positions": "original"}
    assert by_name["h2o"]["category"] == "token/selection/dynamic"
    for row in rows:
        assert row["description"]


def test_methods_through_module_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "kvstack.cli", "methods"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "streamingllm" in result.stdout and "token/selection/dynamic" in result.stdout


# ------------------------------------------------------------------------------------------------------
# generate: usage errors before the model is loaded
# ------------------------------------------------------------------------------------------------------


def test_unknown_method(capsys, no_model):
    err = usage_error(capsys, ["generate", "--method", "snapky(ratio=0.5)", "--prompt", "hi"])
    assert "unknown method 'snapky'" in err and "valid methods" in err and "streamingllm" in err


def test_unknown_parameter(capsys, no_model):
    err = usage_error(capsys, ["generate", "--method", "h2o(budget=40, windo=3)", "--prompt", "hi"])
    assert "valid parameters" in err and "recent" in err


@pytest.mark.parametrize("ratio", ["1.0", "1.5", "-0.1"])
def test_bad_ratio(capsys, no_model, ratio):
    err = usage_error(capsys, ["generate", "--method", f"snapkv(ratio={ratio})", "--prompt", "hi"])
    assert "[0, 1)" in err


def test_budget_below_window(capsys, no_model):
    err = usage_error(capsys, ["generate", "--method", "snapkv(budget=10)", "--prompt", "hi"])
    assert "budget >= 32" in err


def test_a_bare_word_value_gets_the_parameter_s_own_error(capsys, no_model):
    err = usage_error(capsys, ["generate", "--method", "snapkv(ratio=abc)", "--prompt", "hi"])
    assert "ratio must be a number in [0, 1), got 'abc'" in err


def test_a_bare_word_for_a_text_parameter_asks_for_quotes(capsys, no_model):
    err = usage_error(capsys, ["generate", "--method", "quant(rotate=hadamard)", "--prompt", "hi"])
    assert "quote text values, e.g. rotate='hadamard'" in err


def test_a_prompt_too_long_is_refused_by_the_tokenizer_before_the_model_loads(capsys, no_model, monkeypatch):
    monkeypatch.setattr(kvstack.models, "load_tokenizer", lambda name: (CharTokenizer(), 100))
    err = usage_error(capsys, ["generate", "--prompt", "x" * 99, "--max-new-tokens", "2", "--no-chat"])
    assert "the prompt has 99 tokens (+2 to generate)" in err and "context of 100" in err


def test_generate_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for default in ("(default: smollm2-135m)", "(default: full)", "(default: 64)", "(default: 0)"):
        assert default in out


def test_unparseable_spec(capsys, no_model):
    err = usage_error(capsys, ["generate", "--method", "snapkv(ratio=", "--prompt", "hi"])
    assert "cannot parse" in err


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, no_model, prompt):
    err = usage_error(capsys, ["generate", "--prompt", prompt])
    assert "empty" in err


def test_empty_prompt_file(capsys, no_model, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("  \n", encoding="utf-8")
    err = usage_error(capsys, ["generate", "--prompt-file", str(path)])
    assert "empty" in err


def test_missing_prompt_file(capsys, no_model, tmp_path):
    missing = tmp_path / "nope.txt"
    err = usage_error(capsys, ["generate", "--prompt-file", str(missing)])
    assert "no such file" in err and "nope.txt" in err


def test_prompt_file_is_a_directory(capsys, no_model, tmp_path):
    err = usage_error(capsys, ["generate", "--prompt-file", str(tmp_path)])
    assert "no such file" in err


def test_bad_max_new_tokens(capsys, no_model):
    err = usage_error(capsys, ["generate", "--prompt", "hi", "--max-new-tokens", "0"])
    assert "--max-new-tokens" in err


def test_missing_prompt_is_argparseusage_error(capsys, no_model):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate"])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_prompt_and_prompt_file_exclusive(capsys, no_model, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--prompt", "x", "--prompt-file", str(path)])
    assert info.value.code == 2


def test_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["nosuchcommand"])
    assert info.value.code == 2


# ------------------------------------------------------------------------------------------------------
# generate with a tiny model behind load_model
# ------------------------------------------------------------------------------------------------------


def test_generate_runs_with_tiny_model(capsys, tiny_loader):
    code = cli.main(["generate", "--method", "streamingllm(budget=16, sinks=2)", "--prompt", "hello world " * 4,
                     "--max-new-tokens", "5", "--device", "cpu", "--no-chat"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert tiny_loader == [("smollm2-135m", "cpu")]
    lines = captured.out.strip().splitlines()
    assert lines[-1].startswith("[streamingllm(budget=16, sinks=2)] kept 16/")
    assert "tok/s" in lines[-1]


def test_generate_summary_on_stderr(capsys, tiny_loader, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("some prompt text", encoding="utf-8")
    code = cli.main(["generate", "--prompt-file", str(path), "--max-new-tokens", "3", "--summary-stderr",
                     "--chunk-size", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[full] kept" in captured.err
    assert "[full]" not in captured.out


def test_generate_prompt_too_long_for_model(capsys, tiny_loader):
    """Needs the model: the tiny model's context is 512 tokens (one per character here)."""
    err = usage_error(capsys, ["generate", "--prompt", "x" * 600, "--max-new-tokens", "2"])
    assert "context of 512" in err


def test_generate_ratio_too_high_at_run_time(capsys, tiny_loader):
    err = usage_error(capsys, ["generate", "--method", "snapkv(ratio=0.9)", "--prompt", "y" * 100,
                                "--max-new-tokens", "2"])
    assert "window" in err


# ------------------------------------------------------------------------------------------------------
# the CLI answers at once: help, methods and spec errors import neither torch nor transformers (nor the server)
# ------------------------------------------------------------------------------------------------------

LIGHT_COMMANDS = [
    ["--help"], ["methods"], ["methods", "--json"], ["generate", "--help"], ["bench", "--help"],
    ["engine-bench", "--help"], ["calibrate", "--help"], ["serve", "--help"], ["serve", "--max-queue", "0"],
    ["generate", "--method", "snapkv(ratio=abc)", "--prompt", "hi"],
    ["generate", "--method", "snapky(ratio=0.5)", "--prompt", "hi"],
]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_help_methods_and_spec_errors_import_neither_torch_nor_transformers(argv):
    script = (
        "import contextlib, io, sys\n"
        "from kvstack import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    try:\n"
        f"        code = cli.main({argv!r})\n"
        "    except SystemExit as exit_:\n"
        "        code = exit_.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'fastapi', 'uvicorn') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    code, heavy = done.stdout.strip().split(" ", 1)
    assert heavy == "[]", f"kvstack {' '.join(argv)} imported {heavy}"
    assert code in ("0", "2")
