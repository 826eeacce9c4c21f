"""fp8 activations made by their producer (``custom_ops/triton/fp8_activations.py``), Triton interpreter on CPU.

On CPU an fp8 linear never multiplies fp8 codes (``reads_fp8`` is CUDA-only), so the tests that check the fp8
form switch ``reads_fp8`` to "more than one row" (``torch._scaled_mm`` runs on CPU too). The 16-bit input of a
reader that reads codes is poisoned with NaN, so reading it would show.
"""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.custom_ops.quant_linear import quantize_fp8_per_token, quantize_fp8_weight
from autodeploy.custom_ops.triton import fp8_activations
from autodeploy.custom_ops.triton.glu import glu_fp8_launch
from autodeploy.custom_ops.triton.quant_linear import fp8_quantize_rows, scaled_mm_linear

ops = torch.ops.autodeploy


@pytest.fixture
def fp8_above_one_row(monkeypatch):
    monkeypatch.setattr(fp8_activations, "reads_fp8", lambda rows, k, dtype, device: rows > 1)


def _assert_quantized(codes, scales, y):
    """``(codes, scales)`` is exactly what the unfused fp8 linear's quantization kernel makes of ``y``, and (on CPU
    exactly) ``quantize_fp8_per_token(y)``: the GPU's fp32 division may put a value across a rounding boundary."""
    expected_codes, expected_scales = fp8_quantize_rows(y.reshape(-1, y.shape[-1]))
    torch.testing.assert_close(scales, expected_scales, atol=0, rtol=0)
    torch.testing.assert_close(codes.float(), expected_codes.float(), atol=0, rtol=0)
    torch_codes, torch_scales = quantize_fp8_per_token(y.reshape(-1, y.shape[-1]))
    torch.testing.assert_close(scales, torch_scales, atol=0, rtol=1e-6)
    if y.is_cuda:  # rounding to nearest-even like torch: a code one step off only where the division differs
        off = codes.float() != torch_codes.float()
        assert off.float().mean().item() < 1e-3
        torch.testing.assert_close(codes.float(), torch_codes.float(), atol=2**-9, rtol=0.125)
        return
    torch.testing.assert_close(codes.float(), torch_codes.float(), atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 200), (7, 769)])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_writes_codes_of_its_output(fp8_above_one_row, shape, residual):
    x, r = torch.randn(shape).bfloat16(), torch.randn(shape).bfloat16()
    w = (torch.rand(shape[-1]) + 0.5).bfloat16()
    if residual:
        y, summed = ops.triton_fused_add_rmsnorm(x, r, w, 1e-6)
        _, got_summed, codes, scales = ops.triton_fused_add_rmsnorm_fp8(x, r, w, 1e-6)
        torch.testing.assert_close(got_summed, summed, atol=0, rtol=0)
    else:
        y = ops.triton_rmsnorm(x, w, 1e-6)
        _, codes, scales = ops.triton_rmsnorm_fp8(x, w, 1e-6)
    _assert_quantized(codes, scales, y)


@pytest.mark.parametrize("residual", [False, True])
def test_norm_writes_16_bit_output_where_linears_read_it(residual):
    """On CPU (and at one row on the GPU) the fp8 linear reads the 16-bit output: it is the norm's, and the scales
    beside it are its per-token fp8 scales."""
    x, r, w = torch.randn(3, 96).bfloat16(), torch.randn(3, 96).bfloat16(), torch.rand(96).bfloat16()
    if residual:
        *got, _, scales = ops.triton_fused_add_rmsnorm_fp8(x, r, w, 1e-5)
        torch.testing.assert_close(tuple(got), ops.triton_fused_add_rmsnorm(x, r, w, 1e-5), atol=0, rtol=0)
        y = got[0]
    else:
        y, _, scales = ops.triton_rmsnorm_fp8(x, w, 1e-5)
        torch.testing.assert_close(y, ops.triton_rmsnorm(x, w, 1e-5), atol=0, rtol=0)
    torch.testing.assert_close(scales, fp8_quantize_rows(y)[1], atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(4, 96), (2, 3, 160)])
