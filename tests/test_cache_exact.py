"""Exactness: ``full`` equals transformers' ``DynamicCache``; a method that evicts attends exactly over
what it keeps, at the tokens' true positions.

References are computed on a second model instance with identical weights and transformers' own
attention (``sdpa``), or with an attention function written here that masks, per layer and per KV head,
whatever the kvstack cache says it keeps.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ARCHS,
    DYNAMIC,
    METHOD_TEMPLATES,
    STATIC,
    build_model,
    random_ids,
    spec_for,
)
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvstack

# ------------------------------------------------------------------------------------------------------
# full == DynamicCache
# ------------------------------------------------------------------------------------------------------


def _decode_compare(model, ref, ids, cache, steps: int, atol: float, prefill_kwargs=None):
    """Prefill ``ids`` into ``cache`` (kvstack) and a DynamicCache, then decode greedily; compare logits."""
    logits = kvstack.prefill(model, ids, cache, **(prefill_kwargs or {}))
    ref_cache = DynamicCache(config=ref.config)
    ref_logits = ref(ids, **kvstack.cache_kwargs(ref, ref_cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=0)
    token = ref_logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        out = model(token, **kvstack.cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        ref_out = ref(token, **kvstack.cache_kwargs(ref, ref_cache), use_cache=True).logits[:, -1]
        torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
        token = ref_out.argmax(-1, keepdim=True)
    return cache, ref_cache


@pytest.mark.parametrize("arch", ARCHS)
def test_full_equals_dynamic_cache(arch):
    model, ref = build_model(arch), build_model(arch)
    ids = random_ids(40, seed=3)
    cache = kvstack.make_cache(model, "full")
    cache, ref_cache = _decode_compare(model, ref, ids, cache, steps=5, atol=1e-5)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers, strict=True):
        assert layer.length == 45
        torch.testing.assert_close(layer.keys[:, :, :45], ref_layer.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.values[:, :, :45], ref_layer.values, atol=1e-5, rtol=0)
    assert cache.tokens_seen() == 45
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 45


@pytest.mark.parametrize("arch", ARCHS)
def test_full_generate_equals_plain_generate(arch):
    model, ref = build_model(arch), build_model(arch)
    ids = random_ids(25, seed=4)
    expected = ref.generate(ids, max_new_tokens=12, do_sample=False)
    cache = kvstack.make_cache(model, "full")
    got = model.generate(ids, **kvstack.cache_kwargs(model, cache), max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


def test_cache_kwargs_names_the_keyword_the_installed_transformers_takes_and_generates_without_a_warning():
    import inspect
    import warnings

    model, ref = build_model("llama"), build_model("llama")
    cache = kvstack.make_cache(model, "full")
    keyword = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert kvstack.cache_kwargs(model, cache) == {keyword: cache}
    ids = random_ids(20, seed=6)
    expected = ref.generate(ids, max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = model.generate(ids, **kvstack.cache_kwargs(model, cache), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == ids.shape[1] + 5


def test_cache_kwargs_falls_back_to_past_key_values_for_a_forward_without_cache():
    class OlderModel(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    sentinel = object()
    assert kvstack.cache_kwargs(OlderModel(), sentinel) == {"past_key_values": sentinel}


def _left_padded_batch():
    ids = random_ids(30, batch=2, seed=5)
    mask = torch.ones_like(ids)
    ids[1, :7] = 0
    mask[1, :7] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_full_generate_left_padded_batch(arch):
    model, ref = build_model(arch), build_model(arch)
    ids, mask = _left_padded_batch()
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = model.generate(ids, attention_mask=mask, **kvstack.cache_kwargs(model, kvstack.make_cache(model, "full")),
                         max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)
    # The padded row continues exactly as the same sequence without padding, alone.
    alone = ref.generate(ids[1:, 7:], max_new_tokens=10, do_sample=False)
    assert torch.equal(got[1, 30:], alone[0, 23:])


@pytest.mark.parametrize("chunk_size", [None, 16, 7])
def test_full_prefill_left_padded_batch(llama, chunk_size):
    ref = build_model("llama")
    ids, mask = _left_padded_batch()
    cache = kvstack.make_cache(llama, "full")
    logits = kvstack.prefill(llama, ids, cache, attention_mask=mask, chunk_size=chunk_size)
    positions = torch.stack([torch.arange(30), torch.cat([torch.ones(7, dtype=torch.long), torch.arange(23)])])
    expected = ref(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    alone = ref(ids[1:, 7:]).logits[0, -1]
    torch.testing.assert_close(logits[1], alone, atol=1e-4, rtol=0)
    assert cache.tokens_seen() == 30


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_full_chunked_prefill_equals_one_forward(arch, chunk_size):
    model, ref = build_model(arch), build_model(arch)
    ids = random_ids(50, seed=6)
    cache = kvstack.make_cache(model, "full")
    _decode_compare(model, ref, ids, cache, steps=3, atol=1e-4, prefill_kwargs={"chunk_size": chunk_size})


def test_kvstack_generate_equals_model_generate(llama):
    ref = build_model("llama")
    ids = random_ids(20, seed=7)
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, 20:].tolist()
    result = kvstack.generate(llama, None, ids, "full", max_new_tokens=8)
    assert result.new_token_ids == expected
    assert result.prompt_tokens == 20
    assert result.cache["tokens_seen"] == 20 + 7  # the last generated token is never fed back
    assert result.cache["kv_bytes"] >= result.cache["full_kv_bytes"]  # full keeps all, plus positions
    assert result.cache["compression_ratio"] <= 0.0
    assert "kept 27/27 tokens" in result.summary_line()


# ------------------------------------------------------------------------------------------------------
# A budget larger than the sequence reproduces full, for every method
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHOD_TEMPLATES))
def test_budget_above_length_equals_full(name):
    model, ref = build_model("llama"), build_model("llama")
    ids = random_ids(60, seed=8)
    cache = kvstack.make_cache(model, spec_for(name, 200))
    chunk = 16 if name in DYNAMIC else None
    cache, _ = _decode_compare(model, ref, ids, cache, steps=5, atol=1e-4, prefill_kwargs={"chunk_size": chunk})
    for layer in cache.layers:
        assert layer.head_lengths().tolist() == [[65, 65]]


@pytest.mark.parametrize("name", sorted(METHOD_TEMPLATES))
def test_ratio_zero_equals_full(name):
    model, ref = build_model("llama"), build_model("llama")
    ids = random_ids(48, seed=9)
    spec = METHOD_TEMPLATES[name].replace("budget={b}", "ratio=0")
    cache = kvstack.make_cache(model, spec)
    # Static methods then grow freely; dynamic ones hold the budget, round(1.0 * prompt) = 48, while decoding.
    steps = 0 if name in DYNAMIC else 3
    cache, _ = _decode_compare(model, ref, ids, cache, steps=steps, atol=1e-4)
    for layer in cache.layers:
        assert int(layer.head_lengths().sum()) == 2 * (48 + steps)
    if name in DYNAMIC:
        model(random_ids(1), **kvstack.cache_kwargs(model, cache))
        assert [layer.length for layer in cache.layers] == [48, 48]


# ------------------------------------------------------------------------------------------------------
# After eviction, attention runs exactly over the kept entries, at their true positions
# ------------------------------------------------------------------------------------------------------

REFERENCE_ATTENTION = "kvstack_tests_masked_reference"
_reference_masks: dict[int, torch.Tensor] = {}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain attention of ``[B, Hq, q, D]`` queries over a DynamicCache's full ``[B, H, L, D]`` keys, with the
    per-(query head) visibility mask this test prepared for the module's layer."""
    mask = _reference_masks[module.layer_idx]  # [B, Hq, q, L] bool
    group = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(group, dim=1).double()
    values = value.repeat_interleave(group, dim=1).double()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = (query.double() @ keys.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ values
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _reference_model() -> torch.nn.Module:
    AttentionInterface.register(REFERENCE_ATTENTION, _masked_reference_attention)
    AttentionMaskInterface.register(REFERENCE_ATTENTION, sdpa_mask)
    ref = build_model("llama")
    ref.set_attn_implementation(REFERENCE_ATTENTION)
    return ref


def _visibility(cache, start: int, stop: int, num_q_heads: int) -> dict[int, torch.Tensor]:
    """Per layer, ``[1, Hq, q, stop]`` bool: what queries ``start:stop`` may see if the cache is honest.

    Query ``p`` sees the entries the cache keeps (read *before* the forward) plus new tokens ``<= p``.
    """
    masks = {}
    for index, layer in enumerate(cache.layers):
        heads = layer.heads if layer.is_initialized else 2
        group = num_q_heads // heads
        mask = torch.zeros(1, num_q_heads, stop - start, stop, dtype=torch.bool)
        for row, p in enumerate(range(start, stop)):
            mask[0, :, row, start : p + 1] = True
        if layer.is_initialized:
            for h, kept in enumerate(layer.kept_positions()[0]):
                assert int(kept.max()) < start, "the cache holds a position it has not seen"
                mask[0, h * group : (h + 1) * group, :, kept.long()] = True
        masks[index] = mask
    return masks


def _run_against_reference(spec: str, prompt: int, chunks: list[tuple[int, int]], steps: int) -> None:
    model, ref = build_model("llama"), _reference_model()
    num_q_heads = model.config.num_attention_heads
    ids = random_ids(prompt, seed=10)
    cache = kvstack.make_cache(model, spec)
    ref_cache = DynamicCache(config=ref.config)
    evicted_any = False
    for start, stop in chunks:
        _reference_masks.clear()
        _reference_masks.update(_visibility(cache, start, stop, num_q_heads))
        out = model(ids[:, start:stop], **kvstack.cache_kwargs(model, cache), use_cache=True).logits
        ref_out = ref(ids[:, start:stop], **kvstack.cache_kwargs(ref, ref_cache), use_cache=True).logits
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=0)
        evicted_any |= cache.kept_entries() < cache.layers[0].seen * 2 * len(cache.layers)
    token = ref_out[:, -1].argmax(-1, keepdim=True)
    position = prompt
    for _ in range(steps):
        _reference_masks.clear()
        _reference_masks.update(_visibility(cache, position, position + 1, num_q_heads))
        out = model(token, **kvstack.cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        ref_out = ref(token, **kvstack.cache_kwargs(ref, ref_cache), use_cache=True).logits[:, -1]
        torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=0)
        token = ref_out.argmax(-1, keepdim=True)
        position += 1
    assert evicted_any, "the test is vacuous: nothing was evicted"


