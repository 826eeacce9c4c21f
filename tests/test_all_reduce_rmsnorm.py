"""The fused all-reduce + residual add + RMSNorm kernel's protocol, on CPU under the Triton interpreter.

Ranks share one process here, so their buffers are ordinary CPU tensors addressed through the same pointer
tables the GPUs use. The interpreter runs one launch at a time, so the ranks run one after another: before
rank ``r`` runs, the ranks after it (not yet run in this call) are played by hand (their partial sums put in
``r``'s slots, their flags raised), while the ranks before it ran for real and pushed their own. Each rank's
result is then checked against the reference, and what the real ranks wrote (data and flags) is what the
next rank reads; the two-GPU test in ``test_symm_all_reduce.py`` runs them concurrently.
"""

from __future__ import annotations

import pytest
import torch

from autodeploy.custom_ops.rmsnorm import fused_add_rmsnorm_reference

triton_ar = pytest.importorskip("autodeploy.custom_ops.triton.all_reduce_rmsnorm")
MAX_PROGRAMS = triton_ar.MAX_PROGRAMS


class SimulatedGroup:
    """``world`` ranks' flag tables, data regions and states in this process."""

    def __init__(self, world: int, slot_bytes: int):
        self.world, self.slot_bytes = world, slot_bytes
        self.flag_bytes = triton_ar.flag_table_bytes(world)
        size = self.flag_bytes + triton_ar.data_region_bytes(world, slot_bytes)
        self.buffers = [torch.zeros(size, dtype=torch.uint8) for _ in range(world)]
        flag_ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)
        self.peers = [
            triton_ar.PeerBuffers(r, world, flag_ptrs + self.flag_bytes, flag_ptrs, torch.zeros(2, dtype=torch.int64),
                                  slot_bytes)
            for r in range(world)
        ]

    def flags(self, rank: int) -> torch.Tensor:
        return self.buffers[rank][: self.flag_bytes].view(torch.int64).view(MAX_PROGRAMS, self.world)

    def slot(self, rank: int, parity: int, src: int, dtype: torch.dtype) -> torch.Tensor:
        start = self.flag_bytes + (parity * self.world + src) * self.slot_bytes
        return self.buffers[rank][start: start + self.slot_bytes].view(dtype)

    def call(self, partials: list[torch.Tensor], residual, weight, eps, offset) -> list[tuple]:
        epoch = int(self.peers[0].state[0])
        parity, rows = epoch % 2, partials[0].shape[0]
        grid = min(rows, MAX_PROGRAMS)
        outs = []
        for rank in range(self.world):
            for src in range(rank + 1, self.world):  # not run yet in this call: played by hand
                self.slot(rank, parity, src, partials[src].dtype)[: partials[src].numel()] = partials[src].reshape(-1)
                self.flags(rank)[:grid, src] = epoch + 1
            for src in range(rank):  # ran for real: their flags must be up, or this rank would spin forever
                assert (self.flags(rank)[:grid, src] == epoch + 1).all(), (rank, src, self.flags(rank)[:grid])
            outs.append(triton_ar.all_reduce_rmsnorm_launch(partials[rank], residual, weight, eps, offset,
                                                           self.peers[rank]))
            assert self.peers[rank].state.tolist() == [epoch + 1, 0]
        return outs


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_all_reduce_rmsnorm_matches_reference_over_calls(world, dtype):
    hidden, eps = 40, 1e-5
    group = SimulatedGroup(world, slot_bytes=80 * hidden * 4)
    weight = torch.randn(hidden).to(dtype)
    for call, (rows, offset) in enumerate([(1, 0.0), (5, 1.0), (70, 0.0), (3, 0.0)]):  # 70 rows: > one per program
        partials = [torch.randn(rows, hidden).to(dtype) for _ in range(world)]
        residual = torch.randn(rows, hidden).to(dtype)
        reduced = torch.stack([p.float() for p in partials]).sum(0).to(dtype)
        normed, summed = fused_add_rmsnorm_reference(reduced, residual, weight, eps, offset)
        outs = group.call(partials, residual, weight, eps, offset)
        for rank, (got_normed, got_summed) in enumerate(outs):
            assert torch.equal(got_summed, summed), (call, rank)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(got_normed, normed, atol=tol, rtol=tol)
            assert torch.equal(got_normed, outs[0][0]), "every rank must get the same bits"
        for rank in range(world):  # this call's data sit in its parity's slots, the other parity's are untouched
            for src in range(world):
                got = group.slot(rank, call % 2, src, dtype)[: rows * hidden].view(rows, hidden)
                assert torch.equal(got, partials[src]), (call, rank, src)


def test_peer_buffers_take_what_fits_one_slot():
    group = SimulatedGroup(2, slot_bytes=4 * 64 * 2)
    peers = group.peers[0]
    assert peers.takes(torch.empty(4, 64, dtype=torch.bfloat16))
    assert not peers.takes(torch.empty(5, 64, dtype=torch.bfloat16))
    assert not peers.takes(torch.empty(4, 64, dtype=torch.float32))
    assert not peers.takes(torch.empty(0, 64, dtype=torch.bfloat16))
