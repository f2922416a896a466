"""``kvstack serve`` against real clients on 127.0.0.1: the official ``openai`` client, 64 concurrent streams on
the shared-prefix workload, a client that disconnects, the requests that once broke the engine, and bad input.

Each part starts its own ``kvstack serve`` process (default model and engine settings) and checks it against the
in-process engine:

* ``client``: completions and chat, streamed and not, through ``openai.OpenAI``; greedy text equals the
  in-process engine's for the same prompt tokens.
* ``load``: the default ``kvstack engine-bench`` workload (64 requests, 1024-token shared system prompt, 64
  own tokens, 32 output tokens, all sent at once) as 64 concurrent streaming clients; every stream completes
  with its 32 tokens and the greedy text of its own prompt; output throughput against ``kvstack engine-bench``
  run in-process on the same workload just before; client-side TTFT p50 / p99; ``/metrics`` deltas against
  what the clients saw.
* ``disconnect``: a client that closes its stream mid-way; KV pool usage from ``/metrics`` returns to its level
  before the request.
* ``survive``: on a pool of 16 blocks, 20 prompts with ``n=3``, a token outside the vocabulary, a request that
  exactly fills the pool; then a greedy request equals the in-process engine's.
* ``errors``: malformed JSON, an unknown model, ``max_tokens`` over the limit, an unknown ``kv_policy``, a
  wrong API key: status and OpenAI-format error each, and a good request served after each.

Writes ``results.json`` and ``README.md`` under ``benchmarks/results/serving/``.

    python benchmarks/serving_check.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "serving"
API_KEY = "kvstack-check-key"
MODEL = "smollm2-135m"
THROUGHPUT_BAR = 0.8  # server output tok/s at least 80% of the in-process engine-bench's


# ---------------------------------------------------------------------------------------------- server process
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def kvstack_serve(*extra: str, log: Path) -> Iterator[str]:
    """Run ``kvstack serve`` on a free 127.0.0.1 port until the block ends; yield its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "kvstack.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--api-key", API_KEY, "--log-level", "warning", *extra]
    with log.open("w") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"kvstack serve exited with {server.returncode}; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kvstack serve did not answer /health in 300 s; see {log}")
                time.sleep(0.5)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def scrape(base: str) -> dict[str, float]:
    """``/metrics`` as {sample name with labels: value} (histogram buckets left out)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip() or "_bucket{" in line:
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def metric(samples: dict[str, float], name: str) -> float:
    """Sum of every sample of ``name`` (all label sets)."""
    return sum(value for key, value in samples.items() if key == name or key.startswith(name + "{"))


# ------------------------------------------------------------------------------------------- in-process engine
class Reference:
    """The in-process engine and tokenizer the server's outputs are compared with."""

    def __init__(self) -> None:
        from kvstack.engine import Engine
        from kvstack.models import load_model

        self.model, self.tokenizer = load_model(MODEL)
        self.engine = Engine(self.model, memory_mb=1024)

    def greedy(self, prompts: list[list[int]], max_tokens: int, stop_at_eos: bool = True) -> list[str]:
        from kvstack.engine import SamplingParams

        stops = (self.tokenizer.eos_token_id,) if stop_at_eos else ()
        outputs = self.engine.generate(prompts, SamplingParams(max_new_tokens=max_tokens, stop_token_ids=stops))
        return [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"])


# ------------------------------------------------------------------------------------------------------- parts
def part_client(reference: Reference, base: str) -> dict[str, Any]:
    """The official openai client: completions and chat, streamed and not; greedy text against in-process."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, timeout=120)
    prompt = "The three most common trees in an English forest are"
    messages = [{"role": "user", "content": "Name two planets of the solar system."}]
    want_completion = reference.greedy([reference.encode(prompt)], 24)[0]
    want_chat = reference.greedy([reference.chat(messages)], 24)[0]
    got: dict[str, str] = {}
    got["completion"] = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                                  temperature=0).choices[0].text
    got["completion (stream)"] = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True) if chunk.choices)
    got["chat"] = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24,
                                                 temperature=0).choices[0].message.content
    got["chat (stream)"] = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True) if chunk.choices)
    models = [m.id for m in client.models.list().data]
    rows = []
    for name, text in got.items():
        want = want_chat if name.startswith("chat") else want_completion
        rows.append({"call": name, "equal_to_in_process": text == want, "text": text})
    return {"models": models, "calls": rows, "all_equal": all(row["equal_to_in_process"] for row in rows)}


async def _stream_one(client: httpx.AsyncClient, base: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    texts, ids, reasons, usage = [], set(), [], None
    async with client.stream("POST", base + "/v1/completions", json=body, headers=headers()) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            ids.add(chunk["id"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("text") and first is None:
                    first = time.perf_counter()
                texts.append(choice.get("text", ""))
                if choice.get("finish_reason"):
                    reasons.append(choice["finish_reason"])
    return {"sent": sent, "first": first, "done": time.perf_counter(), "text": "".join(texts), "ids": ids,
            "reasons": reasons, "usage": usage}


async def _stream_all(base: str, prompts: list[list[int]], max_tokens: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*(_stream_one(client, base, prompt, max_tokens) for prompt in prompts))


def engine_bench_in_process(requests: int) -> dict[str, Any]:
    """``kvstack engine-bench`` on the default shared-prefix workload, as its own process."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "kvstack.cli", "engine-bench", "--no-progress", "--requests",
                        str(requests), "--out", out], check=True, capture_output=True, timeout=1800)
        return json.loads((Path(out) / "result.json").read_text())


