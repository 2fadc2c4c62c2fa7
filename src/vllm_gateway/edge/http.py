"""The gateway's HTTP/1.1 server: one ``asyncio.Protocol`` per client connection, parsed by
httptools, with a bound on everything a client controls.

Why its own server: the promise ("every request ends within bounds the settings give; nothing is
held") must hold against clients that are slow or hostile, and uvicorn's httptools server gives no
bound on reading a request's headers or body, none on the size of its headers, and none on a send
to a client that stops reading: the permit of a stream waited in that send for as long as the
client liked. Owning the connection also takes the ASGI message per chunk off the hot path.

Bounds (each a field of ``Limits``, each a setting; docs/reliability.md lists them with their tests):

- ``header_timeout``: from a connection's open, or a request's first byte, to the end of its
  headers; then 408 and the connection closes (slowloris, and connections that never send a byte);
- ``body_timeout``: from the end of the headers to the end of the body; then 408 and close;
- ``idle_timeout``: a keep-alive connection between requests; then it is closed;
- ``send_timeout``: how long the connection's write buffer may stay above its high-water mark (the
  client does not take what it is sent); then the connection is aborted, which ends the request
  (its permit is released and its upstream request aborted). A connection that is closing with
  bytes still buffered gets the same bound. Nothing ever awaits a send without it;
- ``max_header_bytes`` and ``max_header_count``: a request's line and headers, and apart its
  trailer fields (counted, never kept); beyond them 431 and close. Counted per request, never per
  read: what the parser holds of an unfinished line is bounded from the reads (``http1``);
- ``max_connections``: open client connections; one more gets a canned 503 and is closed at once;
- request bodies: a cap per route (413, as soon as the length says so or the bytes pass it) and a
  budget for all bodies held by the process together (``BufferBudget``; 503 beyond it);
- pipelining: at most ``max_pipelined`` requests are read ahead of the one being answered, and
  reading pauses while any waits. Answers go strictly in request order: a request refused while
  read ahead (malformed bytes, its head refused, one too many, its body past a bound) keeps its
  turn, is answered after the requests before it, runs nowhere, and ends the connection; nothing
  after it is read. Every body read ahead is given back to the budget on every path.

Exchanges: a request and its response are one ``Exchange``. The handler's ``admit`` sees it when
its headers are complete and may refuse it at once (the server sends the answer and closes without
reading the body); ``handle`` runs as a task once the body is in. The handler answers with
``start``/``write``/``end`` (no await: bytes go to the transport's buffer) and awaits ``drain()``
only when ``paused``. When the client goes away before the response is complete, ``on_gone`` is
called once.

A client that half-closes after a complete request may still be reading. Once its response has
started, the gateway keeps writing (a client that has really gone shows at the next write). Before
that, on Linux, the gateway tells the two apart by sending an interim ``100 Continue`` (legal for an
HTTP/1.1 client at any time) and looking at the socket a couple of round trips later: a closed peer
has answered with a reset. Elsewhere, and for HTTP/1.0, a half-close before the response is a
client gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol
from urllib.parse import unquote

import httptools

from vllm_gateway import errors
from vllm_gateway.errors import GatewayError
from vllm_gateway.http1 import held_tail
from vllm_gateway.observability.connections import ConnectionStats
from vllm_gateway.proxy.budget import BufferBudget
from vllm_gateway.proxy.responder import ClientGone

__all__ = ["Exchange", "Handler", "HttpServer", "Limits"]

log = logging.getLogger("vllm_gateway.http")

# Linux: tcp_info's first byte is the state; TCP_CLOSE means the peer's reset has arrived. The
# round-trip time (µs) is the u32 at offset 68.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_CLOSE = 7
_TCP_INFO_LEN = 104

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in http.HTTPStatus
}
_NO_BODY_STATUS = frozenset({204, 304})


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


class _Date:
    """The Date header, formatted once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"date: %s\r\n" % formatdate(now, usegmt=True).encode("latin-1")
        return self._line


