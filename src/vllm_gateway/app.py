"""The app factory: a thin ASGI front door over a FastAPI app.

The two inference routes are the hot path: the front door hands them straight to a ``ProxyCall``,
with no middleware, no dependency injection and no re-serialisation. Everything else (health,
models, metrics, the OpenAPI document) is an ordinary FastAPI route behind it. API keys and the
request id are handled in the front door, so they cover both.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, errors
from .auth import ANONYMOUS, KeyRing
from .backend import Backend, UpstreamRequest
from .errors import GatewayError, MethodNotAllowed, NotFound, ShuttingDown, Unauthorized
from .gateway import Gateway
from .observe import RejectedCall, install_observability
from .openapi import install_openapi
from .relay import ProxyCall, new_request_id, send_error
from .settings import Settings
from .validation import CHAT, COMPLETIONS

__all__ = ["GatewayApp", "create_app"]

log = logging.getLogger("vllm_gateway")

PROXY_ROUTES = frozenset({CHAT, COMPLETIONS})
# Probes must answer without a key: orchestrators do not carry one.
OPEN_ROUTES = frozenset({"/health/live", "/health/ready", "/v1/health"})


class GatewayApp:
    """The ASGI application a server runs."""

    def __init__(self, gateway: Gateway, api: FastAPI) -> None:
        self.gateway = gateway
        self.api = api
        self._keys = KeyRing(gateway.settings.api_keys)
        self._entry: Any = self._dispatch
        if gateway.settings.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            self._entry = CORSMiddleware(
                self._dispatch,  # type: ignore[arg-type]
                allow_origins=list(gateway.settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
            )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        path = scope["path"]
        request_id = new_request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        identity = ANONYMOUS
        if self._keys and path not in OPEN_ROUTES and scope["method"] != "OPTIONS":
            found = self._keys.identify(scope)
            if found is None:
                err: GatewayError = Unauthorized()
                await send_error(send, err, request_id, [(b"www-authenticate", b"Bearer")])
                self.gateway.request_ended(RejectedCall(request_id, path, err))
                return
            identity = found
        state["identity"] = identity
        if path in PROXY_ROUTES:
            await self._proxy(scope, receive, send, request_id)
            return
        await self.api(scope, receive, send)

    async def _proxy(self, scope: dict[str, Any], receive: Any, send: Any, request_id: str) -> None:
        if scope["method"] != "POST":
            err: GatewayError = MethodNotAllowed()
            await send_error(send, err, request_id, [(b"allow", b"POST")])
            self.gateway.request_ended(RejectedCall(request_id, scope["path"], err))
        elif self.gateway.draining:
            err = ShuttingDown(retry_after=self.gateway.admission.estimate_wait())
            await send_error(send, err, request_id)
            self.gateway.request_ended(RejectedCall(request_id, scope["path"], err))
        else:
            await ProxyCall(self.gateway, scope, receive, send, request_id).run()


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
