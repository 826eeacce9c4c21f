"""Prometheus metrics of one server, on its own registry (several apps may live in one process, as in tests).

- ``autodeploy_requests_total{endpoint, status}``: HTTP requests, counted by ``RequestCounter`` (ASGI).
- ``autodeploy_prompt_tokens_total`` / ``autodeploy_generation_tokens_total``; finished requests by reason.
- histograms: time to first token, inter-token latency (per engine step that gave a request tokens),
  end-to-end request latency.
- gauges read from ``engine.stats()`` at scrape time: running / waiting sequences, KV-cache usage (0..1),
  free blocks, prefix-cache hit rate, and the preemption count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..executor.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _EngineStats:
    """A collector that reads the engine's scheduler state when scraped."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        gauges = {
            "num_requests_running": ("Sequences in the running batch", stats["num_running"]),
            "num_requests_waiting": ("Sequences waiting to be scheduled", stats["num_waiting"]),
            "kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use (0..1)", stats["kv_cache_usage"]),
            "kv_cache_free_blocks": ("Free KV-cache blocks", stats["num_free_blocks"]),
            "kv_cache_blocks": ("KV-cache blocks in the pool", stats["num_blocks"]),
            "prefix_cache_hit_rate": ("Prefix-cache hit rate (0..1)", stats["prefix_cache_hit_rate"]),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"autodeploy_{name}", doc, value=value)
        yield CounterMetricFamily("autodeploy_num_preemptions", "Sequences preempted for lack of KV blocks",
                                  value=stats["num_preemptions"])


class ServerMetrics:
    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("autodeploy_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("autodeploy_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("autodeploy_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("autodeploy_request_finished", "Engine requests finished, by reason", ["reason"],
                                registry=r)
        self.ttft = Histogram("autodeploy_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("autodeploy_inter_token_latency_seconds", "Time between a request's successive tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("autodeploy_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineStats(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Observes one engine request's outputs as they arrive."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.last_token_at: float | None = None
        self.admitted = False
        self.finished = False

    def cancelled(self, num_sequences: int) -> None:
        """The client went away: the engine aborts the request, and nobody reads its last output."""
        if self.admitted and not self.finished:
            self.metrics.finished.labels("abort").inc(num_sequences)

    def observe(self, output: RequestOutput) -> None:
        m = self.metrics
        if not self.admitted:
            self.admitted = True
            m.prompt_tokens.inc(len(output.prompt_token_ids))
        new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
        if new_tokens:
            now = time.monotonic()
            m.generation_tokens.inc(new_tokens)
            if self.last_token_at is None:
                ttft = output.metrics.ttft if output.metrics is not None else None
                if ttft is not None:
                    m.ttft.observe(ttft)
            else:
                m.itl.observe(now - self.last_token_at)
            self.last_token_at = now
        if output.finished:
            self.finished = True
            for c in output.outputs:
                m.finished.labels(c.finish_reason or "error").inc()
            metrics = output.metrics
            if metrics is not None and metrics.finished_time is not None:
                m.e2e.observe(metrics.finished_time - metrics.arrival_time)


class RequestCounter:
    """ASGI middleware: counts every HTTP request by endpoint (known routes only) and response status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
