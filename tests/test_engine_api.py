"""LLM API features: n > 1, seeds, logprobs, stop strings and ids, async streaming, abort, typed errors."""

from __future__ import annotations

import asyncio

import pytest
import torch

import autodeploy
from autodeploy import PromptTooLongError, SamplingParams
from autodeploy.models.tiny import tiny_model
from engine_utils import SMALL_ENGINE, greedy, random_prompts


@pytest.fixture(scope="module")
def llm():
    return autodeploy.LLM(tiny_model("llama"), **SMALL_ENGINE)


@pytest.fixture(scope="module")
def prompt(llm):
    return random_prompts([12], llm.engine.vocab_size, seed=7)[0]


def test_sampling_is_reproducible_with_seed_and_n(llm, prompt):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=123, n=3, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    again = llm.generate([prompt, prompt[:5]], [params, params])[0]  # other company in the batch
    assert len(first.outputs) == 3
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1  # the n samples differ


def test_logprobs_match_log_softmax(llm, prompt):
    out = llm.generate([prompt], greedy(3, logprobs=2, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 3
    model = llm.engine.factory.source.module
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        expected = ref[len(prompt) - 1 + i]
        assert entry[token].logprob == pytest.approx(expected[token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 2


def test_stop_token_ids_and_max_tokens(llm, prompt):
    free = llm.generate([prompt], greedy(10, ignore_eos=True))[0].outputs[0]
    stop_at = free.token_ids[3]
    stopped = llm.generate([prompt], greedy(10, ignore_eos=True, stop_token_ids=[stop_at]))[0].outputs[0]
    first = free.token_ids.index(stop_at)
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at
    assert free.finish_reason == "length" and len(free.token_ids) == 10


def test_prompt_longer_than_context_is_a_typed_error_and_engine_survives(llm, prompt):
    with pytest.raises(PromptTooLongError):
        llm.generate([list(range(3, 300))], greedy(4))
    assert llm.generate([prompt], greedy(2, ignore_eos=True))[0].outputs[0].token_ids


def test_invalid_sampling_value_names_the_field():
    with pytest.raises(ValueError, match="^temperature"):
        SamplingParams(temperature=-1)


def test_async_streaming_and_abort(llm, prompt):
    async def main():
        pieces = []
        async for out in llm.generate_async(prompt, greedy(8, ignore_eos=True)):
            pieces.append(out.outputs[0].delta_token_ids)
        stream = llm.generate_async(prompt, greedy(50, ignore_eos=True), request_id="to-abort")
        await stream.__anext__()
        await stream.aclose()  # the consumer goes away: the request is aborted and its blocks freed
        return pieces

    pieces = asyncio.run(main())
    full = llm.generate([prompt], greedy(8, ignore_eos=True))[0].outputs[0].token_ids
    assert [t for p in pieces for t in p] == full
    engine = llm.engine
    for _ in range(100):
        if engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"] and not engine.has_unfinished_requests():
            break
        asyncio.run(asyncio.sleep(0.01))
    assert not engine.has_unfinished_requests()
