"""One HTTP/1.1 connection to a backend and the response it carries, parsed by httptools.

Why the gateway has its own client: relaying a stream is a few hundred bytes per chunk, and a
general-purpose client spends more CPU on its own machinery (request objects, stream readers,
timers) than on those bytes. Here a request is one ``transport.write`` of bytes built from a
per-backend template, a response is one object that is at once the parser's callback target, its
own body buffer and its own async iterator, and a chunk costs one ``on_body`` call, one list append
and (only when the consumer is waiting) one future. Measured against aiohttp's client on the relay
path: 27-32% less CPU per chunk and a fifth per request (docs/performance.md).

Invariants:

- A connection carries one request at a time (no pipelining); it is busy (it has a ``response``)
  or idle in its pool, until it is closed.
- A response whose message ended cleanly (``on_message_complete``) gives its connection back to the
  pool at that moment, if the server allows keep-alive; the body already received stays with the
  response. A response closed or abandoned before its end closes its connection instead: that is
  how vLLM learns to abort the request and free its KV cache.
- The body is delivered as it arrives. When the consumer falls more than ``HIGH_WATER`` bytes
  behind, reading from the socket pauses until it catches up, so a stalled consumer holds a bounded
  buffer. The status line and headers are bounded by ``MAX_HEAD_BYTES`` and ``MAX_HEADER_COUNT``;
  trailer fields are counted against the same bounds and dropped (never kept, never merged into
  the headers). An unfinished trailer line the parser holds is bounded from the reads that carry
  it (``http1.held_tail``), within one read of the bound.
- An abrupt close before the message is complete is an error, never a clean end. Every failure
  becomes ``BackendUnavailable`` (or ``BadBackendResponse`` for a malformed answer) here and only
  here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import httptools

from vllm_gateway.backends.base import Charge, UpstreamResponse, count_piece, read_capped
from vllm_gateway.errors import BackendUnavailable, BadBackendResponse, UpstreamError
from vllm_gateway.http1 import held_tail

__all__ = [
    "HIGH_WATER",
    "MAX_HEADER_COUNT",
    "MAX_HEAD_BYTES",
    "Connection",
    "HTTPResponse",
    "Stale",
]

HIGH_WATER = 256 << 10  # pause reading when this much body is buffered and unread
# Bound on a response's status line and headers (httptools holds an unfinished header line whole).
MAX_HEAD_BYTES = 64 << 10
MAX_HEADER_COUNT = 100  # header fields of a response; its trailer fields apart
_NO_BODY_STATUS = frozenset({204, 304})


class _HeadTooLarge(Exception):
    """Raised from the parser's callback to stop it."""


class Owner(Protocol):
    """What a connection tells the pool that owns it."""

    def _forget(self, conn: Connection) -> None: ...

    def _release(self, conn: Connection) -> None: ...


class Stale(Exception):
    """A reused connection was closed before any byte of the answer arrived (safe to resend)."""


class Connection(asyncio.Protocol):
    __slots__ = ("idle", "idle_since", "pool", "response", "reused", "transport")

    def __init__(self, pool: Owner) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: HTTPResponse | None = None
        self.idle_since = 0.0
        self.idle = False  # in the pool's idle stack
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.close()  # bytes nobody asked for: the connection's state is unknown
            return
        response._feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._forget(self)
        response = self.response
        if response is not None:
            self.response = None
            response._lost(exc)

    def close(self) -> None:
        """Drop the connection at once (the server sees it closed; vLLM aborts the request)."""
        self.pool._forget(self)
        if self.transport is not None:
            self.transport.abort()


