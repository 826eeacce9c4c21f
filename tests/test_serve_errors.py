"""Server failure paths on a tiny random model (token-id prompts, no tokenizer): every bad request gets the
OpenAI error body with the right status and ``param``, the API key is enforced, nothing disturbs the good
requests, and ``autodeploy serve`` drains in-flight requests on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

import autodeploy
from autodeploy.models.tiny import tiny_config, tiny_model
from autodeploy.serve import BackgroundServer, create_app
from engine_utils import SMALL_ENGINE
from serve_utils import assert_error, metric, wait_until_idle

KEY = "test-key"
MODEL = "tiny"
PROMPT = [5, 17, 42, 99, 123, 7]
MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def engine():
    engine = autodeploy.optimize(tiny_model("llama"), **{**SMALL_ENGINE, "max_seq_len": MAX_SEQ_LEN})
    yield engine
    engine.shutdown(timeout=5)


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(create_app(engine, MODEL, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def completion(**fields):
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **fields}


def test_api_key_is_required_on_v1(url, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{url}/v1/completions", json=completion(), headers=headers)
        assert_error(response, 401, code="invalid_api_key", contains="Authorization: Bearer")
        assert response.headers["www-authenticate"] == "Bearer"
    bad_key = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200  # probes and scrapers need no key
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert client.models.list().data[0].id == MODEL


def test_malformed_bodies(http):
    headers = {"Content-Type": "application/json"}
    assert_error(http.post("/v1/completions", content=b'{"prompt": [1, 2', headers=headers), 400,
                 code="invalid_json", contains="not valid JSON")
    assert_error(http.post("/v1/chat/completions", content=b"", headers=headers), 400)
    assert_error(http.post("/v1/completions", json=[1, 2, 3]), 400, contains="JSON object")
    assert_error(http.post("/v1/completions", json={"model": MODEL}), 400, param="prompt",
                 code="missing_required_parameter")
    assert_error(http.post("/v1/completions", json=completion(temprature=0.5)), 400, param="temprature",
                 contains="Unrecognized request argument")
    assert_error(http.post("/v1/completions", json=completion(max_tokens="many")), 400, param="max_tokens",
                 contains="valid integer")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}), 400,
                 param="messages")


def test_unknown_model_and_url(http, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.param == "model" and e.value.code == "model_not_found" and MODEL in e.value.message
    assert_error(http.post("/v1/chat/completions", json={"model": "nope", "messages": []}), 404, param="model")
    assert_error(http.get("/v1/engines"), 404, contains="Invalid URL")
    assert_error(http.get("/v1/completions"), 405)


def test_prompt_longer_than_the_context(http):
    error = assert_error(http.post("/v1/completions", json=completion(prompt=list(range(3, 3 + MAX_SEQ_LEN)))),
                         400, param="prompt", code="context_length_exceeded")
    assert f"max_model_len is {MAX_SEQ_LEN}" in error["message"] and "shorten" in error["message"]
    batch = [PROMPT, list(range(3, 3 + 2 * MAX_SEQ_LEN))]
    error = assert_error(http.post("/v1/completions", json=completion(prompt=batch, stream=True)), 400,
                         param="prompt", code="context_length_exceeded")
    assert error["message"].startswith("prompt 1:")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", -1, ">= 0"),
        ("top_p", 0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("n", 0, ">= 1"),
        ("n", 1000, "at most"),
        ("max_tokens", 0, ">= 1"),
        ("presence_penalty", 3, "[-2, 2]"),
        ("frequency_penalty", -2.5, "[-2, 2]"),
        ("logprobs", 50, "between 0 and 20"),
        ("top_k", -5, "top_k"),
        ("min_p", 1.5, "[0, 1]"),
        ("repetition_penalty", 0, "> 0"),
        ("min_tokens", 9, "min_tokens must be <= max_tokens"),
        ("stop", [""], "non-empty"),
        ("stop_token_ids", [-1], ">= 0"),
        ("seed", "abc", "valid integer"),
        ("seed", 2**70, "64-bit"),
        ("echo", True, "not supported"),  # with logprobs, below
        ("logit_bias", {"5": 10}, "not supported"),
        ("suffix", "end", "not supported"),
        ("best_of", 3, "not supported"),
    ],
)
def test_invalid_completion_values_name_the_field(http, field, value, message):
    body = completion(**{field: value}, **({"logprobs": 1} if field == "echo" else {}))
    error = assert_error(http.post("/v1/completions", json=body), 400, param=field)
    assert message in error["message"]


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"temperature": -0.5}, "temperature", ">= 0"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
        ({"max_tokens": -3}, "max_tokens", ">= 1"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs=true"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs", "between 0 and 20"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ({"messages": []}, "messages", "at least one"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages", "text only"),
        ({}, "messages", "no chat template"),  # this tiny model has no tokenizer
    ],
)
def test_invalid_chat_requests_name_the_field(http, fields, param, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, param=param)
    assert message in error["message"]


def test_prompts_the_model_cannot_take(http):
    assert_error(http.post("/v1/completions", json=completion(prompt=[5, 100_000])), 400, param="prompt",
                 contains="[0, 512)")
    assert_error(http.post("/v1/completions", json=completion(prompt=[])), 400, param="prompt")
    assert_error(http.post("/v1/completions", json=completion(prompt="text")), 400, param="prompt",
                 contains="no tokenizer")


def test_bad_requests_never_disturb_good_ones(url, http):
    good_body = completion(max_tokens=24, ignore_eos=True, logprobs=0)  # logprobs: the token ids, as text

    def tokens(response: httpx.Response) -> list[str]:
        return response.json()["choices"][0]["logprobs"]["tokens"]

    alone = tokens(http.post("/v1/completions", json=good_body))

    async def main():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            good = [c.post("/v1/completions", json=good_body) for _ in range(6)]
            bad = [c.post("/v1/completions", json=completion(prompt=[5, 10**6])) for _ in range(3)]
            bad += [c.post("/v1/completions", json=completion(prompt=list(range(3, 200)))) for _ in range(3)]
            bad += [c.post("/v1/completions", json=completion(temperature=-1)) for _ in range(3)]
            return await asyncio.gather(*good, *bad)

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 6 + [400] * 9
    assert all(tokens(r) == alone for r in responses[:6])
    wait_until_idle(url)


def test_logprobs_and_streaming_without_a_tokenizer(http):
    body = completion(max_tokens=5, ignore_eos=True, logprobs=1)
    result = http.post("/v1/completions", json=body).json()
    lp = result["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5 and all(t.startswith("token_id:") for t in lp["tokens"])
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    streamed = [t for e in events[:-1] for t in json.loads(e[6:])["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


def test_metrics_count_statuses(url):
    assert metric(url, "autodeploy_requests_total", endpoint="/v1/completions", status="401") >= 3
    assert metric(url, "autodeploy_requests_total", endpoint="/v1/completions", status="400") >= 20
    assert metric(url, "autodeploy_requests_total", endpoint="other", status="404") >= 1


def test_a_draining_server_turns_new_requests_away(engine):
    app = create_app(engine, MODEL)
    with BackgroundServer(app) as url:
        assert httpx.post(f"{url}/v1/completions", json=completion()).status_code == 200
        app.state.server.draining = True  # as on SIGTERM, while in-flight requests finish
        assert_error(httpx.post(f"{url}/v1/completions", json=completion()), 503, contains="shutting down")
        assert httpx.get(f"{url}/health").status_code == 503


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_drains_in_flight_requests_on_sigterm(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "autodeploy.cli", "serve", "--model", str(tmp_path / "config.json"),
               "--random-weights", "--max-seq-len", "256", "--max-batch-size", "4", "--port", str(port),
               "--shutdown-timeout", "60"]
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                "stream": True, "logprobs": 0}  # no tokenizer: logprobs make every token an event
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream must still run to its end
            rest = [line for line in lines if line]
        assert len(rest) > 100 and rest[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in rest[-2]
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert "engine shut down" in (tmp_path / "serve.log").read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
