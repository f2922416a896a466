"""The OpenAI-compatible app, in process (Starlette's TestClient, no socket), on a tiny model.

Expected outputs come from a separate in-process engine with the same weights (greedy, or seeded sampling);
the word tokenizer makes texts and token ids interconvertible by hand (``w17`` is token 17).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.testclient import TestClient
from test_serve_support import (
    BLOCK_SIZE,
    CONTEXT,
    MODEL_NAME,
    ids_of,
    make_app,
    parse_metrics,
    reference_tokens,
    slow_engine,
    sse_payloads,
    tiny_engine,
    wait_until,
    word_tokenizer,
    words,
)

from kvstack.serve import EngineLoop

PROMPT_A = [10, 11, 12, 13, 14, 15, 16]
PROMPT_B = list(range(40, 53))


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app()) as test_client:
        yield test_client


def complete(client: TestClient, **body) -> dict:
    response = client.post("/v1/completions", json={"model": MODEL_NAME, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def chat(client: TestClient, **body) -> dict:
    response = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(client: TestClient, path: str, **body) -> list[dict]:
    response = client.post(path, json={"model": MODEL_NAME, "temperature": 0, "stream": True, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_payloads(response.text)


def assert_openai_error(response, status: int, error_type: str, *, param: str | None = None,
                        code: str | None = None, contains: str = "") -> dict:
    """The response is OpenAI's error object with these values."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["param"] == param
    assert error["code"] == code
    assert contains in error["message"]
    return error


# ------------------------------------------------------------------------------------------------------
# completions and chat: the engine's greedy output, usage, the chat template, defaults
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "prompts"), [
    (words(PROMPT_A), [PROMPT_A]),
    ([words(PROMPT_A), words(PROMPT_B)], [PROMPT_A, PROMPT_B]),
    (PROMPT_B, [PROMPT_B]),
    ([PROMPT_A, PROMPT_B], [PROMPT_A, PROMPT_B]),
], ids=["text", "texts", "token-ids", "token-id-lists"])
def test_completion_greedy_text_equals_the_in_process_engine(client, prompt, prompts):
    body = complete(client, prompt=prompt, max_tokens=7)
    expected = reference_tokens(prompts, 7)
    assert body["object"] == "text_completion" and body["model"] == MODEL_NAME and body["id"].startswith("cmpl-")
    assert [choice["index"] for choice in body["choices"]] == list(range(len(prompts)))
    assert [ids_of(choice["text"]) for choice in body["choices"]] == expected
    assert {choice["finish_reason"] for choice in body["choices"]} == {"length"}
    prompt_tokens = sum(len(p) for p in prompts)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7 * len(prompts),
                             "total_tokens": prompt_tokens + 7 * len(prompts)}


def test_concurrent_requests_each_get_the_engine_output_of_their_own_prompt():
    import httpx

    prompts = [PROMPT_A, PROMPT_B, [7, 8, 9], list(range(60, 90)), PROMPT_A[:3], [100, 120, 140, 160, 180]]
    engine_loop = EngineLoop(tiny_engine())
    app = make_app(engine_loop)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(
                http.post("/v1/completions", json={"prompt": p, "max_tokens": 3 + i, "temperature": 0})
                for i, p in enumerate(prompts)))

    engine_loop.start()
    try:
        responses = asyncio.run(main())
    finally:
        engine_loop.stop()
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        assert ids_of(response.json()["choices"][0]["text"]) == reference_tokens([prompt], 3 + i)[0]


def test_completion_defaults_to_16_tokens_as_openai(client):
    body = complete(client, prompt=PROMPT_A)
    assert ids_of(body["choices"][0]["text"]) == reference_tokens([PROMPT_A], 16)[0]