class HTTPResponse(UpstreamResponse):
    """The status, headers and body of one answer; its own async iterator over the body."""

    __slots__ = (
        "_buffered",
        "_carry",
        "_chunks",
        "_conn",
        "_content_length",
        "_done",
        "_error",
        "_extra",
        "_got_bytes",
        "_head",
        "_head_bytes",
        "_header_size",
        "_keep_alive",
        "_loop",
        "_parser",
        "_paused",
        "_trailer_bytes",
        "_trailer_count",
        "_until_eof",
        "_waiter",
        "content_type",
        "headers",
        "status",
    )

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn: Connection | None = conn
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[None] | None = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._done = False
        self._keep_alive = False
        self._extra = False  # bytes after the end of the message: the connection is not reusable
        self._error: UpstreamError | None = None
        self._got_bytes = False
        self._head_bytes = 0  # bytes received before the head was complete
        self._header_size = 0  # bytes of the header lines parsed
        self._trailer_bytes = 0  # trailer fields: counted and bounded, then dropped
        self._trailer_count = 0
        self._carry = 0  # an unfinished trailer line the parser may hold (http1.held_tail)
        self._until_eof = False
        self._content_length: int | None = None
        self.status = 0
        self.content_type = ""
        self.headers: list[tuple[bytes, bytes]] = []

    # --- fed by the connection --------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._got_bytes = True
        body_before = self._buffered
        trailers_before = self._trailer_bytes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._fail(
                    BadBackendResponse("The backend's response headers are too large."), None
                )
                return
            if not self._done:
                self._fail(BadBackendResponse("The backend sent a malformed HTTP response."), exc)
                return
            self._extra = True
        if self._head is not None:
            # The head is not complete yet: all of these bytes were head bytes.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(
                    BadBackendResponse("The backend's response headers are too large."), None
                )
                return
        elif not self._done:
            body = self._buffered - body_before
            if body and data.endswith(b"\n"):
                self._carry = 0  # a read of body that ends at a line end: nothing is held
            else:
                # What the parser may hold: an unfinished trailer line (continued from the last
                # read when this one brought no body).
                seen = body + self._trailer_bytes - trailers_before
                self._carry = held_tail(data, 0 if body else self._carry, seen)
                if self._carry + self._trailer_bytes > MAX_HEAD_BYTES:
                    self._fail(
                        BadBackendResponse("The backend's response trailers are too large."), None
                    )
                    return
        if self._done and self._conn is not None:
            self._hand_back()

    def _lost(self, exc: Exception | None) -> None:
        self._conn = None
        if self._done:
            return
        if self._until_eof and self._head is None and exc is None:
            self._end()  # a body delimited by the close itself
            return
        if not self._got_bytes and self._head is not None:
            self._fail(None, Stale())
            return
        self._fail(BackendUnavailable("The backend closed the connection mid-response."), exc)

    def _fail(self, err: UpstreamError | None, cause: BaseException | None) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.response = None
            conn.close()
        head = self._head
        if head is not None:
            self._head = None
            if not head.done():
                head.set_exception(
                    _with_cause(err, cause) if err is not None else (cause or Stale())
                )
            return
        if self._error is None and not self._done:
            self._error = _with_cause(err or BackendUnavailable(), cause)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _end(self) -> None:
        self._done = True
        self._keep_alive = self._parser.should_keep_alive() and not self._until_eof
        self._wake()

    def _hand_back(self) -> None:
        """After the message ended (and the parser returned): pool the connection or close it."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.response = None
        if self._extra or not self._keep_alive:
            conn.close()
            return
        if self._paused:
            self._paused = False
            conn.transport.resume_reading()  # type: ignore[union-attr]
        conn.pool._release(conn)

    # --- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4
        if self._head is None and self.status >= 200:
            # A trailer field: counted against the head's bounds, then dropped.
            self._trailer_bytes += size
            self._trailer_count += 1
            if self._trailer_count > MAX_HEADER_COUNT or self._trailer_bytes > MAX_HEAD_BYTES:
                raise _HeadTooLarge
            return
        self._header_size += size
        if len(self.headers) >= MAX_HEADER_COUNT:
            raise _HeadTooLarge
        self.headers.append((name, value))
        lname = name.lower()
        if lname == b"content-type":
            self.content_type = value.decode("latin-1")
        elif lname == b"content-length":
            try:
                self._content_length = int(value)
            except ValueError:
                self._content_length = None

    def on_message_begin(self) -> None:
        if self._done:
            self._extra = True

    def on_headers_complete(self) -> None:
        if self._header_size > MAX_HEAD_BYTES:
            raise _HeadTooLarge  # a head that arrived whole in one read
        status = self.status = self._parser.get_status_code()
        if status < 200:  # an interim 1xx answer; the real head follows
            self.headers = []
            self._content_length = None
            return
        if (
            self._content_length is None
            and status >= 200
            and status not in _NO_BODY_STATUS
            and not any(n.lower() == b"transfer-encoding" for n, _ in self.headers)
        ):
            self._until_eof = True
        head = self._head
        if head is not None:
            self._head = None
            if not head.done():
                head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.transport.pause_reading()  # type: ignore[union-attr]
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self.status < 200:
            return  # an interim 1xx answer; the real one follows on the same parser
        self._end()

    # --- the consumer's side ----------------------------------------------------------------

    def chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> HTTPResponse:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._chunks:
                return self._take()
            if self._error is not None:
                raise self._error
            if self._done or self._conn is None:
                raise StopAsyncIteration
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _take(self) -> bytes:
        """Everything buffered, in one piece: under load, one wake-up per burst."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            if self._conn is not None:
                self._conn.transport.resume_reading()  # type: ignore[union-attr]
        return data

    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        if self._done and self._chunks and (self._content_length or 0) <= limit:
            # The whole message came with its head (a short answer): no iteration.
            data = self._take()
            count_piece(0, len(data), limit, charge)
            return data
        return await read_capped(self, limit, self._content_length, charge)

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None:  # not ended: drop the connection so the backend aborts the request
            self._conn = None
            conn.response = None
            conn.close()
            if not self._done and self._error is None:
                # A reader still waiting (another task closed it: an ejected member's stream)
                # must not wait for bytes that will never come.
                self._error = BackendUnavailable("The response was closed before its end.")
                self._wake()
        self._chunks.clear()
        self._buffered = 0

    @property
    def complete(self) -> bool:
        """True once the whole message has been received (the connection may be reused)."""
        return self._done


def _with_cause(err: UpstreamError, cause: BaseException | None) -> UpstreamError:
    err.__cause__ = cause
    return err
