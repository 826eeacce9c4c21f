"""``autodeploy::triton_add_rmsnorm_linear`` (the add + RMSNorm in the decode GEMV's prologue) and the transform
``fuse_add_rmsnorm_linear``, against the two ops it replaces (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.custom_ops.triton.gemv import GemvConfig, W_DENSE, AddRmsNorm, gemv

ops = torch.ops.autodeploy


def _unfused(x, residual, norm_weight, eps, offset, weight, bias, act):
    normed, summed = ops.triton_fused_add_rmsnorm(x, residual, norm_weight, eps, offset)
    if act is None:
        return ops.triton_linear(normed, weight, bias), normed, summed
    return ops.triton_linear_glu(normed, weight, None, None, bias, "dense", 0, act), normed, summed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,act,offset", [
    ((1, 1, 200), None, 0.0), ((1, 96), "silu", 0.0), ((1, 1, 130), None, 1.0), ((3, 96), None, 0.0),
    ((2, 5, 96), "silu", 0.0),
])
def test_op_equals_add_rmsnorm_then_linear(dtype, shape, act, offset):
    """One row takes the fused GEMV (the same normalised values, so the same products); more rows the two ops."""
    k = shape[-1]
    x, residual = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(k)).to(dtype)
    weight = (torch.randn(2 * 38 if act else 83, k) * k**-0.5).to(dtype)
    bias = torch.randn(weight.shape[0]).to(dtype) if act is None else None
    got = ops.triton_add_rmsnorm_linear(x, residual, norm_weight, 1e-6, offset, weight, bias, act)
    want = _unfused(x, residual, norm_weight, 1e-6, offset, weight, bias, act)
    for g, w, name in zip(got, want, ("y", "normed", "summed")):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(g, w, **tol, msg=name)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)  # the same normalised row, bit for bit
    torch.testing.assert_close(got[2], want[2], atol=0, rtol=0)


@pytest.mark.parametrize("config", [GemvConfig(4, 64, 1, 1, 1), GemvConfig(8, 32, 3, 1, 1),
                                    GemvConfig(16, 32, 1, 1, 1, tensor_cores=True)], ids=["steps", "split", "tc"])
def test_gemv_norm_prologue_over_tiles(config):
    """K steps, split-K and the tensor-core product: only the first program writes the row; every one normalises."""
    k, n = 150, 70
    x, residual, norm_weight = torch.randn(1, k), torch.randn(1, k), torch.rand(k) + 0.5
    weight = torch.randn(n, k) * k**-0.5
    normed, summed = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    y = gemv(x, W_DENSE, weight, config=config, norm=AddRmsNorm(residual, norm_weight, 1e-5, 0.0, normed, summed))
    ref_normed, ref_summed = ops.torch_fused_add_rmsnorm(x, residual, norm_weight, 1e-5)
    torch.testing.assert_close(summed, ref_summed, atol=0, rtol=0)
    torch.testing.assert_close(normed, ref_normed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, ref_normed @ weight.t(), atol=1e-5, rtol=1e-5)


def test_gemv_norm_rejects_what_it_cannot_fuse():
    x = torch.randn(2, 64)
    bad = AddRmsNorm(torch.randn(2, 64), torch.ones(64), 1e-6, 0.0, torch.empty(2, 64), torch.empty(2, 64))
    with pytest.raises(ValueError, match="one row"):
        gemv(x, W_DENSE, torch.randn(8, 64), norm=bad)


def test_op_opcheck():
    args = (torch.randn(1, 32), torch.randn(1, 32), torch.ones(32), 1e-6, 0.0, torch.randn(16, 32), None, "silu")
    torch.library.opcheck(ops.triton_add_rmsnorm_linear.default, args)


TRITON = ("fuse_add_rmsnorm", "fuse_glu", "gemv_linears")


def test_transform_fuses_the_norms_into_the_linears_after_them():
    """Llama: every add + RMSNorm but the first layer's input norm (no residual yet) feeds a qkv, gate/up or (the
    final one, without the logits gather here) LM-head linear: 2 L fused."""
    from autodeploy.models.tiny import tiny_model
    from transform_harness import check_transforms

    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    _, history = check_transforms(
        model, ["cleanup_noop_ops", "match_rmsnorm", "match_glu", "fuse_parallel_linears", "fuse_glu",
                "fuse_add_rmsnorm", "gemv_linears", "fuse_glu_linear", "fuse_add_rmsnorm_linear"],
        present={ops.triton_add_rmsnorm_linear.default: 2 * layers, ops.triton_linear_glu.default: 0},
        absent=[ops.triton_fused_add_rmsnorm.default], overrides={name: {"backend": "triton"} for name in TRITON},
        reexport=False,
    )
    assert history["fuse_add_rmsnorm_linear"].num_matches == 2 * layers


def test_transform_leaves_linears_with_many_rows():
    """Only linears of at most ``max_out_features`` rows take the norm (every GEMV program reads the whole row)."""
    from autodeploy.models.tiny import tiny_model
    from transform_harness import check_transforms

    model = tiny_model("llama")
    rows = {model.config.intermediate_size * 2, model.config.vocab_size}  # gate/up, LM head; qkv is wider than o
    limit = min(rows) - 1
    overrides = {name: {"backend": "triton"} for name in TRITON}
    _, history = check_transforms(
        model, ["cleanup_noop_ops", "match_rmsnorm", "match_glu", "fuse_parallel_linears", "fuse_glu",
                "fuse_add_rmsnorm", "gemv_linears", "fuse_glu_linear", "fuse_add_rmsnorm_linear"],
        overrides={**overrides, "fuse_add_rmsnorm_linear": {"max_out_features": limit}}, reexport=False,
    )
    qkv_rows = (model.config.num_attention_heads + 2 * model.config.num_key_value_heads) * model.config.head_dim
    assert history["fuse_add_rmsnorm_linear"].num_matches == (model.config.num_hidden_layers - 1) * (qkv_rows <= limit)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_engine_decode_through_the_fused_norms_equals_hf(model_type):
    """Decode steps run the GEMVs with the norm in front (Qwen3-MoE: the router's, whose normalised row the
    experts read too); the final norm's reader is the logits gather, so 2 L - 1 are fused. Greedy tokens equal
    HF's."""
    from autodeploy.models.tiny import tiny_model
    from engine_utils import build_engine, greedy, hf_greedy, random_prompts

    model = tiny_model(model_type)
    triton = {f"transforms.{name}.backend": "triton" for name in (*TRITON, "fuse_moe", "fuse_moe_router")}
    engine = build_engine(model, device="cpu", attn_backend="torch", **triton)
    fused = [n for n in engine.runner.gm.graph.nodes if n.target == ops.triton_add_rmsnorm_linear.default]
    assert len(fused) == 2 * model.config.num_hidden_layers - 1
    prompt = random_prompts([9], model.config.vocab_size, seed=6)[0]
    assert engine.generate([prompt], greedy(8))[0].outputs[0].token_ids == hf_greedy(model, prompt, 8)
