"""Quantization and low-rank benchmark (issue "KV cache quantization"): bytes, decode speed, memory.

Everything compared is measured in the same run, on the same machine, with SmolLM2-135M-Instruct (fp32):

1. ``bits``: bits per cached element after a 4k-token prompt, every byte the cache holds included
   (payload, float16 scales and zero points, outliers, the full-precision residual window, positions),
   for each codec, plus a selection + codec composition;
2. ``decode``: ms/token decoding at 4k tokens of context: transformers' ``DynamicCache`` and
   ``QuantizedCache(backend="quanto", nbits=2 / 4)`` against kvstack ``full``, ``kivi(bits=2)`` and
   ``kivi(bits=4)``, rounds alternating the order;
3. ``memory``: peak RSS of a 4k prompt + 128 decoded tokens, each cache in a fresh process, medians over
   ``--memory-rounds`` rounds, the order reversed every other round (the high-water
   mark is reset after the model is loaded and a warm-up, and again after the prompt to isolate
   decoding; glibc is told to map large blocks and return them when freed, so RSS follows live memory),
   and the largest block kvstack decodes at once against a whole layer in full precision;
4. ``palu``: bytes and perplexity of ``palu(rank=32)`` (half the head dimension) against the full cache on
   the harness perplexity task at 1k and 2k tokens (calibrated first if no artefact exists).

Usage::

    python benchmarks/quant_bench.py [--only bits,decode,memory,palu] [--out benchmarks/results/quant]

Writes ``results.json`` and ``README.md`` in ``--out`` (sections not run keep their previous results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache

import kvstack
from kvstack.api import prefill
from kvstack.cache import kernels, quantized, streams
from kvstack.spec import parse

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import machine, prompt_ids, time_decode

# KIVI-4 with 16 key channels at 8 bits, a sink and rotated values (benchmarks/codec_divergence.py chose it).
KIVI4_QUALITY = ("kivi(bits=4, outlier_channels=16, outlier_bits=8, value_group_size=64, sinks=1, residual=31, "
                 "rotate='hadamard-values')")
BITS_SPECS = [
    "quant(bits=8)", "quant(bits=4)", "kivi(bits=4)", "kivi(bits=2)", "kivi(bits=2, rotate='hadamard')",
    "kivi(bits=2, sinks=1, rotate='hadamard')",
    "kvquant(bits=4)", "kvquant(bits=2)", "palu(rank=32)", "snapkv(ratio=0.5) + kivi(bits=2)",
    "adakv(snapkv(ratio=0.5)) + kivi(bits=2)", "kivi(key_bits=4, value_bits=2)", "quant(bits=8, rotate='hadamard')",
    "kivi(bits=4, rotate='hadamard')", "kivi(bits=2, outlier_channels=16, value_group_size=64)",
    "kivi(bits=2, outlier_channels=24, value_group_size=64)",
    "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31)",
    "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31, rotate='hadamard-values')",
    "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=4, residual=28, rotate='hadamard-values')",
    "gear(bits=2, rank=2)", "gear(bits=2, rank=2, outliers=0.02)", "gear(bits=4, rank=2)",
    "kivi(bits=4, sinks=1, residual=31, rotate='hadamard-values')",
    KIVI4_QUALITY,
]
BARS = {"kivi(bits=2)": 3.5, "kivi(bits=4)": 5.5, "quant(bits=8)": 9.0,
        "kivi(bits=2, outlier_channels=16, value_group_size=64)": 3.5,
        "kivi(bits=2, outlier_channels=24, value_group_size=64)": 3.5,
        "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31)": 3.5,
        "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31, rotate='hadamard-values')": 3.5,
        "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=4, residual=28, rotate='hadamard-values')": 3.5,
        "kivi(bits=4, sinks=1, residual=31, rotate='hadamard-values')": 5.5, KIVI4_QUALITY: 5.5}
# The KIVI-2 that meets the quality bar (benchmarks/quant_quality.py): outlier channels, a sink, rotated values.
KIVI2_QUALITY = "kivi(bits=2, outlier_channels=24, value_group_size=64, sinks=1, residual=31, rotate='hadamard-values')"
KIVI2_CASES = {"KIVI-2": "kivi(bits=2)", "KIVI-2 (quality config)": KIVI2_QUALITY}
DECODE_CASES = ["dynamic-cache", "quanto-2", "quanto-4", "full", "kivi(bits=2)", "kivi(bits=4)", KIVI2_QUALITY]
LENGTH = 4096
DECODED = 128  # decoded tokens in the memory runs: quanto's full-precision residual fills up to 128


def make(model: torch.nn.Module, case: str):
    """A fresh cache for ``case`` (transformers' caches reset the attention implementation to sdpa)."""
    if case == "dynamic-cache":
        model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config)
    if case.startswith("quanto-"):
        model.set_attn_implementation("sdpa")
        return QuantizedCache(backend="quanto", config=model.config, nbits=int(case.split("-")[1]))
    return kvstack.make_cache(model, case)


