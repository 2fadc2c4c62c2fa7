"""The front door: the handler the HTTP server calls for every request.

The inference routes are the hot path: the front door hands them straight to a ``ProxyCall`` on
the server's ``Exchange``, with no ASGI, no middleware and no re-serialisation. Everything else
(health, models, metrics, the OpenAPI document) is an ordinary FastAPI route, served through the
ASGI bridge. What can be decided from the headers alone (API key, method, media type, draining,
the body's declared length) is decided in ``admit`` before the body is read, so a refused client
never gets to send it. What it learns goes into the exchange's ``RequestContext`` (identity, client
address, route, admin flag), which the call and the ASGI routes read. When the request is whole,
``ready`` takes its place in admission (a permit or a place in the queue) before its task is made:
places follow arrival order, and a full gateway refuses in the callback that read the request, not
behind the setup of the requests before it. The place goes to the call in the context; from then
the call owns it and releases it.

A path that no route serves is answered here, before FastAPI, with what the gateway serves and,
when there is one, the path the client likely meant.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from starlette.routing import Match

from vllm_gateway import errors
from vllm_gateway.edge.admin import ADMIN_PREFIX
from vllm_gateway.edge.asgi import serve_asgi
from vllm_gateway.edge.auth import KeyRing
from vllm_gateway.edge.clients import ClientResolver
from vllm_gateway.edge.cors import Cors
from vllm_gateway.edge.http import Exchange
from vllm_gateway.errors import GatewayError, MethodNotAllowed, ShuttingDown, Unauthorized
from vllm_gateway.identity import ANONYMOUS, MAX_DEADLINE_MS, parse_deadline_ms
from vllm_gateway.ids import new_request_id
from vllm_gateway.observability.connections import ConnectionStats
from vllm_gateway.proxy.admission import Admission
from vllm_gateway.proxy.budget import BufferBudget
from vllm_gateway.proxy.call import ProxyCall
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.record import RejectedCall
from vllm_gateway.proxy.resume.serving import keyed, serve_keyed
from vllm_gateway.proxy.routes import OPEN_ROUTES, Body, Route, match
from vllm_gateway.proxy.validation import is_json_media_type, is_multipart

__all__ = ["FrontDoor"]

log = logging.getLogger("vllm_gateway")
admin_log = logging.getLogger("vllm_gateway.admin")

# The FastAPI routes take no body worth the name.
_SMALL_BODY = 64 * 1024
# Routes an admin key opens besides the admin routes: what reads any tenant's state (the stored
# Responses' routes are the other, by their kind).
_ADMIN_READS = frozenset({"/status/data"})
# What a request for no route is told the gateway serves.
_SERVED = (
    "The gateway serves the OpenAI API under /v1 (POST /v1/chat/completions, /v1/completions, "
    "/v1/responses, /v1/embeddings; GET /v1/models) and Anthropic's POST /v1/messages; "
    "every route is in /docs."
)


def _near(path: str) -> list[str]:
    """Paths a client may have meant: the same under /v1 (a base URL without it), or with one
    /v1 less (a base URL with it, and a path with it again)."""
    if path.startswith("/v1/v1/"):
        return [path[3:]]
    if path != "/" and not path.startswith("/v1/"):
        return ["/v1" + path]
    return []


_ADMISSION_HEADERS = frozenset({b"x-request-deadline-ms", b"x-queue-updates"})


def _admission_headers(ex: Exchange) -> GatewayError | None:
    """``X-Request-Deadline-Ms`` and ``X-Queue-Updates``, read into the request's context; a
    clear 400 naming the header for a value that is not one (docs/admission.md)."""
    ctx = ex.context
    for name, value in ex.headers:
        if name not in _ADMISSION_HEADERS:
            continue  # one set lookup per header: the common case costs next to nothing
        if name == b"x-request-deadline-ms":
            deadline_ms = parse_deadline_ms(value)
            if deadline_ms is None:
                return errors.InvalidRequest(
                    "The header X-Request-Deadline-Ms must be whole milliseconds from 1 to "
                    f"{MAX_DEADLINE_MS}.",
                    param="X-Request-Deadline-Ms",
                )
            ctx.deadline_ms = deadline_ms
        elif name == b"x-queue-updates":
            flag = value.strip()
            if flag not in (b"0", b"1"):
                return errors.InvalidRequest(
                    "The header X-Queue-Updates must be 1 (send queue updates) or 0.",
                    param="X-Queue-Updates",
                )
            ctx.queue_updates = flag == b"1"
    return None


class FrontDoor:
    """The front door: ``admit``, ``ready`` and ``handle`` for the HTTP server (its ``Handler``)."""

    def __init__(self, gateway: Gateway, api: FastAPI) -> None:
        self.gateway = gateway
        self.api = api
        settings = gateway.settings
        self._keys = KeyRing(settings.api_keys)
        self._admin_keys = KeyRing(settings.admin_api_keys)
        self._max_upload = settings.max_upload_bytes
        self._cors = Cors(settings.cors_origins) if settings.cors_origins else None
        self._clients = ClientResolver(settings.trusted_proxies)
        self._max_body = settings.max_body_bytes
        # Shared with the HTTP server the runner builds on this app.
        self.budget = BufferBudget(settings.buffer_budget_bytes)
        self.server_stats = ConnectionStats()

    def new_request_id(self, headers: list[tuple[bytes, bytes]]) -> str:
        return new_request_id(headers)

    def admit(self, ex: Exchange) -> GatewayError | None:
        path = ex.path
        cors = self._cors
        preflight = cors is not None and Cors.is_preflight(ex.method, ex.headers)
        if cors is not None:
            ex.extra_headers = cors.response_headers(ex.header(b"origin"))
        found = match(path)
        route = found[0] if found is not None else None
        if route is not None:
            ex.render_error = route.protocol.error_body
        if route is not None and route.kind == "admin" and not preflight:
            return self._admit_admin(ex, route, found[1] if found is not None else None)
        if route is None and self._admin_keys and path.startswith(ADMIN_PREFIX) and not preflight:
            return self._admit_gateway_admin(ex)
        ctx = ex.context
        identity = ANONYMOUS
        if self._keys and path not in OPEN_ROUTES and not preflight:
            known = None
            if self._admin_keys and (
                path in _ADMIN_READS or (route is not None and route.kind == "store")
            ):
                # Any tenant's stored responses and failed requests, to an operator.
                known = self._admin_keys.identify(ex.headers)
                if known is not None:
                    ctx.admin = True
            if known is None:
                known = self._keys.identify(ex.headers)
            if known is None:
                return Unauthorized()
            identity = known
        ctx.identity = identity
        peer = ex.client[0] if ex.client else None
        ctx.client_address = self._clients.client(peer, ex.headers)
        ex.body_limit = _SMALL_BODY
        if found is None or preflight:
            return None
        ctx.route, ctx.param = found
        return self._admit_route(ex, found[0])

    def _admit_admin(self, ex: Exchange, route: Route, param: str | None) -> GatewayError | None:
        """Admin routes are closed unless admin keys are configured, and then open to them only:
        a client key, however privileged, never opens them."""
        if not self._admin_keys:
            return errors.NotFound()
        refused = self._admit_admin_key(ex)
        if refused is not None:
            return refused
        ex.context.route, ex.context.param = route, param  # param: an adapter's name
        return self._admit_route(ex, route)

    def _admit_gateway_admin(self, ex: Exchange) -> GatewayError | None:
        """The gateway's own admin API (``edge/admin.py``), open to the admin keys only. Without
        admin keys it takes the ordinary way (a client key, when keys are set) to routes that
        answer 404 to anyone who is not admin."""
        refused = self._admit_admin_key(ex)
        if refused is None:
            ex.body_limit = _SMALL_BODY
        return refused

    def _admit_admin_key(self, ex: Exchange) -> GatewayError | None:
        """An admin key opens the request to the admin routes (the request is then admin's), or
        it is refused: 403, logged."""
        identity = self._admin_keys.identify(ex.headers)
        if identity is None:
            admin_log.warning(
                "admin route %s %s refused: no valid admin key (request %s)",
                ex.method,
                ex.path,
                ex.request_id,
            )
            return errors.Forbidden()
        ctx = ex.context
        ctx.identity = identity
        ctx.client_address = ex.client[0] if ex.client else None
        ctx.admin = True
        return None

    def _admit_route(self, ex: Exchange, route: Route) -> GatewayError | None:
        if ex.method not in route.methods:
            return MethodNotAllowed(allow=", ".join(sorted(route.methods)))
        if self.gateway.draining:
            return ShuttingDown(retry_after=self.gateway.admission.estimate_wait())
        ctype = ex.header(b"content-type")
        if route.body is Body.JSON:
            if ctype is not None and not is_json_media_type(ctype):
                return errors.UnsupportedMediaType(
                    "The request body must be JSON: send 'Content-Type: application/json'."
                )
            ex.body_limit = self._max_body
        elif route.body is Body.MULTIPART:
            if ctype is None or not is_multipart(ctype):
                return errors.UnsupportedMediaType(
                    "The request body must be an upload: send 'Content-Type: multipart/form-data' "
                    "with its boundary."
                )
            ex.body_limit = self._max_upload
        else:
            ex.body_limit = self._max_body
        if route.admitted:
            return _admission_headers(ex)
        return None

    def ready(self, ex: Exchange) -> GatewayError | None:
        ctx = ex.context
        route = ctx.route
        if route is None or not route.admitted:
            return None
        identity = ctx.identity or ANONYMOUS
        deadline_ms = ctx.deadline_ms if ctx.deadline_ms is not None else identity.deadline_ms
        adm = self.gateway.admission
        try:
            # One process: a permit or a queue place, now. A worker of several: a place the
            # supervisor is asked for when the call waits on it.
            if deadline_ms is None:
                ctx.place = adm.arrive(identity.tenant, identity.priority)
                return None
            ctx.deadline = asyncio.get_running_loop().time() + deadline_ms / 1000
            if not isinstance(adm, Admission):
                ctx.place = adm.arrive(identity.tenant, identity.priority)
                return None  # the supervisor's queue: the deadline bounds the wait only
            place = adm.arrive(identity.tenant, identity.priority)
        except GatewayError as err:
            return err
        predicted = adm.predicted_wait(place)
        if predicted is not None and predicted * 1000 > deadline_ms:
            place.release()  # refused at once, not after the wait
            return errors.DeadlineUnmeetable(
                f"The predicted wait for a slot ({predicted * 1000:.0f} ms) is longer than the "
                f"request's deadline ({deadline_ms} ms, X-Request-Deadline-Ms); retry later.",
                retry_after=adm.retry_after(identity.tenant, identity.priority),
            )
        ctx.place = place
        return None

    async def handle(self, ex: Exchange) -> None:
        if self._cors is not None and Cors.is_preflight(ex.method, ex.headers):
            status, headers = self._cors.preflight(
                ex.header(b"origin"), ex.header(b"access-control-request-headers")
            )
            ex.extra_headers = []
            ex.respond(status, [*headers, (b"x-request-id", ex.request_id.encode())], b"")
            return
        ctx = ex.context
        if ctx.route is not None:
            if keyed(self.gateway, ex, ctx.route) is not None:
                await serve_keyed(self.gateway, ex, ctx.route, ctx.param)
                return
            call = ProxyCall(self.gateway, ex, ctx.route, ctx.param)
            await call.run()
            if ctx.admin:
                admin_log.warning(
                    "admin route %s %s by %s: %s %s (request %s)",
                    ex.method,
                    ex.path,
                    call.tenant,
                    call.status,
                    call.outcome,
                    ex.request_id,
                )
            return
        if not self._api_serves(ex.path):
            err = errors.NotFound(self._no_route(ex.path))
            headers = [(b"content-type", b"application/json"), *err.headers()]
            ex.respond(
                err.status,
                [*headers, (b"x-request-id", ex.request_id.encode())],
                errors.json_body(err, ex.request_id),
            )
            return
        state = {
            "request_id": ex.request_id,
            "identity": ctx.identity,
            "client_address": ctx.client_address,
            "admin": ctx.admin,
        }
        await serve_asgi(self.api, ex, state)

    def _api_serves(self, path: str) -> bool:
        """Whether the FastAPI app answers ``path`` (with any method: a wrong one is its 405), or
        redirects it (to the same path with its trailing slash changed)."""
        paths = [path]
        if path != "/":
            paths.append(path.rstrip("/") if path.endswith("/") else path + "/")
        for candidate in paths:
            scope = {"type": "http", "path": candidate, "root_path": "", "method": "GET"}
            for route in self.api.router.routes:
                if route.matches(scope)[0] is not Match.NONE:
                    return True
        return False

    def _no_route(self, path: str) -> str:
        """The 404's message for a path no route serves: the path a client likely meant, when
        one is served, else what the gateway serves."""
        shown = path if len(path) <= 200 else path[:197] + "..."
        for candidate in _near(path):
            if match(candidate) is not None or self._api_serves(candidate):
                return f"No route {shown}. Did you mean {candidate}? {_SERVED}"
        return f"No route {shown}. {_SERVED}"

    def refused(self, ex: Exchange, err: GatewayError) -> None:
        """The server answered ``err`` itself: count it like any other ended request."""
        record = RejectedCall(ex.request_id, ex.path, err, ex.arrived_at or None)
        identity = ex.context.identity
        if identity is not None:  # refused after its key was known: the tenant's own failure
            record.tenant = identity.tenant
        self.gateway.request_ended(record)
