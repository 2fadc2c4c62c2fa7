"""The load generator's HTTP client: lean enough that the gateway, not the client, is measured.

One ``Connection`` is one keep-alive HTTP/1.1 connection owned by one simulated user; it carries
one request at a time. Bytes are parsed by ``httptools`` (llhttp, in C) and every
``data_received`` call is stamped once with ``time.perf_counter()``: every event in that read
shares the stamp, as it would for any client reading the socket.

Invariants that keep the per-chunk cost low:
- SSE events are split on the blank line (``\\n\\n``, or ``\\r\\n\\r\\n`` if the server uses it)
  and classified by byte search; no chunk is JSON-parsed except a ``usage`` chunk (for the
  output-token count) and a non-streamed body.
- Fidelity costs one ``bytearray.extend`` per read; the body is hashed once, at the end.
- A request's outcome is a ``RequestResult`` of plain numbers, so results pickle cheaply between
  client processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from time import perf_counter
from urllib.parse import urlsplit

import httptools
import orjson

from vllm_gateway.proxy.sse import EventScanner, split_events

__all__ = ["Connection", "RequestResult", "SSEScanner", "Target", "build_request"]


@dataclass(frozen=True, slots=True)
class Target:
    """Where one side of the comparison sends its requests."""

    name: str
    url: str
    api_key: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def base_path(self) -> str:
        path = urlsplit(self.url).path.rstrip("/")
        # "http://host:8000/v1" and "http://host:8000" mean the same server.
        return path[: -len("/v1")] if path.endswith("/v1") else path


@dataclass(slots=True)
class RequestResult:
    """One request's outcome; times are seconds, relative to the phase start where absolute."""

    idx: int
    ok: bool = False
    error: str | None = None
    status: int = 0
    start: float = 0.0
    ttft: float = 0.0
    # Send to the response's status and headers (a server that answers headers before the first
    # token shows its own preprocessing here; the gateway sends its headers with the first event).
    headers: float = 0.0
    e2el: float = 0.0
    chunks: int = 0
    tokens: int = 0
    # Gaps between consecutive content chunks (ITL), in seconds.
    itl: list[float] = field(default_factory=list)
    digest: str | None = None


