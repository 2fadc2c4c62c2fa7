"""The edge's specification: RFC 9112/9110 cases, each with the answer the server must give.

Each row is sent as raw bytes over a real socket to the gateway's HTTP server (``edge/http/``)
on loopback, whose handler answers every request it is handed with 200 and records it. A row
says which answers come back, in order, which requests the handler ran, and whether the server
closes the connection. After every row the server holds nothing: no connection, and not one byte
of the buffer budget (``BufferBudget.used == 0``).

A row that keeps the connection open ends with one more request carrying ``Connection: close``,
so that every row ends with the server's close and nothing waits on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from vllm_gateway import errors
from vllm_gateway.edge.http import Exchange, HttpServer, Limits
from vllm_gateway.errors import GatewayError
from vllm_gateway.ids import new_request_id
from vllm_gateway.proxy.budget import BufferBudget

LIMITS = Limits(
    header_timeout=2.0,
    body_timeout=2.0,
    idle_timeout=2.0,
    send_timeout=2.0,
    max_header_bytes=32 * 1024,
    max_header_count=100,
    max_pipelined=16,
    linger=0.5,
)
BODY_LIMIT = 1 << 20


class Recorder:
    """A handler that runs every request it is handed: records it, answers 200."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, bytes, bytes, list[bytes]]] = []

    def new_request_id(self, headers: list[tuple[bytes, bytes]]) -> str:
        return new_request_id(headers)

    def admit(self, ex: Exchange) -> GatewayError | None:
        if ex.path == "/refused":
            return errors.Forbidden()
        ex.body_limit = BODY_LIMIT
        return None

    def ready(self, ex: Exchange) -> GatewayError | None:
        return None

    async def handle(self, ex: Exchange) -> None:
        self.handled.append((ex.method, ex.raw_path, ex.body, [n for n, _ in ex.headers]))
        if ex.path == "/slow":
            await asyncio.sleep(0.2)
        body = b"%s %s %d" % (ex.method.encode(), ex.raw_path, len(ex.body))
        ex.respond(200, [(b"content-type", b"text/plain")], body)


@dataclass
class Served:
    server: HttpServer
    handler: Recorder
    port: int


@contextlib.asynccontextmanager
async def serve(limits: Limits = LIMITS, budget: int = 64 << 20) -> AsyncIterator[Served]:
    handler = Recorder()
    server = HttpServer(handler, limits, BufferBudget(budget))
    await server.listen("127.0.0.1", 0)
    try:
        yield Served(server, handler, server.sockets[0].getsockname()[1])
    finally:
        await server.shutdown(1.0)


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def parse_answers(data: bytes) -> list[Answer]:
    """The responses in ``data``, interim ones included (each framed by its length or chunks)."""
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"an unfinished response head: {data[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if status < 200:
            answers.append(Answer(status, headers, b""))
            data = rest
            continue
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, data = rest[:n], rest[n:]
        else:
            assert headers.get(b"transfer-encoding") == b"chunked"
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2 :]
                if size == 0:
                    break
            data = rest
        answers.append(Answer(status, headers, body))
    return answers


