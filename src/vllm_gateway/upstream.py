"""A lean HTTP/1.1 client for one vLLM server: ``UpstreamPool`` and the ``FastHTTPBackend`` on it.

Why it exists: relaying a stream is a few hundred bytes per chunk, and a general-purpose client
spends more CPU on its own machinery (request objects, stream readers, timers) than on those bytes.
Here a request is one ``transport.write`` of bytes built from a per-backend template, a response is
one object that is at once the ``httptools`` parser's callback target, its own body buffer and its
own async iterator, and a chunk costs one ``on_body`` call, one list append and (only when the
consumer is waiting) one future. ``scripts/compare_clients.py`` measures it against aiohttp and httpx.

Invariants:

- One request at a time per connection (no pipelining). A connection is in exactly one place: busy
  (it has a ``response``) or idle in its pool's LIFO stack, until it is closed.
- A response whose message ended cleanly (httptools' ``on_message_complete``) gives its connection
  back to the pool at that moment, if the server allows keep-alive; the body already received stays
  with the response. A response closed or abandoned before its end closes its connection instead:
  that is how vLLM learns to abort the request and free its KV cache.
- Idle connections live at most ``idle_timeout`` seconds (below uvicorn's 5 s keep-alive, so the
  server rarely closes one under us). A request that finds its reused connection closed before any
  byte of the answer arrived is sent once more on a fresh connection; nothing else is retried.
- The body is delivered as it arrives. When the consumer falls more than ``high_water`` bytes behind,
  reading from the socket pauses until it catches up, so a stalled consumer holds a bounded buffer.
- An abrupt close before the message is complete is an error, never a clean end. Every failure
  becomes ``BackendUnavailable`` (or ``BadBackendResponse`` for a malformed answer) here and only here.
- No limit on connections (admission bounds them), no redirects, no proxies from the environment.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools
import orjson

from .backend import Backend, Charge, UpstreamRequest, UpstreamResponse, read_capped
from .errors import BackendUnavailable, BadBackendResponse, UpstreamError

__all__ = ["FastHTTPBackend", "UpstreamHTTPResponse", "UpstreamPool"]

HIGH_WATER = 256 << 10  # pause reading when this much body is buffered and unread
# Bound on a response's status line and headers (httptools holds an unfinished header line whole).
MAX_HEAD_BYTES = 64 << 10
_NO_BODY_STATUS = frozenset({204, 304})


class _Stale(Exception):
    """A reused connection was closed before any byte of the answer arrived (safe to resend)."""


class _Connection(asyncio.Protocol):
    __slots__ = ("idle", "idle_since", "pool", "response", "reused", "transport")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamHTTPResponse | None = None
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


class UpstreamHTTPResponse(UpstreamResponse):
    """The status, headers and body of one answer; its own async iterator over the body."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_content_length",
        "_done",
        "_error",
        "_extra",
        "_got_bytes",
        "_head",
        "_head_bytes",
        "_keep_alive",
        "_loop",
        "_parser",
        "_paused",
        "_until_eof",
        "_waiter",
        "content_type",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._conn: _Connection | None = conn
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
        self._until_eof = False
        self._content_length: int | None = None
        self.status = 0
        self.content_type = ""
        self.headers: list[tuple[bytes, bytes]] = []

    # --- fed by the connection --------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
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
            self._fail(None, _Stale())
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
                    _with_cause(err, cause) if err is not None else (cause or _Stale())
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

    def __aiter__(self) -> UpstreamHTTPResponse:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                # Everything buffered goes out in one piece: under load, one wake-up per burst.
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    if self._conn is not None:
                        self._conn.transport.resume_reading()  # type: ignore[union-attr]
                return data
            if self._error is not None:
                raise self._error
            if self._done or self._conn is None:
                raise StopAsyncIteration
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        return await read_capped(self, limit, self._content_length, charge)

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None:  # not ended: drop the connection so the backend aborts the request
            self._conn = None
            conn.response = None
            conn.close()
        self._chunks.clear()
        self._buffered = 0

    @property
    def complete(self) -> bool:
        """True once the whole message has been received (the connection may be reused)."""
        return self._done


