"""The backend that calls a vLLM OpenAI server over HTTP (aiohttp's client).

One ``ClientSession`` per backend, created in the lifespan and closed there. The session never
follows redirects and ignores proxy variables from the environment: the upstream is whatever the
configuration names, nothing else. aiohttp's exceptions become ``UpstreamError`` here and only here.

Closing a response that has not been read to its end closes its connection instead of returning it
to the pool: vLLM sees the disconnect and aborts the request, which frees its KV cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson

from .backend import Backend, Charge, UpstreamRequest, UpstreamResponse, read_capped
from .errors import BackendUnavailable

__all__ = ["HTTPBackend"]

_CLIENT_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


class HTTPResponse(UpstreamResponse):
    __slots__ = ("_content", "_done", "_resp", "content_type", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._content = resp.content
        self._done = False
        self.status = resp.status
        self.content_type = resp.headers.get("Content-Type", "")

    def chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> HTTPResponse:
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._content.readany()
        except _CLIENT_ERRORS as exc:
            raise BackendUnavailable("The backend closed the connection mid-response.") from exc
        if not data:
            self._done = True
            raise StopAsyncIteration
        return data

    async def read(self, limit: int, charge: Charge | None = None) -> bytes:
        return await read_capped(self, limit, self._resp.content_length, charge)

    async def aclose(self) -> None:
        if self._done:
            self._resp.release()
        else:
            self._resp.close()  # drop the connection: the backend aborts the request


class HTTPBackend(Backend):
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        api_key: str | None = None,
        name: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name or self.url
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._base_headers = {"Content-Type": "application/json"}
        if api_key:
            self._base_headers["Authorization"] = f"Bearer {api_key}"

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # admission bounds the connections; the pool must never be the queue
            keepalive_timeout=30,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._connect_timeout, sock_connect=self._connect_timeout
            ),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HTTPBackend used before start()")
        return self._session

    def open_connections(self) -> int:
        """Connections held by the pool, idle or busy (for leak checks)."""
        connector = self._session.connector if self._session else None
        if connector is None:
            return 0
        acquired = len(getattr(connector, "_acquired", ()))
        idle = sum(len(v) for v in getattr(connector, "_conns", {}).values())
        return acquired + idle

    def busy_connections(self) -> int:
        """Connections carrying a request now (for leak checks)."""
        connector = self._session.connector if self._session else None
        return len(getattr(connector, "_acquired", ())) if connector is not None else 0

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        headers = self._base_headers
        if request.request_id:
            headers = {**headers, "X-Request-ID": request.request_id}
        try:
            resp = await self.session.request(
                request.method,
                self.url + request.path,
                data=request.body if request.method != "GET" else None,
                headers=headers,
                allow_redirects=False,
            )
        except _CLIENT_ERRORS as exc:
            raise BackendUnavailable() from exc
        return HTTPResponse(resp)

    async def check_health(self, timeout: float) -> bool:
        try:
            async with self.session.get(
                self.url + "/health",
                headers=self._base_headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                await resp.read()
                return resp.status == 200
        except _CLIENT_ERRORS:
            return False

    async def model_ids(self, timeout: float) -> list[str] | None:
        try:
            async with self.session.get(
                self.url + "/v1/models",
                headers=self._base_headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if resp.status != 200:
                    return None
                body = orjson.loads(await resp.read())
            return [str(m["id"]) for m in body.get("data", []) if isinstance(m, dict) and "id" in m]
        except (*_CLIENT_ERRORS, orjson.JSONDecodeError, AttributeError, TypeError):
            return None
