"""The metrics: every series the gateway exports, declared once, and what reads their values.

``GatewayMetrics`` declares the metrics with the names and labels the dashboard and alerts use
(docs/observability.md lists them). Two kinds of value live here:

- those the observer (``observer.py``) adds to once per ended request: counters and histograms
  whose children it resolves once and keeps;
- those read at scrape time, never tracked on the hot path: the gauges of the gateway's own state
  (in flight, queue depth, draining, limit), and the per-backend numbers, from ``backend.stats()``
  for a pool, else from the single backend's health (``health.py``) and the errors the observer
  counts into ``backend_errors``.

Label values come from fixed sets (``ROUTES``, ``OUTCOMES``), so the number of series is bounded
whatever clients send. ``scrape()`` is the exposition ``GET /metrics`` serves: in a worker of
several, every worker's, merged (the others' snapshots come through the supervisor).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from vllm_gateway import errors
from vllm_gateway.backends.base import MEMBER_STATES, BackendStats
from vllm_gateway.observability.connections import ConnectionStats
from vllm_gateway.observability.health import BackendHealth
from vllm_gateway.observability.prometheus import Counter, Gauge, Histogram, Registry
from vllm_gateway.proxy.budget import BufferBudget
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.resume.store import STAT_EVENTS, Store
from vllm_gateway.proxy.routes import ROUTE_NAMES
from vllm_gateway.proxy.shared_admission import RemoteAdmission

__all__ = [
    "BACKEND_ERROR_TYPES",
    "OUTCOMES",
    "ROUTES",
    "GatewayMetrics",
    "backend_name",
]

log = logging.getLogger("vllm_gateway.observability.metrics")

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
PEER_SCRAPE_TIMEOUT = 1.5


class GatewayMetrics:
    """Every metric the gateway exports, with the names the dashboard and alerts use."""

    def __init__(self, gateway: Gateway, health: BackendHealth | None = None) -> None:
        self.gateway = gateway
        # A single backend (no ``stats()``): its health as last checked, and its failures as the
        # observer counts them.
        self.health = health
        self.backend_errors: dict[str, int] = {}
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
                "The gateway's own time for a request, as its X-Gateway-Overhead-Ms header says: "
                "arrival to upstream send less the queue wait, plus the relay's share of a "
                "non-streamed answer.",
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
                "vllm_gateway_backend_state",
                "1 for a pool member's lifecycle state now (joining, ready, draining, ejected, "
                "gone), 0 for the others.",
                self._backend_states,
                ("backend", "state"),
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
        # DNS discovery (docs/pool.md#members-from-dns).
        r.register(
            _CounterView(
                "vllm_gateway_backend_discovery_resolutions_total",
                "DNS discovery: resolutions of the pool's name by result (ok; empty: no address; "
                "error: no answer; both keep the last good members).",
                lambda: self._discovery("resolutions"),
                ("result",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_backend_discovery_truncated_total",
                "DNS discovery: answers with more addresses than VLLM_POOL_MAX_MEMBERS, cut to it.",
                lambda: self._discovery("truncated"),
            )
        )
        r.register(
            Gauge(
                "vllm_gateway_backend_discovery_members",
                "DNS discovery: addresses in the last good answer (the members it names).",
                lambda: self._discovery("members"),
                merge="max",
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
        return [
            {
                "name": backend_name(self.gateway),
                "in_flight": self.gateway.admission.in_flight,
                "healthy": None if self.health is None else self.health.healthy,
                "errors": dict(self.backend_errors),
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

    def _backend_states(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for entry in self.backend_stats():
            state = entry.get("state")
            if state is None:
                continue  # one backend, not a pool: no lifecycle
            name = str(entry.get("name", "backend"))
            for each in MEMBER_STATES:
                yield (name, each), 1.0 if each == state else 0.0

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

    def _discovery(self, key: str) -> Iterable[tuple[tuple[str, ...], float]]:
        pool_stats = getattr(self.gateway.backend, "pool_stats", None)
        found = pool_stats().get("discovery") if pool_stats is not None else None
        if found is None:
            return
        value = found[key]
        if isinstance(value, dict):
            for result in ("ok", "empty", "error"):
                yield (result,), float(value.get(result, 0))
        else:
            yield (), float(value)

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

    def add_resume_metrics(self, store: Store) -> None:
        r = self.registry
        r.register(
            Gauge(
                "vllm_gateway_idempotency_bytes",
                "Bytes of results kept for Idempotency-Key retries now, and the budget.",
                lambda: [(("used",), float(store.used)), (("limit",), float(store.limit))],
                ("kind",),
            )
        )
        r.register(
            _CounterView(
                "vllm_gateway_idempotency_events_total",
                "Keyed generations: started, attached (a retry read a running one), replayed "
                "(a finished one), conflicts (another body), evicted (for the budget), expired, "
                "abandoned (nobody read it), cut (over the budget), lost (unreadable).",
                lambda: [((event,), float(store.counts[event])) for event in STAT_EVENTS],
                ("event",),
            )
        )

    def render(self, peers: Sequence[dict[str, Any]] = ()) -> str:
        return self.registry.render(peers)

    async def scrape(self) -> str:
        """The exposition ``GET /metrics`` serves: this process's metrics, or in a worker of
        several, every worker's (the others' snapshots asked through the supervisor, within
        ``PEER_SCRAPE_TIMEOUT``)."""
        admission = self.gateway.admission
        if isinstance(admission, RemoteAdmission):
            return self.render(await admission.peer_snapshots(PEER_SCRAPE_TIMEOUT))
        return self.render()


class _CounterView(Gauge):
    """A counter whose values someone else keeps (the pool): read at scrape time."""

    kind = "counter"


def backend_name(gateway: Gateway) -> str:
    return gateway.backend.name or "backend"