def build_request(target: Target, path: str, body: bytes) -> bytes:
    """The full request bytes, built once per (target, request) before the clock starts."""
    auth = f"Authorization: Bearer {target.api_key}\r\n" if target.api_key else ""
    head = (
        f"POST {target.base_path}{path} HTTP/1.1\r\n"
        f"Host: {target.host}:{target.port}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream, application/json\r\n"
        f"{auth}"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


_ID_RE = re.compile(rb'"(id|created|system_fingerprint)": ?("[^"]*"|\d+|null)')


def normalise_events(body: bytes) -> bytes:
    """The body with per-response identifiers masked, so that two servers' streams compare.

    A gateway that relays faithfully still cannot make a simulator's request ids or creation
    times repeat; everything else (content, order, framing, the other fields) must be identical.
    """
    return _ID_RE.sub(rb'"\1":_', body)


def _nonempty(event: bytes, key: bytes) -> bool | None:
    """Whether ``key`` (e.g. ``b'"content":'``) holds a non-empty string; None if absent."""
    i = event.find(key)
    if i < 0:
        return None
    j = i + len(key)
    if event[j : j + 1] == b" ":
        j += 1
    return event[j : j + 1] == b'"' and event[j + 1 : j + 2] != b'"'


class SSEScanner:
    """Splits a byte stream into SSE events (the gateway's own ``EventScanner``) and classifies
    each without parsing JSON.

    ``feed(data, now)`` returns nothing; afterwards ``times`` holds one stamp per content chunk,
    ``done`` says whether ``data: [DONE]`` arrived, ``usage_tokens`` the last usage chunk's
    ``completion_tokens`` and ``error`` the first in-stream error event, if any.
    """

    __slots__ = ("_scanner", "done", "error", "events", "times", "usage_tokens")

    def __init__(self) -> None:
        self._scanner = EventScanner(max_event_bytes=64 << 20)
        self.times: list[float] = []
        self.events = 0
        self.done = False
        self.usage_tokens: int | None = None
        self.error: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        block = self._scanner.feed(data)
        if block:
            for event in split_events(block):
                self._event(event, now)

    def flush(self, now: float) -> None:
        """Classify a last event that arrived without its blank line."""
        pending = self._scanner.pending
        if pending.strip():
            self._event(pending, now)
        self._scanner = EventScanner(max_event_bytes=64 << 20)

    def _event(self, event: bytes, now: float) -> None:
        self.events += 1
        if event.startswith(b"data: [DONE]") or event.startswith(b"data:[DONE]"):
            self.done = True
            return
        has = _nonempty(event, b'"content":')
        if has is None:
            has = _nonempty(event, b'"text":')
        if has:
            self.times.append(now)
            return
        if event.startswith(b"event: error") or b'{"error"' in event[:16]:
            if self.error is None:
                self.error = "sse_error"
            return
        if b'"usage":{' in event or b'"usage": {' in event:
            self._usage(event)

    def _usage(self, event: bytes) -> None:
        payload = event.split(b"data:", 1)[-1].strip()
        try:
            usage = orjson.loads(payload).get("usage") or {}
            self.usage_tokens = int(usage["completion_tokens"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            pass


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time.

    ``request`` returns a ``RequestResult`` and never raises for server or network trouble: those
    become ``error`` kinds (``connect``, ``http_<status>``, ``disconnected``, ``incomplete``,
    ``sse_error``, ``timeout``, ``parse``).
    """

    def __init__(self, stream: bool, fidelity: bool) -> None:
        self._stream = stream
        self._fidelity = fidelity
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._now = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._status = 0
        self._keep_alive = True
        self._scanner: SSEScanner | None = None
        self._body = bytearray()
        self._headers_at = 0.0
        self._lost: str | None = None
        self.closed = True

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    async def open(cls, target: Target, stream: bool, fidelity: bool, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: cls(stream, fidelity), target.host, target.port),
            timeout,
        )
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.closed = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._lost = "disconnected"
            self._waiter.set_result(None)

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True

    @property
    def body(self) -> bytes:
        """The last response's body as received; a stream's is kept only with ``fidelity`` on
        (a multi-turn client reads the answer from it)."""
        return bytes(self._body)

    # --- httptools callbacks (the hot path) ---------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._now = perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._lost = "parse"
            self.close()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()
        self._headers_at = self._now

    def on_body(self, body: bytes) -> None:
        if self._fidelity or not self._stream or self._status != 200:
            self._body += body
        if self._scanner is not None and self._status == 200:
            self._scanner.feed(body, self._now)

    def on_message_complete(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- one request ----------------------------------------------------------------------

    async def request(self, idx: int, payload: bytes, timeout: float, t0: float) -> RequestResult:
        """Send ``payload`` and wait for the whole response; ``t0`` is the phase's clock zero."""
        res = RequestResult(idx=idx)
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._status = 0
        self._headers_at = 0.0
        self._lost = None
        self._body = bytearray()
        scanner = self._scanner = SSEScanner() if self._stream else None
        sent = perf_counter()
        res.start = sent - t0
        assert self._transport is not None
        self._transport.write(payload)
        try:
            await asyncio.wait_for(self._waiter, timeout)
        except TimeoutError:
            self._lost = "timeout"
            self.close()
        end = perf_counter() if self._lost else self._now
        self._waiter = None
        res.status = self._status
        res.e2el = end - sent
        if self._headers_at:
            res.headers = self._headers_at - sent
        if not self._keep_alive:
            self.close()
        if scanner is not None:
            scanner.flush(end)
        self._finish(res, scanner, sent)
        return res

    def _finish(self, res: RequestResult, scanner: SSEScanner | None, sent: float) -> None:
        if self._status and self._status != 200:
            res.error = f"http_{self._status}"
            return
        if self._lost and (scanner is None or not scanner.done):
            res.error = self._lost
            if scanner is not None:
                res.chunks = len(scanner.times)
            return
        if scanner is None:
            self._finish_plain(res)
            return
        times = scanner.times
        res.chunks = len(times)
        if scanner.error:
            res.error = scanner.error
        elif not scanner.done:
            res.error = "incomplete"
        elif not times:
            res.error = "empty"
        if times:
            res.ttft = times[0] - sent
            res.itl = [b - a for a, b in itertools.pairwise(times)]
        res.tokens = scanner.usage_tokens if scanner.usage_tokens is not None else len(times)
        if self._fidelity:
            res.digest = hashlib.blake2b(
                normalise_events(bytes(self._body)), digest_size=16
            ).hexdigest()
        res.ok = res.error is None

    def _finish_plain(self, res: RequestResult) -> None:
        body = bytes(self._body)
        # Without streaming the first token arrives with the whole body, as vLLM's bench counts it.
        res.ttft = res.e2el
        try:
            doc = orjson.loads(body)
            usage = doc.get("usage") or {}
            res.tokens = int(usage.get("completion_tokens") or 0)
            choices = doc.get("choices") or []
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            res.error = "parse"
            return
        if not choices:
            res.error = "empty"
            return
        res.chunks = 1
        if self._fidelity:
            res.digest = hashlib.blake2b(normalise_events(body), digest_size=16).hexdigest()
        res.ok = True
