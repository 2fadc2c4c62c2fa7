"""One client connection: an ``asyncio.Protocol`` whose bytes httptools parses, its requests
answered one after another, every bound a client controls enforced here (``Limits``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote

import httptools

from vllm_gateway import errors
from vllm_gateway.edge.http.contract import Server
from vllm_gateway.edge.http.exchange import Exchange
from vllm_gateway.edge.http.framing import CONTINUE, error_headers, error_response, head_error
from vllm_gateway.errors import GatewayError
from vllm_gateway.http1 import held_tail
from vllm_gateway.proxy.responder import ClientGone

__all__ = ["Connection"]

log = logging.getLogger("vllm_gateway.http")

# Linux: tcp_info's first byte is the state; TCP_CLOSE means the peer's reset has arrived. The
# round-trip time (µs) is the u32 at offset 68.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_CLOSE = 7
_TCP_INFO_LEN = 104


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
        "budget",
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

    def __init__(self, server: Server) -> None:
        self.server = server
        self.budget = server.budget
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
        open_now = server.opened(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = (str(peer[0]), int(peer[1]))
        limits = server.limits
        if open_now > limits.max_connections or server.closing:
            # Refused cheaply: one canned answer, no parsing, no timer, closed at once.
            server.stats.refused += 1
            err = errors.ShuttingDown() if server.closing else errors.TooManyConnections()
            self.closing = True
            self.transport.write(error_response(err, server.handler.new_request_id([])))  # type: ignore[union-attr]
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
        self.write(CONTINUE)
        self._probe = asyncio.get_running_loop().call_later(
            min(1.0, max(0.005, 4 * self._rtt())), self._check_peer
        )
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self._cancel_timers()
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
        self.server.closed(self)

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
        err, exchange.expects_continue = head_error(
            exchange.http_version, exchange.headers, parser.should_upgrade()
        )
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
            self.write(CONTINUE)

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
            error_headers(err, exchange.request_id),
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
                    self.write(CONTINUE)  # its turn has come: now it may send its body
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


class _Refused(Exception):
    """Raised from a parser callback once the server has answered; stops the parser."""