def test_chat_prompt_goes_through_the_chat_template(client):
    messages = [{"role": "developer", "content": "w20 w21"},
                {"role": "user", "content": [{"type": "text", "text": "w30"}, {"type": "text", "text": "w31"}]}]
    body = chat(client, messages=messages, max_tokens=6)
    # w3 <content> w4 per message, then w5; the developer role is OpenAI's system; text parts join with "\n"
    prompt = [3, 20, 21, 4, 3, 30, 31, 4, 5]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert ids_of(choice["message"]["content"]) == reference_tokens([prompt], 6)[0]
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}


def test_chat_without_max_tokens_generates_up_to_the_context():
    prompt = [3, 50, 4, 5]  # the template around "w50"
    with TestClient(make_app()) as client:
        body = chat(client, messages=[{"role": "user", "content": "w50"}])
    room = CONTEXT - len(prompt) + 1  # 256 would not fit
    assert body["usage"]["completion_tokens"] == room
    assert ids_of(body["choices"][0]["message"]["content"]) == reference_tokens([prompt], room)[0]


def test_chat_without_max_tokens_stops_at_the_servers_limit():
    with TestClient(make_app(max_tokens_limit=5)) as client:
        body = chat(client, messages=[{"role": "user", "content": "w50"}])
        assert body["usage"]["completion_tokens"] == 5
        assert_openai_error(client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "w50"}], "max_tokens": 6}), 400, "invalid_request_error",
            param="max_tokens", contains="limit of 5")


# ------------------------------------------------------------------------------------------------------
# streaming
# ------------------------------------------------------------------------------------------------------


def test_streamed_completion_chunks_add_up_to_the_whole_response(client):
    whole = complete(client, prompt=[PROMPT_A, PROMPT_B], max_tokens=6, n=1)
    chunks = stream(client, "/v1/completions", prompt=[PROMPT_A, PROMPT_B], max_tokens=6,
                    stream_options={"include_usage": True})
    *choice_chunks, last = chunks
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert all(len(c["choices"]) == 1 and c["usage"] is None for c in choice_chunks)
    texts = {0: "", 1: ""}
    reasons = {}
    for c in choice_chunks:
        [choice] = c["choices"]
        assert choice["index"] not in reasons, "nothing after a choice's finish_reason"
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            reasons[choice["index"]] = choice["finish_reason"]
    assert [texts[0], texts[1]] == [choice["text"] for choice in whole["choices"]]
    assert reasons == {0: "length", 1: "length"}
    assert last["choices"] == [] and last["usage"] == whole["usage"]


def test_streamed_chat_sends_the_role_then_content_deltas_and_no_usage_unless_asked(client):
    messages = [{"role": "user", "content": "w60 w61 w62"}]
    chunks = stream(client, "/v1/chat/completions", messages=messages, max_tokens=5)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all("usage" not in c for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and deltas[-1] == {}
    content = "".join(d.get("content", "") for d in deltas)
    assert ids_of(content) == reference_tokens([[3, 60, 61, 62, 4, 5]], 5)[0]


# ------------------------------------------------------------------------------------------------------
# n, stop strings, EOS, kv_policy
# ------------------------------------------------------------------------------------------------------


def test_n_samples_are_the_engines_seeded_samples_in_index_order(client):
    body = complete(client, prompt=[PROMPT_A, PROMPT_B], max_tokens=5, n=3, temperature=0.9, seed=11)
    expected = reference_tokens([PROMPT_A, PROMPT_B], 5, n=3, temperature=0.9, seed=11)
    assert [choice["index"] for choice in body["choices"]] == list(range(6))  # prompt * n + sample
    assert [ids_of(choice["text"]) for choice in body["choices"]] == expected[0] + expected[1]
    assert body["usage"]["completion_tokens"] == 30
    assert body["usage"]["prompt_tokens"] == len(PROMPT_A) + len(PROMPT_B)  # each prompt once
    chunks = stream(client, "/v1/completions", prompt=PROMPT_A, max_tokens=5, n=3, temperature=0.9, seed=11)
    streamed = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)}
    assert [ids_of(streamed[i]) for i in range(3)] == expected[0]


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("cut", ["two-words", "inside-a-word"])
def test_stop_strings_end_the_text_where_they_begin(client, streamed, cut):
    generated = reference_tokens([PROMPT_B], 20)[0]
    full = words(generated)
    stop = f"w{generated[5]} w{generated[6]}" if cut == "two-words" else f"{generated[4]} w{str(generated[5])[0]}"
    expected_text = full[: full.index(stop)]
    # the engine stops at the token whose text completes the stop string
    expected_tokens = next(i for i in range(1, 21) if stop in words(generated[:i]))
    body = {"prompt": PROMPT_B, "max_tokens": 20, "stop": [stop, "never-there"]}
    if streamed:
        chunks = stream(client, "/v1/completions", **body, stream_options={"include_usage": True})
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        reason = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and
                      c["choices"][0]["finish_reason"])
        usage = chunks[-1]["usage"]
    else:
        response = complete(client, **body)
        text, reason, usage = response["choices"][0]["text"], response["choices"][0]["finish_reason"], \
            response["usage"]
    assert (text, reason) == (expected_text, "stop")
    assert usage["completion_tokens"] == expected_tokens


