"""Admin fan-out: one request sent to every member that is up, one answer listing each member's.

Admin routes act on a server's state (``UpstreamRequest.broadcast``: ``/sleep``,
``/reset_prefix_cache``, LoRA adapters, ...), so they reach every member, not one. The answer is ``200`` with ``{"object": "list", "ok":
..., "data": [{"backend", "status", "body"} ...]}``: ``ok`` is true when every member answered 2xx;
a member that could not be reached has ``status`` null and ``error`` its error type. Each member's
body is read up to 1 MiB (JSON when it parses, else its first 1000 characters as text).

Invariants: no retries and no slots (an admin request is not routed); every member's response is
closed; no member up: ``NoHealthyBackend``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from vllm_gateway.backends.base import UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.response import BytesResponse
from vllm_gateway.errors import NoHealthyBackend, UpstreamError

__all__ = ["broadcast"]


async def broadcast(fleet: Fleet, request: UpstreamRequest) -> UpstreamResponse:
    """The request sent to every member that is up; one answer listing each member's."""
    up = fleet.up()
    if not up:
        raise NoHealthyBackend()

    async def one(m: Member) -> dict[str, Any]:
        resp: UpstreamResponse | None = None
        try:
            resp = await m.backend.send(request)
            body = await resp.read(1 << 20)
            try:
                parsed: Any = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                parsed = body[:1000].decode("utf-8", "replace")
            return {"backend": m.name, "status": resp.status, "body": parsed}
        except UpstreamError as exc:
            return {"backend": m.name, "status": None, "error": exc.type}
        finally:
            if resp is not None:
                await resp.aclose()

    results = await asyncio.gather(*(one(m) for m in up))
    ok = all(isinstance(r.get("status"), int) and 200 <= r["status"] < 300 for r in results)
    body = orjson.dumps({"object": "list", "ok": ok, "data": results})
    return BytesResponse(200, "application/json", body)
