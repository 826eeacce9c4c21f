"""match_glu through the shared harness, run after match_rope and match_rmsnorm as the pattern-matcher stage runs
them, over the HF models of the default coverage: exact counts of all three canonical ops per model, GPT-2 (tanh
GELU written out, LayerNorm, no RoPE) untouched, and transformers' MoE experts left to match_moe."""

from __future__ import annotations

import pytest
import torch

from autodeploy.models.tiny import tiny_model
from autodeploy.transforms.graph import find_nodes
from transform_harness import check_transforms

aten = torch.ops.aten
ops = torch.ops.autodeploy
STAGE = ["cleanup_noop_ops", "match_rope", "match_rmsnorm", "match_glu"]
SOURCE_OPS = [aten.silu.default, aten.gelu.default, aten.rsqrt.default, aten.neg.default, aten.chunk.default]

# model type -> (norms per layer, GLU activation or None, packed gate/up, weight_offset of the norms, linears per
# layer: they all stay aten.linear)
MODELS = {
    "llama": (2, "silu", False, 0.0, 7),
    "qwen3": (4, "silu", False, 0.0, 7),  # + per-head q/k norms
    "gemma2": (4, "gelu_tanh", False, 1.0, 7),  # pre/post norms around attention and MLP, x * (1 + w), GeGLU
    "phi3": (2, "silu", True, 0.0, 4),  # qkv_proj, o_proj, gate_up_proj -> chunk(2, -1), down_proj
    "mixtral": (2, None, False, 0.0, 5),  # no dense MLP: experts routed to torch_moe at export; the router
}


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_pattern_matcher_stage_on_hf_models(model_type):
    norms, activation, packed, offset, linears = MODELS[model_type]
    model = tiny_model(model_type)
    layers = model.config.num_hidden_layers
    glu = layers if activation else 0
    present = {
        ops.torch_rope.default: 2 * layers,
        ops.torch_rmsnorm.default: norms * layers + 1,
        ops.torch_glu.default: 0 if packed else glu,
        ops.torch_glu_packed.default: glu if packed else 0,
        ops.torch_moe.default: layers if model_type == "mixtral" else 0,
        aten.linear.default: linears * layers + 1,
    }
    gm, history = check_transforms(model, STAGE, present, SOURCE_OPS)
    info = history["match_glu"]
    assert info.num_matches == glu and not info.details.get("rejected") and not info.details.get("unmatched")
    glu_nodes = find_nodes(gm, [ops.torch_glu.default, ops.torch_glu_packed.default])
    assert {n.args[-1] for n in glu_nodes} == ({activation} if activation else set())
    assert {n.args[3] if len(n.args) > 3 else 0.0 for n in find_nodes(gm, ops.torch_rmsnorm.default)} == {
        offset
    }


def test_gpt2_is_left_alone():
    """Conv1D (addmm), LayerNorm, the tanh GELU written out, no rotary embedding: nothing to canonicalise."""
    _, history = check_transforms(
        tiny_model("gpt2"),
        STAGE,
        {ops.torch_glu.default: 0, ops.torch_rmsnorm.default: 0, ops.torch_rope.default: 0},
    )
    assert all(history[name].num_matches == 0 for name in STAGE[1:])
    assert not history["match_glu"].details.get("unmatched")


def test_moe_experts_are_not_glu():
    """With routing off, transformers' experts compute silu(gate) * up on chunked grouped-matmul rows: refused."""
    model = tiny_model("mixtral")
    _, history = check_transforms(
        model,
        ["cleanup_noop_ops", "match_glu"],
        {ops.torch_glu_packed.default: 0},
        disabled_patches=["route_experts"],
    )
    info = history["match_glu"]
    assert info.num_matches == 0
    reasons = list(info.details["rejected"].values())
    assert len(reasons) == model.config.num_hidden_layers and all(
        "not the output of a linear" in r for r in reasons
    )
