"""What a member's vLLM says about itself in ``/metrics``, for cache-aware routing and admission.

Read every ``health_interval`` while the pool routes ``cache_aware``, and every
``saturation_scrape_interval`` while admission from the engines' state is on (``saturation.py``):
requests waiting and running in the engine (waiting is part of a member's load), KV-cache usage,
the prefix cache's hits and queries (in tokens; the actual hit rate beside the gateway's
prediction), the block size and block count
(``vllm:cache_config_info``), and the process start time (a new one means a restarted engine, whose
cache is empty). Samples of one name are summed over engines and models. Only the lines of these
names are parsed, so a scrape of a large exposition costs little. ``scrape`` is the one way both
read a member's own endpoints: one request under a timeout, its body read up to
``MAX_METRICS_BYTES``.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass

from vllm_gateway.backends.base import Backend, UpstreamRequest
from vllm_gateway.errors import GatewayError

__all__ = ["MAX_METRICS_BYTES", "EngineGauges", "parse_engine_metrics", "scrape"]

MAX_METRICS_BYTES = 8 << 20

_SUMMED = {
    b"vllm:num_requests_waiting": "waiting",
    b"vllm:num_requests_running": "running",
    b"vllm:kv_cache_usage_perc": "kv_usage",
    b"vllm:prefix_cache_hits_total": "prefix_hits",
    b"vllm:prefix_cache_queries_total": "prefix_queries",
}


@dataclass(slots=True)
class EngineGauges:
    """A member's engine as its last scrape showed it (None: not read, or not exposed)."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float | None = None
    prefix_hits: float | None = None  # tokens, since the engine started
    prefix_queries: float | None = None
    block_size: int | None = None
    num_blocks: int | None = None
    started: float | None = None  # process_start_time_seconds


def parse_engine_metrics(text: bytes) -> EngineGauges:
    found: dict[str, float] = {}
    gauges = EngineGauges()
    for line in text.split(b"\n"):
        if not line.startswith((b"vllm:", b"process_start_time_seconds")):
            continue
        head, _, value = line.rpartition(b" ")
        name, _, labels = head.partition(b"{")
        try:
            number = float(value)
        except ValueError:
            continue
        field = _SUMMED.get(name.strip())
        if field is not None:
            found[field] = found.get(field, 0.0) + number
        elif name == b"vllm:cache_config_info":
            gauges.block_size = _label_int(labels, b"block_size") or gauges.block_size
            gauges.num_blocks = _label_int(labels, b"num_gpu_blocks") or gauges.num_blocks
        elif name.strip() == b"process_start_time_seconds":
            gauges.started = number
    gauges.waiting = found.get("waiting", 0.0)
    gauges.running = found.get("running", 0.0)
    gauges.kv_usage = found.get("kv_usage")
    gauges.prefix_hits = found.get("prefix_hits")
    gauges.prefix_queries = found.get("prefix_queries")
    return gauges


def _label_int(labels: bytes, name: bytes) -> int | None:
    found = re.search(rb"(?:^|[{,])\s*" + re.escape(name) + rb'="(\d+)"', labels)
    return int(found.group(1)) if found else None


async def scrape(backend: Backend, path: str, timeout: float, tag: str) -> bytes | None:
    """GET ``path`` from a member's own ``backend``: its body on a 200, else None (an error,
    another status, or no answer within ``timeout``). ``tag`` starts the request's id."""
    request = UpstreamRequest("GET", path, request_id=f"{tag}-{os.urandom(6).hex()}")
    try:
        async with asyncio.timeout(timeout):
            resp = await backend.send(request)
            try:
                body = await resp.read(MAX_METRICS_BYTES)
            finally:
                await resp.aclose()
    except (TimeoutError, GatewayError):
        return None
    return body if resp.status == 200 else None
