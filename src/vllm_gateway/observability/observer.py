"""The observer: turns a finished request into metrics, a status-page sample and one access log line.

``install_observability(api, gateway)`` is the one entry point. It declares the metrics, adds the
observer to ``gateway.observers``, serves ``GET /metrics``, ``GET /status`` and ``GET /status/data``,
and wraps the app's lifespan to run the status ticker (and backend health sampling) while the app
is up.

Invariants:
- the observer runs once per request, at its end (``ProxyCall.run``'s ``finally``): no per-chunk
  work; per request it does a dict lookup for the pre-resolved ``requests_total`` child, a few
  histogram observations and, when the access log is on, one log record;
- label values come from fixed sets (routes, outcomes from the error tree), so the number of series
  is bounded whatever clients send; an unknown outcome is counted as ``other``;
- gauges (in flight, queue depth, draining, limit, per-backend state) are read at scrape time;
- the observer never raises into the request (``Gateway.request_ended`` also guards it).

It reads a ``proxy.record.CallRecord``: a ``ProxyCall``, or the ``RejectedCall`` of a request
answered before a call existed. ``ended_at`` is when the last byte went to the client (else the
time the observer runs, which also counts closing the upstream response).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Literal

from fastapi import FastAPI

from vllm_gateway import errors
from vllm_gateway.backends.base import BackendStats
from vllm_gateway.observability.connections import ConnectionStats
from vllm_gateway.observability.prometheus import CONTENT_TYPE, Counter, Gauge, Histogram, Registry
from vllm_gateway.observability.status import StatusBoard, clip, install_status_routes
from vllm_gateway.proxy.budget import BufferBudget
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.record import CallRecord
from vllm_gateway.proxy.routes import ROUTE_NAMES
from vllm_gateway.proxy.shared_admission import RemoteAdmission
from vllm_gateway.proxy.usage import parse_usage

__all__ = [
    "OUTCOMES",
    "ROUTES",
    "GatewayMetrics",
    "Observer",
    "install_observability",
]

log = logging.getLogger("vllm_gateway.observability.observer")
access_log = logging.getLogger("vllm_gateway.access")

ROUTES = ROUTE_NAMES


def _error_types() -> set[str]:
    found: set[str] = set()
    stack: list[type[errors.GatewayError]] = [errors.GatewayError]
    while stack:
        cls = stack.pop()
        found.add(cls.type)
        stack.extend(cls.__subclasses__())
    return found


# Outcomes of the relay plus every error ``type`` of the error tree; anything else is "other".
OUTCOMES = frozenset(
    {
        "completed",
        "client_disconnected",
        "client_too_slow",
        "client_error",
        "cancelled",
        "other",
        *_error_types(),
    }
)
# Outcomes that say the backend failed us: counted per backend as well.
BACKEND_ERROR_TYPES = frozenset(
    {
        cls.type
        for cls in (
            errors.BackendUnavailable,
            errors.BadBackendResponse,
            errors.FirstTokenTimeout,
            errors.StreamIdleTimeout,
            errors.RequestTimeout,
            errors.UpstreamError,
        )
    }
)

# Bucket bounds in seconds. Latencies of an LLM span milliseconds (queue, TTFT) to minutes (whole
# requests); the gateway's own overhead is sub-millisecond.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

# How long a worker's scrape waits for the other workers' metrics.
_PEER_SCRAPE_TIMEOUT = 1.5
# How often the backend's health is sampled for ``backend_healthy`` when it has no ``stats()``.
HEALTH_INTERVAL = 5.0


_ACCESS_LINE = (
    "request %s %s %s %s model=%s backend=%s tenant=%s queue_wait_ms=%.1f ttft_ms=%s "
    "backend_ms=%s duration_ms=%.1f chunks=%d tokens=%s/%s"
)


def _span_ms(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round((end - start) * 1000, 3)


class GatewayMetrics:
    """Every metric the gateway exports, with the names the dashboard and alerts use."""

    def __init__(self, gateway: Gateway, observer: Observer | None = None) -> None:
        self.gateway = gateway
        self._observer = observer
        r = self.registry = Registry()
        self.requests = r.register(
            Counter(
                "vllm_gateway_requests_total",
                "Inference requests that ended, by route, HTTP status and outcome.",
                ("route", "status", "outcome"),
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_requests_in_flight",
                "Requests holding an admission slot now.",
                lambda: [((), gateway.admission.in_flight)],
                merge="own",  # one admission for every worker
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_queue_depth",
                "Requests waiting for an admission slot now.",
                lambda: [((), gateway.admission.queued)],
                merge="own",
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_draining",
                "1 while the gateway drains for shutdown.",
                lambda: [((), 1.0 if gateway.draining else 0.0)],
                merge="max",
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_admission_limit",
                "Most requests allowed in flight at once.",
                lambda: [((), gateway.admission.limit)],
                merge="own",
            )
        )
        self.queue_wait = r.register(
            Histogram(
                "vllm_gateway_queue_wait_seconds",
                "Time an admitted request waited for its slot.",
                LATENCY_BUCKETS,
            )
        )
        self.ttft = r.register(
            Histogram(
                "vllm_gateway_time_to_first_token_seconds",
                "From the request's arrival to its first byte to the client (queue wait included).",
                LATENCY_BUCKETS,
            )
        )
        self.itl = r.register(
            Histogram(
                "vllm_gateway_inter_token_latency_seconds",
                "Mean gap between content events of one stream, (end - first byte) / (events - 1), "
                "observed once per stream.",
                ITL_BUCKETS,
            )
        )
        self.duration = r.register(
            Histogram(
                "vllm_gateway_request_duration_seconds",
                "From the request's arrival to its end, by route.",
                DURATION_BUCKETS,
                ("route",),
            )
        )
        self.overhead = r.register(
            Histogram(
                "vllm_gateway_overhead_seconds",
                "The gateway's own time before the upstream send: arrival to upstream send, "
                "minus the queue wait.",
                OVERHEAD_BUCKETS,
            )
        )
        self.failovers = r.register(
            Counter(
                "vllm_gateway_failovers_total",
                "Streams whose pool member failed mid-way, by reason (connection_lost, "
                "stream_idle_timeout, backend_error, ejected) and outcome (resumed on another "
                "member, completed_here, failed, not_continued:<why>).",
                ("reason", "outcome"),
            )
        )
        self.tokens = r.register(
            Counter(
                "vllm_gateway_tokens_total",
                "Tokens reported by the backend's usage, by kind.",
                ("kind",),
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_backend_in_flight",
                "Requests in flight on each backend.",
                lambda: self._backend_values("in_flight"),
                ("backend",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_backend_errors_total",
                "Backend failures by backend and error type.",
                self._backend_errors,
                ("backend", "type"),
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_backend_healthy",
                "1 if the backend passed its last health check, else 0.",
                lambda: self._backend_values("healthy"),
                ("backend",),
                merge="max",
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_backend_connections",
                "HTTP connections held to the backend now, idle or busy.",
                lambda: self._connection_counts("open"),
                ("backend",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_backend_connections_opened_total",
                "HTTP connections opened to the backend (each a TCP handshake; a cold pool "
                "shows as a jump).",
                lambda: self._connection_counts("opened"),
                ("backend",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_backend_ejections_total",
                "Times a backend was taken out of the pool.",
                lambda: self._backend_values("ejections"),
                ("backend",),
            )
        )
        # cache_aware routing (docs/pool.md): the prediction beside what each vLLM reports.
        r.register(
            _CounterView(
                "vllm_gateway_backend_cache_predicted_tokens_total",
                "cache_aware routing: prompt tokens the gateway expected each backend to serve "
                "from its prefix cache, for the requests it sent there.",
                lambda: self._cache_counts("predicted_tokens"),
                ("backend",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_backend_cache_prompt_tokens_total",
                "cache_aware routing: prompt tokens (estimated from the text) sent to each backend.",
                lambda: self._cache_counts("prompt_tokens"),
                ("backend",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_backend_prefix_cache_hits_tokens_total",
                "cache_aware routing: the backend's own vllm:prefix_cache_hits_total, as last read.",
                lambda: self._cache_values("engine_prefix_hits"),
                ("backend",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_backend_prefix_cache_queries_tokens_total",
                "cache_aware routing: the backend's own vllm:prefix_cache_queries_total, as last "
                "read.",
                lambda: self._cache_values("engine_prefix_queries"),
                ("backend",),
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_backend_cache_index_blocks",
                "cache_aware routing: blocks the gateway knows each backend holds, from its "
                "KV-cache events.",
                lambda: self._cache_values("index_blocks"),
                ("backend",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_backend_kv_events_total",
                "cache_aware routing: what the backend's KV-cache events did (events, orphans, "
                "dropped, gap, restart, bad, disconnects, resets).",
                self._cache_event_counts,
                ("backend", "kind"),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_pool_cache_decisions_total",
                "cache_aware routing: choices by reason (hit, yield, miss).",
                self._cache_decisions,
                ("decision",),
            )
        )

    # --- per-backend state, from ``backend.stats()`` or the single-backend fallback ------------

    def backend_stats(self) -> list[BackendStats]:
        try:
            stats = self.gateway.backend.stats()
        except Exception:
            log.exception("backend stats() failed")
            return []
        if stats is not None:
            return stats
        obs = self._observer
        return [
            {
                "name": backend_name(self.gateway),
                "in_flight": self.gateway.admission.in_flight,
                "healthy": None if obs is None else obs.backend_healthy,
                "errors": {} if obs is None else dict(obs.backend_errors),
                "ejections": 0,
            }
        ]

    def _backend_values(
        self, key: Literal["in_flight", "healthy", "ejections"]
    ) -> Iterable[tuple[tuple[str, ...], float]]:
        for entry in self.backend_stats():
            value = entry.get(key)
            if value is None:
                continue  # unknown (no health check yet): no sample rather than a wrong one
            yield (str(entry.get("name", "backend")),), float(value)

    def _connection_counts(
        self, key: Literal["open", "opened"]
    ) -> Iterable[tuple[tuple[str, ...], float]]:
        # A backend over HTTP keeps these; other backends have no samples.
        counts = self.gateway.backend.connection_counts()
        if counts is not None:
            yield (backend_name(self.gateway),), float(counts[key])

    def _cache_values(self, key: str) -> Iterable[tuple[tuple[str, ...], float]]:
        for entry in self.backend_stats():
            value = (entry.get("cache") or {}).get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield (str(entry.get("name", "backend")),), float(value)

    def _cache_counts(self, key: str) -> Iterable[tuple[tuple[str, ...], float]]:
        for entry in self.backend_stats():
            cache = entry.get("cache")
            if cache:
                yield (str(entry.get("name", "backend")),), float(cache["counts"].get(key, 0))

    def _cache_event_counts(self) -> Iterable[tuple[tuple[str, ...], float]]:
        kinds = ("events", "orphans", "dropped", "gap", "restart", "bad", "disconnects", "resets")
        for entry in self.backend_stats():
            cache = entry.get("cache")
            if cache:
                for kind in kinds:
                    count = cache["counts"].get(kind, 0)
                    yield (str(entry.get("name", "backend")), kind), float(count)

    def _cache_decisions(self) -> Iterable[tuple[tuple[str, ...], float]]:
        pool_stats = getattr(self.gateway.backend, "pool_stats", None)
        decisions = pool_stats().get("cache_decisions") if pool_stats is not None else None
        for decision in ("hit", "yield", "miss"):
            if decisions is not None:
                yield (decision,), float(decisions.get(decision, 0))

    def _backend_errors(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for entry in self.backend_stats():
            for kind, count in (entry.get("errors") or {}).items():
                yield (str(entry.get("name", "backend")), str(kind)), float(count)

    def add_connection_metrics(self, stats: ConnectionStats) -> None:
        r = self.registry
        r.register(
            Gauge(
                "vllm_gateway_client_connections",
                "Client connections open now.",
                lambda: [((), float(stats.open))],
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_client_connection_events_total",
                "What the HTTP server did to client connections: accepted, refused (over "
                "VLLM_MAX_CONNECTIONS), header/body/send timeouts, idle closes, oversized headers, "
                "malformed requests, bodies refused by the buffer budget.",
                lambda: [((event,), float(getattr(stats, event))) for event in stats.EVENTS],
                ("event",),
            )
        )

    def add_budget_metrics(self, budget: BufferBudget) -> None:
        self.registry.register(
            Gauge(
                "vllm_gateway_buffered_bytes",
                "Bytes of request bodies and non-streamed answers held now, and the budget.",
                lambda: [(("used",), float(budget.used)), (("limit",), float(budget.limit))],
                ("kind",),
            )
        )

    def render(self, peers: Sequence[dict[str, Any]] = ()) -> str:
        return self.registry.render(peers)


class _CounterView(Gauge):
    """A counter whose values someone else keeps (the pool): read at scrape time."""

    kind = "counter"


def backend_name(gateway: Gateway) -> str:
    return gateway.backend.name or "backend"


class Observer:
    """``gateway.observers`` member: metrics, status board and access log for each ended request."""

    def __init__(self, gateway: Gateway, board: StatusBoard | None = None) -> None:
        self.gateway = gateway
        self.metrics = GatewayMetrics(gateway, self)
        self.board = board
        self.backend_healthy: bool | None = None
        self.backend_errors: dict[str, int] = {}
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
        sent = call.upstream_sent_at
        if sent is not None:
            self._overhead.observe(max(0.0, sent - started - queue_wait))
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
            self.backend_errors[outcome] = self.backend_errors.get(outcome, 0) + 1

        if self.board is not None:
            self.board.record(call, outcome, ttft, itl)
        if access_log.isEnabledFor(logging.INFO):
            self._log(call, route, outcome, duration, ttft, prompt, completion)

    def _log(
        self,
        call: CallRecord,
        route: str,
        outcome: str,
        duration: float,
        ttft: float | None,
        prompt: int | None,
        completion: int | None,
    ) -> None:
        # A model name is the client's: cut to a bound (the text formatter escapes what remains).
        model = clip(call.model)
        upstream_id = call.upstream_id
        fields = {
            "request_id": call.request_id,
            "upstream_id": upstream_id,
            "tenant": call.tenant,
            "model": model,
            # Every member a failed-over stream used, in order; else the one that served.
            "backend": ",".join(call.members)
            if len(call.members) > 1
            else call.served_by or self._default_backend,
            "failovers": len(call.failovers),
            "route": route,
            "status": call.status,
            "outcome": outcome,
            "queue_wait_ms": round(call.queue_wait * 1000, 3),
            "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
            "backend_ms": _span_ms(call.upstream_sent_at, call.upstream_answered_at),
            "duration_ms": round(duration * 1000, 3),
            "chunks": call.chunks,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
        }
        text = _ACCESS_LINE
        args: tuple[Any, ...] = ()
        if upstream_id is not None and upstream_id != call.request_id:
            # The client named the request: vLLM's logs know it by the gateway's id.
            text, args = _ACCESS_LINE + " upstream_id=%s", (upstream_id,)
        access_log.info(
            text,
            call.request_id,
            route,
            call.status,
            outcome,
            model,
            fields["backend"],
            fields["tenant"],
            call.queue_wait * 1000,
            "-" if ttft is None else f"{ttft * 1000:.1f}",
            "-" if fields["backend_ms"] is None else f"{fields['backend_ms']:.1f}",
            duration * 1000,
            call.chunks,
            "-" if prompt is None else prompt,
            "-" if completion is None else completion,
            *args,
            extra=fields,
        )

    # --- background sampling ------------------------------------------------------------------

    async def sample_health(self) -> None:
        """Check the backend's health every few seconds (single backend without ``stats()``)."""
        timeout = min(2.0, self.gateway.settings.connect_timeout)
        while True:
            try:
                self.backend_healthy = await self.gateway.backend.check_health(timeout)
            except Exception:
                self.backend_healthy = False
            await asyncio.sleep(HEALTH_INTERVAL)


