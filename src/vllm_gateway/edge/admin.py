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

With ``--workers N`` every worker's pool takes each change (``runtime/workers.py``; the worker
asked checks it first: 404, 400 as above); the answer comes once every live worker has applied it
or 1 s passed, with ``"workers": {"applied": n, "of": m}``. A list (GET) is the answering
worker's view.
"""

from __future__ import annotations

import asyncio
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
from vllm_gateway.proxy.shared_admission import MEMBER_WAIT, RemoteAdmission

__all__ = ["ADMIN_PREFIX", "SharedMembers", "add_admin_routes"]

ADMIN_PREFIX = "/admin/"
admin_log = logging.getLogger("vllm_gateway.admin")


class _Conflict(errors.InvalidRequest):
    """409: the pool's state does not allow it (full; or not a pool). Its type stays
    ``invalid_request``: the set of error types (and so of metric outcomes) does not grow."""

    status = 409


# Beyond the supervisor's wait for every worker, how long a worker waits for its answer.
_SHARE_MARGIN = 2.0


class SharedMembers:
    """A worker's side of the shared member changes: applies those the supervisor sends, in its
    order, to this worker's pool, and answers each. A replayed drain or removal of a member the
    pool does not hold yet (one DNS has not given back yet) waits for that member to become
    ready and is applied then, before any request can reach it (at most one per URL)."""

    def __init__(self, fleet: Fleet, admission: RemoteAdmission) -> None:
        self.fleet = fleet
        self.admission = admission
        self.synced = asyncio.Event()  # the replay a new worker starts with is applied
        self._ops: asyncio.Queue[list[Any]] = asyncio.Queue()
        self._later: dict[str, str] = {}  # url -> replayed op that found no member
        admission.on_members = self._ops.put_nowait
        fleet.on_ready.append(self._ready)

    async def run(self) -> None:
        while True:
            message = await self._ops.get()
            if message[0] == "Y":
                self.synced.set()
                continue
            _, sid, op, url = message
            error = await self._apply(op, url, replayed=not sid)
            if sid:
                self.admission.member_op_done(sid, error)

    async def _apply(self, op: str, url: str, *, replayed: bool) -> str | None:
        f = self.fleet
        try:
            if op == "add":
                await f.add(url, "admin")
            elif op == "remove":
                f.remove(url)
            elif op == "drain":
                f.drain(url)
            elif op == "undrain":
                f.undrain(url)
            else:
                return "unknown"
        except FleetFull as exc:
            return "full: " + str(exc)
        except KeyError:
            if replayed and op in ("drain", "remove"):
                self._later[url] = op
            return "missing"
        except Exception:
            admin_log.exception("admin: applying %s %s failed", op, url)
            return "failed"
        if replayed:
            admin_log.warning("admin: backend %s %s (replayed at start)", url, op)
        return None

    def _ready(self) -> None:
        for url, op in list(self._later.items()):
            try:
                member = self.fleet.find(url)
            except KeyError:
                continue
            if member.state != "ready":
                continue  # another member's admission: this one's comes later
            del self._later[url]
            (self.fleet.drain if op == "drain" else self.fleet.remove)(url)
            admin_log.warning("admin: backend %s %s (replayed as it joined)", url, op)


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

    def changed(request: Request, what: str, name: str) -> None:
        identity = getattr(request.state, "identity", None)
        admin_log.warning(
            "admin: backend %s %s by %s (request %s)",
            name,
            what,
            getattr(identity, "tenant", "-"),
            getattr(request.state, "request_id", "-"),
        )

    def find(f: Fleet, url: str) -> Member:
        try:
            return f.find(url)
        except KeyError:
            raise errors.NotFound("No member of the pool has that URL or name.") from None

    async def shared(f: Fleet, op: str, url: str) -> dict[str, Any] | None:
        """With workers: the change made in every worker's pool; how many applied it. Without
        (or with the supervisor gone): None, and the caller makes it here."""
        adm = gateway.admission
        if not isinstance(adm, RemoteAdmission) or adm.channel is None:
            return None
        answer = await adm.share_member_op(op, url, MEMBER_WAIT + _SHARE_MARGIN)
        if answer is None:
            return {"applied": None, "of": None}
        applied, of, error = answer
        if isinstance(error, str) and error.startswith("full: "):
            raise _Conflict(error.removeprefix("full: "))
        if error == "missing":
            raise errors.NotFound("No member of the pool has that URL or name.")
        return {"applied": applied, "of": of}

    def answer(f: Fleet, url: str, workers: dict[str, Any] | None, status: int = 200) -> Response:
        found = [d for d in f.describe() if d["url"] == url]
        if not found:
            raise errors.NotFound("No member of the pool has that URL or name.")
        body = found[0]
        if workers is not None:
            body = {**body, "workers": workers}
        return JSONResponse(body, status_code=status)

    async def change(request: Request, op: str) -> Response:
        """drain, undrain, remove: of a member this worker's pool holds."""
        f = fleet(request)
        member = find(f, await url_of(request))
        workers = await shared(f, op, member.url)
        if workers is None:
            getattr(f, op)(member.url)
        changed(request, {"remove": "removed"}.get(op, op + "ed"), member.name)
        return answer(f, member.url, workers)

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
        workers = await shared(f, "add", url)
        if workers is None:
            try:
                member = await f.add(url, "admin")
            except FleetFull as exc:
                raise _Conflict(str(exc)) from None
        else:
            member = find(f, url)
        changed(request, "added", member.name)
        return answer(f, member.url, workers, status=201)

    @api.delete("/admin/backends", include_in_schema=False)
    async def remove_backend(request: Request) -> Response:
        return await change(request, "remove")

    @api.post("/admin/backends/drain", include_in_schema=False)
    async def drain_backend(request: Request) -> Response:
        return await change(request, "drain")

    @api.post("/admin/backends/undrain", include_in_schema=False)
    async def undrain_backend(request: Request) -> Response:
        return await change(request, "undrain")