@torch.no_grad()
def read_prompt(model: torch.nn.Module, cache, ids: torch.Tensor) -> None:
    if isinstance(cache, kvstack.KVStackCache):
        prefill(model, ids, cache)
    else:
        model(ids, **kvstack.cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)


@torch.no_grad()
def prefilled(model: torch.nn.Module, specs: list[str]):
    """Caches holding the same ``LENGTH``-token prompt: ``full`` first, then one per spec (yielded)."""
    ids = prompt_ids(LENGTH)
    for spec in ["full", *specs]:
        cache = kvstack.make_cache(model, spec)
        prefill(model, ids, cache)
        yield spec, cache


def _per_head_split(layer) -> dict:
    """Encoded and full-precision entries per head of one layer (means over heads for head-wise budgets)."""
    ragged = layer.ragged
    if ragged is None:
        return {"encoded_per_head": layer.encoded_entries(), "residual_per_head": layer.length}
    heads = len(ragged.lengths)
    encoded = sum(region.length for region in ragged.regions or []) / heads
    residual = sum(ragged.lengths) / heads
    return {"encoded_per_head": f"{encoded:.0f} (mean)", "residual_per_head": f"{residual:.0f} (mean)"}


def bits_section(model: torch.nn.Module) -> dict:
    caches = prefilled(model, BITS_SPECS)
    _, full = next(caches)
    rows = {}
    for spec, cache in caches:
        rows[spec] = {
            "bits_per_element": cache.bits_per_element(), "kv_bytes": cache.kv_bytes(),
            "bytes_vs_full": cache.kv_bytes() / full.kv_bytes(), "tokens_kept": cache.tokens_kept(),
            **_per_head_split(cache.layers[0]),
        }
        print(f"bits {spec}: {rows[spec]['bits_per_element']:.3f}", flush=True)
    return {"length": LENGTH, "full_kv_bytes": full.kv_bytes(), "full_bits": full.bits_per_element(), "rows": rows}


@torch.no_grad()
def decode_ms(model: torch.nn.Module, case: str, ids: torch.Tensor, steps: int) -> float:
    cache = make(model, case)
    read_prompt(model, cache, ids)
    return time_decode(model, cache, steps)


def decode_section(model: torch.nn.Module, rounds: int, steps: int) -> dict:
    ids = prompt_ids(LENGTH)
    samples: dict[str, list[float]] = {case: [] for case in DECODE_CASES}
    for index in range(rounds):
        for case in DECODE_CASES if index % 2 == 0 else DECODE_CASES[::-1]:
            samples[case].append(decode_ms(model, case, ids, steps))
            print(f"decode {case}: {samples[case][-1]:.1f} ms/token", flush=True)
    return {"length": LENGTH, "steps": steps, "rounds": rounds,
            "ms_per_token": {case: statistics.median(v) for case, v in samples.items()}, "all": samples}


CHILD = """
import json, sys, torch
sys.path.insert(0, {bench_dir!r})
from quant_bench import make, read_prompt, LENGTH
from core_bench import prompt_ids
import kvstack
torch.set_num_threads({threads})
model, _ = kvstack.load_model("smollm2-135m")
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
def held_bytes(obj, seen, depth=0):
    # bytes of every distinct tensor storage reachable from the cache (quanto's packed tensors included)
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            return sum(held_bytes(getattr(obj, name), seen, depth + 1) for name in obj.__tensor_flatten__()[0])
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if depth > 6 or isinstance(obj, torch.nn.Module):
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(item, seen, depth + 1) for item in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(item, seen, depth + 1) for item in obj.values())
    return sum(held_bytes(item, seen, depth + 1) for item in vars(obj).values()) if hasattr(obj, "__dict__") else 0
ids = prompt_ids(LENGTH)
with torch.no_grad():
    warm = make(model, {case!r})  # one-time set-up (kernels, allocator) is not the cache's memory
    read_prompt(model, warm, ids[:, :64])
    model(torch.tensor([[42]]), **kvstack.cache_kwargs(model, warm), use_cache=True)
    del warm
    cache = make(model, {case!r})
    base = status("VmRSS:")
    reset()
    read_prompt(model, cache, ids)
    after_prompt = status("VmRSS:")
    prompt_peak = status("VmHWM:")
    cache_bytes = held_bytes(cache, set())
    reset()
    token = torch.tensor([[42]])
    for _ in range({decoded}):
        model(token, **kvstack.cache_kwargs(model, cache), use_cache=True)
    decode_peak = status("VmHWM:")
print(json.dumps({{"base_rss": base, "prompt_peak_rss": prompt_peak, "after_prompt_rss": after_prompt,
                  "decode_peak_rss": decode_peak, "cache_bytes_after_prompt": cache_bytes}}))
"""


