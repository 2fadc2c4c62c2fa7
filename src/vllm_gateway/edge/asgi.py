"""Serving an ASGI application (the FastAPI app of the routes off the hot path) on an ``Exchange``.

The request body is already read (and capped) by the server, so ``receive`` answers it in one
message; after that it waits until the client leaves or the response is complete and then says
``http.disconnect``. ``send`` writes to the exchange: a body in one message goes out with its
length, a body in several goes out chunked, and a client that does not read is bounded by the
server's send timeout like every other response.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp, Message

from vllm_gateway.edge.http import Exchange

__all__ = ["serve_asgi"]

# Framing headers belong to the server, not to the application.
_HOP = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive"})


async def serve_asgi(app: ASGIApp, exchange: Exchange, state: MutableMapping[str, Any]) -> None:
    raw_path = exchange.raw_path.split(b"?", 1)[0]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": exchange.http_version,
        "method": exchange.method,
        "scheme": "http",
        "path": exchange.path,
        "raw_path": raw_path,
        "query_string": exchange.query,
        "root_path": "",
        "headers": exchange.headers,
        "client": exchange.client,
        "server": None,
        "state": state,
    }
    ended = asyncio.Event()
    exchange.on_gone = ended.set
    body_given = False
    head: tuple[int, list[tuple[bytes, bytes]], int | None] | None = None

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": exchange.body, "more_body": False}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal head
        kind = message["type"]
        if kind == "http.response.start":
            length: int | None = None
            headers: list[tuple[bytes, bytes]] = []
            for name, value in message.get("headers", ()):
                lname = bytes(name).lower()
                if lname == b"content-length":
                    length = int(value)
                elif lname not in _HOP:
                    headers.append((lname, bytes(value)))
            head = (int(message["status"]), headers, length)
            return
        if kind != "http.response.body" or exchange.complete or exchange.gone:
            return
        body = bytes(message.get("body", b""))
        more = bool(message.get("more_body", False))
        if not exchange.started:
            assert head is not None, "http.response.body before http.response.start"
            status, headers, length = head
            if length is None and not more:
                length = len(body)
            exchange.start(status, headers, length)
        if more:
            exchange.write(body)
            if exchange.paused:
                await exchange.drain()
        else:
            exchange.end(body)

    try:
        await app(scope, receive, send)
    finally:
        ended.set()
