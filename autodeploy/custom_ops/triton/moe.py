"""Triton fused mixture-of-experts: ``autodeploy::triton_moe`` (contract: ``custom_ops/moe.py``).

Three to five launches (three for one token), every grid and buffer sized from tensor shapes only
(``M = T * K`` assignments, ``E`` experts), no host syncs, so decode steps capture into CUDA graphs:

1. **Align** (``moe_align.py``, one launch for decode-sized batches, two above): assignments sorted by expert
   into ``BLOCK_M``-row blocks, a block table (expert, valid rows) beside them; the GEMM grids cover
   ``max_blocks(M, E, BLOCK_M)`` blocks whatever the routing and surplus programs exit at once. Ids outside
   ``[0, E)`` are never placed (the expert-parallel sentinel contributes nothing). A single token (batch-1
   decode) skips alignment: block ``j`` is assignment ``j`` alone, its expert read from ``topk_ids`` (top-k
   experts are distinct, so nothing is read twice).
2. **GEMM 1** (``_moe_up_kernel``): per (block, ``BLOCK_N`` weight rows) ``x[tokens] @ w_up[e]^T`` with the
   token rows gathered through ``sorted_ids``. When gated, a tile's weight rows are the gate rows of
   ``BLOCK_N / 2`` channels and the matching up rows (concatenated layout) or ``BLOCK_N`` consecutive rows
   (interleaved layout), so gate and up come from one ``tl.dot`` and the epilogue splits the accumulator,
   adds the bias and applies the activation (silu, gelu, gelu_tanh, relu, relu2, gpt-oss's clamped
   ``swiglu_oai``). Output ``h [rows, I]`` in the model dtype, in sorted order.
3. **GEMM 2** (``_moe_down_kernel``): ``h @ w_down[e]^T`` (+ bias), times the assignment's routing weight in
   fp32, stored to ``y[t * K + j]`` (model dtype).
4. **Top-k sum** (``_moe_sum_kernel``): ``out[t] = sum_j y[t * K + j]`` over the valid ``j`` in fp32, in
   order, rounded once. A deterministic second pass rather than fp32 atomics in GEMM 2: the output is
   bit-reproducible (same batch, same tokens: CUDA-graph and eager decode agree exactly), needs no zeroed
   fp32 buffer (a memset launch) nor a cast pass to the model dtype afterwards, and costs one read + write of
   ``M x H`` in the model dtype (decode: 32 KB; 4096 tokens x top-8: 268 MB, ~0.09 ms at 3 TB/s).

Rounding follows the reference where it is free: the projection is rounded to the model dtype before the
bias and again after it, the activation is rounded before its product with ``up`` (gpt-oss's form runs in
fp32), the down projection (+ bias) is rounded before the routing weight. A row's arithmetic does not depend
on where the sort puts it, so results are deterministic for a given tile configuration.

Tiles (``default_tiles``) follow the rows per expert, ``M / E``: one token gets wide GEMM-1 tiles (128 weight
rows, 8 warps) and 256-long GEMM-2 steps (the engine sweep of run 33), decode-like batches (<= 16 rows per expert)
use 16-row blocks with long K steps (memory-bound: one pass over the active experts' weights, many programs in
flight), prefill uses 64/128-row blocks with wgmma-sized tiles (256 weight rows from 128 rows per expert on, 128
with float8 weights, which convert every weight tile) and a grouped program order so the blocks of one expert
share weight tiles in L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import moe as _reference  # noqa: F401  (registers the torch op family)
from ..quant_linear import FP8_DTYPE
from ._common import INTERPRET, cast_rne, mma, next_pow2, pdl_enter, pdl_flags, to_fp16_clamped, upcast_dots
from .moe_align import CHUNK, ONE_CHUNK_MAX, align_routing
from .glu import ACTIVATION_CODES, _activate

SWIGLU_OAI = 5  # the kernel's ACT code for gpt-oss's clamped gate


@dataclass(frozen=True)
class MoeTiles:
    """Tile sizes and launch shapes; ``default_tiles`` picks them from the problem size and dtype."""

    block_m: int = 16  # rows (assignments) per block; every expert's rows are padded to a multiple of it
    up_n: int = 64  # weight rows of w_up per GEMM-1 tile (gate + up rows when gated: BLOCK_N / 2 channels)
    up_k: int = 128
    up_warps: int = 4
    up_stages: int = 4
    down_n: int = 64  # output columns per GEMM-2 tile
    down_k: int = 128
    down_warps: int = 4
    down_stages: int = 4
    group_m: int = 8  # blocks per group in the program order (L2 reuse of weight tiles)


def default_tiles(
    num_assignments: int, num_experts: int, dtype: torch.dtype, device: torch.device, one_token: bool = False,
    fp8_weights: bool = False,
) -> MoeTiles:
    rows_per_expert = num_assignments / max(1, num_experts)
    if device.type != "cuda":  # interpreter: its time goes by program, not by tile size
        return MoeTiles(16 if rows_per_expert <= 16 else 64, 64, 64, 1, 1, 64, 64, 1, 1, 4)
    if dtype == torch.float32:  # exact fp32 products (no tensor cores): small register tiles, for tests only
        block_m = 16 if rows_per_expert <= 16 else 32
        return MoeTiles(block_m, 64, 32, 4, 2, 64, 32, 4, 2)
    if one_token:  # the direct path (run 33: Qwen3-30B-A3B decode 3.157 vs 3.185 ms)
        return MoeTiles(16, 128, 128, 8, 4, 64, 256, 4, 3)
    if rows_per_expert <= 16:  # decode: memory-bound on the active experts' weights
        return MoeTiles(16, 64, 128, 4, 4, 64, 128, 4, 4)
    if rows_per_expert <= 32:
        return MoeTiles(32, 64, 128, 4, 4, 64, 128, 4, 4)
    if rows_per_expert <= 96:
        return MoeTiles(64, 128, 64, 4, 4, 128, 64, 4, 4)
    if fp8_weights:  # H200 sweep (run 63), 4096 / 8192 tokens: 1,219 / 2,132 µs against 1,341 / 2,343 at 8 warps
        return MoeTiles(128, 128, 64, 4, 4, 128, 64, 4, 4)
    return MoeTiles(128, 256, 64, 8, 4, 256, 64, 8, 4, group_m=16)  # run 63: 941 / 1,700 µs against 1,080 / 1,917


# ---- grouped GEMMs ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(block, column tile) of program ``pid``: ``GROUP_M`` blocks sweep each column tile together."""
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % rows
    pid_n = (pid % in_group) // rows
    return pid_m, pid_n


