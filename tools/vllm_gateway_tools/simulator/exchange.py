"""What a route handler gets: the parsed request (``Req``) and its connection (``Conn``).

Handlers (the ``api_*`` modules) are plain functions ``handler(conn, req)``. They answer with
``conn.reply`` (a whole response), or build an ``engine.Job`` with the connection as its sink and
``conn.run`` it. The helpers below are the steps every engine request shares: a record in
``/sim/stats``, the JSON body, the per-request ``vllm_sim`` knobs, and refusals counted as
failed requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from vllm_gateway_tools.simulator import render
from vllm_gateway_tools.simulator.config import ConfigError, SimulatorConfig
from vllm_gateway_tools.simulator.engine import JSON, Job, Sink
from vllm_gateway_tools.simulator.state import SimState
from vllm_gateway_tools.simulator.store import ResponseStore, Stored

__all__ = [
    "JSON",
    "Conn",
    "Req",
    "begin",
    "context_error",
    "reject",
    "request_id",
    "resolve_model",
]


class Req:
    """One HTTP request, parsed. ``route`` is the route's pattern (``/v1/responses/{id}``) and
    ``param`` the path parameter it matched, if any."""

    __slots__ = ("body", "headers", "keep", "method", "param", "path", "query", "route")

    def __init__(self, *, method: str, path: str, query: dict[str, list[str]],
                 headers: dict[str, str], body: bytes, keep: bool, route: str,
                 param: str | None) -> None:  # fmt: skip
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep = keep
        self.route = route
        self.param = param

    def arg(self, name: str) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else None


class Conn(Sink, Protocol):
    """The connection a request arrived on, as the handlers see it."""

    state: SimState
    store: ResponseStore
    loop: asyncio.AbstractEventLoop

    def reply(self, req: Req, status: int, body: bytes, content_type: bytes | None = JSON, *,
              count: bool = True) -> None: ...  # fmt: skip

    def run(self, job: Job) -> None: ...

    def replay(self, stored: Stored, starting_after: int | None) -> None: ...

    def stream_then_cut(self) -> None: ...

    def later(self, req: Req) -> Callable[[int, bytes], None]: ...


def new_record(state: SimState, req: Req) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": req.headers.get("x-request-id"),
        "path": req.path,
        "route": req.route,
        "stream": False,
        "model": None,
        "headers": dict(req.headers),
        "status": None,
        "chunks": 0,
        "outcome": "running",
        "fault": None,
        "started": time.time(),
        "ended": None,
    }
    state.records.append(record)
    return record


def reject(conn: Conn, req: Req, record: dict[str, Any], status: int, body: bytes) -> None:
    """An engine request refused before it ran: counted in ``total`` and ``failed``."""
    conn.state.rejected(req.route)
    record.update(status=status, outcome="error", ended=time.time())
    conn.reply(req, status, body, count=False)


def begin(
    conn: Conn, req: Req, *, not_json: bytes | None = None
) -> tuple[dict[str, Any], dict[str, Any], SimulatorConfig] | None:
    """Record an engine request, read its JSON object body and its ``vllm_sim`` knobs.
    None: refused (already answered). ``not_json``: the answer to a body that is not a JSON
    object (vLLM's validation error by default)."""
    record = new_record(conn.state, req)
    try:
        body = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        reject(conn, req, record, 400, not_json or render.not_json())
        return None
    record["body"] = body  # what the request asked, for tests that check what reached here
    try:
        cfg = conn.state.config
        if "vllm_sim" in body:
            cfg = cfg.overridden(body["vllm_sim"])
    except ConfigError as exc:
        reject(conn, req, record, 400, render.error_body(str(exc), 400, param="vllm_sim"))
        return None
    return record, body, cfg


def resolve_model(state: SimState, body: dict[str, Any], record: dict[str, Any]) -> str | None:
    """The request's model (the first served one when it names none); None: not served."""
    model = body.get("model") or state.config.models[0]
    record["model"] = model
    if not isinstance(model, str) or model not in state.models():
        return None
    return model


def unknown_model(state: SimState, model: Any) -> str:
    aliases = ", ".join(state.config.models)
    return f"The model `{model}` does not exist. Valid aliases: {aliases}."


def context_error(max_model_len: int, prompt: int) -> str:
    """vLLM's message for a prompt that leaves no room for output (it counts at most one token
    past the limit)."""
    seen = min(prompt, max_model_len + 1)
    return (
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
        f"contains at least {seen} input tokens, which exceeds this limit even without any "
        f"output tokens. Please reduce the length of the input prompt. (parameter=input_tokens, "
        f"value={seen})"
    )


def request_id(req: Req, prefix: str) -> str:
    """``prefix`` + the ``X-Request-Id`` header (vLLM takes it as the id), else 16 hex digits."""
    return prefix + (req.headers.get("x-request-id") or render.random_id())


def int_field(body: dict[str, Any], name: str) -> tuple[int | None, dict[str, Any] | None]:
    """An optional integer field, or the validation error pydantic would raise for it."""
    value = body.get(name)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value, None
    if isinstance(value, str):
        try:
            return int(value), None  # pydantic's lax mode parses numeric strings
        except ValueError:
            pass
    return None, {"type": "int_parsing", "loc": f"body.{name}",
                  "msg": "Input should be a valid integer, unable to parse string as an integer",
                  "input": value}  # fmt: skip
