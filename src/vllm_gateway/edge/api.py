"""The FastAPI app of the routes off the hot path: health, readiness, the model list, and the error
handlers that give them the gateway's error shape. Observability adds ``/metrics`` and the status
page to it; the composition root (``compose.py``) puts it behind the front door.

Readiness is open to anyone (probes carry no key), so it must not be a way to make the backend
work: every probe shares one health check (``Readiness``), at most one in flight, its answer kept
for ``READY_TTL`` seconds, and no probe waits on it longer than the check's own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_gateway import __version__, errors
from vllm_gateway.backends.base import Backend, UpstreamRequest
from vllm_gateway.errors import GatewayError, MethodNotAllowed, NotFound
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.settings import Settings

__all__ = ["READY_TTL", "Readiness", "create_api"]

# How long one answer of the backend's health check serves every probe.
READY_TTL = 1.0


class Readiness:
    """The backend's health for the readiness probes: one check at a time (single flight) shared
    by every probe, its answer (yes or no) kept ``ttl`` seconds, so however many probes come, the
    backend gets at most one health call per ``ttl`` plus the call's own time. A probe waits for
    the check in flight at most ``timeout`` (the check's own bound) and reads no answer as not
    ready; a probe that leaves does not cancel the check the others wait for."""

    def __init__(
        self,
        check: Callable[[float], Awaitable[bool]],
        timeout: float,
        ttl: float = READY_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self.timeout = timeout
        self.ttl = ttl
        self._clock = clock
        self._answer = False
        self._answered_at: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self.checks = 0  # health calls made (tests, and a gauge of the probes' cost)

    async def ready(self) -> bool:
        at = self._answered_at
        if at is not None and self._clock() - at < self.ttl:
            return self._answer
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.get_running_loop().create_task(
                self._run(), name="readiness-check"
            )
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            return False

    async def _run(self) -> bool:
        self.checks += 1
        try:
            async with asyncio.timeout(self.timeout):  # the backend's check bounds itself too
                answer = await self._check(self.timeout)
        except Exception:  # a check that fails or times out says "not ready"
            answer = False
        finally:
            self._inflight = None
        self._answer = answer
        self._answered_at = self._clock()
        return answer

    async def aclose(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


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
            await readiness.aclose()
            await gateway.aclose()

    api = FastAPI(
        title="vllm-gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    api.state.gateway = gateway
    readiness = Readiness(gateway.backend.check_health, min(2.0, gateway.settings.connect_timeout))
    api.state.readiness = readiness

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
        if not await readiness.ready():
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
