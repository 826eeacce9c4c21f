"""The fused MoE's top-k sum inside the residual add + RMSNorm after it: two ops that replace
``triton_fused_add_rmsnorm(triton_moe(...), residual)`` (placed by ``fuse_moe_sum_rmsnorm``).

``triton_moe_rows(x, topk_ids, topk_weights, w_up, w_down, ...) -> rows [T, K, H]``: ``triton_moe`` without its
last launch, the weighted expert outputs unsummed (row ``j`` of a sentinel id is never written).
``triton_moe_sum_add_rmsnorm(rows, topk_ids, num_experts, residual, weight, eps, weight_offset) -> (y, summed)``:
per token the valid rows summed in float32 and rounded once (``triton_moe``'s top-k sum), then
``triton_fused_add_rmsnorm`` of that and ``residual`` with its roundings: the same values in one launch fewer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cast_rne, next_pow2, pdl_enter, pdl_flags, tl_dtype
from .moe import moe_into
from .rmsnorm import _normalize


@triton.jit
def _moe_sum_add_rmsnorm_kernel(
    rows_ptr, ids_ptr, r_ptr, w_ptr, o_ptr, sum_ptr, H, E, top_k, stride_r, stride_o, stride_sum, eps, w_offset,
    K_PAD: tl.constexpr, BLOCK_H: tl.constexpr, HAS_OFFSET: tl.constexpr, PROD_DTYPE: tl.constexpr,
    RNE: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    j = tl.arange(0, K_PAD)
    ids = tl.load(ids_ptr + t * top_k + j, mask=j < top_k, other=-1)
    valid = (ids >= 0) & (ids < E)
    y = tl.load(rows_ptr + (t * top_k + j)[:, None] * H + cols[None, :], mask=valid[:, None] & ok[None, :], other=0.0)
    moe = cast_rne(tl.sum(y.to(tl.float32), 0), rows_ptr.dtype.element_ty, RNE).to(tl.float32)
    sum_ty = sum_ptr.dtype.element_ty
    added = (moe + tl.load(r_ptr + t * stride_r + cols, mask=ok, other=0.0).to(tl.float32)).to(sum_ty)
    tl.store(sum_ptr + t * stride_sum + cols, added, mask=ok)
    xf = added.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = _normalize(xf, rstd, w, w_offset, sum_ty, PROD_DTYPE, HAS_OFFSET)
    tl.store(o_ptr + t * stride_o + cols, out.to(o_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("autodeploy::triton_moe_rows", mutates_args=())
def triton_moe_rows(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    activation: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    limit: float | None = None,
    alpha: float | None = None,
) -> torch.Tensor:
    rows = moe_into(None, x, topk_ids, topk_weights, w_up, w_down, b_up, b_down, activation, gated, interleaved,
                    limit, alpha)
    return rows.view(x.shape[0], topk_ids.shape[1], x.shape[1])


@triton_moe_rows.register_fake
def _rows_fake(x, topk_ids, topk_weights, w_up, w_down, b_up=None, b_down=None, activation="silu", gated=True,
               interleaved=False, limit=None, alpha=None):
    return x.new_empty((x.shape[0], topk_ids.shape[1], x.shape[1]))


@torch.library.custom_op("autodeploy::triton_moe_sum_add_rmsnorm", mutates_args=())
def triton_moe_sum_add_rmsnorm(
    rows: torch.Tensor,  # [T, K, H]
    topk_ids: torch.Tensor,  # [T, K]
    num_experts: int,
    residual: torch.Tensor,  # T x H elements in any leading shape
    weight: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, k, h = rows.shape
    sum_dtype = torch.promote_types(rows.dtype, residual.dtype)
    summed = torch.empty(residual.shape, dtype=sum_dtype, device=residual.device)
    out = torch.empty(residual.shape, dtype=sum_dtype, device=residual.device)
    if t == 0:
        return out, summed
    r2 = residual.reshape(t, h)
    r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    rows = rows if rows.is_contiguous() else rows.contiguous()
    ids = topk_ids.reshape(t, k).contiguous()
    block_h = next_pow2(h)
    _moe_sum_add_rmsnorm_kernel[(t,)](
        rows, ids, r2, weight if weight.stride(-1) == 1 else weight.contiguous(), out.view(t, h), summed.view(t, h),
        h, num_experts, k, r2.stride(0), h, h, eps, float(weight_offset),
        K_PAD=next_pow2(k), BLOCK_H=block_h, HAS_OFFSET=bool(weight_offset),
        PROD_DTYPE=tl_dtype(torch.promote_types(sum_dtype, weight.dtype)),
        RNE=INTERPRET and rows.dtype == torch.bfloat16,
        num_warps=1 if INTERPRET else max(4, min(16, next_pow2(k) * block_h // 1024)), **pdl_flags(rows.device, t),
    )
    return out, summed


@triton_moe_sum_add_rmsnorm.register_fake
def _sum_fake(rows, topk_ids, num_experts, residual, weight, eps, weight_offset=0.0):
    dtype = torch.promote_types(rows.dtype, residual.dtype)
    return residual.new_empty(residual.shape, dtype=dtype), residual.new_empty(residual.shape, dtype=dtype)

