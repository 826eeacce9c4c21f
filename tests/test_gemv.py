"""The decode GEMV and the int4 dequantize kernel (Triton interpreter on CPU) against the torch references."""

from __future__ import annotations

import pytest
import torch

import autodeploy.custom_ops.triton  # noqa: F401  (registers the triton ops; the interpreter runs them on CPU)
from autodeploy.custom_ops.quant_linear import (
    dequantize_int4,
    quantize_fp8_weight,
    quantize_int4_weight,
    quantize_int8_weight,
)
from autodeploy.custom_ops.triton.gemv import W_DENSE, W_FP8, W_INT4, W_INT8, GemvConfig, gemv, gemv_config
from autodeploy.custom_ops.triton.dequant_linear import int4_dequant_linear, int4_dequantize

ops = torch.ops.autodeploy
SHAPES = [(1, 200, 83), (3, 576, 40), (4, 300, 17)]  # (tokens, in, out): odd sizes, K not a multiple of 128
CONFIGS = [None, GemvConfig(4, 128, 3, 1, 1)]  # the CPU default, and a split-K one with several row tiles
TENSOR_CORE_CONFIGS = [GemvConfig(16, 64, 1, 4, 1, True), GemvConfig(32, 128, 2, 4, 1, True)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("config", CONFIGS + TENSOR_CORE_CONFIGS)
def test_gemv_8_and_16_bit_weights(m, k, n, config):
    x = torch.randn(m, k) * 2
    w = torch.randn(n, k) * 0.05
    bias = torch.randn(n)
    torch.testing.assert_close(gemv(x, W_DENSE, w, bias=bias, config=config), x @ w.t() + bias, atol=2e-5, rtol=2e-5)
    q, s = quantize_fp8_weight(w, per_channel=m != 3)
    torch.testing.assert_close(gemv(x, W_FP8, q, s, bias=bias, config=config),
                               ops.torch_quant_fp8_linear(x, q, s, bias), atol=2e-5, rtol=2e-5)
    q, s = quantize_int8_weight(w)
    torch.testing.assert_close(gemv(x, W_INT8, q, s, config=config), ops.torch_quant_int8_linear(x, q, s),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "group,symmetric,config",
    [(128, False, CONFIGS[0]), (16, False, CONFIGS[0]), (32, True, CONFIGS[1]), (64, False, CONFIGS[1]),
     (-1, True, CONFIGS[0]), (256, False, CONFIGS[1])],
)
def test_gemv_int4(group, symmetric, config):
    for m, k, n in SHAPES + [(2, 300, 64)]:  # N = 64: one 64-row tile
        x = torch.randn(m, k)
        q, s, z = quantize_int4_weight(torch.randn(n, k) * 0.05, group, symmetric)
        bias = torch.randn(n) if symmetric else None
        torch.testing.assert_close(gemv(x, W_INT4, q, s, z, bias, group, config=config),
                                   ops.torch_quant_int4_linear(x, q, s, z, bias, group), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "group,symmetric,config",
    [(128, False, GemvConfig(16, 128, 1, 4, 1, True)), (256, True, GemvConfig(32, 128, 3, 4, 1, True)),
     (-1, False, GemvConfig(16, 128, 2, 4, 1, True))],
)
def test_gemv_int4_tensor_cores(dtype, group, symmetric, config):
    """The tensor-core int4 product (codes as 16-bit floats, offset and zero point removed in float32): every
    token count, K not a multiple of 128, split-K, a gated pair of projections; K = 2200 (no split) has more
    chunks than the offset loads up front (16), so the rest of its offset is summed after the chunk loop."""
    for m, k, n in SHAPES + [(1, 2200, 16), (2, 300, 64)]:  # N = 64: rows in one 64-row tile
        x = torch.randn(m, k).to(dtype)
        q, s, z = quantize_int4_weight(torch.randn(n, k) * 0.05, group, symmetric)
        bias = torch.randn(n) if symmetric else None
        torch.testing.assert_close(gemv(x, W_INT4, q, s, z, bias, group, config=config).float(),
                                   ops.torch_quant_int4_linear(x.float(), q, s, z, bias, group), atol=1e-2, rtol=1e-2)
    x = torch.randn(2, 300).to(dtype)
    q, s, z = quantize_int4_weight(torch.randn(2 * 64, 300) * 0.05, 128)  # gate rows and up rows in 64-row tiles
    up = ops.torch_quant_int4_linear(x.float(), q, s, z, None, 128).to(dtype).float()
    ref = (torch.nn.functional.silu(up[:, :64]).to(dtype).float() * up[:, 64:]).to(dtype)
    out = gemv(x, W_INT4, q, s, z, None, 128, config=config, glu_activation="silu")
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt", [W_DENSE, W_FP8, W_INT4])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 24), (2, 576, 40), (1, 8320, 16)])
def test_gemv_gpu_tiles(fmt, m, k, n):
    """The tiles ``gemv_config`` picks on CUDA (GPU-sized steps, split-K for long rows), run by the interpreter;
    int4 with float32 activations takes its CUDA-core tiles, with bfloat16 ones the tensor-core tiles."""
    config = gemv_config(m, n, k, fmt, torch.device("cuda"), int4_tensor_cores=False)
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.05
    if fmt == W_DENSE:
        out, ref = gemv(x, fmt, w, config=config), x @ w.t()
    elif fmt == W_FP8:
        q, s = quantize_fp8_weight(w)
        out, ref = gemv(x, fmt, q, s, config=config), ops.torch_quant_fp8_linear(x, q, s)
    else:
        q, s, z = quantize_int4_weight(w, 128)
        out, ref = gemv(x, fmt, q, s, z, None, 128, config=config), ops.torch_quant_int4_linear(x, q, s, z, None, 128)
        assert not config.tensor_cores
        tc_config = gemv_config(m, n, k, fmt, torch.device("cuda"))
        assert tc_config.tensor_cores
        xb = x.bfloat16()
        torch.testing.assert_close(gemv(xb, fmt, q, s, z, None, 128, config=tc_config).float(),
                                   ops.torch_quant_int4_linear(xb.float(), q, s, z, None, 128), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("k,n,tensor_cores", [(1024, 4160, True), (1024, 1600, False)])
def test_gemv_fp8_cuda_tiles(k, n, tensor_cores):
    """The tiles ``gemv_config`` picks for fp8 at one token on CUDA: gate/up-like shapes on the tensor cores,
    qkv-like ones on the CUDA cores (the one-row product)."""
    config = gemv_config(1, n, k, W_FP8, torch.device("cuda"))
    assert config.tensor_cores == tensor_cores
    x, w = torch.randn(1, k), torch.randn(n, k) * 0.05
    q, s = quantize_fp8_weight(w)
    torch.testing.assert_close(gemv(x, W_FP8, q, s, config=config), ops.torch_quant_fp8_linear(x, q, s),
                               atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("config", [None, TENSOR_CORE_CONFIGS[1]])
def test_gemv_bfloat16_activations(config):
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    w = torch.randn(48, 256) * 0.05
    q, s = quantize_fp8_weight(w)
    out = gemv(x, W_FP8, q, s, config=config)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ops.torch_quant_fp8_linear(x, q, s).float(), atol=2e-2, rtol=2e-2)
    w16 = w.to(torch.bfloat16)
    out = gemv(x, W_DENSE, w16, config=config)
    torch.testing.assert_close(out.float(), (x.float() @ w16.float().t()), atol=2e-2, rtol=2e-2)


def test_gemv_tensor_cores_need_16_wide_tiles():
    with pytest.raises(ValueError, match="16 x 16"):
        gemv(torch.randn(1, 64), W_DENSE, torch.randn(8, 64), config=GemvConfig(8, 64, 1, 4, 1, True))


def test_gemv_refuses_too_many_tokens():
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.randn(5, 16), W_DENSE, torch.randn(8, 16))


@pytest.mark.parametrize("group,symmetric", [(128, False), (32, True), (-1, False)])
def test_int4_dequantize_equals_reference(group, symmetric):
    for k, n in [(200, 83), (576, 40), (300, 64)]:  # N = 64: rows in one 64-row tile
        q, s, z = quantize_int4_weight(torch.randn(n, k), group, symmetric)
        ref = dequantize_int4(q, s, z, group, k)
        assert torch.equal(int4_dequantize(q, s, z, group, k, torch.float32), ref)
        # bfloat16: one rounding of the float32 value (the interpreter may round the last bit differently)
        torch.testing.assert_close(int4_dequantize(q, s, z, group, k, torch.bfloat16), ref.bfloat16(),
                                   atol=0, rtol=2**-7)


def test_dequantized_int4_linear_matches_reference():
    """The int4 prefill path (CUDA picks it from ``DEQUANT_MIN_TOKENS`` tokens up) on CPU, float32."""
    x = torch.randn(70, 200)
    w = torch.randn(40, 200) * 0.05
    bias = torch.randn(40)
    q, s, z = quantize_int4_weight(w, 64, False)
    torch.testing.assert_close(int4_dequant_linear(x, q, s, z, bias, 64),
                               ops.torch_quant_int4_linear(x, q, s, z, bias, 64), atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(28672, 4096), (6144, 4096), (4096, 14336)])
def test_gemv_llama_shapes_gpu(n, k):
    """The tiles ``gemv_config`` picks (the tensor-core product for fp8 gate/up and for int4, the one-row one for the
    others) and an explicit tensor-core config for bf16 weights, against the references."""
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * k**-0.5
    q, s = quantize_fp8_weight(w)
    got = gemv(x, W_FP8, q, s).float()
    ref = ops.torch_quant_fp8_linear(x.float(), q, s)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
    w16 = w.to(torch.bfloat16)
    got = gemv(x, W_DENSE, w16, config=GemvConfig(64, 128, 2, 4, 3, tensor_cores=True)).float()
    ref = x.float() @ w16.float().t()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
    q, s, z = quantize_int4_weight(w, 128)
    for m in (1, 2, 4):  # the tensor-core product gemv_config picks, token columns repeated across the MMA's 16
        xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        got = gemv(xm, W_INT4, q, s, z, None, 128).float()
        ref = ops.torch_quant_int4_linear(xm.float(), q, s, z, None, 128)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-2
