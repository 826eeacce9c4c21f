"""``autodeploy::triton_linear_glu`` (the gated activation in the GEMV's epilogue) and ``fuse_glu_linear``
(Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.custom_ops.quant_linear import quantize_fp8_weight, quantize_int4_weight
from autodeploy.custom_ops.triton.gemv import GemvConfig, W_DENSE, gemv
from autodeploy.models.tiny import tiny_model
from engine_utils import build_engine, greedy, hf_greedy, random_prompts
from transform_harness import check_transforms

ops = torch.ops.autodeploy
ACTIVATIONS = ["silu", "gelu_tanh", "relu2"]


def _weights(fmt: str, w: torch.Tensor, bias: torch.Tensor | None):
    """(linear op, its arguments after x, triton_linear_glu's weight arguments, the torch reference linear)."""
    if fmt == "dense":
        return ops.triton_linear, (w, bias), (w, None, None, bias, "dense", 0), torch.nn.functional.linear
    if fmt == "fp8":
        q, s = quantize_fp8_weight(w, per_channel=True)
        return (ops.triton_quant_fp8_linear, (q, s, bias), (q, s, None, bias, "fp8", 0),
                lambda x, *_: ops.torch_quant_fp8_linear(x, q, s, bias))
    q, s, z = quantize_int4_weight(w, 32, False)
    return (ops.triton_quant_int4_linear, (q, s, z, bias, 32), (q, s, z, bias, "int4", 32),
            lambda x, *_: ops.torch_quant_int4_linear(x, q, s, z, bias, 32))


@pytest.mark.parametrize("fmt", ["dense", "fp8", "int4"])
@pytest.mark.parametrize("shape", [(1, 1, 200), (2, 200), (3, 5, 200)])  # the fused GEMV (1-2 rows), the two ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_glu_equals_linear_then_glu(fmt, shape, dtype):
    inter = 43  # odd: the last program's gate/up pair is partly masked
    x = torch.randn(shape).to(dtype)
    w, bias = (torch.randn(2 * inter, 200) * 0.1).to(dtype), torch.randn(2 * inter).to(dtype)
    if fmt != "dense":
        w, bias = w.float(), (bias if fmt == "fp8" else None)
    linear, linear_args, glu_args, reference = _weights(fmt, w, bias)
    for activation in ACTIVATIONS if fmt == "dense" else ["silu"]:
        got = ops.triton_linear_glu(x, *glu_args, activation)
        two_ops = ops.triton_glu_packed(linear(x, *linear_args), activation)
        assert got.shape == (*shape[:-1], inter) and got.dtype == dtype
        torch.testing.assert_close(got, two_ops, atol=0, rtol=0)  # same sums, same roundings
        expected = ops.torch_glu_packed(reference(x.float(), w.float(), None if bias is None else bias.float()),
                                        activation)
        tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
        torch.testing.assert_close(got.float(), expected.float(), **tol)


@pytest.mark.parametrize(
    "config", [GemvConfig(1, 64, 1, 1, 1), GemvConfig(4, 128, 3, 1, 1), GemvConfig(16, 64, 2, 4, 1, True)]
)
def test_gemv_glu_tiles(config):
    """One output column a program (a block of one row widens to a gate/up pair), and split-K."""
    x, w = torch.randn(2, 300), torch.randn(34, 300) * 0.1
    torch.testing.assert_close(gemv(x, W_DENSE, w, config=config, glu_activation="silu"),
                               ops.torch_glu_packed(x @ w.t(), "silu"), atol=2e-5, rtol=2e-5)


def test_gemv_glu_refuses_odd_rows_and_unknown_activations():
    with pytest.raises(ValueError, match="even number of weight rows"):
        gemv(torch.randn(1, 64), W_DENSE, torch.randn(7, 64), glu_activation="silu")
    with pytest.raises(ValueError, match="even number of weight rows"):
        gemv(torch.randn(1, 64), W_DENSE, torch.randn(8, 64), glu_activation="swish")


def test_linear_glu_opcheck():
    args = (torch.randn(1, 64), torch.randn(24, 64), None, None, torch.randn(24), "dense", 0, "silu")
    torch.library.opcheck(ops.triton_linear_glu.default, args)


def test_transform_fuses_every_mlp():
    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    triton = {"backend": "triton"}
    _, history = check_transforms(
        model, ["cleanup_noop_ops", "match_glu", "fuse_parallel_linears", "fuse_glu", "gemv_linears",
                "fuse_glu_linear"],
        present={ops.triton_linear_glu.default: layers, ops.triton_linear.default: 3 * layers + 1},
        absent=[ops.triton_glu_packed.default], overrides={"fuse_glu": triton, "gemv_linears": triton},
        reexport=False,
    )
    assert history["fuse_glu_linear"].num_matches == layers


def test_engine_decode_through_the_fused_mlp_equals_hf():
    """Decode steps run the fused GEMV; greedy tokens equal HF's. (fp8 and int4 differ only in the GEMV's
    weight format, tested against the two ops above.)"""
    model = tiny_model("llama")
    triton = {f"transforms.{name}.backend": "triton" for name in ("fuse_glu", "gemv_linears")}
    engine = build_engine(model, device="cpu", attn_backend="torch", **triton)
    assert any(n.target == ops.triton_linear_glu.default for n in engine.runner.gm.graph.nodes)
    prompt = random_prompts([9], model.config.vocab_size, seed=5)[0]
    assert engine.generate([prompt], greedy(8))[0].outputs[0].token_ids == hf_greedy(model, prompt, 8)


@pytest.mark.parametrize("formats,fused", [(None, 1), (["dense", "int4"], 0)])  # default: every format
def test_transform_fuses_only_the_configured_formats(formats, fused):
    from test_quantization import _fake_quantize  # weights on the fp8 grid: only the activations round

    model = _fake_quantize(tiny_model("llama"), "fp8")
    layers = model.config.num_hidden_layers
    triton = {"backend": "triton"}
    overrides = {"quantize_fp8_linear": {"quantize": "fp8", **triton},
                 "fuse_glu": triton, **({"fuse_glu_linear": {"formats": formats}} if formats else {})}
    _, history = check_transforms(
        model, ["cleanup_noop_ops", "match_glu", "quantize_fp8_linear", "fuse_quant_linears", "fuse_glu",
                "fuse_glu_linear"],
        present={ops.triton_linear_glu.default: fused * layers}, overrides=overrides, atol=3e-2, rtol=3e-2,
        reexport=False,
    )
    assert history["fuse_glu_linear"].num_matches == fused * layers
