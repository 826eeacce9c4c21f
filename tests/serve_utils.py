"""Helpers for server tests: read /metrics, wait for the engine to be idle, check OpenAI error bodies."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(url: str, name: str, **labels: str) -> float:
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until_idle(url: str, timeout: float = 30.0) -> dict:
    """Poll /metrics until no sequence runs or waits and the KV cache is empty; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (
            m[("autodeploy_num_requests_running", ())] == 0
            and m[("autodeploy_num_requests_waiting", ())] == 0
            and m[("autodeploy_kv_cache_usage_ratio", ())] == 0
        )
        if idle:
            return m
        if time.monotonic() > deadline:
            state = {k[0]: v for k, v in m.items() if "num_requests" in k[0] or "kv_cache" in k[0]}
            raise AssertionError(f"engine not idle after {timeout}s: {state}")
        time.sleep(0.1)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None,
                 contains: str | None = None) -> dict[str, Any]:
    """The response is an OpenAI error body with this status (and param / code / message text)."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if contains is not None:
        assert contains in error["message"], error
    return error
