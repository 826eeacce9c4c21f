"""The fused MoE router: ``torch_moe_router`` == the graph it replaces, its Triton twin (interpreter), the transform."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.models.tiny import tiny_model
from transform_harness import check_transforms

ops = torch.ops.autodeploy
aten = torch.ops.aten


@pytest.mark.parametrize("tokens,experts,top_k,normalize", [(1, 128, 8, True), (37, 60, 4, False), (5, 8, 2, True)])
def test_router_ops_match_softmax_topk(tokens, experts, top_k, normalize):
    logits = torch.randn(tokens, experts)
    probs = torch.softmax(logits, -1)
    values, indices = torch.topk(probs, top_k)
    if normalize:
        values = values / values.sum(-1, keepdim=True)
    weights, ids = ops.torch_moe_router(logits, top_k, normalize)
    assert torch.equal(weights, values) and torch.equal(ids, indices)
    weights, ids = ops.triton_moe_router(logits, top_k, normalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, indices)
    torch.testing.assert_close(weights, values, atol=1e-6, rtol=1e-5)


def test_triton_router_16_bit_logits_and_ties():
    """bf16 logits tie often: the chosen probabilities match, and ties go to the lower expert id."""
    logits = torch.randn(9, 64).bfloat16()
    weights, ids = ops.triton_moe_router(logits, 6, False)
    ref, _ = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), 6)
    torch.testing.assert_close(weights, ref, atol=1e-6, rtol=1e-5)
    tied = torch.zeros(1, 8)
    assert ops.triton_moe_router(tied, 3, True)[1].tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_weights_in_the_model_dtype(dtype):
    """The weights' cast happens once, from the float32 (renormalised) values, as HF's ``.to(dtype)`` does."""
    logits = torch.randn(6, 40)  # float32: 16-bit logits tie, and torch.topk orders ties as it likes
    ref_w, ref_ids = ops.torch_moe_router(logits, 5, True, dtype)
    assert ref_w.dtype == dtype
    weights, ids = ops.triton_moe_router(logits, 5, True, dtype)
    assert weights.dtype == dtype and torch.equal(ids, ref_ids)
    assert torch.equal(weights, ref_w)


def test_router_opcheck():
    torch.library.opcheck(ops.triton_moe_router.default, (torch.randn(3, 16), 4, True))
    torch.library.opcheck(ops.triton_moe_router.default, (torch.randn(3, 16), 4, True, torch.bfloat16))


@pytest.mark.parametrize("model_type,normalised", [("mixtral", True), ("qwen3_moe", False), ("qwen2_moe", False)])
def test_transform_fuses_the_router(model_type, normalised):
    model = tiny_model(model_type)
    layers = model.config.num_hidden_layers
    _, history = check_transforms(
        model, ["cleanup_noop_ops", "match_moe", "fuse_moe_router"],
        present={ops.triton_moe_router.default: layers},
        absent=[aten.topk.default], overrides={"fuse_moe_router": {"backend": "triton"}}, reexport=False,
    )
    assert history["fuse_moe_router"].details["renormalised"] == (layers if normalised else 0)


def test_qwen3_moe_with_renormalisation():
    model = tiny_model("qwen3_moe", norm_topk_prob=True)
    _, history = check_transforms(
        model, ["cleanup_noop_ops", "match_moe", "fuse_moe_router"], overrides={"fuse_moe_router": {"backend": "triton"}},
        absent=[aten.topk.default, aten.softmax.int], reexport=False,
    )
    assert history["fuse_moe_router"].details["renormalised"] == model.config.num_hidden_layers


def test_the_weights_cast_of_a_16_bit_model_is_fused():
    """bf16 Qwen3-MoE casts the renormalised weights to bf16 (a copy launch per layer): the router writes bf16."""
    model = tiny_model("qwen3_moe", norm_topk_prob=True).to(torch.bfloat16)
    layers = model.config.num_hidden_layers
    gm, history = check_transforms(
        model, ["cleanup_noop_ops", "match_moe", "fuse_moe_router"],
        overrides={"fuse_moe_router": {"backend": "triton"}}, absent=[aten.topk.default], reexport=False,
        atol=2e-2, rtol=2e-2,
    )
    assert history["fuse_moe_router"].details["casts"] == layers
    routers = [n for n in gm.graph.nodes if n.target == ops.triton_moe_router.default]
    assert [n.args[3] for n in routers] == [torch.bfloat16] * layers
    for router in routers:
        weights = next(u for u in router.users if u.args[1] == 0)
        assert all(u.target == ops.torch_moe.default for u in weights.users)


def test_engine_with_the_fused_router_equals_hf():
    from engine_utils import build_engine, greedy, hf_greedy, random_prompts

    model = tiny_model("mixtral")
    engine = build_engine(model, device="cpu", attn_backend="torch", **{"transforms.fuse_moe_router.backend": "triton"})
    assert any(n.target == ops.triton_moe_router.default for n in engine.runner.gm.graph.nodes)
    prompts = random_prompts([5, 11], model.config.vocab_size, seed=4)
    outs = engine.generate(prompts, greedy(6))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model, p, 6) for p in prompts]
