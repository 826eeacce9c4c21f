"""The batch-1 decode CUDA graph of a model runner, on its own: replay time and kernel table.

Both take the runner (``engine.runner``), not the engine, so a tensor-parallel engine can run them on every rank
at once (``engine.runner.call_on_all_ranks(decode_graph_profile)``): the graph's collectives need every rank to
replay it. They are importable by the spawned ranks, which is why they live in the package.
"""

from __future__ import annotations

import torch


def decode_replay_ms(runner, replays: int = 50) -> float:
    """Device time of one batch-1 decode CUDA-graph replay (the model forward alone, no host work)."""
    graphs = runner.cuda_graphs
    if graphs is None or 1 not in graphs.graphs:
        return float("nan")
    graph = graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def decode_graph_profile(runner, replays: int = 20, top: int = 25) -> dict:
    """The GPU kernels of ``replays`` replays of the batch-1 decode graph under torch.profiler (µs per replay
    each, by total), their sum, and the replay's own time: the difference is the GPU's idle gaps. Under
    programmatic dependent launch a kernel's span includes its wait for the one before, so read it with
    ``AUTODEPLOY_PDL=0``."""
    from torch.profiler import ProfilerActivity, profile

    graph = runner.cuda_graphs.graphs[1]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:100], "calls": e.count // replays, "us": round(e.device_time_total / replays, 1)}
            for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r["us"])
    return {"kernels": rows[:top], "kernel_sum_ms": round(sum(r["us"] for r in rows) / 1e3, 3),
            "launches": sum(r["calls"] for r in rows), "replay_ms": round(decode_replay_ms(runner), 3)}
