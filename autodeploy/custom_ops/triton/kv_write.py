"""Writing a step's new keys and values into the paged KV pools (the first launch of every cached-attention call).

``_kv_write_kernel``, grid ``(T, Nkv / BLOCK_H)``: token ``t``'s rows go to flat slot ``slot_mapping[t]``
(``block * page + offset``); a negative slot (CUDA-graph padding) is skipped. Float8 pools receive
``k / kv_scale`` rounded to nearest and saturated, exactly as ``cached_attention.to_cache`` does.

``_rope_kv_write_kernel`` (``rope_write_kv``) is the same write with the rotary embedding of q and k in it: one
launch instead of three (RoPE of q, RoPE of k, the write). Grid ``(T, Nq / BLOCK_H + Nkv / BLOCK_H)``: the first
programs of a token rotate its query heads into a new ``q``, the others rotate its key heads into the cache and
copy its values, with the rounding of ``triton_rope`` (``rope.rotate_pairs``). Optional per-head RMSNorm weights
of q and k (Qwen3, Gemma 3) normalise each head first, with ``rmsnorm_reference``'s roundings: two launches
fewer again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cached_attention import FP8_CACHE_DTYPES
from ._common import INTERPRET, cast_rne, fp8_round, next_pow2, pdl_enter, pdl_flags, tl_dtype
from .rope import rope_channels, rotate_pairs


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
        PAGE=k_cache.shape[1], CACHE_FP8=k_cache.dtype in FP8_CACHE_DTYPES, num_warps=4,
        **pdl_flags(k.device, num_tokens),
    )


@triton.jit
def _to_pool(x, inv_scale, dst_ty, CACHE_FP8: tl.constexpr):
    if CACHE_FP8:
        x = fp8_round(x.to(tl.float32) * inv_scale)
    return x.to(dst_ty)


@triton.jit
def _norm_piece(x, w_ptr, idx, ok, rstd, w_offset, HAS_OFFSET: tl.constexpr, RNE: tl.constexpr):
    """One piece of a head normalised as ``rmsnorm_reference`` does, in ``x``'s dtype."""
    n = x.to(tl.float32) * rstd[:, None]
    w = tl.load(w_ptr + idx, mask=ok, other=0.0).to(tl.float32)  # [1, channels]
    if HAS_OFFSET:
        return cast_rne(n * (w + w_offset), x.dtype, RNE)
    return cast_rne(w * cast_rne(n, x.dtype, RNE).to(tl.float32), x.dtype, RNE)


@triton.jit
def _norm_rope(x_base, w_ptr, c_row, s_row, h_ok, eps, w_offset, R: tl.constexpr, PASS: tl.constexpr,
               BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr,
               HAS_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr, RNE: tl.constexpr):
    """A block of heads (``x_base [BLOCK_H, 1]``), RMS-normalised over its ``R + PASS`` channels when ``HAS_NORM``,
    then rotated: ``(o1, o2, i1, i2, mask, xp, p_mask)``, ``xp`` the pass-through channels ``R + p``."""
    i1, i2, j_ok = rope_channels(R, BLOCK_HALF, INTERLEAVED)
    mask = h_ok[:, None] & j_ok[None, :]
    x1 = tl.load(x_base + i1[None, :], mask=mask, other=0.0)
    x2 = tl.load(x_base + i2[None, :], mask=mask, other=0.0)
    p = tl.arange(0, BLOCK_PASS)
    p_mask = h_ok[:, None] & (p[None, :] < PASS)
    xp = x1  # placeholder: no pass-through channels
    if PASS > 0:
        xp = tl.load(x_base + R + p[None, :], mask=p_mask, other=0.0)
    if HAS_NORM:
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        squares = tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)
        if PASS > 0:
            fp = xp.to(tl.float32)
            squares += tl.sum(fp * fp, 1)
        rstd = 1.0 / tl.sqrt(squares / (R + PASS) + eps)
        x1 = _norm_piece(x1, w_ptr, i1[None, :], j_ok[None, :], rstd, w_offset, HAS_OFFSET, RNE)
        x2 = _norm_piece(x2, w_ptr, i2[None, :], j_ok[None, :], rstd, w_offset, HAS_OFFSET, RNE)
        if PASS > 0:
            xp = _norm_piece(xp, w_ptr, R + p[None, :], p[None, :] < PASS, rstd, w_offset, HAS_OFFSET, RNE)
    o1, o2 = rotate_pairs(x1, x2, c_row, s_row, i1, i2, j_ok, COMPUTE, RNE)
    return o1, o2, i1, i2, mask, xp, p_mask


