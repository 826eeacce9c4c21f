"""``fuse_rope_attention``: RoPE of q and k inside the cached attention's KV write; engines still equal HF."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.models.tiny import tiny_model
from autodeploy.transforms.base import get_history
from engine_utils import build_engine, greedy, hf_greedy, random_prompts

ops = torch.ops.autodeploy
ROPE_OPS = (ops.torch_rope.default, ops.triton_rope.default)


def _targets(engine) -> list:
    return [n.target for n in engine.runner.gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("attn_backend", ["triton", "torch"])
def test_rope_moves_into_every_attention_and_tokens_equal_hf(attn_backend):
    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    engine = build_engine(model, device="cpu", attn_backend=attn_backend, max_batch_size=4)
    assert get_history(engine.runner.gm)["fuse_rope_attention"].num_matches == layers
    targets = _targets(engine)
    assert not any(t in ROPE_OPS for t in targets)
    attention = [n for n in engine.runner.gm.graph.nodes if "cached_attention" in str(n.target)]
    assert len(attention) == layers and all(n.kwargs["rope_cos"] is not None for n in attention)
    prompts = random_prompts([11, 5], model.config.vocab_size, seed=4)  # a prefill and decode steps, two sequences
    outs = engine.generate(prompts, greedy(6))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model, p, 6) for p in prompts]


def test_disabled_keeps_the_rope_launches():
    model = tiny_model("llama")
    disabled = {"transforms.fuse_rope_attention.enabled": False}
    engine = build_engine(model, device="cpu", attn_backend="torch", **disabled)
    assert sum(t in ROPE_OPS for t in _targets(engine)) == 2 * model.config.num_hidden_layers


@pytest.mark.parametrize("model_type", ["phi", "stablelm"])
def test_partial_rotary_model_equals_hf(model_type):
    """Models that rotate part of each head (a half, a quarter): the pass-through channels are copied by the
    fused write."""
    model = tiny_model(model_type)
    engine = build_engine(model, device="cpu", attn_backend="triton", max_batch_size=2)
    assert get_history(engine.runner.gm)["fuse_rope_attention"].num_matches == model.config.num_hidden_layers
    prompt = random_prompts([9], model.config.vocab_size, seed=5)[0]
    assert engine.generate([prompt], greedy(5))[0].outputs[0].token_ids == hf_greedy(model, prompt, 5)