MEMORY_KEYS = ("base_rss", "prompt_peak_rss", "after_prompt_rss", "decode_peak_rss", "peak_rss")


def memory_section(rounds: int) -> dict:
    """Peak RSS of each cache over ``rounds`` fresh processes (the order reversed every other round).

    Each row holds the median of every figure over the rounds; ``runs`` keeps every process's figures,
    round by round, so paired comparisons (same round, neighbouring processes) can be made.
    """
    cases = ["dynamic-cache", "quanto-2", "full", *KIVI2_CASES.values()]
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    # Large blocks are mmapped and returned on free, so RSS follows live memory, not allocator history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    for round_index in range(rounds):
        for case in cases if round_index % 2 == 0 else cases[::-1]:
            code = CHILD.format(bench_dir=str(Path(__file__).parent), threads=torch.get_num_threads(), case=case,
                                decoded=DECODED)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["peak_rss"] = max(row["prompt_peak_rss"], row["decode_peak_rss"])
            runs[case].append(row)
            print(f"memory round {round_index + 1} {case}: peak {row['peak_rss'] / 2**20:.1f} MB", flush=True)
    rows = {}
    for case, case_runs in runs.items():
        rows[case] = {key: statistics.median(run[key] for run in case_runs) for key in MEMORY_KEYS}
        rows[case]["cache_bytes_after_prompt"] = case_runs[0]["cache_bytes_after_prompt"]
    return {"length": LENGTH, "decoded": DECODED, "rounds": rounds, "rows": rows, "runs": runs}


@torch.no_grad()
def block_section(model: torch.nn.Module) -> dict:
    """The largest tensor decoded at once while decoding (fused kernels and PyTorch path), against a layer."""
    cache = kvstack.make_cache(model, "kivi(bits=2)")
    prefill(model, prompt_ids(LENGTH), cache)
    largest = {}
    original = quantized.unpack_float
    for fused in (True, False):
        seen = [0]

        def spy(packed: torch.Tensor, bits: int, seen: list[int] = seen) -> torch.Tensor:
            codes = original(packed, bits)
            seen[0] = max(seen[0], codes.nbytes)
            return codes

        quantized.unpack_float, streams.unpack_float, quantized.FUSED_KERNELS = spy, spy, fused
        try:
            for _ in range(4):
                model(torch.tensor([[42]]), **kvstack.cache_kwargs(model, cache), use_cache=True)
        finally:
            quantized.unpack_float, streams.unpack_float, quantized.FUSED_KERNELS = original, original, True
        largest["fused" if fused else "pytorch"] = seen[0]
    layer = cache.layers[0]
    layer_fp = (layer.encoded_entries() + layer.length) * layer.batch * layer.heads * layer.head_dim * 4 * 2
    return {"block_tokens": quantized.BLOCK_TOKENS, "largest_decoded_bytes": largest, "layer_fp32_bytes": layer_fp,
            "fused_kernels": kernels.available()}


PALU_SPECS = {"palu(rank=32)": "ranks 32 / 32", "palu(key_rank=16, value_rank=48)": "ranks 16 / 48"}


def palu_section(model: torch.nn.Module, tokenizer, out: Path, samples: int) -> dict:
    from kvstack.bench import BenchConfig, read_results, run_bench
    from kvstack.calibration import get_calibration

    calibration = get_calibration(model, tokenizer=tokenizer, calibrate_if_missing=True)
    config = BenchConfig(methods=["full", *PALU_SPECS], tasks=["perplexity"], lengths=[1024, 2048],
                         samples=samples, out_dir=str(out / "palu_harness"), progress=False, plots=False)
    run_bench(config, model, tokenizer)
    rows: dict = {}
    name = {"full": "full", **{parse(spec).label(): spec for spec in PALU_SPECS}}
    for record in read_results(out / "palu_harness" / "results.jsonl"):
        if record["method"] in name:
            rows.setdefault(str(record["length"]), {})[name[record["method"]]] = record["score"]
    caches = prefilled(model, list(PALU_SPECS))
    _, full = next(caches)
    byte_ratio = {spec: cache.kv_bytes() / full.kv_bytes() for spec, cache in caches}
    energy = {kind: {str(rank): calibration.energy_fraction(rank, kind).mean().item() for rank in (16, 32, 48)}
              for kind in ("key", "value")}
    return {"perplexity": rows, "bytes_vs_full": byte_ratio, "samples": samples, "calibration": calibration.model_key,
            "calibration_source": calibration.source, "energy": energy}


