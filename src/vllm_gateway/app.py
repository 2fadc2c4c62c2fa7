"""The app factory and the front door: the handler the HTTP server calls for every request.

The inference routes are the hot path: the front door hands them straight to a ``ProxyCall`` on
the server's ``Exchange``, with no ASGI, no middleware and no re-serialisation. Everything else
(health, models, metrics, the OpenAPI document) is an ordinary FastAPI route, served through the
ASGI bridge. What can be decided from the headers alone (API key, method, media type, draining,
the body's declared length) is decided in ``admit`` before the body is read, so a refused client
never gets to send it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, errors
from .asgi import serve_asgi
from .auth import ANONYMOUS, KeyRing
from .backend import Backend, UpstreamRequest
from .clients import ClientResolver
from .cors import Cors
from .errors import GatewayError, MethodNotAllowed, NotFound, ShuttingDown, Unauthorized
from .gateway import Gateway
from .http_server import BufferBudget, Exchange, ServerStats
from .ids import new_request_id
from .observe import RejectedCall, install_observability
from .openapi import install_openapi
from .relay import ProxyCall
from .settings import Settings
from .validation import CHAT, COMPLETIONS, is_json_media_type

__all__ = ["GatewayApp", "create_app"]

log = logging.getLogger("vllm_gateway")

PROXY_ROUTES = frozenset({CHAT, COMPLETIONS})
# Probes must answer without a key: orchestrators do not carry one.
OPEN_ROUTES = frozenset({"/health/live", "/health/ready", "/v1/health"})
# The FastAPI routes take no body worth the name.
_SMALL_BODY = 64 * 1024


class GatewayApp:
    """The front door: ``admit`` and ``handle`` for the HTTP server (``http_server.Handler``)."""

    def __init__(self, gateway: Gateway, api: FastAPI) -> None:
        self.gateway = gateway
        self.api = api
        settings = gateway.settings
        self._keys = KeyRing(settings.api_keys)
        self._cors = Cors(settings.cors_origins) if settings.cors_origins else None
        self._clients = ClientResolver(settings.trusted_proxies)
        self._max_body = settings.max_body_bytes
        # Shared with the HTTP server the runner builds on this app.
        self.budget = BufferBudget(settings.buffer_budget_bytes)
        self.server_stats = ServerStats()
        api.state.server_stats = self.server_stats
        api.state.budget = self.budget

    def new_request_id(self, headers: list[tuple[bytes, bytes]]) -> str:
        return new_request_id(headers)

    def admit(self, ex: Exchange) -> GatewayError | None:
        path = ex.path
        cors = self._cors
        preflight = cors is not None and Cors.is_preflight(ex.method, ex.headers)
        if cors is not None:
            ex.extra_headers = cors.response_headers(ex.header(b"origin"))
        identity = ANONYMOUS
        if self._keys and path not in OPEN_ROUTES and not preflight:
            found = self._keys.identify(ex.headers)
            if found is None:
                return Unauthorized()
            identity = found
        ex.state["identity"] = identity
        peer = ex.client[0] if ex.client else None
        ex.state["client_address"] = self._clients.client(peer, ex.headers)
        ex.body_limit = _SMALL_BODY
        if path not in PROXY_ROUTES or preflight:
            return None
        if ex.method != "POST":
            return MethodNotAllowed(allow="POST")
        if self.gateway.draining:
            return ShuttingDown(retry_after=self.gateway.admission.estimate_wait())
        ctype = ex.header(b"content-type")
        if ctype is not None and not is_json_media_type(ctype):
            return errors.UnsupportedMediaType(
                "The request body must be JSON: send 'Content-Type: application/json'."
            )
        ex.body_limit = self._max_body
        return None

    async def handle(self, ex: Exchange) -> None:
        if self._cors is not None and Cors.is_preflight(ex.method, ex.headers):
            status, headers = self._cors.preflight(
                ex.header(b"origin"), ex.header(b"access-control-request-headers")
            )
            ex.extra_headers = []
            ex.respond(status, [*headers, (b"x-request-id", ex.request_id.encode())], b"")
            return
        if ex.path in PROXY_ROUTES:
            await ProxyCall(self.gateway, ex).run()
            return
        state = {
            "request_id": ex.request_id,
            "identity": ex.state["identity"],
            "client_address": ex.state["client_address"],
        }
        await serve_asgi(self.api, ex, state)

    def refused(self, ex: Exchange, err: GatewayError) -> None:
        """The server answered ``err`` itself: count it like any other ended request."""
        self.gateway.request_ended(RejectedCall(ex.request_id, ex.path, err))


def _error_response(err: GatewayError, request: Request) -> Response:
    request_id = request.scope.get("state", {}).get("request_id")
    headers = {k.decode(): v.decode() for k, v in err.headers()}
    if request_id:
        headers["x-request-id"] = request_id
    return Response(
        errors.json_body(err, request_id),
        status_code=err.status,
        media_type="application/json",
        headers=headers,
    )


def create_api(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            # The server has already drained in-flight requests (see server.py); close the client.
            await gateway.aclose()

    api = FastAPI(
        title="vllm-gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    api.state.gateway = gateway

    @api.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return _error_response(exc, request)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error_response(NotFound(), request)
        if exc.status_code == 405:
            return _error_response(MethodNotAllowed(), request)
        err = GatewayError(str(exc.detail))
        err.status = exc.status_code
        return _error_response(err, request)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error_response(errors.InvalidRequest(), request)

    @api.get("/v1/health")
    async def v1_health() -> Response:
        if gateway.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/health/live")
    async def live() -> Response:
        return JSONResponse({"status": "ok"})

    @api.get("/health/ready")
    async def ready() -> Response:
        if gateway.draining:
            return JSONResponse({"status": "not_ready", "reason": "draining"}, status_code=503)
        if not await gateway.backend.check_health(min(2.0, gateway.settings.connect_timeout)):
            return JSONResponse(
                {"status": "not_ready", "reason": "backend_unhealthy"}, status_code=503
            )
        return JSONResponse({"status": "ready"})

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        request_id = request.scope["state"]["request_id"]
        body = await _backend_models(gateway.backend, request_id, gateway.settings)
        return Response(body, media_type="application/json", headers={"x-request-id": request_id})

    install_observability(api, gateway)
    install_openapi(api)
    return api


async def _backend_models(backend: Backend, request_id: str, settings: Settings) -> bytes:
    """The backend's model list, with the configured aliases added as models of their own."""
    import asyncio

    try:
        async with asyncio.timeout(settings.first_token_timeout):
            upstream = await backend.send(
                UpstreamRequest("GET", "/v1/models", request_id=request_id)
            )
            try:
                body = await upstream.read(8 << 20)
            finally:
                await upstream.aclose()
    except TimeoutError:
        raise errors.FirstTokenTimeout() from None
    if upstream.status != 200:
        raise errors.BadBackendResponse(f"The backend failed with status {upstream.status}.")
    try:
        listing = orjson.loads(body)
        data = listing["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise errors.BadBackendResponse("The backend's model list is not valid.") from None
    if settings.model_aliases:
        by_id = {m.get("id"): m for m in data if isinstance(m, dict)}
        for alias, target in settings.model_aliases.items():
            if alias not in by_id and target in by_id:
                data.append({**by_id[target], "id": alias})
        body = orjson.dumps(listing)
    return body


def create_app(settings: Settings, backend: Backend | None = None) -> GatewayApp:
    gateway = Gateway(settings, backend)
    return GatewayApp(gateway, create_api(gateway))
