"""Retrieval without eviction (issue 35): Quest's and InfLLM's decode speed, resident bytes, peak memory, recall.

``--speed`` runs each method in a fresh process (so peak RSS is its own), interleaved over ``--repeats`` rounds:
the model reads an ``--length``-token stretch of the bench prose in chunks of 1024 tokens (the same for
every method, so the prompt's activations do not hide what the caches hold), then decodes ``--decode``
tokens greedily; each process reports its prefill time, the median decode step, the cache's resident and tier
bytes, and its peak RSS. The report gives, per method against the full cache of the same round: the decode
speed-up, resident bytes as a fraction of the full cache's, and how much lower the peak RSS is against what
moved to the slow tier. ``streamingllm(budget=64)`` (64 entries attended) measures the step's floor: the
model's matrix products and everything else no cache method removes.

``--engine`` runs Quest inside the paged engine: ``--requests`` prompts of ``--length`` prose tokens (different
stretches, so no prefix is shared) decoding ``--decode`` tokens each, all admitted at once, with and without
``quest(budget=length/8)`` on every request (each configuration in a fresh process, rounds interleaved): decode
throughput (tokens generated once every prompt is read, over the time that took) and how many greedy tokens
agree with the full engine's.

``--recall`` is the suite grid (passkey, single needle in noise, multi-key at 4k and 8k, 20 samples) of Quest
(pages of 16, the paper's, and of 8 with float32 and bfloat16 bounds), InfLLM (blocks of 128, the paper's,
and of 32), retrieval heads (``duo``, an eighth of the heads whole), Loki, SnapKV and H2O reading or keeping
1/8 of the context, and Quest with its first two layers dense (``quest-p8-d2``: half the budget in the other
layers, so as many entries read per step), resumable (``--max-minutes``); it takes hours on 2 CPU cores, so it
is run in pieces (``--methods``, ``--tasks``). ``--recall-report`` writes the table of what has run
(``recall.md``), with the entries each method attends to per step as a share of the context.

Usage::

    python benchmarks/retrieval_bench.py --speed [--length 8192] [--decode 32] [--repeats 2]
    python benchmarks/retrieval_bench.py --engine [--length 4096] [--requests 4] [--decode 32] [--repeats 2]
    python benchmarks/retrieval_bench.py --recall [--lengths 4096,8192] [--methods quest-p8,duo] [--tasks passkey]
        [--max-minutes 30]
    python benchmarks/retrieval_bench.py --recall-report
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grid_runs import run_grid, stamp

OUT = "benchmarks/results/retrieval"
MODEL = "smollm2-135m"
READ_FRACTION = 8  # each method reads (or keeps) 1/8 of the context
PREFILL_CHUNK = 1024  # every method reads the prompt in chunks of this many tokens (as an engine would)
RECALL_TASKS = ["passkey", "niah_single_noise", "niah_multikey"]


def speed_specs(length: int) -> list[str]:
    budget = length // READ_FRACTION
    # streamingllm over 64 entries is the step with next to no attention: the floor every method pays.
    # Pages of 8 (better recall on SmolLM2) double the bounds.
    return ["full", f"quest(budget={budget})", f"quest(budget={budget}, page=8)", f"infllm(budget={budget})",
            "streamingllm(budget=64)"]


def one(spec: str, length: int, decode: int) -> dict:
    """Prefill and decode with ``spec`` in this process; what it measured (run in a fresh process)."""
    import kvstack
    from kvstack.prose import load_prose

    model, tokenizer = kvstack.load_model(MODEL)
    ids = tokenizer(load_prose()[300_000 : 300_000 + 8 * length], return_tensors="pt").input_ids[:, :length]
    cache = kvstack.make_cache(model, spec)
    with torch.no_grad():
        start = time.perf_counter()
        logits = kvstack.prefill(model, ids, cache, chunk_size=PREFILL_CHUNK)
        prefill_s = time.perf_counter() - start
        rss_prefill = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        steps = []
        token = logits.argmax(-1, keepdim=True)
        for _ in range(decode):
            start = time.perf_counter()
            logits = model(input_ids=token, **kvstack.cache_kwargs(model, cache), use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - start)
    return {"spec": spec, "length": length, "prefill_s": prefill_s, "decode_ms": 1000 * statistics.median(steps),
            "kv_bytes": cache.kv_bytes(), "tier_bytes": cache.tier_bytes(), "full_kv_bytes": cache.full_kv_bytes(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_after_prefill_mb": rss_prefill / 1024}


def fresh_process_rounds(flag: str, specs: list[str], repeats: int, *args: str) -> dict[str, list[dict]]:
    """Each spec in a fresh process (``this script flag spec args``), rounds interleaved: spec -> the JSON records
    each round's process printed last."""
    rows: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for spec in specs:
            result = subprocess.run([sys.executable, __file__, flag, spec, *args], capture_output=True, text=True,
                                    check=True)
            record = json.loads(result.stdout.strip().splitlines()[-1])
            print(json.dumps({k: v for k, v in record.items() if k != "outputs"}), flush=True)
            rows.setdefault(spec, []).append(record)
    return rows


