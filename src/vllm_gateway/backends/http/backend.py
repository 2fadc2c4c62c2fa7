"""The backend that calls one vLLM OpenAI server over HTTP, on the gateway's own client."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import orjson

from vllm_gateway.backends.base import Backend, ConnectionCounts, UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.http.client import ConnectionPool, TLSOptions, ssl_context
from vllm_gateway.errors import UpstreamError
from vllm_gateway.settings import Settings

__all__ = ["HTTPBackend"]


def _safe_query(query: str) -> str:
    """The query string as the request line may carry it: reserved characters kept, anything
    else (spaces, controls, non-ASCII) percent-encoded."""
    return quote(query, safe="=&;%+-._~!$'()*,:@/?")


def _check_header_value(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("header value with a line break")
    return value


class HTTPBackend(Backend):
    """One vLLM server. ``api_key`` is the gateway's own key for a vLLM started with ``--api-key``
    (the client's key is never forwarded); ``tls`` applies to ``https://`` URLs."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        api_key: str | None = None,
        name: str | None = None,
        idle_timeout: float = 4.0,
        tls: TLSOptions | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name or self.url
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._tls = tls or TLSOptions()
        self._pool: ConnectionPool | None = None
        lines = b""
        if api_key:
            lines += b"Authorization: Bearer %s\r\n" % _check_header_value(api_key).encode(
                "latin-1"
            )
        self._base_lines = lines
        ConnectionPool(self.url)  # check the URL now, not at the first request

    @classmethod
    def from_settings(cls, settings: Settings, url: str, name: str | None = None) -> HTTPBackend:
        """One vLLM server with the settings' timeouts, backend key and TLS."""
        return cls(
            url,
            connect_timeout=settings.connect_timeout,
            api_key=settings.backend_api_key,
            name=name,
            idle_timeout=settings.upstream_idle_timeout,
            tls=TLSOptions.from_settings(settings),
        )

    async def start(self) -> None:
        context = ssl_context(self._tls) if self.url.startswith("https://") else None
        self._pool = ConnectionPool(
            self.url,
            connect_timeout=self._connect_timeout,
            idle_timeout=self._idle_timeout,
            tls=context,
        )

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            raise RuntimeError("HTTPBackend used before start()")
        return self._pool

    def connection_counts(self) -> ConnectionCounts:
        pool = self._pool
        if pool is None:
            return {"open": 0, "busy": 0, "opened": 0}
        return {
            "open": pool.open_connections(),
            "busy": pool.busy_connections(),
            "opened": pool.connections_opened,
        }

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
        body: bytes | None = None
        if request.method not in ("GET", "HEAD", "DELETE") or request.body:
            body = request.body
            lines += b"Content-Type: %s\r\n" % _check_header_value(request.content_type).encode(
                "latin-1"
            )
        path = request.path
        if request.query:
            path = f"{path}?{_safe_query(request.query)}"
        return await self.pool.request(request.method, path, lines, body)

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
