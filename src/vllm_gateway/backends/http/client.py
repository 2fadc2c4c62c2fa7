"""Keep-alive HTTP/1.1 connections to one backend origin (``http://`` or ``https://``).

Invariants:

- A connection is busy or idle in the LIFO stack (the warmest is reused first, the others may
  time out), until it is closed. Idle connections live at most ``idle_timeout`` seconds: keep it
  below the server's own keep-alive (uvicorn's 5 s for vLLM), so the server rarely closes one
  under us.
- A request that finds its reused connection closed before any byte of the answer arrived is sent
  once more on a fresh connection only when its method is idempotent (RFC 9110 9.2.2): the server
  may have read a POST before it closed, and running an inference twice is not the client's call.
- TLS: the system's trust store unless a CA file is given; a client certificate when given;
  verification can be switched off (for a self-signed backend on a private network; the log says
  so at start).
- No limit on connections (admission bounds them), no redirects, no proxies from the environment.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from vllm_gateway.backends.http.connection import Connection, HTTPResponse, Stale
from vllm_gateway.errors import BackendUnavailable
from vllm_gateway.settings import Settings

__all__ = ["IDEMPOTENT", "ConnectionPool", "TLSOptions", "ssl_context"]

log = logging.getLogger("vllm_gateway.backends.http")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class TLSOptions:
    ca_file: str | None = None  # PEM bundle to trust instead of the system's store
    cert_file: str | None = None  # client certificate (PEM), for backends that ask for one
    key_file: str | None = None  # its key, when not in cert_file
    verify: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> TLSOptions:
        return cls(
            ca_file=settings.backend_ca_file,
            cert_file=settings.backend_client_cert,
            key_file=settings.backend_client_key,
            verify=settings.backend_tls_verify,
        )


def ssl_context(options: TLSOptions) -> ssl.SSLContext:
    """The client context for ``https://`` backends. Raises ``OSError``/``ssl.SSLError`` for files
    that cannot be read (the settings check them at startup)."""
    ctx = ssl.create_default_context(cafile=options.ca_file)
    if options.cert_file:
        ctx.load_cert_chain(options.cert_file, options.key_file)
    if not options.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one ``http://`` or ``https://`` origin."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        idle_timeout: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = tls or ssl_context(TLSOptions())
        default_port = 443 if parts.scheme == "https" else 80
        netloc = self.host if ":" not in self.host else f"[{self.host}]"
        if self.port != default_port:
            netloc = f"{netloc}:{self.port}"
        self.host_header = netloc.encode("idna")
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()
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
    ) -> HTTPResponse:
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
        resend = method in IDEMPOTENT
        while True:
            conn = self._take_idle(loop)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(loop)
            response = HTTPResponse(conn, loop)
            conn.response = response
            head = response._head
            conn.transport.write(data)  # type: ignore[union-attr]
            try:
                await head  # type: ignore[misc]
            except Stale:
                if reused and resend:
                    continue  # the server closed it while idle; sending again is harmless
                raise BackendUnavailable(
                    "The backend closed the connection before answering."
                ) from None
            except BaseException:
                await response.aclose()  # cancelled or failed: never reuse this connection
                raise
            return response

    def _take_idle(self, loop: asyncio.AbstractEventLoop) -> Connection | None:
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

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self),
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

    def _release(self, conn: Connection) -> None:
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

    def _forget(self, conn: Connection) -> None:
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