def install_observability(
    api: FastAPI,
    gateway: Gateway,
    connections: ConnectionStats | None = None,
    budget: BufferBudget | None = None,
) -> Observer:
    """Add the observer, ``/metrics``, the status page and their background tasks to the app."""
    from fastapi.responses import Response

    board = StatusBoard(gateway)
    observer = Observer(gateway, board)
    if connections is not None:
        observer.metrics.add_connection_metrics(connections)
    if budget is not None:
        observer.metrics.add_budget_metrics(budget)
    gateway.observers.append(observer)
    board.backends = observer.metrics.backend_stats
    api.state.observer = observer

    shared = gateway.admission if isinstance(gateway.admission, RemoteAdmission) else None
    peers = shared.peer_snapshots if shared is not None else None
    if shared is not None:  # a worker of several: a scrape of any one answers for all
        shared.snapshot = observer.metrics.registry.snapshot

    @api.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        others = await peers(_PEER_SCRAPE_TIMEOUT) if peers is not None else []
        return Response(observer.metrics.render(others), media_type=CONTENT_TYPE)

    install_status_routes(api, board)

    tracer = _tracing(gateway)
    if tracer is not None:
        gateway.observers.append(tracer)

    original = api.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with original(app) as state:
            tasks = [asyncio.create_task(board.run_ticker(), name="status-ticker")]
            if not observer._pooled:
                tasks.append(asyncio.create_task(observer.sample_health(), name="health-sampler"))
            try:
                yield state
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if tracer is not None:
                    tracer.close()  # flushes the spans still batched

    api.router.lifespan_context = lifespan
    return observer


def _tracing(gateway: Gateway) -> Any:
    """The OpenTelemetry observer when an OTLP endpoint is configured; nothing is imported otherwise."""
    import os

    # The one exception to "settings only": OTel's own standard variable decides, as every OTel
    # SDK does, and reading it here keeps the SDK unimported when it is absent.
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    try:
        from vllm_gateway.observability.tracing import TracingObserver
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry is not installed")
        return None
    return TracingObserver(backend_name(gateway))
