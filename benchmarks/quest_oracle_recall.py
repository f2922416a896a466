"""Is Quest's recall limited by its bound or by reading pages at all? (issue 35: Quest with pages of 8 holds
40 of the full cache's 100 on the 8k needle in noise.)

Runs the recall grid's ``quest(budget=L/8, page=8)`` with one change: each decoding step reads the pages that
truly hold the most of its attention (every key of the tier scored exactly: an oracle, not a method), in a
results file of its own. Set beside Quest's own score (its bound) and the exact top entries
(``topk-exact`` in the recall grid: per query head, entries rather than pages), it says which of the three
limits recall at 1/8: the bound, the page, or the budget.

Usage::

    python benchmarks/quest_oracle_recall.py --length 7936 --task niah_single_noise [--max-minutes N]
    python benchmarks/quest_oracle_recall.py --report

Resumable (``results.jsonl`` under ``benchmarks/results/retrieval/quest_oracle/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import run_grid, stamp
from quest_mass_check import true_page_mass

import kvstack
from kvstack.cache.page_tier import TieredLayer
from kvstack.methods.retrieval import Quest

OUT = "benchmarks/results/retrieval/quest_oracle"


def choose_by_true_mass() -> None:
    """Make every Quest decoding step rank its pages by their true attention mass instead of the key bound."""
    attend = TieredLayer.attend
    current: dict[str, Any] = {}

    def noting(layer: TieredLayer, query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        current["layer"], current["query"] = layer, query
        return attend(layer, query, *args, **kwargs)

    def true_scores(self: Quest, query: torch.Tensor, summary: dict[str, torch.Tensor]) -> torch.Tensor:
        return true_page_mass(current["layer"], current["query"])

    TieredLayer.attend = noting
    Quest.page_scores = true_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=7936)
    parser.add_argument("--task", default="niah_single_noise")
    parser.add_argument("--page", type=int, default=8)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.report:
        from kvstack.bench import latest_results

        rows = latest_results(Path(OUT) / "results.jsonl")
        lines = ["| task | length | method | score with pages chosen by their true attention | samples |",
                 "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['task']} | {r['length']} | `{r['method_spec']}` | {r['score']:.0f} | {r['samples']} |"
                  for r in rows]
        Path(f"{OUT}.md").write_text(
            f"Command: `python benchmarks/quest_oracle_recall.py --length L --task T`, then `--report`; {stamp()} "
            "(report written; the cells' own dates are in results.jsonl)\n\n" + "\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    from kvstack.bench import BenchConfig

    choose_by_true_mass()
    model, tokenizer = kvstack.load_model("smollm2-135m")
    spec = f"quest(budget={args.length // 8}, page={args.page})"
    config = BenchConfig(methods=[spec], tasks=[args.task], lengths=[args.length], samples=args.samples,
                         out_dir=OUT, progress=sys.stderr.isatty(), checkpoint_every=2, baseline=False, plots=False)
    print(f"{stamp()}: {spec} with pages chosen by their true attention", flush=True)
    run_grid(config, max_minutes=args.max_minutes, model=model, tokenizer=tokenizer)


if __name__ == "__main__":
    main()
