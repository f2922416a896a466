"""DuoAttention's gates: the gated attention against an independent eager computation, and the fit's mechanics."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, calibrate_tiny, usage_error
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.calibration import CalibrationError, model_key
from kvstack.calibration.head_gates import (
    GATED_ATTENTION_NAME,
    _gated,
    fit_retrieval_gates,
    gated_attention,
    passkey_prompt,
    streaming_mask,
)
from kvstack.calibration.head_map import HEADS_FORMAT


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), sinks=st.integers(0, 8), recent=st.integers(1, 12))
def test_the_streaming_mask_sees_exactly_the_sinks_and_the_recent_keys(length, sinks, recent) -> None:
    mask = streaming_mask(length, sinks, recent)
    for i in range(length):
        seen = {j for j in range(length) if bool(mask[i, j])}
        assert seen == {j for j in range(i + 1) if j < sinks or i - j < recent}


def _eager(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
           scaling: float) -> torch.Tensor:
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scaling
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", weights, value)


class _Layer(torch.nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(1, 24), group=st.integers(1, 3), sinks=st.integers(0, 4),
       recent=st.integers(1, 6))
def test_gated_attention_mixes_full_and_streaming_attention_per_kv_head(seed, length, group, sinks, recent) -> None:
    generator = torch.Generator().manual_seed(seed)
    kv_heads, dim = 2, 8
    query = torch.randn(1, kv_heads * group, length, dim, generator=generator)
    key = torch.randn(1, kv_heads, length, dim, generator=generator)
    value = torch.randn(1, kv_heads, length, dim, generator=generator)
    gates = torch.rand(3, kv_heads, generator=generator)
    model = build_model(num_hidden_layers=1)
    with _gated(model, gates, sinks, recent):
        got, _ = gated_attention(_Layer(2), query, key, value, None, scaling=0.3)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    wide_key, wide_value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    full = _eager(query, wide_key, wide_value, causal, 0.3)
    streaming = _eager(query, wide_key, wide_value, streaming_mask(length, sinks, recent), 0.3)
    gate = gates[2].repeat_interleave(group).view(1, -1, 1, 1)
    assert torch.allclose(got, (gate * full + (1 - gate) * streaming).transpose(1, 2), atol=1e-5)


def test_gated_attention_refuses_to_run_outside_a_fit() -> None:
    tensor = torch.zeros(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="only inside fit_retrieval_gates"):
        gated_attention(_Layer(0), tensor, tensor, tensor, None)


@pytest.fixture(scope="module")
def tokenizer():
    return kvstack.load_model("smollm2-135m")[1]


def test_the_passkey_prompt_hides_every_key_in_order_and_answers_with_them(tokenizer) -> None:
    haystack = tokenizer(" plain words" * 200, add_special_tokens=False)["input_ids"][:300]
    ids, answer_start = passkey_prompt(tokenizer, haystack, passkeys=3, digits=6,
                                       generator=torch.Generator().manual_seed(1))
    text, answer = tokenizer.decode(ids[:answer_start]), tokenizer.decode(ids[answer_start:])
    keys = answer.strip(" .").split(", ")
    assert len(keys) == 3 and all(len(key) == 6 and key.isdigit() for key in keys)
    where = [text.index(f"Pass key {n} is {key}.") for n, key in enumerate(keys, 1)]
    assert where == sorted(where) and text.endswith("The pass keys are")
    assert len(ids) > len(haystack) + 20


def test_keyed_prompts_recall_each_key_by_its_name_in_a_shuffled_order(tokenizer) -> None:
    import re

    haystack = tokenizer(" plain words" * 200, add_special_tokens=False)["input_ids"][:300]
    orders = set()
    for seed in range(6):
        ids, answer_start = passkey_prompt(tokenizer, haystack, passkeys=4, digits=5,
                                           generator=torch.Generator().manual_seed(seed), kind="keyed")
        hidden = dict(re.findall(r"The pass key for (\w+) is (\d+)\.", tokenizer.decode(ids[:answer_start])))
        recalled = re.findall(r"The pass key for (\w+) is (\d+)\.", tokenizer.decode(ids[answer_start:]))
        assert len(hidden) == 4 and dict(recalled) == hidden and len(recalled) == 4
        assert tokenizer.decode(ids[:answer_start]).endswith("Recall every pass key.")
        orders.add(tuple(list(hidden).index(name) for name, _ in recalled))  # the recall order, by needle
    assert len(orders) > 1 and orders != {(0, 1, 2, 3)}  # shuffled: not the needles' order every time


def test_with_every_gate_open_the_fit_sees_no_distance_and_only_the_penalty_moves_the_gates(tokenizer) -> None:
    """Gates at 1 are the full model exactly (distance 0), so Adam's first step moves every gate by ``lr``."""
    model = build_model(num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    seen: list[tuple[int, float, float]] = []
    record = fit_retrieval_gates(model, tokenizer, steps=1, length=352, passkeys=2, digits=4, lr=0.1,
                                 progress=lambda *row: seen.append(row))
    assert seen[0][1] < 1e-10
    gates = torch.tensor(record["scores"])
    assert gates.shape == (2, 2) and torch.allclose(gates, torch.full((2, 2), 0.9), atol=1e-5)
    assert record["format"] == HEADS_FORMAT and record["method"] == "duo-gates"
    assert record["model_key"] == model_key(model)
    assert getattr(model.config, "_attn_implementation", None) != GATED_ATTENTION_NAME
    assert all(p.requires_grad for p in model.parameters())
    later = fit_retrieval_gates(model, tokenizer, steps=3, length=352, passkeys=2, digits=4, lr=0.5, seed=1)
    assert all(0.0 <= g <= 1.0 for row in later["scores"] for g in row)


def test_duo_reads_fitted_gates_as_its_head_map(tokenizer, tmp_path) -> None:
    """The fitted record is duo's artefact: the heads with the largest gates keep everything."""
    import json

    model = build_model(num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    record = fit_retrieval_gates(model, tokenizer, steps=1, length=352, passkeys=1, digits=4)
    record["scores"] = [[0.1, 0.8], [0.3, 0.2]]
    path = tmp_path / "gates.json"
    path.write_text(json.dumps(record))
    method = kvstack.parse(f"duo(heads=0.25, artefact={str(path)!r})")
    method.load_artefacts(model_key(model), 2, 2)
    assert method.retrieval == [[False, True], [False, False]]


def test_the_command_line_passes_the_gate_fit_its_options(tokenizer, tmp_path, capsys) -> None:
    """``calibrate --retrieval-heads gates --prompt-length --gate-lr --gate-reg`` reach the fit: the written record
    says so."""
    model = build_model(num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    record = calibrate_tiny(model, tokenizer, tmp_path, capsys, [
        "--retrieval-heads", "gates", "--gate-steps", "1", "--prompt-length", "352", "--gate-lr", "0.02",
        "--gate-reg", "0.05"])
    assert (record["method"], record["steps"], record["length"], record["lr"], record["reg"]) == (
        "duo-gates", 1, 352, 0.02, 0.05)


def test_a_bad_gate_fit_is_one_line(tokenizer, capsys) -> None:
    model = build_model(num_hidden_layers=1, vocab_size=len(tokenizer))
    with pytest.raises(CalibrationError, match="haystack of at least"):
        fit_retrieval_gates(model, tokenizer, steps=1, length=100)
    with pytest.raises(CalibrationError, match="prompts must be one of ordered, keyed, got 'random'"):
        fit_retrieval_gates(model, tokenizer, steps=1, prompts="random")
    message = usage_error(capsys, ["calibrate", "--retrieval-heads", "gates", "--gate-steps", "0"])
    assert "--gate-steps must be >= 1" in message


@pytest.mark.parametrize(("flags", "message"), [
    (["--retrieval-heads", "gates", "--gate-lr", "0"], "--gate-lr must be a positive number, got 0.0"),
    (["--retrieval-heads", "gates", "--gate-reg", "nan"], "--gate-reg must be a positive number, got nan"),
    (["--retrieval-heads", "search", "--gate-lr", "0.02"], "--gate-lr is for --retrieval-heads gates only"),
])
def test_bad_gate_fit_options_are_usage_errors(capsys, flags, message) -> None:
    assert message in usage_error(capsys, ["calibrate", *flags])


def test_greedy_selection_takes_the_head_whose_opening_most_lowers_the_answers_loss(tokenizer) -> None:
    """The first round's gain of each head matches a finite difference of the answer's loss in its gate, the
    head with the largest joins first, and the chosen heads are duo's top scores in the order chosen."""
    import re

    import torch.nn.functional as F

    from kvstack.calibration.head_gates import select_retrieval_heads
    from kvstack.calibration.head_probe import _needle_prompt
    from kvstack.calibration.text import calibration_text_ids

    model = build_model(num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    seen: list[tuple[int, tuple[int, int], float]] = []
    record = select_retrieval_heads(model, tokenizer, count=3, prompts=1, length=352, needles=2, digits=4,
                                    progress=lambda *row: seen.append(row))
    pool, _ = calibration_text_ids(tokenizer, 352)
    ids, span, number = _needle_prompt(tokenizer, pool[:352], "keyed", 2, 4, torch.Generator().manual_seed(0))
    assert re.findall(r"\d+", tokenizer.decode(ids[span.start : span.stop]))[-1] == number  # the asked needle's
    answer = tokenizer(f" {number}", add_special_tokens=False)["input_ids"]
    sequence = torch.tensor([ids + answer])

    def loss(gates: torch.Tensor) -> float:
        with _gated(model, gates, 16, 64), torch.no_grad():
            logits = model(input_ids=sequence, use_cache=False).logits[0, len(ids) - 1 : -1]
        return F.cross_entropy(logits.float(), sequence[0, len(ids):]).item()

    streaming = loss(torch.zeros(2, 2))
    assert abs(seen[0][2] - streaming) < 1e-4  # round 1 runs every head streaming
    step = 1e-2
    gains = torch.tensor([(streaming - loss(torch.eye(4)[h].view(2, 2) * step)) / step for h in range(4)])
    assert divmod(int(gains.argmax()), 2) == tuple(record["chosen"][0]) == seen[0][1]
    chosen = [layer * 2 + head for layer, head in record["chosen"]]
    assert len(set(chosen)) == 3
    scores = torch.tensor(record["scores"]).flatten()
    assert scores.argsort(descending=True)[:3].tolist() == chosen and record["method"] == "duo-greedy"
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(CalibrationError, match="1 <= count <= 4"):
        select_retrieval_heads(model, tokenizer, count=5, length=352)


def test_a_bad_greedy_head_count_is_a_usage_error(capsys) -> None:
    message = usage_error(capsys, ["calibrate", "--retrieval-heads", "greedy", "--greedy-heads", "0"])
    assert "--greedy-heads must be >= 1, got 0" in message
