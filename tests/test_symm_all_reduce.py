"""The symmetric-memory all-reduce on two GPUs (skipped with fewer): equal to NCCL's, in and out of CUDA graphs."""

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


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_symm_all_reduce_matches_nccl_and_captures():
    world = 2
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(), "init")
    procs = [ctx.Process(target=_rank, args=(r, world, init_file, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    found = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not found, found
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
