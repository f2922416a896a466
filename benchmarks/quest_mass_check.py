"""Is Quest's page choice the problem, or the page? (issue 35: Quest with pages of 16 misses passkey digits.)

On one 4k passkey sample (index 1 of the recall grid, the one Quest answers 98367 for 98366), at the first
decoding step, per layer: the share of the step's attention (summed over each KV head's query heads, over all
entries) that falls on the tier pages Quest reads, against the share on the same number of pages chosen by an
oracle that knows each page's true attention, and on the whole tier. If Quest's bound chose badly, the first
would be far below the second; if the page is too coarse for the budget, the oracle falls short too.

A caution learnt on 12-06: nearly equal shares do not mean nearly the same pages for the task. At 8k Quest's
pages held 86.2% against the oracle's 88.3%, yet Quest reading the oracle's pages answers 20 of 20 needles and
its bound 8 (``quest_oracle_recall.py``). Judge a choice of pages by the task, with this as a diagnostic.

Usage::

    python benchmarks/quest_mass_check.py [--pages 16,8] [--task passkey --length 4096 --sample 1]

Other tasks, lengths and samples (the budget is always 1/8 of the length) write
``quest_mass_{task}_{length}.md`` beside the default's ``quest_mass.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import stamp

import kvstack
from kvstack.bench.runner import sample_rng
from kvstack.bench.tasks import get_task
from kvstack.cache.page_tier import TieredLayer

OUT = "benchmarks/results/retrieval/quest_mass.md"


def true_page_mass(layer: TieredLayer, query: torch.Tensor) -> torch.Tensor:
    """``[B, H, P]`` the share of a decoding step's attention (``query`` ``[B, Hq, 1, D]``, averaged over each KV
    head's query heads) that falls on each of the layer's tier pages, from every key in the tier (a diagnostic:
    it reads the whole tier)."""
    stored = layer.full_pages()
    batch = query.shape[0]
    keys, _ = layer.pages.read(torch.arange(stored).expand(batch, layer.heads, stored))  # [B, H, N, D]
    group = query.shape[1] // layer.heads
    grouped = query.view(batch, layer.heads, group, -1)
    scale = query.shape[-1] ** -0.5
    tier = torch.einsum("bhgd,bhnd->bhgn", grouped, keys.to(query.dtype)) * scale
    resident = torch.einsum("bhgd,bhnd->bhgn", grouped, layer.tail_keys) * scale
    weights = torch.cat((tier, resident), -1).softmax(-1)[..., : tier.shape[-1]]
    return weights.view(batch, layer.heads, group, stored, layer.page).sum(-1).sum(2) / group


def shares(model: torch.nn.Module, ids: torch.Tensor, page: int,
           budget: int = 512) -> list[tuple[int, float, float, float]]:
    """Per layer: (layer, share read by Quest, share an oracle reads with as many pages, share of the tier)."""
    cache = kvstack.make_cache(model, f"quest(budget={budget}, page={page})")
    rows: list[tuple[int, float, float, float]] = []
    attend = TieredLayer.attend

    def measured(layer: TieredLayer, query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        output = attend(layer, query, *args, **kwargs)
        stored = layer.full_pages()
        if query.shape[2] == 1 and stored:
            mass = true_page_mass(layer, query)
            grouped = query.view(1, layer.heads, query.shape[1] // layer.heads, -1)
            count = layer.owner.method.pages_read(stored)
            chosen = layer.owner.method.page_scores(grouped, layer.summary).topk(count, -1).indices
            best = mass.topk(count, -1).indices
            rows.append((layer.layer_idx, float(mass.gather(-1, chosen).sum(-1).mean()),
                         float(mass.gather(-1, best).sum(-1).mean()), float(mass.sum(-1).mean())))
        return output

    TieredLayer.attend = measured
    try:
        with torch.no_grad():
            logits = kvstack.prefill(model, ids, cache, chunk_size=1024)
            model(input_ids=logits.argmax(-1, keepdim=True), **kvstack.cache_kwargs(model, cache), use_cache=True)
    finally:
        TieredLayer.attend = attend
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", default="16,8")
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--sample", type=int, default=1, help="the recall grid's sample index (seed 0)")
    args = parser.parse_args()
    model, tokenizer = kvstack.load_model("smollm2-135m")
    task = get_task(args.task)
    budget = args.length // 8
    sample = task.generate(tokenizer, args.length, sample_rng(0, task, args.length, args.sample), "after",
                           chat=True, answer_prefix="")
    ids = torch.tensor([sample.input_ids])
    lines = ["| page | Quest's pages | oracle's pages (as many) | whole tier | worst layer: Quest / oracle |",
             "| --- | --- | --- | --- | --- |"]
    for page in (int(p) for p in args.pages.split(",")):
        rows = shares(model, ids, page, budget)
        worst = min(rows, key=lambda r: r[1])
        lines.append(f"| {page} | {statistics.fmean(r[1] for r in rows):.3f} | "
                     f"{statistics.fmean(r[2] for r in rows):.3f} | {statistics.fmean(r[3] for r in rows):.3f} | "
                     f"layer {worst[0]}: {worst[1]:.3f} / {worst[2]:.3f} |")
        print(lines[-1], flush=True)
    default = (args.task, args.length, args.sample) == ("passkey", 4096, 1)
    out = OUT if default else str(Path(OUT).with_name(f"quest_mass_{args.task}_{args.length}.md"))
    command = "python benchmarks/quest_mass_check.py --pages " + args.pages + (
        "" if default else f" --task {args.task} --length {args.length} --sample {args.sample}")
    Path(out).write_text(f"Command: `{command}`; {stamp()}\n\n"
                         "Share of the first decoding step's attention (mean over 30 layers and 3 KV heads) on one "
                         f"{args.length}-token {args.task} sample (index {args.sample}, answer {sample.answers[0]}), "
                         f"budget {budget} tokens.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
