"""Outlier redistribution (issue "KV cache quantization"): what rotation and smoothing buy, measured.

For each codec, plain / ``rotate='hadamard'`` (QuaRot-style) / ``smooth=0.5`` (SmoothAttention-style, from
the model's calibration), in the same run with SmolLM2-135M-Instruct:

1. reconstruction error of real keys and values: a 2048-token prose prompt is read with a full cache,
   then every layer's keys and values are encoded and decoded by the codec; reported as the error
   energy relative to the signal energy, ``sum (x_hat - x)^2 / sum x^2``, over all layers;
2. perplexity of prose streamed through the encoded cache (the first half of each excerpt is the
   prompt, the second half is scored in 64-token chunks that attend to the encoded past).

Usage::

    python benchmarks/outlier_bench.py [--excerpts 4] [--out benchmarks/results/outliers]

The calibration artefact is made first if it does not exist (``kvstack calibrate``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

import torch

import kvstack
from kvstack.api import prefill
from kvstack.cache.quantized import QuantizedRegion
from kvstack.calibration import get_calibration
from kvstack.prose import load_prose
from kvstack.spec import parse

sys.path.insert(0, str(Path(__file__).parent))
from core_bench import machine

FAMILIES = ["quant(bits=4)", "quant(bits=2, group_size=32)", "kivi(bits=2)"]
VARIANTS = {"plain": "", "hadamard": "rotate='hadamard'", "smooth": "smooth=0.5"}


def variant(spec: str, extra: str) -> str:
    return spec if not extra else (spec[:-1] + f", {extra})" if spec.endswith(")") else f"{spec}({extra})")


def excerpts(tokenizer, count: int, length: int = 1024) -> list[torch.Tensor]:
    """``count`` prose excerpts of ``length`` tokens, spread over the text."""
    text = load_prose()
    step = len(text) // (count + 1)
    return [tokenizer(text[(i + 1) * step : (i + 1) * step + 20 * length], return_tensors="pt").input_ids[:, :length]
            for i in range(count)]


@torch.no_grad()
def reconstruction(model, ids: torch.Tensor, spec: str, calibration) -> dict[str, float]:
    cache = kvstack.make_cache(model, "full")
    prefill(model, ids, cache)
    codec = parse(spec).codec
    error = {"keys": [0.0, 0.0], "values": [0.0, 0.0]}
    for layer in cache.layers:
        keys, values = layer.keys[:, :, : layer.length], layer.values[:, :, : layer.length]
        n = keys.shape[2] // codec.chunk_tokens() * codec.chunk_tokens()
        region = QuantizedRegion(codec, 1, keys.shape[1], keys.shape[3], keys.dtype, keys.device,
                                 per_head_positions=False, rope_inv_freq=cache.rope_inv_freq,
                                 layer_idx=layer.layer_idx, calibration=calibration)
        region.append(keys[:, :, :n], values[:, :, :n], layer.positions[:, :1, :n], {})
        decoded_keys, decoded_values = region.decode_all()
        for name, original, decoded in (("keys", keys[:, :, :n], decoded_keys), ("values", values[:, :, :n],
                                                                                  decoded_values)):
            error[name][0] += float((decoded.double() - original.double()).pow(2).sum())
            error[name][1] += float(original.double().pow(2).sum())
    return {name: num / den for name, (num, den) in error.items()}


@torch.no_grad()
def perplexity(model, texts: list[torch.Tensor], spec: str, chunk: int = 64) -> float:
    nll, count = 0.0, 0
    for ids in texts:
        context = ids.shape[1] // 2
        cache = kvstack.make_cache(model, spec)
        last = prefill(model, ids[:, :context], cache)
        for begin in range(context, ids.shape[1], chunk):
            out = model(input_ids=ids[:, begin : begin + chunk], **kvstack.cache_kwargs(model, cache), use_cache=True)
            logits = torch.cat([last.unsqueeze(1), out.logits[:, :-1]], dim=1)[0].float()
            target = ids[0, begin : begin + chunk]
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += target.numel()
            last = out.logits[:, -1]
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--excerpts", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/outliers")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = kvstack.load_model("smollm2-135m")
    calibration = get_calibration(model, tokenizer=tokenizer, calibrate_if_missing=True)
    texts = excerpts(tokenizer, args.excerpts)
    prompt = excerpts(tokenizer, 1, 2048)[0]
    results = {"command": "python " + " ".join(sys.argv), "machine": machine(),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "calibration": f"{calibration.model_key} ({calibration.source})", "excerpts": args.excerpts,
               "full_perplexity": perplexity(model, texts, "full"), "rows": {}}
    print(f"full perplexity {results['full_perplexity']:.4f}", flush=True)
    for family in FAMILIES:
        for name, extra in VARIANTS.items():
            spec = variant(family, extra)
            row = reconstruction(model, prompt, spec, calibration)
            row["perplexity"] = perplexity(model, texts, spec)
            row["perplexity_increase"] = row["perplexity"] / results["full_perplexity"] - 1.0
            results["rows"][spec] = {"family": family, "variant": name, **row}
            print(spec, {k: round(v, 5) for k, v in row.items()}, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]
    lines = ["# Outlier redistribution: rotation and smoothing, measured", "",
             f"- command: `{results['command']}`", f"- date: {results['date']}",
             f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}",
             f"- model: SmolLM2-135M-Instruct; calibration {results['calibration']}",
             f"- perplexity: {args.excerpts} prose excerpts of 1024 tokens, second half scored through the encoded "
             f"cache; full cache {results['full_perplexity']:.3f}", "",
             "Relative error = error energy / signal energy of real keys and values (2048-token prompt, all layers).",
             "", "| codec | variant | key error | value error | perplexity | increase vs full |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in results["rows"].values():
        lines.append(f"| `{row['family']}` | {row['variant']} | {row['keys']:.4f} | {row['values']:.4f} | "
                     f"{row['perplexity']:.3f} | {100 * row['perplexity_increase']:+.2f}% |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