def test_the_tokenizers_eos_token_ends_a_choice_with_stop_and_is_not_in_the_text():
    generated = reference_tokens([PROMPT_A], 12)[0]
    position = next(i for i in range(2, 12) if generated[i] not in generated[:i])
    tokenizer = word_tokenizer(eos_word=f"w{generated[position]}")
    with TestClient(make_app(tokenizer=tokenizer, stop_token_ids=None)) as client:  # None: the tokenizer's EOS
        body = complete(client, prompt=PROMPT_A, max_tokens=12)
    [choice] = body["choices"]
    assert (choice["text"], choice["finish_reason"]) == (words(generated[:position]), "stop")
    assert body["usage"]["completion_tokens"] == position + 1  # the EOS token was generated


def test_kv_policy_runs_the_method_in_the_engine(client):
    spec = "streamingllm(budget=8, sinks=2)"
    prompt = list(range(100, 124))
    before = parse_metrics(client.get("/metrics").text)
    body = complete(client, prompt=prompt, max_tokens=6, kv_policy=spec)
    assert ids_of(body["choices"][0]["text"]) == reference_tokens([prompt], 6, method=spec)[0]
    assert ids_of(body["choices"][0]["text"]) != reference_tokens([prompt], 6)[0]  # the method changed it
    after = parse_metrics(client.get("/metrics").text)
    freed = ("kvstack:compression_freed_blocks_total", ())
    assert after[freed] > before.get(freed, 0)


# ------------------------------------------------------------------------------------------------------
# errors: OpenAI's format and status, and the server keeps serving
# ------------------------------------------------------------------------------------------------------

