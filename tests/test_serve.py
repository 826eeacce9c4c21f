"""The OpenAI-compatible server on the embedded SmolLM2, driven by the real ``openai`` client over HTTP.

One engine and one uvicorn server (in a thread, on a free port) for the whole module.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

import autodeploy
from autodeploy import SamplingParams
from autodeploy.serve import BackgroundServer, create_app
from serve_utils import assert_error, metric, wait_until_idle

MODEL = "smollm2"
PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    engine = autodeploy.optimize(max_batch_size=32, max_seq_len=512, max_num_tokens=1024)
    yield engine
    engine.shutdown(timeout=5)


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(create_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def engine_text(engine, prompt, max_tokens: int, **kwargs) -> tuple[str, list[int]]:
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs))[0].outputs[0]
    return out.text, out.token_ids


def chat_ids(engine, messages) -> list[int]:
    return engine.tokenizer.encode(engine.apply_chat_template(messages), add_special_tokens=False)


def test_models_and_health(client, url, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == engine.max_seq_len
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_completion_equals_engine_generate(client, engine):
    text, ids = engine_text(engine, PROMPT, 16)
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert result.object == "text_completion" and result.model == MODEL
    choice = result.choices[0]
    assert choice.text == text and "Paris" in text
    assert choice.finish_reason == "length"
    prompt_tokens = len(engine.tokenizer.encode(PROMPT))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (prompt_tokens, len(ids))
    assert result.usage.total_tokens == prompt_tokens + len(ids)


def test_chat_uses_the_template(client, engine):
    text, ids = engine_text(engine, chat_ids(engine, QUESTION), 24)
    result = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=24, temperature=0)
    message = result.choices[0].message
    assert message.role == "assistant" and message.content == text
    assert "Paris" in message.content
    assert result.usage.prompt_tokens == len(chat_ids(engine, QUESTION))
    assert result.usage.completion_tokens == len(ids)


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert len(text_chunks) > 3  # really streamed, not one blob
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens


def test_streamed_chat_with_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_n_with_seed_is_reproducible(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, n=2)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, n=2, seed=7, temperature=1.0)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_stop_string_cuts_the_text(client, engine):
    free, _ = engine_text(engine, PROMPT, 24)
    stop = free.strip().split()[1]
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and choice.text == free[: free.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_chat_logprobs(client):
    result = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    choice = result.choices[0]
    content = choice.logprobs.content
    eos = choice.finish_reason == "stop"  # the EOS that ended it is counted in usage but has no logprobs entry
    assert len(content) == result.usage.completion_tokens - eos
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
    streamed = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True)
    streamed_tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs
                       for t in c.choices[0].logprobs.content]
    assert streamed_tokens == [t.token for t in content]


def test_completion_legacy_logprobs(client):
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    choice = result.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)


def test_echo_and_batched_prompts(client):
    prompts = [PROMPT, "Here is a list of three fruits: apple,"]
    result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, echo=True, n=2)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for i, choice in enumerate(result.choices):
        assert choice.text.startswith(prompts[i // 2])
    alone = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=6, temperature=0)
    assert result.choices[2].text == prompts[1] + alone.choices[0].text


def test_prompt_longer_than_the_context_is_a_400(client, url):
    long_prompt = "hello " * 600
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert e.value.param == "prompt" and e.value.code == "context_length_exceeded"
    assert "512" in e.value.message and "shorten" in e.value.message
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": long_prompt}],
                                                                "stream": True})
    assert_error(response, 400, param="messages", code="context_length_exceeded")


def test_concurrent_requests_equal_the_same_requests_alone(client, url):
    prompts = [f"{subject} is" for subject in ("The capital of Italy", "Python", "The ocean", "A good breakfast")]
    questions = [[{"role": "user", "content": f"Tell me one fact about {p.split()[-2]}."}] for p in prompts]
    alone_text = [client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text
                  for p in prompts]
    alone_chat = [client.chat.completions.create(model=MODEL, messages=q, max_tokens=10, temperature=0)
                  .choices[0].message.content for q in questions]

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)

        async def completion(i):
            if i >= 12:  # streamed, one per prompt
                stream = await aclient.completions.create(model=MODEL, prompt=prompts[i % 4], max_tokens=10,
                                                          temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream])
            r = await aclient.completions.create(model=MODEL, prompt=prompts[i % 4], max_tokens=10, temperature=0)
            return r.choices[0].text

        async def chat(i):
            r = await aclient.chat.completions.create(model=MODEL, messages=questions[i % 4], max_tokens=10,
                                                      temperature=0)
            return r.choices[0].message.content

        async def bad():  # failing requests in the same batch disturb nobody
            with pytest.raises(openai.BadRequestError):
                await aclient.completions.create(model=MODEL, prompt="x " * 700, max_tokens=4)
            with pytest.raises(openai.BadRequestError):
                await aclient.completions.create(model=MODEL, prompt=PROMPT, temperature=-2)

        results = await asyncio.gather(*[completion(i) for i in range(16)], *[chat(i) for i in range(16)],
                                       *[bad() for _ in range(4)])
        await aclient.close()
        return results[:16], results[16:32]

    texts, chats = asyncio.run(run_all())
    assert texts == [alone_text[i % 4] for i in range(16)]
    assert chats == [alone_chat[i % 4] for i in range(16)]


def test_streaming_client_that_disconnects_frees_its_blocks(url):
    aborted_before = metric(url, "autodeploy_request_finished_total", reason="abort")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert sum(1 for line in (next(lines) for _ in range(6)) if line.startswith("data: {")) >= 3
            assert metric(url, "autodeploy_num_requests_running") == 1
            assert metric(url, "autodeploy_kv_cache_usage_ratio") > 0
    wait_until_idle(url, timeout=30)
    assert metric(url, "autodeploy_request_finished_total", reason="abort") == aborted_before + 1


def test_non_streaming_client_that_times_out_frees_its_blocks(url):
    aborted_before = metric(url, "autodeploy_request_finished_total", reason="abort")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 450, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.5)
    wait_until_idle(url, timeout=30)
    assert metric(url, "autodeploy_request_finished_total", reason="abort") == aborted_before + 1


def test_metrics_count_requests_tokens_and_latencies(url):
    assert metric(url, "autodeploy_requests_total", endpoint="/v1/completions", status="200") >= 10
    assert metric(url, "autodeploy_requests_total", endpoint="/v1/chat/completions", status="400") >= 1
    assert metric(url, "autodeploy_prompt_tokens_total") > 100
    assert metric(url, "autodeploy_generation_tokens_total") > 300
    assert metric(url, "autodeploy_time_to_first_token_seconds_count") >= 30
    assert metric(url, "autodeploy_inter_token_latency_seconds_count") > 100
    assert metric(url, "autodeploy_kv_cache_blocks") > 0
