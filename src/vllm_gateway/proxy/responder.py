"""What a proxied request needs from the client's side of the connection: the request as read,
what the front door learned of it (``RequestContext``), a way to answer it, and word when the
client leaves.

The edge's ``Exchange`` is the implementation; the proxy call depends on this contract only. The
answer is written without awaiting (bytes go to the connection's buffer); ``drain()`` is awaited
only while ``paused``, and the connection's send timeout bounds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vllm_gateway.identity import Identity
from vllm_gateway.proxy.admission import Place
from vllm_gateway.proxy.budget import BufferBudget
from vllm_gateway.proxy.routes import Route

__all__ = ["ClientGone", "RequestContext", "Responder", "first_header"]


def first_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in ``headers``: a ``Responder``'s
    ``header``."""
    for key, value in headers:
        if key == name:
            return value
    return None


@dataclass(slots=True)
class RequestContext:
    """What the front door learned of a request before the request is handled: who sent it, from
    where, which proxied route it is, and its admission place. The front door fills it (edge's
    ``frontdoor.py``, from the headers and when the request is whole); the call and the routes
    off the hot path read it. One per request, made with its exchange."""

    identity: Identity | None = None  # None until the request's key (or its absence) is known
    client_address: str | None = None  # the client, as ``edge/clients.py`` decides who it is
    route: Route | None = None  # a proxied route; None for everything else
    param: str | None = None  # the route's path parameter (a stored response's id, an adapter)
    admin: bool = False  # an admin key opened it
    place: Place | None = None  # its admission place, taken when it was whole (the call's after)
    deadline_ms: int | None = None  # X-Request-Deadline-Ms, as the client sent it
    deadline: float | None = None  # the loop's clock by which its first token is due (None: none)
    queue_updates: bool = False  # X-Queue-Updates: 1 (a stream told of its place while queued)


class ClientGone(Exception):
    """The client's connection closed, or was dropped for not reading, before the response ended."""


class Responder(Protocol):
    request_id: str
    path: str
    method: str
    query: bytes

    context: RequestContext
    on_gone: Callable[[], None] | None
    headers: list[tuple[bytes, bytes]]  # the request's, names in lower case
    extra_headers: list[tuple[bytes, bytes]]
    arrived_at: float  # perf_counter when the request was whole (0.0: not stamped)

    @property
    def body(self) -> bytes: ...

    def header(self, name: bytes) -> bytes | None: ...

    @property
    def gone(self) -> bool: ...

    @property
    def complete(self) -> bool: ...

    @property
    def too_slow(self) -> bool:
        """True when the client was dropped for not taking what it was sent."""

    @property
    def budget(self) -> BufferBudget: ...

    def start(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None = None
    ) -> None: ...

    def write(self, data: bytes) -> None: ...

    def end(self, data: bytes = b"") -> None: ...

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None: ...

    @property
    def paused(self) -> bool: ...

    async def drain(self) -> None: ...
