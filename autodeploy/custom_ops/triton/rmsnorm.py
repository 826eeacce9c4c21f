"""Triton RMSNorm: ``autodeploy::triton_rmsnorm`` and ``autodeploy::triton_fused_add_rmsnorm``.

Memory-bound: one read of ``x`` (and ``residual``), one write of the output (and of the sum). Rows of up to
``MAX_ONE_PASS`` elements stay in registers (one pass); a program then takes ``BLOCK_R`` rows at once so
small hidden sizes (per-head q/k norms of 64-256) still move >= 4K elements per program. Longer rows take two
passes (sum of squares, then scale), the second re-reading ``x`` from L2. Rounding follows the reference
exactly: the residual sum is rounded to its dtype before it is normalised, and without ``weight_offset`` the
normalised row is rounded to ``x.dtype`` before the weight product, which is rounded to the product dtype.

With ``fp8_out`` (one-pass rows only) the kernel writes, instead of the output, its per-token fp8 quantization
(``quantize_fp8_per_token`` of the output as rounded to its dtype): codes and one float32 scale per row. With
``scale_out`` it writes the output and that scale alone (what the fp8 decode GEMV would compute from the row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import rmsnorm as _reference  # noqa: F401  (registers the torch op family)
from ._common import INTERPRET, cast_rne, fp8_scale, next_pow2, pdl_enter, pdl_flags, tl_dtype, to_fp8

MAX_ONE_PASS = 16384
ROW_ELEMS = 4096  # elements per program in the one-pass kernel


@triton.jit
def _normalize(xf, rstd, w, w_offset, X_DTYPE: tl.constexpr, PROD_DTYPE: tl.constexpr, HAS_OFFSET: tl.constexpr):
    normed = xf * rstd
    if HAS_OFFSET:
        y = normed * (w.to(tl.float32) + w_offset)
    else:
        y = (normed.to(X_DTYPE).to(tl.float32) * w.to(tl.float32)).to(PROD_DTYPE)
    return y


@triton.jit
def _row_sum(x_ptr, r_ptr, cols, ok, SUM_DTYPE: tl.constexpr):
    """``x + residual`` at ``cols`` of one row, rounded to ``SUM_DTYPE`` (the residual stream's dtype), as float32."""
    x = tl.load(x_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return (x + tl.load(r_ptr + cols, mask=ok, other=0.0).to(tl.float32)).to(SUM_DTYPE).to(tl.float32)


@triton.jit
def add_rmsnorm_row(x_ptr, r_ptr, w_ptr, o_ptr, sum_ptr, H, eps, w_offset, store,
                    BLOCK_H: tl.constexpr, HAS_OFFSET: tl.constexpr, PROD_DTYPE: tl.constexpr):
    """Inside another kernel (the decode GEMV's prologue): ``1 / rms`` of one row ``x + residual``, the sum rounded
    to ``sum_ptr``'s dtype first; with ``store`` the sum and the normalised row are written as
    ``_rmsnorm_rows_kernel`` writes them."""
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    sum_ty = sum_ptr.dtype.element_ty
    xf = _row_sum(x_ptr, r_ptr, cols, ok, sum_ty)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    if store:
        tl.store(sum_ptr + cols, xf.to(sum_ty), mask=ok)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        y = _normalize(xf, rstd, w, w_offset, sum_ty, PROD_DTYPE, HAS_OFFSET)
        tl.store(o_ptr + cols, y.to(o_ptr.dtype.element_ty), mask=ok)
    return rstd


@triton.jit
def normed_chunk(x_ptr, r_ptr, w_ptr, cols, ok, rstd, w_offset, OUT_DTYPE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 PROD_DTYPE: tl.constexpr):
    """Elements ``cols`` of the row ``add_rmsnorm_row`` normalised (``rstd`` from it), in ``OUT_DTYPE``: what it
    stores there, recomputed from ``x``, the residual and the weight (the sum's dtype is ``OUT_DTYPE``)."""
    xf = _row_sum(x_ptr, r_ptr, cols, ok, OUT_DTYPE)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    return _normalize(xf, rstd, w, w_offset, OUT_DTYPE, PROD_DTYPE, HAS_OFFSET).to(OUT_DTYPE)


@triton.jit
def _store_fp8_scales(y, rows, row_ok, col_ok, s_ptr):
    """``scale = max|y| / 448`` of each whole row of the float32 tile ``y [R, C]`` into ``s_ptr`` (``rows`` int64)."""
    scale = fp8_scale(tl.max(tl.where(row_ok[:, None] & col_ok[None, :], tl.abs(y), 0.0), 1))  # [R]
    tl.store(s_ptr + rows, scale, mask=row_ok)
    return scale


@triton.jit
def _store_fp8_rows(y, rows, row_ok, cols, col_ok, q_ptr, s_ptr, stride_q):
    """Per-token fp8 quantization of the float32 tile ``y [R, C]`` of whole rows (``rows`` int64): ``scale =
    max|y| / 448`` per row into ``s_ptr``, the codes ``y / scale`` into ``q_ptr`` (``_fp8_rows_kernel``'s numbers)."""
    mask = row_ok[:, None] & col_ok[None, :]
    scale = _store_fp8_scales(y, rows, row_ok, col_ok, s_ptr)
    codes = to_fp8(y / scale[:, None])
    tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], codes, mask=mask)