def part_load(reference: Reference, base: str, requests: int, bench: dict[str, Any]) -> dict[str, Any]:
    """64 concurrent streaming clients on the shared-prefix workload against in-process engine-bench."""
    from kvstack.bench.workload import shared_prefix_workload

    workload = shared_prefix_workload(vocab_size=int(reference.model.config.vocab_size), num_requests=requests,
                                      system_prompt_tokens=1024, unique_tokens=64, output_tokens=32, seed=0)
    prompts = [list(request.prompt_token_ids) for request in workload]
    max_tokens = workload[0].max_new_tokens
    before = scrape(base)
    results = asyncio.run(_stream_all(base, prompts, max_tokens))
    after = scrape(base)
    start = min(r["sent"] for r in results)
    end = max(r["done"] for r in results)
    completion_tokens = [r["usage"]["completion_tokens"] if r["usage"] else 0 for r in results]
    prompt_tokens = [r["usage"]["prompt_tokens"] if r["usage"] else 0 for r in results]
    ttfts = sorted(r["first"] - r["sent"] for r in results if r["first"] is not None)
    expected = reference.greedy(prompts, max_tokens, stop_at_eos=False)
    delta = {name: metric(after, name) - metric(before, name) for name in (
        "kvstack:generation_tokens_total", "kvstack:prompt_tokens_total", "kvstack:request_success_total")}
    server_tok_s = sum(completion_tokens) / (end - start)
    return {
        "requests": requests,
        "completed": sum(r["reasons"] == ["length"] for r in results),
        "all_with_their_tokens": all(c == max_tokens for c in completion_tokens),
        "distinct_response_ids": len(set().union(*(r["ids"] for r in results))),
        "greedy_text_equal_to_in_process": sum(r["text"] == want for r, want in zip(results, expected, strict=True)),
        "duration_s": round(end - start, 2),
        "server_output_tokens_per_s": round(server_tok_s, 1),
        "in_process_duration_s": round(bench["duration_s"], 2),
        "in_process_output_tokens_per_s": round(bench["output_tokens_per_s"], 1),
        "throughput_ratio": round(server_tok_s / bench["output_tokens_per_s"], 3),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))], 3),
        "in_process_ttft_p50_s": round(bench["ttft_p50_s"], 3),
        "in_process_ttft_p99_s": round(bench["ttft_p99_s"], 3),
        "metrics_delta": delta,
        "clients_saw": {"completion_tokens": sum(completion_tokens), "prompt_tokens": sum(prompt_tokens),
                        "requests": len(results)},
        "metrics_agree": (delta["kvstack:generation_tokens_total"] == sum(completion_tokens)
                          and delta["kvstack:prompt_tokens_total"] == sum(prompt_tokens)
                          and delta["kvstack:request_success_total"] == len(results)),
    }


