"""Transformed models in the paged engine and in plain transformers, on SmolLM2 (issue 33).

For each transform: the engine serves a shared-prefix workload (three prompts of bench prose sharing their
first half, 16 greedy tokens each) and its tokens are compared with transformers' ``generate`` on the same
transformed model, prompt by prompt; the engine's pool capacity (tokens a fixed memory budget holds) is
compared with the original model's. The ``gqa`` model is also saved as an ordinary checkpoint and loaded by a
fresh Python process that imports transformers and torch only (no kvstack), whose logits on a prompt are
compared with the transformed model's.

Transforms: ``gqa(kv_heads=1)`` (mean-pooled MQA: no calibration; the comparison is of equality, not quality),
``cla(pairs=...)`` with the map ``cla(layers=4)`` chose on this model (``transforms.jsonl``), whose pool stores
only the layers that keep their own keys and values, and ``mla(rank=96, rope_dims=16)``, whose pool holds
rotary keys and latents (the engine rebuilds keys and values from them as it attends).

Usage::

    python benchmarks/model_level_engine.py [--prompt-tokens 512] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import stamp

import kvstack
from kvstack.engine import Engine, SamplingParams
from kvstack.prose import load_prose

OUT = "benchmarks/results/model_level/engine.md"
MODEL = "smollm2-135m"
MEMORY_MB = 64.0
TRANSFORMS = ["gqa(kv_heads=1)", "cla(pairs='7:6,12:11,17:16,29:28')", "mla(rank=96, rope_dims=16)"]

# Run in a fresh interpreter: transformers and torch only, so nothing of kvstack can be what makes it load.
PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
assert not any(name.startswith("kvstack") for name in sys.modules)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
print("kvstack imported:", any(name.startswith("kvstack") for name in sys.modules))
"""


def prompts(tokenizer: object, length: int) -> list[list[int]]:
    """Three prompts of ``length`` prose tokens; the first half is the same for all (a shared prefix)."""
    ids = tokenizer(load_prose(), return_tensors=None)["input_ids"]
    half = length // 2
    return [ids[:half] + ids[half * (k + 1): half * (k + 2)] for k in range(3)]


def generate_each(model: torch.nn.Module, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Transformers' greedy ``generate`` (its own cache), one prompt at a time."""
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in batch]


def served(model: torch.nn.Module, batch: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, memory_mb=MEMORY_MB)
    outputs = engine.generate(batch, SamplingParams(max_new_tokens=new_tokens))
    engine.runner.restore()  # the model's own attention again, for generate and the transforms
    return outputs, engine


def plain_logits_gap(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, str]:
    """Max |logit difference| between the transformed model and the same weights loaded by plain transformers."""
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.save_pretrained(tmp)
        torch.save(ids, Path(tmp, "ids.pt"))
        run = subprocess.run([sys.executable, "-c", PLAIN_LOAD, tmp, str(Path(tmp, "ids.pt")),
                              str(Path(tmp, "logits.pt"))], capture_output=True, text=True, check=True)
        plain = torch.load(Path(tmp, "logits.pt"))
        return float((plain - model(input_ids=ids).logits).abs().max()), run.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    model, tokenizer = kvstack.load_model(MODEL)
    batch = prompts(tokenizer, args.prompt_tokens)
    base_outputs, base_engine = served(model, batch, args.new_tokens)
    base_tokens = base_engine.pool.num_blocks * base_engine.pool.block_size
    rows = [f"| SmolLM2-135M | {base_engine.pool.num_layers} | {base_tokens:,} (1.00) | "
            f"{sum(a == b for a, b in zip(base_outputs, generate_each(model, batch, args.new_tokens), strict=True))}"
            f" of 3 | - |"]
    for spec in TRANSFORMS:
        new, _ = kvstack.transform(model, spec, tokenizer=tokenizer)
        new.eval()
        outputs, engine = served(new, batch, args.new_tokens)
        reference = generate_each(new, batch, args.new_tokens)
        equal = sum(a == b for a, b in zip(outputs, reference, strict=True))
        tokens = engine.pool.num_blocks * engine.pool.block_size
        plain = "-"
        if spec.startswith("gqa"):
            gap, said = plain_logits_gap(new, torch.tensor([batch[0]]))
            plain = f"max abs logit difference {gap:.2e} ({said})"
        hits = engine.metrics()["prefix_cache_hits_tokens"]
        rows.append(f"| `{spec}` | {engine.pool.num_layers} | {tokens:,} ({tokens / base_tokens:.2f}) | {equal} of 3 "
                    f"(prefix hits {hits} tokens) | {plain} |")
        print(rows[-1], flush=True)
    command = "python benchmarks/model_level_engine.py" + (
        f" --prompt-tokens {args.prompt_tokens}" if args.prompt_tokens != 512 else "") + (
        f" --new-tokens {args.new_tokens}" if args.new_tokens != 16 else "")
    text = (f"Command: `{command}`; {stamp()}\n\n"
            f"Three prompts of {args.prompt_tokens} prose tokens sharing their first half, {args.new_tokens} greedy "
            f"tokens each, served by the engine with a {MEMORY_MB:.0f} MB pool, against transformers' `generate` on "
            "the same model; the gqa checkpoint also loaded by a fresh process that imports transformers and "
            "torch only.\n\n"
            "| model | layers in the pool | tokens the pool holds (of the original's) | engine = generate | "
            "plain transformers |\n| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
