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


def _group_bound(exact: torch.Tensor, group: int, along_tokens: bool, bits: int) -> torch.Tensor:
    """Half a quantization step of each element's group (``[B, H, N, D]``, ``N`` a multiple of ``group``): the
    most round-to-nearest group-wise integer codes may be off by, before float16 metadata."""
    batch, heads, tokens, dims = exact.shape
    if along_tokens:  # per channel: groups of tokens
        grouped = exact.view(batch, heads, tokens // group, group, dims)
        step = (grouped.amax(3, keepdim=True) - grouped.amin(3, keepdim=True)) / (2**bits - 1)
    else:  # per token: groups of channels
        grouped = exact.view(batch, heads, tokens, dims // group, group)
        step = (grouped.amax(4, keepdim=True) - grouped.amin(4, keepdim=True)) / (2**bits - 1)
    return (step / 2).expand_as(grouped).reshape(exact.shape)


def test_a_codec_encodes_the_rotary_keys_and_latents_older_than_its_window(model) -> None:
    new, record = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    ids = random_ids(70, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding in the second sequence
    reference = DynamicCache()
    full_logits = stepwise_logits(new, ids, reference, mask, steps=4)
    tokens = 70 + 4
    # a window that covers every token encodes nothing: the latent cache's logits and bytes, exactly
    whole = kvstack.make_cache(new, "kivi(bits=2, group_size=8, residual=128)")
    for a, b in zip(stepwise_logits(new, ids, whole, mask, steps=4), full_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert whole.kv_bytes() == 2 * tokens * record["kv_bytes_per_token"][1]
    prompt_reference = DynamicCache()
    stepwise_logits(new, ids, prompt_reference, mask, steps=0)
    errors = {}
    for bits in (2, 4, 8):
        spec = f"kivi(bits={bits}, group_size=8, residual=8, sinks=3)"
        logits = stepwise_logits(new, ids, kvstack.make_cache(new, spec), mask, steps=4)
        # the prompt's forward attends to its own chunk exactly, as every kvstack codec does: equal logits
        torch.testing.assert_close(logits[0], full_logits[0], atol=1e-5, rtol=1e-5)
        errors[bits] = max(float((a - b).abs().max()) for a, b in zip(logits, full_logits, strict=True))
        cache = kvstack.make_cache(new, spec)
        stepwise_logits(new, ids, cache, mask, steps=0)
        layer = cache.layers[1]
        chunk = 32  # kivi's chunk: whole chunks of 32 tokens are encoded once more than 8 wait
        encoded = (70 - 3 - 8) // chunk * chunk
        assert layer.encoded == layer.capacity == encoded and layer.keys.shape[2] == 70 - 3 - encoded
        exact_keys, exact_latents = prompt_reference.layers[1].keys, prompt_reference.layers[1].values
        keys, latents = layer.tokens()
        # the sinks and the window are exact; each encoded element within half its group's step (plus float16)
        for got, exact in ((keys, exact_keys), (latents, exact_latents)):
            assert torch.equal(got[:, :, :3], exact[:, :, :3])
            assert torch.equal(got[:, :, 3 + encoded :], exact[:, :, 3 + encoded :])
        span = slice(3, 3 + encoded)
        for got, exact, along_tokens in ((keys, exact_keys, True), (latents, exact_latents, False)):
            bound = _group_bound(exact[:, :, span], 8, along_tokens, bits)
            slack = 2e-3 * exact[:, :, span].abs().amax() + 1e-4
            assert bool(((got[:, :, span] - exact[:, :, span]).abs() <= bound + slack).all()), bits
        # bytes: full-precision sinks and window, then codes and float16 scale and zero per group
        rotary_keys = HEADS * 4  # per token and sequence
        codes = 2 * encoded * (rotary_keys + 24) * bits // 8
        metadata = 2 * 2 * (2 * HEADS * (encoded // 8) * 4 + 2 * encoded * (24 // 8))
        full_precision = 2 * (70 - encoded) * (HEADS * 4 + 24) * 4
        assert layer.kv_bytes() == codes + metadata + full_precision
    assert errors[8] < errors[4] < errors[2]  # more bits, closer to the latent cache's logits


def _held_as_dynamic_cache(cache: object) -> DynamicCache:
    """A transformers cache holding exactly the rotary keys and latents each kvstack latent layer holds."""
    reference = DynamicCache()
    for index, layer in enumerate(cache.layers):
        reference.update(layer.keys.clone(), layer.values.clone(), index)
    return reference


@pytest.mark.parametrize("spec", ["snapkv(budget=16, window=4)", "h2o(budget=16)", "tova(budget=16)",
                                  "streamingllm(budget=16)"])
def test_an_evicting_policy_keeps_whole_tokens_of_a_latent_cache_and_attends_over_exactly_them(model, spec) -> None:
    new, record = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    ids = random_ids(40, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence
    # a budget above every token evicts nothing: the latent cache's logits
    whole = kvstack.make_cache(new, spec.replace("budget=16", "budget=1000"))
    for a, b in zip(stepwise_logits(new, ids, whole, mask, steps=3),
                    stepwise_logits(new, ids, DynamicCache(), mask, steps=3), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    cache = kvstack.make_cache(new, spec)
    prompt = stepwise_logits(new, ids, cache, mask, steps=0)[0]
    reference = DynamicCache()
    stepwise_logits(new, ids, reference, mask, steps=0)
    token = prompt.argmax(-1, keepdim=True)
    for step in range(3):
        layer = cache.layers[1]
        positions = layer.positions[:, 0].long()  # [B, 16] ascending true positions, shared by the heads
        held_now = 16 if cache.method.dynamic else 16 + step  # snapkv compresses the prompt once
        assert positions.shape == (2, held_now) and bool((positions.diff(dim=-1) > 0).all())
        # the held rows are the prompt's own rows at those positions, unchanged (sequence 0 has no padding)
        if step == 0:
            assert torch.equal(layer.keys[0], reference.layers[1].keys[0][:, positions[0]])
            assert torch.equal(layer.values[0], reference.layers[1].values[0][:, positions[0]])
            if spec.startswith("streamingllm"):  # four sinks and the most recent tokens (paper behaviour)
                assert positions[0].tolist() == [0, 1, 2, 3, *range(28, 40)]
        # the next step over the held tokens equals transformers attending over a cache of exactly those rows
        held = _held_as_dynamic_cache(cache)
        next_position = layer.next_position.view(2, 1)
        step_mask = torch.cat(((layer.positions[:, 0] >= 0).long(), torch.ones_like(token)), dim=1)
        with torch.no_grad():
            expected = new(input_ids=token, **kvstack.cache_kwargs(new, held), attention_mask=step_mask,
                           position_ids=next_position).logits[:, -1]
            got = new(input_ids=token, **kvstack.cache_kwargs(new, cache), position_ids=next_position,
                      attention_mask=torch.ones(2, 41 + step, dtype=torch.long)).logits[:, -1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        token = got.argmax(-1, keepdim=True)
    # bytes: the held rotary keys and latents, each token's position, the next positions and the policy's state
    per_token = record["kv_bytes_per_token"][1] // LAYERS
    state = 2 * HEADS * 4 * len(cache.method.state_names)
    held = cache.layers[0].positions.shape[2]
    assert cache.kv_bytes() == LAYERS * (2 * held * (per_token + 4 + state // 2) + 2 * 8)
    assert held == (16 if cache.method.dynamic else 16 + 3)  # a dynamic policy holds its budget at every step


def test_a_latent_layer_keeps_the_tokens_whose_scores_summed_over_the_kv_heads_are_highest(model) -> None:
    new, _ = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    ids = random_ids(40, batch=2, seed=9)
    reference = DynamicCache()
    stepwise_logits(new, ids, reference, steps=0)
    cache = kvstack.make_cache(new, "keynorm(budget=12)")  # scores: minus each rebuilt key's norm, per head
    stepwise_logits(new, ids, cache, steps=0)
    for index in range(LAYERS):
        module = new.model.layers[index].self_attn
        keys, _ = module.rebuild(reference.layers[index].keys, reference.layers[index].values)  # [B, H, 40, D]
        summed = -keys.float().norm(dim=-1).sum(dim=1)  # [B, 40]: the latent is one token for every head
        expected = summed.topk(12, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(cache.layers[index].positions[:, 0].long(), expected)


def test_snapkv_then_a_codec_on_latents_encodes_exactly_the_tokens_snapkv_keeps(model) -> None:
    new, _ = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    ids = random_ids(90, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    alone = kvstack.make_cache(new, "snapkv(budget=60, window=4)")
    expected = stepwise_logits(new, ids, alone, mask, steps=0)
    wide = kvstack.make_cache(new, "snapkv(budget=60, window=4) + kivi(bits=4, group_size=8, residual=128)")
    torch.testing.assert_close(stepwise_logits(new, ids, wide, mask, steps=0)[0], expected[0], atol=1e-5, rtol=1e-5)
    assert wide.kv_bytes() == alone.kv_bytes()  # a window covering the kept tokens encodes none of them
    cache = kvstack.make_cache(new, "snapkv(budget=60, window=4) + kivi(bits=4, group_size=8, residual=8, sinks=2)")
    # the prompt attends to itself exactly, so snapkv keeps the same tokens; then they are encoded
    torch.testing.assert_close(stepwise_logits(new, ids, cache, mask, steps=0)[0], expected[0], atol=1e-5, rtol=1e-5)
    for index in range(LAYERS):
        layer, reference = cache.layers[index], alone.layers[index]
        assert torch.equal(layer.positions, reference.positions)
        assert layer.encoded == (60 - 2 - 8) // 32 * 32 and layer.sink_keys.shape[2] == 2
        keys, latents = layer.tokens()
        for got, exact, along_tokens in ((keys, reference.keys, True), (latents, reference.values, False)):
            assert torch.equal(got[:, :, :2], exact[:, :, :2]) and torch.equal(got[:, :, 34:], exact[:, :, 34:])
            bound = _group_bound(exact[:, :, 2:34], 8, along_tokens, 4)
            slack = 2e-3 * exact[:, :, 2:34].abs().amax() + 1e-4
            assert bool(((got[:, :, 2:34] - exact[:, :, 2:34]).abs() <= bound + slack).all())
    assert cache.kv_bytes() < alone.kv_bytes()


def _held_decoded_as_dynamic_cache(cache: object) -> DynamicCache:
    """A transformers cache holding each kvstack latent layer's tokens as it attends to them (encoded ones
    decoded), in its own order."""
    reference = DynamicCache()
    for index, layer in enumerate(cache.layers):
        keys, latents = layer.tokens()
        reference.update(keys.clone(), latents.clone(), index)
    return reference


@pytest.mark.parametrize("policy", ["streamingllm(budget=80)", "h2o(budget=80)"])
def test_a_policy_evicting_while_decoding_beside_a_codec_on_latents_replaces_encoded_tokens(model, policy) -> None:
    new, _ = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    ids = random_ids(120, batch=2, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    alone = kvstack.make_cache(new, policy)
    coded = kvstack.make_cache(new, policy + " + kivi(bits=8, group_size=8, residual=8, sinks=2)")
    full = DynamicCache()  # every token, for the rows the kvstack caches should hold
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate gives them: a padded sequence's sinks are real
    with torch.no_grad():
        # the prompt in chunks of 32: the last chunk evicts 24 tokens per sequence when 64 are already encoded
        for start in range(0, 120, 32):
            chunk = slice(start, start + 32)
            for cache in (alone, coded, full):
                out = new(input_ids=ids[:, chunk], attention_mask=mask[:, : chunk.stop],
                          position_ids=positions[:, chunk], use_cache=True, **kvstack.cache_kwargs(new, cache))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(12):  # each step one token leaves, most often an encoded one
            layer = coded.layers[1]
            assert layer.positions.shape[2] == 80 and layer.encoded > 0
            positions = layer.positions[:, 0].long()
            assert all(len(set(row.tolist())) == 80 for row in positions)
            if policy.startswith("streamingllm"):  # the same tokens as without the codec: sinks and the newest
                assert torch.equal(positions.sort(dim=-1).values, alone.layers[1].positions[:, 0].long())
            # sequence 0 (no padding): each row the first layer holds is the token at its position (that layer's
            # inputs are the embeddings, whatever was evicted), up to 8-bit rounding
            first = coded.layers[0].positions[0, 0].long()
            keys, latents = coded.layers[0].tokens()
            for got, every in ((keys, full.layers[0].keys), (latents, full.layers[0].values)):
                expected = every[0][:, first]
                assert bool(((got[0] - expected).abs() <= 0.02 * expected.abs().amax()).all())
            # the step attends to exactly the held rows (encoded ones decoded) and the new token
            held = _held_decoded_as_dynamic_cache(coded)
            next_position = layer.next_position.view(2, 1)
            step_mask = torch.cat(((layer.positions[:, 0] >= 0).long(), torch.ones_like(token)), dim=1)
            expected = new(input_ids=token, **kvstack.cache_kwargs(new, held), attention_mask=step_mask,
                           position_ids=next_position).logits[:, -1]
            step_mask = torch.cat((mask, torch.ones(2, step + 1, dtype=torch.long)), dim=1)
            got = new(input_ids=token, **kvstack.cache_kwargs(new, coded), attention_mask=step_mask,
                      position_ids=next_position, use_cache=True).logits[:, -1]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            for cache in (alone, full):
                new(input_ids=token, **kvstack.cache_kwargs(new, cache), attention_mask=step_mask,
                    position_ids=next_position, use_cache=True)
            token = got.argmax(-1, keepdim=True)
    # an encoded victim's place went to a newer token: the encoded region is no longer in arrival order
    layer = coded.layers[1]
    sinks = layer.sink_keys.shape[2]
    encoded = layer.positions[0, 0, sinks : sinks + layer.encoded]
    assert not bool((encoded.diff() > 0).all())
    assert coded.kv_bytes() < alone.kv_bytes()


def test_a_compressing_latent_cache_used_without_the_kvstack_attention_says_so(model) -> None:
    new, _ = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    for spec in ("kivi(bits=4, group_size=8)", "h2o(budget=16)"):
        cache = kvstack.make_cache(new, spec)
        new.set_attn_implementation("sdpa")  # the encoding or eviction after attention would never run
        try:
            with pytest.raises(RuntimeError, match="without the kvstack attention function"):
                stepwise_logits(new, random_ids(20, seed=5), cache, steps=1)
        finally:
            new.set_attn_implementation("kvstack")


def test_a_latent_model_refuses_storage_it_does_not_have_and_codecs_that_need_a_key_geometry(model) -> None:
    new, _ = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    for spec, message in (("adakv(snapkv(ratio=0.5))", "evicts whole tokens by score and supports no per-head"),
                          ("cam(h2o(ratio=0.5))", "evicts whole tokens by score and supports no per-head"),
                          ("kvquant(bits=4)", "kvquant does not apply: it un-rotates keys before encoding"),
                          ("gear(bits=4, group_size=8)", "does not apply: its low-rank residual"),
                          ("kivi(bits=4, rotate='hadamard')", "does not apply: it rotates, smooths"),
                          ("palu(rank=4)", "does not apply: its low-rank latents are fitted"),
                          ("quant(bits=8)", "group_size 64 does not divide the head dimension of the rotary keys")):
        with pytest.raises(KVStackError, match=message) as info:
            kvstack.make_cache(new, spec)
        assert "\n" not in str(info.value)


def test_a_decoding_step_with_the_up_projection_absorbed_equals_attention_over_rebuilt_keys(model) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    new, _ = kvstack.transform(model, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    module = new.model.layers[1].self_attn
    generator = torch.Generator().manual_seed(7)
    for length, tokens in ((1, 30), (3, 9)):
        query = torch.randn(2, 2 * HEADS, length, HEAD_DIM, generator=generator)
        rotary_keys = torch.randn(2, HEADS, tokens, 4, generator=generator)
        latents = torch.randn(2, 1, tokens, 24, generator=generator)
        mask = torch.ones(2, 1, length, tokens, dtype=torch.bool)
        mask[1, :, :, :4] = False  # left padding in the second sequence
        keys, values = module.rebuild(rotary_keys, latents)
        masked, everything = (mask, mask), (None, torch.ones_like(mask))
        additive = (torch.zeros(2, 1, length, tokens).masked_fill(~mask, float("-inf")), mask)
        for given, meaning in (masked, everything, additive):  # bool, none, additive float
            expected, _ = sdpa_attention_forward(module, query, keys, values, meaning, scaling=module.scaling)
            got = module.attend_absorbed(query, rotary_keys, latents, given, module.scaling)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # decoding by absorbed steps, with transformers' cache and kvstack's, ends where one whole forward ends
    ids = random_ids(20, batch=2, seed=3)
    for cache in (DynamicCache(), kvstack.make_cache(new, "full")):
        logits = stepwise_logits(new, ids, cache, steps=4)
        tokens = torch.stack([step.argmax(-1) for step in logits[:-1]], dim=1)
        with torch.no_grad():
            whole = new(input_ids=torch.cat((ids, tokens), dim=1)).logits[:, -1]  # rebuilt keys and values
        torch.testing.assert_close(logits[-1], whole, atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("spec", ["h2o(budget=12)", "snapkv(budget=16, window=4)", "streamingllm(budget=12, sinks=2)",
                                  "tova(budget=12)"])
def test_the_engine_evicts_from_an_mla_pool_as_the_latent_cache_does(spec: str) -> None:
    from conftest import cache_generate, engine_generate, prompt_of

    base = build_model(vocab_size=200, max_position_embeddings=128, initializer_range=0.1)
    new, _ = kvstack.transform(base, "mla(rank=24, rope_dims=4)", calibration_ids=CALIBRATION)
    prompt = prompt_of(40, seed=1, vocab=200)
    expected = cache_generate(new, prompt, spec, 10)
    # with blocks of one token the engine compacts exactly when the latent cache evicts: the same greedy tokens
    output, metrics = engine_generate(new, prompt, spec, 10, block_size=1)
    assert output == expected
    assert metrics["compression_evicted_tokens"] > 0
    assert metrics["compression_freed_blocks"] > 0  # the evicted tokens left the pool


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
    with pytest.raises(kvstack.InputError, match="caches latents \\(mla\\), so quest\\(budget=64\\) does not apply"):
        kvstack.make_cache(new, "quest(budget=64)")
    for spec, message in (("mla(rank=24) + mla(rank=8)", "apply mla once"), ("mla(rank=24) + gqa(kv_heads=1)",
                                                                            "gqa cannot follow cla or mla"),
                          ("cla(pairs='1:0') + mla(rank=24)", "mla cannot follow cla")):
        with pytest.raises(TransformError, match=message):
            kvstack.transform(model, spec, calibration_ids=CALIBRATION)
    from kvstack.engine import Engine
    from kvstack.errors import KVStackError

    with pytest.raises(KVStackError, match="caches latents \\(mla\\); the engine keeps no block bounds over latents"):
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
