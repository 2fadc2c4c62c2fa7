"""The generation's side of a keyed request: a ``Responder`` whose answer goes into a log.

The generation runs as an ordinary ``ProxyCall`` on a ``Recorder`` made from the client's
exchange: the same request (id, headers, body, context and so its admission place, identity and
client address), but its answer is written to the key's log, which is never slow and never goes
away on its own. The call therefore runs to its end whatever its first client does; the log's
store stops it (``on_gone``, as a client leaving would) when nobody read it for the grace period
or the budget cannot keep it, and the call then aborts its upstream request as usual.

A response's ``x-request-id`` is each reader's own: the recorder keeps the other headers.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm_gateway.proxy.budget import BufferBudget
from vllm_gateway.proxy.responder import RequestContext, Responder, first_header
from vllm_gateway.proxy.resume.store import Head, Writer
from vllm_gateway.proxy.sse import split_events

__all__ = ["Recorder"]


def _kept(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name.lower() != b"x-request-id"]


class Recorder:
    """A ``Responder`` for the generation: what it is told to send goes to ``writer``."""

    __slots__ = (
        "_body",
        "_budget",
        "_complete",
        "_gone",
        "_status",
        "_writer",
        "arrived_at",
        "context",
        "extra_headers",
        "headers",
        "method",
        "on_gone",
        "path",
        "query",
        "request_id",
    )

    def __init__(self, exchange: Responder, writer: Writer) -> None:
        self.request_id = exchange.request_id
        self.path = exchange.path
        self.method = exchange.method
        self.query = exchange.query
        self.context: RequestContext = exchange.context
        self.headers = exchange.headers
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.arrived_at = exchange.arrived_at
        self._body = exchange.body
        self._budget = exchange.budget
        self.on_gone: Callable[[], None] | None = None
        self._gone = False
        self._complete = False
        self._status = 200
        self._writer = writer
        writer.on_abandon = self._abandon

    def _abandon(self) -> None:
        """The log takes no more: stop the generation as a client leaving would."""
        self._gone = True
        callback = self.on_gone
        if callback is not None:
            callback()

    @property
    def body(self) -> bytes:
        return self._body

    def header(self, name: bytes) -> bytes | None:
        return first_header(self.headers, name)

    @property
    def gone(self) -> bool:
        return self._gone

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def too_slow(self) -> bool:
        return False

    @property
    def budget(self) -> BufferBudget:
        return self._budget

    @property
    def paused(self) -> bool:
        return False  # the log takes everything at once; its budget is the store's

    async def drain(self) -> None:
        return None

    def start(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None = None
    ) -> None:
        self._writer.head(Head(status, _kept(headers)))

    def write(self, data: bytes) -> None:
        if data:
            self._writer.append(split_events(data), ended=False)

    def end(self, data: bytes = b"") -> None:
        self._complete = True
        self._writer.append(split_events(data), ended=True)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self._complete = True
        self._writer.head(Head(status, _kept(headers), body))

    def close(self) -> None:
        """The generation's call ended."""
        self._writer.close()