_DATE = _Date()


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
        "state",
        "status",
        "trailer_bytes",
        "trailer_count",
    )

    def __init__(self, conn: Connection) -> None:
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
        self.state: dict[str, Any] = {}  # the handler's own per-request values
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
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def gone(self) -> bool:
        return self._gone

    @property
    def too_slow(self) -> bool:
        return self.conn.too_slow

    @property
    def budget(self) -> BufferBudget:
        return self.conn.server.budget

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
        lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status]
        lines.extend(b"%s: %s\r\n" % pair for pair in headers)
        if self.extra_headers:
            lines.extend(b"%s: %s\r\n" % pair for pair in self.extra_headers)
        lines.append(_DATE.line())
        self._head_only = self.method == "HEAD" or status in _NO_BODY_STATUS or status < 200
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
            self.conn.server.budget.give(self._charged)
            self._charged = 0


class Connection(asyncio.Protocol):
    """One client connection: reads requests one at a time, answers them in order."""

    __slots__ = (
        "_carry",
        "_drain_waiters",
        "_idle_wait",
        "_in_headers",
        "_lingering",
        "_maybe_trailers",
        "_probe",
        "_seen",
        "_send_timer",
        "_timer",
        "_timer_armed",
        "_timer_at",
        "_timer_callback",
        "closing",
        "current",
        "half_closed",
        "lost",
        "parser",
        "paused",
        "peer",
        "pending",
        "reading",
        "server",
        "stopped",
        "task",
        "too_slow",
        "transport",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer: tuple[str, int] | None = None
        self.current: Exchange | None = None  # the request being read or answered
        self.pending: deque[Exchange] = deque()  # pipelined requests behind it
        self.task: asyncio.Task[None] | None = None
        # The connection's one phase timer (header, body, idle, linger): ``_timer_callback`` runs
        # at ``_timer_at``. The handle is armed for ``_timer_armed`` and rearms itself when the
        # deadline moved later, so each phase change is a store, not a timer made and cancelled.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_armed = 0.0
        self._timer_at = 0.0
        self._timer_callback: Callable[[], None] | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._probe: asyncio.TimerHandle | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        # What the parser holds unseen (an unfinished header or trailer line), bounded from the
        # reads themselves: ``http1.held_tail``; ``seen`` counts the bytes of the current read
        # that callbacks accounted for.
        self._carry = 0
        self._seen = 0
        self._in_headers = False  # the parser is inside a request line or headers
        self._maybe_trailers = False  # after a chunk-size line: the last one's trailers may follow
        # Parsing stopped for good: a request read ahead failed (it is answered in its turn, after
        # the ones before it), or bytes came after a request that closes the connection.
        self.stopped = False
        self._idle_wait = False  # between two requests of a keep-alive connection
        self._lingering = False
        self.paused = False  # the client is not taking what it is sent
        self.reading = True
        self.closing = False
        self.half_closed = False
        self.lost = False
        self.too_slow = False  # dropped for not taking what it was sent

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        server.connections.add(self)
        server.stats.open = len(server.connections)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = (str(peer[0]), int(peer[1]))
        limits = server.limits
        if len(server.connections) > limits.max_connections or server.closing:
            # Refused cheaply: one canned answer, no parsing, no timer, closed at once.
            server.stats.refused += 1
            err = errors.ShuttingDown() if server.closing else errors.TooManyConnections()
            self.closing = True
            self.transport.write(_error_response(err, server.handler.new_request_id([])))  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]
            return
        server.stats.accepted += 1
        self.transport.set_write_buffer_limits(limits.write_high_water, limits.write_low_water)  # type: ignore[union-attr]
        # A fresh connection has header_timeout to send its whole headers; one that never sends
        # a byte is closed then.
        self._set_timer(limits.header_timeout, self._on_header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closing or self.stopped:
            return  # lingering after an early answer, shutting down, or parsing over: discard
        if self._idle_wait:
            # The first byte after a keep-alive wait: the header clock starts.
            self._idle_wait = False
            self._set_timer(self.server.limits.header_timeout, self._on_header_timeout)
        self._seen = 0
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not isinstance(exc.__context__, _Refused):  # else a callback has answered
                self._malformed(exc)
            return
        if self._in_headers or self._maybe_trailers:
            self._check_held(data)

    def _malformed(self, exc: Exception) -> None:
        """The parser rejected the bytes: the request they belong to is refused; the requests
        before it on this connection still get their own answers first."""
        exchange = self._parsing()
        if exchange is not None and exchange.received:
            # The bytes came after a whole request and began no new one.
            if not exchange.keep_alive:
                self.stopped = True  # after 'Connection: close' (or HTTP/1.0): ignored
                self._pause_reading()
                return
            exchange = Exchange(self)
            self.pending.append(exchange)
        if exchange is None:
            exchange = self.current = Exchange(self)
        self.server.stats.malformed += 1
        if isinstance(exc, httptools.HttpParserUpgrade):
            err: GatewayError = errors.InvalidRequest("Protocol upgrades are not supported here.")
        else:
            err = errors.MalformedRequest()
        self._fail(exchange, err)

    def _check_held(self, data: bytes) -> None:
        """The read ended inside a head or a trailer section: bound what it holds, per message."""
        exchange = self._parsing()
        if exchange is None:
            return
        self._carry = held_tail(data, self._carry, self._seen)
        limits = self.server.limits
        if self._in_headers:
            held = self._carry + exchange.header_bytes + len(exchange.raw_path)
        else:
            held = self._carry + exchange.trailer_bytes
        if held > limits.max_header_bytes:
            self.server.stats.headers_too_large += 1
            self._fail(exchange, errors.HeadersTooLarge())

    def eof_received(self) -> bool | None:
        current = self.current
        if current is None or not current.received or current.complete or self.closing:
            return False  # idle, lingering, or a request cut short: close
        self.half_closed = True
        if current.started:
            return True  # keep writing; a client that has gone shows at the next write
        if current.http_version != "1.1" or _TCP_INFO is None:
            self._client_left()
            return False
        # Half-closed before any answer: a peer that has closed resets when it is sent something.
        self.write(_CONTINUE)
        self._probe = asyncio.get_running_loop().call_later(
            min(1.0, max(0.005, 4 * self._rtt())), self._check_peer
        )
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self._cancel_timers()
        self.server.connections.discard(self)
        self.server.stats.open = len(self.server.connections)
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ClientGone())
        while self.pending:
            self.pending.popleft()._release_body()
        current = self.current
        if current is not None and not current.complete:
            current._set_gone()
            if not current.received:  # never handed to a handler: its body is ours to free
                current._release_body()
        self.server._connection_closed()

    def pause_writing(self) -> None:
        self.paused = True
        if self._send_timer is None:
            self._send_timer = asyncio.get_running_loop().call_later(
                self.server.limits.send_timeout, self._on_send_timeout
            )

    def resume_writing(self) -> None:
        self.paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_headers = True
        self._carry = 0
        exchange = Exchange(self)
        if self.current is None:
            self.current = exchange
            return
        self.pending.append(exchange)
        self._pause_reading()
        if len(self.pending) > self.server.limits.max_pipelined:
            raise self._fail(exchange, errors.MalformedRequest("Too many pipelined requests."))

    def on_url(self, url: bytes) -> None:
        exchange = self._parsing_now()
        exchange.raw_path += url
        self._seen += len(url)
        if len(exchange.raw_path) > self.server.limits.max_header_bytes:
            raise self._fail(exchange, errors.UriTooLong())

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self._parsing_now()
        size = len(name) + len(value)
        self._seen += size
        self._carry = 0  # the line the parser held is now handed over
        limits = self.server.limits
        if self._in_headers:
            exchange.header_bytes += size + 4
            exchange.header_count += 1
            if (
                exchange.header_count > limits.max_header_count
                or exchange.header_bytes + len(exchange.raw_path) > limits.max_header_bytes
            ):
                self.server.stats.headers_too_large += 1
                raise self._fail(exchange, errors.HeadersTooLarge())
            exchange.headers.append((name.lower(), value))
            return
        # A trailer field (after the last chunk): counted and bounded like the headers, then
        # dropped; the request's meaning is in its head, and a trailer never joins it.
        exchange.trailer_bytes += size + 4
        exchange.trailer_count += 1
        if (
            exchange.trailer_count > limits.max_header_count
            or exchange.trailer_bytes > limits.max_header_bytes
        ):
            self.server.stats.headers_too_large += 1
            raise self._fail(
                exchange, errors.HeadersTooLarge("The request's trailer fields are too large.")
            )

    def on_headers_complete(self) -> None:
        exchange = self._parsing_now()
        parser = self.parser
        self._in_headers = False
        self._carry = 0
        if exchange.header_bytes + len(exchange.raw_path) > self.server.limits.max_header_bytes:
            self.server.stats.headers_too_large += 1
            raise self._fail(exchange, errors.HeadersTooLarge())
        exchange.method = parser.get_method().decode("ascii", "replace")
        exchange.http_version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive() and exchange.http_version == "1.1"
        exchange.request_id = self.server.handler.new_request_id(exchange.headers)
        err = _framing_error(exchange, parser.should_upgrade())
        if err is not None:
            exchange.keep_alive = False
            raise self._fail(exchange, err)
        try:
            url = httptools.parse_url(exchange.raw_path)
        except httptools.HttpParserInvalidURLError:
            raise self._fail(exchange, errors.MalformedRequest("Invalid request target.")) from None
        raw = url.path or b"/"
        exchange.path = unquote(raw.decode("latin-1")) if b"%" in raw else raw.decode("latin-1")
        exchange.query = url.query or b""
        current = exchange is self.current
        if current:
            self._set_timer(self.server.limits.body_timeout, self._on_body_timeout)
        err = self.server.handler.admit(exchange)
        if err is None:
            length = exchange.header(b"content-length")
            if length is not None and length.isdigit() and int(length) > exchange.body_limit:
                err = errors.BodyTooLarge(f"The request body exceeds {exchange.body_limit} bytes.")
        if err is not None:
            raise self._fail(exchange, err)
        if current and exchange.expects_continue:
            self.write(_CONTINUE)

    def on_chunk_header(self) -> None:
        self._maybe_trailers = True  # a data chunk's bytes follow, or the last chunk's trailers

    def on_chunk_complete(self) -> None:
        self._maybe_trailers = False
        self._carry = 0

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing_now()
        self._maybe_trailers = False
        self._carry = 0
        self._seen += len(body)
        size = exchange._charged + len(body)
        if size > exchange.body_limit:
            err: GatewayError = errors.BodyTooLarge(
                f"The request body exceeds {exchange.body_limit} bytes."
            )
        elif not self.server.budget.take(len(body)):
            self.server.stats.budget_refusals += 1
            err = errors.Overloaded(
                "The gateway holds as many request bodies as its memory budget allows; retry later.",
                retry_after=1.0,
            )
        else:
            exchange._charged = size
            exchange._body.append(body)
            return
        raise self._fail(exchange, err)

    def on_message_complete(self) -> None:
        exchange = self._parsing_now()
        self._maybe_trailers = False
        self._carry = 0
        exchange.received = True
        exchange.arrived_at = time.perf_counter()
        if exchange is self.current:
            self._cancel_timer()
            self._dispatch(exchange)

    # --- dispatch and the end of an exchange -----------------------------------------------------

    def _parsing(self) -> Exchange | None:
        """The exchange whose request the parser is reading (or read last), if any."""
        if self.pending:
            return self.pending[-1]
        return self.current

    def _parsing_now(self) -> Exchange:
        exchange = self._parsing()
        assert exchange is not None  # a callback runs inside a message
        return exchange

    def _dispatch(self, exchange: Exchange) -> None:
        if exchange.error is not None:
            # Refused while it was read ahead: its answer, then the connection ends (what came
            # after it was never read).
            self._lingering = True
            self._answer_error(exchange, exchange.error)
            return
        err = self.server.handler.ready(exchange)
        if err is not None:
            # The request is whole, so the connection may go on.
            self._answer_error(exchange, err, keep_alive=exchange.keep_alive)
            return
        task = self.task = asyncio.get_running_loop().create_task(
            self.server.handler.handle(exchange)  # type: ignore[arg-type]
        )
        task.add_done_callback(functools.partial(self._handled, exchange))

    def _handled(self, exchange: Exchange, task: asyncio.Task[None]) -> None:
        # The handler may end after its response did, when the next request on this connection
        # is already being answered: only its own exchange is its business.
        if self.task is task:
            self.task = None
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                log.error("request %s: handler failed", exchange.request_id, exc_info=exc)
        if exchange.complete:
            return
        # The handler ended without finishing its response: a client still there must not take
        # a cut response for a whole one.
        if not self.lost and not exchange.gone:
            log.error("request %s: the handler ended without a whole response", exchange.request_id)
        exchange._release_body()
        if not exchange.started and not self.lost:
            self._answer_error(exchange, GatewayError())
        else:
            self.abort()

    def _answer_error(
        self, exchange: Exchange, err: GatewayError, keep_alive: bool = False
    ) -> None:
        exchange.keep_alive = keep_alive
        exchange.respond(
            err.status,
            _error_headers(err, exchange.request_id),
            exchange.render_error(err, exchange.request_id),
        )
        self.server.refused(exchange, err)

    def exchange_done(self, exchange: Exchange) -> None:
        """The response was written whole: next request, keep-alive wait, or close."""
        exchange._release_body()
        if exchange is not self.current:
            return
        self.current = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self._lingering:
            self._linger()
            return
        if not exchange.keep_alive or self.closing or self.server.closing:
            self.close()
            return
        if self.half_closed and not (self.pending and self.pending[0].received):
            self.close()  # the client sent its last request and this was its answer
            return
        if self.pending:
            nxt = self.current = self.pending.popleft()
            if not self.pending:
                self._resume_reading()
            if nxt.received:
                self._dispatch(nxt)
            elif not nxt.method:  # still in its head
                self._set_timer(self.server.limits.header_timeout, self._on_header_timeout)
            else:
                self._set_timer(self.server.limits.body_timeout, self._on_body_timeout)
                if nxt.expects_continue:
                    self.write(_CONTINUE)  # its turn has come: now it may send its body
            return
        self._idle_wait = True
        self._set_timer(self.server.limits.idle_timeout, self._on_idle_timeout)

    # --- writing ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return
        transport.write(data)

    async def drain(self) -> None:
        if self.lost:
            raise ClientGone()
        if not self.paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    # --- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close once the buffered bytes are taken, within the send timeout."""
        transport = self.transport
        if transport is None or self.lost:
            return
        self.closing = True
        self._cancel_timer()
        if transport.get_write_buffer_size():
            self._set_timer(self.server.limits.send_timeout, self._on_linger_timeout)
        transport.close()

    def abort(self) -> None:
        """Drop the connection now, discarding anything unsent."""
        if self.transport is not None and not self.lost:
            self.closing = True
            self.transport.abort()

    def close_if_idle(self) -> None:
        """For shutdown: close now unless a request is being answered; that one ends with
        'connection: close'."""
        current = self.current
        if current is None or not current.received:
            self.close()
        else:
            self.closing = True

    def _fail(self, exchange: Exchange, err: GatewayError) -> _Refused:
        """Refuse ``exchange`` while it is being read. The one being read now is answered at once
        (``_refuse``); one read ahead behind a request still being answered is answered in its
        turn, after that one, and parsing stops there: it never runs, and what follows it is
        never read. Returns the exception a parser callback raises to stop the parser."""
        if exchange is self.current and not exchange.received:
            return self._refuse(err)
        exchange.error = err
        exchange.received = True
        exchange._release_body()
        self.stopped = True
        self._pause_reading()
        return _Refused()

    def _refuse(self, err: GatewayError) -> _Refused:
        """Answer ``err`` for the request being read now (its body not read whole), then linger
        and close. Returns the exception a parser callback raises to stop the parser."""
        if self.closing or self.lost:
            return _Refused()
        current = self.current
        if current is not None and current.received:
            # Handed on already: its own answer is coming; the connection ends after it.
            self.closing = True
            self._pause_reading()
            return _Refused()
        self._lingering = True
        self._cancel_timer()
        if current is None:
            # Nothing parsed yet (a bad first line, a header timeout before any byte...).
            current = self.current = Exchange(self)
        current.received = True
        if not current.request_id:
            current.request_id = self.server.handler.new_request_id(current.headers)
        current.error = err
        current._release_body()
        while self.pending:  # none can be read ahead of an unread request; kept for safety
            self.pending.popleft()._release_body()
        self._answer_error(current, err)
        return _Refused()

    def _linger(self) -> None:
        """After an early answer: stop parsing, half-close, discard what the client still sends for
        a moment (so that the answer is not lost to a reset), then close."""
        transport = self.transport
        if transport is None or self.lost:
            return
        self.closing = True
        self._cancel_timer()
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            if transport.can_write_eof():
                transport.write_eof()
        self._set_timer(self.server.limits.linger, self.abort)

    def _client_left(self) -> None:
        current = self.current
        if current is not None and not current.complete:
            current._set_gone()

    # --- timers ----------------------------------------------------------------------------------

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        self._timer_at = when
        self._timer_callback = callback
        if self._timer is None or self._timer_armed > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_armed = when
            self._timer = loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        self._timer_callback = None  # an armed handle finds nothing to do

    def _on_timer(self) -> None:
        self._timer = None
        callback = self._timer_callback
        if callback is None:
            return
        if self._timer_at > self._timer_armed:  # the deadline moved later since it was armed
            self._timer_armed = self._timer_at
            self._timer = asyncio.get_running_loop().call_at(self._timer_at, self._on_timer)
            return
        self._timer_callback = None
        callback()

    def _cancel_timers(self) -> None:
        self._timer_callback = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    def _on_header_timeout(self) -> None:
        self.server.stats.header_timeouts += 1
        if self.current is None and not self._in_headers:
            self.abort()  # never sent a byte: nobody to answer
            return
        self._refuse(errors.ClientTimeout("The request headers did not arrive in time."))

    def _on_body_timeout(self) -> None:
        self.server.stats.body_timeouts += 1
        self._refuse(errors.ClientTimeout("The request body did not arrive in time."))

    def _on_idle_timeout(self) -> None:
        self.server.stats.idle_closed += 1
        self.close()

    def _on_send_timeout(self) -> None:
        self._send_timer = None
        if self.paused:
            self.server.stats.send_timeouts += 1
            self.too_slow = True
            self.abort()

    def _on_linger_timeout(self) -> None:
        self.server.stats.send_timeouts += 1
        self.too_slow = True
        self.abort()

    # --- the half-close probe --------------------------------------------------------------------

    def _tcp_info(self) -> bytes | None:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None or _TCP_INFO is None:
            return None
        try:
            return bytes(sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN))
        except OSError:
            return None

    def _rtt(self) -> float:
        info = self._tcp_info()
        if info is None or len(info) < 72:
            return 0.05
        return float(struct.unpack_from("I", info, 68)[0]) / 1e6

    def _check_peer(self) -> None:
        self._probe = None
        info = self._tcp_info()
        if info is None or info[0] == _TCP_CLOSE:
            self._client_left()
            self.abort()

    # --- flow control of reading -----------------------------------------------------------------

    def _pause_reading(self) -> None:
        if self.reading and self.transport is not None and not self.lost:
            self.reading = False
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self.reading and self.transport is not None and not self.lost:
            self.reading = True
            self.transport.resume_reading()


