"""ConnectionPool's parsing and pool rules, against scripted HTTP servers on loopback.

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

from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.backends.http.client import ConnectionPool
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


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, written to ``tmp``."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_with_a_given_ssl_context(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer(b'{"tls":true}'))
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(cert))
    pool = ConnectionPool(f"https://127.0.0.1:{port}", tls=client_ctx)
    try:
        for _ in range(2):
            resp = await pool.request("GET", "/")
            assert await resp.read(100) == b'{"tls":true}'
        assert pool.open_connections() == 1
        # Without the certificate trusted, the handshake fails: unavailable, not a crash.
        untrusting = ConnectionPool(f"https://127.0.0.1:{port}")
        with pytest.raises(BackendUnavailable):
            await untrusting.request("GET", "/")
        await untrusting.aclose()
    finally:
        await pool.aclose()
        server.close()
