"""Triton quantized linears: ``autodeploy::triton_quant_{fp8,int8,int4}_linear`` (contract: ``custom_ops/quant_linear.py``).

One weight-streaming GEMM, ``_wq_gemm_kernel``, serves every format. It computes the output transposed, one
``[BLOCK_N, BLOCK_M]`` tile per program: ``acc += W_tile [BLOCK_N, BLOCK_K] @ x_tile^T [BLOCK_K, BLOCK_M]``, so
the dequantized weight (built in registers) is the MMA's A operand and the tokens are its N side. A decode
step (M = 1..16) then pads M only to 16 while the weight tile fills the 64-row MMA, and the kernel is a pure
weight stream: each weight byte is read once, activations come from L2.

- **int4**: one K chunk of 128 per iteration: a ``[BLOCK_N, 16]`` int32 word tile, split into eight
  ``[BLOCK_N, 16]`` K-slices by shift-and-mask (the planar packing of ``quant_linear.py``). Codes ``q`` (or
  ``q - 8`` when symmetric) are exact in 16-bit floats; each group's partial product is scaled after the MMA:
  ``acc += s * (q @ x - zero * sum(x))``, in float32, so scales and zero points never round to 16 bits.
- **int8 / fp8**: the tile is converted to the activation dtype (exact) and multiplied; the per-channel scale
  is applied once at the end. For fp8 the activation is quantized per token first (``ACT_FP8``): the program
  scans its rows once for ``max|x|`` and quantizes each tile to fp8 and back (exact) before the product —
  the same numbers ``torch._scaled_mm`` multiplies.
- **Split-K** for small M: when the output tiles cannot fill the GPU, ``SPLIT_K`` programs share a tile's K
  range, write float32 partials, and the last to finish (an atomic counter per tile, reset by that program)
  sums them in split order — deterministic, one launch, CUDA-graph safe.

Which path runs, by the number of tokens M (the thresholds are read off ``bench/gemv.py`` on an H100):

- fp8: ``M <= FP8_GEMV_MAX_TOKENS`` the weight-streaming GEMV of ``gemv.py``; above, on CUDA (16-aligned K and
  N, 16-bit activations), per-token fp8 activations from ``_fp8_rows_kernel`` and ``torch._scaled_mm`` with
  row-wise scales (Hopper fp8 tensor cores), fewer than ``SCALED_MM_MIN_ROWS`` rows zero-padded; elsewhere (CPU
  interpreter, unaligned shapes) this file's kernel.
- int4: up to ``int4_gemv_max_tokens`` the GEMV (``GEMV_MAX_TOKENS`` where its tensor-core product applies, else
  ``INT4_GEMV_MAX_TOKENS``), on CUDA the CUDA C++ one of ``cuda/int4_gemv.py`` where it applies; from
  ``DEQUANT_MIN_TOKENS`` up, on CUDA, ``dequant_linear.py`` (a dense copy of the weight, cuBLAS); between the
  two, this file's kernel.
- int8: this file's kernel at every M (it streams int8 at 1.3-1.9 TB/s from M = 1; neither the GEMV nor
  dequantize + cuBLAS beat it in the sweep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import quant_linear as _reference  # noqa: F401  (registers the torch op family)
from ..quant_linear import FP8_DTYPE, INT4_CHUNK, INT4_SLICE, int4_group, int4_row_tile
from ..cuda.int4_gemv import int4_gemv_mma_or_none
from ._common import (
    INTERPRET, NUM_LOCKS, device_sms, fp8_round, fp8_scale, mma, next_pow2, split_k_sum, split_locks, tl_dtype,
    to_fp8, upcast_dots,
)
from .dequant_linear import int4_dequant_linear
from .gemv import GEMV_MAX_TOKENS, gemv, tensor_core_gemv_ok
from .int4_layout import int4_cols, weight_rows

W_FP8, W_INT8, W_INT4 = 0, 1, 2
FP8_GEMV_MAX_TOKENS = 1  # fp8 up to here: the GEMV (H100, M=1: 117 vs 144 us a layer); above, _scaled_mm
INT4_GEMV_MAX_TOKENS = 2  # the CUDA-core int4 GEMV up to here (M=1: 112 vs 174 us a layer, M=2: 169 vs 174)
DEQUANT_MIN_TOKENS = 17  # int4 from here up (CUDA): dequantize + cuBLAS (M=64: 425 vs 655 us; M=16: 425 vs 180)
SCALED_MM_MIN_ROWS = 16  # fewer rows are zero-padded to this for torch._scaled_mm
MAX_SPLIT_K = 16


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3


def gemm_config(m: int, n: int, k: int, fmt: int, device: torch.device) -> GemmConfig:
    """Tiles from the shape: decode-sized M streams the weight with split-K; large M uses square tiles."""
    bk_int4 = INT4_CHUNK
    if device.type != "cuda":  # interpreter: smallest legal tiles, split whenever K has several chunks
        bk = bk_int4 if fmt == W_INT4 else 32
        return GemmConfig(16, 16, bk, min(3, triton.cdiv(k, bk)) if m <= 16 else 1, 4, 1)
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 256, 4, 3
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if fmt == W_INT4:
        bk = bk_int4
        stages = 4 if m <= 64 else 3
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    chunks = triton.cdiv(k, bk)
    split = 1
    if m <= 64:
        target = 3 * device_sms(device)  # programs: a few per multiprocessor keep enough loads in flight
        split = max(1, min(triton.cdiv(target, tiles), chunks // 2, MAX_SPLIT_K))
    return GemmConfig(bm, bn, bk, split, warps, stages)


# ---- kernels -----------------------------------------------------------------------------------------------------
@triton.jit
def _epilogue(
    acc, x_scale, s_ptr, b_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym,
    W_FMT: tl.constexpr, ACT_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    if W_FMT != 2:  # per-channel scale of the 8-bit formats (int4 scaled its groups already)
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if ACT_FP8:
        acc = acc * x_scale[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _wq_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym, stride_wn, stride_sg, chunks_per_split,
    W_FMT: tl.constexpr, ACT_FP8: tl.constexpr, GROUP: tl.constexpr, PLANES: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr, ROW_TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm  # [1, BLOCK_M]
    w_rows = weight_rows(w_ptr, offs_n, stride_wn, ROW_TILE)  # [BN, 1]; ROW_TILE > 1: int4 in row tiles

    x_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if ACT_FP8:  # per-token scale over the whole row (short rows: this path serves decode-sized M)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows + kk[:, None], mask=(kk[:, None] < K) & m_ok[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xt.to(tl.float32)), 0))
        x_scale = fp8_scale(amax)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_k * chunks_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + chunks_per_split * BLOCK_K, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if W_FMT == 2:
            words = tl.load(w_rows + int4_cols(k0, tl.arange(0, 16), ROW_TILE)[None, :], mask=n_ok[:, None],
                            other=0)  # [BN, 16]
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for j in tl.static_range(8):
                kk = k0 + 16 * j + tl.arange(0, 16)
                xt = tl.load(x_rows + kk[:, None], mask=(kk[:, None] < K) & m_ok[None, :], other=0.0)  # [16, BM]
                codes = (words >> (4 * j)) & 0xF
                if HAS_ZEROS:
                    wj = codes.to(DOT)
                    x_sum += tl.sum(xt.to(tl.float32), 0)
                else:
                    wj = (codes - 8).to(DOT)
                part = mma(wj, xt.to(DOT), part, False, IEEE)
                if (j + 1) % PLANES == 0:  # end of a group (or of the chunk, for groups >= 128)
                    g_off = ((k0 + 16 * (j + 1 - PLANES)) // GROUP) * stride_sg
                    s = tl.load(s_ptr + g_off + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                    if HAS_ZEROS:
                        z = tl.load(z_ptr + g_off + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                        part = part - z[:, None] * x_sum[None, :]
                        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
                    acc += part * s[:, None]
                    part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BK]
            xt = tl.load(x_rows + kk[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)  # [BK, BM]
            if ACT_FP8:  # fp8 values are exact in every 16-bit float
                xt = fp8_round(xt.to(tl.float32) / x_scale[None, :])
            acc = mma(w.to(DOT), xt.to(DOT), acc, False, IEEE)

    if SPLIT_K == 1:
        _epilogue(acc, x_scale, s_ptr, b_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym, W_FMT, ACT_FP8, HAS_BIAS)
    else:
        last, total = split_k_sum(acc, part_ptr, lock_ptr, tile, pid_k, SPLIT_K, BLOCK_N, BLOCK_M)
        if last:
            _epilogue(total, x_scale, s_ptr, b_ptr, y_ptr, offs_m, offs_n, m_ok, n_ok, stride_ym,
                      W_FMT, ACT_FP8, HAS_BIAS)


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
    """Per-token fp8 quantization of one row: ``scale = max|x| / 448``, ``q = fp8(clamp(x / scale))``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = fp8_scale(tl.max(amax, 0))
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + k0 + offs, to_fp8(x / scale), mask=k0 + offs < K)


