"""Host-side view of an engine run without any added synchronisation: per step kind, the step's wall time and
how much of it the host spent waiting for the GPU (the previous step's sampled tokens).

With asynchronous scheduling a step whose wait is near zero was bound by the host (scheduling, packing,
publishing), one that waited was bound by the GPU. Wraps ``engine.step`` and ``_HostTokens.wait``.
"""

from __future__ import annotations

import time
from collections import defaultdict

from autodeploy.executor import engine as engine_module


class HostStepProfiler:
    def __init__(self, engine, profile_from: int | None = None, profile_steps: int = 10):
        self.engine = engine
        self.profile_from, self.profile_steps = profile_from, profile_steps
        self.profile_text: str | None = None  # cProfile of steps [profile_from, profile_from + profile_steps)
        self._profile = None
        self.records: list[tuple[str, int, float, float]] = []  # phase, running requests, wall ms, wait ms
        self._wait_s = 0.0
        self._original_step = engine.step
        self._original_wait = engine_module._HostTokens.wait
        profiler = self

        def timed_wait(host_tokens):
            t0 = time.perf_counter()
            try:
                return profiler._original_wait(host_tokens)
            finally:
                profiler._wait_s += time.perf_counter() - t0

        engine_module._HostTokens.wait = timed_wait
        engine.step = self._step

    def _step(self):
        self._wait_s = 0.0
        scheduler = self.engine.scheduler
        if self.profile_from is not None and len(self.records) == self.profile_from:
            import cProfile

            self._profile = cProfile.Profile()
            self._profile.enable()
        t0 = time.perf_counter()
        out = self._original_step()
        wall = (time.perf_counter() - t0) * 1e3
        if self._profile is not None and len(self.records) + 1 == self.profile_from + self.profile_steps:
            self._profile.disable()
            self.profile_text = self._profile_table(self._profile)
            self._profile = None
        running = len(scheduler.running)
        kind = "waiting>0" if scheduler.waiting else "decode"
        self.records.append((kind, running, wall, self._wait_s * 1e3))
        return out

    @staticmethod
    def _profile_table(profile) -> str:
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        return text.getvalue()

    def detach(self) -> None:
        self.engine.step = self._original_step
        engine_module._HostTokens.wait = self._original_wait

    def summary(self) -> list[dict]:
        """Steps grouped by phase (requests still waiting: the prefill phase) and running-batch size."""
        groups: dict[tuple, list] = defaultdict(list)
        for kind, running, wall, wait in self.records:
            bucket = 1 << max(0, (running - 1).bit_length()) if running else 0
            groups[(kind, bucket)].append((wall, wait))
        rows = []
        for (kind, bucket), items in sorted(groups.items()):
            n = len(items)
            wall = sum(i[0] for i in items)
            wait = sum(i[1] for i in items)
            rows.append({"phase": kind, "running<=": bucket, "steps": n, "wall_ms": round(wall / n, 2),
                         "wait_ms": round(wait / n, 2), "host_ms": round((wall - wait) / n, 2),
                         "total_s": round(wall / 1e3, 3)})
        return rows
