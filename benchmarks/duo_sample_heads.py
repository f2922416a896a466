"""Which one head, kept whole beside a head map's own, changes duo's answer on a given recall sample.

A diagnosis of samples duo misses, not a way to choose heads: it reads test samples. For each sample (the
recall grid's own prompt, seed 0), the split duo runs with ``duo(heads=H, artefact=A)`` and then that split
with each other KV head whole are scored by the cross-entropy of the right answer's digits, teacher-forced
exactly as duo decodes (:func:`kvstack.calibration.head_search.evaluate_splits`); the heads that lower it
most are then decoded greedily through duo's own cache, to see whether the answer comes back.

    python benchmarks/duo_sample_heads.py --samples 1,2 --artefact benchmarks/results/retrieval/heads/search.json

Writes ``benchmarks/results/retrieval/sample_heads_<task>_<length>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import kvstack
from kvstack.bench.runner import sample_rng
from kvstack.bench.tasks import get_task
from kvstack.calibration import model_key
from kvstack.calibration.head_map import HEADS_FORMAT
from kvstack.calibration.head_search import evaluate_splits, prompt_cache
from kvstack.models import model_geometry

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import stamp

OUT = Path("benchmarks/results/retrieval")


def decode(model: torch.nn.Module, tokenizer: object, prompt: list[int], whole: torch.Tensor, tokens: int) -> str:
    """Greedy answer through duo's own cache with exactly the heads of ``whole`` ``[L, H_kv]`` kept whole."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "heads.json"
        path.write_text(json.dumps({"format": HEADS_FORMAT, "version": 1, "model_key": model_key(model),
                                    "scores": whole.float().tolist()}))
        cache = kvstack.make_cache(model, f"duo(heads={int(whole.sum()) / whole.numel()}, artefact='{path}')")
        ids = torch.tensor([prompt])
        out = []
        with torch.no_grad():
            for _ in range(tokens):
                logits = model(input_ids=ids, **kvstack.cache_kwargs(model, cache), use_cache=True).logits
                ids = logits[:, -1:].argmax(-1)
                out.append(int(ids))
    return tokenizer.decode(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="niah_multikey")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", default="1,2", help="comma-separated sample indices of the recall cell")
    parser.add_argument("--artefact", required=True, help="the head map duo reads")
    parser.add_argument("--heads", type=float, default=0.1, help="duo's heads (fraction kept whole)")
    parser.add_argument("--top", type=int, default=3, help="heads decoded greedily per sample")
    args = parser.parse_args()
    model, tokenizer = kvstack.load_model("smollm2-135m")
    method = kvstack.parse(f"duo(heads={args.heads}, artefact={args.artefact!r})")
    geometry = model_geometry(model)
    layers, kv_heads = geometry.num_layers, geometry.num_kv_heads
    method.load_artefacts(model_key(model), layers, kv_heads)
    base = torch.tensor(method.retrieval)  # [L, H_kv]
    task = get_task(args.task)
    lines = [f"Command: `python benchmarks/duo_sample_heads.py --task {args.task} --length {args.length} --samples "
             f"{args.samples} --artefact {args.artefact} --heads {args.heads}`; {stamp()}", "",
             f"Base: `{method.label()}` ({int(base.sum())} heads whole). Loss: cross-entropy of the right answer's "
             "digits, teacher-forced as duo decodes. A diagnosis on test samples, not a choice of heads.", "",
             "| sample | answer | split | loss | greedy answer |", "| --- | --- | --- | --- | --- |"]
    for index in (int(i) for i in args.samples.split(",")):
        sample = task.generate(tokenizer, args.length, sample_rng(0, task, args.length, index), "after")
        answer = tokenizer(f" {sample.answers[0]}", add_special_tokens=False)["input_ids"]
        cache = prompt_cache(model, sample.input_ids)
        candidates = [h for h in range(base.numel()) if not base.flatten()[h]]
        splits = base.flatten().repeat(len(candidates), 1)
        splits[torch.arange(len(candidates)), candidates] = True
        ends = evaluate_splits(model, cache, answer, torch.stack([base, torch.ones_like(base)]))
        losses = torch.cat([evaluate_splits(model, cache, answer, part.view(-1, layers, kv_heads))
                            for part in splits.split(32)])
        rows = [("duo's split", float(ends[0]), base), ("every head whole", float(ends[1]), torch.ones_like(base))]
        for order in losses.argsort()[: args.top].tolist():
            head = candidates[order]
            rows.append((f"+ {head // kv_heads}.{head % kv_heads}", float(losses[order]),
                         splits[order].view(layers, kv_heads)))
        for name, loss, whole in rows:
            said = decode(model, tokenizer, sample.input_ids, whole, len(answer) + 1).strip()
            lines.append(f"| {index} | {sample.answers[0]} | {name} | {loss:.3f} | `{said}` |")
            print(lines[-1], flush=True)
    path = OUT / f"sample_heads_{args.task}_{args.length}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path)


if __name__ == "__main__":
    main()