def part_disconnect(base: str) -> dict[str, Any]:
    """A streaming client that closes mid-way: pool usage returns to its level before."""
    prompt = "Write a long story about a lighthouse keeper. " * 20
    before = scrape(base)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1500, "temperature": 0, "stream": True,
            "ignore_eos": True}
    chunks = 0
    during = None
    with httpx.Client(timeout=120) as client, client.stream("POST", base + "/v1/completions", json=body,
                                                            headers=headers()) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks == 5:
                during = scrape(base)
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while True:
        after = scrape(base)
        freed = metric(after, "kvstack:kv_cache_used_blocks") == metric(before, "kvstack:kv_cache_used_blocks")
        if (freed and metric(after, "kvstack:num_requests_running") == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    waited = 30 - (deadline - time.monotonic())
    return {
        "chunks_read": chunks,
        "used_blocks_before": metric(before, "kvstack:kv_cache_used_blocks"),
        "used_blocks_during": metric(during or {}, "kvstack:kv_cache_used_blocks"),
        "used_blocks_after": metric(after, "kvstack:kv_cache_used_blocks"),
        "running_after": metric(after, "kvstack:num_requests_running"),
        "seconds_until_freed": round(waited, 2),
        "freed": metric(after, "kvstack:kv_cache_used_blocks") == metric(before, "kvstack:kv_cache_used_blocks"),
    }


def post(base: str, path: str, body: Any, *, key: str | None = API_KEY, raw: str | None = None) -> httpx.Response:
    auth = {} if key is None else {"Authorization": f"Bearer {key}"}
    if raw is not None:
        return httpx.post(base + path, content=raw, headers={**auth, "Content-Type": "application/json"},
                          timeout=120)
    return httpx.post(base + path, json=body, headers=auth, timeout=120)


def error_row(name: str, response: httpx.Response, base: str, check: dict[str, Any]) -> dict[str, Any]:
    """One bad request: its status, its OpenAI-format error, and whether the next good request is served."""
    try:
        error = response.json().get("error", {})
    except json.JSONDecodeError:
        error = {}
    good = post(base, "/v1/completions", check["body"])
    return {
        "case": name,
        "status": response.status_code,
        "type": error.get("type"),
        "code": error.get("code"),
        "message": error.get("message"),
        "openai_format": isinstance(error.get("message"), str) and "type" in error,
        "next_request_status": good.status_code,
        "next_request_correct": good.status_code == 200 and good.json()["choices"][0]["text"] == check["text"],
    }


def part_errors(reference: Reference, base: str) -> list[dict[str, Any]]:
    prompt = "A short list of fruit:"
    check = {"body": {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0},
             "text": reference.greedy([reference.encode(prompt)], 8)[0]}
    good = dict(check["body"])
    return [
        error_row("malformed JSON", post(base, "/v1/completions", None, raw='{"model": "x", "prompt": '), base,
                  check),
        error_row("unknown model", post(base, "/v1/completions", {**good, "model": "gpt-17"}), base, check),
        error_row("max_tokens over the limit", post(base, "/v1/completions", {**good, "max_tokens": 100_000}),
                  base, check),
        error_row("unknown kv_policy", post(base, "/v1/completions", {**good, "kv_policy": "snapkvv(ratio=0.5)"}),
                  base, check),
        error_row("wrong API key", post(base, "/v1/completions", good, key="not-the-key"), base, check),
        error_row("no API key", post(base, "/v1/completions", good, key=None), base, check),
    ]


def part_survive(reference: Reference, log: Path) -> dict[str, Any]:
    """The three requests that once broke the engine, on a 16-block pool; then a correct greedy request."""
    from kvstack.engine.paged import BYTES_PER_MB
    from kvstack.models import model_geometry

    geometry = model_geometry(reference.model)
    itemsize = next(reference.model.parameters()).element_size()
    block_bytes = 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * 16 * itemsize
    memory_mb = 16 * block_bytes / BYTES_PER_MB
    rows = []
    with kvstack_serve("--memory-mb", repr(memory_mb), log=log) as base:
        blocks = metric(scrape(base), "kvstack:kv_cache_num_blocks")
        prompts = [reference.encode(f"Item {i}: a short note about the number {i}.")[:10] for i in range(20)]
        response = post(base, "/v1/completions", {"model": MODEL, "prompt": prompts, "n": 3, "max_tokens": 6,
                                                  "temperature": 0.8, "seed": 1, "ignore_eos": True})
        choices = response.json().get("choices", []) if response.status_code == 200 else []
        rows.append({"case": "20 prompts with n=3 on a 16-block pool", "status": response.status_code,
                     "choices": len(choices), "all_length_6": all(c["finish_reason"] == "length" for c in choices)})
        vocab = int(reference.model.config.vocab_size)
        for bad in (-1, vocab):
            response = post(base, "/v1/completions", {"model": MODEL, "prompt": [1, 2, bad], "max_tokens": 4})
            rows.append({"case": f"prompt token {bad} (outside [0, {vocab}))", "status": response.status_code,
                         "message": response.json().get("error", {}).get("message")})
        fill = int(blocks) * 16
        exact = reference.encode("word " * fill)[: fill - 6]
        response = post(base, "/v1/completions", {"model": MODEL, "prompt": exact, "max_tokens": 7, "temperature": 0,
                                                  "ignore_eos": True})
        body = response.json()
        rows.append({"case": f"{len(exact)} prompt tokens + 7 new exactly fill {int(blocks)} blocks of 16",
                     "status": response.status_code,
                     "completion_tokens": body.get("usage", {}).get("completion_tokens")})
        used_after = metric(scrape(base), "kvstack:kv_cache_used_blocks")
        prompt = "Three colours of the rainbow are"
        want = reference.greedy([reference.encode(prompt)], 12)[0]
        response = post(base, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                  "temperature": 0})
        next_ok = response.status_code == 200 and response.json()["choices"][0]["text"] == want
    return {"pool_blocks": int(blocks), "cases": rows, "used_blocks_after": used_after,
            "next_request_correct": next_ok}


