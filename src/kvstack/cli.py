"""``kvstack`` command line: thin sub-commands over the library.

The parser, ``--help``, ``kvstack methods`` and spec errors import neither torch nor transformers (a few
seconds); each sub-command imports what it needs once its arguments are checked.

Usage errors (unknown method or parameter, bad budget, empty or over-long prompt, unknown model) print
one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvstack.bench.cli import add_bench_parser
from kvstack.bench.engine_cli import add_engine_bench_parser
from kvstack.errors import KVStackError

USAGE_ERROR = 2


class UsageError(KVStackError):
    """A command-line mistake: reported in one line, exit status 2."""


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file {path}: no such file")
        return path.read_text(encoding="utf-8")
    return args.prompt


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every method with its category, parameters and description."""
    from kvstack.spec import describe, list_methods

    if args.json:
        rows = [
            {"name": i.name, "category": i.category, "parameters": i.parameters, "description": i.description}
            for i in list_methods()
        ]
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(describe())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a completion with a method applied, then one summary line.

    Every usage error is found before the model loads: the spec, the prompt, and its length (read with the
    model's tokenizer and config alone, where they are already on disk).
    """
    from kvstack.spec import parse

    parse(args.method)
    prompt = _read_prompt(args)
    if not prompt.strip():
        raise UsageError("the prompt is empty; give some text with --prompt or --prompt-file")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.chunk_size is not None and args.chunk_size < 0:
        raise UsageError(f"--chunk-size must be >= 0, got {args.chunk_size}")

    from kvstack.api import encode_prompt, generate
    from kvstack.models import load_model, load_tokenizer, resolve_device

    resolve_device(args.device)
    tokenizer_and_context = load_tokenizer(args.model)
    if tokenizer_and_context is not None:
        tokenizer, context = tokenizer_and_context
        tokens = encode_prompt(tokenizer, prompt, chat=not args.no_chat).shape[1]
        if context is not None and tokens + args.max_new_tokens > context:
            raise UsageError(f"the prompt has {tokens} tokens (+{args.max_new_tokens} to generate), more than the "
                             f"model's context of {context}; shorten it or lower --max-new-tokens")

    import torch

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device=args.device)
    chunk = "auto" if args.chunk_size is None else (None if args.chunk_size == 0 else args.chunk_size)
    result = generate(
        model, tokenizer, prompt, args.method, max_new_tokens=args.max_new_tokens, chunk_size=chunk,
        chat=not args.no_chat, seed=args.seed,
    )
    print(result.text)
    print(f"[{args.method}] {result.summary_line()}", file=sys.stderr if args.summary_stderr else sys.stdout)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate a model (or reuse its saved artefact) and print where the artefact is, with a summary."""
    import time

    from kvstack.calibration import (
        CalibrationError,
        calibrate,
        calibration_path,
        check_source,
        load_calibration,
        model_key,
        save_calibration,
        source_label,
    )

    if args.tokens < 1:
        raise UsageError(f"--tokens must be >= 1, got {args.tokens}")
    if args.sequence_length < 1:
        raise UsageError(f"--sequence-length must be >= 1, got {args.sequence_length}")
    check_source(args.source)

    from kvstack.models import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    path = calibration_path(model_key(model))
    if path.is_file() and not args.force:
        try:
            cal = load_calibration(model)
        except CalibrationError as err:
            print(f"kvstack: {err}; calibrating again", file=sys.stderr)
        else:
            wanted = (args.tokens, args.sequence_length)
            same_text = cal.source.startswith(source_label(args.source) + ":")
            if (cal.tokens, cal.sequence_length) == wanted and same_text:
                print(f"calibration: {path} (existing; --force to redo)")
                print(cal.summary())
                return 0
            print(f"kvstack: {path} was made with {cal.tokens} tokens in sequences of {cal.sequence_length} "
                  f"from {cal.source}; calibrating again as asked", file=sys.stderr)
    start = time.perf_counter()
    cal = calibrate(model, tokenizer, tokens=args.tokens, sequence_length=args.sequence_length, source=args.source,
                    progress=not args.no_progress)
    seconds = time.perf_counter() - start
    save_calibration(cal, path)
    print(f"calibration: {path} (written; {seconds:.1f} s)")
    print(cal.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="kvstack", description="KV-cache management for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    methods = sub.add_parser("methods", help="list every method with its category and parameters")
    methods.add_argument("--json", action="store_true", help="machine-readable output")
    methods.set_defaults(func=cmd_methods)

    gen = sub.add_parser("generate", help="generate with a KV-cache method applied")
    gen.add_argument("--model", default="smollm2-135m",
                     help="model name or local HF directory (default: %(default)s)")
    gen.add_argument("--method", default="full",
                     help="method spec, e.g. 'snapkv(ratio=0.5)'; see kvstack methods (default: %(default)s)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file holding the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: %(default)s)")
    gen.add_argument("--chunk-size", type=int, default=None,
                     help="prefill chunk in tokens; 0: one forward (default: 512 for methods that evict as they "
                          "read, one forward otherwise)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--seed", type=int, default=0, help="seed of random methods (default: %(default)s)")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--summary-stderr", action="store_true", help="print the summary line on stderr")
    gen.set_defaults(func=cmd_generate)

    cal = sub.add_parser("calibrate", help="collect key/value statistics for quantisation and low-rank codecs")
    cal.add_argument("--model", default="smollm2-135m", help="model name or local HF directory")
    cal.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    cal.add_argument("--sequence-length", type=int, default=1024, help="tokens per forward pass (default 1024)")
    cal.add_argument("--source", default="python-docs",
                     help="calibration text: python-docs (default; disjoint from the bench prose), kjv-end, "
                          "or a UTF-8 text file")
    cal.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    cal.add_argument("--force", action="store_true", help="recalibrate even when an artefact exists")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal.set_defaults(func=cmd_calibrate)

    add_bench_parser(sub)
    add_engine_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvstack`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (KVStackError, UsageError) as err:
        print(f"kvstack: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("kvstack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
