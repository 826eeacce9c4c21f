"""Triton rotary embedding: ``autodeploy::triton_rope`` (contract: ``custom_ops/rope.py``).

Memory-bound. A program owns one token and ``BLOCK_N`` heads: it loads the token's cos/sin row once and
reuses it for all its heads. Each head is read as the two halves of every rotated pair (``i`` and ``i + R/2``
for the NeoX form, ``2i`` and ``2i + 1`` interleaved), so every element is read once and written once; the
pass-through channels ``[R, D)`` of partial rotary are copied. ``x`` may be a strided view (q/k sliced from a
fused QKV): any strides but a unit last one. The math reproduces the reference's rounding: products and the
sum are rounded to ``promote(x.dtype, cos.dtype)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import rope as _reference  # noqa: F401  (registers the torch op family)
from ._common import INTERPRET, cast_rne, next_pow2, pdl_enter, pdl_flags, tl_dtype

HEAD_ELEMS = 2048  # x elements per program (BLOCK_N heads of D channels)


@triton.jit
def rope_pairs(x_base, c_row, s_row, h_ok, R: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
               COMPUTE: tl.constexpr, RNE: tl.constexpr):
    """The rotated pairs of a block of heads: ``(o1, o2, i1, i2, mask)``, ``o`` in ``COMPUTE`` at channels ``i``.

    ``x_base [BLOCK_N, 1]`` points at each head's row, ``c_row``/``s_row`` at the token's cos/sin. Each head is read
    as the two halves of every rotated pair (``i`` and ``i + R/2`` for the NeoX form, ``2i`` and ``2i + 1``
    interleaved); products and the sum are rounded to ``COMPUTE`` as in the reference.
    """
    i1, i2, j_ok = rope_channels(R, BLOCK_HALF, INTERLEAVED)
    mask = h_ok[:, None] & j_ok[None, :]
    x1 = tl.load(x_base + i1[None, :], mask=mask, other=0.0)
    x2 = tl.load(x_base + i2[None, :], mask=mask, other=0.0)
    o1, o2 = rotate_pairs(x1, x2, c_row, s_row, i1, i2, j_ok, COMPUTE, RNE)
    return o1, o2, i1, i2, mask


@triton.jit
def rope_channels(R: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """``(i1, i2, ok)``: the channels of the first and second member of each rotated pair."""
    j = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        return 2 * j, 2 * j + 1, j < R // 2
    return j, j + R // 2, j < R // 2


@triton.jit
def rotate_pairs(x1, x2, c_row, s_row, i1, i2, j_ok, COMPUTE: tl.constexpr, RNE: tl.constexpr):
    """``x1 [BLOCK_N, BLOCK_HALF]`` and ``x2`` (channels ``i1``, ``i2``) rotated by the token's cos/sin, in
    ``COMPUTE``: ``out_1 = x1 cos_1 - x2 sin_1``, ``out_2 = x2 cos_2 + x1 sin_2``, each product rounded like the
    reference (``RNE``: under the interpreter, see ``cast_rne``)."""
    c1 = tl.load(c_row + i1, mask=j_ok, other=0.0).to(COMPUTE).to(tl.float32)[None, :]
    c2 = tl.load(c_row + i2, mask=j_ok, other=0.0).to(COMPUTE).to(tl.float32)[None, :]
    s1 = tl.load(s_row + i1, mask=j_ok, other=0.0).to(COMPUTE).to(tl.float32)[None, :]
    s2 = tl.load(s_row + i2, mask=j_ok, other=0.0).to(COMPUTE).to(tl.float32)[None, :]
    x1 = x1.to(COMPUTE).to(tl.float32)
    x2 = x2.to(COMPUTE).to(tl.float32)
    o1 = cast_rne(x1 * c1, COMPUTE, RNE).to(tl.float32) + cast_rne(-x2 * s1, COMPUTE, RNE).to(tl.float32)
    o2 = cast_rne(x2 * c2, COMPUTE, RNE).to(tl.float32) + cast_rne(x1 * s2, COMPUTE, RNE).to(tl.float32)
    return cast_rne(o1, COMPUTE, RNE), cast_rne(o2, COMPUTE, RNE)


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, o_ptr,
    S, N,
    sxb, sxs, sxn, scb, scs, ssb, sss, sob, sos, son,
    R: tl.constexpr, PASS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr, INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr, RNE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    s = (row % S).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    h_ok = heads < N
    x_base = x_ptr + b * sxb + s * sxs + heads[:, None] * sxn  # [BLOCK_N, 1]
    o_base = o_ptr + b * sob + s * sos + heads[:, None] * son
    o1, o2, i1, i2, mask = rope_pairs(x_base, cos_ptr + b * scb + s * scs, sin_ptr + b * ssb + s * sss, h_ok,
                                      R, BLOCK_HALF, INTERLEAVED, COMPUTE, RNE)
    out_ty = o_ptr.dtype.element_ty
    tl.store(o_base + i1[None, :], cast_rne(o1, out_ty, RNE), mask=mask)
    tl.store(o_base + i2[None, :], cast_rne(o2, out_ty, RNE), mask=mask)
    if PASS > 0:
        p = tl.arange(0, BLOCK_PASS)
        p_mask = h_ok[:, None] & (p[None, :] < PASS)
        xp = tl.load(x_base + R + p[None, :], mask=p_mask)
        tl.store(o_base + R + p[None, :], xp, mask=p_mask)


def rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, out: torch.Tensor) -> None:
    """``x [B, S, N, D]``, ``cos``/``sin`` ``[B or 1, S, R]`` -> ``out [B, S, N, D]``."""
    bsz, seq, n, d = x.shape
    r = cos.shape[-1]
    if x.numel() == 0:
        return
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    cos = cos.expand(bsz, seq, r)
    sin = sin.expand(bsz, seq, r)
    compute = torch.promote_types(x.dtype, cos.dtype)
    block_n = max(1, min(next_pow2(n), HEAD_ELEMS // next_pow2(d)))
    grid = (bsz * seq, triton.cdiv(n, block_n))
    _rope_kernel[grid](
        x, cos, sin, out, seq, n,
        x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        R=r, PASS=d - r, BLOCK_HALF=next_pow2(r // 2), BLOCK_PASS=next_pow2(max(d - r, 1)),
        BLOCK_N=block_n, INTERLEAVED=interleaved, COMPUTE=tl_dtype(compute), RNE=INTERPRET,
        num_warps=1 if INTERPRET else 4,
        **pdl_flags(x.device, bsz * seq),
    )


@torch.library.custom_op("autodeploy::triton_rope", mutates_args=())
def triton_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rope_launch(x, cos, sin, interleaved, out)
    return out


@triton_rope.register_fake
def _triton_rope_fake(x, cos, sin, interleaved=False):
    return torch.empty_like(x)
