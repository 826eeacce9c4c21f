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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary,offset", [(16, 0.0), (8, 1.0)])  # Qwen3's norm; a partial rotary Gemma-style one
def test_head_norms_and_rope_in_the_cache_write(dtype, rotary, offset):
    """``q_norm_weight``/``k_norm_weight``: each head RMS-normalised, then rotated, in the KV write == torch_rmsnorm,
    torch_rope, then the attention."""
    from test_triton_kernels import ATTN_TOL, DEVICE, TOL, _assert_close, _paged_batch, _rope_tables
    from autodeploy.custom_ops.triton.cached_attention import cached_attention_into

    batch = _paged_batch([(0, 5), (6, 1), (40, 1)], 2, 4, 2, 16, 4, dtype, pad_tokens=2)
    cos, sin = _rope_tables(batch.inputs["q"].shape[1], rotary, dtype, False)
    q_w, k_w = (0.5 + torch.rand(16, device=DEVICE)).to(dtype), (0.5 + torch.rand(16, device=DEVICE)).to(dtype)
    extra = dict(rope_cos=cos, rope_sin=sin, q_norm_weight=q_w, k_norm_weight=k_w, qk_norm_eps=1e-5,
                 qk_norm_weight_offset=offset)
    ours_in, ref_in, composed_in = ({n: t.clone() for n, t in batch.inputs.items()} for _ in range(3))
    expected = ops.torch_cached_attention(**ref_in, **extra)
    for name, w in (("q", q_w), ("k", k_w)):  # the contract: torch_rmsnorm, then torch_rope
        normed = ops.torch_rmsnorm(composed_in[name], w, 1e-5, offset)
        composed_in[name] = ops.torch_rope(normed, cos, sin, False)
    assert torch.equal(ops.torch_cached_attention(**composed_in), expected)
    assert torch.equal(composed_in["k_cache"], ref_in["k_cache"])

    out = cached_attention_into(torch.full_like(expected, float("nan")), **ours_in, **extra)
    n = batch.num_valid_tokens
    _assert_close(out[:, :n], expected[:, :n], ATTN_TOL[dtype])
    _assert_close(ours_in["k_cache"], ref_in["k_cache"], TOL[dtype])
    assert torch.equal(ours_in["v_cache"], ref_in["v_cache"])


@pytest.mark.parametrize("attn_backend", ["triton", "torch"])
def test_qwen3_head_norms_move_in_and_tokens_equal_hf(attn_backend):
    model = tiny_model("qwen3")
    layers = model.config.num_hidden_layers
    engine = build_engine(model, device="cpu", attn_backend=attn_backend, max_batch_size=2)
    assert get_history(engine.runner.gm)["fuse_rope_attention"].details["head_norms"] == layers
    norms = [t for t in _targets(engine) if t in (ops.torch_rmsnorm.default, ops.triton_rmsnorm.default)]
    assert len(norms) == 1  # the final norm; q_norm, k_norm are in the attention, the layer norms fused with adds
    prompts = random_prompts([9, 4], model.config.vocab_size, seed=6)
    outs = engine.generate(prompts, greedy(5))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model, p, 5) for p in prompts]
