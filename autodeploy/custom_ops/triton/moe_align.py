"""Expert alignment for the fused MoE (``moe.py``): routed assignments sorted by expert into ``BLOCK_M`` blocks.

A stable counting sort, no atomics (so the order, and every result after it, is deterministic): per-chunk
expert histograms, an exclusive scan over experts of the padded counts, in-chunk ranks from a cumulative sum of
one-hot ``[SUB, E_PAD]`` rows. Output, all ``int32``:

- ``sorted_ids [blocks * BLOCK_M]``: the assignment ``t * K + j`` in each row; each expert's rows start on a
  block boundary; rows past a block's ``block_rows`` are padding and left unwritten;
- ``block_expert [blocks]``: the block's expert, ``-1`` for unused blocks (always the last ones);
- ``block_rows [blocks]``: how many of its rows (always its first ones) are valid.

``blocks = max_blocks(M, E, BLOCK_M)`` whatever the routing, so grids and buffers depend on shapes only (CUDA
graphs). Ids outside ``[0, E)`` are never placed: the expert-parallel sentinel contributes nothing. Up to
``ONE_CHUNK_MAX`` assignments one launch does it all (decode); above, a histogram launch over ``CHUNK``-sized
chunks runs first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, next_pow2

ONE_CHUNK_MAX = 1024  # assignments aligned by a single launch
CHUNK = 1024  # assignments per program of the two-launch alignment
BLOCK_TABLE_ROWS = 64  # block-table entries written per alignment program


def max_blocks(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Blocks of the sorted layout for any routing: a non-empty expert wastes at most ``block_m - 1`` rows."""
    return (num_assignments + min(num_experts, num_assignments) * (block_m - 1)) // block_m



# ---- alignment --------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_histogram(ids_ptr, start, stop, E, SUB: tl.constexpr, E_PAD: tl.constexpr):
    """Counts ``[E_PAD]`` of the valid expert ids among assignments ``[start, stop)``."""
    experts = tl.arange(0, E_PAD)
    counts = tl.zeros((E_PAD,), tl.int32)
    for off in range(start, stop, SUB):
        i = off + tl.arange(0, SUB)
        ids = tl.load(ids_ptr + i, mask=i < stop, other=-1)
        hit = (ids[:, None] == experts[None, :]) & (ids[:, None] < E)  # [SUB, E_PAD]
        counts += tl.sum(hit.to(tl.int32), 0)
    return counts


