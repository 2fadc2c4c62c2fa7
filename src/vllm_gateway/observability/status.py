"""The live status page: a ring of per-second aggregates, the snapshot it draws from, and its HTML.

``StatusBoard.record`` is called by the observer once per ended request; ``tick`` closes the
current second once a second (``run_ticker``, a task of the composition root's lifecycle). The
ring keeps ``seconds`` points (10 minutes by default): requests and errors ended, content events
relayed, in flight and queue depth sampled at the tick, and per-second percentiles of TTFT,
inter-token latency and queue wait (computed at the tick from that second's values, then dropped).

Events per second count the streams still open too: at each tick the board adds up ``chunks`` of
the calls in ``gateway.active`` (a sum over the requests in flight once a second, no per-chunk
work) plus those of the calls that ended, and takes the difference from the last tick.

The page (``page()``: static HTML, vanilla JS, no external assets) and ``snapshot`` (the JSON it
draws from: live gauges read at request time, the ring, backends, recent failed requests) are
served as ``GET /status`` and ``GET /status/data`` by the routes off the hot path (``edge/api.py``).

The queue is shown by tenant and priority class (``queue``). The failed requests are the last
``recent_errors``, each field a client chose (model, path) cut to ``FIELD_CHARS``: a peer cannot
make the board hold more than that. A tenant's key sees its own queue rows and failed requests
only; an admin key, or anyone when no client keys are set, sees them all.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

from vllm_gateway.backends.base import BackendStats
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.record import CallRecord

__all__ = ["FIELD_CHARS", "StatusBoard", "clip", "page"]

# The most characters of a client-chosen value (a model name, a path) the board or a log line keeps.
FIELD_CHARS = 256

SERIES = (
    "t",
    "requests",
    "errors",
    "events",
    "in_flight",
    "queued",
    "queue_wait_p95",
    "ttft_p50",
    "ttft_p95",
    "itl_p50",
    "itl_p95",
)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, int(q * len(values)))]


def clip(value: str | None, limit: int = FIELD_CHARS) -> str | None:
    """``value`` cut to ``limit`` characters, the cut marked with how much was left out."""
    if value is None or len(value) <= limit:
        return value
    return f"{value[:limit]}...({len(value) - limit} more)"


def _task_count() -> int | None:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop (a snapshot taken outside the server)
        return None


class StatusBoard:
    def __init__(self, gateway: Gateway, seconds: int = 600, recent_errors: int = 50) -> None:
        self.gateway = gateway
        self.points: deque[tuple[Any, ...]] = deque(maxlen=seconds)
        self.errors: deque[dict[str, Any]] = deque(maxlen=recent_errors)
        self.backends: Callable[[], list[BackendStats]] = list
        self.requests_total = 0
        self.errors_total = 0
        self.ended_events = 0
        self._last_events = 0
        self._last_tick = time.monotonic()
        self._reset_second()

    def _reset_second(self) -> None:
        self._requests = 0
        self._errors = 0
        self._ttft: list[float] = []
        self._itl: list[float] = []
        self._qwait: list[float] = []

    def record(self, call: CallRecord, outcome: str, ttft: float | None, itl: float | None) -> None:
        """One ended request (called by the observer)."""
        self._requests += 1
        self.requests_total += 1
        self.ended_events += call.chunks
        if call.admitted:
            self._qwait.append(call.queue_wait)
        if ttft is not None:
            self._ttft.append(ttft)
        if itl is not None:
            self._itl.append(itl)
        if outcome != "completed":
            self._errors += 1
            self.errors_total += 1
            self.errors.append(
                {
                    "request_id": call.request_id,
                    "tenant": call.tenant,
                    "outcome": outcome,
                    "status": call.status,
                    "route": clip(call.path),
                    "model": clip(call.model),
                    "time": time.time(),
                }
            )

    def tick(self) -> None:
        """Close the current second: one point in the ring."""
        now = time.monotonic()
        span = max(1e-3, now - self._last_tick)
        self._last_tick = now
        events = self.ended_events + sum(c.chunks for c in self.gateway.active)
        delta = events - self._last_events
        self._last_events = events
        adm = self.gateway.admission
        self.points.append(
            (
                round(time.time(), 3),
                round(self._requests / span, 3),
                round(self._errors / span, 3),
                round(max(0, delta) / span, 3),
                adm.in_flight,
                adm.queued,
                _quantile(self._qwait, 0.95),
                _quantile(self._ttft, 0.5),
                _quantile(self._ttft, 0.95),
                _quantile(self._itl, 0.5),
                _quantile(self._itl, 0.95),
            )
        )
        self._reset_second()

    async def run_ticker(self, interval: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval
        self._last_tick = time.monotonic()
        self._last_events = self.ended_events + sum(c.chunks for c in self.gateway.active)
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval
            self.tick()

    def snapshot(self, window: int = 300, tenant: str | None = None) -> dict[str, Any]:
        """The page's data; with ``tenant``, only that tenant's failed requests."""
        gw = self.gateway
        adm = gw.admission
        points = list(self.points)[-window:] if window > 0 else []
        series = {name: [p[i] for p in points] for i, name in enumerate(SERIES)}
        return {
            "now": time.time(),
            "uptime_s": round(time.time() - gw.started_at, 1),
            "live": {
                "in_flight": adm.in_flight,
                "queued": adm.queued,
                "limit": adm.limit,
                "max_queued": adm.max_queued,
                "draining": gw.draining,
                "admitted_total": adm.admitted_total,
                "rejected_full_total": adm.rejected_full_total,
                "rejected_timeout_total": adm.rejected_timeout_total,
                "requests_total": self.requests_total,
                "errors_total": self.errors_total,
                "active_calls": len(gw.active),
                # Every task of this worker: a soak compares it before and after to find leaks.
                "tasks": _task_count(),
            },
            "queue": self.queue(tenant),
            "series": series,
            "backends": self.backends(),
            "errors": [e for e in reversed(self.errors) if tenant is None or e["tenant"] == tenant],
        }

    def queue(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """The queue by tenant and priority class (with ``tenant``, its own rows only): waiters
        and the estimated wait of its next arrival, in seconds. A worker of several shows none:
        the supervisor holds the queue."""
        by_class = getattr(self.gateway.admission, "queued_by_class", None)
        if by_class is None:
            return []
        return [
            {"tenant": name, "priority": priority, "queued": queued, "eta_s": round(eta, 1)}
            for name, priority, queued, eta in by_class()
            if tenant is None or name == tenant
        ]


def page() -> bytes:
    """The status page: one static HTML file that draws from ``/status/data``."""
    return resources.files("vllm_gateway.observability").joinpath("static/status.html").read_bytes()