@pytest.mark.parametrize("name", STATIC)
def test_static_method_attends_exactly_over_kept_entries(name):
    _run_against_reference(spec_for(name, 40), prompt=90, chunks=[(0, 90)], steps=6)


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_method_attends_exactly_over_kept_entries(name):
    chunks = [(0, 16), (16, 32), (32, 48), (48, 64), (64, 80), (80, 90)]
    _run_against_reference(spec_for(name, 24), prompt=90, chunks=chunks, steps=8)


@pytest.mark.parametrize("spec", ["h2o(budget=20, recent=4)", "scissorhands(budget=20, recent=15, history=4)",
                                  "streamingllm(budget=9, sinks=0)", "adakv(h2o(budget=24), floor=0.5)",
                                  "adakv(keynorm(budget=24), floor=0.0)", "pyramidkv(budget=40, beta=2)"])
def test_variants_attend_exactly_over_kept_entries(spec):
    _run_against_reference(spec, prompt=70, chunks=[(0, 70)], steps=6)


# ------------------------------------------------------------------------------------------------------
# True positions
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [12, 20])
def test_streamingllm_generate_equals_loop_with_explicit_positions(budget):
    model = build_model("llama")
    ids = random_ids(40, seed=11)
    new = 10
    generated = kvstack.make_cache(model, f"streamingllm(budget={budget})")
    out = model.generate(ids, **kvstack.cache_kwargs(model, generated), max_new_tokens=new, do_sample=False)
    cache = kvstack.make_cache(model, f"streamingllm(budget={budget})")
    logits = model(ids, **kvstack.cache_kwargs(model, cache), position_ids=torch.arange(40).unsqueeze(0)).logits[:, -1]
    tokens = []
    for step in range(new):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token))
        if step < new - 1:
            position = torch.tensor([[40 + step]])
            logits = model(token, **kvstack.cache_kwargs(model, cache), position_ids=position).logits[:, -1]
    assert out[0, 40:].tolist() == tokens
    assert cache.layers[0].length == budget


