"""Which rotary pairs should keep RoPE when ``mla`` converts a model? (issue 33: the ``keep`` rules.)

For two ``mla`` settings, each ``keep`` rule (``'cost'``, MHA2MLA's ``'norm'``, ``'high'``) and the latent at
the largest rank the rotary size allows (which isolates what dropping RoPE costs), the perplexity of the
converted SmolLM2-135M on held-out prose (4 sequences of 1,024 tokens of the KJV's last chapters; the
transform calibrates on the Python docs), one forward each, no cache. Also the mean relative error of the
latent (the SVD's dropped energy). Writes ``benchmarks/results/model_level/mla_keep.md``.

Usage::

    python benchmarks/mla_keep_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import stamp

OUT = Path("benchmarks/results/model_level/mla_keep.md")
SETTINGS = [(96, 16), (192, 32)]
KEEPS = ("cost", "norm", "high")


def main() -> None:
    import kvstack
    from kvstack.calibration.text import calibration_text_ids

    model, tokenizer = kvstack.load_model("smollm2-135m")
    flat, _ = calibration_text_ids(tokenizer, 4 * 1024, "kjv-end")
    ids = torch.tensor(flat).view(4, 1024)

    def perplexity(subject: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.exp(subject(input_ids=ids, labels=ids).loss))

    rows = [f"| unconverted | - | 1.00 | {perplexity(model):.2f} | - |"]
    for rank, rope_dims in SETTINGS:
        heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
        lossless = 2 * heads * head_dim - heads * rope_dims - 1  # the largest rank mla accepts
        for spec in [f"mla(rank={rank}, rope_dims={rope_dims}, keep={keep!r})" for keep in KEEPS] + [
                f"mla(rank={lossless}, rope_dims={rope_dims})"]:
            new, record = kvstack.transform(model, spec, tokenizer=tokenizer)
            before, after = record["kv_bytes_per_token"]
            error = sum(record["latent_error"]) / len(record["latent_error"])
            rows.append(f"| `{spec}` | {rope_dims} | {after / before:.2f} | {perplexity(new):.2f} | {error:.4f} |")
            print(rows[-1], flush=True)
    table = "\n".join(["| transform | rotary dims per KV head | KV bytes (of full) | perplexity | latent error |",
                       "| --- | --- | --- | --- | --- |", *rows])
    OUT.write_text(f"# mla: which rotary pairs keep RoPE\n\nCommand: `python benchmarks/mla_keep_check.py`; "
                   f"{stamp()}\n\nHeld-out prose: 4 x 1,024 tokens (KJV, last chapters); calibration: 2,048 tokens "
                   f"of the Python docs. Latent error: the share of the weighted key/value energy the rank drops, "
                   f"mean over layers.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
