"""Drive the engine with a synthetic workload at a given concurrency, timing every token."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch
from tqdm.auto import tqdm

from ..executor.engine import Engine
from ..executor.sampling_params import SamplingParams
from .metrics import BenchReport, RequestTimes, summarize
from .workload import SyntheticRequest


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_engine_bench(
    engine: Engine, requests: list[SyntheticRequest], concurrency: int, temperature: float = 0.0, name: str = "autodeploy"
) -> BenchReport:
    """Keep ``concurrency`` requests in flight (all of them when it is 0) until every request is done."""
    limit = concurrency or len(requests)
    pending = deque(enumerate(requests))
    times: dict[str, RequestTimes] = {}
    in_flight: dict[str, Any] = {}
    bar = tqdm(total=len(requests), desc=f"bench {name}", unit="req", disable=None)
    start = time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            i, req = pending.popleft()
            params = SamplingParams(temperature=temperature, max_tokens=req.output_len, ignore_eos=True)
            state = engine.add_request(req.prompt_token_ids, params, request_id=f"bench-{i}")
            times[state.request_id] = RequestTimes(arrival=time.perf_counter())
            in_flight[state.request_id] = state
        outputs = engine.step()
        now = time.perf_counter()
        for request_id, tokens in engine.last_sampled.items():
            times[request_id].token_times.extend([now] * len(tokens))
        for out in outputs:
            if out.finished:
                in_flight.pop(out.request_id, None)
                bar.update(1)
        failed = next((s for s in in_flight.values() if s.error is not None), None)
        if failed is not None:  # a failed step: stop at once instead of waiting for outputs that never come
            raise RuntimeError(f"benchmark request {failed.request_id} failed") from failed.error
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    bar.close()
    return summarize(name, list(times.values()), elapsed, _peak_gib(engine.device))
