"""``autodeploy::triton_linear`` and the ``gemv_linears`` transform (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.models.tiny import tiny_model
from engine_utils import build_engine, greedy, hf_greedy, random_prompts
from transform_harness import check_transforms

ops = torch.ops.autodeploy
aten = torch.ops.aten


@pytest.mark.parametrize("shape", [(1, 1, 200), (1, 200), (2, 1, 200), (1, 5, 200)])  # one row: the GEMV; more: F.linear
def test_triton_linear_equals_linear(shape):
    x = torch.randn(shape)
    weight, bias = torch.randn(83, 200) * 0.05, torch.randn(83)
    torch.testing.assert_close(ops.triton_linear(x, weight, bias), F.linear(x, weight, bias), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ops.triton_linear(x, weight), F.linear(x, weight), atol=2e-5, rtol=2e-5)


def test_triton_linear_opcheck():
    torch.library.opcheck(ops.triton_linear.default, (torch.randn(1, 64), torch.randn(24, 64), torch.randn(24)))


def test_transform_swaps_every_16_bit_linear():
    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    _, history = check_transforms(
        model, ["cleanup_noop_ops", "fuse_parallel_linears", "gemv_linears"],
        present={ops.triton_linear.default: 4 * layers + 1},  # qkv, o, gate_up, down per layer and the LM head
        absent=[aten.linear.default], overrides={"gemv_linears": {"backend": "triton"}}, reexport=False,
    )
    assert history["gemv_linears"].num_matches == 4 * layers + 1


def test_engine_decode_through_the_gemv_equals_hf():
    """Batch-1 decode steps have one token: every linear, the LM head included, runs the GEMV."""
    model = tiny_model("llama")
    engine = build_engine(model, device="cpu", attn_backend="torch", **{"transforms.gemv_linears.backend": "triton"})
    assert any(n.target == ops.triton_linear.default for n in engine.runner.gm.graph.nodes)
    prompt = random_prompts([9], model.config.vocab_size, seed=3)[0]
    out = engine.generate([prompt], greedy(8))[0].outputs[0].token_ids
    assert out == hf_greedy(model, prompt, 8)