ERROR_CASES = {
    "malformed-json": (dict(content=b'{"prompt": [1, 2'), 400, "invalid_request_error", None, None, "not valid JSON"),
    "missing-prompt": (dict(json={"max_tokens": 3}), 400, "invalid_request_error", "prompt", None, "required"),
    "wrong-type": (dict(json={"prompt": "w1", "max_tokens": "many"}), 400, "invalid_request_error", "max_tokens",
                   None, "integer"),
    "temperature-range": (dict(json={"prompt": "w1", "temperature": 3}), 400, "invalid_request_error",
                          "temperature", None, "2"),
    "unknown-model": (dict(json={"prompt": "w1", "model": "gpt-4"}), 404, "not_found_error", "model",
                      "model_not_found", "gpt-4"),
    "echo": (dict(json={"prompt": "w1", "echo": True}), 400, "invalid_request_error", "echo",
             "unsupported_parameter", "echo"),
    "token-outside-vocabulary": (dict(json={"prompt": [5, 999]}), 400, "invalid_request_error", None, None,
                                 "outside the vocabulary"),
    "prompt-past-context": (dict(json={"prompt": [7] * (CONTEXT + 1)}), 400, "invalid_request_error", "prompt",
                            "context_length_exceeded", f"context of {CONTEXT}"),
    "max-tokens-past-context": (dict(json={"prompt": [7] * 100, "max_tokens": 30}), 400, "invalid_request_error",
                                "max_tokens", "context_length_exceeded", "at most 29"),
    "unknown-kv-policy": (dict(json={"prompt": "w1", "kv_policy": "snapky(budget=8)"}), 400,
                          "invalid_request_error", "kv_policy", None, "snapkv"),
    "kv-policy-with-n": (dict(json={"prompt": "w1 w2", "kv_policy": "h2o(budget=8)", "n": 2}), 400,
                         "invalid_request_error", None, None, "cannot be combined"),
    "empty-prompt-list": (dict(json={"prompt": []}), 400, "invalid_request_error", "prompt", None, "not empty"),
    "empty-stop-string": (dict(json={"prompt": "w1", "stop": [""]}), 400, "invalid_request_error", "stop", None,
                          "empty"),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_completion_errors_are_openais_and_the_next_request_succeeds(client, case):
    request, status, error_type, param, code, contains = ERROR_CASES[case]
    response = client.post("/v1/completions", headers={"content-type": "application/json"}, **request)
    assert_openai_error(response, status, error_type, param=param, code=code, contains=contains)
    assert ids_of(complete(client, prompt=PROMPT_A, max_tokens=2)["choices"][0]["text"]) == \
        reference_tokens([PROMPT_A], 2)[0]


CHAT_ERROR_CASES = {
    "no-messages": ({"messages": []}, "messages", "at least 1"),
    "image-part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "messages.0.content", "image_url"),
    "tools": ({"messages": [{"role": "user", "content": "w1"}], "tools": [{"type": "function"}]}, "tools",
              "not supported"),
    "json-response-format": ({"messages": [{"role": "user", "content": "w1"}],
                              "response_format": {"type": "json_object"}}, "response_format", "json_object"),
}


@pytest.mark.parametrize("case", CHAT_ERROR_CASES, ids=list(CHAT_ERROR_CASES))
def test_chat_errors_are_openais(client, case):
    body, param, contains = CHAT_ERROR_CASES[case]
    response = client.post("/v1/chat/completions", json=body)
    error = assert_openai_error(response, 400, "invalid_request_error", param=param,
                                code=response.json()["error"]["code"], contains=contains)
    assert error["code"] in (None, "unsupported_parameter")
    assert chat(client, messages=[{"role": "user", "content": "w9"}], max_tokens=2)["choices"]


def test_fields_openai_has_but_that_change_nothing_and_unknown_fields_are_accepted(client):
    body = complete(client, prompt=PROMPT_A, max_tokens=3, logit_bias={}, frequency_penalty=0, user="me",
                    best_of=1, some_future_field={"x": 1})
    assert ids_of(body["choices"][0]["text"]) == reference_tokens([PROMPT_A], 3)[0]


def test_unknown_routes_and_methods_are_openai_errors(client):
    assert_openai_error(client.get("/v1/nothing"), 404, "not_found_error", contains="/v1/nothing")
    assert_openai_error(client.get("/v1/completions"), 405, "invalid_request_error", contains="GET")


def test_chat_needs_a_chat_template():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = None
    with TestClient(make_app(tokenizer=tokenizer)) as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "w1"}]})
        assert_openai_error(response, 400, "invalid_request_error", param="messages", contains="chat template")