@triton.jit(do_not_specialize=["M", "chunk_size"])  # per-step values: no recompiles
def _moe_count_kernel(ids_ptr, hist_ptr, M, E, chunk_size, SUB: tl.constexpr, E_PAD: tl.constexpr):
    chunk = tl.program_id(0)
    start = chunk * chunk_size
    counts = _chunk_histogram(ids_ptr, start, tl.minimum(start + chunk_size, M), E, SUB, E_PAD)
    tl.store(hist_ptr + chunk * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit(do_not_specialize=["M", "chunk_size", "num_chunks", "num_blocks"])
def _moe_align_kernel(
    ids_ptr, hist_ptr, sorted_ptr, blk_expert_ptr, blk_rows_ptr,
    M, E, chunk_size, num_chunks, num_blocks,
    BLOCK_M: tl.constexpr, SUB: tl.constexpr, E_PAD: tl.constexpr,
    TABLE_ROWS: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    if ONE_CHUNK:
        total = _chunk_histogram(ids_ptr, 0, M, E, SUB, E_PAD)  # [E_PAD]
        before = tl.zeros((E_PAD,), tl.int32)
    else:  # a loop over the chunks (not a [chunks, E_PAD] tile): one compiled variant for every batch size
        total = tl.zeros((E_PAD,), tl.int32)
        before = tl.zeros((E_PAD,), tl.int32)  # this expert's rows in earlier chunks
        for c in range(0, num_chunks):
            hist = tl.load(hist_ptr + c * E_PAD + experts)
            total += hist
            before += tl.where(c < pid, hist, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded  # first row of each expert
    if pid < num_chunks:  # place this chunk's assignments: stable within each expert
        next_row = start + before  # [E_PAD]
        stop = tl.minimum((pid + 1) * chunk_size, M)
        for off in range(pid * chunk_size, stop, SUB):
            i = off + tl.arange(0, SUB)
            ids = tl.load(ids_ptr + i, mask=i < stop, other=-1)
            valid = (ids >= 0) & (ids < E)
            hit = (ids[:, None] == experts[None, :]) & valid[:, None]  # [SUB, E_PAD]
            hits = hit.to(tl.int32)
            rank = tl.cumsum(hits, 0) + next_row[None, :] - 1  # row of assignment i if its expert is e
            row = tl.sum(tl.where(hit, rank, 0), 1)
            tl.store(sorted_ptr + row, i, mask=valid)
            next_row += tl.sum(hits, 0)
    b = pid * TABLE_ROWS + tl.arange(0, TABLE_ROWS)  # this program's share of the block table
    first = b * BLOCK_M
    inside = (first[:, None] >= start[None, :]) & (first[:, None] < end[None, :])  # [TABLE_ROWS, E_PAD]
    expert = tl.sum(tl.where(inside, experts[None, :], 0), 1)
    rows = tl.sum(tl.where(inside, start[None, :] + total[None, :] - first[:, None], 0), 1)
    used = tl.sum(inside.to(tl.int32), 1) > 0
    tl.store(blk_expert_ptr + b, tl.where(used, expert, -1), mask=b < num_blocks)
    tl.store(blk_rows_ptr + b, tl.minimum(rows, BLOCK_M), mask=b < num_blocks)


@dataclass
class SortedRouting:
    """The aligned layout: ``sorted_ids [blocks * block_m]``, ``block_expert`` and ``block_rows [blocks]``."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    block_rows: torch.Tensor
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def align_routing(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    chunk: int = CHUNK,
    one_chunk_max: int = ONE_CHUNK_MAX,
) -> SortedRouting:
    """Sort ``topk_ids.flatten()`` by expert into ``block_m``-aligned groups (one or two launches).

    Rows of ``sorted_ids`` past a block's ``block_rows`` are padding and left unwritten.
    """
    ids = topk_ids.reshape(-1)
    m = ids.numel()
    blocks = max_blocks(m, num_experts, block_m)
    e_pad = next_pow2(num_experts)
    meta = torch.empty(blocks * block_m + 2 * blocks, dtype=torch.int32, device=ids.device)
    sorted_ids, block_expert, block_rows = meta.split([blocks * block_m, blocks, blocks])
    one_chunk = m <= one_chunk_max
    chunk = m if one_chunk else chunk
    num_chunks = 1 if one_chunk else triton.cdiv(m, chunk)
    sub = max(16, min(8192 // e_pad, 1024, next_pow2(m)))  # one-hot tiles [SUB, E_PAD]; few variants
    warps = 1 if INTERPRET else 4
    hist = meta
    if not one_chunk:
        hist = torch.empty((num_chunks, e_pad), dtype=torch.int32, device=ids.device)
        _moe_count_kernel[(num_chunks,)](
            ids, hist, m, num_experts, chunk, SUB=sub, E_PAD=e_pad, num_warps=warps
        )
    grid = max(num_chunks, triton.cdiv(blocks, BLOCK_TABLE_ROWS))
    _moe_align_kernel[(grid,)](
        ids, hist, sorted_ids, block_expert, block_rows, m, num_experts, chunk, num_chunks, blocks,
        BLOCK_M=block_m, SUB=sub, E_PAD=e_pad,
        TABLE_ROWS=BLOCK_TABLE_ROWS, ONE_CHUNK=one_chunk, num_warps=warps,
    )
    return SortedRouting(sorted_ids, block_expert, block_rows, block_m)
