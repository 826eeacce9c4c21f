"""Timing work captured in one CUDA graph: ``capture(fn) -> (graph, out)``, ``replay_us(graph)`` (median µs of a
replay, after three warm-up replays). ``fn`` runs once on a side stream first (allocations, lazy compiles)."""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch


def capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_us(graph: torch.cuda.CUDAGraph, reps: int = 15) -> float:
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)