@triton.jit
def _rmsnorm_rows_kernel(
    x_ptr, r_ptr, w_ptr, o_ptr, sum_ptr, q_ptr, s_ptr,
    n_rows, H, stride_x, stride_r, stride_o, stride_sum, stride_q, eps, w_offset,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, X_DTYPE: tl.constexpr, PROD_DTYPE: tl.constexpr,
    FP8_OUT: tl.constexpr, SCALE_OUT: tl.constexpr, RNE: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < H)
    rows64 = rows.to(tl.int64)[:, None]
    xf = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        added = xf + tl.load(r_ptr + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        added = added.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows64 * stride_sum + cols[None, :], added, mask=mask)
        xf = added.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 1) / H + eps)  # [BLOCK_R]
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0)
    y = _normalize(xf, rstd[:, None], w[None, :], w_offset, X_DTYPE, PROD_DTYPE, HAS_OFFSET)
    if FP8_OUT:
        y16 = cast_rne(y, o_ptr.dtype.element_ty, RNE).to(tl.float32)
        _store_fp8_rows(y16, rows.to(tl.int64), rows < n_rows, cols, cols < H, q_ptr, s_ptr, stride_q)
    else:
        y_out = y.to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + rows64 * stride_o + cols[None, :], y_out, mask=mask)
        if SCALE_OUT:  # from the row as stored, as its reader would compute it
            _store_fp8_scales(y_out.to(tl.float32), rows.to(tl.int64), rows < n_rows, cols < H, s_ptr)


