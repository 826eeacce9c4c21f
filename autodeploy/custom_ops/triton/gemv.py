"""Weight-streaming GEMV for decode-sized batches (M <= ``GEMV_MAX_TOKENS``): every weight format in one kernel.

At a few tokens a linear layer is a read of its weight and nothing else, so the kernel is built to stream the
weight at the copy bandwidth: one program owns ``BLOCK_N`` output channels, walks K in ``BLOCK_K`` steps loading a
``[BLOCK_N, BLOCK_K]`` weight tile (contiguous along K), and multiplies it on the CUDA cores against the
``[BLOCK_M, BLOCK_K]`` activations (from L2), accumulating ``[BLOCK_M, BLOCK_N, BLOCK_K]`` (one row: ``[BLOCK_N,
BLOCK_K]``) in float32 and reducing over K once at the end; or on the tensor cores (``TENSOR_CORES`` below), which
idle on padding at these M but take the multiply-adds off the CUDA cores, which is what bounds the 8- and 4-bit
formats.

Formats (``W_FMT``): 16-bit weights; fp8 and int8 (per-channel scale applied after the reduction); int4 planar
(``quant_linear.py``), whose steps live in ``gemv_int4.py``: on the CUDA cores one nibble plane at a time, on the
tensor cores one 128-long chunk at a time with the codes turned into 16-bit floats by bit operations.

fp8 keeps the op's numerics (``torch_quant_fp8_linear``): each program computes the per-token scale
``max|x| / 448`` from the whole row first (or reads it: ``x_scale``, written by x's producer, which saves every
program that pass), then rounds each activation tile to fp8 (exact in float32) before the product; the per-token
and per-channel scales multiply the sum.

With ``GLU_ACT`` set the weight is a packed gate/up projection ``[2I, K]`` and the output is
``act(gate) * up [M, I]`` (``glu.py``'s numerics: each half rounded to the output dtype, the activation computed
in float32 and rounded before the product): a program's ``BLOCK_N`` rows are ``BLOCK_N / 2`` gate rows
interleaved with their up rows, and its epilogue pairs them, so the gated activation costs no launch.

With ``TENSOR_CORES`` the product runs on the tensor cores the other way round: the weight tile is the left
operand and the activations, padded to 16 rows, the right one (``[BLOCK_N, BLOCK_K] @ [BLOCK_K, 16]``), so no
weight is multiplied on the CUDA cores: fp8 weights meet the activations rounded to fp8 (the same values the
CUDA-core path multiplies), 16-bit ones meet them as they are, int4 codes meet 16-bit activations
(``gemv_int4.py``).

With ``NORM`` (one row, 16-bit or float32 weights) ``x`` is the input of an add + RMSNorm (``rmsnorm.py``): every
program forms ``x + residual`` and its ``1 / rms`` from the whole row after the wait, normalises each activation
tile as it multiplies it (the values the add + RMSNorm launch stores, recomputed from L2), and the first program
writes the normalised row and the sum for the graph's other readers: the launch before the GEMV is gone. Each
program reads the whole row, so it pays for small linears only (``fuse_add_rmsnorm_linear`` says where).

``SPLIT_K`` programs may share a row tile's K range when the row tiles alone cannot fill the GPU; they write
float32 partials and the last to arrive (a per-tile counter it resets) adds them in split order: deterministic,
one launch, CUDA-graph safe (the counters are ``_common.split_locks``, shared with the GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..quant_linear import INT4_CHUNK, int4_group, int4_row_tile
from ._common import (
    INTERPRET, NUM_LOCKS, cast_rne, fp8_round, fp8_scale, next_pow2, pdl_enter, pdl_flags, split_k_sum, split_locks,
    tl_dtype,
)
from .gemv_int4 import int4_step, int4_tc_offset, int4_tc_offset_inputs, int4_tc_step, int4_tc_x
from .glu import ACTIVATION_CODES, _activate
from .int4_layout import int4_cols, weight_rows
from .rmsnorm import add_rmsnorm_row, normed_chunk

W_DENSE, W_FP8, W_INT8, W_INT4 = 3, 0, 1, 2  # the 8/4-bit codes are those of quant_linear.py
GEMV_MAX_TOKENS = 4  # what the kernel takes; quant_linear.py sends it fewer where it is the fastest path
NORM_MAX_K = 16384  # the longest row the add + RMSNorm prologue holds in registers
OFFSET_HOIST_CHUNKS = 16  # int4 tensor cores: chunks whose offset inputs are loaded before the chunk loop


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    tensor_cores: bool = False  # see tensor_core_gemv_ok; the padded activations take 16 rows


def gemv_config(m: int, n: int, k: int, fmt: int, device: torch.device, int4_tensor_cores: bool = True) -> GemvConfig:
    """Tiles from the shape, read off ``bench/gemv.py`` on an H100 and, for the one-token product (runs 75-77), an
    H200 (Llama-3.1-8B's linears at M = 1, 2, whole and as one rank of two holds them); the interpreter gets small
    legal tiles. ``int4_tensor_cores``: whether int4 can take the tensor-core product (``tensor_core_gemv_ok``),
    else its CUDA-core tiles."""
    if device.type != "cuda":
        return GemvConfig(8, INT4_CHUNK if fmt == W_INT4 else 64, 2 if k > 128 else 1, 1, 1)
    split = 2 if k >= 8192 and m == 1 else 1  # long rows (down_proj): two programs share a row tile
    k_cap = max(INT4_CHUNK, next_pow2(k))  # short rows (small models) take no wider step than they need
    if fmt == W_INT4 and not int4_tensor_cores:  # float32 activations, groups < 128 (run 7)
        return GemvConfig(8, min(1024, k_cap), split, 4, 3)
    if fmt == W_INT4:  # tensor cores
        if n >= 16384 and m == 1:  # gate/up-like: 64-row tiles are already ~450 programs (run 34: 33.8 us)
            return GemvConfig(64, INT4_CHUNK, 1, 4, 4, tensor_cores=True)
        if n >= 16384:  # ... at 2-4 tokens 128-row tiles over 8 warps (run 34, M = 4: 39.1 vs 54.5 us)
            return GemvConfig(128, INT4_CHUNK, 1, 8, 3, tensor_cores=True)
        if k >= 8192:  # down-like: long rows split 8 ways, 8 warps over 128 rows (run 34: 20.7 us)
            return GemvConfig(128, INT4_CHUNK, 8, 8, 3, tensor_cores=True)
        if n > k:  # qkv-like (run 34: 11.4 us)
            return GemvConfig(128, INT4_CHUNK, 8, 4, 3, tensor_cores=True)
        return GemvConfig(64, INT4_CHUNK, 4, 4, 4, tensor_cores=True)  # o-like (run 34: 9.0 us)
    if fmt == W_DENSE:
        if m == 1 and k <= 2048 and 4096 <= n <= 8192:  # short rows, 4-8K of them (run 30: TP=2 o_proj 8.8 vs 10.1 µs)
            return GemvConfig(4, 512, 1, 4, 2)
        if m == 1 and n >= 65536:  # LM heads (run 77, H200: Qwen3-MoE's 138.2 µs, its best 138.1)
            return GemvConfig(2, min(2048, k_cap), 1, 4, 1)
        if m == 1:  # the one-row product (run 77, H200, µs: Llama o 11.9 -> 10.3, gate/up 60.1 -> 55.1)
            return GemvConfig(1, min(1024, k_cap), 1, 4, 2)
        return GemvConfig(4, min(512, k_cap), 1, 4, 3)
    if m == 1 and fmt == W_FP8 and n >= 4 * k and k >= 1024:  # gate/up-like: tensor cores, 4% faster (run 20)
        return GemvConfig(128, 128, 1, 4, 4, tensor_cores=True)
    if m == 1 and fmt == W_FP8 and n > k and k >= 1024:  # qkv-like: the one-row product (run 75: 9.8 vs 11.9 µs)
        return GemvConfig(8, min(512, k_cap), 1, 4, 2)
    if m == 1 and fmt == W_FP8:  # within 3% of each linear's best in the fp8 sweep of run 14
        return GemvConfig(8, min(1024, k_cap), 1, 4, 2)
    if m == 1:  # int8
        return GemvConfig(16, min(1024 if n <= 4096 else 512, k_cap), 1, 4, 3)
    return GemvConfig(16, min(512, k_cap), 1, 4, 2)


def tensor_core_gemv_ok(fmt: int, dtype: torch.dtype, group: int = 0) -> bool:
    """Whether the tensor-core product serves these weights and activations: fp8 weights always (the
    activations are rounded to fp8), 16-bit and int8 weights with 16-bit activations (float32 ones would meet
    TF32 on the GPU, so they keep the exact CUDA-core path; the interpreter is exact either way), int4 with
    16-bit activations (its codes become 16-bit floats) and scale groups of a multiple of 128."""
    if fmt == W_FP8:
        return True
    if fmt == W_INT4:
        return dtype in (torch.bfloat16, torch.float16) and group % INT4_CHUNK == 0
    return fmt in (W_DENSE, W_INT8) and (INTERPRET or dtype in (torch.bfloat16, torch.float16))


@triton.jit
def _dense_step(acc, w, xt, x_scale, W_FMT: tl.constexpr, HW_FP8: tl.constexpr, ONE_ROW: tl.constexpr):
    """``acc [BM, BN, BK] += w [BN, BK] * xt [BM, BK]`` (x rounded to fp8 first for the fp8 format). At one row
    (``ONE_ROW``) ``acc`` is ``[BN, BK]`` in the weight tile's own layout: the tile is multiplied as it was loaded
    (16-byte loads, no trip through shared memory), 4.3 instead of 7.3 SASS instructions an fp8 weight."""
    xt = xt.to(tl.float32)
    if W_FMT == 0:
        xt = xt / x_scale[:, None]
        if HW_FP8:
            xt = xt.to(tl.float8e4nv).to(tl.float32)  # round-to-nearest, saturating (|x| <= 448 here)
        else:
            xt = fp8_round(xt)
    if ONE_ROW:  # one row: acc [BN, BK], in the weight tile's own layout
        acc = acc + w.to(tl.float32) * tl.reshape(xt, (xt.shape[1],))[None, :]
    else:
        acc = acc + w.to(tl.float32)[None, :, :] * xt[:, None, :]
    return acc


@triton.jit
def _dense_step_tc(acc, w, xt, x_scale, W_FMT: tl.constexpr, HW_FP8: tl.constexpr):
    """``acc [BN, 16] += w [BN, BK] @ xt^T`` on the tensor cores (x rounded to fp8 for the fp8 format).
    The interpreter multiplies in exact float32 the same rounded operands."""
    if W_FMT == 0:
        xs = xt.to(tl.float32) / x_scale[:, None]
        if HW_FP8:
            return tl.dot(w, tl.trans(xs.to(tl.float8e4nv)), acc)
        return tl.dot(w.to(tl.float32), tl.trans(fp8_round(xs)), acc, input_precision="ieee")
    if HW_FP8:  # on the GPU (the flag is "not the interpreter"): 16-bit operands, float32 accumulation
        return tl.dot(w.to(xt.dtype), tl.trans(xt), acc)
    return tl.dot(w.to(tl.float32), tl.trans(xt.to(tl.float32)), acc, input_precision="ieee")


@triton.jit
def _dense_acc(acc, w, x_rows, kk, k_ok, m_ok, x_scale, x_ptr, r_ptr, nw_ptr, rstd, w_offset,
               W_FMT: tl.constexpr, HW_FP8: tl.constexpr, TENSOR_CORES: tl.constexpr,
               NORM: tl.constexpr, NORM_OFFSET: tl.constexpr, NORM_PROD: tl.constexpr):
    if NORM:  # one row: x + residual normalised here, as the add + RMSNorm launch would have stored it
        row = normed_chunk(x_ptr, r_ptr, nw_ptr, kk, k_ok, rstd, w_offset, x_ptr.dtype.element_ty,
                           NORM_OFFSET, NORM_PROD)
        xt = tl.where(m_ok[:, None], row[None, :], 0.0).to(x_ptr.dtype.element_ty)
    else:
        xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    if TENSOR_CORES:
        out = _dense_step_tc(acc, w, xt, x_scale, W_FMT, HW_FP8)
    else:
        out = _dense_step(acc, w, xt, x_scale, W_FMT, HW_FP8, xt.shape[0] == 1)
    return out


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, lock_ptr,
    r_ptr, nw_ptr, normed_ptr, summed_ptr, eps, w_offset, xs_ptr,
    M, N, K, stride_xm, stride_ym, stride_wn, stride_sg, steps_per_split,
    W_FMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HW_FP8: tl.constexpr, GLU_ACT: tl.constexpr, RNE: tl.constexpr, TENSOR_CORES: tl.constexpr,
    NORM: tl.constexpr, NORM_H: tl.constexpr, NORM_OFFSET: tl.constexpr, NORM_PROD: tl.constexpr,
    X_COLS: tl.constexpr, OFFSET_CHUNKS: tl.constexpr, ROW_TILE: tl.constexpr, XS_GIVEN: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if GLU_ACT >= 0:  # rows 2i and 2i + 1 are gate row c and up row c (N / 2 + c), c = tile * BLOCK_N / 2 + i
        rows = tl.arange(0, BLOCK_N)
        cols = tile * (BLOCK_N // 2) + rows // 2
        offs_n = cols + (rows % 2) * (N // 2)
        n_ok = cols < N // 2
    else:
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    w_rows = weight_rows(w_ptr, offs_n, stride_wn, ROW_TILE)  # [BN, 1]; ROW_TILE > 1: int4 in row tiles
    k_lo = pid_k * steps_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + steps_per_split * BLOCK_K, K)  # k_lo < k_hi: every split has a step
    # (masks test K, not k_hi: a split ends on a step boundary or at K, and K keeps its divisibility hint)

    # The first step's weights are read before waiting for the previous kernel (no kernel writes them), so
    # the stream of weights starts while that kernel drains; everything else comes after pdl_enter.
    if W_FMT == 2:
        WORDS: tl.constexpr = BLOCK_K // 8
        word = tl.arange(0, WORDS)
        col_base = 128 * (word // 16) + word % 16  # k of nibble 0 of each word, within the step
        w_ok = (k_lo + 128 * (word // 16)) < K
        words = tl.load(w_rows + int4_cols(k_lo, word, ROW_TILE)[None, :], mask=n_ok[:, None] & w_ok[None, :],
                        other=0)
    else:
        kk = k_lo + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    pdl_enter(USE_PDL)

    rstd = 1.0
    if NORM:  # the add + RMSNorm of the one row, its statistics from the whole row; one program stores it
        rstd = add_rmsnorm_row(x_ptr, r_ptr, nw_ptr, normed_ptr, summed_ptr, K, eps, w_offset,
                               (tile == 0) & (pid_k == 0), NORM_H, NORM_OFFSET, NORM_PROD)
    x_scale = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    if W_FMT == 0 and XS_GIVEN:  # the per-token fp8 scale from x's producer
        x_scale = tl.load(xs_ptr + offs_m, mask=m_ok, other=1.0)
    elif W_FMT == 0:  # ... or over the whole row here
        amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kx = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_rows + kx[None, :], mask=m_ok[:, None] & (kx[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.abs(xt.to(tl.float32)))
        x_scale = fp8_scale(tl.max(amax, 1))

    if W_FMT == 2 and TENSOR_CORES:  # one 128-long chunk a step (gemv_int4.py)
        # the offset's first OFFSET_CHUNKS chunks: loads out first, their latency hidden by the loop (run 34: gate/up
        # 34.3 us with 16 chunks loaded up front, 40.3 with all 32 after the loop)
        off_x, off_s, off_z = int4_tc_offset_inputs(x_ptr, s_ptr, z_ptr, k_lo, k_hi, K, M, stride_xm, n_ok, offs_n,
                                                    stride_sg, GROUP, HAS_ZEROS, X_COLS, OFFSET_CHUNKS)
        x_chunk, s_chunk = int4_tc_x(x_ptr, s_ptr, k_lo, K, M, stride_xm, n_ok, offs_n, stride_sg, GROUP, X_COLS)
        x_next, s_next = int4_tc_x(x_ptr, s_ptr, k_lo + BLOCK_K, K, M, stride_xm, n_ok, offs_n, stride_sg, GROUP,
                                   X_COLS)
        acc = int4_tc_step(tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), words, x_chunk, s_chunk, HW_FP8)
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            words = tl.load(w_rows + int4_cols(k0, word, ROW_TILE)[None, :], mask=n_ok[:, None], other=0)
            x_chunk, s_chunk = x_next, s_next
            x_next, s_next = int4_tc_x(x_ptr, s_ptr, k0 + BLOCK_K, K, M, stride_xm, n_ok, offs_n, stride_sg, GROUP,
                                       X_COLS)
            acc = int4_tc_step(acc, words, x_chunk, s_chunk, HW_FP8)
        acc -= int4_tc_offset(off_x, off_s, off_z)
        for c0 in range(k_lo + OFFSET_CHUNKS * BLOCK_K, k_hi, OFFSET_CHUNKS * BLOCK_K):  # longer splits: the rest
            off_x, off_s, off_z = int4_tc_offset_inputs(x_ptr, s_ptr, z_ptr, c0, k_hi, K, M, stride_xm, n_ok, offs_n,
                                                        stride_sg, GROUP, HAS_ZEROS, X_COLS, OFFSET_CHUNKS)
            acc -= int4_tc_offset(off_x, off_s, off_z)
        total = tl.trans(acc)  # [BM, BN]
    elif W_FMT == 2:
        acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
        acc = int4_step(acc, words, x_rows, s_ptr, z_ptr, k_lo, K, word, col_base, w_ok, m_ok, n_ok, offs_n,
                        stride_sg, GROUP, HAS_ZEROS, BLOCK_M, BLOCK_N, WORDS)
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            w_ok = (k0 + 128 * (word // 16)) < K
            words = tl.load(w_rows + int4_cols(k0, word, ROW_TILE)[None, :], mask=n_ok[:, None] & w_ok[None, :],
                            other=0)
            acc = int4_step(acc, words, x_rows, s_ptr, z_ptr, k0, K, word, col_base, w_ok, m_ok, n_ok, offs_n,
                            stride_sg, GROUP, HAS_ZEROS, BLOCK_M, BLOCK_N, WORDS)
        total = tl.sum(acc, 2)  # [BM, BN]
    else:
        if TENSOR_CORES:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        elif BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc = _dense_acc(acc, w, x_rows, kk, k_ok, m_ok, x_scale, x_ptr, r_ptr, nw_ptr, rstd, w_offset,
                         W_FMT, HW_FP8, TENSOR_CORES, NORM, NORM_OFFSET, NORM_PROD)
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dense_acc(acc, w, x_rows, kk, k_ok, m_ok, x_scale, x_ptr, r_ptr, nw_ptr, rstd, w_offset,
                             W_FMT, HW_FP8, TENSOR_CORES, NORM, NORM_OFFSET, NORM_PROD)
        if TENSOR_CORES:
            total = tl.trans(acc)  # [BM, BN]
        elif BLOCK_M == 1:
            total = tl.reshape(tl.sum(acc, 1), (1, BLOCK_N))
        else:
            total = tl.sum(acc, 2)  # [BM, BN]

    if SPLIT_K > 1:
        last, total = split_k_sum(total, part_ptr, lock_ptr, tile, pid_k, SPLIT_K, BLOCK_M, BLOCK_N)
        if last:
            _gemv_epilogue(total, x_scale, s_ptr, b_ptr, y_ptr, tile, offs_m, offs_n, m_ok, n_ok, N, stride_ym,
                           W_FMT, HAS_BIAS, GLU_ACT, BLOCK_M, BLOCK_N, RNE)
    else:
        _gemv_epilogue(total, x_scale, s_ptr, b_ptr, y_ptr, tile, offs_m, offs_n, m_ok, n_ok, N, stride_ym,
                       W_FMT, HAS_BIAS, GLU_ACT, BLOCK_M, BLOCK_N, RNE)


@triton.jit
def _gemv_epilogue(total, x_scale, s_ptr, b_ptr, y_ptr, tile, offs_m, offs_n, m_ok, n_ok, N, stride_ym,
                   W_FMT: tl.constexpr, HAS_BIAS: tl.constexpr, GLU_ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, RNE: tl.constexpr):
    if W_FMT == 0 or W_FMT == 1:
        total = total * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if W_FMT == 0:
        total = total * x_scale[:, None]
    if HAS_BIAS:
        total = total + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ty: tl.constexpr = y_ptr.dtype.element_ty
    if GLU_ACT >= 0:
        gate, up = tl.split(tl.reshape(cast_rne(total, out_ty, RNE).to(tl.float32), (BLOCK_M, BLOCK_N // 2, 2)))
        act = cast_rne(_activate(gate, GLU_ACT), out_ty, RNE).to(tl.float32)
        cols = tile * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + cols[None, :]
        tl.store(y_ptrs, cast_rne(act * up, out_ty, RNE), mask=m_ok[:, None] & (cols < N // 2)[None, :])
    else:
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, cast_rne(total, out_ty, RNE), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class AddRmsNorm:
    """The add + RMSNorm in front of a one-row GEMV (``triton_fused_add_rmsnorm``'s arguments and outputs): the
    GEMV multiplies ``rmsnorm(x + residual)`` and one program writes ``normed`` and ``summed``."""

    residual: torch.Tensor  # [1, K], x's dtype
    weight: torch.Tensor  # [K]
    eps: float
    weight_offset: float
    normed: torch.Tensor  # [1, K] contiguous, written
    summed: torch.Tensor  # [1, K] contiguous, written


def _norm_args(norm: AddRmsNorm | None, x: torch.Tensor, fmt: int) -> tuple[tuple, dict]:
    if norm is None:
        return (x, x, x, x, 0.0, 0.0), dict(NORM=False, NORM_H=1, NORM_OFFSET=False, NORM_PROD=tl.float32)
    m, k = x.shape
    tensors = (norm.residual, norm.normed, norm.summed)
    if fmt != W_DENSE or m != 1 or k > NORM_MAX_K or any(t.dtype != x.dtype or t.shape != x.shape for t in tensors):
        raise ValueError(f"gemv with an add + RMSNorm takes one row of 16-bit or float32 weights of <= {NORM_MAX_K} "
                         f"columns, every row tensor in x's dtype and shape; got {tuple(x.shape)}, format {fmt}")
    if any(t.stride(-1) != 1 for t in (*tensors, norm.weight)):
        raise ValueError("gemv with an add + RMSNorm needs unit-stride rows")
    prod = torch.promote_types(x.dtype, norm.weight.dtype)
    args = (norm.residual, norm.weight, norm.normed, norm.summed, float(norm.eps), float(norm.weight_offset))
    return args, dict(NORM=True, NORM_H=next_pow2(k), NORM_OFFSET=bool(norm.weight_offset), NORM_PROD=tl_dtype(prod))


def gemv(
    x: torch.Tensor,  # [M, K], unit last stride, M <= GEMV_MAX_TOKENS
    fmt: int,
    weight: torch.Tensor,  # 16-bit / fp8 / int8 [N, K], or int4 planar [N, Kp/8] int32
    scales: torch.Tensor | None = None,  # [N] f32, or int4 [Gn, N]
    zeros: torch.Tensor | None = None,  # int4 [Gn, N]
    bias: torch.Tensor | None = None,  # [N]
    group_size: int = 0,
    config: GemvConfig | None = None,
    glu_activation: str | None = None,  # weight is a packed [gate; up]: returns act(gate) * up [M, N / 2]
    norm: AddRmsNorm | None = None,  # x is the add + RMSNorm's input: the product is of its output
    x_scale: torch.Tensor | None = None,  # fp8: x's per-token scales [M] f32 (max|x| / 448), from its producer
) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if m > GEMV_MAX_TOKENS:
        raise ValueError(f"gemv serves at most {GEMV_MAX_TOKENS} tokens, got {m}")
    norm_args, norm_flags = _norm_args(norm, x, fmt)
    if glu_activation is not None and (n % 2 or glu_activation not in ACTIVATION_CODES):
        raise ValueError(f"gemv with a gated activation needs an even number of weight rows (got {n}) and one "
                         f"of {sorted(ACTIVATION_CODES)} (got {glu_activation!r})")
    n_out = n if glu_activation is None else n // 2
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    group = int4_group(group_size, k) if fmt == W_INT4 else 1
    tensor_cores_ok = tensor_core_gemv_ok(fmt, x.dtype, group)
    cfg = config or gemv_config(m, n, k, fmt, x.device, tensor_cores_ok)
    if fmt == W_INT4 and cfg.block_k % INT4_CHUNK:
        raise ValueError(f"int4 gemv needs block_k to be a multiple of {INT4_CHUNK}")
    block_n = cfg.block_n if glu_activation is None else max(2, cfg.block_n)  # a gate row and its up row
    tensor_cores = cfg.tensor_cores and tensor_cores_ok
    if tensor_cores and (block_n < 16 or cfg.block_k < 16 or (fmt == W_INT4 and cfg.block_k != INT4_CHUNK)):
        raise ValueError(f"a tensor-core gemv needs tiles of at least 16 x 16 (int4: K steps of {INT4_CHUNK}), "
                         f"got {block_n} x {cfg.block_k}")
    steps = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(steps, max(1, cfg.split_k))
    split = triton.cdiv(steps, per_split)
    tiles = triton.cdiv(n, block_n)
    if split > 1 and tiles > NUM_LOCKS:
        per_split, split = steps, 1
    block_m = 16 if tensor_cores else next_pow2(m)
    part = torch.empty(split * tiles * block_m * block_n, dtype=torch.float32, device=x.device) if split > 1 else y
    locks = split_locks(x.device) if split > 1 else y
    s = scales if scales is not None else y
    _gemv_kernel[(tiles, split)](
        x, weight, s, zeros if zeros is not None else s, bias if bias is not None else s, y, part, locks, *norm_args,
        x_scale if x_scale is not None else s,
        m, n, k, x.stride(0), y.stride(0), weight.stride(0), scales.stride(0) if fmt == W_INT4 else 0, per_split,
        W_FMT=fmt, GROUP=group, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, HW_FP8=not INTERPRET,
        GLU_ACT=-1 if glu_activation is None else ACTIVATION_CODES[glu_activation],
        RNE=INTERPRET and x.dtype == torch.bfloat16, TENSOR_CORES=tensor_cores, **norm_flags, X_COLS=next_pow2(m),
        OFFSET_CHUNKS=min(OFFSET_HOIST_CHUNKS, next_pow2(per_split)), ROW_TILE=int4_row_tile(n) if fmt == W_INT4 else 1,
        num_warps=1 if INTERPRET else cfg.warps, num_stages=cfg.stages,
        XS_GIVEN=x_scale is not None, **pdl_flags(x.device, m),
    )
    return y
