"""Running the gateway under uvicorn, with a drain that keeps its promises.

uvicorn's own shutdown closes the listening socket at once, so a client that arrives during a
drain gets a refused connection, and it re-raises the signal when it is done, so the process dies
of SIGTERM instead of exiting 0. ``GatewayServer`` replaces that path: the first SIGTERM/SIGINT
starts ``Gateway.drain`` (readiness 503, new and queued requests 503 ``shutting_down``, in-flight
requests finish until the deadline, the rest end with an error event) while the socket stays open;
only then does uvicorn close connections and run the lifespan's shutdown, which closes the backend
client. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from .app import GatewayApp, create_app
from .settings import Settings

__all__ = ["GatewayServer", "serve", "uvicorn_config"]

log = logging.getLogger("vllm_gateway")


class GatewayServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, app: GatewayApp, *, handle_signals: bool = True
    ) -> None:
        super().__init__(config)
        self.app = app
        self._handle_signals = handle_signals
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self._handle_signals:  # embedded in a host program (tests) that owns the signals
            yield
            return
        with super().capture_signals():
            yield

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        # Everything allocated so far (frameworks, app, clients) lives as long as the process:
        # move it out of the collector's sight, so that a full collection under load walks only
        # what requests allocate and does not stall every stream for tens of milliseconds.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown, and the
        # process would die of the signal instead of exiting 0.
        if self._loop is None:  # still starting: nothing in flight to drain
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal)

    def _on_signal(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
            return
        # A second signal: end what is in flight now, with an error event, and exit.
        log.warning("second signal: ending %d request(s) now", len(self.app.gateway.active))
        for call in list(self.app.gateway.active):
            call.cancel("shutdown")
        self.should_exit = True

    async def _drain(self) -> None:
        try:
            await self.app.gateway.drain()
        finally:
            self.should_exit = True


def uvicorn_config(app: GatewayApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "lifespan": "on",
        "access_log": False,
        "log_level": settings.log_level,
        "timeout_keep_alive": 30,
        # By the time uvicorn shuts down, the drain has already ended every request.
        "timeout_graceful_shutdown": 2,
        "server_header": False,
        "log_config": None,  # logs.configure_logging owns the handlers
        "loop": "auto",
        "http": "auto",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def serve(settings: Settings, **config_overrides: Any) -> int:
    """Run the gateway until a signal drains it; return the process exit code."""
    if settings.workers > 1:
        from .workers import serve_workers

        return serve_workers(settings)
    app = create_app(settings)
    server = GatewayServer(uvicorn_config(app, settings, **config_overrides), app)
    server.run()
    if not server.started:
        return 1
    return 0


# SIGTERM and SIGINT are the ones uvicorn installs handle_exit for; exported for the CLI's docs.
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
