"""Calibration artefacts: statistics against an independent recomputation, the eigenbasis, the store, the CLI.

Statistics are recomputed here from projections captured with the tests' own forward hooks on the full
model (not kvstack's hooks on the decoder stack), and RoPE invariance of pair norms is checked against
the post-RoPE keys and queries of :func:`conftest.reference_qk`. Every artefact goes to a temporary
``KVSTACK_HOME``; the real model is loaded by one ``slow`` test only.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, random_ids, reference_qk, usage_error
from safetensors.torch import save_file

import kvstack.models
from kvstack import cli
from kvstack.calibration import (
    Calibration,
    CalibrationError,
    calibrate,
    calibration_path,
    calibration_text_ids,
    get_calibration,
    load_calibration,
    model_key,
    save_calibration,
    source_label,
)
from kvstack.errors import KVStackError
from kvstack.models import tiny_model

_REAL_HOME = os.environ.get("KVSTACK_HOME")  # read before the autouse fixture replaces it

class StubTokenizer:
    """One token per character, ids in ``[3, 128)``; accepts the keyword arguments transformers takes."""

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [3 + ord(c) % 125 for c in text]}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary kvstack home for every test."""
    path = tmp_path / "kvstack-home"
    monkeypatch.setenv("KVSTACK_HOME", str(path))
    return path


