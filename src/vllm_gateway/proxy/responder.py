"""What a proxied request needs from the client's side of the connection: the request as read, a
way to answer it, and word when the client leaves.

The edge's ``Exchange`` is the implementation; the proxy call depends on this contract only. The
answer is written without awaiting (bytes go to the connection's buffer); ``drain()`` is awaited
only while ``paused``, and the connection's send timeout bounds it.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

from vllm_gateway.proxy.budget import BufferBudget

__all__ = ["ClientGone", "Responder"]


class ClientGone(Exception):
    """The client's connection closed, or was dropped for not reading, before the response ended."""


class Responder(Protocol):
    request_id: str
    path: str
    method: str
    query: bytes

    @property
    def state(self) -> MutableMapping[str, Any]: ...

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
