"""Latent (MLA-style) caching: the converted attention against an independent partial-RoPE reference, the cache
holding only latents and rotary keys, the rotary-pair rules, repair, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, random_ids, stepwise_logits, usage_error
from transformers import DynamicCache

import kvstack
from kvstack.errors import KVStackError
from kvstack.transforms import TransformError

CALIBRATION = random_ids(48, batch=4, seed=11)
HEADS, HEAD_DIM, LAYERS = 2, 16, 2  # conftest's tiny llama: 4 query heads, 2 KV heads, hidden 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(initializer_range=0.1)


def _attention_inputs(model: torch.nn.Module, length: int = 12) -> tuple[torch.Tensor, tuple]:
    """``[1, T, h]`` random hidden states and the model's own rotary tables for positions ``0 .. T - 1``."""
    hidden = torch.randn(1, length, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(length).unsqueeze(0)
    return hidden, model.model.rotary_emb(hidden, positions)


def test_at_full_rank_the_latent_attention_is_the_original_with_rope_only_on_the_kept_pairs(model) -> None:
    from kvstack.transforms.latent import _latent_attention

    original = model.model.layers[0].self_attn
    hidden, (cos, sin) = _attention_inputs(model)
    for kept in ([0, 1, 2, 3, 4, 5, 6, 7], [0, 2], [5]):
        pairs = torch.tensor([kept] * HEADS)
        full_rank = HEADS * (2 * HEAD_DIM - 2 * len(kept))
        latent, error = _latent_attention(original, pairs, full_rank, HEADS, HEAD_DIM, None)
        # the reference: transformers' own attention, its rotary tables set to no rotation on the dropped pairs
        dropped = torch.tensor([f for f in range(HEAD_DIM // 2) if f not in kept], dtype=torch.long)
        plain_cos, plain_sin = cos.clone(), sin.clone()
        for table, value in ((plain_cos, 1.0), (plain_sin, 0.0)):
            table[..., dropped] = value
            table[..., dropped + HEAD_DIM // 2] = value
        expected = original(hidden_states=hidden, position_embeddings=(plain_cos, plain_sin), attention_mask=None)[0]
        got = latent(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)[0]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        assert error < 1e-12


def test_the_cache_holds_only_latents_and_rotary_keys_and_decodes_as_transformers_does(model) -> None:
    new, record = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    per_token = LAYERS * (24 + HEADS * 4) * 4
    assert record["kv_bytes_per_token"] == [LAYERS * 2 * HEADS * HEAD_DIM * 4, per_token]
    ids = random_ids(20, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence
    cache = kvstack.make_cache(new, "full")
    got = stepwise_logits(new, ids, cache, mask, steps=5)
    expected = stepwise_logits(new, ids, DynamicCache(), mask, steps=5)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    tokens = 20 + 5
    assert cache.kv_bytes() == 2 * tokens * per_token  # batch 2, exactly the tensors stored, nothing else
    assert cache.full_kv_bytes() == 2 * tokens * record["kv_bytes_per_token"][0]
    layer = cache.layers[0]
    assert layer.keys.shape == (2, HEADS, tokens, 4) and layer.values.shape == (2, 1, tokens, 24)
    # a whole forward without a cache gives the same last logits as the cached prompt
    with torch.no_grad():
        whole = new(input_ids=ids, attention_mask=mask[:, :20]).logits[:, -1]
    torch.testing.assert_close(got[0], whole, atol=1e-5, rtol=1e-5)


def test_more_rank_and_more_rotary_dims_approach_the_original(model) -> None:
    ids = random_ids(24, batch=2, seed=9)
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=ids).logits, -1)

    def divergence(spec: str) -> float:
        new, _ = kvstack.transform(model, spec, calibration_ids=CALIBRATION)
        with torch.no_grad():
            predicted = torch.log_softmax(new(input_ids=ids).logits, -1)
        return float((reference.exp() * (reference - predicted)).sum(-1).mean())

    assert divergence("mla(rank=8, rope_dims=8)") > divergence("mla(rank=40, rope_dims=8)")
    assert divergence("mla(rank=36, rope_dims=4)") > divergence("mla(rank=36, rope_dims=12)")


def test_the_rotary_pair_rules() -> None:
    # theta so large that pair 7 barely turns (inv_freq 1e-8.75 per token); its keys are made the largest
    slow = build_model(rope_theta=1e10, initializer_range=0.1)
    with torch.no_grad():
        for layer in slow.model.layers:
            weight = layer.self_attn.k_proj.weight.view(HEADS, HEAD_DIM, -1)
            weight[:, [7, 15]] *= 30
    pairs = {}
    for keep in ("norm", "cost", "high"):
        _, record = kvstack.transform(slow, f"mla(rank=20, rope_dims=2, keep={keep!r})", calibration_ids=CALIBRATION)
        pairs[keep] = record["rotary_pairs"][0]
    assert pairs["norm"] == [[7], [7]]  # MHA2MLA's 2-norm rule keeps RoPE where the norms are largest
    assert pairs["high"] == [[0], [0]]  # the fastest-turning pair
    assert 7 not in pairs["cost"][0] + pairs["cost"][1]  # a pair that never turns loses nothing without RoPE


def test_repair_fits_the_latent_projections_only(model) -> None:
    train = random_ids(32, batch=24, seed=21)
    unrepaired, _ = kvstack.transform(model, "mla(rank=12, rope_dims=4)", calibration_ids=train)
    spec = "mla(rank=12, rope_dims=4) + repair(local_steps=40, steps=10, lr=0.003)"
    repaired, record = kvstack.transform(model, spec, calibration_ids=train)
    assert record["steps"][1]["changed"]["0"] == ["k_rope_proj", "kv_down", "kv_up", "q_proj"]
    before = dict(unrepaired.named_parameters())
    moved = {name.split(".self_attn.")[-1].split(".")[0] for name, p in repaired.named_parameters()
             if not torch.equal(p, before[name])}
    assert moved == {"k_rope_proj", "kv_down", "kv_up", "q_proj"}
    local, divergence = record["steps"][1]["held_out_local_error"], record["steps"][1]["held_out_kl"]
    assert local[1] < 0.97 * local[0] and divergence[1] < 0.9 * divergence[0]


def test_the_engine_serves_an_mla_model_from_a_pool_of_latents_as_transformers_generates_it(model, tmp_path
                                                                                           ) -> None:
    from conftest import prompt_of

    from kvstack.engine import Engine, PagedKVPool, PagedLatentPool, SamplingParams

    new, _ = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    vocab = model.config.vocab_size
    shared = prompt_of(13, seed=5, vocab=vocab)
    prompts = [shared + prompt_of(4, seed=6, vocab=vocab), shared + prompt_of(9, seed=7, vocab=vocab),
               prompt_of(10, seed=8, vocab=vocab)]
    with torch.no_grad():  # transformers' DynamicCache, one prompt at a time
        expected = [new.generate(torch.tensor([p]), max_new_tokens=7, do_sample=False)[0, len(p):].tolist()
                    for p in prompts]
    engine = Engine(new, memory_mb=0.25, block_size=4, max_num_batched_tokens=16, host_mb=1.0,
                    disk_dir=tmp_path)
    assert isinstance(engine.pool, PagedLatentPool)
    whole = PagedKVPool.from_budget(0.25, LAYERS, HEADS, HEAD_DIM, block_size=4)
    # a token holds 24 + 2 x 4 numbers per layer instead of 2 x 2 x 16: twice the tokens in the same memory
    assert engine.pool.num_blocks == 2 * whole.num_blocks
    assert engine.generate(prompts, SamplingParams(max_new_tokens=7)) == expected  # chunked prefill, batched
    assert engine.metrics()["prefix_cache_hits_tokens"] > 0
    # a block written to the tiers and read back is the same block; one of another shape is refused, unchanged
    exported = engine.pool.export_block(0)
    engine.pool.import_block(1, exported)
    assert torch.equal(engine.pool.export_block(1)["latents"], exported["latents"])
    with pytest.raises(KVStackError, match="an imported latent block must be"):
        engine.pool.import_block(1, {"keys": exported["latents"]})
    assert torch.equal(engine.pool.export_block(1)["latents"], exported["latents"])


def test_bad_mla_input_is_one_line_each(model, capsys, tmp_path) -> None:
    with pytest.raises(TransformError, match=r"rank=64 is too large: .* the latent must be 1 to 47"):
        kvstack.transform(model, "mla(rank=64, rope_dims=8)", calibration_ids=CALIBRATION)
    with pytest.raises(TransformError, match=r"rope_dims=32 is above the head dimension 16"):
        kvstack.transform(model, "mla(rank=8, rope_dims=32)", calibration_ids=CALIBRATION)
    for spec, message in (("mla(rope_dims=3)", "even number of rotary dimensions"), ("mla(rank=0)", "positive latent"),
                          ("mla(keep='low')", "keep must be one of")):
        with pytest.raises(kvstack.SpecError, match=message):
            kvstack.parse(spec)
    new, _ = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    with pytest.raises(kvstack.InputError, match="caches latents \\(mla\\), which composes only with 'full'"):
        kvstack.make_cache(new, "kivi(bits=4)")
    for spec, message in (("mla(rank=24) + mla(rank=8)", "apply mla once"), ("mla(rank=24) + gqa(kv_heads=1)",
                                                                            "gqa cannot follow cla or mla"),
                          ("cla(pairs='1:0') + mla(rank=24)", "mla cannot follow cla")):
        with pytest.raises(TransformError, match=message):
            kvstack.transform(model, spec, calibration_ids=CALIBRATION)
    from kvstack.engine import Engine
    from kvstack.errors import KVStackError

    with pytest.raises(KVStackError, match="caches latents \\(mla\\); the engine serves it with the full cache"):
        Engine(new, memory_mb=1.0, block_size=4).add_request([1, 2, 3], method="quest(budget=16, page=4)")
    err = usage_error(capsys, ["transform", "--spec", "mla(rope_dims=5)", "--out", str(tmp_path / "x")])
    assert "even number" in err


def test_a_saved_latent_model_loads_back_exactly_and_plain_transformers_refuses_it(model, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from kvstack.transforms.checkpoint import WEIGHTS, load_transformed, save_transformed

    new, _ = kvstack.transform(model, "mla(rank=24)", calibration_ids=CALIBRATION)
    save_transformed(new, tmp_path)
    assert (tmp_path / WEIGHTS).is_file() and not (tmp_path / "model.safetensors").exists()
    loaded = load_transformed(tmp_path, torch.float32).eval()
    ids = random_ids(16, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, new(input_ids=ids).logits)
    for got, want in zip(loaded.model.layers, new.model.layers, strict=True):
        assert torch.equal(got.self_attn.rotary_index, want.self_attn.rotary_index)
    cache, reference = kvstack.make_cache(loaded, "full"), kvstack.make_cache(new, "full")
    kvstack.prefill(loaded, ids, cache)
    kvstack.prefill(new, ids, reference)
    assert cache.kv_bytes() == reference.kv_bytes()  # latents and rotary keys, as the transformed model caches
    with pytest.raises(OSError):  # no model.safetensors: plain transformers cannot run latent attention
        AutoModelForCausalLM.from_pretrained(tmp_path)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({f"w{i}": i for i in range(model.config.vocab_size)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(tmp_path)
    through_kvstack, _ = kvstack.load_model(str(tmp_path))  # kvstack's loader reads its own format
    with torch.no_grad():
        assert torch.equal(through_kvstack(input_ids=ids).logits, new(input_ids=ids).logits)
