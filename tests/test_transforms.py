"""Model transforms: fewer KV heads (gqa), against weights computed independently and exact-conversion cases."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import build_model, build_peaky, hook_kv_sharing, random_ids, usage_error

import kvstack
from kvstack.transforms import TransformError

CALIBRATION = random_ids(64, batch=4, seed=11)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_keeping_every_kv_head_changes_nothing_and_the_input_is_not_modified(model) -> None:
    weights = {name: p.clone() for name, p in model.named_parameters()}
    ids = random_ids(20)
    new, record = kvstack.transform(model, "gqa(kv_heads=4, how='svd')", calibration_ids=CALIBRATION)
    torch.testing.assert_close(_logits(new, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    kvstack.transform(model, "gqa(kv_heads=1)")
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert model.config.num_key_value_heads == 4 and record["kv_bytes_per_token"][0] == record["kv_bytes_per_token"][1]


def test_mean_pooling_averages_each_group_of_adjacent_heads(model) -> None:
    new, record = kvstack.transform(model, "gqa(kv_heads=2)")
    assert new.config.num_key_value_heads == 2 and record["groups"][0] == [[0, 1], [2, 3]]
    assert record["kv_bytes_per_token"] == [2 * 2 * 4 * 8 * 4, 2 * 2 * 2 * 8 * 4]  # layers, heads, head_dim 8
    for old_layer, new_layer in zip(model.model.layers, new.model.layers, strict=True):
        for name in ("k_proj", "v_proj"):
            old = getattr(old_layer.self_attn, name).weight.view(4, 8, -1)
            expected = torch.stack((old[0:2].mean(0), old[2:4].mean(0))).view(16, -1)
            torch.testing.assert_close(getattr(new_layer.self_attn, name).weight, expected)
        assert torch.equal(new_layer.self_attn.q_proj.weight, old_layer.self_attn.q_proj.weight)
        assert new_layer.self_attn.num_key_value_groups == 4


def _twin_heads(pairs: list[tuple[int, int]]) -> torch.nn.Module:
    """A 4-KV-head model (head_dim 8) whose heads in each pair have identical key and value projections."""
    twin = build_model(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, seed=3)
    with torch.no_grad():
        for layer in twin.model.layers:
            for name in ("k_proj", "v_proj"):
                weight = getattr(layer.self_attn, name).weight.view(4, 8, -1)
                for source, copy in pairs:
                    weight[copy] = weight[source]
    return twin


def test_similarity_grouping_finds_identical_heads_and_converts_them_exactly() -> None:
    twin = _twin_heads([(0, 2), (1, 3)])  # heads 0 and 2 alike, 1 and 3 alike: not adjacent
    ids = random_ids(24)
    similar, record = kvstack.transform(twin, "gqa(kv_heads=2, how='similarity')", calibration_ids=CALIBRATION)
    assert record["groups"][0] == [[0, 2], [1, 3]]
    torch.testing.assert_close(_logits(similar, ids), _logits(twin, ids), atol=1e-5, rtol=1e-5)
    adjacent, _ = kvstack.transform(twin, "gqa(kv_heads=2, how='mean')")
    assert not torch.allclose(_logits(adjacent, ids), _logits(twin, ids), atol=1e-3)


def test_svd_merge_is_exact_when_heads_are_rotary_and_linear_multiples() -> None:
    """Keys of head 1 are a complex scalar (per rotary pair) times head 0's, values a linear map of head 0's:
    the SVD merge into one KV head, folded into queries and output, keeps every logit."""
    model = build_model(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, seed=5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            keys = layer.self_attn.k_proj.weight.view(2, 16, -1)
            scale = torch.randn(8, generator=generator) + 1j * torch.randn(8, generator=generator)
            first = torch.complex(keys[0, :8], keys[0, 8:])
            second = scale.unsqueeze(-1) * first
            keys[1] = torch.cat((second.real, second.imag))
            values = layer.self_attn.v_proj.weight.view(2, 16, -1)
            values[1] = torch.randn(16, 16, generator=generator) @ values[0]
    ids = random_ids(24)
    merged, _ = kvstack.transform(model, "gqa(kv_heads=1, how='svd')", calibration_ids=CALIBRATION)
    torch.testing.assert_close(_logits(merged, ids), _logits(model, ids), atol=1e-4, rtol=1e-4)
    pooled, _ = kvstack.transform(model, "gqa(kv_heads=1, how='mean')")
    assert not torch.allclose(_logits(pooled, ids), _logits(model, ids), atol=1e-2)


def test_svd_is_closer_to_the_model_than_mean_pooling(model) -> None:
    ids = random_ids(32, seed=9)
    reference = _logits(model, ids)
    errors = {}
    for how in ("mean", "svd"):
        new, _ = kvstack.transform(model, f"gqa(kv_heads=1, how={how!r})", calibration_ids=CALIBRATION)
        errors[how] = float((_logits(new, ids) - reference).pow(2).mean())
    assert errors["svd"] < errors["mean"]


def test_a_transformed_model_runs_every_cache_method_and_reports_its_bytes(model) -> None:
    new, _ = kvstack.transform(model, "gqa(kv_heads=1, how='svd')", calibration_ids=CALIBRATION)
    ids = random_ids(64)
    full_old = kvstack.make_cache(model, "full")
    kvstack.prefill(model, ids, full_old)
    full_new = kvstack.make_cache(new, "full")
    kvstack.prefill(new, ids, full_new)
    assert full_new.full_kv_bytes() * 4 == full_old.full_kv_bytes()
    composed = kvstack.make_cache(new, "snapkv(ratio=0.5) + kivi(bits=4, group_size=8, residual=16)")
    kvstack.prefill(new, ids, composed)
    assert composed.kv_bytes() == sum(layer.kv_bytes() for layer in composed.layers)
    assert composed.kv_bytes() < full_new.kv_bytes()
    cache = kvstack.make_cache(new, "full")
    out = new.generate(ids, **kvstack.cache_kwargs(new, cache), max_new_tokens=5, do_sample=False)
    plain = new.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, plain)


def test_the_saved_checkpoint_loads_in_plain_transformers_with_the_same_logits(model, tmp_path) -> None:
    new, _ = kvstack.transform(model, "gqa(kv_heads=2, how='svd')", calibration_ids=CALIBRATION)
    new.save_pretrained(tmp_path)
    ids = random_ids(16, seed=4)
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.float32).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits\n"
        "assert 'kvstack' not in sys.modules\n"
        "print(json.dumps(out.tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(loaded, _logits(new, ids), atol=1e-4, rtol=0)


def test_bad_transforms_are_one_line_each(model) -> None:
    with pytest.raises(TransformError, match=r"kv_heads=3 does not divide the model's 4 KV heads.*one of 1, 2, 4"):
        kvstack.transform(model, "gqa(kv_heads=3)")
    with pytest.raises(TransformError, match="fits on calibration text: pass tokenizer="):
        kvstack.transform(model, "gqa(kv_heads=2, how='svd')")
    with pytest.raises(TransformError, match="is a cache method, not a model transform"):
        kvstack.transform(model, "snapkv(ratio=0.5)")
    with pytest.raises(kvstack.InputError, match="is a model transform, not a cache method"):
        kvstack.make_cache(model, "gqa(kv_heads=2)")
    with pytest.raises(kvstack.SpecError, match="how must be one of"):
        kvstack.parse("gqa(how='median')")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(TransformError, match=r"Llama-style attention.*qwen3 is not one") as err:
        kvstack.transform(qwen3, "gqa(kv_heads=1)")
    assert "\n" not in str(err.value)


def test_cli_transform_refuses_bad_input_before_loading_a_model(capsys, tmp_path) -> None:
    err = usage_error(capsys, ["transform", "--spec", "gqa(how='median')", "--out", str(tmp_path / "x")])
    assert "how must be one of" in err
    err = usage_error(capsys, ["transform", "--spec", "snapkv(ratio=0.5)", "--out", str(tmp_path / "x")])
    assert "is a cache method" in err


def _kl(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean KL(teacher || student) per token, computed here in fp32 without kvstack."""
    target = torch.log_softmax(_logits(teacher, ids), dim=-1)
    predicted = torch.log_softmax(_logits(student, ids), dim=-1)
    return float((target.exp() * (target - predicted)).sum(-1).mean())


