"""Relaying one response to the client: a stream event by event, or a body whole.

``Relay`` is the relaying layer of ``ProxyCall`` (call.py): one object per request, its jobs in
layers (``Record``: what observers read; ``Relay``: this; ``Continuing``: going on on another
member; ``ProxyCall``: the request's life), so that the relay loop reads and writes its fields
directly, with no second object per request and no indirection per chunk.

Invariants:
- a stream's response starts only when the backend's first complete event is in hand (a first-token
  timeout before it is still a 504), and is never changed once started: a failure after it is a
  final error event (call.py writes it) with no end marker;
- only whole SSE events reach the client, byte for byte (one partial event at most is held, capped
  at ``MAX_EVENT_BYTES``); the events before a failing one in the same read still reach it;
- the relay writes without awaiting; it awaits ``drain()`` only while the client is behind, and
  that wait is the client's (the server's send timeout bounds it), not the backend's idle time;
- a buffered body is counted in the process's buffer budget as it is read (``_charge``); the call
  gives the count back in its cleanup;
- the relay opens nothing it does not hand to the call: ``self.upstream`` is the response the call
  closes at its end;
- every answer it starts carries ``X-Gateway-Overhead-Ms``, the gateway's own time (``overhead``):
  the call's part before the upstream send, plus, for a body, the relay's from the body in hand to
  the response handed to the connection (a stream's head goes out before its relay has run).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from vllm_gateway import errors
from vllm_gateway.backends.base import UpstreamResponse
from vllm_gateway.errors import (
    BackendRejected,
    BackendUnavailable,
    BadBackendResponse,
    FirstTokenTimeout,
    GatewayError,
    RequestTimeout,
    StreamIdleTimeout,
)
from vllm_gateway.proxy.failover import AnyResumable
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.idle import IdleTimeout
from vllm_gateway.proxy.protocols import DONE, ERROR, OK
from vllm_gateway.proxy.record import Record
from vllm_gateway.proxy.responder import Responder
from vllm_gateway.proxy.routes import Route
from vllm_gateway.proxy.sse import EventScanner, FramingError, split_events
from vllm_gateway.proxy.usage import UsageTaker

__all__ = ["MAX_EVENT_BYTES", "OVERHEAD_HEADER", "SSE_HEADERS", "Relay", "overhead_header"]

log = logging.getLogger("vllm_gateway.proxy.call")

# Content types a non-JSON answer (an audio transcript as text, srt or vtt) may carry.
_TEXT_ANSWERS = ("text/plain", "text/vtt", "application/x-subrip", "text/srt")

# Cap on one SSE event: bounds what a broken backend can make a stream hold.
MAX_EVENT_BYTES = 1 << 20
# How long to wait for a backend's end of body after [DONE], to keep the connection pooled.
_EOF_GRACE = 0.5

OVERHEAD_HEADER = b"x-gateway-overhead-ms"


def overhead_header(seconds: float) -> tuple[bytes, bytes]:
    """``X-Gateway-Overhead-Ms``: the gateway's own time for the request, in milliseconds."""
    return (OVERHEAD_HEADER, b"%.3f" % (seconds * 1000.0))


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def json_object(body: bytes) -> dict[str, Any] | None:
    """The body's JSON object, or None. A 200 is relayed only if it is whole: a truncated or
    garbled body must not look complete."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) else None


class Relay(Record):
    """The response's side of a call: what it relays, and how far it got."""

    __slots__ = (
        "_charged",
        "_ex",
        "_gw",
        "_not_resumable",
        "_protocol",
        "_resumable",
        "_route",
        "_taker",
        "_task",
        "events",
        "response_started",
        "upstream",
        "upstream_id",
    )

    def __init__(
        self,
        gw: Gateway,
        exchange: Responder,
        route: Route,
        upstream_id: str,
        started_at: float,
    ) -> None:
        Record.__init__(self, exchange.request_id, route.name, started_at)
        self.upstream_id = upstream_id  # the id the backend knows the request by
        self._gw = gw
        self._ex = exchange
        self._route = route
        self._protocol = route.protocol
        self._task: asyncio.Task[Any] | None = None  # the call's task (its timers cancel it)
        self._charged = 0  # bytes of a buffered backend body counted in the buffer budget
        self._resumable: AnyResumable | None = None  # a stream that may go on on another member
        self._not_resumable: str | None = None  # why it may not, when failover applies
        self._taker: UsageTaker | None = None  # takes out a usage chunk the client did not ask for
        self.upstream: UpstreamResponse | None = None  # the response the call closes at its end
        self.response_started = False
        self.events = 0  # every event relayed (a Responses error event numbers itself after)

    @property
    def served_by(self) -> str | None:
        upstream = self.upstream
        return upstream.served_by if upstream is not None else None

    # --- what continuation.py adds: going on on another member -------------------------------

    def _follow(self, resumable: AnyResumable, events: list[bytes], first: bool) -> list[bytes]:
        """The events as the client sees them, for a stream that may go on elsewhere."""
        return events

    async def _go_on(self, exc: GatewayError, deadline: float) -> UpstreamResponse | None:
        """After a part of a started stream failed with ``exc``: the next part's response, None
        when the stream was ended here; here, with nowhere to go on, ``exc`` itself."""
        raise exc

    # --- a body read whole -----------------------------------------------------------------

    def _charge(self, n: int) -> None:
        """Count ``n`` more bytes of a buffered backend body in the process's buffer budget, or
        refuse (503) when the budget cannot take them."""
        if not self._ex.budget.take(n):
            raise errors.Overloaded(
                "The gateway holds as many buffered answers as its memory budget allows; "
                "retry later.",
                retry_after=1.0,
            )
        self._charged += n

    def _relay_error_status(self, upstream: UpstreamResponse, body: bytes, read_at: float) -> None:
        if 400 <= upstream.status < 500:
            if json_object(body) is None:
                log.warning(
                    "request %s: backend answered %d without a JSON body: %.300r",
                    self.request_id,
                    upstream.status,
                    body,
                )
                raise BackendRejected(upstream.status)
            # The backend judged the request: its status and body are the client's answer.
            self.outcome = "client_error"
            self._respond(upstream.status, body, "application/json", read_at)
            return
        log.warning(
            "request %s: backend answered %d: %.300r", self.request_id, upstream.status, body
        )
        raise BadBackendResponse(f"The backend failed with status {upstream.status}.")

    def _relay_body(self, upstream: UpstreamResponse, body: bytes, read_at: float) -> None:
        content_type = "application/json"
        if not self._route.json_answer and upstream.content_type.startswith(_TEXT_ANSWERS):
            content_type = upstream.content_type  # a transcript as text, srt or vtt
            self.usage = body
        else:
            answer = json_object(body) if "json" in upstream.content_type else None
            if answer is None:
                raise BadBackendResponse("The backend's answer is not JSON.")
            usage = answer.get("usage")
            self.usage = usage if isinstance(usage, dict) else None
        self.outcome = "completed"
        self._respond(200, body, content_type, read_at)

    def _respond(self, status: int, body: bytes, content_type: str, read_at: float) -> None:
        """Answer with the backend's body, read whole at ``read_at``: the relay's share of the
        gateway's time runs from there to here."""
        self.status = status
        self.response_started = True
        overhead = self.overhead = (self.overhead or 0.0) + time.perf_counter() - read_at
        self._ex.respond(
            status,
            [
                (b"content-type", content_type.encode("latin-1")),
                (b"x-request-id", self.request_id.encode()),
                overhead_header(overhead),
            ],
            body,
        )
        self.ended_at = time.perf_counter()

    # --- a stream --------------------------------------------------------------------------

    async def _relay_stream(
        self, upstream: UpstreamResponse, first_deadline: float, deadline: float
    ) -> None:
        if not upstream.content_type.startswith("text/event-stream"):
            raise BadBackendResponse(
                "The backend answered a stream request without an event stream."
            )
        first = True
        chunks: Any = None
        while True:
            try:
                chunks = await self._relay_part(upstream, first_deadline, deadline, first)
                break
            except (BackendUnavailable, BadBackendResponse, StreamIdleTimeout) as exc:
                if not self.response_started:
                    raise
                following = await self._go_on(exc, deadline)
                if following is None:
                    break  # the generation had ended; its stream was ended here
                upstream = following
                first = False
        self.ended_at = time.perf_counter()
        self.outcome = "completed"
        if chunks is not None:
            await self._finish_upstream(chunks)

    async def _relay_part(
        self, upstream: UpstreamResponse, first_deadline: float, deadline: float, first: bool
    ) -> Any:
        """Relay one part of a stream (the first, or a continuation) to its end marker; the
        part's remaining chunks (to read its end of body). Raises on a failure of the part."""
        loop = asyncio.get_running_loop()
        idle = self._gw.settings.stream_idle_timeout
        ex = self._ex
        classify = self._protocol.classify
        resumable = self._resumable
        # The usage chunk the gateway asked for, to take out again (None: nothing to take).
        taker = self._taker
        shaped = resumable is not None or taker is not None  # blocks are rebuilt from events
        scanner = EventScanner(MAX_EVENT_BYTES)
        chunks = upstream.chunks()
        done = False
        previous = b""
        start = first_deadline if first else min(deadline, loop.time() + idle)
        try:
            async with IdleTimeout(start, self._task) as timer:
                while not done:
                    try:
                        data = await anext(chunks)
                    except StopAsyncIteration:
                        break
                    try:
                        block = scanner.feed(data)
                    except FramingError as exc:
                        raise BadBackendResponse("The backend sent an oversized event.") from exc
                    if not block:
                        continue
                    events = split_events(block)
                    if resumable is not None:
                        # Note what the stream produced; a continuation's events become the
                        # original stream's.
                        events = self._follow(resumable, events, first)
                    for i, event in enumerate(events):
                        kind = classify(event)
                        if kind == OK:
                            self.chunks += 1
                            continue
                        if kind == DONE:
                            done = True
                            del events[i + 1 :]  # nothing of a stream follows its end
                            break
                        if kind == ERROR:
                            log.warning(
                                "request %s: bad backend event: %.300r", self.request_id, event
                            )
                            if i:  # the whole events before it still reach the client
                                self._send_part(events[:i], taker)
                            raise BadBackendResponse("The backend reported an error mid-stream.")
                    if shaped or done:
                        if taker is not None and taker.concerns(block, events, done):
                            events = self._take_usage(taker, events, done)
                            block = b"".join(e + b"\n\n" for e in events)
                        elif resumable is not None or done:
                            block = b"".join(e + b"\n\n" for e in events)
                    if not block:
                        timer.push(min(deadline, loop.time() + idle))
                        continue
                    self.events += len(events)
                    if not self.response_started:
                        self._start_stream()
                    if done:
                        ex.end(block)
                        if taker is None:
                            # The usage chunk, when asked for, is the last event before [DONE].
                            self.usage = previous + block
                    else:
                        ex.write(block)
                        if ex.paused:
                            # The client is behind: wait for it (bounded by the server's send
                            # timeout) rather than read more from the backend. That wait is
                            # the client's, not the backend's idle time.
                            timer.reschedule(deadline)
                            await ex.drain()
                    previous = block
                    timer.push(min(deadline, loop.time() + idle))
        except TimeoutError:
            if taker is not None:
                self._send_part([], taker)
            if loop.time() >= deadline:
                raise RequestTimeout() from None
            raise (StreamIdleTimeout() if self.response_started else FirstTokenTimeout()) from None
        except BaseException:
            if taker is not None:
                self._send_part([], taker)  # what it held reaches the client before the error
            raise
        if not done:
            if taker is not None:
                self._send_part([], taker)
            raise BadBackendResponse(
                f"The backend ended the stream without {self._protocol.end_marker}."
            )
        return chunks

    def _take_usage(self, taker: UsageTaker, events: list[bytes], done: bool) -> list[bytes]:
        """The events the client gets of those read, the usage chunk taken out (``usage.py``)."""
        had = taker.usage
        events = taker.take(events, done)
        if had is None and taker.usage is not None:
            self.usage = taker.usage
            self.chunks -= 1  # counted as a content event, never relayed
        return events

    def _send_part(self, events: list[bytes], taker: UsageTaker | None) -> None:
        """Whole events, before a failure: the client gets every one (and, taking a usage chunk
        out, every event held until it came)."""
        if taker is not None:
            events = self._take_usage(taker, events, False) + taker.release()
        if events and not self._ex.gone:
            self._send_events(b"".join(e + b"\n\n" for e in events))
            self.events += len(events)

    def _start_stream(self) -> None:
        self.first_byte_at = time.perf_counter()
        self.response_started = True
        self.status = 200
        self._ex.start(
            200,
            [
                *SSE_HEADERS,
                (b"x-request-id", self.request_id.encode()),
                # Sent with the head: the part before the upstream send only.
                overhead_header(self.overhead or 0.0),
            ],
        )

    def _send_events(self, data: bytes) -> None:
        """Whole events, before a failure in the same read: the client gets every one."""
        if not self.response_started:
            self._start_stream()
        self._ex.write(data)

    async def _finish_upstream(self, chunks: Any) -> None:
        """After [DONE], read the backend's end of body so its connection can be reused."""
        try:
            async with asyncio.timeout(_EOF_GRACE):
                async for _ in chunks:
                    pass
        except (TimeoutError, GatewayError):
            pass  # aclose() drops the connection instead