@triton.jit
def _block(pid_m, sorted_ptr, blk_expert_ptr, blk_rows_ptr, E, BLOCK_M: tl.constexpr, DIRECT: tl.constexpr):
    """Block ``pid_m``: its expert (-1: nothing to do), valid-row mask, assignment and buffer row of each row.

    ``DIRECT`` (one token, no alignment launch): block ``b`` is assignment ``b`` alone and ``sorted_ptr`` points
    at the routed expert ids themselves.
    """
    r = tl.arange(0, BLOCK_M)
    if DIRECT:
        routed = tl.load(sorted_ptr + pid_m)
        expert = tl.where((routed >= 0) & (routed < E), routed, -1).to(tl.int32)
        row_ok = r < 1
        assign = pid_m + r * 0
        rows = pid_m + r
    else:
        expert = tl.load(blk_expert_ptr + pid_m)
        row_ok = r < tl.load(blk_rows_ptr + pid_m)
        rows = pid_m * BLOCK_M + r
        assign = tl.load(sorted_ptr + rows, mask=row_ok, other=0)
    return expert, row_ok, assign, rows


@triton.jit
def _operands(a, w, W_SCALED: tl.constexpr, BLOCK_M: tl.constexpr):
    """The product's operands: ``w`` in ``a``'s dtype, except float8 codes in blocks of up to 16 rows (decode), which
    multiply in float16 with the activations (``to_fp16_clamped``): fp8 -> fp16 is one conversion per two codes,
    and float16 holds every code and, in its range, every bf16 activation exactly. H200, Qwen3-30B-A3B experts (run
    58): one token 26.1 -> 22.2 µs, 64 tokens 245 -> 221; with 32-128-row blocks converting the activations too
    costs more than it saves (512 tokens 464 -> 540, 4096 tokens 1,351 -> 1,536)."""
    if W_SCALED and BLOCK_M <= 16 and a.dtype != tl.float32:
        a = to_fp16_clamped(a)
    return a, w.to(a.dtype)


@triton.jit
def _scaled(acc, scale_ptrs, col_ok, W_SCALED: tl.constexpr):
    """A float8 expert's accumulator times its weight rows' scales (``[BLOCK_N]`` pointers); else ``acc``."""
    if W_SCALED:
        acc = acc * tl.load(scale_ptrs, mask=col_ok, other=0.0)[None, :]
    return acc