def test_repair_fits_only_the_changed_projections_and_leaves_the_teacher_alone(model) -> None:
    train = random_ids(32, batch=12, seed=21)
    unrepaired, _ = kvstack.transform(model, "gqa(kv_heads=1)", calibration_ids=train)
    weights = {name: p.clone() for name, p in model.named_parameters()}
    repaired, record = kvstack.transform(model, "gqa(kv_heads=1) + repair(local_steps=5, steps=5)",
                                         calibration_ids=train)
    assert record["spec"] == "gqa + repair(local_steps=5, steps=5)"  # defaults are left out
    assert record["steps"][1]["changed"] == {"0": ["k_proj", "v_proj"], "1": ["k_proj", "v_proj"]}
    before = dict(unrepaired.named_parameters())
    for name, parameter in repaired.named_parameters():
        moved = not torch.equal(parameter, before[name])
        assert moved == (".k_proj." in name or ".v_proj." in name), name  # mean-pooling changed only k and v
        assert parameter.requires_grad == before[name].requires_grad
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # the teacher is untouched


def test_repair_pulls_perturbed_projections_back_toward_the_teacher() -> None:
    from kvstack.transforms.repair import Repair

    teacher, student = _perturbed_pair()
    unseen = random_ids(32, batch=4, seed=77)
    perturbed = _kl(student, teacher, unseen)
    record = Repair(local_steps=40, steps=40, lr=0.01).fit(student, teacher, random_ids(32, batch=12, seed=21),
                                                           {0: ["k_proj", "v_proj"], 1: ["k_proj", "v_proj"]})
    assert record["held_out_local_error"][1] < 0.6 * record["held_out_local_error"][0]
    assert record["held_out_kl"][1] < record["held_out_kl"][0]
    assert _kl(student, teacher, unseen) < 0.8 * perturbed


