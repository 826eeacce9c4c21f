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


def test_router_opcheck():
    torch.library.opcheck(ops.triton_moe_router.default, (torch.randn(3, 16), 4, True))


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


def test_engine_with_the_fused_router_equals_hf():
    from engine_utils import build_engine, greedy, hf_greedy, random_prompts

    model = tiny_model("mixtral")
    engine = build_engine(model, device="cpu", attn_backend="torch", **{"transforms.fuse_moe_router.backend": "triton"})
    assert any(n.target == ops.triton_moe_router.default for n in engine.runner.gm.graph.nodes)
    prompts = random_prompts([5, 11], model.config.vocab_size, seed=4)
    outs = engine.generate(prompts, greedy(6))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model, p, 6) for p in prompts]