def test_a_request_the_engine_fails_is_a_500_and_the_stream_of_one_ends_with_an_error_event():
    prompt = [70, 71, 72, 73]
    generated = reference_tokens([prompt], 10)[0]
    poison = generated[2]
    assert poison not in prompt and poison not in generated[:2]
    engine = tiny_engine()
    real_step = engine.runner.step

    def failing_step(batch):  # the forward of any chunk holding the poisoned token raises
        if any(poison in chunk.token_ids for chunk in batch):
            raise RuntimeError("poisoned token")
        return real_step(batch)

    engine.runner.step = failing_step
    with TestClient(make_app(engine)) as client:
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0})
        assert_openai_error(response, 500, "server_error", contains="RuntimeError: poisoned token")
        chunks = stream(client, "/v1/completions", prompt=prompt, max_tokens=10)
        *text_chunks, error = chunks
        assert ids_of("".join(c["choices"][0]["text"] for c in text_chunks)) == generated[:3]
        assert error["error"]["type"] == "server_error" and "poisoned token" in error["error"]["message"]
        assert ids_of(complete(client, prompt=PROMPT_A, max_tokens=3)["choices"][0]["text"]) == \
            reference_tokens([PROMPT_A], 3)[0]
        wait_until(lambda: client.app.state.kvstack.engine_loop.snapshot()["num_used"] == 0)


def test_a_request_failing_before_its_first_token_is_a_500_even_when_streamed():
    engine = tiny_engine()
    real_step = engine.runner.step
    engine.runner.step = lambda batch: (_ for _ in ()).throw(RuntimeError("broken forward")) \
        if any(199 in chunk.token_ids for chunk in batch) else real_step(batch)
    with TestClient(make_app(engine)) as client:
        response = client.post("/v1/completions", json={"prompt": [5, 199], "stream": True})
        assert_openai_error(response, 500, "server_error", contains="broken forward")
        assert complete(client, prompt=PROMPT_A, max_tokens=2)["choices"]


# ------------------------------------------------------------------------------------------------------
# API key, queue limit, disconnects
# ------------------------------------------------------------------------------------------------------


def test_api_key_guards_v1_and_leaves_health_and_metrics_open():
    with TestClient(make_app(api_key="sesame")) as client:
        for headers, message in (({}, "no API key"), ({"Authorization": "Bearer wrong"}, "incorrect"),
                                 ({"Authorization": "sesame"}, "incorrect")):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
                response = client.request(method, path, headers=headers, json={"prompt": "w1"})
                assert_openai_error(response, 401, "authentication_error", code="invalid_api_key", contains=message)
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer sesame"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post("/v1/completions", headers=good, json={"prompt": "w1", "max_tokens": 1}).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_a_full_queue_answers_429_until_a_place_frees():
    app = make_app(slow_engine(), max_queue=1)
    engine_loop = app.state.kvstack.engine_loop
    with TestClient(app) as client:
        body = {"prompt": PROMPT_B, "max_tokens": 100, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator may close the stream
            assert next(lines).startswith("data: ")
            response = client.post("/v1/completions", json={"prompt": "w1", "max_tokens": 1})
            assert_openai_error(response, 429, "rate_limit_error", code="rate_limit_exceeded", contains="limit of 1")
            assert response.headers["retry-after"] == "1"
            # a request of two prompts can never fit a queue of one: that is the request's fault (400)
            too_many = client.post("/v1/completions", json={"prompt": ["w1", "w2"], "max_tokens": 1})
            assert_openai_error(too_many, 400, "invalid_request_error", param="prompt", contains="queue of 1")
        wait_until(lambda: engine_loop.in_flight == 0)
        assert complete(client, prompt=PROMPT_A, max_tokens=2)["usage"]["completion_tokens"] == 2
        # sequential requests never see the previous one's place still taken
        for _ in range(5):
            assert complete(client, prompt=PROMPT_A, max_tokens=1)["choices"]


def test_a_client_leaving_a_stream_aborts_its_request_and_frees_its_blocks():
    app = make_app(slow_engine())
    engine_loop = app.state.kvstack.engine_loop
    with TestClient(app) as client:
        wait_until(lambda: engine_loop.snapshot() is not None)
        before = engine_loop.snapshot()
        assert before["num_used"] == 0
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": words(PROMPT_B)}], "max_tokens": 100, "stream": True,
        }) as response:
            lines = response.iter_lines()
            next(lines)
            wait_until(lambda: engine_loop.snapshot()["num_used"] > 0)
        wait_until(lambda: engine_loop.snapshot()["num_used"] == 0 and engine_loop.in_flight == 0)
        after = engine_loop.snapshot()
        assert after["steps"] - before["steps"] < 100  # cut short: a full run takes a step per token
        assert after["num_running"] == after["num_waiting"] == 0
        metrics = parse_metrics(client.get("/metrics").text)
        assert metrics[("kvstack:request_success_total", (("finished_reason", "abort"),))] == 1


