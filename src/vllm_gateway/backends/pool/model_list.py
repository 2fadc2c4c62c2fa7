"""The pool's models: the union of its members' lists, for routing and for ``/v1/models``.

A member serves the models its backends-file entry declares (then its own list is never asked
for), else what its ``/v1/models`` lists; ``Member.models`` is None until known, and such a member
is eligible for any model. ``health.py`` refreshes the lists in the background; here:

- ``model_ids`` (the ``Backend`` seam's: the gateway's model catalog): the union, after asking
  the members that are up and whose list is unknown; None while no list is known;
- ``model_listing``: ``GET /v1/models`` asked of every member that is up (each within twice
  ``health_timeout``, a body up to 8 MiB), the entries merged by id, first member first; a member
  that declared its models lists exactly those (its own entry when it has one, else a minimal
  one). The answers also refresh ``Member.models``.

Invariants: every member's response is closed; a member's bad answer counts as no answer, never a
failure of the member; no member answering is ``BackendUnavailable``, no member up
``NoHealthyBackend``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from vllm_gateway.backends.base import UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.response import BytesResponse
from vllm_gateway.errors import BackendUnavailable, NoHealthyBackend, UpstreamError

__all__ = ["model_ids", "model_listing"]


async def model_ids(fleet: Fleet, timeout: float) -> list[str] | None:
    members = fleet.members
    unknown = [m for m in members if m.models is None and m.up]
    if unknown:
        answers = await asyncio.gather(*(m.backend.model_ids(timeout) for m in unknown))
        for m, ids in zip(unknown, answers, strict=True):
            if ids is not None:
                m.models = frozenset(ids)
    seen: dict[str, None] = {}
    known = False
    for m in members:
        if m.models is not None:
            known = True
            seen.update(dict.fromkeys(sorted(m.models)))
    return list(seen) if known else None


async def model_listing(
    fleet: Fleet, config: PoolConfig, request: UpstreamRequest
) -> UpstreamResponse:
    """``/v1/models`` is the union of the members' lists, not one member's."""
    up = fleet.up()
    if not up:
        raise NoHealthyBackend()
    answers = await asyncio.gather(*(_member_models(m, config, request) for m in up))
    merged: dict[str, Any] = {}
    for m, data in zip(up, answers, strict=True):
        if data is None:
            continue
        if m.declared_models is None:
            m.models = frozenset(str(d["id"]) for d in data)
        else:  # a member lists what the file says it serves, no more, no less
            listed = {str(d["id"]): d for d in data}
            data = [
                listed.get(x) or {"id": x, "object": "model", "owned_by": "vllm"}
                for x in m.declared_models
            ]
        for d in data:
            merged.setdefault(str(d["id"]), d)
    if not any(a is not None for a in answers):
        raise BackendUnavailable("No backend answered its model list.")
    body = orjson.dumps({"object": "list", "data": list(merged.values())})
    return BytesResponse(200, "application/json", body)


async def _member_models(
    m: Member, config: PoolConfig, request: UpstreamRequest
) -> list[Any] | None:
    resp: UpstreamResponse | None = None
    try:
        async with asyncio.timeout(config.health_timeout * 2):
            resp = await m.backend.send(request)
            body = await resp.read(8 << 20)
        if resp.status != 200:
            return None
        data = orjson.loads(body)["data"]
        return [d for d in data if isinstance(d, dict) and "id" in d]
    except (TimeoutError, UpstreamError, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    finally:
        if resp is not None:
            await resp.aclose()
