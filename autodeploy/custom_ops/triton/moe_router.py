"""``autodeploy::triton_moe_router`` (contract: ``custom_ops/moe_router.py``): softmax, top-k, the renormalisation
and the cast of a row of router logits in one program, instead of three to six launches.

A program takes ``ROWS`` tokens, holds each row's ``E`` logits in registers (``BLOCK_E = next_pow2(E)``), forms the
float32 softmax, then picks ``top_k`` times the largest remaining probability (the lowest expert id among exact
ties) and masks it out. A pick is one max-reduction: a probability is >= 0, so its float32 bits order like the
number, and ``bits << 32 | (BLOCK_E - 1 - id)`` orders by probability, then by the lower id. Weights are written
largest first, as ``torch.topk`` orders them, rounded once to the weights' dtype. One row (batch-1 decode) runs in
one warp, so every reduction stays in its registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import moe_router as _reference
from ._common import INTERPRET, cast_rne, next_pow2, pdl_enter, pdl_flags


@triton.jit
def _moe_router_kernel(
    logits_ptr, w_ptr, ids_ptr, T, E, stride_t, TOP_K: tl.constexpr, NORMALIZE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RNE: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    ok = row_ok[:, None] & (cols < E)[None, :]
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=ok, other=-1.0e30)  # finite: a padded row stays NaN-free
    x = x.to(tl.float32)
    e = tl.exp(x - tl.max(x, 1)[:, None])
    p = e / tl.sum(e, 1)[:, None]
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - cols)[None, :]
    key = tl.where(ok, key, -1)
    slots = tl.arange(0, BLOCK_K)
    weights = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((ROWS, BLOCK_K), dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(key, 1)
        pick = BLOCK_E - 1 - (best & 0xFFFFFFFF)
        prob = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        weights = tl.where(slots[None, :] == j, prob[:, None], weights)
        ids = tl.where(slots[None, :] == j, pick[:, None], ids)
        key = tl.where(key == best[:, None], -1, key)
    if NORMALIZE:
        weights = weights / tl.sum(weights, 1)[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_ok = row_ok[:, None] & (slots < TOP_K)[None, :]
    tl.store(w_ptr + out, cast_rne(weights, w_ptr.dtype.element_ty, RNE), mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)


def router_launch(rows: int, experts: int) -> tuple[int, int]:
    """``(rows per program, warps)``: one row per program up to 16 (decode: no idle rows), 2048 logits at most, and
    a warp per 512 of them."""
    block_e = next_pow2(experts)
    per_program = min(next_pow2(rows), 16, max(1, 2048 // block_e))
    return per_program, 1 if INTERPRET else max(1, min(4, per_program * block_e // 512))


@torch.library.custom_op("autodeploy::triton_moe_router", mutates_args=())
def triton_moe_router(
    logits: torch.Tensor, top_k: int, normalize: bool, weights_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    e = logits.shape[-1]
    rows = logits.reshape(-1, e)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    t = rows.shape[0]
    weights = torch.empty((t, top_k), dtype=weights_dtype, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=logits.device)
    if t:
        per_program, warps = router_launch(t, e)
        _moe_router_kernel[(triton.cdiv(t, per_program),)](
            rows, weights, ids, t, e, rows.stride(0), TOP_K=top_k, NORMALIZE=normalize,
            ROWS=per_program, BLOCK_E=next_pow2(e), BLOCK_K=next_pow2(top_k),
            RNE=INTERPRET and weights_dtype == torch.bfloat16, num_warps=warps, **pdl_flags(logits.device, t),
        )
    shape = (*logits.shape[:-1], top_k)
    return weights.view(shape), ids.view(shape)


triton_moe_router.register_fake(_reference.moe_router_fake)
