"""Triton paged attention: ``autodeploy::triton_cached_attention`` (contract: ``custom_ops/cached_attention.py``).

One call runs up to three launches, all sized from tensor shapes and the host-side ``batch_info``:

1. ``write_kv`` (``kv_write.py``): scatter the step's new k/v rows into the pools at ``slot_mapping`` (rows with
   a negative slot, e.g. CUDA-graph padding, are skipped); with ``rope_cos``/``rope_sin`` given,
   ``rope_write_kv`` instead rotates q (into a new tensor) and k (into the pools) in the same launch.
2. ``_prefill_kernel`` — flash-attention (online softmax in the exp2 domain) for the prefill / chunked-prefill
   sequences. Grid ``(Nkv * head_groups, tiles)``. A program owns ``BLOCK_M`` rows = ``TOK`` consecutive
   tokens x ``HEADS`` query heads of one KV head (GQA packed into the M dimension), so each K/V tile is read
   once per KV-head group and feeds all its query heads. The tile -> (sequence, tile-in-sequence) map is
   computed on the device from ``seq_lens`` (a prefix sum over the prefill sequences): no host sync; the grid
   is the upper bound ``cdiv(num_prefill_tokens, TOK) + num_prefill_seqs`` and surplus programs exit at once.
   Each sequence's last (longest, causally) tile runs first, so the tail of the launch is short tiles. Key
   tiles are visited in three ranges: the sliding-window edge (masked), the interior (no mask), the causal
   diagonal (masked). K/V rows are gathered through the page table per key, so any page size works with any
   ``BLOCK_N``.
3. ``_decode_kernel`` (+ ``_decode_reduce_kernel``) — one query token per sequence, flash-decoding: grid
   ``(num_decode, Nkv * head_groups, num_splits)``; the G query heads of a KV head are the rows of one
   ``tl.dot`` (padded to 16), and each split walks ``cdiv(ctx, num_splits)`` keys (rounded to ``BLOCK_N``;
   the chunk is computed on the device from ``cache_lens``). ``num_splits`` comes from shapes only: enough
   programs to give every multiprocessor about two (``2 * SMs / (num_decode * Nkv)``), at most 64 and at most
   the page table's capacity in ``BLOCK_N`` tiles; when the batch alone fills the GPU it is 1 and the kernel
   writes the output directly (no partials, no reduction launch). Partials are un-normalised fp32
   accumulators with their running max and sum; the reduction rescales them and adds the sinks. Without a
   given config the tile (keys, warps, stages, register cap) comes from ``decode_tile_for``: one warp a program
   when there are many programs.

A chunk size (chunked local attention) bounds the keys from below like a window does: a row at position ``p``
sees keys from ``max(p - window + 1, p - p % chunk)``, so the three key ranges and the decode split are the same.

Logits: ``s = qk * scale`` (or ``cap * tanh(qk * scale / cap)``) ``+ slope * (k_pos - q_pos)``, computed in
float32 and scaled by ``log2(e)`` for ``exp2``. Both products take 16-bit operands in q's dtype, or float16 with a
float8 cache (``_as_mma_operand``): K, V and P are cast to it (as every flash kernel casts P); float32 inputs use
exact (``ieee``) products. Running maxima start at -1e30 (finite) so fully masked rows never produce NaN.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from .. import cached_attention as _reference  # noqa: F401  (registers the torch op family)
from ..cached_attention import FP8_CACHE_DTYPES
from ._common import LOG2E, mma, next_pow2, pdl_enter, pdl_flags, tanh, to_fp16_clamped, upcast_dots
from .attention_tiles import AttentionConfig, decode_splits, decode_tile_for, default_config, heads_per_program
from .kv_write import rope_write_kv, write_kv

PREFILL_SEQ_BLOCK = 64  # sequences the prefill kernel's tile search takes per step of its loop
NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)  # running-max start: finite, so masked rows give 0, not NaN


# ---- kernels ----------------------------------------------------------------------------------------------------
@triton.jit
def _logits(qk, q_pos, k_pos, slope, qk_scale, cap_scale, cap_inv, HAS_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scaled (capped, ALiBi-biased) logits in the log2 domain: ``[M, N]`` float32."""
    if HAS_CAP:
        s = cap_scale * tanh(qk * cap_inv)
    else:
        s = qk * qk_scale
    if HAS_ALIBI:
        s = s + slope[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
    return s


@triton.jit
def _attend(
    acc, m_i, l_i, q, q_pos, slope, lo, hi, k_end, window, chunk,
    kc_ptr, vc_ptr, pt_row_ptr, k_head_off, v_head_off,
    stride_kb, stride_ks, stride_vb, stride_vs,
    qk_scale, cap_scale, cap_inv,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Online-softmax over the key tiles ``[lo, hi)`` of one sequence, read through its page-table row.

    ``MASKED``: keys ``>= k_end`` are skipped, and (``CAUSAL``) keys after a row's position, (``HAS_WINDOW``)
    out of its window or (``HAS_CHUNK``) before its chunk get ``-inf``. Unmasked calls must only cover tiles every row sees in full.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + offs_n  # [BLOCK_N]
        k_idx = k_pos.to(tl.uint32)  # never negative; unsigned // and % by a power-of-two page: a shift, a mask
        if MASKED:
            k_ok = k_pos < k_end
            page = tl.load(pt_row_ptr + k_idx // PAGE, mask=k_ok, other=0).to(tl.int64)
        else:
            page = tl.load(pt_row_ptr + k_idx // PAGE).to(tl.int64)
        in_page = (k_idx % PAGE).to(tl.int64)
        k_rows = page * stride_kb + in_page * stride_ks + k_head_off  # [BLOCK_N]
        v_rows = page * stride_vb + in_page * stride_vs + v_head_off
        k_ptrs = kc_ptr + k_rows[None, :] + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
        v_ptrs = vc_ptr + v_rows[:, None] + offs_dv[None, :]  # [BLOCK_N, BLOCK_DV]
        if MASKED:
            k = tl.load(k_ptrs, mask=k_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        elif BLOCK_D != D:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = mma(q, k.to(q.dtype), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32), UPCAST, IEEE)
        s = _logits(qk, q_pos, k_pos, slope, qk_scale, cap_scale, cap_inv, HAS_CAP, HAS_ALIBI)
        if MASKED:
            visible = k_ok[None, :]
            if CAUSAL:
                visible = visible & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
            if HAS_CHUNK:
                visible = visible & (k_pos[None, :] >= q_pos[:, None] // chunk * chunk)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=k_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        elif BLOCK_DV != DV:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = mma(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], UPCAST, IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _first_key(pos, window, chunk, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """The first key position a query at ``pos`` sees (window and chunk both bound it from below)."""
    first = pos * 0
    if HAS_WINDOW:
        first = tl.maximum(first, pos - window + 1)
    if HAS_CHUNK:
        first = tl.maximum(first, pos // chunk * chunk)
    return first


@triton.jit
def _as_mma_operand(q, kc_ptr):
    """q in the dtype both products run in: float16 for a float8 cache with 16-bit activations (fp8 -> fp16 is one
    hardware conversion per two values, fp8 -> bf16 goes through fp16, and fp16 holds every fp8 value and every
    probability exactly or closer than bf16), clamped to fp16's range; otherwise q's own dtype."""
    if kc_ptr.dtype.element_ty == tl.float8e4nv and q.dtype != tl.float32:
        q = to_fp16_clamped(q)
    return q


@triton.jit
def _finish(acc, m_i, l_i, sinks_ptr, head, row_ok, HAS_SINKS: tl.constexpr):
    """Normalise: add each head's sink logit to the denominator, divide."""
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_f)
        l_i = l_i * alpha + tl.exp2(sink - m_f)
        acc = acc * alpha[:, None]
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    return acc / l_i[:, None]


@triton.jit(do_not_specialize=["num_seqs", "window", "chunk"])  # per-step values: no recompiles
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr,
    seq_lens_ptr, cu_ptr, cache_lens_ptr, pt_ptr, sinks_ptr, alibi_ptr,
    num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_pt,
    qk_scale, cap_scale, cap_inv, window, chunk, v_scale,
    G: tl.constexpr, HEADS: tl.constexpr, NUM_HG: tl.constexpr, TOK: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SEQ: tl.constexpr, PAGE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    kvh = tl.program_id(0) // NUM_HG
    hg = tl.program_id(0) % NUM_HG
    tile = tl.program_id(1)
    # tile -> sequence: prefix sums of the per-sequence tile counts, BLOCK_SEQ sequences at a time (a constant
    # block, so no batch composition compiles a new variant); s = sequences that end at or before the tile
    s = 0
    tiles_before = 0  # tiles of those sequences
    chunk_start = 0  # tiles of every sequence before the chunk
    for first in range(0, num_seqs, BLOCK_SEQ):
        seqs = first + tl.arange(0, BLOCK_SEQ)
        lens = tl.load(seq_lens_ptr + seqs, mask=seqs < num_seqs, other=0)
        n_tiles = (lens + TOK - 1) // TOK  # [BLOCK_SEQ]
        ends = chunk_start + tl.cumsum(n_tiles, 0)
        done = ends <= tile
        s += tl.sum(done.to(tl.int32), 0)
        tiles_before += tl.sum(tl.where(done, n_tiles, 0), 0)
        chunk_start += tl.sum(n_tiles, 0)
    if s < num_seqs:
        n_new = tl.load(seq_lens_ptr + s)
        # a sequence's last (longest) tile first: heavy programs start early, light ones fill the tail
        mt = (n_new + TOK - 1) // TOK - 1 - (tile - tiles_before)
        n_cached = tl.load(cache_lens_ptr + s)
        first_tok = tl.load(cu_ptr + s)
        total = n_cached + n_new

        offs_m = tl.arange(0, BLOCK_M)
        tok_in_tile = offs_m // HEADS
        g = hg * HEADS + offs_m % HEADS
        i = mt * TOK + tok_in_tile  # [BLOCK_M] token index within the sequence's new tokens
        row_ok = (tok_in_tile < TOK) & (i < n_new) & (g < G)
        head = kvh * G + g
        q_pos = n_cached + i
        tok = (first_tok + i).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(
            q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        q = _as_mma_operand(q, kc_ptr)
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        else:
            slope = tl.zeros((BLOCK_M,), dtype=tl.float32)

        p_lo = n_cached + mt * TOK
        p_hi = n_cached + tl.minimum(mt * TOK + TOK, n_new) - 1
        full_hi = (p_lo + 1) // BLOCK_N * BLOCK_N  # tiles below are causally visible to every row
        if HAS_WINDOW or HAS_CHUNK:
            k_start = _first_key(p_lo, window, chunk, HAS_WINDOW, HAS_CHUNK) // BLOCK_N * BLOCK_N
            full_lo = (_first_key(p_hi, window, chunk, HAS_WINDOW, HAS_CHUNK) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
            mid_lo = tl.maximum(tl.minimum(full_lo, full_hi), k_start)
        else:
            k_start = 0
            mid_lo = 0

        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), NEG_INIT, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        pt_row = pt_ptr + s.to(tl.int64) * stride_pt
        k_head_off = kvh.to(tl.int64) * stride_kh
        v_head_off = kvh.to(tl.int64) * stride_vh
        if HAS_WINDOW or HAS_CHUNK:  # left edge of the window / chunk
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q, q_pos, slope, k_start, mid_lo, total, window, chunk,
                kc_ptr, vc_ptr, pt_row, k_head_off, v_head_off, stride_kb, stride_ks, stride_vb, stride_vs,
                qk_scale, cap_scale, cap_inv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, PAGE,
                True, True, HAS_WINDOW, HAS_CHUNK, HAS_CAP, HAS_ALIBI, UPCAST, IEEE,
            )
        acc, m_i, l_i = _attend(  # interior: no masks
            acc, m_i, l_i, q, q_pos, slope, mid_lo, full_hi, total, window, chunk,
            kc_ptr, vc_ptr, pt_row, k_head_off, v_head_off, stride_kb, stride_ks, stride_vb, stride_vs,
            qk_scale, cap_scale, cap_inv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, PAGE,
            False, False, False, False, HAS_CAP, HAS_ALIBI, UPCAST, IEEE,
        )
        acc, m_i, l_i = _attend(  # causal diagonal
            acc, m_i, l_i, q, q_pos, slope, full_hi, p_hi + 1, total, window, chunk,
            kc_ptr, vc_ptr, pt_row, k_head_off, v_head_off, stride_kb, stride_ks, stride_vb, stride_vs,
            qk_scale, cap_scale, cap_inv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, PAGE,
            True, True, HAS_WINDOW, HAS_CHUNK, HAS_CAP, HAS_ALIBI, UPCAST, IEEE,
        )
        out = _finish(acc, m_i, l_i, sinks_ptr, head, row_ok, HAS_SINKS) * v_scale
        offs_dv = tl.arange(0, BLOCK_DV)
        tl.store(
            o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dv[None, :] < DV),
        )


@triton.jit(do_not_specialize=["first_seq", "num_splits"])  # per-step values: no recompiles
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr, part_acc_ptr, part_ml_ptr,
    seq_lens_ptr, cu_ptr, cache_lens_ptr, pt_ptr, sinks_ptr, alibi_ptr,
    first_seq, num_splits, n_q,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_pt,
    qk_scale, cap_scale, cap_inv, window, chunk, v_scale,
    G: tl.constexpr, HEADS: tl.constexpr, NUM_HG: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_CAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1) // NUM_HG
    hg = tl.program_id(1) % NUM_HG
    split = tl.program_id(2)
    s = first_seq + b
    n_new = tl.load(seq_lens_ptr + s)
    ctx = tl.load(cache_lens_ptr + s) + n_new
    pos = ctx - 1
    tok = (tl.load(cu_ptr + s) + n_new - 1).to(tl.int64)
    k_first = _first_key(pos, window, chunk, HAS_WINDOW, HAS_CHUNK)
    span = ((ctx - k_first + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # keys per split
    lo = k_first + split * span
    hi = tl.minimum(lo + span, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    g = hg * HEADS + offs_h
    row_ok = (offs_h < HEADS) & (g < G) & (offs_h * 0 + n_new > 0)
    head = kvh * G + g  # [BLOCK_H]
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + tok * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]
    q = _as_mma_operand(q, kc_ptr)
    q_pos = tl.zeros((BLOCK_H,), dtype=tl.int32) + pos
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        slope = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    m_i = tl.full((BLOCK_H,), NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc, m_i, l_i = _attend(  # every key in [k_first, ctx) is visible: only the range end is masked
        acc, m_i, l_i, q, q_pos, slope, lo, hi, hi, window, chunk,
        kc_ptr, vc_ptr, pt_ptr + s.to(tl.int64) * stride_pt, kvh.to(tl.int64) * stride_kh,
        kvh.to(tl.int64) * stride_vh, stride_kb, stride_ks, stride_vb, stride_vs,
        qk_scale, cap_scale, cap_inv, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, PAGE,
        True, False, False, False, HAS_CAP, HAS_ALIBI, UPCAST, IEEE,
    )
    offs_dv = tl.arange(0, BLOCK_DV)
    if SPLIT:
        part = (b * n_q + head).to(tl.int64) * num_splits + split  # [BLOCK_H]
        dv_ok = row_ok[:, None] & (offs_dv[None, :] < DV)
        tl.store(part_acc_ptr + part[:, None] * DV + offs_dv[None, :], acc, mask=dv_ok)
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = _finish(acc, m_i, l_i, sinks_ptr, head, row_ok, HAS_SINKS) * v_scale
        tl.store(
            o_ptr + tok * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (offs_dv[None, :] < DV),
        )


@triton.jit(do_not_specialize=["first_seq", "num_splits"])
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, o_ptr, seq_lens_ptr, cu_ptr, sinks_ptr,
    first_seq, num_splits, n_q, stride_ot, stride_oh, v_scale,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = first_seq + b
    n_new = tl.load(seq_lens_ptr + s)
    if n_new > 0:
        tok = (tl.load(cu_ptr + s) + n_new - 1).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_dv = tl.arange(0, BLOCK_DV)
        s_ok = offs_s < num_splits
        part = (b * n_q + h).to(tl.int64) * num_splits + offs_s  # [BLOCK_S]
        m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
            m_max = tl.maximum(m_max, sink)
        w = tl.exp2(m - m_max)  # [BLOCK_S]
        denom = tl.sum(w * l, 0)
        if HAS_SINKS:
            denom += tl.exp2(sink - m_max)
        acc_mask = s_ok[:, None] & (offs_dv[None, :] < DV)
        acc = tl.load(part_acc_ptr + part[:, None] * DV + offs_dv[None, :], mask=acc_mask, other=0.0)  # [S, DV]
        out = tl.sum(acc * w[:, None], 0) * (v_scale / denom)
        tl.store(o_ptr + tok * stride_ot + h * stride_oh + offs_dv, out.to(o_ptr.dtype.element_ty), mask=offs_dv < DV)


# ---- launchers --------------------------------------------------------------------------------------------------
def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def cached_attention_into(
    out: torch.Tensor,  # [1, T, Nq, Dv] (written for the valid rows only)
    q: torch.Tensor,  # [1, T, Nq, D]
    k: torch.Tensor,  # [1, T, Nkv, D]
    v: torch.Tensor,  # [1, T, Nkv, Dv]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Nkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Nkv, Dv]
    seq_lens: torch.Tensor,  # [B] int32
    cu_seqlens: torch.Tensor,  # [B + 1] int32
    cache_lens: torch.Tensor,  # [B] int32
    page_table: torch.Tensor,  # [B, P] int32
    slot_mapping: torch.Tensor,  # [T] int64
    batch_info: torch.Tensor,  # [3] int32, host
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,  # [Nq]
    alibi_slopes: torch.Tensor | None = None,  # [Nq]
    chunk_size: int | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    *,
    kv_scale: float = 1.0,
    rope_interleaved: bool = False,
    qk_norm_eps: float = 1e-6,
    qk_norm_weight_offset: float = 0.0,
    config: AttentionConfig | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The work of ``triton_cached_attention`` into a given ``out`` (tests poison it; benchmarks pick tiles)."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    n_q, d = q.shape[2], q.shape[3]
    n_kv, dv = k.shape[2], v.shape[3]
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or out.stride(-1) != 1 or n_q % n_kv:
        raise ValueError(
            f"triton_cached_attention: needs caches/out with a unit last stride and Nq % Nkv == 0 "
            f"(Nq={n_q}, Nkv={n_kv}, k_cache strides {k_cache.stride()}, out strides {out.stride()})"
        )
    group = n_q // n_kv
    page = k_cache.shape[1]
    cfg = config or default_config(max(d, dv), q.dtype, q.device)
    if q.device.type == "cuda":  # tl.dot needs every dimension >= 16
        cfg = replace(
            cfg,
            prefill_block_m=max(16, cfg.prefill_block_m),
            prefill_block_n=max(16, cfg.prefill_block_n),
            decode_block_n=max(16, cfg.decode_block_n),
        )
    num_prefill, num_prefill_tokens, num_decode = (int(x) for x in batch_info.tolist())

    if rope_cos is not None:  # RoPE (and the per-head norms) of q and k in the cache write: one launch
        q = rope_write_kv(q, k, v, rope_cos, rope_sin, rope_interleaved, k_cache, v_cache, slot_mapping, kv_scale,
                          q_norm_weight, k_norm_weight, qk_norm_eps, qk_norm_weight_offset)
    else:
        if q_norm_weight is not None or k_norm_weight is not None:
            raise ValueError("triton_cached_attention: q/k norm weights are taken only with rope_cos/rope_sin")
        write_kv(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    # float8 pools hold k / kv_scale and v / kv_scale: the K factor joins the logit scale, the V factor scales the
    # normalised output inside the kernels
    kv_scale = float(kv_scale) if k_cache.dtype in FP8_CACHE_DTYPES else 1.0

    scale = d**-0.5 if scale is None else float(scale)
    has_cap = logit_cap is not None and logit_cap > 0
    has_window = sliding_window is not None and sliding_window > 0
    has_chunk = chunk_size is not None and chunk_size > 0
    scalars = dict(
        qk_scale=scale * kv_scale * LOG2E,
        cap_scale=float(logit_cap) * LOG2E if has_cap else 0.0,
        cap_inv=scale * kv_scale / float(logit_cap) if has_cap else 0.0,
        window=int(sliding_window) if has_window else 0,
        chunk=int(chunk_size) if has_chunk else 1,
        v_scale=kv_scale,
    )
    flags = dict(
        HAS_WINDOW=has_window, HAS_CHUNK=has_chunk, HAS_CAP=has_cap, HAS_ALIBI=alibi_slopes is not None, HAS_SINKS=sinks is not None,
        UPCAST=upcast_dots(q.dtype), IEEE=q.dtype == torch.float32,
    )
    dummy = q  # stands in for absent optional pointers (never read: their flag is off)
    sinks_arg = sinks if sinks is not None else dummy
    alibi_arg = alibi_slopes if alibi_slopes is not None else dummy
    cache_strides = (
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), page_table.stride(0),
    )
    block_d, block_dv = max(16, next_pow2(d)), max(16, next_pow2(dv))

    if num_prefill > 0 and num_prefill_tokens > 0:
        block_m = cfg.prefill_block_m
        heads = heads_per_program(group, max(1, block_m // 16))
        tok = block_m // heads
        num_hg = group // heads
        grid = (n_kv * num_hg, triton.cdiv(num_prefill_tokens, tok) + num_prefill)
        _prefill_kernel[grid](
            q, k_cache, v_cache, out, seq_lens, cu_seqlens, cache_lens, page_table, sinks_arg, alibi_arg,
            num_prefill, q.stride(1), q.stride(2), out.stride(1), out.stride(2), *cache_strides, **scalars,
            G=group, HEADS=heads, NUM_HG=num_hg, TOK=tok, D=d, DV=dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
            BLOCK_M=block_m, BLOCK_N=cfg.prefill_block_n, BLOCK_SEQ=PREFILL_SEQ_BLOCK, PAGE=page, **flags,
            num_warps=cfg.prefill_warps, num_stages=cfg.prefill_stages,
        )

    if num_decode > 0:
        heads = heads_per_program(group, 64)
        num_hg = group // heads
        if config is None and q.device.type == "cuda":
            cfg = decode_tile_for(num_decode * n_kv * num_hg, k_cache.dtype, max(d, dv), q.device, cfg)
        block_n = cfg.decode_block_n
        max_ctx = page_table.shape[1] * page
        splits = num_splits or decode_splits(num_decode, n_kv * num_hg, max_ctx, block_n, q.device)
        split = splits > 1
        if split:
            part_acc = torch.empty((num_decode, n_q, splits, dv), dtype=torch.float32, device=q.device)
            part_ml = torch.empty((num_decode, n_q, splits, 2), dtype=torch.float32, device=q.device)
        else:
            part_acc = part_ml = out
        _decode_kernel[(num_decode, n_kv * num_hg, splits)](
            q, k_cache, v_cache, out, part_acc, part_ml, seq_lens, cu_seqlens, cache_lens, page_table,
            sinks_arg, alibi_arg, num_prefill, splits, n_q,
            q.stride(1), q.stride(2), out.stride(1), out.stride(2), *cache_strides, **scalars,
            G=group, HEADS=heads, NUM_HG=num_hg, D=d, DV=dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
            BLOCK_H=max(16, next_pow2(heads)), BLOCK_N=block_n, PAGE=page, SPLIT=split, **flags,
            num_warps=cfg.decode_warps, num_stages=cfg.decode_stages, **pdl_flags(q.device, num_decode),
            **({} if cfg.decode_maxnreg is None else {"maxnreg": cfg.decode_maxnreg}),
        )
        if split:
            _decode_reduce_kernel[(num_decode, n_q)](
                part_acc, part_ml, out, seq_lens, cu_seqlens, sinks_arg, num_prefill, splits, n_q,
                out.stride(1), out.stride(2), kv_scale, DV=dv, BLOCK_DV=block_dv, BLOCK_S=next_pow2(splits),
                HAS_SINKS=sinks is not None, num_warps=4, **pdl_flags(q.device, num_decode),
            )
    return out


@torch.library.custom_op("autodeploy::triton_cached_attention", mutates_args=("k_cache", "v_cache"))
def triton_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cache_lens: torch.Tensor,
    page_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    batch_info: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    chunk_size: int | None = None,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    *,
    kv_scale: float = 1.0,
    rope_interleaved: bool = False,
    qk_norm_eps: float = 1e-6,
    qk_norm_weight_offset: float = 0.0,
) -> torch.Tensor:
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return cached_attention_into(
        out, q, k, v, k_cache, v_cache, seq_lens, cu_seqlens, cache_lens, page_table, slot_mapping, batch_info,
        scale, sliding_window, logit_cap, sinks, alibi_slopes, chunk_size, kv_scale=kv_scale,
        rope_cos=rope_cos, rope_sin=rope_sin, rope_interleaved=rope_interleaved, q_norm_weight=q_norm_weight,
        k_norm_weight=k_norm_weight, qk_norm_eps=qk_norm_eps, qk_norm_weight_offset=qk_norm_weight_offset,
    )


triton_cached_attention.register_fake(_reference.cached_attention_fake)
