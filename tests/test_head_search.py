"""The head search: its split attention against the full model and against duo's own cache, and the greedy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_model, calibrate_tiny, usage_error
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstack
from kvstack.calibration import CalibrationError, model_key
from kvstack.calibration.head_map import HEADS_FORMAT
from kvstack.calibration.head_search import evaluate_splits, prompt_cache, search_retrieval_heads, split_attention

LAYERS, KV_HEADS = 2, 2


@pytest.fixture(scope="module")
def tokenizer():
    return kvstack.load_model("smollm2-135m")[1]


def _duo_loss(model: torch.nn.Module, prompt: list[int], answer: list[int], whole: torch.Tensor, sinks: int,
              recent: int, directory: Path) -> float:
    """The answer's cross-entropy after its first token, decoded token by token through duo's own cache with
    exactly the heads of ``whole`` ``[L, H_kv]`` kept whole."""
    path = directory / "split.json"
    path.write_text(json.dumps({"format": HEADS_FORMAT, "version": 1, "model_key": model_key(model),
                                "scores": whole.float().tolist()}))
    fraction = int(whole.sum()) / whole.numel()
    cache = kvstack.make_cache(model, f"duo(heads={fraction}, sinks={sinks}, recent={recent}, artefact='{path}')")
    logits = []
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt]), **kvstack.cache_kwargs(model, cache), use_cache=True)
        for token in answer[:-1]:
            out = model(input_ids=torch.tensor([[token]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
            logits.append(out.logits[0, -1])
    return F.cross_entropy(torch.stack(logits).float(), torch.tensor(answer[1:])).item()


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.integers(30, 60), answer_length=st.integers(2, 6),
       sinks=st.integers(0, 4), recent=st.integers(1, 10), picks=st.lists(st.booleans(), min_size=4, max_size=4))
def test_a_split_decodes_the_answer_exactly_as_duos_cache_does(tmp_path_factory, seed, length, answer_length, sinks,
                                                               recent, picks) -> None:
    """The batched split attention against duo itself: same heads whole, same sinks and recent, every token of
    the answer decoded one at a time through kvstack's cache."""
    picks = [True, *picks[1:]] if not any(picks) else picks  # duo keeps at least one head whole
    model = build_model(num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
    answer = torch.randint(1, VOCAB, (answer_length,), generator=generator).tolist()
    whole = torch.tensor(picks).view(LAYERS, KV_HEADS)
    expected = _duo_loss(model, prompt, answer, whole, sinks, recent, tmp_path_factory.mktemp("split"))
    got = evaluate_splits(model, prompt_cache(model, prompt), answer, whole.unsqueeze(0), sinks=sinks, recent=recent)
    assert abs(got.item() - expected) < 1e-4


def test_every_head_whole_is_the_full_model_and_a_batch_row_is_its_own_split() -> None:
    model = build_model()
    prompt, answer = [5 + i % (VOCAB - 5) for i in range(40)], [7, 9, 11, 13]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) : -1]
    full = F.cross_entropy(logits, torch.tensor(answer[1:])).item()
    cache = prompt_cache(model, prompt)
    splits = torch.rand(5, LAYERS, KV_HEADS, generator=torch.Generator().manual_seed(1)) < 0.5
    splits[0] = True
    together = evaluate_splits(model, cache, answer, splits, sinks=2, recent=4)
    alone = torch.cat([evaluate_splits(model, cache, answer, row[None], sinks=2, recent=4) for row in splits])
    assert abs(together[0].item() - full) < 1e-5
    assert torch.allclose(together, alone, atol=1e-5)
    with pytest.raises(ValueError, match="at least two tokens"):
        evaluate_splits(model, cache, answer[:1], splits)


def test_the_split_attention_refuses_to_run_outside_the_search() -> None:
    tensor = torch.zeros(1, 1, 2, 4)

    class Layer(torch.nn.Module):
        layer_idx = 0

    with pytest.raises(RuntimeError, match="only inside evaluate_splits"):
        split_attention(Layer(), tensor, tensor, tensor, None)