def _stamp(section: dict) -> list[str]:
    """The command, date and CPU that produced one section (sections are refreshed separately)."""
    if "run" not in section:
        return []
    where = f" ({section['cpu']})" if section.get("cpu") else ""
    return [f"Made by `{section['run']}` on {section['date']}{where}.", ""]


def _memory_comparison(
    name: str, kivi: dict, quanto: dict, kivi_runs: list[dict], quanto_runs: list[dict]
) -> list[str]:
    """Report lines comparing one KIVI-2 memory row (medians) with quanto-2's: decoding peak, whole-run peak,
    bytes held, and in how many rounds KIVI-2's whole-run peak was the lower of the two."""
    decode_gap = (kivi["decode_peak_rss"] - quanto["decode_peak_rss"]) / 2**20
    run_gap = (kivi["peak_rss"] - quanto["peak_rss"]) / 2**20
    def growth(row: dict) -> float:
        return row["prompt_peak_rss"] - row["base_rss"]

    growth_gap = (growth(kivi) - growth(quanto)) / 2**20
    paired = [(k["peak_rss"] - q["peak_rss"]) / 2**20 for k, q in zip(kivi_runs, quanto_runs, strict=True)]
    lower = sum(gap < 0 for gap in paired)
    lines = [f"{name} vs quanto-2 (medians): decoding peak {decode_gap:+.1f} MB "
             f"({'lower' if decode_gap < 0 else 'not lower'}); whole-run peak, prompt included, {run_gap:+.1f} MB "
             f"({'lower' if run_gap < 0 else 'not lower'}); growth of RSS while reading the prompt "
             f"{growth_gap:+.1f} MB. "
             f"Whole-run peak lower in {lower} of {len(paired)} rounds (per round: "
             f"{', '.join(f'{gap:+.1f}' for gap in paired)} MB).", ""]
    held_gap = kivi.get("cache_bytes_after_prompt", 0) - quanto.get("cache_bytes_after_prompt", 0)
    if held_gap > 0:
        lines += [f"After the prompt {name} holds {held_gap / 2**20:.2f} MB more than quanto-2: KIVI keeps its newest "
                  "tokens in full precision (the residual window, with their positions), where quanto quantizes the "
                  "whole prompt and refills its own full-precision window only while decoding.", ""]
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Quantization and low-rank benchmark", "",
        f"- last command: `{results['command']}`", f"- date: {results['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}", "- model: SmolLM2-135M-Instruct (fp32 weights and activations)", "",
    ]
    if "bits" in results:
        b = results["bits"]
        lines += [f"## Bits per cached element at {b['length']} tokens (every byte held)", "", *_stamp(b),
                  f"The full cache holds {b['full_bits']:.2f} bits per element (fp32 + positions).", "",
                  "| spec | bits / element | bar | bytes vs full | encoded / residual tokens per head |",
                  "| --- | ---: | --- | ---: | --- |"]
        for spec, row in b["rows"].items():
            bar = ""
            if spec in BARS:
                bar = f"≤ {BARS[spec]} ({'met' if row['bits_per_element'] <= BARS[spec] else 'missed'})"
            lines.append(f"| `{spec}` | {row['bits_per_element']:.3f} | {bar} | {100 * row['bytes_vs_full']:.1f}% | "
                         f"{row['encoded_per_head']} / {row['residual_per_head']} |")
        lines.append("")
    if "decode" in results:
        d = results["decode"]
        ms = d["ms_per_token"]
        lines += [f"## Decode at {d['length']} tokens (median of {d['rounds']} rounds x {d['steps']} steps)", "",
                  *_stamp(d),
                  "| cache | ms/token | tokens/s vs quanto 2-bit |", "| --- | ---: | ---: |"]
        for case, value in ms.items():
            lines.append(f"| {case} | {value:.1f} | {ms['quanto-2'] / value:.2f}x |")
        lines.append("")
        for name, spec in KIVI2_CASES.items():
            if spec in ms:
                ratio = ms["quanto-2"] / ms[spec]
                lines.append(f"{name} (`{spec}`) decodes at {ratio:.2f}x quanto-2's tokens/s (bar: 1.1x, "
                             f"{'met' if ratio >= 1.1 else 'missed'}).")
        lines.append("")
    if "memory" in results:
        r = results["memory"]["rows"]
        mem = results["memory"]
        runs = mem.get("runs", {case: [row] for case, row in r.items()})
        lines += [f"## Peak RSS, {mem['length']}-token prompt + {mem['decoded']} tokens, fresh process each "
                  f"(median of {mem.get('rounds', 1)})", "",
                  *_stamp(mem),
                  "| cache | peak RSS MB (prompt + decode) | range over rounds MB | decode-only peak MB | "
                  "RSS before prompt MB | cache tensors after the prompt MB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for case, row in r.items():
            held = row.get("cache_bytes_after_prompt")
            held_text = "–" if held is None else f"{held / 2**20:.2f}"
            peaks = [run["peak_rss"] / 2**20 for run in runs[case]]
            lines.append(f"| {case} | {row['peak_rss'] / 2**20:.1f} | {min(peaks):.1f}–{max(peaks):.1f} | "
                         f"{row['decode_peak_rss'] / 2**20:.1f} | {row['base_rss'] / 2**20:.1f} | {held_text} |")
        lines.append("")
        for name, spec in KIVI2_CASES.items():
            if spec in r:
                lines += _memory_comparison(name, r[spec], r["quanto-2"], runs[spec], runs["quanto-2"])
    if "block" in results:
        k = results["block"]
        sizes = k["largest_decoded_bytes"]
        lines += ["## Transient memory of block-wise decoding", "",
                  f"Largest decoded tensor while decoding one token: fused kernels {sizes['fused'] / 2**20:.2f} MB "
                  f"(codes are unpacked in registers, no block exists); PyTorch path {sizes['pytorch'] / 2**20:.2f} MB "
                  f"(one block of {k['block_tokens']} tokens of keys or values). One layer's cache in fp32: "
                  f"{k['layer_fp32_bytes'] / 2**20:.2f} MB.", ""]
    if "palu" in results:
        p = results["palu"]
        energy = {kind: " / ".join(f"{100 * value:.1f}%" for value in p["energy"][kind].values())
                  for kind in ("key", "value")}
        lines += ["## SVD latents (Palu-style), average rank = half the head dimension", "", *_stamp(p),
                  f"Calibration `{p['calibration']}` ({p['calibration_source']}). Energy held by the top 16 / 32 / 48 "
                  f"of 64 directions: keys before RoPE {energy['key']}, values {energy['value']}.", "",
                  f"Perplexity on the harness task ({p['samples']} excerpts per length), same run:", "",
                  "| spec | ranks (keys / values) | bytes vs full at 4k | perplexity 1k (full, change) "
                  "| perplexity 2k (full, change) |",
                  "| --- | --- | ---: | --- | --- |"]
        for spec, ranks in PALU_SPECS.items():
            cells = []
            for length in ("1024", "2048"):
                row = p["perplexity"].get(length, {})
                if spec in row and "full" in row:
                    cells.append(f"{row[spec]:.3f} ({row['full']:.3f}, {100 * (row[spec] / row['full'] - 1):+.1f}%)")
                else:
                    cells.append("–")
            lines.append(f"| `{spec}` | {ranks} | {100 * p['bytes_vs_full'][spec]:.1f}% | {cells[0]} | {cells[1]} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/quant")
    parser.add_argument("--only", default="bits,decode,memory,palu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--memory-rounds", type=int, default=3, help="fresh processes per cache (memory)")
    parser.add_argument("--samples", type=int, default=10, help="perplexity samples per length (palu)")
    args = parser.parse_args()
    if args.memory_rounds < 1:
        parser.error(f"--memory-rounds must be >= 1, got {args.memory_rounds}")
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"command": "python " + " ".join(sys.argv),
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine()})
    sections = set(args.only.split(","))
    model, tokenizer = kvstack.load_model("smollm2-135m")
    stamp = {"run": results["command"], "date": results["date"], "cpu": results["machine"]["cpu"]}
    if "palu" in sections:  # first: the bits table needs the calibration too
        results["palu"] = {**palu_section(model, tokenizer, out, args.samples), **stamp}
    if "bits" in sections:
        results["bits"] = {**bits_section(model), **stamp}
    if "decode" in sections:
        results["decode"] = {**decode_section(model, args.rounds, args.steps), **stamp}
    if "memory" in sections:
        results["memory"] = {**memory_section(args.memory_rounds), **stamp}
        results["block"] = {**block_section(model), **stamp}
    path.write_text(json.dumps(results, indent=2))
    (out / "README.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
