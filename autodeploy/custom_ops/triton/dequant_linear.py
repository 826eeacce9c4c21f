"""int4 linears for prefill-sized batches: dequantize the weight to 16 bits, then one cuBLAS GEMM.

From some tens of tokens up a linear layer is compute-bound, and the tensor cores run a dense 16-bit GEMM far
faster than a kernel that unpacks codes inside its main loop. Writing the dense weight once per call costs about
one more read and write of it (``bench/gemv.py`` measures where that pays off).

``int4_dequantize`` writes ``(q - zero) * scale`` (float32, rounded once to the output dtype; zero 8 when
symmetric) from the planar layout in one launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..quant_linear import INT4_CHUNK, int4_group, int4_row_tile
from ._common import INTERPRET
from .int4_layout import int4_cols, weight_rows

_MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # float bits of 2^23


@triton.jit
def _int4_dequant_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sg, stride_wn,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
    ROW_TILE: tl.constexpr,
):
    WORDS: tl.constexpr = CHUNKS * 16
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    n_ok = offs_n < N
    k_base = 128 * (word // 16) + word % 16  # k of nibble 0
    words = tl.load(weight_rows(q_ptr, offs_n, stride_qn, ROW_TILE) + int4_cols(0, word, ROW_TILE)[None, :],
                    mask=n_ok[:, None] & (k_base < K)[None, :], other=0)
    for j in tl.static_range(8):
        kk = k_base + 16 * j
        ok = n_ok[:, None] & (kk < K)[None, :]
        s_off = (kk // GROUP)[None, :] * stride_sg + offs_n[:, None]
        s = tl.load(s_ptr + s_off, mask=ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + s_off, mask=ok, other=0.0).to(tl.float32)
        else:
            z = 8.0
        codes = (((words >> (4 * j)) & 0xF) | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0
        tl.store(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + kk[None, :],
                 ((codes - z) * s).to(w_ptr.dtype.element_ty), mask=ok)


def int4_dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``W [N, k]`` in ``dtype`` from the planar layout (``quant_linear.py``), one launch."""
    n = qweight.shape[0]
    w = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if n == 0 or k == 0:
        return w
    block_n, chunks = (4, 1) if INTERPRET else (16, 2)
    grid = (triton.cdiv(n, block_n), triton.cdiv(triton.cdiv(k, INT4_CHUNK), chunks))
    _int4_dequant_kernel[grid](
        qweight, scales, zeros if zeros is not None else scales, w, n, k,
        qweight.stride(0), scales.stride(0), w.stride(0),
        GROUP=int4_group(group_size, k), HAS_ZEROS=zeros is not None, BLOCK_N=block_n, CHUNKS=chunks,
        ROW_TILE=int4_row_tile(n), num_warps=1 if INTERPRET else 4,
    )
    return w


def int4_dequant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, group_size: int,
) -> torch.Tensor:
    """``[M, K] -> [M, N]`` of ``torch_quant_int4_linear`` through a dense copy of the weight."""
    return F.linear(x, int4_dequantize(qweight, scales, zeros, group_size, x.shape[1], x.dtype), bias)