@triton.jit
def _moe_up_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, h_ptr, sorted_ptr, blk_expert_ptr, blk_rows_ptr,
    H, U, I, E, top_k, num_blocks,
    stride_xt, stride_we, stride_wn, stride_wk, stride_wse, stride_be, stride_hm,
    limit, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COLS: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GATED: tl.constexpr, INTERLEAVED: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr,
    HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, RNE: tl.constexpr, DIRECT: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    pid_m, pid_n = _tile_of(tl.program_id(0), num_blocks, tl.cdiv(I, COLS), GROUP_M)
    expert, row_ok, assign, rows = _block(pid_m, sorted_ptr, blk_expert_ptr, blk_rows_ptr, E, BLOCK_M, DIRECT)
    if expert >= 0:
        e64 = expert.to(tl.int64)
        tok = (assign // top_k).to(tl.int64)  # [BLOCK_M]
        j = tl.arange(0, BLOCK_N)
        if GATED and not INTERLEAVED:  # gate rows c, then up rows I + c, of the same channels
            chan = pid_n * COLS + j % COLS
            w_row = tl.where(j < COLS, chan, chan + I)
            col_ok = chan < I
        else:  # interleaved: rows 2c (gate) and 2c + 1 (up) are consecutive
            w_row = pid_n * BLOCK_N + j
            col_ok = w_row < U
        k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None] * stride_xt + k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + e64 * stride_we + w_row[None, :].to(tl.int64) * stride_wn + k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(tl.cdiv(H, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = k < H - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            a, w = _operands(a, w, W_SCALED, BLOCK_M)
            acc = mma(a, w, acc, UPCAST, IEEE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        dtype = h_ptr.dtype.element_ty
        acc = _scaled(acc, ws_ptr + e64 * stride_wse + w_row, col_ok, W_SCALED)
        proj = cast_rne(acc, dtype, RNE).to(tl.float32)  # [BLOCK_M, BLOCK_N]: the projection in the model dtype
        if HAS_BIAS:
            bias = tl.load(b_ptr + e64 * stride_be + w_row, mask=col_ok, other=0.0).to(tl.float32)
            proj = cast_rne(proj + bias[None, :], dtype, RNE).to(tl.float32)
        if GATED:
            if INTERLEAVED:
                gate, up = tl.split(tl.reshape(proj, (BLOCK_M, COLS, 2)))
            else:
                gate, up = tl.split(tl.permute(tl.reshape(proj, (BLOCK_M, 2, COLS)), (0, 2, 1)))
            if ACT == 5:  # swiglu_oai
                if CLAMP:
                    gate = tl.minimum(gate, limit)
                    up = tl.minimum(tl.maximum(up, -limit), limit)
                out = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
            else:
                out = cast_rne(_activate(gate, ACT), dtype, RNE).to(tl.float32) * up
        else:
            out = _activate(proj, ACT)
        c = pid_n * COLS + tl.arange(0, COLS)
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + c[None, :]
        tl.store(h_ptrs, cast_rne(out, dtype, RNE), mask=row_ok[:, None] & (c < I)[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, sorted_ptr, blk_expert_ptr, blk_rows_ptr, topw_ptr,
    N, K, E, num_blocks,
    stride_hm, stride_we, stride_wn, stride_wk, stride_wse, stride_be, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, RNE: tl.constexpr, DIRECT: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    pid_m, pid_n = _tile_of(tl.program_id(0), num_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert, row_ok, assign, rows = _block(pid_m, sorted_ptr, blk_expert_ptr, blk_rows_ptr, E, BLOCK_M, DIRECT)
    if expert >= 0:
        e64 = expert.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        k = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + k[None, :]
        w_ptrs = w_ptr + e64 * stride_we + cols[None, :].to(tl.int64) * stride_wn + k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            a, w = _operands(a, w, W_SCALED, BLOCK_M)
            acc = mma(a, w, acc, UPCAST, IEEE)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        dtype = y_ptr.dtype.element_ty
        acc = _scaled(acc, ws_ptr + e64 * stride_wse + cols, col_ok, W_SCALED)
        y = cast_rne(acc, dtype, RNE).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + e64 * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = cast_rne(y + bias[None, :], dtype, RNE).to(tl.float32)
        weight = tl.load(topw_ptr + assign, mask=row_ok, other=0.0).to(tl.float32)
        y_ptrs = y_ptr + assign[:, None].to(tl.int64) * stride_ym + cols[None, :]
        tl.store(y_ptrs, cast_rne(y * weight[:, None], dtype, RNE), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_sum_kernel(
    y_ptr, ids_ptr, out_ptr, N, E, top_k, stride_ym, stride_ot,
    BLOCK_N: tl.constexpr, K_PAD: tl.constexpr, RNE: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, K_PAD)
    ids = tl.load(ids_ptr + t * top_k + j, mask=j < top_k, other=-1)
    valid = (ids >= 0) & (ids < E)  # rows of sentinel ids were never written
    y_ptrs = y_ptr + (t * top_k + j)[:, None] * stride_ym + cols[None, :]
    y = tl.load(y_ptrs, mask=valid[:, None] & (cols < N)[None, :], other=0.0)
    total = cast_rne(tl.sum(y.to(tl.float32), 0), out_ptr.dtype.element_ty, RNE)
    tl.store(out_ptr + t * stride_ot + cols, total, mask=cols < N)


# ---- launcher ---------------------------------------------------------------------------------------------------
def _act_code(activation: str, gated: bool) -> int:
    if activation == "swiglu_oai" and gated:
        return SWIGLU_OAI
    if activation not in ACTIVATION_CODES:
        raise ValueError(
            f"triton_moe: unknown activation {activation!r}; "
            f"known: {sorted(ACTIVATION_CODES)} and swiglu_oai (gated)"
        )
    return ACTIVATION_CODES[activation]


def _check_shapes(x, topk_ids, topk_weights, w_up, w_down, b_up, b_down, gated, w_up_scale, w_down_scale) -> None:
    t, h = x.shape
    e, u, h_up = w_up.shape
    inter = u // 2 if gated else u
    problems = []
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != t:
        problems.append(
            f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} vs x with {t} rows"
        )
    if h_up != h or tuple(w_down.shape) != (e, h, inter) or (gated and u % 2):
        problems.append(f"w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)} vs hidden {h}, gated={gated}")
    bad_up = b_up is not None and tuple(b_up.shape) != (e, u)
    if bad_up or (b_down is not None and tuple(b_down.shape) != (e, h)):
        problems.append(f"biases must be [E, U] = {(e, u)} and [E, H] = {(e, h)}")
    scaled = (w_up_scale is not None, w_down_scale is not None)
    if scaled == (True, True):
        if w_up.dtype != FP8_DTYPE or w_down.dtype != FP8_DTYPE:
            problems.append(f"weights with scales must be {FP8_DTYPE}, not {w_up.dtype}/{w_down.dtype}")
        if tuple(w_up_scale.shape) != (e, u) or tuple(w_down_scale.shape) != (e, h):
            problems.append(f"weight scales must be [E, U] = {(e, u)} and [E, H] = {(e, h)}")
        if w_up_scale.dtype != torch.float32 or w_down_scale.dtype != torch.float32:
            problems.append(f"weight scales must be float32, not {w_up_scale.dtype}/{w_down_scale.dtype}")
    elif scaled != (False, False):
        problems.append("w_up_scale and w_down_scale come together")
    elif w_up.dtype != x.dtype or w_down.dtype != x.dtype:
        problems.append(f"weights {w_up.dtype}/{w_down.dtype} vs activations {x.dtype}")
    if problems:
        raise ValueError("triton_moe: " + "; ".join(problems))


def moe_into(
    out: torch.Tensor,  # [T, H], written
    x: torch.Tensor,  # [T, H]
    topk_ids: torch.Tensor,  # [T, K]
    topk_weights: torch.Tensor,  # [T, K]
    w_up: torch.Tensor,  # [E, U, H] (any strides)
    w_down: torch.Tensor,  # [E, H, I] (any strides)
    b_up: torch.Tensor | None = None,  # [E, U]
    b_down: torch.Tensor | None = None,  # [E, H]
    activation: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    limit: float | None = None,
    alpha: float | None = None,
    tiles: MoeTiles | None = None,
    chunk: int = CHUNK,
    one_chunk_max: int = ONE_CHUNK_MAX,
    force_align: bool = False,
    w_up_scale: torch.Tensor | None = None,  # [E, U] float32 with float8 w_up
    w_down_scale: torch.Tensor | None = None,  # [E, H] float32 with float8 w_down
) -> None:
    """The fused MoE of ``custom_ops/moe.py`` into ``out``.

    ``tiles``, ``chunk`` and ``one_chunk_max`` override the defaults; ``force_align`` takes the aligned path
    for a single token too (tests).
    """
    _check_shapes(x, topk_ids, topk_weights, w_up, w_down, b_up, b_down, gated, w_up_scale, w_down_scale)
    act = _act_code(activation, gated)
    t, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, u = w_up.shape[:2]
    inter = w_down.shape[2]
    if t == 0:
        return
    if top_k == 0:
        out.zero_()
        return
    m = t * top_k
    direct = t == 1 and not force_align  # one token: a block per assignment, no alignment launch
    tiles = tiles or default_tiles(m, num_experts, x.dtype, x.device, direct, w_up.dtype == FP8_DTYPE)
    x = x if x.stride(1) == 1 else x.contiguous()
    ids = topk_ids.reshape(-1)  # [M]
    if direct:
        num_blocks, h_rows = m, m
        sorted_ids, block_expert, block_rows = ids, ids, ids  # the kernels read only the routed ids
    else:
        routing = align_routing(topk_ids, num_experts, tiles.block_m, chunk, one_chunk_max)
        sorted_ids, block_expert, block_rows = routing.sorted_ids, routing.block_expert, routing.block_rows
        num_blocks, h_rows = routing.num_blocks, routing.num_blocks * tiles.block_m
    h = torch.empty((h_rows, inter), dtype=x.dtype, device=x.device)  # activations, in block order
    y = torch.empty((m, hidden), dtype=x.dtype, device=x.device)  # weighted expert outputs, row t * K + j
    upcast, ieee = upcast_dots(x.dtype), x.dtype == torch.float32
    rne = INTERPRET and x.dtype == torch.bfloat16
    interp = {"num_warps": 1, "num_stages": 1} if INTERPRET else {}
    pdl = pdl_flags(x.device, t)
    cols = tiles.up_n // 2 if gated else tiles.up_n
    scaled = w_up_scale is not None
    _moe_up_kernel[(num_blocks * triton.cdiv(inter, cols),)](
        x, w_up, w_up_scale if scaled else x, b_up if b_up is not None else x, h, sorted_ids, block_expert,
        block_rows, hidden, u, inter, num_experts, top_k, num_blocks,
        x.stride(0), *w_up.stride(), w_up_scale.stride(0) if scaled else 0,
        b_up.stride(0) if b_up is not None else 0, h.stride(0),
        float(limit) if limit is not None else 0.0, float(alpha) if alpha is not None else 1.0,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.up_n, COLS=cols, BLOCK_K=tiles.up_k, GROUP_M=tiles.group_m,
        GATED=gated, INTERLEAVED=gated and interleaved, ACT=act, CLAMP=limit is not None,
        HAS_BIAS=b_up is not None, W_SCALED=scaled, EVEN_K=hidden % tiles.up_k == 0, UPCAST=upcast, IEEE=ieee,
        RNE=rne,
        DIRECT=direct, **pdl, **(interp or {"num_warps": tiles.up_warps, "num_stages": tiles.up_stages}),
    )
    _moe_down_kernel[(num_blocks * triton.cdiv(hidden, tiles.down_n),)](
        h, w_down, w_down_scale if scaled else x, b_down if b_down is not None else x, y, sorted_ids, block_expert,
        block_rows, topk_weights.reshape(-1),
        hidden, inter, num_experts, num_blocks,
        h.stride(0), *w_down.stride(), w_down_scale.stride(0) if scaled else 0,
        b_down.stride(0) if b_down is not None else 0, y.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.down_n, BLOCK_K=tiles.down_k, GROUP_M=tiles.group_m,
        HAS_BIAS=b_down is not None, W_SCALED=scaled, EVEN_K=inter % tiles.down_k == 0, UPCAST=upcast, IEEE=ieee,
        RNE=rne,
        DIRECT=direct, **pdl, **(interp or {"num_warps": tiles.down_warps, "num_stages": tiles.down_stages}),
    )
    block_n = min(next_pow2(hidden), max(256, 4096 // next_pow2(top_k)))
    _moe_sum_kernel[(t, triton.cdiv(hidden, block_n))](
        y, ids, out, hidden, num_experts, top_k, y.stride(0), out.stride(0),
        BLOCK_N=block_n, K_PAD=next_pow2(top_k), RNE=rne, num_warps=1 if INTERPRET else 4, **pdl,
    )


@torch.library.custom_op("autodeploy::triton_moe", mutates_args=())
def triton_moe(
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
    w_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.empty_like(x)
    moe_into(
        out, x, topk_ids, topk_weights, w_up, w_down, b_up, b_down,
        activation, gated, interleaved, limit, alpha, w_up_scale=w_up_scale, w_down_scale=w_down_scale,
    )
    return out


triton_moe.register_fake(_reference.moe_fake)