# -------------------------------------------------------------------------------------------------------- report
def write_report(record: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = ["# kvstack serve against real clients", "",
             f"`{record['command']}` on {record['date']}, {record['machine']}. Servers on 127.0.0.1 only.", ""]
    if "client" in record:
        client = record["client"]
        lines += ["## The official openai client", "",
                  f"`/v1/models` lists {client['models']}. Greedy (temperature 0, 24 tokens) through "
                  f"`openai.OpenAI`, against the in-process engine on the same prompt tokens:", "",
                  "| call | equal to in-process |", "|---|---|",
                  *(f"| {row['call']} | {'yes' if row['equal_to_in_process'] else 'NO'} |" for row in client["calls"]),
                  ""]
    if "load" in record:
        load = record["load"]
        lines += [
            "## Load: concurrent streaming clients on the shared-prefix workload", "",
            f"{load['requests']} clients at once, each a stream of 32 tokens on a 1024-token shared system prompt "
            "plus 64 own tokens (the default `kvstack engine-bench` workload), sent as token ids.", "",
            "| | server (HTTP, streaming) | in-process engine-bench |", "|---|---|---|",
            f"| duration (s) | {load['duration_s']} | {load['in_process_duration_s']} |",
            f"| output tok/s | {load['server_output_tokens_per_s']} | {load['in_process_output_tokens_per_s']} |",
            f"| TTFT p50 (s) | {load['ttft_p50_s']} | {load['in_process_ttft_p50_s']} |",
            f"| TTFT p99 (s) | {load['ttft_p99_s']} | {load['in_process_ttft_p99_s']} |", "",
            f"Throughput ratio server / in-process: **{load['throughput_ratio']}** (bar: at least {THROUGHPUT_BAR}). "
            f"Completed with finish reason `length`: {load['completed']}/{load['requests']}; every stream had its "
            f"32 tokens: {load['all_with_their_tokens']}; distinct response ids: {load['distinct_response_ids']}; "
            f"greedy text equal to the in-process engine's for its own prompt: "
            f"{load['greedy_text_equal_to_in_process']}/{load['requests']}.", "",
            f"`/metrics` deltas over the run: {json.dumps(load['metrics_delta'])}; clients saw "
            f"{json.dumps(load['clients_saw'])}; agree: {load['metrics_agree']}.", ""]
    if "disconnect" in record:
        d = record["disconnect"]
        lines += ["## A client that disconnects mid-stream", "",
                  f"Read {d['chunks_read']} chunks of a 1500-token stream, then closed the connection. Used KV blocks: "
                  f"{d['used_blocks_before']:.0f} before, {d['used_blocks_during']:.0f} during, "
                  f"{d['used_blocks_after']:.0f} after ({d['seconds_until_freed']} s later); running requests after: "
                  f"{d['running_after']:.0f}. Freed: {d['freed']}.", ""]
    if "survive" in record:
        s = record["survive"]
        lines += ["## Requests that once broke the engine", "",
                  f"A server with a pool of {s['pool_blocks']} blocks:", "",
                  *(f"- {row['case']}: HTTP {row['status']}"
                    + (f", {row['choices']} choices, all of 6 tokens: {row['all_length_6']}"
                       if "choices" in row else "")
                    + (f", {row['completion_tokens']} tokens" if "completion_tokens" in row else "")
                    + (f" ({row['message']})" if row.get("message") else "") for row in s["cases"]),
                  "", f"Used blocks afterwards: {s['used_blocks_after']:.0f}. The next greedy request equals the "
                  f"in-process engine's: {s['next_request_correct']}.", ""]
    if "errors" in record:
        lines += ["## Bad input", "", "| request | status | error type | code | next request served correctly |",
                  "|---|---|---|---|---|",
                  *(f"| {row['case']} | {row['status']} | {row['type']} | {row['code']} | "
                    f"{row['next_request_correct']} |" for row in record["errors"]), "",
                  "Messages:", "", *(f"- {row['case']}: {row['message']}" for row in record["errors"]), ""]
    lines += ["## Throughput on a shared CPU", "",
              "Measured by `benchmarks/serving_contention.py`: [contention/README.md](contention/README.md).", ""]
    (OUT / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="client,load,disconnect,survive,errors",
                        help="comma-separated parts to run (default: all)")
    parser.add_argument("--requests", type=int, default=64, help="concurrent clients of the load part")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"client", "load", "disconnect", "survive", "errors"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    record: dict[str, Any] = {
        "command": "python benchmarks/serving_check.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {len(os.sched_getaffinity(0))} cores".strip(),
    }
    bench = engine_bench_in_process(args.requests) if "load" in parts else None  # first, on a quiet machine
    reference = Reference()
    logs = Path(tempfile.mkdtemp(prefix="kvstack-serve-"))
    if parts & {"client", "load", "disconnect", "errors"}:
        with kvstack_serve(log=logs / "serve.log") as base:
            if "client" in parts:
                record["client"] = part_client(reference, base)
                print("client", json.dumps(record["client"])[:300], flush=True)
            if "load" in parts:
                record["load"] = part_load(reference, base, args.requests, bench)
                print("load", json.dumps(record["load"]), flush=True)
            if "disconnect" in parts:
                record["disconnect"] = part_disconnect(base)
                print("disconnect", json.dumps(record["disconnect"]), flush=True)
            if "errors" in parts:
                record["errors"] = part_errors(reference, base)
                print("errors", json.dumps(record["errors"])[:600], flush=True)
    if "survive" in parts:
        record["survive"] = part_survive(reference, logs / "serve-small.log")
        print("survive", json.dumps(record["survive"]), flush=True)
    write_report(record)
    print(f"wrote {OUT}; server logs in {logs}")
    failed = re.findall(r'"(all_equal|metrics_agree|freed|next_request_correct)": false', json.dumps(record))
    if failed:
        print("checks that did not hold:", sorted(set(failed)))


if __name__ == "__main__":
    main()
