"""Decode time per token of an ``mla`` model against the original, with the up-projection absorbed or not.

A latent cache holds fewer bytes, but a decoding step that rebuilds every cached token's keys and values from
its latent pays ``H (2D - d) r`` multiply-adds per token and layer; absorbing the up-projection into the query
and the output reads ``r + d`` numbers per token and query head instead. This times both against the original
model's full cache, interleaved in one process (medians), at each ``--lengths`` context.

    python benchmarks/mla_decode_speed.py [--lengths 1024,4096] [--repeats 3] [--decode 16]

Writes ``benchmarks/results/model_level/mla_decode_speed.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import stamp, time_caches

OUT = Path("benchmarks/results/model_level/mla_decode_speed.md")
SPEC = "mla(rank=192, rope_dims=32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", type=int, default=16)
    args = parser.parse_args()
    import kvstack
    from kvstack.prose import load_prose

    model, tokenizer = kvstack.load_model("smollm2-135m")
    latent, _ = kvstack.transform(model, SPEC, tokenizer=tokenizer)
    attention = [layer.self_attn for layer in latent.model.layers]
    text = tokenizer(load_prose(), return_tensors="pt").input_ids
    lines = ["| context | original ms/token | mla, rebuilt ms/token | mla, absorbed ms/token | rebuilt / original | "
             "absorbed / original |", "| --- | --- | --- | --- | --- | --- |"]
    for length in (int(x) for x in args.lengths.split(",")):
        ids = text[:, :length]
        times: dict[str, list[float]] = {"original": [], "rebuilt": [], "absorbed": []}
        for _ in range(args.repeats):
            times["original"].append(time_caches(model, ids, ["full"], 1, args.decode)["full"][1])
            for name, absorb in (("rebuilt", False), ("absorbed", True)):
                for module in attention:
                    module.absorb_decoding = absorb
                times[name].append(time_caches(latent, ids, ["full"], 1, args.decode)["full"][1])
        median = {name: statistics.median(values) for name, values in times.items()}
        lines.append(f"| {length} | {median['original'] * 1000:.1f} | {median['rebuilt'] * 1000:.1f} | "
                     f"{median['absorbed'] * 1000:.1f} | {median['rebuilt'] / median['original']:.2f} | "
                     f"{median['absorbed'] / median['original']:.2f} |")
        print(lines[-1], flush=True)
    command = f"python benchmarks/mla_decode_speed.py --lengths {args.lengths} --repeats {args.repeats}"
    OUT.write_text(f"Command: `{command}`; {stamp()}; model {SPEC} of SmolLM2-135M, full cache, "
                   f"{args.decode} greedy tokens after a prose prompt\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
