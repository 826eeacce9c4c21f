"""One-shot all-reduce fused with the residual add and RMSNorm after it: ``all_reduce_rmsnorm_launch``.

Tensor parallelism ends every attention and MLP block with an all-reduce of a few KB at decode, then the
residual add and the next RMSNorm. Here one kernel does all three over buffers that every rank can address
(``PeerBuffers``; symmetric memory on NVLink-connected GPUs, see ``distributed/fused_all_reduce.py``):

1. each program stores its rows of this rank's partial sum into slot ``[parity, rank]`` of every rank's data
   region (its own included);
2. it raises its flag in every peer's flag table (a release store at system scope, after a block barrier) and
   waits until every peer's same program has raised its flag in this rank's table (acquire);
3. it sums the slots of all ranks in rank order in float32 (every rank gets the same bits), rounds to the
   dtype (what the all-reduce would return), adds the residual and normalises with the roundings of
   ``triton_fused_add_rmsnorm`` (the sum is equal bit for bit; the normalised row may differ in the last bit,
   the sum of squares being reduced in another order).

Contract of the buffers (the memory-ordering argument):

- ``state`` (local, int64 ``[2]``) holds the call count ``epoch`` and the programs finished in this call; the last
  program to finish advances ``epoch``. Every rank makes the same calls with the same row counts (collectives
  line up), so the epochs agree. A flag carries ``epoch + 1``; flags only grow, so none is ever reset.
- Call ``e`` writes slots of parity ``e % 2``. When a rank starts call ``e`` its call ``e - 1`` has finished,
  so every peer has started call ``e - 1`` and finished call ``e - 2``, the last reader of that parity: data
  may be pushed before the flags, with no second barrier.
- Reads of the slots are volatile (not cached in L1); the data were written by other GPUs.

Grid: at most ``MAX_PROGRAMS`` programs, each taking rows ``pid, pid + grid, ...``; a flag per program and
source rank. Peers spin on each other, so the grid must be resident at once: 64 programs of a few warps are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cast_rne, next_pow2, pdl_enter, pdl_flags, tl_dtype
from .rmsnorm import _normalize

MAX_PROGRAMS = 64
MAX_HIDDEN = 16384  # one pass in registers


@dataclass(frozen=True)
class PeerBuffers:
    """Where one rank's fused all-reduce reads and writes (see the module docstring for the contract).

    ``data_ptrs`` / ``flag_ptrs``: int64 ``[world]`` device tensors of every rank's data region (``2 * world``
    slots of ``slot_bytes``) and flag table (``MAX_PROGRAMS * world`` int64, zero at the start), as addresses
    valid on this rank; ``state``: this rank's int64 ``[2]`` (zero at the start).
    """

    rank: int
    world: int
    data_ptrs: torch.Tensor
    flag_ptrs: torch.Tensor
    state: torch.Tensor
    slot_bytes: int

    def takes(self, x: torch.Tensor) -> bool:
        """Whether a partial sum ``x`` ``[..., H]`` fits (one slot, one pass per row)."""
        return 0 < x.numel() * x.element_size() <= self.slot_bytes and x.shape[-1] <= MAX_HIDDEN


def flag_table_bytes(world: int) -> int:
    return MAX_PROGRAMS * world * 8


def data_region_bytes(world: int, slot_bytes: int) -> int:
    return 2 * world * slot_bytes


@triton.jit
def _all_reduce_rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, o_ptr, sum_ptr,
    data_ptrs, flag_ptrs, state_ptr,
    n_rows, H, slot_elems, eps, w_offset,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_OFFSET: tl.constexpr, X_DTYPE: tl.constexpr, PROD_DTYPE: tl.constexpr, USE_PDL: tl.constexpr,
    RNE: tl.constexpr,
):
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    epoch = tl.load(state_ptr)
    parity = epoch % 2
    part_ty = x_ptr.dtype.element_ty
    for row in range(pid, n_rows, grid):
        part = tl.load(x_ptr + row * H + cols, mask=cmask)
        for dst in tl.static_range(WORLD):
            region = tl.multiple_of(tl.load(data_ptrs + dst).to(tl.pointer_type(part_ty)), 16)  # vector stores
            tl.store(region + (parity * WORLD + RANK) * slot_elems + row * H + cols, part, mask=cmask)
    tl.debug_barrier()  # every thread's stores are issued before the flags release them
    for dst in tl.static_range(WORLD):
        if dst != RANK:
            peer_flags = tl.load(flag_ptrs + dst).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(peer_flags + pid * WORLD + RANK, epoch + 1, sem="release", scope="sys")
    own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int64))
    for src in tl.static_range(WORLD):
        if src != RANK:
            while tl.atomic_add(own_flags + pid * WORLD + src, 0, sem="acquire", scope="sys") <= epoch:
                pass
    tl.debug_barrier()
    own = tl.multiple_of(tl.load(data_ptrs + RANK).to(tl.pointer_type(part_ty)), 16)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    for row in range(pid, n_rows, grid):
        total = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for src in tl.static_range(WORLD):
            slot = own + (parity * WORLD + src) * slot_elems + row * H
            total += tl.load(slot + cols, mask=cmask, other=0.0, volatile=True).to(tl.float32)
        reduced = cast_rne(total, part_ty, RNE).to(tl.float32)
        added = (reduced + tl.load(r_ptr + row * H + cols, mask=cmask, other=0.0).to(tl.float32))
        added = cast_rne(added, sum_ptr.dtype.element_ty, RNE)
        tl.store(sum_ptr + row * H + cols, added, mask=cmask)
        xf = added.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
        y = _normalize(xf, rstd, w, w_offset, X_DTYPE, PROD_DTYPE, HAS_OFFSET)
        tl.store(o_ptr + row * H + cols, y.to(o_ptr.dtype.element_ty), mask=cmask)
    tl.debug_barrier()  # the whole program is done before it counts itself
    if tl.atomic_add(state_ptr + 1, 1) == grid - 1:  # the last program: the next call is epoch + 1
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, epoch + 1)


def all_reduce_rmsnorm_launch(
    x: torch.Tensor,  # [..., H] this rank's partial sum
    residual: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
    weight_offset: float,
    peers: PeerBuffers,
    compile_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(all_reduce(x) + residual), all_reduce(x) + residual)``; every rank must call it in step.
    ``compile_only``: build the kernel for these arguments without launching it (no peer is waited for)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()  # rows at a stride of H: offsets stay within one slot (int32)
    r2 = residual.reshape(-1, h).contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out, summed
    block_h = next_pow2(h)
    grid = (min(n_rows, MAX_PROGRAMS),)
    kernel = _all_reduce_rmsnorm_kernel
    launch = functools.partial(kernel.warmup, grid=grid) if compile_only else kernel[grid]
    launch(
        x2, r2, weight, out, summed, peers.data_ptrs, peers.flag_ptrs, peers.state,
        n_rows, h, peers.slot_bytes // x.element_size(), eps, float(weight_offset),
        RANK=peers.rank, WORLD=peers.world, BLOCK_H=block_h, HAS_OFFSET=bool(weight_offset),
        X_DTYPE=tl_dtype(sum_dtype), PROD_DTYPE=tl_dtype(torch.promote_types(sum_dtype, weight.dtype)),
        RNE=INTERPRET, **pdl_flags(x.device, n_rows), num_warps=1 if INTERPRET else max(1, min(16, block_h // 512)),
    )
    return out, summed
