"""Per-step time breakdown of the engine on the GPU: where offline throughput goes.

Wraps ``runner.execute`` with CUDA events, so each step's device time (model forward) is known next to its
wall time; steps are grouped by kind (decode-only, prefill-only, mixed) and size.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class _Timer:
    """A CUDA event on GPU machines, a host clock elsewhere (so the profiler also runs in CPU smoke tests)."""

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else None
        self.t = 0.0

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def elapsed_time(self, end: "_Timer") -> float:
        if self.event is not None:
            return self.event.elapsed_time(end.event)
        return (end.t - self.t) * 1e3


class StepProfiler:
    def __init__(self, engine, trace_from: int | None = None, trace_steps: int = 6, python_profile_first: bool = False):
        self.engine = engine
        self.python_profile_first, self.first_step_profile = python_profile_first, None
        self.trace_from, self.trace_steps = trace_from, trace_steps
        self.trace_table: str | None = None
        self._profiler = None
        self._index = 0
        self.records: list[tuple[str, int, int, float, float]] = []  # kind, prefill tokens, decodes, wall, gpu
        self._original_step = engine.step
        self._original_execute = engine.runner.execute
        self._last = None
        engine.runner.execute = self._execute
        engine.step = self._step

    def _execute(self, prefills, decodes, *args, **kwargs):
        start, end = _Timer(), _Timer()
        start.record()
        out = self._original_execute(prefills, decodes, *args, **kwargs)
        end.record()
        kind = "decode" if not prefills else ("prefill" if not decodes else "mixed")
        self._last = (kind, sum(p.num_new_tokens for p in prefills), len(decodes), start, end)
        return out

    def _step(self):
        self._last = None
        if self.python_profile_first and self._index == 0:  # the host side of the first step, by function
            import cProfile
            import io
            import pstats

            profile = cProfile.Profile()
            profile.enable()
            try:
                return self._timed_step()
            finally:
                profile.disable()
                text = io.StringIO()
                pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
                self.first_step_profile = text.getvalue()
        return self._timed_step()

    def _timed_step(self):
        if self.trace_from is not None and self._index == self.trace_from:
            activity = "CUDA" if torch.cuda.is_available() else "CPU"
            self._profiler = torch.profiler.profile(activities=[getattr(torch.profiler.ProfilerActivity, activity)])
            self._profiler.__enter__()
        t0 = time.perf_counter()
        out = self._original_step()
        self._index += 1
        if self._profiler is not None and self._index == self.trace_from + self.trace_steps:
            self._profiler.__exit__(None, None, None)
            key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            self.trace_table = self._profiler.key_averages().table(sort_by=key, row_limit=25)
            self._profiler = None
        wall = (time.perf_counter() - t0) * 1e3
        if self._last is not None:
            kind, ptok, ndec, start, end = self._last
            end.synchronize()
            self.records.append((kind, ptok, ndec, wall, start.elapsed_time(end)))
        return out

    def detach(self) -> None:
        self.engine.step = self._original_step
        self.engine.runner.execute = self._original_execute

    def summary(self) -> list[dict]:
        groups: dict[tuple, list] = defaultdict(list)
        for kind, ptok, ndec, wall, gpu in self.records:
            size = ndec if kind == "decode" else ptok
            bucket = 1 << max(0, (size - 1).bit_length()) if size else 0
            groups[(kind, bucket)].append((wall, gpu, ndec, ptok))
        rows = []
        for (kind, bucket), items in sorted(groups.items()):
            n = len(items)
            rows.append({
                "kind": kind, "size<=": bucket, "steps": n,
                "wall_ms": sum(i[0] for i in items) / n, "gpu_ms": sum(i[1] for i in items) / n,
                "decodes": sum(i[2] for i in items) / n, "prefill_tokens": sum(i[3] for i in items) / n,
                "total_wall_s": sum(i[0] for i in items) / 1e3,
            })
        return rows
