"""The CUDA C++ int4 GEMV (``custom_ops/cuda/int4_gemv.py``, NVRTC-compiled, needs a GPU) against the torch
reference and the Triton GEMV, on fresh random inputs: odd sizes, zero points or none, bias, both 16-bit dtypes,
groups of 128 and 256, the gated gate/up product, 1-4 tokens; and what it does not take. On CPU: the layout
addressing its source hard-codes, against ``quant_linear.py``'s packing."""

from __future__ import annotations

import pytest
import torch

from autodeploy.custom_ops.quant_linear import pack_int4, quantize_int4_weight

ops = torch.ops.autodeploy


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("n", [128, 192])
def test_int4_codes_sit_where_the_cuda_gemv_reads_them(n):
    """``int4_gemv_mma.cu``'s addressing (``run_codes``, ``CHUNK_WORDS``): word w of chunk c of row r is word
    ``(r // 64) 64 stride + (r % 64) 16 + 1024 c + w`` of the tensor, and its nibble j is code
    ``[r, 128 c + 16 j + w]``; rows 8 apart (a lane's two runs) and the up half of a gate/up pair alike."""
    k = 300
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    words = pack_int4(codes).flatten()
    stride = words.numel() // n
    r, c, w, j = torch.meshgrid(torch.arange(n), torch.arange(stride // 16), torch.arange(16), torch.arange(8),
                                indexing="ij")
    address = (r // 64) * 64 * stride + (r % 64) * 16 + 1024 * c + w
    kk = 128 * c + 16 * j + w
    read = (words[address] >> (4 * j)) & 0xF
    padded = torch.zeros((n, stride * 8), dtype=torch.int32)
    padded[:, :k] = codes
    assert torch.equal(read, padded[r, kk])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group,symmetric", [(128, False), (256, True)])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 6144), (2, 776, 192), (3, 14336, 128), (4, 296, 64), (1, 2200, 320)])
def test_int4_gemv_mma_matches_reference(dtype, group, symmetric, m, k, n):
    from autodeploy.custom_ops.cuda.int4_gemv import int4_gemv_mma, mma_gemv_applies

    x = torch.randn(m, k, device="cuda").to(dtype)
    q, s, z = quantize_int4_weight(torch.randn(n, k, device="cuda") * k**-0.5, group, symmetric)
    bias = None if symmetric else torch.randn(n, device="cuda").to(dtype)
    assert mma_gemv_applies(x, q, s, z, group)
    got = int4_gemv_mma(x, q, s, z, bias, group)
    ref = ops.torch_quant_int4_linear(x.float(), q, s, z, None if bias is None else bias.float(), group)
    assert got.dtype == dtype and got.shape == (m, n)
    assert _rel_err(got, ref) < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,inter", [(1, 4096, 1024), (3, 640, 32), (2, 296, 96), (1, 300, 64)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_int4_gemv_mma_gated(dtype, m, k, inter, activation):
    """``act(gate) * up`` of a packed [gate; up] weight, each half rounded to x's dtype as ``glu.py`` does."""
    from autodeploy.custom_ops.cuda.int4_gemv import int4_gemv_mma

    x = torch.randn(m, k, device="cuda").to(dtype)
    q, s, z = quantize_int4_weight(torch.randn(2 * inter, k, device="cuda") * k**-0.5, 128)
    both = ops.torch_quant_int4_linear(x.float(), q, s, z, None, 128).to(dtype).float()
    act = torch.nn.functional.silu if activation == "silu" else (
        lambda t: torch.nn.functional.gelu(t, approximate="tanh"))
    ref = act(both[:, :inter]).to(dtype).float() * both[:, inter:]
    got = int4_gemv_mma(x, q, s, z, None, 128, glu_activation=activation)
    assert got.shape == (m, inter)
    assert _rel_err(got, ref) < 1e-2


@pytest.mark.gpu
def test_int4_linear_takes_the_mma_gemv_unless_told_not_to(monkeypatch):
    """The op the graph holds sends few tokens to the CUDA GEMV (bitwise its output), and with
    ``AUTODEPLOY_INT4_GEMV=triton`` to the Triton GEMV (bitwise that one's); the two agree to bf16 rounding."""
    import autodeploy.custom_ops.triton  # noqa: F401
    from autodeploy.custom_ops.cuda.int4_gemv import int4_gemv_mma
    from autodeploy.custom_ops.triton.gemv import W_INT4, gemv

    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    q, s, z = quantize_int4_weight(torch.randn(1024, 4096, device="cuda") * 4096**-0.5, 128)
    cuda_out = ops.triton_quant_int4_linear(x, q, s, z, None, 128)
    assert torch.equal(cuda_out, int4_gemv_mma(x, q, s, z, None, 128))
    monkeypatch.setenv("AUTODEPLOY_INT4_GEMV", "triton")
    triton_out = ops.triton_quant_int4_linear(x, q, s, z, None, 128)
    assert torch.equal(triton_out, gemv(x, W_INT4, q, s, z, None, 128))
    assert _rel_err(cuda_out, triton_out) < 4e-3


@pytest.mark.gpu
def test_int4_gemv_mma_refuses_what_it_does_not_take():
    """Rows not in 64-row tiles, float32 activations, more tokens than the MMA's share, token rows that are not
    16-byte aligned: the Triton GEMV's."""
    from autodeploy.custom_ops.cuda.int4_gemv import int4_gemv_mma, mma_gemv_applies

    q, s, z = quantize_int4_weight(torch.randn(83, 256, device="cuda"), 128)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    assert not mma_gemv_applies(x, q, s, z, 128)
    with pytest.raises(ValueError, match="does not take"):
        int4_gemv_mma(x, q, s, z, None, 128)
    q, s, z = quantize_int4_weight(torch.randn(64, 256, device="cuda"), 128)
    assert mma_gemv_applies(x, q, s, z, 128)
    assert not mma_gemv_applies(x.float(), q, s, z, 128)
    assert not mma_gemv_applies(torch.randn(5, 256, device="cuda", dtype=torch.bfloat16), q, s, z, 128)
    assert not mma_gemv_applies(torch.randn(2, 260, device="cuda", dtype=torch.bfloat16)[:, :256], q, s, z, 128)
