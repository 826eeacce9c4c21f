"""Latency and throughput statistics of one benchmark run."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class RequestTimes:
    arrival: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def inter_token(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass
class BenchReport:
    name: str
    num_requests: int
    output_tokens: int
    elapsed_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    peak_memory_gib: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    def as_dict(self) -> dict:
        out = asdict(self)
        out["output_tok_per_s"] = self.output_tok_per_s
        out["requests_per_s"] = self.requests_per_s
        return out


def summarize(name: str, times: list[RequestTimes], elapsed: float, peak_gib: float | None) -> BenchReport:
    ttfts = [t.ttft * 1e3 for t in times if t.token_times]
    itls = [d * 1e3 for t in times for d in t.inter_token]
    return BenchReport(
        name=name,
        num_requests=len(times),
        output_tokens=sum(len(t.token_times) for t in times),
        elapsed_s=elapsed,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        itl_p50_ms=percentile(itls, 50),
        itl_p99_ms=percentile(itls, 99),
        peak_memory_gib=peak_gib,
        extra={"ttft_mean_ms": statistics.fmean(ttfts) if ttfts else float("nan")},
    )