def _with_cause(err: UpstreamError, cause: BaseException | None) -> UpstreamError:
    err.__cause__ = cause
    return err


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one ``http://`` or ``https://`` origin."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        idle_timeout: float = 4.0,
        ssl_context: _ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self._ssl: _ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or _ssl.create_default_context()
        default_port = 443 if parts.scheme == "https" else 80
        netloc = self.host if ":" not in self.host else f"[{self.host}]"
        if self.port != default_port:
            netloc = f"{netloc}:{self.port}"
        self.host_header = netloc.encode("idna")
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self.connections_opened = 0  # since start: a cold pool shows as a jump here

    # --- counts (for leak checks and metrics) -------------------------------------------------

    def open_connections(self) -> int:
        """Connections held, busy or idle."""
        return len(self._open)

    def idle_connections(self) -> int:
        return len(self._idle)

    def busy_connections(self) -> int:
        """Connections carrying a request now (what a leak check wants to see at zero)."""
        return len(self._open) - len(self._idle)

    # --- requests -------------------------------------------------------------------------

    async def request(
        self, method: str, path: str, head_lines: bytes = b"", body: bytes | None = None
    ) -> UpstreamHTTPResponse:
        """Send one request; return once the answer's status and headers are parsed.

        ``head_lines`` are extra header lines, each ending in CRLF, already checked by the caller.
        A body (even empty) gets a Content-Length. Raises ``BackendUnavailable``.
        """
        if self._closed:
            raise BackendUnavailable("The backend client is closed.")
        start = b"%s %s%s HTTP/1.1\r\nHost: %s\r\n" % (
            method.encode("ascii"),
            self.base_path.encode("ascii"),
            path.encode("ascii"),
            self.host_header,
        )
        if body is None:
            data = start + head_lines + b"\r\n"
        else:
            data = b"%s%sContent-Length: %d\r\n\r\n%s" % (start, head_lines, len(body), body)
        loop = asyncio.get_running_loop()
        while True:
            conn = self._take_idle(loop)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(loop)
            response = UpstreamHTTPResponse(conn, loop)
            conn.response = response
            head = response._head
            conn.transport.write(data)  # type: ignore[union-attr]
            try:
                await head  # type: ignore[misc]
            except _Stale:
                if reused:
                    continue  # the server closed it while idle; our request never reached it
                raise BackendUnavailable(
                    "The backend closed the connection before answering."
                ) from None
            except BaseException:
                await response.aclose()  # cancelled or failed: never reuse this connection
                raise
            return response

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()  # LIFO: the warmest connection, and the others may time out
            conn.idle = False
            if loop.time() - conn.idle_since > self.idle_timeout:
                # Every connection below this one is older still.
                old = [*idle, conn]
                idle.clear()
                for stale in old:
                    stale.idle = False
                    stale.close()
                return None
            if not conn.transport.is_closing():  # type: ignore[union-attr]
                conn.reused = True
                return conn
            conn.close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except (OSError, TimeoutError) as exc:
            raise BackendUnavailable() from exc
        if self._closed:
            conn.close()
            raise BackendUnavailable("The backend client is closed.")
        self._open.add(conn)
        self.connections_opened += 1
        return conn

    # --- the pool's bookkeeping -----------------------------------------------------------------

    def _release(self, conn: _Connection) -> None:
        if self._closed or conn.transport is None or conn.transport.is_closing():
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        conn.idle = True
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(self.idle_timeout, self._sweep_idle, loop)

    def _sweep_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close connections idle past the timeout, oldest first (the bottom of the stack)."""
        self._sweep = None
        idle = self._idle
        cutoff = loop.time() - self.idle_timeout
        n = 0
        while n < len(idle) and idle[n].idle_since <= cutoff:
            n += 1
        old, idle[:n] = idle[:n], []
        for conn in old:
            conn.idle = False
            conn.close()
        if idle:
            delay = max(0.05, idle[0].idle_since + self.idle_timeout - loop.time())
            self._sweep = loop.call_later(delay, self._sweep_idle, loop)

    def _forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if conn.idle:  # the server closed an idle connection (rare): O(n) is fine
            conn.idle = False
            self._idle.remove(conn)

    async def aclose(self) -> None:
        """Close every connection, busy ones included (their responses fail)."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in self._idle:
            conn.idle = False
        self._idle.clear()
        for conn in list(self._open):
            conn.close()
        await asyncio.sleep(0)  # let connection_lost callbacks run


def _check_header_value(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("header value with a line break")
    return value


class FastHTTPBackend(Backend):
    """``HTTPBackend``'s drop-in replacement on ``UpstreamPool``: same constructor, same behaviour."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        api_key: str | None = None,
        name: str | None = None,
        idle_timeout: float = 4.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name or self.url
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._pool: UpstreamPool | None = None
        lines = b"Content-Type: application/json\r\n"
        if api_key:
            lines += b"Authorization: Bearer %s\r\n" % _check_header_value(api_key).encode(
                "latin-1"
            )
        self._base_lines = lines
        UpstreamPool(self.url)  # check the URL now, as the constructor of HTTPBackend's peers would

    async def start(self) -> None:
        self._pool = UpstreamPool(
            self.url, connect_timeout=self._connect_timeout, idle_timeout=self._idle_timeout
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    @property
    def pool(self) -> UpstreamPool:
        if self._pool is None:
            raise RuntimeError("FastHTTPBackend used before start()")
        return self._pool

    def open_connections(self) -> int:
        """Connections held by the pool, idle or busy (for leak checks)."""
        return self._pool.open_connections() if self._pool is not None else 0

    def busy_connections(self) -> int:
        """Connections carrying a request now."""
        return self._pool.busy_connections() if self._pool is not None else 0

    def connections_opened(self) -> int:
        """Connections opened to the backend since start (each one a TCP handshake)."""
        return self._pool.connections_opened if self._pool is not None else 0

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        lines = self._base_lines
        if request.request_id:
            lines += b"X-Request-ID: %s\r\n" % _check_header_value(request.request_id).encode(
                "latin-1"
            )
        body = request.body if request.method != "GET" else None
        return await self.pool.request(request.method, request.path, lines, body)

    async def _get(self, path: str, timeout: float, limit: int) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            response = await self.pool.request("GET", path, self._base_lines)
            try:
                return response.status, await response.read(limit)
            finally:
                await response.aclose()

    async def check_health(self, timeout: float) -> bool:
        try:
            status, _ = await self._get("/health", timeout, 64 << 10)
        except (UpstreamError, TimeoutError):
            return False
        return status == 200

    async def model_ids(self, timeout: float) -> list[str] | None:
        try:
            status, raw = await self._get("/v1/models", timeout, 4 << 20)
            if status != 200:
                return None
            body = orjson.loads(raw)
            return [str(m["id"]) for m in body.get("data", []) if isinstance(m, dict) and "id" in m]
        except (UpstreamError, TimeoutError, orjson.JSONDecodeError, AttributeError, TypeError):
            return None
