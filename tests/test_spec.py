"""The spec language, the method registry and every bad-input error (one line, naming the valid choices)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_model, random_ids

import kvstack
from kvstack import InputError, SpecError, describe, list_methods, parse
from kvstack.errors import KVStackError
from kvstack.methods.base import BudgetError

EXPECTED_METHODS = {
    "full": "baseline",
    "snapkv": "token/selection/static",
    "keynorm": "token/selection/static",
    "random": "token/selection/static",
    "streamingllm": "token/selection/dynamic",
    "h2o": "token/selection/dynamic",
    "tova": "token/selection/dynamic",
    "scissorhands": "token/selection/dynamic",
    "pyramidkv": "token/allocation/layer",
    "adakv": "token/allocation/head",
}


def _error(spec: str, kind: type[Exception] = SpecError) -> str:
    with pytest.raises(kind) as info:
        parse(spec)
    message = str(info.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


# ------------------------------------------------------------------------------------------------------
# Error hierarchy
# ------------------------------------------------------------------------------------------------------


def test_error_hierarchy():
    assert issubclass(SpecError, KVStackError)
    assert issubclass(InputError, KVStackError)
    assert issubclass(KVStackError, ValueError)
    assert issubclass(BudgetError, SpecError)


# ------------------------------------------------------------------------------------------------------
# Parsing what is valid
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "name", "fields"),
    [
        ("full", "full", {}),
        ("snapkv(ratio=0.5)", "snapkv", {"ratio": 0.5, "budget": None, "window": 32, "kernel": 7, "pooling": "avg"}),
        ("  SnapKV( ratio = 0.5 )  ", "snapkv", {"ratio": 0.5}),
        ("snapkv(budget=64, window=8, kernel=3, pooling='max')", "snapkv",
         {"budget": 64, "window": 8, "kernel": 3, "pooling": "max"}),
        ("streamingllm(budget=64, sinks=4)", "streamingllm", {"budget": 64, "sinks": 4, "positions": "original"}),
        ("streamingllm(budget=64, positions='cache')", "streamingllm", {"positions": "cache"}),
        ("h2o(ratio=0.75, recent=10)", "h2o", {"ratio": 0.75, "recent": 10}),
        ("tova(budget=8)", "tova", {"budget": 8}),
        ("scissorhands(budget=40, history=16)", "scissorhands", {"budget": 40, "history": 16}),
        ("keynorm(ratio=0)", "keynorm", {"ratio": 0}),
        ("random(budget=1)", "random", {"budget": 1}),
        ("pyramidkv(budget=40, beta=10)", "pyramidkv", {"budget": 40, "beta": 10}),
    ],
)
def test_parse_valid(spec, name, fields):
    method = parse(spec)
    assert method.spec_name == name
    for key, value in fields.items():
        assert getattr(method, key) == value


def test_parse_wrapper():
    method = parse("adakv(snapkv(budget=40), floor=0.3)")
    assert method.spec_name == "adakv"
    assert method.floor == 0.3
    assert method.inner.spec_name == "snapkv"
    assert method.inner.budget == 40
    assert parse("adakv(h2o(ratio=0.5))").floor == 0.2  # the default


def test_parsed_method_passes_through():
    method = parse("snapkv(ratio=0.5)")
    assert parse(method) is method


@pytest.mark.parametrize(
    "spec",
    ["full", "snapkv(ratio=0.5)", "snapkv(budget=64, kernel=3, pooling='max')", "streamingllm(budget=9, sinks=2)",
     "h2o(budget=40, recent=10)", "adakv(keynorm(ratio=0.25), floor=0.5)", "pyramidkv(ratio=0.5, beta=4.0)"],
)
def test_label_round_trip(spec):
    method = parse(spec)
    again = parse(method.label())
    assert again == method
    assert type(again) is type(method)


# ------------------------------------------------------------------------------------------------------
# Errors: unknown names, with the valid choices
# ------------------------------------------------------------------------------------------------------


def test_unknown_method_lists_valid_methods():
    message = _error("snapky(ratio=0.5)")
    assert "snapky" in message
    assert "did you mean 'snapkv'" in message
    for name in EXPECTED_METHODS:
        assert name in message


def test_unknown_bare_method_lists_valid_methods():
    message = _error("nosuchmethod")
    assert "valid methods" in message
    for name in EXPECTED_METHODS:
        assert name in message


def test_unknown_parameter_lists_valid_parameters():
    message = _error("snapkv(ratio=0.5, windo=2)")
    assert "windo" in message and "did you mean 'window'" in message
    for param in ("ratio", "budget", "window", "kernel", "pooling"):
        assert param in message


def test_unknown_parameter_for_method_without_parameters():
    message = _error("full(x=1)")
    assert "'x'" in message and "none" in message


def test_unknown_parameter_of_inner_method():
    message = _error("adakv(h2o(budget=40, windo=3))")
    assert "h2o" in message and "recent" in message


def test_unknown_parameter_of_wrapper():
    message = _error("adakv(snapkv(budget=40), flor=0.2)")
    assert "floor" in message


# ------------------------------------------------------------------------------------------------------
# Errors: ratio and budget
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ["1.0", "1", "1.5", "-0.1", "-1"])
@pytest.mark.parametrize("method", ["snapkv", "keynorm", "random", "streamingllm", "h2o", "tova", "scissorhands",
                                    "pyramidkv"])
def test_ratio_outside_unit_interval(method, ratio):
    message = _error(f"{method}(ratio={ratio})")
    assert "[0, 1)" in message


@pytest.mark.parametrize("value", ["True", "'half'", "None"])
def test_ratio_not_a_number(value):
    message = _error(f"snapkv(ratio={value})")
    assert "ratio" in message


def test_ratio_inside_adakv_checked():
    assert "[0, 1)" in _error("adakv(snapkv(ratio=1.0))")


def test_ratio_or_budget_exactly_one():
    assert "ratio" in _error("snapkv") and "budget" in _error("snapkv")
    assert "exactly one" in _error("h2o(ratio=0.5, budget=40)")


@pytest.mark.parametrize(
    ("spec", "needed"),
    [
        ("streamingllm(budget=3)", 5),
        ("streamingllm(budget=4, sinks=4)", 5),
        ("snapkv(budget=10)", 32),
        ("snapkv(budget=7, window=8)", 8),
        ("pyramidkv(budget=31)", 32),
        ("adakv(snapkv(budget=10))", 32),
        ("h2o(budget=10, recent=20)", 20),
        ("scissorhands(budget=10, recent=20)", 20),
    ],
)
def test_budget_below_what_is_always_kept(spec, needed):
    message = _error(spec, BudgetError)
    assert f"budget >= {needed}" in message


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ("h2o(budget=-1)", "budget"),
        ("snapkv(ratio=0.5, window=-2)", "window"),
        ("snapkv(ratio=0.5, kernel=-7)", "kernel"),
        ("streamingllm(budget=10, sinks=-1)", "sinks"),
        ("h2o(budget=40, recent=-3)", "recent"),
        ("scissorhands(budget=40, recent=-3)", "recent"),
        ("scissorhands(budget=40, history=-3)", "history"),
    ],
)
def test_negative_sizes(spec, param):
    message = _error(spec)
    assert param in message and ">= 0" in message


@pytest.mark.parametrize(
    ("spec", "param"),
    [("snapkv(budget=40.5)", "budget"), ("snapkv(budget=True)", "budget"), ("snapkv(ratio=0.5, window=2.5)", "window"),
     ("h2o(budget=40, recent='x')", "recent")],
)
def test_sizes_must_be_integers(spec, param):
    message = _error(spec)
    assert param in message and "integer" in message


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("snapkv(ratio=0.5, pooling='min')", ["'avg'", "'max'"]),
        ("streamingllm(budget=40, positions='slot')", ["'original'", "'cache'"]),
        ("scissorhands(budget=40, history=0)", ["history", ">= 1"]),
        ("pyramidkv(budget=40, beta=0.5)", ["beta", ">= 1"]),
        ("adakv(snapkv(budget=40), floor=1.5)", ["floor", "[0, 1]"]),
        ("adakv(snapkv(budget=40), floor=-0.1)", ["floor", "[0, 1]"]),
    ],
)
def test_bad_choice_names_valid_choices(spec, words):
    message = _error(spec)
    for word in words:
        assert word in message


# ------------------------------------------------------------------------------------------------------
# Errors: grammar
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", ["empty"]),
        ("   ", ["empty"]),
        ("snapkv(ratio=", ["cannot parse"]),
        ("1+", ["cannot parse"]),
        ("snapkv(ratio=0.5)(x=1)", ["cannot parse"]),
        ("snapkv.x(ratio=0.5)", ["cannot parse"]),
        ("snapkv(0.5)", ["keyword", "ratio"]),
        ("snapkv(ratio=[1])", ["numbers, strings"]),
        ("snapkv(ratio=1 + 2)", ["numbers, strings"]),
        ("snapkv(**{'ratio': 0.5})", ["'**'"]),
        ("adakv()", ["adakv", "snapkv"]),
        ("adakv(snapkv(budget=40), keynorm(budget=40))", ["got 2"]),
        ("adakv(full)", ["budget"]),
        ("adakv(adakv(snapkv(budget=40)))", ["adakv"]),
        ("snapkv(ratio=0.5) + keynorm(ratio=0.5)", ["compose", "one codec", "kivi"]),
        ("kivi + quant", ["compose", "at most one selection"]),
        ("mikv(h2o(ratio=0.5)) + kivi", ["compose", "low precision", "without a codec"]),
    ],
)
def test_grammar_errors(spec, words):
    message = _error(spec)
    for word in words:
        assert word in message


# ------------------------------------------------------------------------------------------------------
# Errors raised when the cache meets a model or a prompt
# ------------------------------------------------------------------------------------------------------


def test_make_cache_rejects_bad_spec_before_touching_the_model():
    model = build_model()
    with pytest.raises(SpecError, match="valid methods"):
        kvstack.make_cache(model, "nosuch(ratio=0.5)")
    assert model.config._attn_implementation != "kvstack"


def test_make_cache_rejects_module_without_attention():
    with pytest.raises(InputError, match="no attention layers") as info:
        kvstack.make_cache(torch.nn.Linear(2, 2), "full")
    assert "Llama" in str(info.value)


def test_make_cache_rejects_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=None,
                   eos_token_id=None)
    ).eval()
    with pytest.raises(InputError, match="no attention layers") as info:
        kvstack.make_cache(model, "snapkv(ratio=0.5)")
    assert "\n" not in str(info.value)


def test_cache_positions_need_plain_rope():
    yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}
    model = build_model("llama", rope_parameters=yarn)
    with pytest.raises(InputError, match="plain RoPE"):
        kvstack.make_cache(model, "streamingllm(budget=16, positions='cache')")
    kvstack.make_cache(model, "streamingllm(budget=16)")  # true positions need no re-rotation


def test_prefill_rejects_empty_prompt(llama):
    cache = kvstack.make_cache(llama, "full")
    with pytest.raises(InputError, match="empty"):
        kvstack.prefill(llama, torch.empty(1, 0, dtype=torch.long), cache)


def test_prefill_rejects_one_dimensional_prompt(llama):
    cache = kvstack.make_cache(llama, "full")
    with pytest.raises(InputError):
        kvstack.prefill(llama, torch.empty(0, dtype=torch.long), cache)


class _NoTokenizer:
    """Fails the test if kvstack gets as far as tokenising an empty prompt."""

    chat_template = None

    def __call__(self, *args, **kwargs):
        raise AssertionError("an empty prompt must be refused before tokenisation")

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("an empty prompt must be refused before tokenisation")


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_generate_rejects_empty_text_prompt(llama, prompt):
    with pytest.raises(InputError, match="empty"):
        kvstack.generate(llama, _NoTokenizer(), prompt)


def test_encode_prompt_rejects_empty_text():
    from kvstack.api import encode_prompt

    with pytest.raises(InputError, match="empty"):
        encode_prompt(_NoTokenizer(), "")


def test_generate_rejects_empty_tensor_prompt(llama):
    with pytest.raises(InputError, match="empty"):
        kvstack.generate(llama, None, torch.empty(1, 0, dtype=torch.long))


def test_prompt_longer_than_context(llama):
    ids = random_ids(600)
    cache = kvstack.make_cache(llama, "full")
    with pytest.raises(InputError, match="512") as info:
        kvstack.prefill(llama, ids, cache)
    assert "600" in str(info.value)
    with pytest.raises(InputError, match="context"):
        kvstack.generate(llama, None, ids, "snapkv(ratio=0.5)", max_new_tokens=4)


def test_prompt_plus_new_tokens_longer_than_context(llama):
    ids = random_ids(500)
    with pytest.raises(InputError, match="max-new-tokens"):
        kvstack.generate(llama, None, ids, max_new_tokens=64)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_generate_rejects_bad_max_new_tokens(llama, bad):
    with pytest.raises(InputError, match="max_new_tokens"):
        kvstack.generate(llama, None, random_ids(8), max_new_tokens=bad)


def test_prefill_rejects_bad_chunk_size(llama):
    cache = kvstack.make_cache(llama, "full")
    with pytest.raises(InputError, match="chunk_size"):
        kvstack.prefill(llama, random_ids(8), cache, chunk_size=0)


def test_ratio_leaving_fewer_entries_than_window_at_run_time(llama):
    cache = kvstack.make_cache(llama, "snapkv(ratio=0.9)")  # keeps 10 of 100 < window 32
    with pytest.raises(BudgetError, match="window") as info:
        kvstack.prefill(llama, random_ids(100), cache)
    assert "\n" not in str(info.value)


def test_ratio_leaving_fewer_entries_than_sinks_at_run_time(llama):
    cache = kvstack.make_cache(llama, "streamingllm(ratio=0.99, sinks=4)")  # keeps 1 of 100 < 5
    with pytest.raises(BudgetError):
        kvstack.prefill(llama, random_ids(100), cache, chunk_size=None)


def test_ratio_on_prompt_shorter_than_window_keeps_everything(llama):
    """A prompt shorter than the window cannot be compressed below it: the whole prompt is kept."""
    cache = kvstack.make_cache(llama, "snapkv(ratio=0.9)")
    kvstack.prefill(llama, random_ids(20), cache)
    for layer in cache.layers:
        assert layer.head_lengths().tolist() == [[20, 20]]


# ------------------------------------------------------------------------------------------------------
# The registry: list_methods / describe
# ------------------------------------------------------------------------------------------------------


def test_list_methods_has_every_method():
    infos = {info.name: info for info in list_methods()}
    assert set(EXPECTED_METHODS) <= set(infos)
    for name, category in EXPECTED_METHODS.items():
        info = infos[name]
        assert info.category == category
        assert info.description and "\n" not in info.description
    order = [(i.category, i.name) for i in list_methods()]
    assert order == sorted(order)


def test_list_methods_parameters_with_defaults():
    infos = {info.name: info for info in list_methods()}
    assert infos["full"].parameters == {}
    assert infos["snapkv"].parameters == {"ratio": None, "budget": None, "window": 32, "kernel": 7, "pooling": "avg"}
    assert infos["streamingllm"].parameters == {"ratio": None, "budget": None, "sinks": 4, "positions": "original"}
    assert infos["h2o"].parameters == {"ratio": None, "budget": None, "recent": None}
    assert infos["scissorhands"].parameters == {"ratio": None, "budget": None, "recent": None, "history": 32}
    assert infos["tova"].parameters == {"ratio": None, "budget": None}
    assert infos["keynorm"].parameters == {"ratio": None, "budget": None}
    assert infos["random"].parameters == {"ratio": None, "budget": None}
    assert infos["pyramidkv"].parameters["beta"] == 20.0
    assert infos["pyramidkv"].parameters["window"] == 32
    assert infos["adakv"].parameters == {"floor": 0.2}
    assert infos["adakv"].wraps and not infos["snapkv"].wraps
    assert infos["adakv"].signature() == "adakv(METHOD, floor=0.2)"
    assert infos["snapkv"].signature() == "snapkv(ratio=None, budget=None, window=32, kernel=7, pooling='avg')"


def test_list_methods_parameters_match_the_dataclasses():
    for info in list_methods():
        cls = kvstack.spec.registry()[info.name][0]
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "inner"}
        assert set(fields) == set(info.parameters)
        for name, field in fields.items():
            assert info.parameters[name] == field.default


def test_describe_lists_every_method():
    text = describe()
    for info in list_methods():
        assert info.signature() in text
        assert info.description in text
        assert info.category in text


@pytest.mark.parametrize("spec", ["h2o(budget=0)", "random(budget=0)", "streamingllm(budget=0, sinks=0)"])
def test_zero_budget_is_refused(spec):
    with pytest.raises(kvstack.SpecError, match="budget must be >= 1"):
        kvstack.parse(spec)


def test_unquoted_text_value_names_the_fix():
    with pytest.raises(kvstack.SpecError, match="quote text values"):
        kvstack.parse("snapkv(ratio=0.5, pooling=avg)")