def _perturbed_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A teacher and a student whose k and v projections carry noise (the optimum is known: the teacher's)."""
    from kvstack.transforms.base import attention_layers

    teacher = build_peaky(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
    student = copy.deepcopy(teacher)
    noise = torch.Generator().manual_seed(5)
    for module in attention_layers(student):
        for weight in (module.k_proj.weight, module.v_proj.weight):
            weight.add_(0.5 * weight.std() * torch.randn(weight.shape, generator=noise))
    return teacher, student


def test_a_repair_begun_past_its_time_bound_changes_nothing() -> None:
    import time

    from kvstack.transforms.repair import Repair

    teacher, student = _perturbed_pair()
    before = {name: p.clone() for name, p in student.named_parameters()}
    record = Repair(local_steps=5, steps=5, minutes=1).fit(
        student, teacher, random_ids(32, batch=8, seed=21), {0: ["k_proj", "v_proj"], 1: ["k_proj", "v_proj"]},
        started=time.perf_counter() - 120)
    assert (record["steps"], record["layers_fitted"]) == (0, 0)
    assert all(torch.equal(p, before[name]) for name, p in student.named_parameters())


def test_a_time_bounded_repair_runs_the_steps_that_fit_and_anneals_over_them(monkeypatch) -> None:
    from kvstack.transforms import repair as repair_module

    class Clock:  # every reading advances one second: the run's length in readings is what is bounded
        now = 0.0

        def perf_counter(self) -> float:
            self.now += 1.0
            return self.now

    clock = Clock()
    monkeypatch.setattr(repair_module, "time", clock)
    rates: list[float] = []
    original = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):  # the learning rate of every whole-model step
        if len(self.param_groups[0]["params"]) == 4:
            rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    teacher, student = _perturbed_pair()
    record = repair_module.Repair(local_steps=2, steps=1000, lr=0.01, minutes=1).fit(
        student, teacher, random_ids(32, batch=8, seed=21), {0: ["k_proj", "v_proj"], 1: ["k_proj", "v_proj"]},
        started=0.0)
    assert record["layers_fitted"] == 2
    assert repair_module.TIMED_STEPS < record["steps"] < 1000
    assert len(rates) == record["steps"]
    assert clock.now <= 60 + 3  # the bound, give or take the closing readings
    assert rates[-1] < 0.01 * max(rates)  # the cosine decay was laid over the steps that ran, not over 1000


def test_repair_multiplies_in_bf16_only_where_the_hardware_does(monkeypatch) -> None:
    from kvstack.transforms import repair as repair_module

    for native in (False, True):
        monkeypatch.setattr(repair_module, "fast_bf16", lambda device, native=native: native)
        with repair_module._autocast(torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu") == native
    with pytest.raises(kvstack.SpecError, match=r"minutes must be a time bound in \[0, 1440\)"):
        kvstack.parse("repair(minutes=-1)")


def test_repair_after_svd_trains_the_folded_query_and_output_too(model) -> None:
    train = random_ids(32, batch=6, seed=3)
    _, record = kvstack.transform(model, "gqa(kv_heads=2, how='svd') + repair(local_steps=1, steps=0)",
                                  calibration_ids=train)
    assert record["steps"][1]["changed"]["0"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert record["kv_bytes_per_token"] == [2 * 2 * 4 * 8 * 4, 2 * 2 * 2 * 8 * 4]


def test_repair_is_refused_where_it_has_nothing_to_fit(model, capsys, tmp_path) -> None:
    with pytest.raises(TransformError, match=r"fits what a transform changed: put it after one"):
        kvstack.transform(model, "repair()", calibration_ids=CALIBRATION)
    with pytest.raises(kvstack.SpecError, match=r"comes after one"):
        kvstack.parse("repair() + gqa(kv_heads=1)")
    with pytest.raises(TransformError, match="no changed projections"):
        kvstack.transform(model, "gqa(kv_heads=4) + repair(local_steps=1, steps=0)", calibration_ids=CALIBRATION)
    with pytest.raises(kvstack.SpecError, match="cannot join model transforms and cache methods"):
        kvstack.parse("gqa(kv_heads=1) + snapkv(ratio=0.5)")
    with pytest.raises(kvstack.SpecError, match=r"lr must be a learning rate in \(0, 1\)"):
        kvstack.parse("repair(lr=2.0)")
    with pytest.raises(kvstack.SpecError, match="trains nothing"):
        kvstack.parse("repair(local_steps=0, steps=0)")
    with pytest.raises(TransformError, match="repair trains on text: pass tokenizer="):
        kvstack.transform(model, "gqa(kv_heads=1) + repair()")
    err = usage_error(capsys, ["transform", "--spec", "repair()", "--out", str(tmp_path / "x")])
    assert "put it after one" in err


def test_the_engine_serves_a_converted_checkpoint_as_transformers_generates_it(tmp_path) -> None:
    from conftest import prompt_of, reference_generate
    from transformers import AutoModelForCausalLM

    from kvstack.engine import Engine, SamplingParams

    base = build_model(vocab_size=200, max_position_embeddings=64, initializer_range=0.1)
    new, _ = kvstack.transform(base, "gqa(kv_heads=1, how='svd')", calibration_ids=random_ids(32, batch=4, seed=2))
    new.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    shared = prompt_of(11, seed=5, vocab=200)
    prompts = [shared + prompt_of(4, seed=6, vocab=200), shared + prompt_of(7, seed=7, vocab=200),
               prompt_of(9, seed=8, vocab=200)]
    engine = Engine(new, memory_mb=1.0, block_size=4)
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    assert outputs == [reference_generate(loaded, prompt, 8) for prompt in prompts]
    assert engine.metrics()["prefix_cache_hits_tokens"] > 0


def test_the_engine_serves_a_cla_model_as_transformers_generates_it_with_a_pool_of_only_the_storing_layers(
        ) -> None:
    from conftest import prompt_of

    from kvstack.engine import Engine, PagedKVPool, SamplingParams

    base = build_model(num_hidden_layers=4, vocab_size=200, max_position_embeddings=64, initializer_range=0.1)
    new, _ = kvstack.transform(base, "cla(pairs='1:0,3:0')")
    shared = prompt_of(11, seed=5, vocab=200)
    prompts = [shared + prompt_of(4, seed=6, vocab=200), shared + prompt_of(7, seed=7, vocab=200),
               prompt_of(9, seed=8, vocab=200)]
    expected = []
    for prompt in prompts:  # transformers' DynamicCache, one prompt at a time
        ids = torch.tensor([prompt])
        expected.append(new.generate(ids, max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist())
    engine = Engine(new, memory_mb=1.0, block_size=4)
    assert engine.pool.num_layers == 2  # layers 0 and 2 store; 1 and 3 read layer 0's blocks
    whole = PagedKVPool.from_budget(1.0, 4, engine.pool.num_kv_heads, engine.pool.head_dim, block_size=4)
    assert engine.pool.num_blocks == 2 * whole.num_blocks  # the same memory holds twice the tokens
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=8))
    assert outputs == expected
    assert engine.metrics()["prefix_cache_hits_tokens"] > 0
    assert Engine(base, memory_mb=1.0).namespace != Engine(new, memory_mb=1.0).namespace


@pytest.mark.parametrize("spec", ["h2o(budget=12)", "snapkv(budget=16, window=4)", "streamingllm(budget=12, sinks=2)"])
def test_the_engine_compresses_a_cla_model_as_its_kvstack_cache_does(spec: str) -> None:
    from conftest import cache_generate, engine_generate, prompt_of

    base = build_model(num_hidden_layers=4, vocab_size=200, max_position_embeddings=64, initializer_range=0.1)
    new, _ = kvstack.transform(base, "cla(pairs='1:0,3:2')")
    prompt = prompt_of(40, seed=1, vocab=200)
    # with blocks of one token the engine compacts exactly when the core cache evicts: the same greedy tokens
    expected = cache_generate(new, prompt, spec, 10)
    assert expected != cache_generate(new, prompt, None, 10)  # eviction changed what the model read
    output, metrics = engine_generate(new, prompt, spec, 10, block_size=1)
    assert output == expected
    assert metrics["compression_evicted_tokens"] > 0


def test_quest_in_the_engine_reads_a_cla_model_s_blocks_by_each_layer_s_own_query() -> None:
    from conftest import engine_generate, prompt_of

    base = build_model(num_hidden_layers=4, vocab_size=200, max_position_embeddings=128, initializer_range=0.1)
    new, _ = kvstack.transform(base, "cla(pairs='1:0,3:2')")
    prompt = prompt_of(60, seed=1, vocab=200)
    full, _ = engine_generate(new, prompt, None, 8, block_size=4)
    # a budget covering every block is the full attention; two blocks of fifteen read only what each selects
    assert engine_generate(new, prompt, "quest(budget=64, page=4)", 8, block_size=4)[0] == full
    assert engine_generate(new, prompt, "quest(budget=8, page=4)", 8, block_size=4)[0] != full


def _reference_run(model: torch.nn.Module, pairs: dict[int, int], ids: torch.Tensor) -> tuple:
    """The hook reference's logits on ``ids`` and its greedy 6 tokens after ``ids[:1]`` (hooks removed after)."""
    handles = hook_kv_sharing(model, pairs)
    try:
        return _logits(model, ids), model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()


def test_cla_attends_with_the_lower_layers_keys_and_values_and_its_layers_store_nothing() -> None:
    base = build_model(num_hidden_layers=4)
    ids = random_ids(24, batch=2, seed=8)
    new, record = kvstack.transform(base, "cla(pairs='1:0,3:2')")
    assert record["pairs"] == {"1": 0, "3": 2}
    assert record["kv_bytes_per_token"] == [4 * 2 * 2 * 16 * 4, 2 * 2 * 2 * 16 * 4]  # half the layers store
    assert not hasattr(new.model.layers[1].self_attn, "k_proj") and hasattr(base.model.layers[1].self_attn, "k_proj")
    expected, reference_tokens = _reference_run(base, {1: 0, 3: 2}, ids)
    torch.testing.assert_close(_logits(new, ids), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(new.generate(ids[:1], max_new_tokens=6, do_sample=False), reference_tokens)  # DynamicCache
    cache = kvstack.make_cache(new, "full")
    out = new.generate(ids[:1], **kvstack.cache_kwargs(new, cache), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference_tokens)
    per_layer = [layer.kv_bytes() for layer in cache.layers]
    assert per_layer[1] == per_layer[3] == 0 and per_layer[0] > 0 and per_layer[2] > 0


def test_cla_takes_the_cheapest_adjacent_pairs_by_the_measured_cost() -> None:
    from kvstack.transforms.sharing import sharing_costs

    base = build_peaky(num_hidden_layers=6)
    calibration = random_ids(32, batch=2, seed=4)
    costs = sharing_costs(base, calibration)
    _, record = kvstack.transform(base, "cla(layers=2, choose='attention')", calibration_ids=calibration)
    chosen = {int(upper): lower for upper, lower in record["pairs"].items()}
    assert len(chosen) == 2 and all(lower == upper - 1 for upper, lower in chosen.items())
    assert not set(chosen) & set(chosen.values())
    cheapest = min(costs, key=costs.__getitem__)
    assert cheapest in chosen
    # the cost of one pair, recomputed with the hook reference: layer u's attention output, shared vs own
    upper = cheapest
    outputs = {}
    attention = base.model.layers[upper].self_attn
    hook = attention.register_forward_hook(lambda m, a, o: outputs.setdefault("x", []).append(o[0]))
    try:
        with torch.no_grad():
            for row in calibration:
                base(input_ids=row[None])
            handles = hook_kv_sharing(base, {upper: upper - 1})
            for row in calibration:
                base(input_ids=row[None])
    finally:
        hook.remove()
        for handle in handles:
            handle.remove()
    own, shared = outputs["x"][:2], outputs["x"][2:]
    expected = sum(float((s - o).pow(2).sum() / o.pow(2).sum()) for s, o in zip(shared, own, strict=True)) / 2
    assert costs[upper] == pytest.approx(expected, rel=1e-4)


def test_one_lower_layer_can_give_to_several_upper_layers() -> None:
    base = build_model(num_hidden_layers=4)
    ids = random_ids(24, batch=2, seed=8)
    new, _ = kvstack.transform(base, "cla(pairs='2:0,3:0')")  # CLA with a sharing factor of 3
    expected, reference_tokens = _reference_run(base, {2: 0, 3: 0}, ids)
    torch.testing.assert_close(_logits(new, ids), expected, atol=1e-5, rtol=1e-5)
    cache = kvstack.make_cache(new, "full")
    out = new.generate(ids[:1], **kvstack.cache_kwargs(new, cache), max_new_tokens=6, do_sample=False)
    assert torch.equal(out, reference_tokens)
    assert [layer.kv_bytes() == 0 for layer in cache.layers] == [False, False, True, True]


def test_the_whole_model_choice_adds_the_pair_that_moves_the_output_least() -> None:
    base = build_peaky(num_hidden_layers=6)
    calibration = random_ids(32, batch=2, seed=4)
    _, record = kvstack.transform(base, "cla(layers=2)", calibration_ids=calibration)  # choose='model' by default
    target = torch.log_softmax(_logits(base, calibration), -1)

    def divergence(pairs: dict[int, int]) -> float:  # the hook reference on the untouched model
        handles = hook_kv_sharing(base, pairs)
        try:
            predicted = torch.log_softmax(_logits(base, calibration), -1)
        finally:
            for handle in handles:
                handle.remove()
        return float((target.exp() * (target - predicted)).sum(-1).mean())

    alone = {upper: divergence({upper: upper - 1}) for upper in range(1, 6)}
    first = min(alone, key=alone.__getitem__)
    chosen = {int(upper): lower for upper, lower in record["pairs"].items()}
    assert chosen[first] == first - 1 and record["costs"][str(first)] == pytest.approx(alone[first], rel=1e-4)
    (second,) = set(chosen) - {first}
    allowed = [u for u in range(1, 6) if u != first and u != first - 1 and u - 1 != first]
    together = {upper: divergence({first: first - 1, upper: upper - 1}) for upper in allowed}
    assert second == min(together, key=together.__getitem__)
    assert record["costs"][str(second)] == pytest.approx(together[second], rel=1e-4)


def test_cla_then_repair_fits_the_sharing_layers_in_the_whole_model_stage() -> None:
    base = build_model(num_hidden_layers=4)
    before, _ = kvstack.transform(base, "cla(pairs='2:1')")
    new, record = kvstack.transform(base, "cla(pairs='2:1') + repair(local_steps=3, steps=3)",
                                    calibration_ids=random_ids(32, batch=8, seed=3))
    assert record["steps"][1]["changed"] == {"1": ["k_proj", "v_proj"], "2": ["o_proj", "q_proj"]}
    old = dict(before.named_parameters())
    moved = {name for name, p in new.named_parameters() if not torch.equal(p, old[name])}
    assert moved == {"model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                     "model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.o_proj.weight"}


def test_bad_cla_input_is_one_line_each(capsys, tmp_path) -> None:
    base = build_model(num_hidden_layers=4)
    with pytest.raises(TransformError, match=r"name layer 7, outside the model's layers 0 to 3"):
        kvstack.transform(base, "cla(pairs='7:6')")
    with pytest.raises(TransformError, match="at most 2 of the model's 4 layers"):
        kvstack.transform(base, "cla(layers=3)", calibration_ids=CALIBRATION)
    for pairs, message in (("1:2", "only share the keys and values of a layer below"), ("1-0", "upper:lower"),
                           ("2:1,3:2", "both shares")):
        with pytest.raises(kvstack.SpecError, match=message):
            kvstack.parse(f"cla(pairs={pairs!r})")
    with pytest.raises(kvstack.SpecError, match="choose must be one of 'attention', 'model'"):
        kvstack.parse("cla(choose='output')")
    new, _ = kvstack.transform(base, "cla(pairs='1:0')")
    with pytest.raises(kvstack.InputError, match=r"share keys and values \(cla\), so quest\(.*slow tier"):
        kvstack.make_cache(new, "quest(budget=16, page=4)")
    with pytest.raises(TransformError, match="gqa cannot follow cla"):
        kvstack.transform(base, "cla(pairs='1:0') + gqa(kv_heads=1)")
    from kvstack.engine import Engine
    from kvstack.errors import KVStackError

    with pytest.raises(KVStackError, match=r"share keys and values \(cla\); quest\(.*\) keeps dense layers"):
        Engine(new, memory_mb=1.0, block_size=4).add_request([1, 2, 3], method="quest(budget=16, page=4, "
                                                                            "dense_layers=1)")
    err = usage_error(capsys, ["transform", "--spec", "cla(pairs='3:5')", "--out", str(tmp_path / "x")])
    assert "layer below" in err


def test_a_saved_shared_kv_model_loads_back_exactly_with_nothing_of_its_own_in_the_upper_layers(tmp_path) -> None:
    from kvstack.transforms.checkpoint import WEIGHTS, load_transformed, save_transformed

    base = build_model(num_hidden_layers=4)
    new, _ = kvstack.transform(base, "cla(pairs='2:0,3:0')")
    save_transformed(new, tmp_path)
    assert (tmp_path / WEIGHTS).is_file()
    loaded = load_transformed(tmp_path, torch.float32).eval()
    assert not hasattr(loaded.model.layers[2].self_attn, "k_proj")  # the sharing layers hold no K/V projection
    assert loaded.model.layers[3].self_attn.source_index == 0
    ids = random_ids(16, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, new(input_ids=ids).logits)
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, new.generate(ids, max_new_tokens=4, do_sample=False))
