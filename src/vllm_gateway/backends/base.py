"""The seam every engine implements: an OpenAI-compatible request in, a response of bytes out.

A ``Backend`` turns an ``UpstreamRequest`` into an ``UpstreamResponse`` whose body is exactly what
vLLM's OpenAI server would send for it: JSON, or SSE events (``data: {...}\\n\\n`` ... ``data:
[DONE]\\n\\n``). The relay above it applies every timeout and owns every response it opens: it always
calls ``aclose()``, and closing a response that has not ended must abort the work behind it (the
HTTP backend drops the connection, so vLLM aborts the request; the embedded engine aborts it).

Backends translate their own failures into ``errors.UpstreamError`` subclasses here, at the seam,
and nowhere else.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

__all__ = [
    "Backend",
    "BackendStats",
    "Charge",
    "ConnectionCounts",
    "UpstreamRequest",
    "UpstreamResponse",
    "count_piece",
    "read_capped",
]


# Read-only by convention, not frozen: a frozen dataclass pays a call per field to build, on
# every request.
@dataclass(slots=True)
class UpstreamRequest:
    method: str
    path: str  # a route of the table in proxy/routes.py (never a path a client chose freely)
    body: bytes = b""  # the raw body, forwarded as is (the relay does not re-serialise)
    json: Mapping[str, Any] | None = None  # the parsed body, for backends and routing that need it
    stream: bool = False
    request_id: str = ""
    model: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # for routing (x-session-id)
    query: str = ""  # the query string, forwarded (admin routes take parameters there)
    content_type: str = "application/json"  # of ``body``; an upload's carries its boundary
    # A pool's reach: the stored response this request must meet (Responses' retrieve, cancel,
    # previous_response_id), or every member at once (admin routes).
    locate: str | None = None
    broadcast: bool = False
    avoid: frozenset[str] = frozenset()  # a pool's members not to use (a failover's failed ones)


Charge = Callable[[int], None]


def count_piece(size: int, n: int, limit: int, charge: Charge | None = None) -> int:
    """The size of a body being kept, ``size`` bytes so far, with a piece of ``n`` bytes more;
    ``BadBackendResponse`` when that exceeds ``limit`` bytes. ``charge(n)`` is called before the
    piece is kept (it raises to refuse: a memory budget)."""
    from vllm_gateway.errors import BadBackendResponse

    size += n
    if size > limit:
        raise BadBackendResponse(f"The backend's response is larger than {limit} bytes.")
    if charge is not None:
        charge(n)
    return size


async def read_capped(
    chunks: AsyncIterator[bytes],
    limit: int,
    declared_length: int | None = None,
    charge: Charge | None = None,
) -> bytes:
    """A whole body from its pieces; ``BadBackendResponse`` as soon as it exceeds ``limit`` bytes
    (at once when a declared length already does), so a broken backend cannot make us hold more.
    ``charge(n)`` is called before each piece is kept (``count_piece``)."""
    if declared_length is not None:
        count_piece(0, declared_length, limit)  # refused on the declared length alone
    parts: list[bytes] = []
    size = 0
    async for data in chunks:
        size = count_piece(size, len(data), limit, charge)
        parts.append(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class UpstreamResponse(abc.ABC):
    """One response from a backend. Not reusable; ``aclose()`` is idempotent."""

    status: int
    content_type: str
    served_by: str | None = None  # the backend that answered, when it is one of several

    @abc.abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in pieces of any size. Raises ``UpstreamError`` on failure."""

    @abc.abstractmethod
    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        """The whole body; raises ``BadBackendResponse`` if it is longer than ``limit`` bytes.
        ``charge(n)``, when given, is called for each piece before it is kept (see
        ``read_capped``)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the response; if it has not ended, abort the work behind it."""


class BackendStats(TypedDict, total=False):
    """One backend's state, as metrics and the status page show it. ``healthy`` None: unknown."""

    name: str
    url: str
    weight: float
    in_flight: int
    max_outstanding: int | None
    healthy: bool | None
    down_reason: str | None
    errors: dict[str, int]
    ejections: int
    requests: int
    retries: int
    models: list[str] | None
    cache: dict[str, Any]  # a pool routing cache_aware: what the gateway knows of its cache


class ConnectionCounts(TypedDict):
    """HTTP connections a backend holds: now (idle or busy), busy, and opened since start."""

    open: int
    busy: int
    opened: int


class Backend(abc.ABC):
    """An engine the gateway sends requests to. ``start`` before use, ``aclose`` at shutdown."""

    name: str = "backend"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open clients or engines. Called once, by the composition root's lifecycle."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Close clients or engines. Called once, by the composition root's lifecycle."""

    @abc.abstractmethod
    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send the request; return once the response's status and headers are known."""

    @abc.abstractmethod
    async def check_health(self, timeout: float) -> bool:
        """True when the engine answers its health check within ``timeout`` seconds."""

    async def model_ids(self, timeout: float) -> list[str] | None:
        """The ids of the models the engine serves, or None when it cannot tell now."""
        return None

    def stats(self) -> list[BackendStats] | None:
        """Per member, for a backend made of several (a pool); None for one engine."""
        return None

    def connection_counts(self) -> ConnectionCounts | None:
        """For a backend over HTTP: its connections (leak checks, metrics); else None."""
        return None

    def may_fail_over(self) -> bool:
        """Whether a stream that fails mid-way may go on elsewhere (a pool of several)."""
        return False

    def can_fail_over(self, model: str | None, avoid: frozenset[str], done: int) -> str | None:
        """None when a stream of ``model`` may go on, now, on a member not in ``avoid`` after
        ``done`` failovers; else why not (``limit``, ``budget``, ``no_member``). A yes takes a
        token of the retry budget."""
        return "no_member"

    def note_prompt_ids(self, request_id: str, prompt_ids: list[int]) -> None:
        """A streamed response showed the prompt's token ids (a pool routing by cache learns
        from them); nothing to do for a single backend."""
        return None
