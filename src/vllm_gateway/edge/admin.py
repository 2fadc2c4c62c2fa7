"""The gateway's own admin API: a pool's members, listed and changed at run time.

    GET    /admin/backends               each member: name, url, state, source, weight, in flight
    POST   /admin/backends         {url}  add a member (it joins once its checks pass)
    DELETE /admin/backends?url=URL        remove it (drain, then gone)
    POST   /admin/backends/drain   {url}  no new requests; in-flight ones finish (a preStop hook)
    POST   /admin/backends/undrain {url}  back through joining

The front door opens ``/admin/`` to the admin keys only (``VLLM_ADMIN_API_KEYS``): with them, any
other key is 403; without them, the routes answer 404 to every key (after the client-key check
where client keys are set, as for every route). Each route checks again that the caller is admin. A member is named by its
URL (or its name in the backends file). Every change is logged on ``vllm_gateway.admin``.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from vllm_gateway import errors
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.fleet import Fleet, FleetFull
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.proxy.gateway import Gateway

__all__ = ["ADMIN_PREFIX", "add_admin_routes"]

ADMIN_PREFIX = "/admin/"
admin_log = logging.getLogger("vllm_gateway.admin")


class _Conflict(errors.InvalidRequest):
    """409: the pool's state does not allow it (full; or not a pool). Its type stays
    ``invalid_request``: the set of error types (and so of metric outcomes) does not grow."""

    status = 409


def add_admin_routes(api: FastAPI, gateway: Gateway) -> None:
    def fleet(request: Request) -> Fleet:
        if not getattr(request.state, "admin", False):
            raise errors.NotFound()  # the front door lets no one else in; never open by mistake
        backend = gateway.backend
        if not isinstance(backend, PoolBackend):
            raise _Conflict(
                "The gateway has one backend, not a pool: start it with several "
                "VLLM_BACKEND_URLs or a VLLM_BACKENDS_FILE to change members at run time."
            )
        return backend.fleet

    async def url_of(request: Request) -> str:
        url = request.query_params.get("url")
        if url is None:
            try:
                body = orjson.loads(await request.body() or b"{}")
            except orjson.JSONDecodeError:
                raise errors.InvalidJSON() from None
            url = body.get("url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url:
            raise errors.InvalidRequest(
                'Name the member: {"url": "http://host:port"} or ?url=...', param="url"
            )
        return url.rstrip("/")

    def one(f: Fleet, member: Member) -> dict[str, Any]:
        return next(d for d in f.describe() if d["url"] == member.url)

    def changed(request: Request, what: str, member: Member) -> None:
        identity = getattr(request.state, "identity", None)
        admin_log.warning(
            "admin: backend %s %s by %s (request %s)",
            member.name,
            what,
            getattr(identity, "tenant", "-"),
            getattr(request.state, "request_id", "-"),
        )

    def find(f: Fleet, url: str) -> Member:
        try:
            return f.find(url)
        except KeyError:
            raise errors.NotFound("No member of the pool has that URL or name.") from None

    @api.get("/admin/backends", include_in_schema=False)
    async def list_backends(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": fleet(request).describe()})

    @api.post("/admin/backends", include_in_schema=False)
    async def add_backend(request: Request) -> Response:
        f = fleet(request)
        url = await url_of(request)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.InvalidRequest(
                "'url' must be an http:// or https:// URL with a host.", param="url"
            )
        try:
            member = await f.add(url, "admin")
        except FleetFull as exc:
            raise _Conflict(str(exc)) from None
        changed(request, "added", member)
        return JSONResponse(one(f, member), status_code=201)

    @api.delete("/admin/backends", include_in_schema=False)
    async def remove_backend(request: Request) -> Response:
        f = fleet(request)
        member = f.remove(find(f, await url_of(request)).url)
        changed(request, "removed", member)
        return JSONResponse(one(f, member))

    @api.post("/admin/backends/drain", include_in_schema=False)
    async def drain_backend(request: Request) -> Response:
        f = fleet(request)
        member = f.drain(find(f, await url_of(request)).url)
        changed(request, "drained", member)
        return JSONResponse(one(f, member))

    @api.post("/admin/backends/undrain", include_in_schema=False)
    async def undrain_backend(request: Request) -> Response:
        f = fleet(request)
        member = f.undrain(find(f, await url_of(request)).url)
        changed(request, "undrained", member)
        return JSONResponse(one(f, member))
