"""Codec divergence: how far each codec's next-token distributions move from the full cache's.

Score deltas on the harness are noisy (a 135M model flips brittle answers under any perturbation), so codec
variants are compared here by a smooth measure first: for each sample the full cache reads the prompt and
answers greedily; every codec then reads the same prompt and is teacher-forced on the full cache's answer,
and the KL divergence ``KL(full || codec)`` of the next-token distribution is averaged over the answer
positions (the prediction right after the prompt included).

Samples are drawn with their own seed (default 1), so a variant chosen here is judged on the harness
(``benchmarks/quant_quality.py``, seed 0) with samples it was not chosen on.

Usage::

    python benchmarks/codec_divergence.py [--tasks niah_multikey,niah_multiquery] [--length 1024]
        [--samples 10] [--seed 1] [--out benchmarks/results/codec_divergence]

Writes ``results.json`` and ``README.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import kvstack
from kvstack.api import prefill
from kvstack.bench.tasks import get_task

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import machine

CODECS = {
    "int8": "quant(bits=8)",
    "KIVI-4": "kivi(bits=4)",
    "KIVI-4 + Hadamard": "kivi(bits=4, rotate='hadamard')",
    "KIVI-4 + sink + value rotation": "kivi(bits=4, sinks=1, residual=31, rotate='hadamard-values')",
    "KIVI-4 + 8 outlier channels": "kivi(bits=4, outlier_channels=8, outlier_bits=8, value_group_size=64)",
    "KIVI-4 + 16 outlier channels": "kivi(bits=4, outlier_channels=16, outlier_bits=8, value_group_size=64)",
    "KIVI-4 + 16 outlier channels + sink + value rotation":
        "kivi(bits=4, outlier_channels=16, outlier_bits=8, value_group_size=64, sinks=1, residual=31, "
        "rotate='hadamard-values')",
}


@torch.no_grad()
def answer_log_probs(
    model: torch.nn.Module, input_ids: torch.Tensor, spec: str, steps: int, forced: list[int] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Next-token log-probabilities over ``steps`` answer positions with cache ``spec``.

    Parameters
    ----------
    input_ids:
        ``[1, T]`` prompt tokens.
    forced:
        Answer tokens to feed (teacher forcing); None: greedy, the tokens are returned.

    Returns
    -------
    tuple[torch.Tensor, list[int]]
        ``[steps, V]`` float32 log-probabilities (row 0: the prediction after the prompt) and the answer tokens.
    """
    cache = kvstack.make_cache(model, spec)
    rows = [prefill(model, input_ids, cache)[0]]
    tokens: list[int] = []
    for step in range(steps):
        token = int(rows[-1].argmax()) if forced is None else forced[step]
        tokens.append(token)
        if step + 1 < steps:
            out = model(torch.tensor([[token]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
            rows.append(out.logits[0, -1])
    return torch.stack(rows).float().log_softmax(-1), tokens


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of ``KL(reference || other)`` for ``[N, V]`` log-probabilities."""
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def markdown(results: dict) -> str:
    m = results["machine"]
    tasks = results["tasks"]
    lines = [
        "# Codec divergence from the full cache", "",
        f"- command: `{results['command']}`", f"- date: {results['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)",
        f"- model: SmolLM2-135M-Instruct; {results['length']}-token prompts, {results['samples']} samples per task "
        f"(seed {results['seed']}), {results['answer_tokens']} answer positions each", "",
        "Mean KL(full || codec) of the next-token distribution, nats, teacher-forced on the full cache's greedy "
        "answer (lower is closer to the full cache). Ratio: the codec's mean KL over KIVI-4's.", "",
        "| codec | spec | " + " | ".join(tasks) + " | mean | vs KIVI-4 |",
        "| --- | --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |",
    ]
    base = results["codecs"]["KIVI-4"]["mean"] if "KIVI-4" in results["codecs"] else None
    for name, row in results["codecs"].items():
        cells = " | ".join(f"{row['tasks'][task]:.5f}" for task in tasks)
        ratio = f"{row['mean'] / base:.2f}" if base else "–"
        lines.append(f"| {name} | `{row['spec']}` | {cells} | {row['mean']:.5f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="niah_multikey,niah_multiquery")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--answer-tokens", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/codec_divergence")
    args = parser.parse_args()
    if args.samples < 1 or args.answer_tokens < 1:
        parser.error("--samples and --answer-tokens must be at least 1")
    model, tokenizer = kvstack.load_model("smollm2-135m")
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    divergences: dict[str, dict[str, list[float]]] = {name: {task: [] for task in tasks} for name in CODECS}
    with tqdm(total=len(tasks) * args.samples, desc="samples") as progress:
        for task_name in tasks:
            task = get_task(task_name)
            for index in range(args.samples):
                sample = task.generate(tokenizer, args.length, random.Random(f"{args.seed}|{task_name}|{index}"))
                input_ids = torch.tensor([sample.input_ids])
                reference, answer = answer_log_probs(model, input_ids, "full", args.answer_tokens)
                for name, spec in CODECS.items():
                    log_probs, _ = answer_log_probs(model, input_ids, spec, args.answer_tokens, forced=answer)
                    divergences[name][task_name].append(kl_divergence(reference, log_probs))
                progress.update()
    codecs = {}
    for name, per_task in divergences.items():
        means = {task: statistics.fmean(values) for task, values in per_task.items()}
        codecs[name] = {"spec": CODECS[name], "tasks": means, "mean": statistics.fmean(means.values()),
                        "per_sample": per_task}
    results = {"command": "python " + " ".join(sys.argv),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "tasks": tasks, "length": args.length, "samples": args.samples, "seed": args.seed,
               "answer_tokens": args.answer_tokens, "codecs": codecs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "README.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
