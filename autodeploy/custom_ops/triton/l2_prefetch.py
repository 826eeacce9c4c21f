"""Weight prefetch into L2 for the weight-streaming kernels (``gemv.py``).

A decode GEMV is latency-bound: each program has a few pipeline stages of weights in flight, and small linears
(o, qkv) leave most of the GPU idle. ``cp.async.bulk.prefetch.L2`` asks L2 for a block of memory without holding
a register or a byte of shared memory, so a program can keep more of its weights in flight than its pipeline
does, and can start on them before ``pdl_enter``, while the previous kernel drains. The later loads then hit L2.

Contract of ``l2_prefetch_blocks``: ``base`` and ``stride`` 16-byte aligned, ``nbytes`` a positive multiple of
16, ``blocks`` at most the program's threads; the blocks lie inside the tensor. A prefetch is a hint: it changes
no value, so a kernel computes the same with it on or off. Only compiled kernels issue it (the interpreter has
no inline assembly: the launchers turn it off there).
"""

from __future__ import annotations

import triton
import triton.language as tl

_PREFETCH_ASM = tl.constexpr(
    "{ .reg .u32 pf_t; .reg .pred pf_p; .reg .u64 pf_a; "
    "mov.u32 pf_t, %tid.x; setp.lt.u32 pf_p, pf_t, $3; mul.wide.u32 pf_a, pf_t, $4; add.u64 pf_a, pf_a, $1; "
    "@pf_p cp.async.bulk.prefetch.L2.global [pf_a], $2; mov.u32 $0, 0; }"
)


@triton.jit
def l2_prefetch_blocks(base, nbytes, blocks, stride):
    """Ask L2 for ``blocks`` blocks of ``nbytes`` bytes, ``stride`` bytes apart from ``base``: thread ``t`` of the
    program asks for block ``t``, one instruction each, all at once."""
    tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l,r,r,r", [base, nbytes, blocks, stride], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_weight_steps(w_ptr, row0, rows, k0, steps, k_hi, stride_wn,
                          ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ROW_TILE: tl.constexpr):
    """Prefetch ``steps`` K steps of ``BLOCK_K`` from ``k0`` (none past ``k_hi``) of the ``rows <= ROWS`` weight
    rows from ``row0``. ``ROW_TILE`` 1: rows one after another (``stride_wn`` elements of an 8- or 16-bit format),
    one block a row. Else int4 words in ``ROW_TILE``-row tiles (``int4_layout.py``): a 128-long chunk of the rows
    of one tile is one block of 64 bytes a row, a chunk's blocks ``64 * ROW_TILE`` bytes apart; ``ROWS`` then
    divides ``ROW_TILE`` (``row0`` a multiple of it) or is whole tiles."""
    k_end = tl.minimum(k0 + steps * BLOCK_K, k_hi)
    if ROW_TILE == 1:
        width: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        nbytes = tl.maximum(k_end - k0, 0) * width
        l2_prefetch_blocks(w_ptr + row0.to(tl.int64) * stride_wn + k0, nbytes, tl.where(nbytes > 0, rows, 0),
                           stride_wn * width)
    else:
        chunks = tl.maximum(k_end - k0, 0) // 128
        PIECE: tl.constexpr = ROWS if ROWS < ROW_TILE else ROW_TILE
        for p in tl.static_range(ROWS // PIECE):
            r = (row0 + p * PIECE).to(tl.int64)
            block = (r // ROW_TILE) * ROW_TILE * stride_wn + (k0 // 128) * (ROW_TILE * 16) + (r % ROW_TILE) * 16
            l2_prefetch_blocks(w_ptr + block, PIECE * 64, tl.where(p * PIECE < rows, chunks, 0), ROW_TILE * 64)
