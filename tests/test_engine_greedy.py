"""The whole engine against Hugging Face's own eager ``generate``: greedy tokens equal (float32, CPU)."""

from __future__ import annotations

import pytest

from autodeploy.models.tiny import tiny_model
from engine_utils import build_engine, greedy, hf_greedy, random_prompts

MODELS = ["llama", "qwen3", "gemma2", "mixtral"]
LENGTHS = [3, 17, 41]  # gemma2's tiny sliding window is 8: the longer prompts cross it


@pytest.mark.parametrize("model_type", MODELS)
def test_batched_greedy_equals_hf(model_type):
    model = tiny_model(model_type)
    engine = build_engine(model)
    prompts = random_prompts(LENGTHS, model.config.vocab_size)
    outputs = engine.generate(prompts, greedy(24))
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, 24)
        assert output.finished and output.outputs[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def llama_engine_factory():
    model = tiny_model("llama")
    return model, lambda **overrides: build_engine(model, **overrides)


def _tokens(engine, prompts, max_tokens=16):
    return [o.outputs[0].token_ids for o in engine.generate(prompts, greedy(max_tokens, ignore_eos=True))]


def test_chunked_prefill_same_tokens(llama_engine_factory):
    model, make = llama_engine_factory
    prompts = random_prompts([50, 9, 33], model.config.vocab_size, seed=1)
    plain = _tokens(make(max_num_tokens=512), prompts)
    chunked = make(max_num_tokens=8)  # every prompt is split into 8-token chunks
    assert _tokens(chunked, prompts) == plain


def test_prefix_reuse_same_tokens(llama_engine_factory):
    model, make = llama_engine_factory
    shared = random_prompts([24], model.config.vocab_size, seed=2)[0]
    prompts = [shared + tail for tail in random_prompts([3, 7, 1], model.config.vocab_size, seed=3)]
    no_cache = _tokens(make(enable_prefix_caching=False), prompts)
    engine = make()
    first = _tokens(engine, prompts[:1])
    rest = _tokens(engine, prompts[1:])  # served mostly from the blocks of the first request
    assert engine.scheduler.block_manager.prefix_cache_hits > 0
    assert first + rest == no_cache


def test_preemption_same_tokens(llama_engine_factory):
    model, make = llama_engine_factory
    prompts = random_prompts([20, 20, 20, 20], model.config.vocab_size, seed=4)
    plain = _tokens(make(), prompts, max_tokens=24)
    tight = make(**{"kv_cache.max_tokens": 64})  # 16 blocks of 4: the four requests can't all fit
    assert _tokens(tight, prompts, max_tokens=24) == plain
    assert tight.scheduler.num_preemptions > 0
