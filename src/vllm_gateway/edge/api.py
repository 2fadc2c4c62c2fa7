"""The FastAPI app of the routes off the hot path: health, readiness, the model list, ``/metrics``,
the status page and its data, the admin API of a pool's members (``admin.py``), and the error
handlers that give them the gateway's error shape.
The composition root (``compose.py``) builds it from the parts it serves and puts it behind the
front door; the app has no lifespan of its own (the composition root starts and stops the parts).

Readiness asks the backend's health through ``observability.health.BackendHealth``: one check at a
time shared by every probe (and by the metrics' sampler), so a flood of probes, which need no key,
cannot make the backend work.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_gateway import __version__, errors
from vllm_gateway.backends.base import Backend, UpstreamRequest
from vllm_gateway.edge.admin import add_admin_routes
from vllm_gateway.edge.openapi import relayed_paths
from vllm_gateway.errors import GatewayError, MethodNotAllowed, NotFound
from vllm_gateway.identity import ANONYMOUS
from vllm_gateway.observability import status
from vllm_gateway.observability.health import BackendHealth
from vllm_gateway.observability.metrics import GatewayMetrics
from vllm_gateway.observability.prometheus import CONTENT_TYPE
from vllm_gateway.observability.status import StatusBoard
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.settings import Settings

__all__ = ["create_api"]


class _Api(FastAPI):
    """FastAPI, whose OpenAPI document also describes the routes the front door relays."""

    def openapi(self) -> dict[str, Any]:
        fresh = self.openapi_schema is None
        doc = super().openapi()  # FastAPI generates it at the first call and keeps it
        if fresh:
            doc["paths"].update(relayed_paths())
        return doc


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


def create_api(
    gateway: Gateway, health: BackendHealth, metrics: GatewayMetrics, board: StatusBoard
) -> FastAPI:
    api = _Api(title="vllm-gateway", version=__version__, docs_url="/docs", redoc_url=None)

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

    @api.get("/health")
    @api.get("/ping")
    @api.get("/health/ready")
    async def ready() -> Response:
        if gateway.draining:
            return JSONResponse({"status": "not_ready", "reason": "draining"}, status_code=503)
        if not await health.check():
            return JSONResponse(
                {"status": "not_ready", "reason": "backend_unhealthy"}, status_code=503
            )
        return JSONResponse({"status": "ready"})

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        request_id = request.scope["state"]["request_id"]
        body = await _backend_models(gateway.backend, request_id, gateway.settings)
        return Response(body, media_type="application/json", headers={"x-request-id": request_id})

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        """One model, as OpenAI's API serves it (vLLM 0.32 has no such route): from the
        backend's list, aliases included."""
        request_id = request.scope["state"]["request_id"]
        listing = orjson.loads(await _backend_models(gateway.backend, request_id, gateway.settings))
        for entry in listing.get("data", []):
            if isinstance(entry, dict) and entry.get("id") == model_id:
                return Response(
                    orjson.dumps(entry),
                    media_type="application/json",
                    headers={"x-request-id": request_id},
                )
        raise errors.ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

    @api.get("/metrics", include_in_schema=False)
    async def metrics_text() -> Response:
        return Response(await metrics.scrape(), media_type=CONTENT_TYPE)

    page = status.page()

    @api.get("/status", include_in_schema=False)
    async def status_page() -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    @api.get("/status/data", include_in_schema=False)
    async def status_data(request: Request, window: int = 300) -> Response:
        window = max(0, min(window, board.points.maxlen or 600))
        identity = getattr(request.state, "identity", ANONYMOUS)
        # Without client keys everyone is the one anonymous tenant: all of it is theirs.
        everyone = identity is ANONYMOUS or getattr(request.state, "admin", False)
        data = board.snapshot(window, None if everyone else identity.tenant)
        return JSONResponse(data, headers={"cache-control": "no-store"})

    add_admin_routes(api, gateway)
    return api


async def _backend_models(backend: Backend, request_id: str, settings: Settings) -> bytes:
    """The backend's model list, with the configured aliases added as models of their own."""
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
