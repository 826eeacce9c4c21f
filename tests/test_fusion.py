"""Fusion transforms: fused parallel linears, packed GLU, residual add + RMSNorm, backend swaps."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.models.tiny import tiny_model
from transform_harness import check_transforms

ops = torch.ops.autodeploy
aten = torch.ops.aten
CANONICAL = ["cleanup_noop_ops", "match_attention", "match_rope", "match_rmsnorm", "match_glu", "match_moe"]
FUSION = ["fuse_parallel_linears", "fuse_glu", "fuse_add_rmsnorm", "fuse_rope"]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_dense_models_fuse(model_type):
    model = tiny_model(model_type)
    layers = model.config.num_hidden_layers
    _, history = check_transforms(
        model,
        CANONICAL + FUSION,
        present={
            aten.linear.default: 4 * layers + 1,  # qkv, o, gate_up, down per layer, and the LM head
            ops.torch_fused_add_rmsnorm.default: 2 * layers,
            ops.torch_glu_packed.default: layers,
        },
        absent=[ops.torch_glu.default],
    )
    assert history["fuse_parallel_linears"].num_matches == 2 * layers  # qkv and gate/up of every layer
    assert history["fuse_glu"].details["packed"] == layers


def test_moe_router_and_experts_keep_working():
    model = tiny_model("qwen2_moe")
    _, history = check_transforms(model, CANONICAL + FUSION, present={ops.torch_moe.default: model.config.num_hidden_layers})
    assert history["fuse_parallel_linears"].num_matches >= model.config.num_hidden_layers


def test_triton_backends_in_the_graph():
    model = tiny_model("llama")
    overrides = {name: {"backend": "triton"} for name in ["fuse_glu", "fuse_add_rmsnorm", "fuse_rope"]}
    layers = model.config.num_hidden_layers
    check_transforms(
        model,
        CANONICAL + FUSION,
        present={
            ops.triton_fused_add_rmsnorm.default: 2 * layers,
            ops.triton_rmsnorm.default: 1,
            ops.triton_rope.default: 2 * layers,
            ops.triton_glu_packed.default: layers,
        },
        absent=[ops.torch_rmsnorm.default, ops.torch_rope.default, ops.torch_glu_packed.default],
        overrides=overrides,
        reexport=False,
    )
