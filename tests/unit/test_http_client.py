"""The backend HTTP client's matrix: framings, pooling, resends, limits, TLS and IPv6, against
scripted HTTP(S) servers on loopback.

Each server is a real asyncio server that reads one request head and answers with exact bytes, so
the framings vLLM never sends (EOF-delimited bodies, 1xx, Connection: close, garbage after the
message, a malformed head) are covered without mocking the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.backends.http.client import ConnectionPool, TLSOptions
from vllm_gateway.backends.http.connection import MAX_HEAD_BYTES, MAX_HEADER_COUNT
from vllm_gateway.errors import BackendUnavailable, BadBackendResponse

pytestmark = pytest.mark.timeout(20)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server on 127.0.0.1:0 running ``handler`` per connection; yields its URL and the heads."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def read_head() -> bytes:
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
            return head

        reader.read_head = read_head  # type: ignore[attr-defined]
        await serve(reader, writer)

    server = await asyncio.start_server(recording, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", heads
    finally:
        server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await server.wait_closed()


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (len(body), extra, body)
    )


async def body_of(resp: object) -> bytes:
    return b"".join([piece async for piece in resp])  # type: ignore[attr-defined]


async def test_request_head_is_one_write_with_host_length_and_lines() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.read_head()  # type: ignore[attr-defined]
            writer.write(answer(b"{}"))

    async with scripted(handler) as (url, heads):
        pool = ConnectionPool(url)
        resp = await pool.request("POST", "/v1/x", b"X-A: b\r\n", b'{"a":1}')
        assert (resp.status, resp.content_type) == (200, "application/json")
        assert await resp.read(100) == b"{}"
        port = url.rsplit(":", 1)[1]
        assert heads[0] == (
            b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nX-A: b\r\n"
            b"Content-Length: 7\r\n\r\n" % port.encode()
        )
        await pool.aclose()


async def test_keep_alive_reuses_one_connection_lifo() -> None:
    conns = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        while True:
            await reader.read_head()  # type: ignore[attr-defined]
            writer.write(answer(b'{"ok":1}'))

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        for _ in range(5):
            resp = await pool.request("GET", "/")
            assert await resp.read(100) == b'{"ok":1}'
            await resp.aclose()
        assert conns == 1
        assert (pool.open_connections(), pool.idle_connections()) == (1, 1)
        # Two at once need two connections; afterwards both are idle, the pool keeps them.
        a, b = await asyncio.gather(pool.request("GET", "/"), pool.request("GET", "/"))
        await asyncio.gather(a.read(100), b.read(100))
        assert conns == 2 and pool.idle_connections() == 2
        await pool.aclose()
        assert pool.open_connections() == 0


async def test_connection_close_and_eof_delimited_bodies_are_not_pooled() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.read_head()  # type: ignore[attr-defined]
        if b"/close" in head:
            writer.write(answer(b"abc", b"Connection: close\r\n"))
        else:  # no length, no chunking: the body is everything until the server closes
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil eof")
            await writer.drain()
        writer.close()

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/close")
        assert await resp.read(100) == b"abc"
        resp = await pool.request("GET", "/eof")
        assert await resp.read(100) == b"until eof"
        assert resp.complete
        await asyncio.sleep(0.05)
        assert pool.open_connections() == 0
        await pool.aclose()


async def test_interim_1xx_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"{}"))
        await asyncio.sleep(1)

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("POST", "/", b"", b"{}")
        assert resp.status == 200
        assert await resp.read(10) == b"{}"
        await pool.aclose()


async def test_bytes_after_the_message_make_the_connection_unusable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        writer.write(answer(b"{}") + b"HTTP/1.1 200 OK\r\n")
        await asyncio.sleep(1)

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/")
        assert await resp.read(10) == b"{}"
        assert pool.idle_connections() == 0
        await pool.aclose()


async def test_malformed_head_is_bad_backend_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        writer.write(b"HTTP/1.1 2x0 Nope\r\n\r\n")
        await asyncio.sleep(1)

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        with pytest.raises(BadBackendResponse):
            await pool.request("GET", "/")
        assert pool.open_connections() == 0
        await pool.aclose()


async def test_truncated_content_length_body_is_an_error_not_an_end() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/")
        with pytest.raises(BackendUnavailable):
            await resp.read(100)
        await pool.aclose()


async def test_reused_connection_closed_while_idle_is_resent_once() -> None:
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await reader.read_head()  # type: ignore[attr-defined]
        requests += 1
        writer.write(answer(b"{}"))
        await writer.drain()
        # Keep-alive promised, then the server closes as soon as the next request arrives.
        await reader.read(1)

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/")
        await resp.read(10)
        assert pool.idle_connections() == 1
        resp = await pool.request("GET", "/")
        assert await resp.read(10) == b"{}"
        assert requests == 2
        await pool.aclose()


async def test_idle_connections_expire() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.read_head()  # type: ignore[attr-defined]
            writer.write(answer(b"{}"))

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url, idle_timeout=0.1)
        resp = await pool.request("GET", "/")
        await resp.read(10)
        assert pool.idle_connections() == 1
        await asyncio.sleep(0.3)  # the sweep closes it without any new request
        assert (pool.idle_connections(), pool.open_connections()) == (0, 0)
        await pool.aclose()


async def test_read_limit_and_content_length_check() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        writer.write(answer(b"x" * 100)[:-90])  # the head and 10 of the 100 bytes, then nothing
        await asyncio.sleep(1)

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/")
        with pytest.raises(BadBackendResponse):
            await resp.read(50)  # refused on the Content-Length alone, before waiting for bytes
        assert pool.open_connections() == 1
        await resp.aclose()
        await asyncio.sleep(0)
        assert pool.open_connections() == 0  # not read to its end: closed, never pooled
        await pool.aclose()


def test_urls_and_header_values_are_checked() -> None:
    with pytest.raises(ValueError):
        ConnectionPool("ftp://x")
    assert ConnectionPool("http://h").host_header == b"h"
    assert ConnectionPool("https://h:8443/base/").base_path == "/base"
    with pytest.raises(ValueError):
        HTTPBackend("http://h", api_key="a\r\nX: y")


class _PKI:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, written to a folder."""

    def __init__(self, tmp: Path, server_name: str = "127.0.0.1") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write(
            stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
        ) -> tuple[Path, Path]:
            c, k = tmp / f"{stem}.pem", tmp / f"{stem}.key"
            c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            k.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            return c, k

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(name("test CA"))
            .issuer_name(name("test CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca, _ = write("ca", ca, ca_key)

        def issue(
            cn: str, usage: x509.ObjectIdentifier, san: x509.GeneralName | None
        ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(ca.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            )
            if san is not None:
                builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
            return builder.sign(ca_key, hashes.SHA256()), key

        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(server_name))
        except ValueError:
            san = x509.DNSName(server_name)
        self.server_cert, self.server_key = write(
            "server", *issue(server_name, ExtendedKeyUsageOID.SERVER_AUTH, san)
        )
        self.client_cert, self.client_key = write(
            "client", *issue("gateway", ExtendedKeyUsageOID.CLIENT_AUTH, None)
        )

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.load_verify_locations(cafile=str(self.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@contextlib.asynccontextmanager
async def tls_server(
    ctx: ssl.SSLContext, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[int, list[int]]]:
    """An HTTPS server answering every request with ``{"tls":true}``; yields its port and a list
    that counts the requests it answered."""
    answered: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answered.append(1)
                writer.write(answer(b'{"tls":true}'))
        writer.close()

    server = await asyncio.start_server(handler, host, 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1], answered
    finally:
        server.close()


async def test_https_trusts_the_ca_file_it_is_given_and_no_other(tmp_path: Path) -> None:
    pki = _PKI(tmp_path)
    async with tls_server(pki.server_context()) as (port, answered):
        url = f"https://127.0.0.1:{port}"
        backend = HTTPBackend(url, tls=TLSOptions(ca_file=str(pki.ca)))
        await backend.start()
        try:
            for _ in range(2):
                resp = await backend.send(UpstreamRequest("GET", "/"))
                assert await resp.read(100) == b'{"tls":true}'
            assert backend.open_connections() == 1  # kept alive over TLS
        finally:
            await backend.aclose()
        # The system's trust store does not know this CA: the handshake fails, 502 not a crash.
        untrusting = HTTPBackend(url)
        await untrusting.start()
        try:
            with pytest.raises(BackendUnavailable):
                await untrusting.send(UpstreamRequest("GET", "/"))
        finally:
            await untrusting.aclose()
        assert len(answered) == 2


async def test_https_presents_the_client_certificate_when_the_backend_asks(tmp_path: Path) -> None:
    pki = _PKI(tmp_path)
    async with tls_server(pki.server_context(require_client_cert=True)) as (port, answered):
        url = f"https://127.0.0.1:{port}"
        anonymous = HTTPBackend(url, tls=TLSOptions(ca_file=str(pki.ca)))
        await anonymous.start()
        try:
            with pytest.raises(BackendUnavailable):
                resp = await anonymous.send(UpstreamRequest("GET", "/"))
                await resp.read(100)
        finally:
            await anonymous.aclose()
        mutual = HTTPBackend(
            url,
            tls=TLSOptions(
                ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
            ),
        )
        await mutual.start()
        try:
            resp = await mutual.send(UpstreamRequest("GET", "/"))
            assert await resp.read(100) == b'{"tls":true}'
        finally:
            await mutual.aclose()
        assert len(answered) == 1


async def test_https_checks_the_name_unless_verification_is_off(tmp_path: Path) -> None:
    pki = _PKI(tmp_path, server_name="backend.internal")  # not the address we dial
    async with tls_server(pki.server_context()) as (port, _):
        url = f"https://127.0.0.1:{port}"
        checked = HTTPBackend(url, tls=TLSOptions(ca_file=str(pki.ca)))
        await checked.start()
        try:
            with pytest.raises(BackendUnavailable):
                await checked.send(UpstreamRequest("GET", "/"))
        finally:
            await checked.aclose()
        unchecked = HTTPBackend(url, tls=TLSOptions(verify=False))
        await unchecked.start()
        try:
            resp = await unchecked.send(UpstreamRequest("GET", "/"))
            assert await resp.read(100) == b'{"tls":true}'
        finally:
            await unchecked.aclose()


async def test_a_plaintext_backend_behind_an_https_url_is_an_error(tmp_path: Path) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(answer(b"{}"))

    async with scripted(plain) as (url, _):
        backend = HTTPBackend(url.replace("http://", "https://"), connect_timeout=2.0)
        await backend.start()
        try:
            with pytest.raises(BackendUnavailable):
                await backend.send(UpstreamRequest("GET", "/"))
        finally:
            await backend.aclose()


async def test_chunked_body_is_delivered_whole_and_the_connection_kept() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.read_head()  # type: ignore[attr-defined]
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        for _ in range(2):
            resp = await pool.request("GET", "/")
            assert await body_of(resp) == b"hello world"
        assert pool.open_connections() == 1
        await pool.aclose()


async def test_an_http_1_0_answer_ends_with_the_connection_and_is_not_pooled() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        writer.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"old":1}')
        await writer.drain()
        writer.close()

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/")
        assert await resp.read(100) == b'{"old":1}'
        await asyncio.sleep(0.05)
        assert pool.open_connections() == 0
        await pool.aclose()


async def test_a_post_is_not_sent_twice_when_its_reused_connection_closes() -> None:
    # Regression: the client resent a POST by itself when a reused connection closed after the
    # server had read it; the backend ran the request twice (RFC 9110 9.2.2).
    posts = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        head = await reader.read_head()  # type: ignore[attr-defined]
        writer.write(answer(b"{}"))
        await writer.drain()
        head = await reader.read_head()  # type: ignore[attr-defined]
        if head.startswith(b"POST"):
            posts += 1  # read, then the server goes away without an answer
        writer.transport.abort()

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/")
        await resp.read(10)
        assert pool.idle_connections() == 1
        with pytest.raises(BackendUnavailable):
            await pool.request("POST", "/v1/completions", b"", b"{}")
        await asyncio.sleep(0.05)
        assert posts == 1
        await pool.aclose()


async def test_an_aborted_response_never_lends_its_connection_again() -> None:
    opened = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        while True:
            head = await reader.read_head()  # type: ignore[attr-defined]
            if b"/slow" in head:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
                )
                await writer.drain()
                await reader.read(1)  # never finishes; ends when the client closes
                return
            writer.write(answer(b"{}"))

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/slow")
        assert await anext(resp) == b"first"
        await resp.aclose()  # abandoned mid-body: the connection must be dropped, not pooled
        assert pool.open_connections() == 0
        resp = await pool.request("GET", "/fast")
        assert await resp.read(10) == b"{}"
        assert opened == 2
        await pool.aclose()


async def test_an_oversized_response_head_is_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n")
        await writer.drain()

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        with pytest.raises(BadBackendResponse):
            await pool.request("GET", "/")
        await pool.aclose()


_CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def test_response_trailers_are_dropped_and_the_connection_kept() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.read_head()  # type: ignore[attr-defined]
            writer.write(_CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n")

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        for _ in range(2):
            resp = await pool.request("GET", "/")
            assert await body_of(resp) == b"hello"
            assert all(name.lower() != b"x-trailer" for name, _ in resp.headers)
        assert pool.open_connections() == 1
        await pool.aclose()


async def _body_is_an_error(handler: Handler) -> None:
    """The answer's head is taken, and reading its body raises BadBackendResponse."""
    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/")
        with pytest.raises(BadBackendResponse):
            await body_of(resp)
        await pool.aclose()


@pytest.mark.parametrize("trickled", [False, True])
async def test_response_trailers_past_the_bound_are_an_error_not_held(trickled: bool) -> None:
    """21 MB of trailers were once kept: now one trailer value past the head's bound, in one
    write or trickled across many, ends the body with an error."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        writer.write(_CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Big: ")
        if trickled:
            for _ in range(4 * MAX_HEAD_BYTES // 4096):
                writer.write(b"v" * 4096)
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(b"v" * (MAX_HEAD_BYTES + 10))
        await writer.drain()
        await asyncio.sleep(5)

    await _body_is_an_error(handler)


async def test_too_many_response_trailer_fields_are_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        fields = b"".join(b"T%d: 1\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
        writer.write(_CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n" + fields + b"\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    await _body_is_an_error(handler)


async def test_too_many_response_header_fields_are_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read_head()  # type: ignore[attr-defined]
        fields = b"".join(b"H%d: 1\r\n" % i for i in range(MAX_HEADER_COUNT + 1))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + fields + b"\r\n")
        await writer.drain()

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        with pytest.raises(BadBackendResponse):
            await pool.request("GET", "/")
        await pool.aclose()


async def test_an_ipv6_backend() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b'{"v6":true}'))
        await writer.drain()
        await reader.read(1)  # until the client closes
        writer.close()

    server = await asyncio.start_server(handler, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = ConnectionPool(f"http://[::1]:{port}")
        assert pool.host_header == b"[::1]:%d" % port
        resp = await pool.request("GET", "/")
        assert await resp.read(100) == b'{"v6":true}'
        await pool.aclose()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_whole_body_that_came_with_its_head_is_still_held_to_the_read_limit() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.read_head()  # type: ignore[attr-defined]
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n%s\r\n0\r\n\r\n"
                % (b"x" * 100)
            )

    async with scripted(handler) as (url, _):
        pool = ConnectionPool(url)
        resp = await pool.request("GET", "/")
        await asyncio.sleep(0.05)  # the whole message is in before the read
        assert resp.complete
        with pytest.raises(BadBackendResponse):
            await resp.read(99)  # no declared length: refused on what came
        resp = await pool.request("GET", "/")
        await asyncio.sleep(0.05)
        charged: list[int] = []
        assert await resp.read(100, charged.append) == b"x" * 100
        assert charged == [100]
        await pool.aclose()