def test_prequant_linear_reads_codes(fp8_above_one_row, shape):
    x = torch.randn(shape).bfloat16()
    q, s = quantize_fp8_weight(torch.randn(48, shape[-1]) * 0.1)
    bias = torch.randn(48).bfloat16()
    xq, x_scale = quantize_fp8_per_token(x.reshape(-1, shape[-1]))
    got = ops.triton_quant_fp8_linear_prequant(torch.full_like(x, float("nan")), xq, x_scale, q, s, bias)
    expected = scaled_mm_linear(x.reshape(-1, shape[-1]), q, s, bias).view(*shape[:-1], 48)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_prequant_linear_reads_16_bit_at_one_row(fp8_above_one_row):
    """... and its scale only when told it was written (then exactly what the GEMV would have computed)."""
    x = torch.randn(1, 96).bfloat16()
    q, s = quantize_fp8_weight(torch.randn(32, 96) * 0.1)
    garbage = torch.randint(0, 100, (1, 96), dtype=torch.uint8).view(torch.float8_e4m3fn)
    expected = ops.triton_quant_fp8_linear(x, q, s)
    nan = torch.full((1, 1), float("nan"))
    torch.testing.assert_close(ops.triton_quant_fp8_linear_prequant(x, garbage, nan, q, s), expected, atol=0, rtol=0)
    assert ops.triton_quant_fp8_linear_prequant(x, garbage, nan, q, s, None, True).isnan().all()
    scale = fp8_quantize_rows(x)[1]
    got = ops.triton_quant_fp8_linear_prequant(x, garbage, scale, q, s, None, True)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("fp8_in", [False, True])
@pytest.mark.parametrize("quantize_output", [False, True])
def test_linear_glu_fp8_in_and_out(fp8_above_one_row, rows, fp8_in, quantize_output):
    inter = 40
    x = torch.randn(rows, 96).bfloat16()
    q, s = quantize_fp8_weight(torch.randn(2 * inter, 96) * 0.1)
    xq, x_scale = quantize_fp8_per_token(x) if fp8_in else (None, None)
    reads_codes = fp8_in and rows > 1
    x_in = torch.full_like(x, float("nan")) if reads_codes else x
    h, codes, scales = ops.triton_linear_glu_fp8(x_in, xq, x_scale, q, s, None, "silu", quantize_output)
    gate_up = scaled_mm_linear(x, q, s) if reads_codes else ops.triton_quant_fp8_linear(x, q, s)
    expected = ops.triton_glu_packed(gate_up, "silu")
    assert codes.shape == ((rows, inter) if quantize_output else (0, inter))
    if quantize_output and rows > 1:
        _assert_quantized(codes, scales, expected)
    else:
        torch.testing.assert_close(h, expected if rows > 1 else ops.triton_linear_glu(x, q, s, None, None, "fp8", 0,
                                                                                        "silu"), atol=0, rtol=0)


def test_linear_glu_fp8_reads_the_given_scale_at_one_row():
    x = torch.randn(1, 96).bfloat16()
    q, s = quantize_fp8_weight(torch.randn(80, 96) * 0.1)
    xq, x_scale = fp8_quantize_rows(x)
    expected = ops.triton_linear_glu_fp8(x, xq, x_scale, q, s, None, "silu", False)[0]
    got = ops.triton_linear_glu_fp8(x, xq, x_scale, q, s, None, "silu", False, True)[0]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    nan = torch.full_like(x_scale, float("nan"))
    assert ops.triton_linear_glu_fp8(x, xq, nan, q, s, None, "silu", False, True)[0].isnan().all()


@pytest.mark.parametrize("block", [16, 64])
def test_glu_codes_over_chunks(block):
    """The row in several chunks (the last one partial): the maximum over all of them, every chunk's codes."""
    gate_up = torch.randn(3, 2 * 40).bfloat16()
    codes = torch.empty(3, 40, dtype=torch.float8_e4m3fn)
    scales = torch.empty(3, 1)
    glu_fp8_launch(gate_up, "gelu_tanh", codes, scales, block=block)
    _assert_quantized(codes, scales, ops.triton_glu_packed(gate_up, "gelu_tanh"))


def test_opcheck():
    """Fake tensors and registration (not the outputs: a producer leaves one form unwritten, by contract, and the
    schema check multiplies outputs, which torch cannot do for float8 on CPU)."""
    checks = ("test_autograd_registration", "test_faketensor")
    x, r, w = torch.randn(3, 64).bfloat16(), torch.randn(3, 64).bfloat16(), torch.rand(64).bfloat16()
    q, s = quantize_fp8_weight(torch.randn(32, 64) * 0.1)
    xq, x_scale = quantize_fp8_per_token(x)
    torch.library.opcheck(ops.triton_rmsnorm_fp8.default, (x, w, 1e-6), test_utils=checks)
    torch.library.opcheck(ops.triton_fused_add_rmsnorm_fp8.default, (x, r, w, 1e-6), test_utils=checks)
    torch.library.opcheck(ops.triton_quant_fp8_linear_prequant.default, (x, xq, x_scale, q, s), test_utils=checks)
    torch.library.opcheck(ops.triton_linear_glu_fp8.default, (x, xq, x_scale, q, s, None, "silu", True), test_utils=checks)


