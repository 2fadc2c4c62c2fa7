"""The observer: turns each ended request into metrics, a status-page sample and an access log line.

``Observer.request_ended`` is a ``gateway.observers`` member: ``ProxyCall.run``'s ``finally`` calls
it once per request (and the front door for a request it refused before a call existed). It reads
a ``proxy.record.CallRecord``; ``ended_at`` is when the last byte went to the client (else the time
the observer runs, which also counts closing the upstream response).

Invariants:
- no per-chunk work; per request it does a dict lookup for the pre-resolved ``requests_total``
  child, a few histogram observations and, when the access log is on, one log record;
- an outcome outside ``OUTCOMES`` is counted as ``other``, a path outside ``ROUTES`` as ``other``;
- it never raises into the request (``Gateway.request_ended`` also guards it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vllm_gateway.observability import access_log
from vllm_gateway.observability.metrics import (
    BACKEND_ERROR_TYPES,
    OUTCOMES,
    ROUTES,
    GatewayMetrics,
    backend_name,
)
from vllm_gateway.observability.status import StatusBoard
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.record import CallRecord
from vllm_gateway.proxy.usage import parse_usage

__all__ = ["Observer"]

_access = access_log.logger


class Observer:
    """``gateway.observers`` member: metrics, status board and access log for each ended request."""

    def __init__(
        self, gateway: Gateway, metrics: GatewayMetrics, board: StatusBoard | None = None
    ) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.board = board
        self._backend_errors = metrics.backend_errors
        self._default_backend = backend_name(gateway)
        self._pooled = gateway.backend.stats() is not None
        m = self.metrics
        # Pre-resolved children: the hot path below touches no label machinery.
        self._requests: dict[tuple[str, int, str], Any] = {}
        self._duration = {route: m.duration.labels(route) for route in (*ROUTES, "other")}
        self._queue_wait = m.queue_wait.labels()
        self._ttft = m.ttft.labels()
        self._itl = m.itl.labels()
        self._overhead = m.overhead.labels()
        self._prompt = m.tokens.labels("prompt")
        self._completion = m.tokens.labels("completion")

    def request_ended(self, call: CallRecord) -> None:
        now = time.perf_counter()
        end = call.ended_at or now
        path = call.path
        route = path if path in ROUTES else "other"
        outcome = call.outcome
        if outcome not in OUTCOMES:
            outcome = "other"
        status = call.status
        key = (route, status, outcome)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.metrics.requests.labels(route, str(status), outcome)
        child.value += 1

        started = call.started_at
        duration = end - started
        self._duration[route].observe(duration)
        queue_wait = call.queue_wait
        if call.admitted:
            self._queue_wait.observe(queue_wait)
        ttft = itl = None
        first = call.first_byte_at
        if first is not None:
            ttft = first - started
            self._ttft.observe(ttft)
            if call.stream and call.chunks > 1:
                itl = (end - first) / (call.chunks - 1)
                self._itl.observe(itl)
        overhead = call.overhead
        if overhead is not None:
            self._overhead.observe(overhead)
        prompt = completion = None
        if call.usage is not None:
            prompt, completion = parse_usage(call.usage)
            if prompt is not None:
                self._prompt.value += prompt
            if completion is not None:
                self._completion.value += completion
        for reason, result in call.failovers:
            self.metrics.failovers.labels(reason, result).inc()
        if outcome in BACKEND_ERROR_TYPES and not self._pooled:
            self._backend_errors[outcome] = self._backend_errors.get(outcome, 0) + 1

        if self.board is not None:
            self.board.record(call, outcome, ttft, itl)
        if _access.isEnabledFor(logging.INFO):
            access_log.write(
                call, route, outcome, duration, ttft, prompt, completion, self._default_backend
            )
