"""Core benchmark (issue "Core"): decode speed, prefill overhead, peak memory and byte accounting.

Everything compared is measured in the same run, on the same machine, with the same model:

1. decode ms/token at 4k and 8k tokens of context: transformers' ``DynamicCache`` and kvstack ``full``
   against ``streamingllm(ratio=0.75)`` and ``snapkv(ratio=0.75)`` (a quarter of the context kept);
2. prefill time at 4k: ``full`` against ``snapkv`` and ``h2o`` (one forward each, so the difference is
   the scoring the method adds), plus ``h2o`` with its default chunked prefill;
3. peak RSS of an 8k-token prompt + 16 decoded tokens, ``streamingllm(budget=512)`` against ``full``,
   each in a fresh process, both reading the prompt in 512-token chunks; the peak is reset
   (``/proc/self/clear_refs``) after the model is loaded, so it covers the prompt and decoding only;
4. ``kv_bytes()`` against the theoretical size of the kept entries, for every method, at 4k.

Usage::

    python benchmarks/core_bench.py [--out benchmarks/results/core] [--quick]

Writes ``results.json`` and ``README.md`` (tables, command, date, machine) in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import kvstack
from kvstack.api import prefill

DECODE_METHODS = ["dynamic-cache", "full", "streamingllm(ratio=0.75)", "snapkv(ratio=0.75)"]
BYTES_METHODS = [
    "full", "snapkv(ratio=0.5)", "keynorm(ratio=0.5)", "random(ratio=0.5)", "streamingllm(ratio=0.5)",
    "h2o(ratio=0.5)", "tova(ratio=0.5)", "scissorhands(ratio=0.5)", "pyramidkv(ratio=0.5)",
    "adakv(snapkv(ratio=0.5))", "adakv(h2o(ratio=0.5))", "streamingllm(ratio=0.5, positions='cache')",
]


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str | int]:
    """Where the numbers come from."""
    return {
        "cpu": cpu_name(), "cores": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "platform": platform.platform(),
    }


def prompt_ids(length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` random token ids (decode speed and bytes do not depend on content)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (1, length), generator=generator)


@torch.no_grad()
def decode_ms_per_token(model: torch.nn.Module, spec: str, ids: torch.Tensor, steps: int) -> dict[str, float]:
    """Prefill ``ids`` with ``spec`` then time ``steps`` greedy decode steps (after 2 warm-up steps)."""
    if spec == "dynamic-cache":
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        model(ids, **kvstack.cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        kept = ids.shape[1]
    else:
        cache = kvstack.make_cache(model, spec)
        start = time.perf_counter()
        prefill(model, ids, cache)
        prefill_s = time.perf_counter() - start
        kept = cache.tokens_kept()
    return {"prefill_s": prefill_s, "decode_ms_per_token": time_decode(model, cache, steps), "tokens_kept": kept}


@torch.no_grad()
def time_decode(model: torch.nn.Module, cache, steps: int) -> float:
    """ms per token of ``steps`` decode steps into ``cache`` (after 2 warm-up steps)."""
    token = torch.tensor([[42]])
    for _ in range(2):
        model(token, **kvstack.cache_kwargs(model, cache), use_cache=True)
    start = time.perf_counter()
    for _ in range(steps):
        model(token, **kvstack.cache_kwargs(model, cache), use_cache=True)
    return (time.perf_counter() - start) / steps * 1000


@torch.no_grad()
def prefill_seconds(model: torch.nn.Module, spec: str, ids: torch.Tensor, chunk: int | str | None) -> float:
    """Wall time of reading ``ids`` into a fresh ``spec`` cache (compression included)."""
    cache = kvstack.make_cache(model, spec)
    start = time.perf_counter()
    prefill(model, ids, cache, chunk_size=chunk)
    return time.perf_counter() - start


def peak_rss_child(spec: str, length: int, chunk: int) -> dict[str, float]:
    """Run one generation in a fresh process and return its peak RSS over prompt + decoding."""
    code = f"""
import json, torch, kvstack
from kvstack.api import prefill
torch.set_num_threads({torch.get_num_threads()})
model, _ = kvstack.load_model("smollm2-135m")
ids = torch.randint(100, 40000, (1, {length}), generator=torch.Generator().manual_seed(0))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
cache = kvstack.make_cache(model, {spec!r})
with torch.no_grad():
    model(ids[:, :8], **kvstack.cache_kwargs(model, kvstack.make_cache(model, "full")))  # warm up kernels and allocator
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    prefill(model, ids, cache, chunk_size={chunk})
    token = torch.tensor([[42]])
    for _ in range(16):
        model(token, **kvstack.cache_kwargs(model, cache), use_cache=True)