async def exchange_bytes(port: int, parts: list[bytes], timeout: float = 5.0) -> bytes:
    """Send ``parts`` (a short pause between them) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.05)
            writer.write(part)
            await writer.drain()
        data = bytearray()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    piece = await reader.read(65536)
                except ConnectionError:
                    break
                if not piece:
                    break
                data += piece
        return bytes(data)
    finally:
        writer.close()


async def settled(server: HttpServer) -> None:
    """The server holds nothing: no connection, no buffered byte."""
    async with asyncio.timeout(5):
        while server.connections or server.budget.used:  # noqa: ASYNC110 - the server's state
            await asyncio.sleep(0.01)
    assert server.budget.used == 0


def get(path: str = "/a", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    host = b"Host: t\r\n" if version == b"1.1" else b""
    return b"GET %s HTTP/%s\r\n%s%s\r\n" % (path.encode(), version, host, extra)


def post(path: str = "/p", body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


def chunked(path: str, pieces: list[bytes], trailers: bytes = b"", head: bytes = b"") -> bytes:
    out = b"POST %s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n%s\r\n" % (
        path.encode(),
        head,
    )
    for piece in pieces:
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n" + trailers + b"\r\n"


CLOSE = get("/last", b"Connection: close\r\n")


@dataclass
class Row:
    """One case: bytes sent (parts written apart), the answers' statuses in order, the paths the
    handler ran in order, and the RFC rule it states."""

    name: str
    parts: list[bytes]
    statuses: list[int]
    ran: list[bytes]
    rule: str = ""
    trailers_seen: list[bytes] = field(default_factory=list)


BIG = b"x" * (40 * 1024)

ROWS = [
    Row("one request", [get() + CLOSE], [200, 200], [b"/a", b"/last"]),
    Row(
        "pipelined requests are answered in order",
        [get("/1") + post("/2") + get("/3") + CLOSE],
        [200, 200, 200, 200],
        [b"/1", b"/2", b"/3", b"/last"],
        "RFC 9112 9.3.2: responses in the order of the requests",
    ),
    Row(
        "a slow first request keeps its place ahead of the pipelined ones",
        [post("/slow") + get("/2") + CLOSE],
        [200, 200, 200],
        [b"/slow", b"/2", b"/last"],
    ),
    Row(
        "junk after a valid request: the request gets its own answer, the junk a 400",
        [post("/ok") + b"JUNK\r\n\r\n"],
        [200, 400],
        [b"/ok"],
    ),
    Row(
        "junk after a slow valid request",
        [post("/slow") + b"\x00\x01garbage\r\n\r\n"],
        [200, 400],
        [b"/slow"],
    ),
    Row(
        "bytes after Connection: close are ignored",
        [get("/a", b"Connection: close\r\n") + get("/never")],
        [200],
        [b"/a"],
        "RFC 9112 9.6: a server closes after a request with close",
    ),
    Row(
        "bytes after an HTTP/1.0 request are ignored",
        [get("/a", version=b"1.0") + get("/never")],
        [200],
        [b"/a"],
    ),
    Row(
        "pipelined requests past the limit: the first 17 answered, the 18th refused",
        [b"".join(get(f"/{i}") for i in range(18)) + CLOSE],
        [200] * 17 + [400],
        [f"/{i}".encode() for i in range(17)],
    ),
    Row(
        "a pipelined request refused from its head, behind a slow one",
        [post("/slow") + post("/refused", b"z" * 1000) + get("/never")],
        [200, 403],
        [b"/slow"],
    ),
    Row(
        "a 40 KiB body and the start of the next head in one read: no false 431",
        [post("/big", BIG) + get("/next")[:12], get("/next")[12:] + CLOSE],
        [200, 200, 200],
        [b"/big", b"/next", b"/last"],
        "headers are counted per request, not per read",
    ),
    Row(
        "a 40 KiB chunked body and the start of the next head in one read",
        [
            chunked("/big", [BIG[:20000], BIG[20000:]]) + get("/next")[:25],
            get("/next")[25:] + CLOSE,
        ],
        [200, 200, 200],
        [b"/big", b"/next", b"/last"],
    ),
    Row(
        "an upgrade is refused before the request runs",
        [get("/v1/responses/x", b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n")],
        [400],
        [],
        "RFC 9110 7.8: a server may refuse to upgrade",
    ),
    Row(
        "an upgrade behind a valid request: the first answered, the upgrade refused",
        [get("/a") + get("/b", b"Upgrade: websocket\r\nConnection: Upgrade\r\n")],
        [200, 400],
        [b"/a"],
    ),
    Row("CONNECT is refused", [b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n"], [400], []),
    Row(
        "HTTP/1.1 without Host",
        [b"GET /a HTTP/1.1\r\n\r\n"],
        [400],
        [],
        "RFC 9112 3.2: 400 to an HTTP/1.1 request without exactly one Host",
    ),
    Row(
        "HTTP/1.1 with two Host headers",
        [b"GET /a HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n"],
        [400],
        [],
    ),
    Row("HTTP/1.0 without Host is fine", [get("/a", version=b"1.0")], [200], [b"/a"]),
    Row(
        "HTTP/1.0 with Transfer-Encoding",
        [b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
        [400],
        [],
        "RFC 9112 6.1: faulty framing; close after",
    ),
    Row(
        "a transfer coding besides chunked",
        [chunked("/a", [b"abc"], head=b"").replace(b"chunked", b"gzip, chunked")],
        [501],
        [],
        "RFC 9112 6.1: 501 for a transfer coding not understood",
    ),
    Row(
        "Transfer-Encoding whose last coding is not chunked",
        [b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc"],
        [400],
        [],
        "RFC 9112 6.3: 400 and close",
    ),
    Row(
        "Content-Length with Transfer-Encoding",
        [
            b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ],
        [400],
        [],
        "RFC 9112 6.3: may be rejected; the connection closes either way",
    ),
    Row(
        "two different Content-Lengths",
        [b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"],
        [400],
        [],
    ),
    Row("a bare LF line end", [b"GET /a HTTP/1.1\nHost: t\n\n"], [400], []),
    Row(
        "an obsolete folded header line",
        [b"GET /a HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n"],
        [400],
        [],
        "RFC 9112 5.2: reject with 400 (or unfold)",
    ),
    Row(
        "whitespace before a header's colon",
        [b"GET /a HTTP/1.1\r\nHost: t\r\nX : y\r\n\r\n"],
        [400],
        [],
        "RFC 9112 5.1: MUST reject with 400",
    ),
    Row("HTTP/1.2", [b"GET /a HTTP/1.2\r\nHost: t\r\n\r\n"], [400], []),
    Row("HTTP/2.0 in an HTTP/1 frame", [b"GET /a HTTP/2.0\r\nHost: t\r\n\r\n"], [505], []),
    Row(
        "a request target past the head limit",
        [b"GET /" + b"a" * (33 * 1024) + b" HTTP/1.1\r\nHost: t\r\n\r\n"],
        [414],
        [],
    ),
    Row(
        "more header fields than the limit",
        [get("/a", b"".join(b"X-%d: 1\r\n" % i for i in range(101)))],
        [431],
        [],
    ),
    Row(
        "headers past the byte limit",
        [get("/a", b"X: " + b"v" * (33 * 1024) + b"\r\n")],
        [431],
        [],
    ),
    Row(
        "trailers are dropped, never merged into the headers",
        [chunked("/t", [b"abc"], trailers=b"X-Trailer: 1\r\n") + CLOSE],
        [200, 200],
        [b"/t", b"/last"],
        "RFC 9110 6.5.1: trailers are not merged into the header section",
    ),
    Row(
        "trailers past the byte limit",
        [chunked("/t", [b"abc"], trailers=b"X: " + b"v" * (33 * 1024) + b"\r\n")],
        [431],
        [],
    ),
    Row(
        "more trailer fields than the limit",
        [chunked("/t", [b"abc"], trailers=b"".join(b"T%d: 1\r\n" % i for i in range(101)))],
        [431],
        [],
    ),
    Row(
        "an expectation besides 100-continue",
        [get("/a", b"Expect: the-moon\r\n")],
        [417],
        [],
        "RFC 9110 10.1.1",
    ),
    Row(
        "an HTTP/1.0 client gets no 100 Continue",
        [b"POST /a HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", b"hi"],
        [200],
        [b"/a"],
        "RFC 9110 15.2: no 1xx to an HTTP/1.0 client; its expectation is ignored",
    ),
    Row(
        "Expect: 100-continue gets the interim answer before the body is sent",
        [post("/e", b"", b"Expect: 100-continue\r\n").replace(b"Length: 0", b"Length: 2"), b"hi"],
        [100, 200],
        [b"/e"],
    ),
    Row(
        "a pipelined Expect: 100-continue gets its 100 when its turn comes",
        [
            post("/slow")
            + post("/e", b"", b"Expect: 100-continue\r\n").replace(b"Length: 0", b"Length: 2"),
            b"hi" + CLOSE,
        ],
        [200, 100, 200, 200],
        [b"/slow", b"/e", b"/last"],
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_the_server_answers_each_rfc_case_as_its_row_says(row: Row) -> None:
    async with serve() as served:
        data = await exchange_bytes(served.port, row.parts)
        answers = parse_answers(data)
        assert [a.status for a in answers] == row.statuses, data[-600:]
        assert [h[1] for h in served.handler.handled] == row.ran
        for answer in answers:
            if answer.status >= 400:
                # Every refusal has the project's error shape and closes the connection.
                assert answer.headers[b"connection"] == b"close"
                assert b'"error"' in answer.body
        for _, _, _, names in served.handler.handled:
            assert not any(n.startswith((b"x-trailer", b"t0")) for n in names)
        await settled(served.server)


async def test_the_budget_returns_to_zero_after_refused_pipelines() -> None:
    """The lasting denial of service: bodies read ahead behind a refused request were never given
    back. With a budget of 1 MiB, ten connections carrying 100 KB bodies behind junk must leave it
    whole, and a later request with a body must be served."""
    body = b"b" * 100_000
    async with serve(budget=1 << 20) as served:
        for _ in range(10):
            data = await exchange_bytes(
                served.port, [post("/slow", body) + post("/2", body) + b"JUNK\r\n\r\n"]
            )
            assert [a.status for a in parse_answers(data)] == [200, 200, 400]
            await settled(served.server)
        data = await exchange_bytes(served.port, [post("/after", body, b"Connection: close\r\n")])
        assert [a.status for a in parse_answers(data)] == [200]
        await settled(served.server)


async def test_a_header_trickled_across_reads_is_counted_whole() -> None:
    """One header value sent in many small writes, past the limit: 431, not held unbounded."""
    async with serve() as served:
        parts = [b"GET /a HTTP/1.1\r\nHost: t\r\nX-Big: "] + [b"v" * 4096] * 10
        data = await exchange_bytes(served.port, parts)
        assert [a.status for a in parse_answers(data)] == [431]
        assert served.handler.handled == []
        await settled(served.server)


async def test_a_trailer_trickled_across_reads_is_counted_whole() -> None:
    async with serve() as served:
        head = chunked("/t", [b"abc"])[: -len(b"0\r\n\r\n")]
        parts = [head + b"0\r\nX-Big: "] + [b"v" * 4096] * 10
        data = await exchange_bytes(served.port, parts)
        assert [a.status for a in parse_answers(data)] == [431]
        assert served.handler.handled == []
        await settled(served.server)
