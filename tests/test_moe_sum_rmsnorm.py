"""The fused MoE's top-k sum inside the add + RMSNorm after it (``triton_moe_rows`` + ``triton_moe_sum_add_rmsnorm``)
against ``triton_moe`` + ``triton_fused_add_rmsnorm``, and the transform ``fuse_moe_sum_rmsnorm`` (Triton
interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.models.tiny import tiny_model

ops = torch.ops.autodeploy


def _moe_inputs(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype):
    x = torch.randn(tokens, hidden).to(dtype)
    weights, ids = torch.randn(tokens, experts).softmax(-1).topk(top_k, -1)
    w_up = (torch.randn(experts, 2 * inter, hidden) * hidden**-0.5).to(dtype)
    w_down = (torch.randn(experts, hidden, inter) * inter**-0.5).to(dtype)
    return x, ids, weights.to(dtype), w_up, w_down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,offset", [(1, 0.0), (7, 1.0)])
def test_ops_equal_moe_then_add_rmsnorm(dtype, tokens, offset):
    """The same roundings in the same order: equal bit for bit; sentinel ids (expert parallel) add nothing."""
    x, ids, weights, w_up, w_down = _moe_inputs(tokens, 8, 3, 48, 24, dtype)
    ids[0, 1] = -1
    residual, norm_weight = torch.randn(1, tokens, 48).to(dtype), (1 + 0.1 * torch.randn(48)).to(dtype)
    moe = ops.triton_moe(x, ids, weights, w_up, w_down)
    want = ops.triton_fused_add_rmsnorm(moe.view(1, tokens, 48), residual, norm_weight, 1e-6, offset)
    rows = ops.triton_moe_rows(x, ids, weights, w_up, w_down)
    assert rows.shape == (tokens, 3, 48)
    got = ops.triton_moe_sum_add_rmsnorm(rows, ids, 8, residual, norm_weight, 1e-6, offset)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_ops_opcheck():
    x, ids, weights, w_up, w_down = _moe_inputs(2, 4, 2, 16, 8, torch.float32)
    torch.library.opcheck(ops.triton_moe_rows.default, (x, ids, weights, w_up, w_down))
    rows = ops.triton_moe_rows(x, ids, weights, w_up, w_down)
    args = (rows, ids, 4, torch.randn(2, 16), torch.ones(16), 1e-6)
    torch.library.opcheck(ops.triton_moe_sum_add_rmsnorm.default, args)


TRITON = ("fuse_add_rmsnorm", "fuse_moe", "fuse_moe_router")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_engine_with_the_sum_in_the_norm_equals_hf(model_type):
    """Every layer's MoE output feeds the next add + RMSNorm (the last one the final norm): L fusions; greedy tokens
    equal HF's over prefill, batched and single-token decode."""
    from engine_utils import build_engine, greedy, hf_greedy, random_prompts

    model = tiny_model(model_type)
    layers = model.config.num_hidden_layers
    engine = build_engine(model, device="cpu", attn_backend="torch",
                          **{f"transforms.{name}.backend": "triton" for name in TRITON})
    nodes = engine.runner.gm.graph.nodes
    assert sum(n.target == ops.triton_moe_sum_add_rmsnorm.default for n in nodes) == layers
    assert not any(n.target == ops.triton_moe.default for n in nodes)
    prompts = random_prompts([5, 13], model.config.vocab_size, seed=8)
    outputs = engine.generate(prompts, [greedy(6), greedy(2)])
    for prompt, n, output in zip(prompts, [6, 2], outputs):
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 64])
def test_ops_on_the_gpu_match_the_two_ops(tokens):
    """Qwen3-30B-A3B's shape in bf16: the sum may add the rows in another order than the top-k sum launch, so the
    results agree to bf16 rounding."""
    torch.manual_seed(0)
    x, ids, weights, w_up, w_down = (t.cuda() for t in _moe_inputs(tokens, 128, 8, 2048, 768, torch.bfloat16))
    residual = torch.randn(tokens, 2048, device="cuda").bfloat16()
    norm_weight = (1 + 0.1 * torch.randn(2048, device="cuda")).bfloat16()
    moe = ops.triton_moe(x, ids, weights, w_up, w_down)
    want = ops.triton_fused_add_rmsnorm(moe, residual, norm_weight, 1e-6)
    rows = ops.triton_moe_rows(x, ids, weights, w_up, w_down)
    got = ops.triton_moe_sum_add_rmsnorm(rows, ids, 128, residual, norm_weight, 1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
