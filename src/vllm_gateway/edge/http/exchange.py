"""One request and its response on a client connection: what the server read, and how the
handler answers (``start``/``write``/``end``: no await, bytes go to the connection's buffer)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from vllm_gateway import errors
from vllm_gateway.edge.http.framing import NO_BODY_STATUS, STATUS_LINES, date_line
from vllm_gateway.errors import GatewayError
from vllm_gateway.proxy.budget import BufferBudget
from vllm_gateway.proxy.responder import RequestContext, first_header

__all__ = ["Exchange", "Line"]

log = logging.getLogger("vllm_gateway.http")


class Line(Protocol):
    """What an exchange needs of the connection it arrived on."""

    peer: tuple[str, int] | None
    closing: bool
    paused: bool
    too_slow: bool
    budget: BufferBudget

    def write(self, data: bytes) -> None: ...

    def exchange_done(self, exchange: Exchange) -> None: ...

    async def drain(self) -> None: ...


class Exchange:
    """One request and its response on a connection."""

    __slots__ = (
        "_body",
        "_charged",
        "_chunked",
        "_gone",
        "_head",
        "_head_only",
        "arrived_at",
        "body_limit",
        "client",
        "complete",
        "conn",
        "context",
        "error",
        "expects_continue",
        "extra_headers",
        "header_bytes",
        "header_count",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "on_gone",
        "path",
        "query",
        "raw_path",
        "received",
        "render_error",
        "request_id",
        "response_bytes",
        "started",
        "status",
        "trailer_bytes",
        "trailer_count",
    )

    def __init__(self, conn: Line) -> None:
        self.conn = conn
        self.method = ""
        self.raw_path = b""
        self.path = ""
        self.query = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.header_count = 0
        self.trailer_bytes = 0  # trailer fields are counted and bounded, never kept
        self.trailer_count = 0
        self.expects_continue = False
        self.http_version = "1.1"
        self.keep_alive = True
        self.client = conn.peer
        self.request_id = ""
        self.extra_headers: list[tuple[bytes, bytes]] = []  # added to every response head (CORS)
        # The body of an error answered on this exchange, in its route's protocol.
        self.render_error: Callable[[GatewayError, str | None], bytes] = errors.json_body
        self.body_limit = 0
        self._body: list[bytes] = []
        self._charged = 0
        self.received = False  # the whole request (body included) is in
        self.arrived_at = 0.0  # perf_counter when it was whole: where its gateway time starts
        self.error: GatewayError | None = None  # a refusal decided while reading
        self.context = RequestContext()  # what the handler learns of the request
        self.on_gone: Callable[[], None] | None = None
        self._gone = False
        # Response side.
        self.started = False
        self.complete = False
        self.status = 0
        self.response_bytes = 0
        self._head = b""
        self._chunked = False
        self._head_only = False

    # --- the request ---------------------------------------------------------------------------

    @property
    def body(self) -> bytes:
        parts = self._body
        if len(parts) == 1:
            return parts[0]
        joined = b"".join(parts)
        self._body = [joined]
        return joined

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (``name`` in lower case)."""
        return first_header(self.headers, name)

    @property
    def gone(self) -> bool:
        return self._gone

    @property
    def too_slow(self) -> bool:
        return self.conn.too_slow

    @property
    def budget(self) -> BufferBudget:
        return self.conn.budget

    # --- the response: no await, bytes go to the transport's buffer ----------------------------

    def start(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None = None
    ) -> None:
        """Begin the response; its head goes out with the first ``write`` or ``end``."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        conn = self.conn
        lines = [STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status]
        lines.extend(b"%s: %s\r\n" % pair for pair in headers)
        if self.extra_headers:
            lines.extend(b"%s: %s\r\n" % pair for pair in self.extra_headers)
        lines.append(date_line())
        self._head_only = self.method == "HEAD" or status in NO_BODY_STATUS or status < 200
        if length is not None:
            lines.append(b"content-length: %d\r\n" % length)
        elif not self._head_only:
            if self.http_version == "1.1":
                self._chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the body ends with the connection
        if not self.keep_alive or conn.closing:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        self._head = b"".join(lines)

    def write(self, data: bytes) -> None:
        if self._head_only or not data:
            if self._head:
                data, self._head = self._head, b""
                self.conn.write(data)
            return
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self._head:
            data, self._head = self._head + data, b""
        self.response_bytes += len(data)
        self.conn.write(data)

    def end(self, data: bytes = b"") -> None:
        """Finish the response (with ``data`` as its last bytes)."""
        if self.complete:
            return
        if self._head_only:
            data = b""
        elif self._chunked:
            data = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)) if data else b"0\r\n\r\n"
        if self._head:
            data, self._head = self._head + data, b""
        self.complete = True
        self.response_bytes += len(data)
        if data:
            self.conn.write(data)
        self.conn.exchange_done(self)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response in one write."""
        self.start(status, headers, len(body))
        self.end(body)

    @property
    def paused(self) -> bool:
        """True while the client is not taking what it is sent: await ``drain()`` before more."""
        return self.conn.paused

    async def drain(self) -> None:
        """Wait until the client takes what it was sent. Raises ``ClientGone`` when it leaves or
        is dropped for not reading within the send timeout (the connection's own timer)."""
        await self.conn.drain()

    # --- called by the connection --------------------------------------------------------------

    def _set_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        callback, self.on_gone = self.on_gone, None
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("on_gone callback failed")

    def _release_body(self) -> None:
        if self._charged:
            self.conn.budget.give(self._charged)
            self._charged = 0
