"""A raw-socket client for keyed streams: send one request, read its answer event by event, and
drop the connection after any event (tests of Idempotency-Key and Last-Event-ID)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""  # de-chunked, as far as it was read
    events: list[bytes] = field(default_factory=list)  # whole events, each with its blank line


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
    """The body's pieces as they come (chunked or by Content-Length)."""
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    else:
        yield await reader.readexactly(int(headers.get("content-length", "0")))


def request_bytes(
    body: dict[str, Any],
    key: str | None,
    *,
    last_event_id: int | None = None,
    api_key: str | None = None,
    path: str = "/v1/chat/completions",
) -> bytes:
    """The bytes of a POST of ``body`` with the headers named."""
    raw = orjson.dumps(body)
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(raw)}",
    ]
    if key is not None:
        lines.append(f"Idempotency-Key: {key}")
    if last_event_id is not None:
        lines.append(f"Last-Event-ID: {last_event_id}")
    if api_key is not None:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


async def request(
    port: int,
    body: dict[str, Any],
    key: str | None,
    *,
    last_event_id: int | None = None,
    drop_after: int | None = None,
    api_key: str | None = None,
    path: str = "/v1/chat/completions",
) -> Answer:
    """POST ``body``; read the whole answer, or only ``drop_after`` events of a stream and then
    close the socket at once (a client that went away)."""
    data = request_bytes(body, key, last_event_id=last_event_id, api_key=api_key, path=path)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(60):
            status, headers = await _read_head(reader)
            answer = Answer(status, headers)
            pieces = []
            pending = b""
            async for piece in _chunks(reader, headers):
                pieces.append(piece)
                pending += piece
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    answer.events.append(event + b"\n\n")
                    if drop_after is not None and len(answer.events) >= drop_after:
                        answer.body = b"".join(answer.events)
                        return answer
            answer.body = b"".join(pieces)
        return answer
    finally:
        writer.transport.abort()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def event_id(event: bytes) -> int:
    """The number on an event's ``id:`` line."""
    first = event.split(b"\n", 1)[0]
    assert first.startswith(b"id: "), event
    return int(first[4:])
