"""Helpers for tests against the real vLLM engine: reading its Prometheus gauges.

vLLM's ``/metrics`` carries ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` with
one sample per engine and model; the helpers sum the samples of one metric name.
"""

from __future__ import annotations

import httpx

__all__ = ["metric_value", "num_requests_running", "num_requests_waiting", "read_metric"]


def metric_value(text: str, name: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus text exposition; KeyError if it has none."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric = head.split("{", 1)[0].strip()
        if metric != name:  # e.g. vllm:num_requests_waiting_by_reason for vllm:num_requests_waiting
            continue
        total += float(value)
        seen = True
    if not seen:
        raise KeyError(f"{name} not found in /metrics")
    return total


async def read_metric(url: str, name: str, timeout: float = 5.0) -> float:
    """Read one metric from ``{url}/metrics`` of a running vLLM server."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.get(f"{url}/metrics")
        response.raise_for_status()
        return metric_value(response.text, name)


async def num_requests_running(url: str) -> float:
    return await read_metric(url, "vllm:num_requests_running")


async def num_requests_waiting(url: str) -> float:
    return await read_metric(url, "vllm:num_requests_waiting")
