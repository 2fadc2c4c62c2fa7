"""The composition root: the one place the parts are built, wired together, started and stopped.

``create_app(settings)`` builds the backend (``backends.factory``), the per-process ``Gateway``,
the observers (metrics, status board, access log, traces when configured), the FastAPI app of the
routes off the hot path, and the front door the HTTP server calls, and returns them as an ``App``.

``App.running()`` is the process's one lifecycle, and the only one: the runner
(``runtime.server``) enters it before it listens and leaves it once the server has drained and
shut down. It starts the parts in order (the backend first, the background tasks last) and stops
them in reverse, each one whatever happened to the others; every background task it starts, it
cancels and awaits. Nothing else starts or stops a part, and no framework's lifespan is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from vllm_gateway.backends.base import Backend
from vllm_gateway.backends.factory import build_backend
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.edge.admin import SharedMembers
from vllm_gateway.edge.api import create_api
from vllm_gateway.edge.frontdoor import FrontDoor
from vllm_gateway.observability import access_log
from vllm_gateway.observability.connections import ConnectionStats
from vllm_gateway.observability.health import BackendHealth
from vllm_gateway.observability.metrics import GatewayMetrics, backend_name
from vllm_gateway.observability.observer import Observer
from vllm_gateway.observability.status import StatusBoard
from vllm_gateway.proxy.budget import BufferBudget
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.shared_admission import RemoteAdmission
from vllm_gateway.settings import Settings

if TYPE_CHECKING:  # imported only when an OTLP endpoint is configured (``_tracer``)
    from vllm_gateway.observability.tracing import TracingObserver

__all__ = ["App", "create_app"]

log = logging.getLogger("vllm_gateway")


class App:
    """One process's gateway, assembled: the front door the HTTP server calls, the parts it is
    made of, and their life (``running``)."""

    def __init__(
        self,
        gateway: Gateway,
        frontdoor: FrontDoor,
        api: FastAPI,
        observer: Observer,
        health: BackendHealth,
        tracer: TracingObserver | None = None,
        supervisor: socket.socket | None = None,
        members: SharedMembers | None = None,
    ) -> None:
        self.gateway = gateway
        self.frontdoor = frontdoor
        self.api = api
        self.observer = observer
        self.health = health
        self._tracer = tracer
        self._supervisor = supervisor
        self._members = members

    def reload(self) -> None:
        """SIGHUP: a pool reads its backends file now."""
        backend = self.gateway.backend
        if isinstance(backend, PoolBackend):
            backend.reload()

    @property
    def budget(self) -> BufferBudget:
        return self.frontdoor.budget

    @property
    def server_stats(self) -> ConnectionStats:
        return self.frontdoor.server_stats

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start every part; on leaving, stop them in reverse order."""
        gateway = self.gateway
        async with contextlib.AsyncExitStack() as stack:
            await gateway.backend.start()  # an embedded engine loads its model here
            stack.push_async_callback(gateway.backend.aclose)
            limiter = gateway.ratelimiter
            if limiter is not None:
                await limiter.start()
                stack.push_async_callback(limiter.aclose)
            if gateway.resume is not None:
                await gateway.resume.start()
                stack.push_async_callback(gateway.resume.aclose)
            admission = gateway.admission
            if self._supervisor is not None and isinstance(admission, RemoteAdmission):
                await admission.connect(self._supervisor)
                stack.callback(_hang_up, admission)
                if self._members is not None:
                    # The admin API's member changes made so far, applied before serving.
                    _background(stack, self._members.run(), "shared-members")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_REPLAY_WAIT):
                            await self._members.synced.wait()
            gateway.models.prefetch()
            stack.push_async_callback(gateway.models.aclose)
            stack.push_async_callback(self.health.aclose)
            if self._tracer is not None:
                stack.callback(self._tracer.close)  # flushes the spans still batched
            board = self.observer.board
            if board is not None:
                _background(stack, board.run_ticker(), "status-ticker")
            if gateway.backend.stats() is None:  # a pool checks its members' health itself
                _background(stack, self.health.sample(), "health-sampler")
            yield


def _background(
    stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], name: str
) -> None:
    """Run ``work`` as a task until ``stack`` closes, which cancels and awaits it."""
    task = asyncio.get_running_loop().create_task(work, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)


# How long a new worker waits for the admin API's member changes made so far before it serves.
_REPLAY_WAIT = 5.0


def _hang_up(admission: RemoteAdmission) -> None:
    if admission.channel is not None:
        admission.channel.close()


def create_app(
    settings: Settings,
    backend: Backend | None = None,
    supervisor: socket.socket | None = None,
) -> App:
    """The gateway of one process. ``supervisor``: this process is a worker of several, and that
    socket leads to the supervisor's one admission."""
    admission = None
    if supervisor is not None:
        admission = RemoteAdmission(
            settings.max_concurrent_requests,
            settings.max_queued_requests,
            settings.queue_wait_timeout,
        )
    gateway = Gateway(
        settings, backend if backend is not None else build_backend(settings), admission
    )
    if isinstance(gateway.backend, PoolBackend):
        # Each change of a member's lifecycle state is a line of the access log.
        gateway.backend.fleet.on_state.append(
            lambda m: access_log.member_state(m.name, m.url, m.state, m.source, m.in_flight)
        )
    # The probes and the backend_healthy gauge share this one check.
    health = BackendHealth(gateway.backend.check_health, min(2.0, settings.connect_timeout))
    metrics = GatewayMetrics(gateway, health)
    board = StatusBoard(gateway)
    board.backends = metrics.backend_stats
    observer = Observer(gateway, metrics, board)
    gateway.observers.append(observer)
    tracer = _tracer(gateway)
    if tracer is not None:
        gateway.observers.append(tracer)
    api = create_api(gateway, health, metrics, board)
    frontdoor = FrontDoor(gateway, api)
    metrics.add_connection_metrics(frontdoor.server_stats)
    metrics.add_budget_metrics(frontdoor.budget)
    if gateway.resume is not None:
        metrics.add_resume_metrics(gateway.resume)
    members = None
    if admission is not None:  # a worker of several answers the others' scrapes with its own
        admission.snapshot = metrics.registry.snapshot
        if isinstance(gateway.backend, PoolBackend):  # and applies every admin member change
            members = SharedMembers(gateway.backend.fleet, admission)
    return App(gateway, frontdoor, api, observer, health, tracer, supervisor, members)


def _tracer(gateway: Gateway) -> TracingObserver | None:
    """The OpenTelemetry observer when an OTLP endpoint is configured; nothing is imported otherwise."""
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
