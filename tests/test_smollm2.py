"""The embedded default model (SmolLM2-135M-Instruct, real weights, float32, CPU) against HF ``generate``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import autodeploy
from autodeploy import SamplingParams
from autodeploy.models import default_model_path

PROMPTS = [
    "The capital of France is",
    "Here is a list of three fruits: apple,",
    "Write a short story about a robot who learns to paint. Once upon a time, in a small workshop at the edge of",
]


@pytest.fixture(scope="module")
def llm():
    return autodeploy.LLM(max_batch_size=8, max_seq_len=512, max_num_tokens=512)


@pytest.fixture(scope="module")
def hf_model():
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_greedy_batch_equals_hf_generate(llm, hf_model):
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32))
    tokenizer = llm.tokenizer
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert output.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
        assert output.outputs[0].token_ids == ref
        assert output.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)
    assert "Paris" in outputs[0].outputs[0].text


def test_stop_string_cuts_the_text(llm):
    free = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    stop = free.strip().split()[1]  # a word in the middle of the continuation
    cut = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free[: free.index(stop)]


def test_chat_template(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out[0].outputs[0].text


def test_cli_run_prints_a_continuation():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "autodeploy.cli", "run", "--prompt", "The capital of France is", "--max-tokens", "8"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "The capital of France is" in result.stdout and "Paris" in result.stdout
    assert "tokens/s" in result.stderr