@triton.jit(do_not_specialize=["n_q", "n_kv"])
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr,
    stride_qt, stride_qh, stride_qot, stride_qoh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_ct, stride_st,
    n_q, n_kv, inv_scale, eps, w_offset,
    R: tl.constexpr, PASS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_H: tl.constexpr, PAGE: tl.constexpr,
    INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr, CACHE_FP8: tl.constexpr, Q_NORM: tl.constexpr,
    K_NORM: tl.constexpr, HAS_OFFSET: tl.constexpr, RNE: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks = tl.cdiv(n_q, BLOCK_H)
    c_row = cos_ptr + t * stride_ct
    s_row = sin_ptr + t * stride_st
    p = tl.arange(0, BLOCK_PASS)
    if block < q_blocks:
        heads = block * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = heads < n_q
        x_base = q_ptr + t * stride_qt + heads[:, None] * stride_qh
        o_base = qo_ptr + t * stride_qot + heads[:, None] * stride_qoh
        o1, o2, i1, i2, mask, qp, p_mask = _norm_rope(
            x_base, qn_ptr, c_row, s_row, h_ok, eps, w_offset, R, PASS, BLOCK_HALF, BLOCK_PASS, INTERLEAVED,
            COMPUTE, Q_NORM, HAS_OFFSET, RNE)
        q_ty = qo_ptr.dtype.element_ty
        tl.store(o_base + i1[None, :], cast_rne(o1, q_ty, RNE), mask=mask)
        tl.store(o_base + i2[None, :], cast_rne(o2, q_ty, RNE), mask=mask)
        if PASS > 0:
            tl.store(o_base + R + p[None, :], qp, mask=p_mask)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            heads = (block - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            h_ok = heads < n_kv
            page = slot // PAGE
            off = slot % PAGE
            k_base = k_ptr + t * stride_kt + heads[:, None] * stride_kh
            k_dst = kc_ptr + page * stride_kcb + off * stride_kcs + heads[:, None] * stride_kch
            o1, o2, i1, i2, mask, kp, p_mask = _norm_rope(
                k_base, kn_ptr, c_row, s_row, h_ok, eps, w_offset, R, PASS, BLOCK_HALF, BLOCK_PASS, INTERLEAVED,
                COMPUTE, K_NORM, HAS_OFFSET, RNE)
            k_ty = k_ptr.dtype.element_ty  # the reference rounds the rotated k to k's dtype, then to the pool's
            pool_ty = kc_ptr.dtype.element_ty
            k1, k2 = cast_rne(o1, k_ty, RNE), cast_rne(o2, k_ty, RNE)
            tl.store(k_dst + i1[None, :], _to_pool(k1, inv_scale, pool_ty, CACHE_FP8), mask=mask)
            tl.store(k_dst + i2[None, :], _to_pool(k2, inv_scale, pool_ty, CACHE_FP8), mask=mask)
            if PASS > 0:
                tl.store(k_dst + R + p[None, :], _to_pool(kp, inv_scale, pool_ty, CACHE_FP8), mask=p_mask)
            dv = tl.arange(0, BLOCK_DV)
            v_mask = h_ok[:, None] & (dv[None, :] < DV)
            v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dv[None, :], mask=v_mask)
            v_dst = vc_ptr + page * stride_vcb + off * stride_vcs + heads[:, None] * stride_vch + dv[None, :]
            tl.store(v_dst, _to_pool(v, inv_scale, vc_ptr.dtype.element_ty, CACHE_FP8), mask=v_mask)


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: float = 1.0,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    norm_weight_offset: float = 0.0,
) -> torch.Tensor:
    """``q`` rotated (returned, ``[1, T, Nq, D]``) and ``k`` rotated into the pools with ``v``, as ``triton_rope``
    of q and k followed by ``write_kv`` would. ``cos``/``sin``: ``[1, T or 1, R]``. With ``q_norm_weight`` /
    ``k_norm_weight`` (``[D]``) each head is first ``torch_rmsnorm(x, weight, norm_eps, norm_weight_offset)``."""
    num_tokens, n_q, d = q.shape[1], q.shape[2], q.shape[3]
    n_kv, dv = k.shape[2], v.shape[3]
    q_out = torch.empty((1, num_tokens, n_q, d), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    r = cos.shape[-1]
    cos = (cos if cos.stride(-1) == 1 else cos.contiguous()).expand(1, num_tokens, r)
    sin = (sin if sin.stride(-1) == 1 else sin.contiguous()).expand(1, num_tokens, r)
    block_h = max(1, min(next_pow2(max(n_q, n_kv)), 2048 // next_pow2(d)))
    grid = (num_tokens, triton.cdiv(n_q, block_h) + triton.cdiv(n_kv, block_h))
    _rope_kv_write_kernel[grid](
        q, k, v, q_out, k_cache, v_cache, slot_mapping, cos, sin,
        q_norm_weight if q_norm_weight is not None else cos, k_norm_weight if k_norm_weight is not None else cos,
        q.stride(1), q.stride(2), q_out.stride(1), q_out.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        cos.stride(1), sin.stride(1), n_q, n_kv, 1.0 / kv_scale, float(norm_eps), float(norm_weight_offset),
        R=r, PASS=d - r, BLOCK_HALF=next_pow2(r // 2), BLOCK_PASS=next_pow2(max(d - r, 1)), DV=dv,
        BLOCK_DV=next_pow2(dv), BLOCK_H=block_h, PAGE=k_cache.shape[1], INTERLEAVED=interleaved,
        COMPUTE=tl_dtype(torch.promote_types(q.dtype, cos.dtype)), CACHE_FP8=k_cache.dtype in FP8_CACHE_DTYPES,
        Q_NORM=q_norm_weight is not None, K_NORM=k_norm_weight is not None, HAS_OFFSET=norm_weight_offset != 0,
        RNE=INTERPRET, num_warps=4, **pdl_flags(q.device, num_tokens),
    )
    return q_out
