"""Running the gateway: its HTTP server, its lifecycle, and a drain that keeps its promises.

``GatewayRunner.serve`` enters the app's lifecycle (``compose.App.running``: the backend, the
background tasks), listens, and waits for a signal. The first SIGTERM/SIGINT starts
``Gateway.drain`` (readiness 503, new and queued requests 503 ``shutting_down``, in-flight requests
finish until the deadline, the rest end with an error event) while the socket stays open, so that a
client arriving during the drain gets a 503 rather than a refused connection. Then the server stops
listening, closes idle connections, gives responses still being written a moment, and leaving the
lifecycle stops the parts (the backend client last). The process exits 0. A second signal ends what
is in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from typing import Any

from vllm_gateway.compose import App
from vllm_gateway.edge.http import HttpServer, Limits
from vllm_gateway.settings import Settings

__all__ = ["GatewayRunner", "limits_of", "run"]

log = logging.getLogger("vllm_gateway")

# After the drain, how long responses still being written may take before connections are dropped.
_CLOSE_GRACE = 2.0
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def limits_of(settings: Settings) -> Limits:
    return Limits(
        header_timeout=settings.client_header_timeout,
        body_timeout=settings.client_body_timeout,
        idle_timeout=settings.client_idle_timeout,
        send_timeout=settings.client_send_timeout,
        max_header_bytes=settings.max_header_bytes,
        max_header_count=settings.max_header_count,
        max_connections=settings.max_connections,
    )


class GatewayRunner:
    def __init__(self, app: App, *, handle_signals: bool = True) -> None:
        self.app = app
        self.settings = app.gateway.settings
        self.http = HttpServer(
            app.frontdoor, limits_of(self.settings), app.budget, app.server_stats
        )
        self.http.on_refused = app.frontdoor.refused
        self.started = False
        self._handle_signals = handle_signals
        self._exit: asyncio.Event | None = None
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.http.sockets[0].getsockname()[1])

    async def serve(self, sock: socket.socket | None = None) -> None:
        """Serve until a signal (or ``request_exit``) ends it, drain included."""
        loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        if self._handle_signals:
            # Before anything else: a signal during startup drains (nothing) and exits 0.
            for sig in HANDLED_SIGNALS:
                loop.add_signal_handler(sig, self.on_signal)
            loop.add_signal_handler(signal.SIGHUP, self.app.reload)  # re-read the backends file
        try:
            await self._serve(sock)
        finally:
            if self._handle_signals:
                for sig in (*HANDLED_SIGNALS, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await self._stop_drain()

    async def _serve(self, sock: socket.socket | None) -> None:
        assert self._exit is not None
        async with self.app.running():
            if self._exit.is_set():
                return  # stopped while starting
            if sock is not None:
                await self.http.listen(sock=sock)
            else:
                await self.http.listen(self.settings.host, self.settings.port)
            # Everything allocated so far (frameworks, app, clients) lives as long as the process:
            # move it out of the collector's sight, so that a full collection under load walks
            # only what requests allocate and does not stall every stream for tens of ms.
            gc.collect()
            gc.freeze()
            self.started = True
            address = self.http.sockets[0].getsockname()
            log.info("vllm-gateway listening on %s:%s", address[0], address[1])
            try:
                await self._exit.wait()
            finally:
                await self.http.shutdown(_CLOSE_GRACE)

    def on_signal(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="drain")
            return
        # A second signal: end what is in flight now, with an error event, and exit.
        log.warning("second signal: ending %d request(s) now", len(self.app.gateway.active))
        for call in list(self.app.gateway.active):
            call.cancel("shutdown")
        self.request_exit()

    async def _drain(self) -> None:
        try:
            await self.app.gateway.drain()
        finally:
            self.request_exit()

    async def _stop_drain(self) -> None:
        """The drain task is the runner's: it ends with the runner (a second signal, or a stop
        without one, leaves it waiting for the requests in flight)."""
        task, self._drain_task = self._drain_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def stop_requested(self) -> bool:
        return self._exit is not None and self._exit.is_set()

    def request_exit(self) -> None:
        """Stop serving (without a drain: for hosts that drained, or tests)."""
        if self._exit is not None:
            self._exit.set()


def _event_loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop also works
        return None
    return uvloop.new_event_loop


def run(app: App, sock: socket.socket | None = None) -> int:
    """Serve ``app`` in this thread until a signal drains it; the process exit code."""
    runner = GatewayRunner(app)
    factory = _event_loop_factory()
    try:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            loop_runner.run(runner.serve(sock))
    except OSError as exc:
        settings = app.gateway.settings
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    except Exception:
        log.exception("the gateway failed to start")
        return 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    # Not started and not asked to stop: startup failed (the lifecycle said why).
    return 0 if runner.started or runner.stop_requested else 1
