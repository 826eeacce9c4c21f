"""The symmetric-memory all-reduce on two GPUs (skipped with fewer): equal to NCCL's, in and out of CUDA graphs;
and the all-reduce fused with the residual add and RMSNorm: equal to the unfused ops, call after call."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu


def _rank(rank: int, world: int, init_file: str, errors) -> None:
    try:
        import torch.distributed as dist

        from autodeploy.distributed import DistInfo, destroy_distributed, init_distributed
        from autodeploy.distributed.collectives import all_reduce
        from autodeploy.distributed.symm_all_reduce import symm_all_reduce_bytes, symm_all_reduce_takes

        device = torch.device("cuda", rank)
        init_distributed(DistInfo(rank, world, rank), device, f"file://{init_file}", all_reduce="auto")
        assert symm_all_reduce_bytes() > 0, "the symmetric-memory all-reduce did not set up"
        assert symm_all_reduce_takes(torch.ones(1, 4096, device=device, dtype=torch.bfloat16))
        assert not symm_all_reduce_takes(torch.ones(4096, 1024, device=device, dtype=torch.bfloat16))  # 8 MB
        gen = torch.Generator(device=device).manual_seed(rank)
        for shape, dtype in [((1, 4096), torch.bfloat16), ((7, 4096), torch.float16), ((256, 4096), torch.bfloat16),
                             ((3, 333), torch.float32), ((4096, 1024), torch.bfloat16)]:  # the last goes to NCCL,
            # and so does float16 where the op does not take it (torch 2.11)
            x = torch.randn(shape, generator=gen, device=device).to(dtype)
            ref = x.float().clone()
            dist.all_reduce(ref)
            out = all_reduce(x)
            torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
        x = torch.randn(2, 4096, generator=gen, device=device, dtype=torch.bfloat16)
        all_reduce(x)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = all_reduce(all_reduce(x) * 0.5)
        for step in range(3):
            x.copy_(torch.full_like(x, float(rank + step)))
            graph.replay()
            expected = sum(float(r + step) for r in range(world)) * 0.5 * world
            assert torch.equal(out, torch.full_like(out, expected)), (step, out[0, :4], expected)
        destroy_distributed()
    except BaseException as e:  # reported to the test
        errors.put(f"rank {rank}: {e!r}")


def _fused_rank(rank: int, world: int, init_file: str, errors) -> None:
    try:
        from autodeploy.custom_ops.triton.rmsnorm import triton_fused_add_rmsnorm
        from autodeploy.distributed import DistInfo, destroy_distributed, init_distributed
        from autodeploy.distributed.collectives import all_reduce
        from autodeploy.distributed.fused_all_reduce import all_reduce_add_rmsnorm, fused_all_reduce_on

        device = torch.device("cuda", rank)
        init_distributed(DistInfo(rank, world, rank), device, f"file://{init_file}", all_reduce="auto")
        assert fused_all_reduce_on(), "the fused all-reduce did not set up"

        def unfused(x, residual, weight, offset):
            return triton_fused_add_rmsnorm(all_reduce(x), residual, weight, 1e-5, offset)

        gen = torch.Generator(device=device).manual_seed(rank)
        shared = torch.Generator(device=device).manual_seed(100)  # the same residual and weight on every rank
        for call in range(300):  # back to back: both parities many times, the row count changing
            rows, hidden, dtype = [(1, 4096, torch.bfloat16), (37, 4096, torch.bfloat16), (128, 4096, torch.bfloat16),
                                   (3, 1000, torch.float32), (5, 2048, torch.float16),
                                   (4096, 1024, torch.bfloat16)][call % 6]  # the last one: NCCL + add + norm
            x = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
            residual = torch.randn(rows, hidden, generator=shared, device=device).to(dtype)
            weight = torch.rand(hidden, generator=shared, device=device).to(dtype)
            offset = float(call % 2)
            got = all_reduce_add_rmsnorm(x, residual, weight, 1e-5, offset)
            want = unfused(x, residual, weight, offset)
            assert torch.equal(got[1], want[1]), (call, rows, hidden, dtype)
            torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=2e-2)
        x = torch.randn(2, 4096, generator=gen, device=device, dtype=torch.bfloat16)
        residual = torch.ones_like(x)
        weight = torch.ones(4096, device=device, dtype=torch.bfloat16)
        all_reduce_add_rmsnorm(x, residual, weight, 1e-5)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            normed, summed = all_reduce_add_rmsnorm(x, residual, weight, 1e-5)
            for _ in range(3):  # a chain, as in a decoder: each call's sum is the next one's residual
                normed, summed = all_reduce_add_rmsnorm(normed, summed, weight, 1e-5)
        for step in range(5):
            x.copy_(torch.full_like(x, float(rank + step)))
            graph.replay()
            torch.cuda.synchronize(device)
            expected = x.clone()
            expected_normed, expected_summed = unfused(expected, residual, weight, 0.0)
            for _ in range(3):
                expected_normed, expected_summed = unfused(expected_normed, expected_summed, weight, 0.0)
            torch.testing.assert_close(summed, expected_summed, atol=2e-2, rtol=2e-2)
        destroy_distributed()
    except BaseException as e:  # reported to the test
        errors.put(f"rank {rank}: {e!r}")


def _run_ranks(target) -> None:
    world = 2
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    procs = [ctx.Process(target=target, args=(r, world, init_file, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    found = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not found, found
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


TWO_GPUS = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA GPUs")


@TWO_GPUS
def test_symm_all_reduce_matches_nccl_and_captures():
    _run_ranks(_rank)


@TWO_GPUS
def test_fused_all_reduce_rmsnorm_matches_the_unfused_ops_and_captures():
    _run_ranks(_fused_rank)
