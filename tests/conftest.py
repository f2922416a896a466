"""Shared fixtures and independent reference helpers for the kvstack core tests.

Every model here is a tiny, randomly initialised transformers model built from its config directly
(no dependency on ``kvstack.models``). The helpers recompute what a method should keep from first
principles (a plain ``DynamicCache`` run, queries captured with hooks, RoPE applied by transformers'
own function), never through kvstack's own code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvstack

VOCAB = 128
ARCHS = ("llama", "qwen2", "mistral")

# Every method in the registry, with a spec string taking a budget (entries kept per KV head).
METHOD_TEMPLATES: dict[str, str] = {
    "snapkv": "snapkv(budget={b})",
    "keynorm": "keynorm(budget={b})",
    "random": "random(budget={b})",
    "pyramidkv": "pyramidkv(budget={b})",
    "adakv": "adakv(snapkv(budget={b}), floor=0.2)",
    "streamingllm": "streamingllm(budget={b})",
    "h2o": "h2o(budget={b})",
    "tova": "tova(budget={b})",
    "scissorhands": "scissorhands(budget={b})",
}
STATIC = ("snapkv", "keynorm", "random", "pyramidkv", "adakv")
DYNAMIC = ("streamingllm", "h2o", "tova", "scissorhands")
UNIFORM = ("snapkv", "keynorm", "random", "streamingllm", "h2o", "tova", "scissorhands")


def spec_for(name: str, budget: int) -> str:
    """The spec string of method ``name`` with ``budget`` entries per KV head."""
    return METHOD_TEMPLATES[name].format(b=budget)


def _base_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    kwargs.update(overrides)
    return kwargs


def build_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random causal LM of ``arch`` (llama, qwen2, mistral), seeded, in eval mode.

    Two calls with the same arguments give models with identical weights.
    """
    kwargs = _base_kwargs(**overrides)
    if arch == "llama":
        config, cls = LlamaConfig(**kwargs), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**kwargs), Qwen2ForCausalLM
    elif arch == "mistral":
        kwargs.setdefault("sliding_window", None)
        config, cls = MistralConfig(**kwargs), MistralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    return cls(config).eval()