@triton.jit
def _rmsnorm_long_kernel(
    x_ptr, r_ptr, w_ptr, o_ptr, sum_ptr,
    H, stride_x, stride_r, stride_o, stride_sum, eps, w_offset,
    BLOCK_H: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, X_DTYPE: tl.constexpr, PROD_DTYPE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    sq = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        c = start + cols
        m = c < H
        xf = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            added = (xf + tl.load(r_ptr + row * stride_r + c, mask=m, other=0.0).to(tl.float32))
            added = added.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * stride_sum + c, added, mask=m)
            xf = added.to(tl.float32)
        sq += xf * xf
    rstd = tl.rsqrt(tl.sum(sq, 0) / H + eps)
    if HAS_RESIDUAL:
        src_ptr = sum_ptr
        src_stride = stride_sum
    else:
        src_ptr = x_ptr
        src_stride = stride_x
    for start in range(0, H, BLOCK_H):
        c = start + cols
        m = c < H
        xf = tl.load(src_ptr + row * src_stride + c, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + c, mask=m, other=0.0)
        y = _normalize(xf, rstd, w, w_offset, X_DTYPE, PROD_DTYPE, HAS_OFFSET)
        tl.store(o_ptr + row * stride_o + c, y.to(o_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # [R, H]
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rmsnorm_launch(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
    weight_offset: float,
    out: torch.Tensor,  # [..., H] contiguous
    residual: torch.Tensor | None = None,  # [..., H]
    summed: torch.Tensor | None = None,  # [..., H] contiguous, receives x + residual
    max_one_pass: int = MAX_ONE_PASS,
    fp8_out: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([R, H] fp8, [R, 1] f32) written instead of out
    scale_out: torch.Tensor | None = None,  # [R, 1] f32, written with out
) -> None:
    """Normalise ``x`` (or ``x + residual``, also written to ``summed``) into ``out``, or its fp8 codes and
    scales into ``fp8_out``, or ``out`` and its fp8 scales into ``scale_out`` (the last two: rows of up to
    ``max_one_pass`` elements)."""
    h = x.shape[-1]
    x2, o2 = _rows(x), out.view(-1, h)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    has_res = residual is not None
    r2 = _rows(residual) if has_res else x2
    s2 = summed.view(-1, h) if has_res else o2
    norm_dtype = s2.dtype if has_res else x.dtype
    flags = dict(
        HAS_RESIDUAL=has_res,
        HAS_OFFSET=bool(weight_offset),
        X_DTYPE=tl_dtype(norm_dtype),
        PROD_DTYPE=tl_dtype(torch.promote_types(norm_dtype, weight.dtype)),
        **pdl_flags(x.device, n_rows),
    )
    args = (x2, r2, weight, o2, s2)
    block_h = next_pow2(h)
    if (fp8_out is not None or scale_out is not None) and block_h > max_one_pass:
        raise ValueError(f"rmsnorm: fp8 output needs rows of at most {max_one_pass} elements, got {h}")
    if block_h <= max_one_pass:
        q2, scales = fp8_out if fp8_out is not None else (o2, scale_out if scale_out is not None else o2)
        block_r = max(1, min(ROW_ELEMS // block_h, next_pow2(n_rows)))
        warps = 1 if INTERPRET else max(1, min(16, block_r * block_h // 512))
        _rmsnorm_rows_kernel[(triton.cdiv(n_rows, block_r),)](
            *args, q2, scales, n_rows, h, x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0), q2.stride(0),
            eps, float(weight_offset), BLOCK_R=block_r, BLOCK_H=block_h, **flags, FP8_OUT=fp8_out is not None,
            SCALE_OUT=scale_out is not None, RNE=INTERPRET and o2.dtype == torch.bfloat16, num_warps=warps,
        )
    else:
        block_h = min(block_h, max_one_pass)
        _rmsnorm_long_kernel[(n_rows,)](
            *args, h, x2.stride(0), r2.stride(0), o2.stride(0), s2.stride(0), eps, float(weight_offset),
            BLOCK_H=block_h, **flags, num_warps=1 if INTERPRET else 8,
        )


@torch.library.custom_op("autodeploy::triton_rmsnorm", mutates_args=())
def triton_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    rmsnorm_launch(x, weight, eps, weight_offset, out)
    return out


@triton_rmsnorm.register_fake
def _triton_rmsnorm_fake(x, weight, eps, weight_offset=0.0, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.custom_op("autodeploy::triton_fused_add_rmsnorm", mutates_args=())
def triton_fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    rmsnorm_launch(x, weight, eps, weight_offset, out, residual=residual, summed=summed)
    return out, summed


@triton_fused_add_rmsnorm.register_fake
def _triton_fused_add_rmsnorm_fake(x, residual, weight, eps, weight_offset=0.0):
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=sum_dtype), x.new_empty(x.shape, dtype=sum_dtype)
