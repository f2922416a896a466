"""``kvstack`` command line: thin sub-commands over the library.

The parser, ``--help``, ``kvstack methods`` and spec errors import neither torch nor transformers (a few
seconds); each sub-command imports what it needs once its arguments are checked.

Usage errors (unknown method or parameter, bad budget, empty or over-long prompt, unknown model) print
one line on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from kvstack.bench.cli import add_bench_parser
from kvstack.bench.engine_cli import add_engine_bench_parser
from kvstack.errors import KVStackError

USAGE_ERROR = 2
# calibrate --retrieval-heads: how heads are scored
RETRIEVAL_HEAD_METHODS = ("probe", "keyed", "gates", "greedy", "search")


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

    if args.retrieval_heads == "gates" and args.gate_steps < 1:
        raise UsageError(f"--gate-steps must be >= 1, got {args.gate_steps}")
    for flag, value in (("--gate-lr", args.gate_lr), ("--gate-reg", args.gate_reg)):
        if value is not None and args.retrieval_heads != "gates":
            raise UsageError(f"{flag} is for --retrieval-heads gates only")
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if args.retrieval_heads in ("greedy", "search") and args.greedy_heads < 1:
        raise UsageError(f"--greedy-heads must be >= 1, got {args.greedy_heads}")
    if args.prompt_length is not None and args.retrieval_heads not in ("gates", "greedy", "search"):
        raise UsageError("--prompt-length: for --retrieval-heads gates, greedy or search only")
    if args.prompts is not None and args.retrieval_heads not in ("greedy", "search"):
        raise UsageError("--prompts: for --retrieval-heads greedy or search only")
    if args.key_words is not None and args.retrieval_heads != "search":
        raise UsageError("--key-words is for --retrieval-heads search only")
    if args.prompts is not None and args.prompts < 1:
        raise UsageError(f"--prompts must be >= 1, got {args.prompts}")
    if args.prompt_length is not None and args.prompt_length < 320:
        raise UsageError(f"--prompt-length must be >= 320 tokens (4 x duo's 16 sinks + 64 recent), got "
                         f"{args.prompt_length}")
    if args.out is not None and not args.retrieval_heads:
        raise UsageError("--out is for --retrieval-heads (the head map's path); other calibrations go to the "
                         "model's own file")
    if args.out is not None:
        _check_writable(Path(args.out), "--out")  # before minutes of calibration, not after
    if args.kvsharer is not None:
        if args.kvsharer < 1:
            raise UsageError(f"--kvsharer must be >= 1 layer to share, got {args.kvsharer}")
        if not 0.0 <= args.kvsharer_threshold <= 1.0:
            raise UsageError(f"--kvsharer-threshold must be in [0, 1], got {args.kvsharer_threshold}")

    from kvstack.models import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    if args.kvsharer is not None:
        return _calibrate_kvsharer(args, model, tokenizer)
    if args.retrieval_heads:
        return _calibrate_retrieval_heads(args, model, tokenizer)
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


def _check_writable(path: Path, flag: str) -> None:
    """Refuse, with one line, a file path that cannot be written (a directory, or no rights there)."""
    import tempfile

    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give the path of a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".kvstack-check-"):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None


def _calibrate_retrieval_heads(args: argparse.Namespace, model: Any, tokenizer: Any) -> int:
    """Score every KV head (a probe, DuoAttention's gates, or a greedy choice) and write duo's artefact
    (``calibrate --retrieval-heads [probe|keyed|gates|greedy|search]``), to the model's own file or ``--out``."""
    import time

    from kvstack.calibration import model_key
    from kvstack.calibration.head_map import head_map_path, save_head_scores
    from kvstack.calibration.head_probe import KEYED_PROBE, probe_retrieval_heads

    path = Path(args.out) if args.out is not None else head_map_path(model_key(model))
    if path.is_file() and not args.force:
        print(f"retrieval heads: {path} (existing; --force to redo)")
        return 0
    start = time.perf_counter()
    if args.retrieval_heads == "gates":
        from kvstack.calibration.head_gates import fit_retrieval_gates

        def report(step: int, distance: float, mean_gate: float) -> None:  # a fit is minutes: say where it is
            if not args.no_progress and (step % 10 == 0 or step == args.gate_steps):
                print(f"gate fit: step {step}/{args.gate_steps}, distance {distance:.3f}, mean gate "
                      f"{mean_gate:.3f}", file=sys.stderr, flush=True)

        record = fit_retrieval_gates(model, tokenizer, steps=args.gate_steps, source=args.source, progress=report,
                                     **_given(length=args.prompt_length, lr=args.gate_lr, reg=args.gate_reg))
        how = f"{args.gate_steps} gate-fit steps, final distance {record['final_distance']:.3f}"
    elif args.retrieval_heads == "greedy":
        from kvstack.calibration.head_gates import select_retrieval_heads

        def chosen(count: int, head: tuple[int, int], loss: float) -> None:  # a round is a minute: say each
            if not args.no_progress:
                print(f"greedy: head {count}/{args.greedy_heads} L{head[0]}.H{head[1]} (answer loss before it "
                      f"{loss:.3f})", file=sys.stderr, flush=True)

        record = select_retrieval_heads(model, tokenizer, count=args.greedy_heads, source=args.source,
                                        progress=chosen, **_head_prompt_options(args))
        how = f"{args.greedy_heads} heads chosen greedily"
    elif args.retrieval_heads == "search":
        from kvstack.calibration.head_search import search_retrieval_heads

        def joined(count: int, head: tuple[int, int], loss: float) -> None:  # a round is minutes: say each
            if not args.no_progress:
                print(f"search: head {count}/{args.greedy_heads} L{head[0]}.H{head[1]} (answer loss with it "
                      f"{loss:.3f})", file=sys.stderr, flush=True)

        record = search_retrieval_heads(model, tokenizer, count=args.greedy_heads, source=args.source,
                                        progress=joined, **_head_prompt_options(args))
        how = (f"{args.greedy_heads} heads chosen by the answer's loss, {record['loss_streaming']:.3f} with none "
               f"whole to {record['losses'][-1]:.3f} (every head whole: {record['loss_whole']:.3f})")
    else:
        kind = "keyed" if args.retrieval_heads == "keyed" else "single"
        record = probe_retrieval_heads(model, tokenizer, source=args.source, kind=kind, **KEYED_PROBE
                                       if kind == "keyed" else {})
        how = f"{record['copy_steps']} copy steps"
    save_head_scores(record, path)
    scores = [(score, layer, head) for layer, row in enumerate(record["scores"]) for head, score in enumerate(row)]
    best = ", ".join(f"L{layer}.H{head} {score:.2f}" for score, layer, head in sorted(scores, reverse=True)[:5])
    print(f"retrieval heads: {path} (written; {time.perf_counter() - start:.1f} s, {how}); strongest: {best}")
    return 0


def _head_prompt_options(args: argparse.Namespace) -> dict[str, int]:
    """The greedy choice's or head search's prompt options the command line set."""
    return _given(prompts=args.prompts, length=args.prompt_length, key_words=args.key_words)


def _given(**options: Any) -> dict[str, Any]:
    """The options the command line set (not None); the others keep the called function's defaults."""
    return {name: value for name, value in options.items() if value is not None}


def _calibrate_kvsharer(args: argparse.Namespace, model: Any, tokenizer: Any) -> int:
    """Search KVSharer's layer map on calibration text and write it (``calibrate --kvsharer N``)."""
    import time

    from kvstack.calibration.layer_search import calibrate_layer_map

    start = time.perf_counter()
    path, record = calibrate_layer_map(model, tokenizer, args.kvsharer, args.kvsharer_threshold, tokens=args.tokens,
                                       sequence_length=args.sequence_length, source=args.source, force=args.force)
    if record is None:
        print(f"kvsharer map: {path} (existing; --force to redo)")
        return 0
    shared = ", ".join(f"{layer}<-{source}" for layer, source in record["map"].items()) or "none"
    print(f"kvsharer map: {path} (written; {time.perf_counter() - start:.1f} s, {len(record['trials'])} trials)")
    print(f"{len(record['map'])} of {args.kvsharer} layers share (layer<-reused layer): {shared}")
    return 0


def cmd_transform(args: argparse.Namespace) -> int:
    """Apply a model transform and write the new model as a checkpoint plain transformers loads."""
    import json
    from pathlib import Path

    from kvstack.spec import parse

    method = parse(args.spec)  # a bad spec is one line before the model loads
    if not getattr(method, "is_transform", False):
        raise UsageError(f"{method.label()} is a cache method, not a model transform; transforms are listed under "
                         "'model/' in `kvstack methods`")
    from kvstack.transforms.chain import transform_steps

    transform_steps(method)  # a lone repair is refused before the model loads
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty; give a new directory")

    from kvstack.models import load_model
    from kvstack.transforms import transform
    from kvstack.transforms.checkpoint import is_plain, save_transformed

    model, tokenizer = load_model(args.model, device=args.device)
    new, record = transform(model, method, tokenizer=tokenizer, source=args.source)
    out.mkdir(parents=True, exist_ok=True)
    save_transformed(new, out)
    tokenizer.save_pretrained(out)
    (out / "kvstack_transform.json").write_text(json.dumps({**record, "model": args.model}, indent=1))
    before, after = record["kv_bytes_per_token"]
    kind = "a transformers checkpoint" if is_plain(new) else "a kvstack checkpoint (kvstack.load_model reads it; its " \
        "attention exists only in kvstack)"
    print(f"{record['spec']}: {out} written as {kind} ({before} -> {after} KV bytes per token, "
          f"{record['seconds']:.1f} s)")
    return 0


def _check_serve_args(args: argparse.Namespace) -> None:
    """Refuse bad ``serve`` arguments before anything heavy is imported (one line each)."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if not args.memory_mb > 0:
        raise UsageError(f"--memory-mb must be > 0, got {args.memory_mb}")
    if args.host_mb < 0:
        raise UsageError(f"--host-mb must be >= 0, got {args.host_mb}")
    for name in ("block_size", "max_batched_tokens", "max_seqs", "max_queue"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_prompt_tokens", "max_tokens_limit", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key, or leave it out to serve without authentication")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UsageError("--served-model-name is empty")
    from kvstack.engine.scheduler import SCHEDULING_POLICIES

    if args.policy not in SCHEDULING_POLICIES:
        raise UsageError(f"unknown --policy {args.policy!r}; choose one of {', '.join(SCHEDULING_POLICIES)}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over HTTP with OpenAI's API (completions, chat, models) until interrupted.

    The arguments are checked before the model loads; the engine is closed (tiered blocks written to disk) when
    the server stops.
    """
    _check_serve_args(args)
    import uvicorn

    from kvstack.engine import Engine
    from kvstack.models import load_model
    from kvstack.serve import create_app

    model, tokenizer = load_model(args.model, device=args.device)
    # The model may end turns with more than the tokenizer's EOS (generation_config can list several).
    stop_token_ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop_token_ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    engine = Engine(
        model, memory_mb=args.memory_mb, block_size=args.block_size, max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_seqs, policy=args.policy, enable_prefix_caching=not args.no_prefix_caching,
        host_mb=args.host_mb, disk_dir=args.disk_dir, tokenizer=tokenizer, threads=args.threads,
    )
    try:
        name = args.served_model_name or args.model
        app = create_app(
            engine, tokenizer, name, max_prompt_tokens=args.max_prompt_tokens,
            max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue, api_key=args.api_key,
            stop_token_ids=sorted(token for token in stop_token_ids if token is not None),
        )
        print(f"kvstack serve: {name!r} at http://{args.host}:{args.port}/v1 ({engine.pool.num_blocks} KV blocks "
              f"of {args.block_size} tokens{', API key required' if args.api_key else ''})", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0


def _add_serve_parser(sub: Any) -> None:
    """The ``serve`` sub-command; its defaults match ``engine-bench``'s engine."""
    import os

    serve = sub.add_parser("serve", help="serve a model over HTTP with OpenAI's API (completions, chat, streaming)",
                           description="An OpenAI-compatible HTTP server over kvstack's paged engine.")
    serve.add_argument("--model", default="smollm2-135m",
                       help="model name or local HF directory (default: %(default)s)")
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients pass as 'model' (default: the --model value)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--api-key", default=os.environ.get("KVSTACK_API_KEY") or None,
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $KVSTACK_API_KEY; none when unset)")
    serve.add_argument("--memory-mb", type=float, default=1024.0, help="KV pool budget in MB (default: %(default)s)")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)")
    serve.add_argument("--max-batched-tokens", type=int, default=512,
                       help="token budget of one engine step (default: %(default)s)")
    serve.add_argument("--max-seqs", type=int, default=64, help="maximum running sequences (default: %(default)s)")
    serve.add_argument("--policy", default="fcfs", help="scheduling policy: fcfs or lpm (default: %(default)s)")
    serve.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    serve.add_argument("--host-mb", type=float, default=0.0, help="host tier for evicted prefix blocks, MB")
    serve.add_argument("--disk-dir", default=None, help="disk tier directory (survives restarts)")
    serve.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="longest prompt accepted, in tokens (default: the model's context)")
    serve.add_argument("--max-tokens-limit", type=int, default=None,
                       help="largest max_tokens a request may ask for (default: only the context limits it)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests (one per prompt) waiting or running at most; more get 429 (default: "
                            "%(default)s)")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads of the engine (default: automatic)")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="server log level (default: %(default)s)")
    serve.set_defaults(func=cmd_serve)


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
    cal.add_argument("--kvsharer", type=int, default=None, metavar="N",
                     help="instead: search KVSharer's map of N layers reusing another layer's cache")
    cal.add_argument("--kvsharer-threshold", type=float, default=0.9,
                     help="KVSharer: least cosine similarity of the last hidden states to the full model's "
                          "(default 0.9)")
    cal.add_argument("--retrieval-heads", nargs="?", const="probe", choices=RETRIEVAL_HEAD_METHODS, default=None,
                     help="instead: score every KV head for duo's artefact, with the retrieval probe (probe, the "
                          "default; seconds), the probe on prompts of several named needles asking for one (keyed; "
                          "minutes), DuoAttention's gates fitted with the model frozen (gates; minutes), or heads "
                          "chosen one by one by the answer's gradient at duo's split (greedy; a minute a head), or "
                          "by the answer's loss with every candidate head whole (search; minutes a head)")
    cal.add_argument("--gate-steps", type=int, default=80,
                     help="--retrieval-heads gates: optimiser steps, one synthetic passkey prompt each (default 80)")
    cal.add_argument("--gate-lr", type=float, default=None,
                     help="--retrieval-heads gates: Adam's learning rate (default 0.05, for 80 steps; DuoAttention's "
                          "2000-step fit uses 0.02)")
    cal.add_argument("--gate-reg", type=float, default=None,
                     help="--retrieval-heads gates: weight of the gates' sum in the loss (default 0.5, for 80 steps; "
                          "DuoAttention's uses 0.05)")
    cal.add_argument("--greedy-heads", type=int, default=9,
                     help="--retrieval-heads greedy or search: heads to choose, one round each (default 9: a tenth of "
                          "SmolLM2-135M's 90 KV heads)")
    cal.add_argument("--prompts", type=int, default=None,
                     help="--retrieval-heads greedy or search: keyed needle prompts each round reads (default: 4 for "
                          "greedy, 16 for search)")
    cal.add_argument("--prompt-length", type=int, default=None, metavar="TOKENS",
                     help="--retrieval-heads gates, greedy or search: haystack tokens per prompt (default: 512 for "
                          "gates, 1024 for greedy, 2048 for search)")
    cal.add_argument("--key-words", type=int, default=None, choices=(1, 2),
                     help="--retrieval-heads search: words per needle's name, 2 for names like amber-falcon as "
                          "RULER's keys (default 1)")
    cal.add_argument("--out", default=None, metavar="PATH",
                     help="--retrieval-heads: write the head map here (duo(artefact=PATH) reads it) instead of the "
                          "model's own file")
    cal.add_argument("--force", action="store_true", help="recalibrate even when an artefact exists")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal.set_defaults(func=cmd_calibrate)

    trans = sub.add_parser("transform", help="convert a model to need less KV cache (gqa...) and save it",
                           description="Apply a model transform (see `kvstack methods`, category model/) and write "
                                       "the new model as a checkpoint plain transformers loads.")
    trans.add_argument("--model", default="smollm2-135m", help="model name or local HF directory")
    trans.add_argument("--spec", required=True, help="the transform, e.g. \"gqa(kv_heads=1, how='svd')\"")
    trans.add_argument("--out", required=True, help="directory to write the new checkpoint to (new or empty)")
    trans.add_argument("--source", default="python-docs", help="calibration text (as for calibrate)")
    trans.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    trans.set_defaults(func=cmd_transform)

    add_bench_parser(sub)
    add_engine_bench_parser(sub)
    _add_serve_parser(sub)
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