print(json.dumps({{"base_rss": base, "peak_rss": status("VmHWM:"), "kv_bytes": cache.kv_bytes(),
                  "full_kv_bytes": cache.full_kv_bytes(), "tokens_kept": cache.tokens_kept()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.no_grad()
def byte_accounting(model: torch.nn.Module, spec: str, ids: torch.Tensor) -> dict[str, float]:
    """``kv_bytes()`` against the theoretical bytes of the kept entries after prompt + 8 decode steps."""
    cache = kvstack.make_cache(model, spec)
    prefill(model, ids, cache)
    token = torch.tensor([[42]])
    for _ in range(8):
        model(token, **kvstack.cache_kwargs(model, cache), use_cache=True)
    theory = cache.theoretical_kv_bytes()
    lengths = [layer.head_lengths() for layer in cache.layers]
    per_head = torch.stack(lengths).flatten().tolist()
    return {
        "kv_bytes": cache.kv_bytes(), "theoretical_bytes": theory, "full_kv_bytes": cache.full_kv_bytes(),
        "overhead": cache.kv_bytes() / theory - 1.0, "tokens_kept": cache.tokens_kept(),
        "min_head_entries": min(per_head), "max_head_entries": max(per_head),
    }


def markdown(results: dict) -> str:
    """The results as Markdown tables."""
    lines = [
        "# Core benchmark", "",
        f"- command: `{results['command']}`", f"- date: {results['date']}",
        f"- machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"torch {results['machine']['torch']} ({results['machine']['torch_threads']} threads), "
        f"transformers {results['machine']['transformers']}",
        f"- model: {results['model']} (fp32)", "",
        "## Decode speed (median of rounds, same run)", "",
        "| context | method | tokens kept | ms/token | speed-up vs DynamicCache | speed-up vs kvstack full |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for length, rows in results["decode"].items():
        base = rows["dynamic-cache"]["decode_ms_per_token"]
        full = rows["full"]["decode_ms_per_token"]
        for spec, row in rows.items():
            ms = row["decode_ms_per_token"]
            lines.append(f"| {length} | `{spec}` | {row['tokens_kept']:.0f} | {ms:.1f} | {base / ms:.2f}x | "
                         f"{full / ms:.2f}x |")
    p = results["prefill"]
    lines += [
        "", f"## Prefill at {p['length']} tokens (median of {p['rounds']} rounds)", "",
        "| method | prefill s | added vs full |", "| --- | --- | --- |",
    ]
    for spec, seconds in p["seconds"].items():
        lines.append(f"| `{spec}` | {seconds:.2f} | {p['overhead'][spec] * 100:+.1f}% |")
    seconds = p["seconds"]
    unscored = seconds["streamingllm(ratio=0.75) [512-token chunks]"]
    lines += ["", "Dynamic methods read the prompt in 512-token chunks and hold their budget; the scoring alone "
              "(the method minus StreamingLLM, same chunks and budget, no scores) costs:", ""]
    for name in ("h2o", "scissorhands"):
        key = f"{name}(ratio=0.75) [512-token chunks]"
        if key in seconds:
            scoring = seconds[key] - unscored
            lines.append(f"- {name}: {scoring:+.2f} s = {scoring / seconds['full'] * 100:+.1f}% of the full prefill")
    for name, key in (("snapkv", "snapkv(ratio=0.75)"), ("h2o", "h2o(ratio=0.75) [one forward]")):
        added = seconds[key] - seconds["full"]
        lines.append(f"- {name} (one forward, against full): {added:+.2f} s = {added / seconds['full'] * 100:+.1f}%")
    r = results["peak_rss"]
    evicted = r["full"]["kv_bytes"] - r["streamingllm(budget=512)"]["kv_bytes"]
    saved = r["full"]["peak_rss"] - r["streamingllm(budget=512)"]["peak_rss"]
    lines += [
        "", f"## Peak RSS, {r['length']}-token prompt + 16 tokens, prompt read in {r['chunk']}-token chunks", "",
        "| method | peak RSS MB (after model load) | RSS before prompt MB | kv_bytes MB |", "| --- | --- | --- | --- |",
    ]
    for spec in ("full", "streamingllm(budget=512)"):
        row = r[spec]
        lines.append(f"| `{spec}` | {row['peak_rss'] / 2**20:.1f} | {row['base_rss'] / 2**20:.1f} | "
                     f"{row['kv_bytes'] / 2**20:.1f} |")
    lines += ["", f"Peak saved: {saved / 2**20:.1f} MB; KV evicted: {evicted / 2**20:.1f} MB "
              f"({'meets' if saved >= evicted else 'misses'} the bar: saved >= evicted).", ""]
    b = results["bytes"]
    lines += [
        f"## kv_bytes() vs theoretical kept bytes at {b['length']} tokens (+8 decoded)", "",
        "| method | tokens kept (mean) | per-head entries min..max | kv_bytes | theoretical | overhead |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec, row in b["rows"].items():
        lines.append(f"| `{spec}` | {row['tokens_kept']:.1f} | {row['min_head_entries']}..{row['max_head_entries']} | "
                     f"{row['kv_bytes']:,} | {row['theoretical_bytes']:,} | {row['overhead'] * 100:+.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/core")
    parser.add_argument("--quick", action="store_true", help="short contexts, one round (for a smoke run)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [512, 1024] if args.quick else [4096, 8192]
    rounds = 1 if args.quick else args.rounds
    model, _ = kvstack.load_model("smollm2-135m")
    results: dict = {
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "model": "SmolLM2-135M-Instruct",
    }

    results["decode"] = {}
    for length in lengths:
        ids = prompt_ids(length)
        samples: dict[str, list[dict]] = {spec: [] for spec in DECODE_METHODS}
        for round_index in range(rounds):
            order = DECODE_METHODS if round_index % 2 == 0 else DECODE_METHODS[::-1]
            for spec in order:
                row = decode_ms_per_token(model, spec, ids, args.steps)
                samples[spec].append(row)
                print(f"decode {length} {spec}: {row['decode_ms_per_token']:.1f} ms/token", flush=True)
        results["decode"][str(length)] = {
            spec: {
                "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in rows),
                "all_ms_per_token": [r["decode_ms_per_token"] for r in rows],
                "prefill_s": statistics.median(r["prefill_s"] for r in rows),
                "tokens_kept": rows[0]["tokens_kept"],
            }
            for spec, rows in samples.items()
        }

    prefill_length = lengths[0]
    ids = prompt_ids(prefill_length, seed=1)
    # Each method in its default prefill mode (static: one forward; dynamic: 512-token chunks), plus the
    # same chunking without scoring (full, streamingllm), so the scoring cost can be told from the chunking.
    prefill_cases = {
        "full": None, "snapkv(ratio=0.75)": None, "h2o(ratio=0.75) [one forward]": None,
        "h2o(ratio=0.75) [512-token chunks]": 512, "full [512-token chunks]": 512,
        "streamingllm(ratio=0.75) [512-token chunks]": 512, "scissorhands(ratio=0.75) [512-token chunks]": 512,
    }
    timings: dict[str, list[float]] = {name: [] for name in prefill_cases}
    prefill_rounds = 1 if args.quick else 3
    for _ in range(prefill_rounds):
        for name, chunk in prefill_cases.items():
            timings[name].append(prefill_seconds(model, name.split(" [")[0], ids, chunk))
            print(f"prefill {name}: {timings[name][-1]:.2f}s", flush=True)
    medians = {name: statistics.median(t) for name, t in timings.items()}
    results["prefill"] = {
        "length": prefill_length, "rounds": prefill_rounds, "seconds": medians, "all_seconds": timings,
        "overhead": {name: medians[name] / medians["full"] - 1.0 for name in medians},
    }

    rss_length = 1024 if args.quick else 8192
    results["peak_rss"] = {"length": rss_length, "chunk": 512}
    for spec in ("full", "streamingllm(budget=512)"):
        results["peak_rss"][spec] = peak_rss_child(spec, rss_length, 512)
        print(f"peak rss {spec}: {results['peak_rss'][spec]}", flush=True)

    bytes_length = lengths[0]
    ids = prompt_ids(bytes_length, seed=2)
    results["bytes"] = {"length": bytes_length, "rows": {}}
    for spec in BYTES_METHODS:
        results["bytes"]["rows"][spec] = byte_accounting(model, spec, ids)
        print(f"bytes {spec}: {results['bytes']['rows'][spec]['overhead'] * 100:+.2f}%", flush=True)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "README.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