# ---- fuse_fp8_act_quant ------------------------------------------------------------------------------------------
def _fp8_check(model, exclude: list[str] | None = None):
    from test_quantization import _fake_quantize  # weights on the fp8 grid: only the activations round
    from transform_harness import check_transforms

    triton = {"backend": "triton"}
    overrides = {"quantize_fp8_linear": {"quantize": "fp8", **triton, **({"exclude": exclude} if exclude else {})},
                 "fuse_glu": triton, "fuse_add_rmsnorm": triton}
    return check_transforms(
        _fake_quantize(model, "fp8"),
        ["cleanup_noop_ops", "match_rmsnorm", "match_glu", "quantize_fp8_linear", "fuse_quant_linears", "fuse_glu",
         "fuse_add_rmsnorm", "fuse_glu_linear", "fuse_fp8_act_quant"],
        overrides=overrides, atol=5e-2, rtol=5e-2, reexport=False,
    )


def _count(gm, op) -> int:
    return sum(n.target == op for n in gm.graph.nodes)


def test_transform_feeds_every_fp8_linear_but_o_proj(fp8_above_one_row):
    """The codes path on CPU (``_scaled_mm`` there) against eager: q/k/v and gate/up read the norms' codes,
    down the activation's; o_proj quantizes its own input."""
    from autodeploy.models.tiny import tiny_model

    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    gm, history = _fp8_check(model)
    assert history["fuse_fp8_act_quant"].details == {"norms": 2 * layers, "activations": layers}
    assert _count(gm, ops.triton_quant_fp8_linear_prequant.default) == 2 * layers  # q/k/v, down
    assert _count(gm, ops.triton_linear_glu_fp8.default) == layers
    assert _count(gm, ops.triton_quant_fp8_linear.default) == layers  # o_proj
    assert _count(gm, ops.triton_rmsnorm_fp8.default) + _count(gm, ops.triton_fused_add_rmsnorm_fp8.default) == 2 * layers
    assert _count(gm, ops.triton_linear_glu.default) == 0
    given = [n.args[6] for n in gm.graph.nodes if n.target == ops.triton_quant_fp8_linear_prequant.default]
    assert sorted(given) == [False] * layers + [True] * layers  # down reads the activation's codes, q/k/v the norm's
    assert all(n.args[8] for n in gm.graph.nodes if n.target == ops.triton_linear_glu_fp8.default)


def test_transform_leaves_norms_read_by_16_bit_linears():
    """q_proj left in 16 bits: the norm before q/k/v keeps its output; the MLP's norm and activation fuse."""
    from autodeploy.models.tiny import tiny_model

    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    _, history = _fp8_check(model, exclude=["*q_proj"])
    assert history["fuse_fp8_act_quant"].details == {"norms": layers, "activations": layers}


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 15, 300])
def test_llama_shapes_gpu(rows):
    """The real choice on the GPU (codes above one row), Llama-3.1-8B's widths: the norm's and the activation's
    codes are those of their 16-bit outputs, and the linears that read them compute what the unfused ones do."""
    x, r = (torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    y, summed, codes, scales = ops.triton_fused_add_rmsnorm_fp8(x, r, w, 1e-5)
    y_ref, summed_ref = ops.triton_fused_add_rmsnorm(x, r, w, 1e-5)
    torch.testing.assert_close(summed, summed_ref, atol=0, rtol=0)
    qkv_q, qkv_s = quantize_fp8_weight(torch.randn(6144, 4096, device="cuda") * 0.02)
    gu_q, gu_s = quantize_fp8_weight(torch.randn(2 * 14336, 4096, device="cuda") * 0.02)
    down_q, down_s = quantize_fp8_weight(torch.randn(4096, 14336, device="cuda") * 0.01)
    h_ref = ops.triton_linear_glu(y_ref, gu_q, gu_s, None, None, "fp8", 0, "silu")
    if rows == 1:  # the GEMV reads the 16-bit row, and the norm's scale for it
        torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
        x_in, (h, h_codes, h_scales) = y, ops.triton_linear_glu_fp8(y, codes, scales, gu_q, gu_s, None, "silu", True,
                                                                    True)
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    else:
        _assert_quantized(codes, scales, y_ref)
        x_in = torch.full_like(y, float("nan"))
        h, h_codes, h_scales = ops.triton_linear_glu_fp8(x_in, codes, scales, gu_q, gu_s, None, "silu", True)
        _assert_quantized(h_codes, h_scales, h_ref)
        h = torch.full_like(h, float("nan"))
    torch.testing.assert_close(ops.triton_quant_fp8_linear_prequant(x_in, codes, scales, qkv_q, qkv_s, None, True),
                               ops.triton_quant_fp8_linear(y_ref, qkv_q, qkv_s), atol=0, rtol=0)
    torch.testing.assert_close(ops.triton_quant_fp8_linear_prequant(h, h_codes, h_scales, down_q, down_s),
                               ops.triton_quant_fp8_linear(h_ref, down_q, down_s), atol=0, rtol=0)
