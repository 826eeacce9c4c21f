"""Writing a step's new keys and values into the paged KV pools (the first launch of every cached-attention call).

``_kv_write_kernel``, grid ``(T, Nkv / BLOCK_H)``: token ``t``'s rows go to flat slot ``slot_mapping[t]``
(``block * page + offset``); a negative slot (CUDA-graph padding) is skipped. Float8 pools receive
``k / kv_scale`` rounded to nearest and saturated, exactly as ``cached_attention.to_cache`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cached_attention import FP8_CACHE_DTYPES
from ._common import fp8_round, next_pow2, pdl_enter, pdl_flags


@triton.jit(do_not_specialize=["n_kv"])
def _kv_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    n_kv, inv_scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_H: tl.constexpr, PAGE: tl.constexpr, CACHE_FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        hmask = heads < n_kv
        page = slot // PAGE
        off = slot % PAGE
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        kmask = hmask[:, None] & (offs_d[None, :] < D)
        vmask = hmask[:, None] & (offs_dv[None, :] < DV)
        t64 = t.to(tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=kmask)
        v = tl.load(v_ptr + t64 * stride_vt + heads[:, None] * stride_vh + offs_dv[None, :], mask=vmask)
        k_dst = kc_ptr + page * stride_kcb + off * stride_kcs + heads[:, None] * stride_kch + offs_d[None, :]
        v_dst = vc_ptr + page * stride_vcb + off * stride_vcs + heads[:, None] * stride_vch + offs_dv[None, :]
        if CACHE_FP8:  # k / kv_scale, rounded and saturated like torch's float8 cast
            k = fp8_round(k.to(tl.float32) * inv_scale)
            v = fp8_round(v.to(tl.float32) * inv_scale)
        tl.store(k_dst, k.to(kc_ptr.dtype.element_ty), mask=kmask)
        tl.store(v_dst, v.to(vc_ptr.dtype.element_ty), mask=vmask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float = 1.0,
) -> None:
    """Scatter ``k``/``v`` ``[1, T, Nkv, D]`` into the paged pools at ``slot_mapping`` (negative: skipped).

    Float8 pools receive ``k / kv_scale`` rounded to nearest and saturated (``cached_attention.to_cache``)."""
    num_tokens, n_kv, d = k.shape[1], k.shape[2], k.shape[3]
    dv = v.shape[3]
    if num_tokens == 0:
        return
    block_d, block_dv = next_pow2(d), next_pow2(dv)
    block_h = min(next_pow2(n_kv), max(1, 4096 // max(block_d, block_dv)))
    grid = (num_tokens, triton.cdiv(n_kv, block_h))
    _kv_write_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(1), k.stride(2), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        n_kv, 1.0 / kv_scale, D=d, DV=dv, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_H=block_h,
        PAGE=k_cache.shape[1], CACHE_FP8=k_cache.dtype in FP8_CACHE_DTYPES, num_warps=4, **pdl_flags(k.device, num_tokens),
    )