def test_a_client_leaving_before_a_whole_response_aborts_its_request_and_frees_its_blocks():
    engine_loop = EngineLoop(slow_engine())
    app = make_app(engine_loop)
    body = json.dumps({"prompt": PROMPT_B, "max_tokens": 100}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}

    async def main():
        sent: list[dict] = []
        gone = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.to_thread(wait_until, lambda: engine_loop.snapshot()["num_used"] > 0)
        gone.set()  # the client hangs up while its response is being generated
        await asyncio.wait_for(task, 10)
        return sent

    engine_loop.start()
    try:
        before = engine_loop.snapshot()
        sent = asyncio.run(main())
        wait_until(lambda: engine_loop.snapshot()["num_used"] == 0 and engine_loop.in_flight == 0)
        after = engine_loop.snapshot()
    finally:
        engine_loop.stop()
    assert after["steps"] - before["steps"] < 100  # cut short: a full run takes a step per token
    assert sent[0]["status"] == 499  # written to nobody


# ------------------------------------------------------------------------------------------------------
# models, health, metrics, lifespan
# ------------------------------------------------------------------------------------------------------


def test_models_lists_the_served_model_and_retrieves_only_it(client):
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    [card] = listing["data"]
    assert (card["id"], card["object"], card["owned_by"], card["max_model_len"]) == (MODEL_NAME, "model", "kvstack",
                                                                                   CONTEXT)
    assert client.get(f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
    assert_openai_error(client.get("/v1/models/gpt-4"), 404, "not_found_error", param="model", code="model_not_found")


def test_metrics_agree_with_what_clients_were_sent():
    app = make_app()
    with TestClient(app) as client:
        responses = [
            complete(client, prompt=[PROMPT_A, PROMPT_B], max_tokens=4, n=2, temperature=0.7, seed=3),
            chat(client, messages=[{"role": "user", "content": "w1 w2 w3"}], max_tokens=5),
            complete(client, prompt=PROMPT_B, max_tokens=6, stop=[words(reference_tokens([PROMPT_B], 6)[0][2:4])]),
            complete(client, prompt=PROMPT_B, max_tokens=3),  # PROMPT_B again: its full blocks are cached
        ]
        streamed = stream(client, "/v1/completions", prompt=PROMPT_A, max_tokens=3,
                          stream_options={"include_usage": True})
        usages = [r["usage"] for r in responses] + [streamed[-1]["usage"]]
        reasons = [c["finish_reason"] for r in responses for c in r["choices"]]
        reasons += [c["choices"][0]["finish_reason"] for c in streamed if c["choices"] and
                    c["choices"][0]["finish_reason"]]
        metrics = parse_metrics(client.get("/metrics").text)
    assert metrics[("kvstack:generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
    assert metrics[("kvstack:prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
    for reason in ("stop", "length"):
        assert metrics[("kvstack:request_success_total", (("finished_reason", reason),))] == reasons.count(reason)
    assert reasons.count("stop") == 1
    for histogram in ("time_to_first_token", "e2e_request_latency", "time_per_output_token"):
        assert metrics[(f"kvstack:{histogram}_seconds_count", ())] == len(reasons)
    # PROMPT_B was sent three times and PROMPT_A twice: each time after the first, its full blocks are cached
    full_blocks_tokens = {len(p): len(p) // BLOCK_SIZE * BLOCK_SIZE for p in (PROMPT_A, PROMPT_B)}
    expected_hits = 2 * full_blocks_tokens[len(PROMPT_B)] + full_blocks_tokens[len(PROMPT_A)]
    assert metrics[("kvstack:prefix_cache_hits_total", ())] == expected_hits == 28
    assert metrics[("kvstack:prefix_cache_queries_total", ())] == sum(u["prompt_tokens"] for u in usages)
    assert metrics[("kvstack:num_requests_running", ())] == metrics[("kvstack:num_requests_waiting", ())] == 0
    assert metrics[("kvstack:kv_cache_usage_perc", ())] == 0
    assert metrics[("kvstack:num_preemptions_total", ())] == 0


def test_refused_requests_count_no_choice():
    with TestClient(make_app()) as client:
        refused = client.post("/v1/completions", json={"prompt": [[5, 6], [7, 999]], "n": 2})
        assert_openai_error(refused, 400, "invalid_request_error", contains="outside the vocabulary")
        metrics = parse_metrics(client.get("/metrics").text)
    assert not [key for key in metrics if key[0] in ("kvstack:request_success_total", "kvstack:prompt_tokens_total")
                and metrics[key]]


def test_metrics_registries_are_per_app():
    first, second = make_app(), make_app()
    with TestClient(first) as one, TestClient(second) as two:
        complete(one, prompt=PROMPT_A, max_tokens=2)
        assert parse_metrics(one.get("/metrics").text)[("kvstack:generation_tokens_total", ())] == 2
        assert parse_metrics(two.get("/metrics").text).get(("kvstack:generation_tokens_total", ()), 0) == 0


def test_health_follows_the_engine_loop_and_shutdown_stops_it():
    app = make_app()
    engine_loop = app.state.kvstack.engine_loop
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert engine_loop.is_running
    assert not engine_loop.is_running
    unstarted = TestClient(app)  # no lifespan: the loop stays stopped
    assert unstarted.get("/health").status_code == 503
    response = unstarted.post("/v1/completions", json={"prompt": "w1"})
    assert_openai_error(response, 503, "server_error", contains="not running")


def test_a_request_in_flight_when_the_server_stops_gets_a_503():
    import httpx

    engine_loop = EngineLoop(slow_engine())
    app = make_app(engine_loop)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            pending = asyncio.create_task(http.post("/v1/completions", json={"prompt": PROMPT_B, "max_tokens": 100}))
            await asyncio.to_thread(wait_until, lambda: engine_loop.snapshot()["num_used"] > 0)
            await asyncio.to_thread(engine_loop.stop)
            return await pending

    engine_loop.start()
    response = asyncio.run(main())
    assert_openai_error(response, 503, "server_error", contains="shutting down")
    assert engine_loop.engine.metrics()["num_used"] == 0


# ------------------------------------------------------------------------------------------------------
# the real model
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_real_model_answers_a_chat_as_the_in_process_engine_does():
    import kvstack
    from kvstack.engine import Engine, SamplingParams
    from kvstack.serve import create_app

    model, tokenizer = kvstack.load_model("smollm2-135m", device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    engine = Engine(model, memory_mb=64, tokenizer=tokenizer)
    expected = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=(tokenizer.eos_token_id,)))
    with TestClient(create_app(engine, tokenizer, MODEL_NAME)) as client:
        body = chat(client, messages=messages, max_tokens=12)
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert "Paris" in body["choices"][0]["message"]["content"]



def test_ignore_eos_generates_past_the_end_of_sequence_token():
    generated = reference_tokens([PROMPT_A], 12)[0]
    position = next(i for i in range(2, 12) if generated[i] not in generated[:i])
    tokenizer = word_tokenizer(eos_word=f"w{generated[position]}")
    with TestClient(make_app(tokenizer=tokenizer, stop_token_ids=None)) as client:
        body = complete(client, prompt=PROMPT_A, max_tokens=12, ignore_eos=True)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 12
    # The EOS word is a special token (left out of the text); every other generated token is there.
    assert choice["text"] == words([t for t in generated if t != generated[position]])