def build_peaky(arch: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny model with large initial weights, so attention is peaked and scores are well separated."""
    overrides.setdefault("initializer_range", 0.25)
    return build_model(arch, seed=seed, **overrides)


@pytest.fixture
def make_model() -> Callable[..., torch.nn.Module]:
    """Factory: ``make_model(arch="llama", seed=0, **config_overrides)``."""
    return build_model


@pytest.fixture
def llama() -> torch.nn.Module:
    return build_model("llama")


@pytest.fixture
def qwen2() -> torch.nn.Module:
    return build_model("qwen2")


@pytest.fixture
def mistral() -> torch.nn.Module:
    return build_model("mistral")


@pytest.fixture
def gqa_model() -> torch.nn.Module:
    """6 query heads sharing 2 KV heads (group size 3)."""
    return build_model("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def _no_grad_one_thread(request):
    """No autograd, and one intra-op thread: on tiny models threading costs more than it saves (and the
    suite shares the machine). Other people's test modules here (test_models.py) are left alone."""
    if request.module.__name__.endswith("test_models"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def random_ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """``[batch, length]`` random token ids in ``[1, VOCAB)`` (0 is the pad token)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def stepwise_logits(model: torch.nn.Module, ids: torch.Tensor, cache: Any, mask: torch.Tensor | None = None,
                    steps: int = 6) -> list[torch.Tensor]:
    """The prompt's last logits, then greedy decoding ``steps`` tokens one forward at a time: each step's
    ``[B, V]`` (``cache`` any transformers cache: a kvstack one, or ``DynamicCache()`` as the reference)."""
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        out = model(input_ids=ids, **kvstack.cache_kwargs(model, cache), use_cache=True, **kwargs)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(token)), dim=1)
                kwargs = {"attention_mask": mask}
            out = model(input_ids=token, **kvstack.cache_kwargs(model, cache), use_cache=True, **kwargs)
            logits.append(out.logits[:, -1])
    return logits


# ------------------------------------------------------------------------------------------------------
# Independent reference computations
# ------------------------------------------------------------------------------------------------------


def hook_kv_sharing(model: torch.nn.Module, pairs: dict[int, int]) -> list:
    """Forward hooks on an untouched model that make each upper layer's ``k_proj`` and ``v_proj`` return the
    lower layer's outputs of the same forward (``pairs`` ``{upper: lower}``): CLA and KVSharer computed with
    transformers' own attention, independently of kvstack. Returns the handles (remove them after)."""
    layers, kept, handles = model.model.layers, {}, []
    for upper, lower in pairs.items():
        for name in ("k_proj", "v_proj"):
            def keep(module, args, output, key=(lower, name)):
                kept[key] = output

            def replace(module, args, output, key=(lower, name)):
                return kept[key]
            handles.append(getattr(layers[lower].self_attn, name).register_forward_hook(keep))
            handles.append(getattr(layers[upper].self_attn, name).register_forward_hook(replace))
    return handles


def reference_qk(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Queries and keys of every layer for one plain ``DynamicCache`` forward, RoPE applied.

    Queries are captured from each ``q_proj`` with a forward hook and rotated with transformers'
    ``apply_rotary_pos_emb`` and the model's own rotary embedding; keys are read from the
    ``DynamicCache``. Returns lists over layers of ``[B, Hq, T, D]`` and ``[B, H, T, D]`` tensors.
    """
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):

        def hook(_module, _inputs, output, index=index):
            captured[index] = output.detach().clone()

        hooks.append(layer.self_attn.q_proj.register_forward_hook(hook))
    cache = DynamicCache(config=config)
    try:
        with torch.no_grad():
            model(ids, **kvstack.cache_kwargs(model, cache), use_cache=True)
    finally:
        for handle in hooks:
            handle.remove()
    batch, length = ids.shape
    positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
    queries, keys = [], []
    for index in range(len(model.model.layers)):
        q = captured[index].view(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(q, positions)
        q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
        queries.append(q_rot)
        keys.append(cache.layers[index].keys.detach().clone())
    return queries, keys


def causal_weights(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention weights ``[Hq, T, T]`` (float64) for one sequence.

    ``query`` ``[Hq, T, D]``, ``keys`` ``[H, T, D]``; query head ``j`` reads KV head ``j // (Hq // H)``.
    """
    num_q_heads, length, head_dim = query.shape
    group = num_q_heads // keys.shape[0]
    expanded = keys.double().repeat_interleave(group, dim=0)  # [Hq, T, D]
    logits = query.double() @ expanded.transpose(-1, -2) / math.sqrt(head_dim)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def assert_top_selection(kept: set[int], scores: torch.Tensor, candidates: list[int], count: int, tol: float,
                         what: str = "") -> None:
    """``kept`` holds exactly ``count`` of ``candidates``, and they are the highest-scored ones.

    Near-ties (within ``tol``) may go either way: every kept candidate scores at least every dropped
    candidate minus ``tol``.
    """
    chosen = [c for c in candidates if c in kept]
    dropped = [c for c in candidates if c not in kept]
    assert len(chosen) == count, f"{what}: kept {len(chosen)} candidates, expected {count}"
    if chosen and dropped:
        worst_kept = min(float(scores[c]) for c in chosen)
        best_dropped = max(float(scores[c]) for c in dropped)
        assert worst_kept >= best_dropped - tol, (
            f"{what}: a dropped entry scores {best_dropped} > kept {worst_kept}"
        )


def kept_sets(layer: Any, b: int = 0) -> list[set[int]]:
    """Per KV head, the set of true positions a cache layer keeps for sequence ``b``."""
    return [set(p.tolist()) for p in layer.kept_positions()[b]]


def prompt_of(length: int, seed: int, vocab: int) -> list[int]:
    """A seeded random prompt of ``length`` token ids in ``[3, vocab)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def reference_generate(reference: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    """Greedy continuation of ``prompt`` by transformers' own ``generate`` (default cache and attention)."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        output = reference.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new, do_sample=False
        )
    return output[0, len(prompt) :].tolist()


def cache_generate(model: torch.nn.Module, prompt: list[int], spec: str | None, max_new: int) -> list[int]:
    """Greedy tokens after ``prompt`` from transformers' ``generate`` with ``make_cache(model, spec)`` (None:
    transformers' own cache)."""
    ids = torch.tensor([prompt])
    kwargs = {} if spec is None else kvstack.cache_kwargs(model, kvstack.make_cache(model, spec))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             **kwargs)
    return out[0, len(prompt):].tolist()


def engine_generate(model: torch.nn.Module, prompt: list[int], spec: str | None, max_new: int,
                    **engine_kwargs: Any) -> tuple[list[int], dict[str, Any]]:
    """Greedy tokens after ``prompt`` from one request carrying ``spec`` in a fresh paged engine (1 MB, no
    prefix caching, ``engine_kwargs`` on top), and the engine's metrics."""
    from kvstack.engine import Engine, SamplingParams

    engine = Engine(model, **{"memory_mb": 1.0, "enable_prefix_caching": False, **engine_kwargs})
    request = engine.add_request(prompt, SamplingParams(max_new_tokens=max_new), method=spec)
    while engine.has_unfinished():
        engine.step()
    return engine.get_output(request), engine.metrics()


def calibrate_tiny(model: Any, tokenizer: Any, tmp_path: Any, capsys: Any, flags: list[str]) -> dict:
    """Save ``model`` and ``tokenizer`` under ``tmp_path``, run ``kvstack calibrate`` on them with ``flags`` and
    ``--out``; assert it succeeded and return the record it wrote."""
    import json

    from kvstack import cli

    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "calibrated.json"
    code = cli.main(["calibrate", "--model", str(tmp_path / "tiny"), "--device", "cpu", *flags, "--out", str(out),
                     "--no-progress"])
    assert code == 0, capsys.readouterr()
    return json.loads(out.read_text())


def usage_error(capsys: Any, argv: list[str]) -> str:
    """Run ``kvstack argv``; assert exit 2 with one ``kvstack: error:`` line and no traceback; return it."""
    from kvstack import cli

    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err.strip()
    assert err.startswith("kvstack: error:"), err
    assert "\n" not in err, f"more than one line: {err!r}"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return err
