"""Helpers for engine tests: small engines over tiny models and Hugging Face's greedy reference."""

from __future__ import annotations

from typing import Any

import torch

import autodeploy
from autodeploy import SamplingParams

SMALL_ENGINE = {"max_batch_size": 16, "max_seq_len": 256, "max_num_tokens": 512, "kv_cache.block_size": 4}


def build_engine(model: Any, **overrides: Any):
    return autodeploy.optimize(model, **{**SMALL_ENGINE, **overrides})


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` greedy continuation of one prompt (stops at EOS like the engine)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)