def test_the_search_takes_first_the_head_whose_split_duo_decodes_best(tokenizer, tmp_path) -> None:
    """Round one's choice is the head that, alone whole, gives the lowest answer loss through duo's own cache;
    the chosen heads are duo's top scores in the order chosen, and duo(heads=...) keeps exactly them."""
    from kvstack.calibration.head_probe import _needle_prompt
    from kvstack.calibration.text import calibration_text_ids

    model = build_model(num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS, vocab_size=len(tokenizer),
                        max_position_embeddings=1024)
    seen: list[tuple[int, tuple[int, int], float]] = []
    record = search_retrieval_heads(model, tokenizer, count=2, prompts=1, length=64, needles=2, digits=4, sinks=4,
                                    recent=8, batch=3, progress=lambda *row: seen.append(row))
    pool, _ = calibration_text_ids(tokenizer, 64)
    ids, _, number = _needle_prompt(tokenizer, pool[:64], "keyed", 2, 4, torch.Generator().manual_seed(0))
    answer = tokenizer(f" {number}", add_special_tokens=False)["input_ids"]
    losses = [_duo_loss(model, ids, answer, torch.eye(4, dtype=torch.bool)[h].view(2, 2), 4, 8, tmp_path)
              for h in range(4)]
    first = min(range(4), key=losses.__getitem__)
    assert divmod(first, 2) == tuple(record["chosen"][0]) == seen[0][1]
    assert abs(record["losses"][0] - losses[first]) < 1e-4
    assert len({tuple(head) for head in record["chosen"]}) == 2 and record["method"] == "duo-search"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + answer])).logits[0, len(ids) : -1]
    assert abs(record["loss_whole"] - F.cross_entropy(logits, torch.tensor(answer[1:])).item()) < 1e-4
    path = tmp_path / "search.json"
    path.write_text(json.dumps(record))
    method = kvstack.parse(f"duo(heads=0.5, artefact={str(path)!r})")
    method.load_artefacts(model_key(model), 2, 2)
    kept = [[layer, head] for layer in range(2) for head in range(2) if method.retrieval[layer][head]]
    assert sorted(kept) == sorted(record["chosen"])
    with pytest.raises(CalibrationError, match="1 <= count <= 4"):
        search_retrieval_heads(model, tokenizer, count=5, length=64, sinks=4, recent=8)


def test_bad_search_arguments_are_usage_errors(capsys, tmp_path) -> None:
    message = usage_error(capsys, ["calibrate", "--retrieval-heads", "search", "--greedy-heads", "0"])
    assert "--greedy-heads must be >= 1, got 0" in message
    message = usage_error(capsys, ["calibrate", "--out", str(tmp_path / "x.json")])
    assert "--out is for --retrieval-heads" in message
    message = usage_error(capsys, ["calibrate", "--retrieval-heads", "search", "--out", str(tmp_path)])
    assert "is a directory" in message
    message = usage_error(capsys, ["calibrate", "--retrieval-heads", "--out", "/proc/kvstack/heads.json"])
    assert "cannot write there" in message


def test_two_word_keys_share_few_first_words_and_the_question_names_its_needle(tokenizer) -> None:
    import re

    from kvstack.calibration.head_probe import KEY_NAMES, _needle_prompt
    from kvstack.calibration.text import calibration_text_ids

    pool, _ = calibration_text_ids(tokenizer, 3200)
    generator = torch.Generator().manual_seed(3)
    for index in range(8):
        ids, span, number = _needle_prompt(tokenizer, pool[index * 400 : (index + 1) * 400], "keyed", 4, 7,
                                           generator, key_words=2)
        text = tokenizer.decode(ids)
        planted = dict(re.findall(r"The special magic number for ([a-z]+-[a-z]+) is (\d+)\.", text))
        assert len(planted) == 4 and all(name.split("-")[0] in KEY_NAMES[:6] for name in planted)
        asked = re.findall(r"What is the special magic number for ([a-z]+-[a-z]+)\?", text)
        assert len(asked) == 1 and planted[asked[0]] == number
        assert f"for {asked[0]} is {number}" in tokenizer.decode(ids[span.start : span.stop])
    model = build_model(num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS, vocab_size=len(tokenizer))
    with pytest.raises(CalibrationError, match="key_words 1 or 2"):
        search_retrieval_heads(model, tokenizer, count=1, length=64, sinks=4, recent=8, key_words=3)


def test_the_command_line_passes_the_search_its_prompt_options(tokenizer, tmp_path, capsys) -> None:
    """``calibrate --retrieval-heads search --prompts --prompt-length --key-words`` reach the search: the written
    record says so, and a tiny model's search with them chooses the heads asked for."""
    model = build_model(num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS, vocab_size=len(tokenizer),
                        max_position_embeddings=1024)
    record = calibrate_tiny(model, tokenizer, tmp_path, capsys, [
        "--retrieval-heads", "search", "--greedy-heads", "1", "--prompts", "1", "--prompt-length", "320",
        "--key-words", "2"])
    assert (record["prompts"], record["length"], record["key_words"], len(record["chosen"])) == (1, 320, 2, 1)


@pytest.mark.parametrize(("way", "flags", "message"), [
    ("search", ["--prompts", "0"], "--prompts must be >= 1, got 0"),
    ("search", ["--prompt-length", "100"], "--prompt-length must be >= 320"),
    ("keyed", ["--prompts", "8"], "--prompts: for --retrieval-heads greedy or search only"),
    ("gates", ["--prompts", "8"], "--prompts: for --retrieval-heads greedy or search only"),
    ("probe", ["--prompt-length", "2048"], "--prompt-length: for --retrieval-heads gates, greedy or search only"),
    ("gates", ["--prompt-length", "100"], "--prompt-length must be >= 320"),
    ("greedy", ["--key-words", "2"], "--key-words is for --retrieval-heads search only"),
])
def test_bad_search_prompt_options_are_usage_errors(capsys, way, flags, message) -> None:
    assert message in usage_error(capsys, ["calibrate", "--retrieval-heads", way, *flags])
