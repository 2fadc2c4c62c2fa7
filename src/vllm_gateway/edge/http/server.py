"""The listening side: sockets, the connections they accepted, and the server's shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from vllm_gateway.edge.http.connection import Connection
from vllm_gateway.edge.http.contract import Handler, Limits
from vllm_gateway.edge.http.exchange import Exchange
from vllm_gateway.errors import GatewayError
from vllm_gateway.observability.connections import ConnectionStats
from vllm_gateway.proxy.budget import BufferBudget

__all__ = ["HttpServer"]

log = logging.getLogger("vllm_gateway.http")


class HttpServer:
    """Listening sockets and the connections they accepted."""

    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        budget: BufferBudget | None = None,
        stats: ConnectionStats | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.budget = budget if budget is not None else BufferBudget(256 << 20)
        self.connections: set[Connection] = set()
        self.stats = stats if stats is not None else ConnectionStats()
        self.closing = False
        self._servers: list[asyncio.AbstractServer] = []
        self._idle: asyncio.Event | None = None
        self.on_refused: Callable[[Exchange, GatewayError], None] | None = None

    async def listen(
        self, host: str | None = None, port: int = 0, sock: socket.socket | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(lambda: Connection(self), sock=sock, backlog=4096)
        else:
            server = await loop.create_server(
                lambda: Connection(self), host, port, reuse_address=True, backlog=4096
            )
        self._servers.append(server)

    @property
    def sockets(self) -> list[Any]:
        return [sock for server in self._servers for sock in getattr(server, "sockets", ())]

    def refused(self, exchange: Exchange, err: GatewayError) -> None:
        """The server answered ``err`` itself (a malformed or slow request, a full house...)."""
        if self.on_refused is not None:
            try:
                self.on_refused(exchange, err)
            except Exception:
                log.exception("refusal observer failed")

    def opened(self, conn: object) -> int:
        assert isinstance(conn, Connection)
        self.connections.add(conn)
        self.stats.open = len(self.connections)
        return self.stats.open

    def closed(self, conn: object) -> None:
        assert isinstance(conn, Connection)
        self.connections.discard(conn)
        self.stats.open = len(self.connections)
        if not self.connections and self._idle is not None:
            self._idle.set()

    async def shutdown(self, timeout: float) -> None:
        """Stop listening, close idle connections, let responses in progress end within
        ``timeout``, then drop what is left."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.connections:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while self.connections:
                        await self._idle.wait()
                        self._idle.clear()
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            conn.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
