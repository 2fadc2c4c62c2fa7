"""What the server and its connections agree on: the bounds (``Limits``), the handler it
calls (``Handler``), and what a connection needs of the server that accepted it (``Server``)."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from vllm_gateway.edge.http.exchange import Exchange
from vllm_gateway.errors import GatewayError
from vllm_gateway.observability.connections import ConnectionStats
from vllm_gateway.proxy.budget import BufferBudget

__all__ = ["Handler", "Limits", "Server"]


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    send_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024  # request line and headers; the trailers apart
    max_header_count: int = 100  # header fields; the trailers apart
    max_connections: int = 4096
    max_pipelined: int = 16
    write_high_water: int = 64 * 1024
    write_low_water: int = 16 * 1024
    # How long an early answer (a refusal before the body was read) keeps reading and discarding
    # what the client still sends, so that the answer is not lost to a reset.
    linger: float = 2.0


class Handler(Protocol):
    """What the server calls. ``admit`` (the head is in) and ``ready`` (the request is whole, its
    task not yet made) run in the protocol's callback (no await); each returns None to go on or an
    error to answer at once. After ``admit`` the body is read, up to ``exchange.body_limit``."""

    def admit(self, exchange: Exchange) -> GatewayError | None: ...

    def ready(self, exchange: Exchange) -> GatewayError | None: ...

    def handle(self, exchange: Exchange) -> Awaitable[None]: ...

    def new_request_id(self, headers: list[tuple[bytes, bytes]]) -> str: ...


class Server(Protocol):
    """What a connection needs of the server that accepted it."""

    handler: Handler
    limits: Limits
    budget: BufferBudget
    stats: ConnectionStats
    closing: bool

    def opened(self, conn: object) -> int:
        """Count ``conn`` in; the number of connections open now."""
        ...

    def closed(self, conn: object) -> None: ...

    def refused(self, exchange: Exchange, err: GatewayError) -> None: ...