def test_streamingllm_keeps_true_positions_after_eviction():
    model = build_model("llama")
    cache = kvstack.make_cache(model, "streamingllm(budget=12, sinks=4)")
    kvstack.prefill(model, random_ids(50, seed=12), cache, chunk_size=None)
    assert cache.get_seq_length() == 50  # the next token takes position 50, not 12
    for layer in cache.layers:
        for kept in layer.kept_positions()[0]:
            assert kept.tolist() == [0, 1, 2, 3, *range(42, 50)]


def test_streamingllm_cache_positions_equal_full_before_eviction():
    model, ref = build_model("llama"), build_model("llama")
    ids = random_ids(30, seed=13)
    cache = kvstack.make_cache(model, "streamingllm(budget=64, positions='cache')")
    _decode_compare(model, ref, ids, cache, steps=5, atol=1e-4)


def test_streamingllm_cache_positions_differ_after_eviction():
    model = build_model("llama")
    ids = random_ids(60, seed=14)
    original = kvstack.make_cache(model, "streamingllm(budget=16)")
    by_slot = kvstack.make_cache(model, "streamingllm(budget=16, positions='cache')")
    a = model(ids, **kvstack.cache_kwargs(model, original)).logits[:, -1]
    b = model(ids, **kvstack.cache_kwargs(model, by_slot)).logits[:, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # the prompt forward sees everything in both
    token = a.argmax(-1, keepdim=True)
    a = model(token, **kvstack.cache_kwargs(model, original)).logits[:, -1]
    b = model(token, **kvstack.cache_kwargs(model, by_slot)).logits[:, -1]
    assert (a - b).abs().max() > 1e-3
    assert by_slot.layers[0].kept_positions()[0][0].tolist() == original.layers[0].kept_positions()[0][0].tolist()


SLOT_ATTENTION = "kvstack_tests_slot_positions"
_slot_state: dict = {}


def _slot_position_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """StreamingLLM's in-cache positions, from its definition: the entries held (plus the new chunk) take
    RoPE positions 0, 1, 2 ... in order of their true positions, and each query takes its own slot's.

    ``key``/``value`` come from a DynamicCache holding everything at true positions; the held ones are
    picked out and rotated by (slot - true position) with transformers' own RoPE.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    held, new = _slot_state["held"][module.layer_idx], _slot_state["new"]
    rotary = _slot_state["rotary"]
    live = sorted(held) + new
    slot = {p: i for i, p in enumerate(live)}
    index = torch.tensor(live)
    k, v = key[:, :, index], value[:, :, index]
    cos, sin = rotary(k, torch.tensor([[slot[p] - p for p in live]]))
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    cos, sin = rotary(query, torch.tensor([[slot[p] - p for p in new]]))
    q, _ = apply_rotary_pos_emb(query, query, cos, sin)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).double(), v.repeat_interleave(group, dim=1).double()
    logits = (q.double() @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    visible = torch.tensor([[key_pos <= query_pos for key_pos in live] for query_pos in new])
    logits = logits.masked_fill(~visible, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


LINEAR_ROPE = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}


@pytest.mark.parametrize(
    ("budget", "sinks", "chunks", "config"),
    [(16, 4, [(0, 60)], {}), (12, 2, [(0, 20), (20, 40), (40, 50)], {}), (10, 0, [(0, 30)], {}),
     (16, 4, [(0, 24), (24, 48)], LINEAR_ROPE)],
)
def test_streamingllm_cache_positions_follow_the_paper(budget, sinks, chunks, config):
    AttentionInterface.register(SLOT_ATTENTION, _slot_position_attention)
    AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)
    model, ref = build_model("llama", **config), build_model("llama", **config)
    ref.set_attn_implementation(SLOT_ATTENTION)
    _slot_state["rotary"] = ref.model.rotary_emb
    ids = random_ids(chunks[-1][1], seed=15)
    cache = kvstack.make_cache(model, f"streamingllm(budget={budget}, sinks={sinks}, positions='cache')")
    ref_cache = DynamicCache(config=ref.config)

    def step(tokens, start, stop):
        _slot_state["held"] = {
            i: (layer.kept_positions()[0][0].tolist() if layer.is_initialized else [])
            for i, layer in enumerate(cache.layers)
        }
        _slot_state["new"] = list(range(start, stop))
        out = model(tokens, **kvstack.cache_kwargs(model, cache)).logits
        expected = ref(tokens, **kvstack.cache_kwargs(ref, ref_cache)).logits
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
        return expected[:, -1].argmax(-1, keepdim=True)

    for start, stop in chunks:
        token = step(ids[:, start:stop], start, stop)
    position = chunks[-1][1]
    for _ in range(8):
        token = step(token, position, position + 1)
        position += 1
    assert cache.layers[0].length == budget