def speed(out: str, length: int, decode: int, repeats: int, specs: list[str] | None = None, tag: str = "") -> str:
    """The speed table of ``specs`` (default :func:`speed_specs`; ``full`` is added first when absent), written
    to ``speed_{length}.md`` or, for a chosen slice, ``speed_{length}_{tag}.md``."""
    if specs is None:
        specs = speed_specs(length)
    elif "full" not in specs:
        specs = ["full", *specs]
    rows = fresh_process_rounds("--one", specs, repeats, "--length", str(length), "--decode", str(decode))
    full = rows["full"]
    lines = ["| method | decode ms/token | rounds | speed-up | prefill s | resident KV | of full | tier | "
             "peak RSS MB | RSS lower by | of what moved |", "|" + " --- |" * 11]
    base_ms = statistics.median(r["decode_ms"] for r in full)
    base_rss = statistics.median(r["peak_rss_mb"] for r in full)
    for spec, records in rows.items():
        ms = statistics.median(r["decode_ms"] for r in records)
        rss = statistics.median(r["peak_rss_mb"] for r in records)
        held, tier, whole = records[0]["kv_bytes"], records[0]["tier_bytes"], records[0]["full_kv_bytes"]
        moved = tier / 2**20
        lower = base_rss - rss
        share = f"{lower / moved:.2f}" if moved else "-"
        rounds = ", ".join(f"{r['decode_ms']:.1f}" for r in records)
        lines.append(f"| `{spec}` | {ms:.1f} | {rounds} | {base_ms / ms:.2f}x | "
                     f"{statistics.median(r['prefill_s'] for r in records):.2f} | {held / 2**20:.1f} MiB | "
                     f"{held / whole:.3f} | {moved:.1f} MiB | {rss:.0f} | {lower:.0f} MB | {share} |")
    text = "\n".join(lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    chosen = f" --speed-specs {';'.join(specs)!r} --tag {tag}" if tag else ""
    (Path(out) / (f"speed_{length}_{tag}.md" if tag else f"speed_{length}.md")).write_text(
        f"Command: `python benchmarks/retrieval_bench.py --speed --length {length} --decode {decode} --repeats "
        f"{repeats}{chosen}`; {stamp()}\n\nSmolLM2-135M fp32, {length}-token prose prompt in chunks of "
        f"{PREFILL_CHUNK}, "
        f"{decode} greedy decoding steps (median), each method in a fresh process, rounds interleaved; medians over "
        "rounds.\n\n"
        f"{text}\n")
    return text


def engine_one(spec: str, length: int, requests: int, decode: int) -> dict:
    """``requests`` prompts of ``length`` tokens through the paged engine with ``spec`` on each (None: full);
    what it measured (run in a fresh process)."""
    import kvstack
    from kvstack.engine import Engine, SamplingParams
    from kvstack.prose import load_prose

    model, tokenizer = kvstack.load_model(MODEL)
    text = load_prose()
    prompts = [tokenizer(text[100_000 * (i + 1) : 100_000 * (i + 1) + 8 * length]).input_ids[:length]
               for i in range(requests)]
    engine = Engine(model, memory_mb=1024 * requests * length / 8192 + 64, block_size=16,
                    max_num_batched_tokens=1024)
    try:
        method = None if spec == "full" else spec
        ids = [engine.add_request(p, SamplingParams(max_new_tokens=decode), method=method) for p in prompts]
        decode_start = None
        generated_before = 0
        while engine.has_unfinished():
            engine.step()
            if decode_start is None and all(engine.get_output(rid) for rid in ids):
                decode_start = time.perf_counter()
                generated_before = sum(len(engine.get_output(rid)) for rid in ids)
        elapsed = time.perf_counter() - decode_start
        outputs = [engine.get_output(rid) for rid in ids]
        bounds = engine.pool.bounds_nbytes()
    finally:
        engine.close()
    generated = sum(len(o) for o in outputs) - generated_before
    return {"spec": spec, "length": length, "requests": requests, "decode_tokens_per_s": generated / elapsed,
            "outputs": outputs, "bounds_bytes": bounds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def engine_speed(out: str, length: int, requests: int, decode: int, repeats: int) -> str:
    specs = ["full", f"quest(budget={length // READ_FRACTION})"]
    rows = fresh_process_rounds("--engine-one", specs, repeats, "--length", str(length), "--requests",
                                str(requests), "--decode", str(decode))
    full_outputs = rows["full"][0]["outputs"]
    base = statistics.median(r["decode_tokens_per_s"] for r in rows["full"])
    lines = ["| method | decode tokens/s | against full | greedy tokens equal to full's | block bounds |",
             "| --- | --- | --- | --- | --- |"]
    for spec, records in rows.items():
        rate = statistics.median(r["decode_tokens_per_s"] for r in records)
        outputs = records[0]["outputs"]
        pairs = zip(outputs, full_outputs, strict=True)
        same = sum(a == b for got, want in pairs for a, b in zip(got, want, strict=True))
        total = sum(len(want) for want in full_outputs)
        lines.append(f"| `{spec}` | {rate:.1f} | {rate / base:.2f}x | {same}/{total} | "
                     f"{records[0]['bounds_bytes'] / 2**20:.1f} MiB |")
    text = "\n".join(lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"engine_{length}.md").write_text(
        f"Command: `python benchmarks/retrieval_bench.py --engine --length {length} --requests {requests} --decode "
        f"{decode} --repeats {repeats}`; {stamp()}\n\nSmolLM2-135M fp32 in the paged engine (blocks of 16, steps of "
        f"at most 1024 tokens), {requests} prose prompts of {length} tokens admitted at once, {decode} greedy "
        "tokens each; decode throughput counts the tokens generated after every prompt was read over the time "
        "that took; each configuration in a fresh process, rounds interleaved, medians.\n\n"
        f"{text}\n")
    return text


GATES_ARTEFACT = "benchmarks/results/retrieval/heads/duo_gates.json"  # kvstack calibrate --retrieval-heads gates
# the same fit five times longer (kvstack calibrate --retrieval-heads gates --gate-steps 400)
GATES_400 = "benchmarks/results/retrieval/heads/duo_gates400.json"
# ... and with DuoAttention's learning rate and gate weight, on prompts twice as long
GATES_400_DUO = "benchmarks/results/retrieval/heads/duo_gates400_duo.json"
GATE_FITS = {GATES_ARTEFACT: {"steps": 80}, GATES_400: {"steps": 400},  # each artefact's fit_retrieval_gates arguments
             GATES_400_DUO: {"steps": 400, "length": 1024, "lr": 0.02, "reg": 0.05}}
# the keyed probe's heads (kvstack calibrate --retrieval-heads keyed) by its number of prompts
KEYED_ARTEFACTS = {16: "benchmarks/results/retrieval/heads/probe_keyed.json",
                   32: "benchmarks/results/retrieval/heads/probe_keyed32.json"}
# heads chosen by the answer's loss at duo's split (kvstack calibrate --retrieval-heads search): each artefact
# and the search_retrieval_heads arguments that make it
SEARCH = "benchmarks/results/retrieval/heads/search.json"
SEARCH_4K = "benchmarks/results/retrieval/heads/search4k.json"
SEARCH_2WORDS = "benchmarks/results/retrieval/heads/search_2words.json"
SEARCH_KJV = "benchmarks/results/retrieval/heads/search_kjv.json"
SEARCH_ARTEFACTS = {SEARCH: {"length": 2048}, SEARCH_4K: {"length": 4096}, SEARCH_2WORDS: {"key_words": 2},
                    SEARCH_KJV: {"key_words": 2, "source": "kjv-end"}}


# The recall grid's methods by name (``--methods`` picks some), each reading or keeping ``budget`` entries.
RECALL_METHODS = {
    "quest": "quest(budget={budget})", "quest-p8": "quest(budget={budget}, page=8)",
    "quest-p8-bf16": "quest(budget={budget}, page=8, bounds='bfloat16')",
    "quest-lowrank": "quest(budget={budget}, select='lowrank')",
    "quest-p8-lowrank": "quest(budget={budget}, page=8, select='lowrank')",
    "quest-p8-lowrank16": "quest(budget={budget}, page=8, select='lowrank', rank=16)",
    # finer pages or more directions, for multi-key at 4k (exact top-k at 1/8 scores one sample above the bar)
    "quest-p4-lowrank16": "quest(budget={budget}, page=4, select='lowrank', rank=16)",
    "quest-p8-lowrank32": "quest(budget={budget}, page=8, select='lowrank', rank=32)",
    # between the two: rank 32's coordinates alone are 1/8 of the full cache's bytes, rank 24's 3/32
    "quest-p8-lowrank24": "quest(budget={budget}, page=8, select='lowrank', rank=24)",
    # rank 32 in half the bytes: int8 coordinates with a scale per page
    "quest-p8-lowrank32-int8": "quest(budget={budget}, page=8, select='lowrank', rank=32, coordinates='int8')",
    "infllm": "infllm(budget={budget})",
    "infllm-b32": "infllm(budget={budget}, block=32)", "duo": f"duo(heads={1 / READ_FRACTION})",
    # 9 of SmolLM2's 90 KV heads whole: with the others' 16 sinks and 64 recent entries, a step reads 0.118 of
    # a 4k context and 0.109 of an 8k one (heads=0.125 reads 0.142 at 4k, over the eighth)
    "duo-eighth": "duo(heads=0.1)",
    # the same heads count, the heads chosen by DuoAttention's gates fitted here (committed artefact)
    "duo-gates-eighth": f"duo(heads=0.1, artefact='{GATES_ARTEFACT}')",
    "duo-gates400-eighth": f"duo(heads=0.1, artefact='{GATES_400}')",
    "duo-gates400duo-eighth": f"duo(heads=0.1, artefact='{GATES_400_DUO}')",
    # the same heads count, chosen by the probe on prompts of several named needles (committed artefact)
    "duo-keyed-eighth": f"duo(heads=0.1, artefact='{KEYED_ARTEFACTS[16]}')",
    # the keyed probe on 32 prompts: twice the copy steps, less noise in the order
    "duo-keyed32-eighth": f"duo(heads=0.1, artefact='{KEYED_ARTEFACTS[32]}')",
    # nine heads chosen one at a time by the answer's loss with each candidate whole (committed artefact)
    "duo-search-eighth": f"duo(heads=0.1, artefact='{SEARCH}')",
    # ... on prompts of the 4k cells' length, where the 2048-token prompts' loss is within 0.012 of the full
    # model's with the nine whole and no longer tells the heads apart
    "duo-search4k-eighth": f"duo(heads=0.1, artefact='{SEARCH_4K}')",
    # ... on prompts whose keys are two words, often sharing the first (RULER's keys are two words)
    "duo-search2w-eighth": f"duo(heads=0.1, artefact='{SEARCH_2WORDS}')",
    # ... with the needles hidden in the last chapters of the KJV (prose, as the grid's haystack, which is KJV
    # text from elsewhere) instead of the Python docs
    "duo-searchkjv-eighth": f"duo(heads=0.1, artefact='{SEARCH_KJV}')",
    # the same heads with the streaming heads' recent entries filling the eighth (0.1248 of a 4k context)
    "duo-keyed32-eighth-r96": f"duo(heads=0.1, recent=96, artefact='{KEYED_ARTEFACTS[32]}')",
    # ... or with more of them sinks (the read is the same)
    "duo-keyed32-eighth-s32": f"duo(heads=0.1, sinks=32, recent=80, artefact='{KEYED_ARTEFACTS[32]}')",
    # the streaming heads' recent entries filling the eighth (0.1248 of a 4k context with the token below),
    # without and with RazorAttention's compensation token
    "duo-eighth-r96": "duo(heads=0.1, recent=96)",
    "duo-eighth-razor": "duo(heads=0.1, recent=96, compensation=True)",
    # a quarter of the heads whole (probe): where duo's multi-key score comes back, for the record
    "duo-quarter": "duo(heads=0.25)",
    # between the eighth and the quarter: how many heads the multi-key cell needs
    "duo-heads15": "duo(heads=0.15)", "duo-heads20": "duo(heads=0.2)",
    # every key of a block its representative, in int8 (13% of the full cache's bytes): a block's few
    # most-attended keys at prefill miss the needle a multi-key question names
    "infllm-eighth-all-int8": ("infllm(budget={infllm_blocks}, block=32, sinks=16, window={infllm_window}, "
                               "representatives=32, aggregate='max', precision='int8')"),
    # the same with a window of 64 (more of the read left to blocks): in blocks of 32, and of 16 (run while
    # 'max' still averaged over the group's query heads: 45 each on the 8k passkey; not in results.jsonl)
    "infllm-eighth-all-int8-w64": ("infllm(budget={infllm_blocks_w64}, block=32, sinks=16, window=64, "
                                   "representatives=32, aggregate='max', precision='int8')"),
    "infllm-eighth-all-int8-b16": ("infllm(budget={infllm_blocks_w64_b16}, block=16, sinks=16, window=64, "
                                   "representatives=16, aggregate='max', precision='int8')"),
    # InfLLM reading 1/8 in all: 16 sinks, a window of a quarter of the read, the rest in blocks of 32
    "infllm-eighth": "infllm(budget={infllm_blocks}, block=32, sinks=16, window={infllm_window})",
    "loki": "loki(budget={budget})",
    # every score exact (rank = SmolLM2's head dimension): each query attends to its true top entries, the
    # ceiling of any method that reads this many entries per step
    "topk-exact": "loki(budget={budget}, rank=64)", "snapkv": "snapkv(budget={budget})", "h2o": "h2o(budget={budget})",
    # Quest's first two layers dense, as its paper evaluates it; on SmolLM2's 30 layers half the budget in the
    # other 28 reads as many entries per step as quest(budget) (28 L/16 + 2 L = 30 L/8)
    "quest-p8-d2": "quest(budget={half}, page=8, bounds='bfloat16', dense_layers=2)",
    "quest-p8-d2-more": "quest(budget={budget}, page=8, bounds='bfloat16', dense_layers=2)",
    # eviction holding what Quest with rank 24 on pages of 8 holds resident (22.8% of the full cache at 4k,
    # 23.1% at 8k): the bar's "at the same resident bytes"
    "snapkv-quest-bytes": "snapkv(budget={quest_bytes})", "h2o-quest-bytes": "h2o(budget={quest_bytes})",
}


def print_progress(count: int, head: tuple[int, int], loss: float) -> None:
    """The head search's rounds, as they end (each is minutes)."""
    print(f"search: head {count} L{head[0]}.H{head[1]} (answer loss with it {loss:.3f})", flush=True)


def gate_fit(path: str, arguments: dict[str, Any]) -> Callable[[Any, Any], dict]:
    """Makes DuoAttention's gates for ``path`` with these ``fit_retrieval_gates`` arguments, writing a log of the
    fit beside it."""
    def make(model: Any, tokenizer: Any) -> dict:
        from kvstack.calibration.head_gates import fit_retrieval_gates

        start, log = time.monotonic(), []

        def note(step: int, distance: float, mean_gate: float) -> None:
            log.append(f"{step} {distance:.4f} {mean_gate:.4f} {time.monotonic() - start:.0f}")
            print(f"gate fit step {log[-1]}", file=sys.stderr, flush=True)

        record = fit_retrieval_gates(model, tokenizer, **arguments, progress=note)
        record["fitted"] = stamp()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).with_suffix(".log").write_text("step distance mean_gate seconds\n" + "\n".join(log) + "\n")
        return record
    return make


def keyed_probe(prompts: int) -> Callable[[Any, Any], dict]:
    """Makes the keyed probe's artefact on ``prompts`` prompts."""
    def make(model: Any, tokenizer: Any) -> dict:
        from kvstack.calibration.head_probe import KEYED_PROBE, probe_retrieval_heads

        record = probe_retrieval_heads(model, tokenizer, kind="keyed", **{**KEYED_PROBE, "prompts": prompts})
        record["probed"] = stamp()
        return record
    return make


def head_search(arguments: dict[str, Any]) -> Callable[[Any, Any], dict]:
    """Makes a head search's artefact with these ``search_retrieval_heads`` arguments."""
    def make(model: Any, tokenizer: Any) -> dict:
        from kvstack.calibration.head_search import search_retrieval_heads

        started = time.perf_counter()
        record = search_retrieval_heads(model, tokenizer, **arguments, progress=print_progress)
        record["searched"] = f"{stamp()}; {time.perf_counter() - started:.0f} s"
        return record
    return make


# how the grid makes each committed head map it reads, when the file is missing
ARTEFACT_MAKERS: dict[str, Callable[[Any, Any], dict]] = {
    **{path: gate_fit(path, arguments) for path, arguments in GATE_FITS.items()},
    **{path: keyed_probe(prompts) for prompts, path in KEYED_ARTEFACTS.items()},
    **{path: head_search(arguments) for path, arguments in SEARCH_ARTEFACTS.items()},
}


def infllm_blocks(budget: int, window: int, block: int) -> int:
    """InfLLM's block budget in the grid: what 16 sinks and the window leave of ``budget``, in whole blocks."""
    return (budget - 16 - window) // block * block


QUEST_RESIDENT_SHARE = 0.23  # quest-p8-lowrank24's resident bytes over the full cache's, measured


def recall(out: str, lengths: list[int], max_minutes: float | None, names: list[str], tasks: list[str]) -> None:
    import kvstack
    from kvstack.bench import BenchConfig
    from kvstack.calibration import model_key
    from kvstack.calibration.head_map import head_map_path, save_head_scores
    from kvstack.calibration.head_probe import probe_retrieval_heads

    model, tokenizer = kvstack.load_model(MODEL)
    if not head_map_path(model_key(model)).is_file():  # duo's artefact: the retrieval-head probe
        save_head_scores(probe_retrieval_heads(model, tokenizer), head_map_path(model_key(model)))
    for path, make in ARTEFACT_MAKERS.items():
        if any(path in RECALL_METHODS[name] for name in names) and not Path(path).is_file():
            save_head_scores(make(model, tokenizer), Path(path))
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    for length in lengths:  # one grid per length: each reads 1/8 of its own context
        budget = length // READ_FRACTION
        window = budget // 4
        blocks = infllm_blocks(budget, window, 32)
        quest_bytes = round(QUEST_RESIDENT_SHARE * length / 16) * 16
        methods = [RECALL_METHODS[name].format(budget=budget, half=budget // 2, infllm_blocks=blocks,
                                               infllm_window=window, quest_bytes=quest_bytes,
                                               infllm_blocks_w64=infllm_blocks(budget, 64, 32),
                                               infllm_blocks_w64_b16=infllm_blocks(budget, 64, 16))
                   for name in names]
        config = BenchConfig(methods=methods, tasks=tasks, lengths=[length], samples=20, out_dir=out,
                             progress=sys.stderr.isatty(), share_prefill=True, checkpoint_every=2)
        if not run_grid(config, deadline=deadline, model=model, tokenizer=tokenizer):
            return


RECALL_BAR = 0.9  # each method at least 90% of the full cache's score, on cells where the full cache scores >= 50
MODEL_LAYERS = 30  # SmolLM2-135M's layers, for what a method with dense layers reads per step


def read_share(spec: str, length: int) -> float:
    """Entries a decoding step attends to (keys and values in full), as a share of the ``length``-token context,
    averaged over the model's layers. Loki also reads every key in ``rank`` of its dimensions (not counted)."""
    import kvstack

    method = kvstack.parse(spec)
    name = type(method).__name__.lower()
    if name == "quest":
        paged = min(length, method.budget + method.page) / length  # the top pages and the newest page
        return (method.dense_layers + (MODEL_LAYERS - method.dense_layers) * paged) / MODEL_LAYERS
    if name == "infllm":
        return min(length, method.budget + method.sinks + method.window) / length
    if name == "duo":  # a streaming head's compensation token is one entry more
        return method.heads + (1 - method.heads) * (method.sinks + method.recent + method.compensation) / length
    return min(length, method.budget) / length if getattr(method, "budget", None) else 1.0


def recall_report(out: str) -> str:
    """The recall table from ``results.jsonl``: each method's score per cell against the full cache's, and the
    bar (at least 90% of the full cache's score on every cell where it scores at least 50), as far as run."""
    from kvstack.bench import latest_results

    records = [r for r in latest_results(Path(out) / "results.jsonl") if r["task"] in RECALL_TASKS]
    full = {(r["task"], r["length"]): r for r in records if r["method"] == "full"}
    rows = sorted({(r["length"], r["method_spec"]) for r in records if r["method"] != "full"})
    lines = ["| length | method | read per step / context | bytes held / full's | " + " | ".join(RECALL_TASKS)
             + " | bar |", "|" + " --- |" * (len(RECALL_TASKS) + 5)]
    for length in sorted({length for length, _ in rows}):
        scores = [f"{full[(task, length)]['score']:.0f}" if (task, length) in full else "-" for task in RECALL_TASKS]
        lines.append(f"| {length} | `full` | 1.000 | 1.000 | " + " | ".join(scores) + " | |")
        for row_length, spec in rows:
            if row_length != length:
                continue
            mine = {r["task"]: r for r in records if r["method_spec"] == spec and r["length"] == length}
            cells, verdicts, held = [], [], []
            for task in RECALL_TASKS:
                record, base = mine.get(task), full.get((task, length))
                if record is None or base is None:
                    cells.append("-")
                    continue
                held.append(record["kv_bytes"] / base["kv_bytes"])
                cells.append(f"{record['score']:.0f}")
                if base["score"] >= 50:
                    verdicts.append(record["score"] >= RECALL_BAR * base["score"])
            # run where the bar applies: every cell of the full cache, and this method's where that scores >= 50
            applies = [task for task in RECALL_TASKS if (task, length) in full and full[(task, length)]["score"] >= 50]
            done = all((task, length) in full for task in RECALL_TASKS) and all(task in mine for task in applies)
            verdict = "not met" if not all(verdicts) else "met" if done and verdicts else "not all run"
            ratio = f"{statistics.fmean(held):.3f}" if held else "-"
            lines.append(f"| {length} | `{spec}` | {read_share(spec, length):.3f} | {ratio} | " + " | ".join(cells)
                         + f" | {verdict} |")
    return "\n".join(lines)


def recall_samples(out: str, task: str, length: int) -> str:
    """Which samples of one recall cell each method answers (``x``) or misses (``.``), beside the full cache:
    whether methods at the same score miss the same questions, and which the full cache answers that they
    do not."""
    from kvstack.bench import latest_results

    records = [r for r in latest_results(Path(out) / "results.jsonl") if r["task"] == task and r["length"] == length]
    full = next((r for r in records if r["method"] == "full"), None)
    if full is None:
        raise SystemExit(f"no full-cache cell for {task} at {length} in {out}; run --recall first")
    lines = [f"| method | samples 0 to {len(full['per_sample']) - 1} | score | full answers, it misses | it answers, "
             "full misses |", "| --- | --- | --- | --- | --- |"]
    right_full = [sample["score"] == 100 for sample in full["per_sample"]]
    for record in sorted(records, key=lambda r: (r["method"] != "full", -r["score"], r["method_spec"])):
        right = [sample["score"] == 100 for sample in record["per_sample"]]
        lost = [str(i) for i, (a, b) in enumerate(zip(right_full, right, strict=True)) if a and not b]
        gained = [str(i) for i, (a, b) in enumerate(zip(right_full, right, strict=True)) if b and not a]
        pattern = "".join("x" if hit else "." for hit in right)
        lines.append(f"| `{record['method_spec']}` | `{pattern}` | {record['score']:.0f} | {' '.join(lost) or '-'} | "
                     f"{' '.join(gained) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--recall", action="store_true")
    parser.add_argument("--engine", action="store_true")
    parser.add_argument("--recall-report", action="store_true", help="the recall table of what has run")
    parser.add_argument("--recall-samples", default=None, metavar="TASK:LENGTH",
                        help="which samples of one recall cell each method answers, beside the full cache")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--methods", default=",".join(RECALL_METHODS),
                        help=f"the recall grid's methods, beside the full cache (of {', '.join(RECALL_METHODS)})")
    parser.add_argument("--tasks", default=",".join(RECALL_TASKS),
                        help=f"the recall grid's tasks (of {', '.join(RECALL_TASKS)})")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--speed-specs", default=None,
                        help="--speed over these specs (';'-separated) instead of the default set, with --tag")
    parser.add_argument("--tag", default="", help="names the --speed-specs table: speed_{length}_{tag}.md")
    args = parser.parse_args()
    if args.speed_specs is not None and not args.tag:
        parser.error("--speed-specs needs --tag (the table's file name), so the default speed table is kept")
    for flag, given, valid in (("--methods", args.methods, RECALL_METHODS), ("--tasks", args.tasks, RECALL_TASKS)):
        unknown = sorted(set(given.split(",")) - set(valid))
        if unknown:
            parser.error(f"unknown {flag} {', '.join(unknown)}; choose from {', '.join(valid)}")
    if args.one is not None:
        print(json.dumps(one(args.one, args.length, args.decode)))
    elif args.engine_one is not None:
        print(json.dumps(engine_one(args.engine_one, args.length, args.requests, args.decode)))
    elif args.engine:
        print(engine_speed(args.out, args.length, args.requests, args.decode, args.repeats))
    elif args.speed:
        specs = None if args.speed_specs is None else args.speed_specs.split(";")
        print(speed(args.out, args.length, args.decode, args.repeats, specs, args.tag))
    elif args.recall_samples is not None:
        task, _, length = args.recall_samples.partition(":")
        if task not in RECALL_TASKS or not length.isdigit():
            parser.error(f"--recall-samples takes TASK:LENGTH with TASK one of {', '.join(RECALL_TASKS)}, got "
                         f"{args.recall_samples!r}")
        table = recall_samples(args.out, task, int(length))
        Path(args.out, f"recall_samples_{task}_{length}.md").write_text(
            f"Command: `python benchmarks/retrieval_bench.py --recall-samples {args.recall_samples}` (cells from "
            f"`--recall`); {stamp()}\n\nEach sample of the cell (20 per cell): `x` answered exactly, `.` missed.\n\n"
            f"{table}\n")
        print(table)
    elif args.recall or args.recall_report:
        if args.recall:
            recall(args.out, [int(x) for x in args.lengths.split(",")], args.max_minutes, args.methods.split(","),
                   args.tasks.split(","))
        table = recall_report(args.out)
        Path(args.out, "recall.md").write_text(
            f"Command: `python benchmarks/retrieval_bench.py --recall-report` (cells from `--recall`); {stamp()}\n\n"
            "Suite scores (20 samples per cell) of each method reading or keeping 1/8 of the context, beside the "
            "full cache; bytes held are resident bytes for Quest and InfLLM (the tier holds the rest). Bar: at "
            f"least {RECALL_BAR:.0%} of the full cache's score on every cell where it scores at least 50 (the "
            "others need not run).\n\n"
            f"{table}\n")
        print(table)
    else:
        parser.error("give --speed, --engine, --recall, --recall-report or --recall-samples")


if __name__ == "__main__":
    main()
