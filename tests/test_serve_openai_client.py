"""The server under uvicorn on a real socket, queried with the official ``openai`` client (completions, chat,
streaming and not, models, errors), and clients hanging up on the socket mid-request."""

from __future__ import annotations

import socket
import threading

import httpx
import openai
import pytest
import uvicorn
from test_serve_support import MODEL_NAME, ids_of, make_app, reference_tokens, slow_engine, wait_until, words

PROMPT = [10, 11, 12, 13, 14, 15, 16]
API_KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    """The app (a tiny engine, 5 ms a step) served by uvicorn on 127.0.0.1, on a free port, in a thread."""
    app = make_app(slow_engine(), api_key=API_KEY)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    wait_until(lambda: uvicorn_server.started, timeout=30)
    port = uvicorn_server.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}"
    uvicorn_server.should_exit = True
    thread.join(15)
    assert not app.state.kvstack.engine_loop.is_running  # the lifespan stopped it


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server[1]}/v1", api_key=API_KEY, max_retries=0) as openai_client:
        yield openai_client


def test_completions_whole_and_streamed(client):
    expected = reference_tokens([PROMPT], 6)[0]
    completion = client.completions.create(model=MODEL_NAME, prompt=words(PROMPT), max_tokens=6, temperature=0)
    assert ids_of(completion.choices[0].text) == expected
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (len(PROMPT), 6)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                            stream=True))
    assert ids_of("".join(chunk.choices[0].text for chunk in chunks)) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_whole_and_streamed(client):
    messages = [{"role": "system", "content": "w20"}, {"role": "user", "content": "w30 w31"}]
    expected = reference_tokens([[3, 20, 4, 3, 30, 31, 4, 5]], 5)[0]
    completion = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0)
    assert completion.choices[0].message.role == "assistant"
    assert ids_of(completion.choices[0].message.content) == expected
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert ids_of(content) == expected
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []


def test_models_and_errors_as_the_client_reads_them(client, server):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="w1", max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL_NAME, prompt="w1", max_tokens=1,
                                  extra_body={"kv_policy": "snapky(budget=8)"})
    assert bad.value.param == "kv_policy" and "snapkv" in bad.value.message
    with openai.OpenAI(base_url=f"{server[1]}/v1", api_key="wrong", max_retries=0) as intruder, \
            pytest.raises(openai.AuthenticationError) as denied:
        intruder.models.list()
    assert denied.value.code == "invalid_api_key"
    # the server kept serving through all of it
    assert client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0).choices


LONG_PROMPT = PROMPT * 4
LONG_OUTPUT = 90  # 90 steps of at least 5 ms: the client hangs up long before it could finish


def snapshot(server) -> dict:
    return server[0].state.kvstack.engine_loop.snapshot()


def assert_freed_and_cut_short(server, before: dict) -> None:
    """The request's blocks return to the pool and the engine computed far fewer tokens than a full run."""
    wait_until(lambda: snapshot(server)["num_used"] == 0 and snapshot(server)["in_flight"] == 0)
    after = snapshot(server)
    assert after["num_running"] == after["num_waiting"] == 0
    assert after["steps"] - before["steps"] < LONG_OUTPUT  # a full run takes a step per token


def test_a_client_closing_a_stream_frees_the_blocks_of_its_request(server):
    before = snapshot(server)
    assert before["num_used"] == 0
    body = {"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": LONG_OUTPUT, "stream": True}
    with httpx.Client(base_url=server[1], headers={"Authorization": f"Bearer {API_KEY}"}) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # kept: a dropped line iterator closes the connection
        assert next(lines).startswith("data: ")
        assert snapshot(server)["num_used"] > 0
    assert_freed_and_cut_short(server, before)


def test_a_client_hanging_up_before_its_whole_response_frees_the_blocks_of_its_request(server):
    import json

    before = snapshot(server)
    body = json.dumps({"model": MODEL_NAME, "prompt": LONG_PROMPT, "max_tokens": LONG_OUTPUT}).encode()
    host, port = server[1].removeprefix("http://").split(":")
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        wait_until(lambda: snapshot(server)["num_used"] > 0)
    assert_freed_and_cut_short(server, before)