# ---- launchers ---------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def wq_gemm(
    x: torch.Tensor,  # [M, K], unit last stride
    fmt: int,
    weight: torch.Tensor,  # fp8/int8 [N, K], or int4 planar [N, Kp/8] int32
    scales: torch.Tensor,  # [N] f32, or int4 [Gn, N]
    zeros: torch.Tensor | None = None,  # int4 [Gn, N]
    bias: torch.Tensor | None = None,  # [N]
    group_size: int = 0,
    act_fp8: bool = False,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = config or gemm_config(m, n, k, fmt, x.device)
    chunks = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(chunks, max(1, cfg.split_k))
    split = triton.cdiv(chunks, per_split)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    if split > 1 and tiles > NUM_LOCKS:
        per_split, split = chunks, 1
    part = torch.empty(split * tiles * cfg.block_n * cfg.block_m, dtype=torch.float32, device=x.device) if split > 1 else y
    locks = split_locks(x.device) if split > 1 else y
    group = int4_group(group_size, k) if fmt == W_INT4 else 0
    if fmt == W_INT4 and cfg.block_k != INT4_CHUNK:
        raise ValueError(f"int4 GEMM needs block_k == {INT4_CHUNK}")
    planes = (group // INT4_SLICE if group < INT4_CHUNK else INT4_CHUNK // INT4_SLICE) if fmt == W_INT4 else 1
    _wq_gemm_kernel[(tiles, split)](
        x, weight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y, part, locks,
        m, n, k, x.stride(0), y.stride(0), weight.stride(0), scales.stride(0) if fmt == W_INT4 else 0, per_split,
        W_FMT=fmt, ACT_FP8=act_fp8, GROUP=max(group, 1), PLANES=planes,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        DOT=tl.float32 if x.dtype == torch.float32 or upcast_dots(x.dtype) else tl_dtype(x.dtype),
        IEEE=x.dtype == torch.float32, ROW_TILE=int4_row_tile(n) if fmt == W_INT4 else 1,
        num_warps=1 if INTERPRET else cfg.warps, num_stages=cfg.stages,
    )
    return y


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq [M, K] fp8, scale [M, 1] f32)``: what ``quantize_fp8_per_token`` computes, in one launch."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(next_pow2(k), 8192)
        _fp8_rows_kernel[(m,)](x, xq, scale, k, x.stride(0), xq.stride(0), BLOCK_K=block,
                               num_warps=1 if INTERPRET else max(1, min(16, block // 512)))
    return xq, scale


def use_scaled_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    k = x.shape[1]
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and k % 16 == 0 and weight.shape[0] % 16 == 0


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[M, K] -> [M, N]``: the GEMV for few tokens, else fp8 quantization + ``torch._scaled_mm`` (or the kernel).
    ``x_scale`` ``[M, 1]``: x's per-token fp8 scales, when its producer computed them (the GEMV uses them)."""
    if x.shape[0] <= FP8_GEMV_MAX_TOKENS:
        return gemv(x, W_FP8, weight, weight_scale, None, bias, x_scale=None if x_scale is None else x_scale.view(-1))
    if use_scaled_mm(x, weight):
        return scaled_mm_linear(x, weight, weight_scale, bias)
    return wq_gemm(x, W_FP8, weight, weight_scale, None, bias, act_fp8=True)


def use_dequant(x: torch.Tensor) -> bool:
    return x.is_cuda and x.shape[0] >= DEQUANT_MIN_TOKENS and x.dtype in (torch.bfloat16, torch.float16)


def int4_gemv_max_tokens(x: torch.Tensor, group_size: int) -> int:
    """The most tokens ``int4_linear`` sends to the GEMV: its tensor-core product costs the same up to
    ``GEMV_MAX_TOKENS`` (16-bit activations, groups of a multiple of 128), the CUDA-core one grows with M."""
    if tensor_core_gemv_ok(W_INT4, x.dtype, int4_group(group_size, x.shape[-1])):
        return GEMV_MAX_TOKENS
    return INT4_GEMV_MAX_TOKENS


def int4_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, group_size: int, glu_activation: str | None = None,
) -> torch.Tensor:
    """The int4 decode GEMV: the CUDA C++ tensor-core kernel where it applies (``cuda/int4_gemv.py``), else this
    package's Triton one."""
    y = int4_gemv_mma_or_none(x, qweight, scales, zeros, bias, group_size, glu_activation)
    if y is None:
        y = gemv(x, W_INT4, qweight, scales, zeros, bias, group_size, glu_activation=glu_activation)
    return y


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
    bias: torch.Tensor | None, group_size: int,
) -> torch.Tensor:
    if x.shape[0] <= int4_gemv_max_tokens(x, group_size):
        return int4_gemv(x, qweight, scales, zeros, bias, group_size)
    if use_dequant(x):
        return int4_dequant_linear(x, qweight, scales, zeros, bias, group_size)
    return wq_gemm(x, W_INT4, qweight, scales, zeros, bias, group_size)


def scaled_mm_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token fp8 activations times the fp8 weight on ``torch._scaled_mm`` (row-wise scales, 16-aligned K, N)."""
    xq, x_scale = fp8_quantize_rows(x)
    return scaled_mm_fp8(xq, x_scale, weight, weight_scale, bias, x.dtype)


def scaled_mm_fp8(
    xq: torch.Tensor,  # [M, K] fp8 codes
    x_scale: torch.Tensor,  # [M, 1] f32
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``scaled_mm_linear`` after the activation quantization: ``[M, N]`` in ``out_dtype``."""
    m = xq.shape[0]
    if m < SCALED_MM_MIN_ROWS:  # zero codes (their scale is irrelevant) fill the rows up
        pad = SCALED_MM_MIN_ROWS - m
        codes = xq.view(torch.uint8)
        xq = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])]).view(FP8_DTYPE)
        x_scale = torch.cat([x_scale, x_scale.new_ones(pad, 1)])
    y = torch._scaled_mm(
        xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )[:m]
    if bias is not None:
        y = y + bias
    return y.to(out_dtype)


# ---- ops ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("autodeploy::triton_quant_fp8_linear", mutates_args=())
def triton_quant_fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return fp8_linear(_rows(x), weight, weight_scale, bias).view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("autodeploy::triton_quant_int8_linear", mutates_args=())
def triton_quant_int8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return wq_gemm(_rows(x), W_INT8, weight, weight_scale, None, bias).view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("autodeploy::triton_quant_int4_linear", mutates_args=())
def triton_quant_int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    group_size: int = 128,
) -> torch.Tensor:
    y = int4_linear(_rows(x), qweight, scales, zeros, bias, group_size)
    return y.view(*x.shape[:-1], qweight.shape[0])


triton_quant_fp8_linear.register_fake(_reference.fp8_linear_fake)
triton_quant_int8_linear.register_fake(_reference.int8_linear_fake)
triton_quant_int4_linear.register_fake(_reference.int4_linear_fake)