def _head_dim(model: torch.nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def reference_projections(model: torch.nn.Module, chunks: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Per layer, the float64 ``q_proj``/``k_proj``/``v_proj`` outputs of every chunk, as ``[N, heads, D]``.

    Each chunk ``[1, t]`` runs through the full model separately (its own forward, positions from 0).
    """
    config = model.config
    dim = _head_dim(model)
    layers = model.model.layers
    captured: dict[str, list[list[torch.Tensor]]] = {name: [[] for _ in layers] for name in ("q", "k", "v")}
    handles = []
    for index, layer in enumerate(layers):
        for name in ("q", "k", "v"):

            def hook(_module, _inputs, output, index=index, name=name):
                captured[name][index].append(output.detach().double().reshape(-1, output.shape[-1]))

            handles.append(getattr(layer.self_attn, f"{name}_proj").register_forward_hook(hook))
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(chunk)
    finally:
        for handle in handles:
            handle.remove()
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads, "v": config.num_key_value_heads}
    return {
        name: [torch.cat(parts).view(-1, heads[name], dim) for parts in captured[name]] for name in ("q", "k", "v")
    }


def pair_norms(rows: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., D/2]``: the norm of each rotate_half pair ``(c, c + D/2)``."""
    dim = rows.shape[-1]
    return rows.unflatten(-1, (2, dim // 2)).norm(dim=-2)


def small_calibration(model: torch.nn.Module, length: int = 48, batch: int = 2, seed: int = 0) -> Calibration:
    return calibrate(model, None, input_ids=random_ids(length, batch, seed=seed), sequence_length=length,
                     progress=False)


# ------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("qwen2", {}),  # k_proj with bias
        ("mistral", {}),
        ("llama", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2}),  # group of 3
        ("llama", {"num_attention_heads": 4, "num_key_value_heads": 4}),  # MHA
    ],
)
def test_statistics_match_independent_computation(arch: str, overrides: dict[str, int]) -> None:
    model = build_model(arch, seed=3, **overrides)
    ids = random_ids(50, batch=2, seed=1)
    # 70 tokens in sequences of at most 32: row 0 -> 32 + 18, row 1 -> 20
    cal = calibrate(model, None, input_ids=ids, tokens=70, sequence_length=32, progress=False)
    chunks = [ids[:1, :32], ids[:1, 32:50], ids[1:, :20]]
    ref = reference_projections(model, chunks)
    config = model.config
    layers, kv, hq, dim = config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads, \
        _head_dim(model)
    assert (cal.num_layers, cal.num_kv_heads, cal.num_q_heads, cal.head_dim) == (layers, kv, hq, dim)
    assert cal.tokens == 70 and cal.sequence_length == 32
    assert cal.source.startswith("input_ids:")
    for name in ("key_second_moment", "key_basis", "value_basis"):
        assert getattr(cal, name).shape == (layers, kv, dim, dim)
    assert cal.key_pair_norm_max.shape == cal.query_pair_norm_max.shape == (layers, kv, dim // 2)
    for tensor in cal.tensors().values():
        assert tensor.dtype == torch.float32

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        torch.testing.assert_close(actual.double(), expected, rtol=2e-5, atol=1e-6)

    for layer in range(layers):
        keys, values, queries = ref["k"][layer], ref["v"][layer], ref["q"][layer]
        assert keys.shape[0] == 70
        for head in range(kv):
            k, v = keys[:, head], values[:, head]
            close(cal.key_second_moment[layer, head], k.T @ k)
            close(cal.value_second_moment[layer, head], v.T @ v)
            close(cal.key_mean[layer, head], k.mean(0))
            close(cal.value_mean[layer, head], v.mean(0))
            close(cal.key_absmax[layer, head], k.abs().max(0).values)
            close(cal.key_pair_norm_max[layer, head], pair_norms(k).max(0).values)
        group = hq // kv
        expected_q = torch.stack(
            [pair_norms(queries[:, h * group : (h + 1) * group]).amax(dim=(0, 1)) for h in range(kv)]
        )
        close(cal.query_pair_norm_max[layer], expected_q)


def test_pair_norms_are_rope_invariant() -> None:
    """The per-pair maxima equal those of the post-RoPE keys and queries transformers really attends with."""
    model = build_model("llama", seed=5, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                        rope_theta=100.0)
    ids = random_ids(64, seed=2)
    cal = calibrate(model, None, input_ids=ids, sequence_length=64, progress=False)
    queries, keys = reference_qk(model, ids)
    for layer in range(model.config.num_hidden_layers):
        key_max = pair_norms(keys[layer][0].double()).amax(dim=1)  # [H, T, D/2] -> [H, D/2]
        torch.testing.assert_close(cal.key_pair_norm_max[layer].double(), key_max, rtol=1e-5, atol=1e-6)
        q = pair_norms(queries[layer][0].double()).amax(dim=1)  # [Hq, D/2]
        torch.testing.assert_close(cal.query_pair_norm_max[layer].double(), q.view(2, 3, -1).amax(1),
                                   rtol=1e-5, atol=1e-6)
        # the per-channel maximum is not RoPE-invariant: it is taken before RoPE
        post = keys[layer][0].double().abs().amax(dim=1)
        assert not torch.allclose(cal.key_absmax[layer].double(), post, rtol=1e-3)


def test_hooks_are_removed() -> None:
    model = build_model("qwen2")
    small_calibration(model)
    for module in model.modules():
        assert not module._forward_hooks
    with pytest.raises(IndexError):  # fails inside the forward, after the hooks were registered
        calibrate(model, None, input_ids=torch.tensor([[1, 2, 500]]), progress=False)
    for module in model.modules():
        assert not module._forward_hooks
    with pytest.raises(CalibrationError, match="sequence_length 1000 exceeds the model's context of 512"):
        calibrate(model, None, input_ids=random_ids(600), sequence_length=1000, progress=False)
    for module in model.modules():
        assert not module._forward_hooks


def test_bad_arguments() -> None:
    model = build_model()
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        calibrate(model, None, progress=False)
    with pytest.raises(CalibrationError, match="tokens must be a positive integer"):
        calibrate(model, None, input_ids=random_ids(8), tokens=0, progress=False)
    with pytest.raises(CalibrationError, match="sequence_length must be a positive integer"):
        calibrate(model, None, input_ids=random_ids(8), sequence_length=0, progress=False)
    with pytest.raises(CalibrationError, match="integer tensor"):
        calibrate(model, None, input_ids=torch.zeros(2, 4), progress=False)
    with pytest.raises(CalibrationError, match="unknown calibration source"):
        calibrate(model, StubTokenizer(), source="/no/such/file.txt", progress=False)
    assert issubclass(CalibrationError, KVStackError)


# ------------------------------------------------------------------------------------------------------
# The eigenbasis
# ------------------------------------------------------------------------------------------------------


def test_basis_is_orthonormal_and_reproduces_keys() -> None:
    model = build_model("llama", seed=7, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    ids = random_ids(96, seed=4)
    cal = calibrate(model, None, input_ids=ids, sequence_length=96, progress=False)
    ref = reference_projections(model, [ids])
    dim = cal.head_dim
    eye = torch.eye(dim, dtype=torch.float64)
    for layer in range(cal.num_layers):
        for head in range(cal.num_kv_heads):
            for kind, rows in (("key", ref["k"][layer][:, head]), ("value", ref["v"][layer][:, head])):
                basis = getattr(cal, f"{kind}_basis")[layer, head].double()
                spectrum = getattr(cal, f"{kind}_spectrum")[layer, head].double()
                moment = getattr(cal, f"{kind}_second_moment")[layer, head].double()
                torch.testing.assert_close(basis.T @ basis, eye, atol=2e-5, rtol=0)
                assert bool((spectrum[:-1] >= spectrum[1:]).all()) and bool((spectrum >= 0).all())
                # eigen-pairs of the second moment, largest entry of each column positive
                scale = float(spectrum[0])
                torch.testing.assert_close(moment @ basis, basis * spectrum, atol=1e-4 * scale, rtol=0)
                pivots = basis.gather(0, basis.abs().argmax(0, keepdim=True))
                assert bool((pivots > 0).all())
                # all D directions reproduce the keys exactly
                torch.testing.assert_close(rows @ basis @ basis.T, rows, atol=1e-4 * rows.abs().max(), rtol=0)
                total = float(rows.square().sum())
                for rank in (1, dim // 4, dim // 2, dim):
                    top = basis[:, :rank]
                    captured = float((rows @ top).square().sum())
                    assert captured == pytest.approx(float(spectrum[:rank].sum()), rel=1e-4, abs=1e-6 * total)
                    fraction = float(cal.energy_fraction(rank, kind)[layer, head])
                    assert fraction == pytest.approx(captured / total, rel=1e-4)
                # the top-r subspace is the best rank-r one: no worse than the first r raw channels
                rank = dim // 4
                assert float((rows @ basis[:, :rank]).square().sum()) >= float(rows[:, :rank].square().sum()) - 1e-9
    assert torch.equal(cal.energy_fraction(0), torch.zeros(cal.num_layers, cal.num_kv_heads))
    with pytest.raises(CalibrationError, match="rank must be"):
        cal.energy_fraction(dim + 1)
    assert f"top {dim // 2}/{dim} directions hold" in cal.summary() and "\n" not in cal.summary()


# ------------------------------------------------------------------------------------------------------
# Model identity and the store
# ------------------------------------------------------------------------------------------------------


def test_model_key_identity() -> None:
    a = model_key(build_model("llama", seed=0))
    assert a == model_key(build_model("llama", seed=0))
    assert a != model_key(build_model("llama", seed=1))
    assert a != model_key(build_model("qwen2", seed=0))
    assert model_key(tiny_model(seed=0)) == model_key(tiny_model(seed=0))
    assert model_key(tiny_model(seed=0)) != model_key(tiny_model(seed=1))
    assert model_key(build_model("llama", seed=0).to(torch.bfloat16)) == a  # a cast keeps the key
    assert re.fullmatch(r"llama-[0-9a-f]{12}", a)
    named = build_model("llama", seed=0)
    named.config._name_or_path = "/somewhere/models/smollm2-135m"
    assert model_key(named).startswith("smollm2-135m-")


def test_save_reload_round_trip(home: Path) -> None:
    model = build_model("mistral", seed=2)
    cal = small_calibration(model)
    path = save_calibration(cal)
    assert path == calibration_path(cal.model_key) == home / "calibration" / f"{cal.model_key}.safetensors"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    for loaded in (load_calibration(path), load_calibration(str(path), expected_model_key=cal.model_key),
                   load_calibration(model), load_calibration(build_model("mistral", seed=2)),
                   get_calibration(model)):
        assert loaded.metadata() == cal.metadata()
        for name, tensor in cal.tensors().items():
            assert torch.equal(getattr(loaded, name), tensor), name
    assert cal.created and cal.model_name == "mistral"


def test_other_model_is_rejected(home: Path) -> None:
    model_a, model_b = build_model("llama", seed=0), build_model("llama", seed=1)
    key_a, key_b = model_key(model_a), model_key(model_b)
    path_a = save_calibration(small_calibration(model_a))
    with pytest.raises(CalibrationError) as err:
        load_calibration(path_a, expected_model_key=key_b)
    message = str(err.value)
    assert key_a in message and key_b in message and "\n" not in message
    # a file copied to the other model's place
    path_b = calibration_path(key_b)
    shutil.copy(path_a, path_b)
    with pytest.raises(CalibrationError) as err:
        load_calibration(model_b)
    message = str(err.value)
    assert f"made for model {key_a}, not {key_b}" in message and "calibrate" in message and "\n" not in message
    # another geometry
    model_c = build_model("llama", seed=0, num_hidden_layers=3)
    shutil.copy(path_a, calibration_path(model_key(model_c)))
    with pytest.raises(CalibrationError, match=r"\(2 layers .*, not .*\(3 layers"):
        load_calibration(model_c)


def test_missing_calibration_names_the_command(home: Path, tmp_path: Path) -> None:
    model = build_model()
    with pytest.raises(CalibrationError, match="no calibration for model llama-") as err:
        get_calibration(model)
    assert "kvstack calibrate --model" in str(err.value) and "\n" not in str(err.value)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(CalibrationError, match="run `kvstack calibrate --model SmolLM2-135M-Instruct`"):
        get_calibration(model)
    model.config._name_or_path = str(tmp_path)
    with pytest.raises(CalibrationError, match=re.escape(f"run `kvstack calibrate --model {tmp_path}`")):
        load_calibration(model)


def test_get_calibration_calibrates_when_asked(home: Path) -> None:
    model = build_model("qwen2", seed=4)
    cal = get_calibration(model, tokenizer=StubTokenizer(), calibrate_if_missing=True, tokens=100,
                          sequence_length=40, progress=False)
    assert cal.tokens == 100 and cal.source.startswith("python-docs:")
    assert calibration_path(cal.model_key).is_file()
    again = get_calibration(model)
    assert again.created == cal.created and torch.equal(again.key_basis, cal.key_basis)


def _corrupt_variants(path: Path, cal: Calibration) -> list[tuple[str, Any]]:
    data = path.read_bytes()
    tensors = {name: t.contiguous() for name, t in cal.tensors().items()}

    def garbage(p: Path) -> None:
        p.write_bytes(b"this is not a safetensors file at all")

    def truncated(p: Path) -> None:
        p.write_bytes(data[: len(data) // 2])

    def no_metadata(p: Path) -> None:
        save_file(tensors, str(p))

    def wrong_shape(p: Path) -> None:
        bad = save_calibration(dataclasses.replace(cal), p)
        assert bad == p
        raw = p.read_bytes()
        p.write_bytes(raw.replace(b'\\"num_layers\\": 2', b'\\"num_layers\\": 5'))

    def missing_tensor(p: Path) -> None:
        import json

        header = {"format": "kvstack-calibration", "version": 1, **cal.metadata()}
        save_file({k: v for k, v in tensors.items() if k != "key_basis"}, str(p),
                  metadata={"kvstack_calibration": json.dumps(header)})

    def empty(p: Path) -> None:
        p.write_bytes(b"")

    return [("garbage", garbage), ("truncated", truncated), ("no metadata", no_metadata),
            ("wrong shape", wrong_shape), ("missing tensor", missing_tensor), ("empty", empty)]


def test_corrupt_file_is_reported(home: Path) -> None:
    model = build_model(seed=9)
    cal = small_calibration(model)
    path = save_calibration(cal)
    for what, damage in _corrupt_variants(path, cal):
        damage(path)
        for load in (lambda: load_calibration(path), lambda: load_calibration(model), lambda: get_calibration(model)):
            with pytest.raises(CalibrationError) as err:
                load()
            message = str(err.value)
            assert str(path) in message and "\n" not in message, what
            assert "corrupt" in message or "invalid" in message, (what, message)
    # asked to calibrate, a damaged file is replaced
    fresh = get_calibration(model, tokenizer=StubTokenizer(), calibrate_if_missing=True, tokens=64,
                            sequence_length=32, progress=False)
    assert load_calibration(model).created == fresh.created


def test_dataclass_validates_shapes() -> None:
    cal = small_calibration(build_model())
    with pytest.raises(CalibrationError, match="key_basis has shape"):
        dataclasses.replace(cal, key_basis=cal.key_basis[:, :, :2])
    with pytest.raises(CalibrationError, match="tokens must be a positive integer"):
        dataclasses.replace(cal, tokens=0)
    with pytest.raises(CalibrationError, match="invalid model key"):
        calibration_path("../escape")


# ------------------------------------------------------------------------------------------------------
# Calibration text
# ------------------------------------------------------------------------------------------------------


def test_calibration_text_sources(tmp_path: Path) -> None:
    tokenizer = StubTokenizer()
    ids, description = calibration_text_ids(tokenizer, 500)
    assert len(ids) == 500 and description.startswith("python-docs: pydoc_data.topics")
    from pydoc_data.topics import topics

    first = topics[sorted(topics)[0]].strip()
    assert ids == tokenizer(first)["input_ids"][:500]

    from kvstack.prose import prose_paragraphs

    ids, description = calibration_text_ids(tokenizer, 3000, "kjv-end")
    paragraphs = prose_paragraphs(None)
    match = re.match(r"kjv-end: KJV text from chapter (\d+) of (\d+) on", description)
    assert match and int(match.group(2)) == len(paragraphs)
    start = int(match.group(1)) - 1
    assert start > len(paragraphs) - 10  # the end of the text
    assert ids == tokenizer("\n\n".join(paragraphs[start:]))["input_ids"][:3000]

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Paragraph {i} has several words in it." for i in range(300)), encoding="utf-8")
    ids, description = calibration_text_ids(tokenizer, 200, str(text))
    assert len(ids) == 200 and description.startswith(source_label(str(text)) + ":")
    with pytest.raises(CalibrationError, match="holds only"):
        calibration_text_ids(tokenizer, 10**6, str(text))
    with pytest.raises(CalibrationError, match="unknown calibration source"):
        calibration_text_ids(tokenizer, 10, "wikitext")


# ------------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not be loaded for this error")

    monkeypatch.setattr(kvstack.models, "load_model", refuse)


@pytest.fixture
def tiny_loader(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []

    def load(name: str, device: Any = None) -> tuple[torch.nn.Module, StubTokenizer]:
        calls.append((name, device))
        return build_model("llama", seed=11), StubTokenizer()

    monkeypatch.setattr(kvstack.models, "load_model", load)
    return calls




@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tokens", "0"], "--tokens must be >= 1"),
        (["--tokens", "-5"], "--tokens must be >= 1"),
        (["--sequence-length", "0"], "--sequence-length must be >= 1"),
        (["--source", "/no/such/text.txt"], "unknown calibration source"),
    ],
)
def test_cli_usage_errors(capsys: pytest.CaptureFixture[str], no_model: None, argv: list[str],
                          expected: str) -> None:
    assert expected in usage_error(capsys, ["calibrate", *argv])


def test_cli_sequence_longer_than_context(capsys: pytest.CaptureFixture[str], tiny_loader: list[Any]) -> None:
    err = usage_error(capsys, ["calibrate", "--sequence-length", "4096", "--no-progress"])
    assert "exceeds the model's context" in err and len(tiny_loader) == 1


def test_cli_calibrates_then_reuses(capsys: pytest.CaptureFixture[str], tiny_loader: list[Any], home: Path) -> None:
    argv = ["calibrate", "--model", "tiny", "--tokens", "96", "--sequence-length", "32", "--device", "cpu",
            "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    key = model_key(build_model("llama", seed=11))
    path = calibration_path(key)
    assert out[0].startswith(f"calibration: {path} (written;")
    assert out[1].startswith(f"{key}: 96 tokens, 2 layers x 2 KV heads x 16 dims; top 8/16 directions hold")
    assert tiny_loader == [("tiny", "cpu")]
    created = load_calibration(path).created
    mtime = os.stat(path).st_mtime_ns

    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"calibration: {path} (existing; --force to redo)" and out[1].startswith(key)
    assert os.stat(path).st_mtime_ns == mtime

    assert cli.main([*argv, "--force"]) == 0
    assert "(written;" in capsys.readouterr().out
    assert cli.main([*argv[:4], "128", *argv[5:]]) == 0  # other --tokens: calibrated again
    captured = capsys.readouterr()
    assert "calibrating again" in captured.err and "(written;" in captured.out
    assert load_calibration(path).tokens == 128
    assert created  # the first artefact had a timestamp


# ------------------------------------------------------------------------------------------------------
# The real model (slow)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_calibration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if _REAL_HOME:
        monkeypatch.setenv("KVSTACK_HOME", _REAL_HOME)
    else:
        monkeypatch.delenv("KVSTACK_HOME", raising=False)
    model, tokenizer = kvstack.models.load_model("smollm2-135m", device="cpu")
    monkeypatch.setenv("KVSTACK_HOME", str(tmp_path / "home"))
    cal = calibrate(model, tokenizer, tokens=256, sequence_length=128, progress=False)
    assert (cal.num_layers, cal.num_kv_heads, cal.num_q_heads, cal.head_dim) == (30, 3, 9, 64)
    assert model_key(model).startswith("smollm2-135m-") and cal.tokens == 256
    ids = torch.tensor([calibration_text_ids(tokenizer, 128)[0]])
    _, keys = reference_qk(model, ids)
    post = torch.stack([pair_norms(k[0].double()).amax(dim=1) for k in keys])
    assert bool((cal.key_pair_norm_max.double() >= post * (1 - 1e-5)).all())  # first sequence of the two
    with pytest.raises(CalibrationError, match="run `kvstack calibrate --model smollm2-135m`"):
        get_calibration(model)
