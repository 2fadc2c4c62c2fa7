"""A hand-written misbehaving backend for the hostile-peer tests: a real TCP server on loopback
whose answer to each request is a coroutine the test supplies (bytes at any pace, heads that never
end, bodies larger than any cap), and raw-socket clients that misbehave the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

Behaviour = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RogueBackend:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self.open = 0  # connections open now
        self.aborted = 0  # connections the gateway closed before the behaviour finished
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            self.requests += 1
            await self.behaviour(head, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.aborted += 1
        finally:
            self.open -= 1
            writer.transport.abort()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RogueBackend]:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_block(n: int, text: str = "x" * 200) -> bytes:
    """``n`` well-formed chat chunks, as one piece of a chunked body."""
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"}}]}\n\n'
    )
    return chunk(event * n)


async def raw_connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A blocking-mode-free raw socket to the gateway (optionally with a tiny receive buffer, the
    window a client that stops reading advertises)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def read_until_closed(sock: socket.socket, timeout: float, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (EOF or reset), within ``timeout``."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                piece = await loop.sock_recv(sock, 65536)
            except ConnectionError:
                break
            if not piece:
                break
            if len(data) < limit:
                data += piece
    return bytes(data)


async def read_until(sock: socket.socket, marker: bytes, timeout: float) -> bytes:
    """What the peer sends up to and including ``marker``, within ``timeout``."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(timeout):
        while marker not in data:
            piece = await loop.sock_recv(sock, 65536)
            if not piece:
                break
            data += piece
    return bytes(data)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                values[name] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]