def _framing_error(exchange: Exchange, upgrade: bool) -> GatewayError | None:
    """The RFC 9112/9110 rules on a request's head that llhttp leaves to its caller; the
    conformance table (tests/integration/test_edge_conformance.py) states each with its answer."""
    if exchange.http_version not in ("1.1", "1.0"):
        return errors.VersionNotSupported()
    if upgrade:
        return errors.InvalidRequest("Protocol upgrades are not supported here.")
    hosts = 0
    codings: list[bytes] = []
    expect: bytes | None = None
    for name, value in exchange.headers:
        if name == b"host":
            hosts += 1
        elif name == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b","))
        elif name == b"expect":
            expect = value.strip().lower()
    if exchange.http_version == "1.1" and hosts != 1:
        # RFC 9112 3.2: exactly one Host in an HTTP/1.1 request, else 400.
        return errors.MalformedRequest("An HTTP/1.1 request must carry exactly one Host header.")
    if hosts > 1:
        return errors.MalformedRequest("A request must not carry more than one Host header.")
    if codings:
        if exchange.http_version != "1.1":
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
            return errors.MalformedRequest("Transfer-Encoding is not allowed in HTTP/1.0.")
        if codings[-1] != b"chunked":
            # RFC 9112 6.3: without chunked last, the body's length cannot be known.
            return errors.MalformedRequest("Transfer-Encoding must end with 'chunked'.")
        if codings != [b"chunked"]:
            return errors.UnsupportedTransferCoding()
    if expect is not None and exchange.http_version == "1.1":
        # RFC 9110 10.1.1: an HTTP/1.0 request's expectation is ignored.
        if expect != b"100-continue":
            return errors.ExpectationFailed()
        exchange.expects_continue = True
    return None


class _Refused(Exception):
    """Raised from a parser callback once the server has answered; stops the parser."""


def _error_response(err: GatewayError, request_id: str) -> bytes:
    """A whole error response that closes the connection, for answers made outside an exchange."""
    body = errors.json_body(err, request_id)
    return b"".join(
        [
            _STATUS_LINES[err.status],
            *(b"%s: %s\r\n" % pair for pair in _error_headers(err, request_id)),
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body),
            body,
        ]
    )


def _error_headers(err: GatewayError, request_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"x-request-id", request_id.encode("latin-1")),
        *err.headers(),
    ]


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

    def _connection_closed(self) -> None:
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
