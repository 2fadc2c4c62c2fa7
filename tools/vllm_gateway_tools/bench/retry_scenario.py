"""The ``retry`` scenario: a tenth of the clients drop mid-stream and retry; what the backend ran.

Every client sends one streamed request; every tenth drops its connection after half of the
events and retries at once, as the SDKs do. Two phases, against the same gateway and simulator:

- ``no keys``: the retry is a new request (the gateway aborted the first when its client left);
- ``keys``: every request carries an ``Idempotency-Key`` and the retry sends it again with
  ``Last-Event-ID`` (the last event it had), so it reattaches to the generation that went on.

Per phase, from the simulator's ``/sim/stats`` before and after: the upstream requests and the
chunks the simulator generated (one per token, plus each stream's first and last), and from the
clients: how many ended with the end marker and the content events they got in all. The figures
are what the backend was asked to do, not speeds: the saving is the ratio of the two phases.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit

import orjson

from vllm_gateway_tools.bench.runner import LoadSpec, progress
from vllm_gateway_tools.bench.session import Session

__all__ = ["run_retry"]

_CHAT = "/v1/chat/completions"
_TIMEOUT = 120.0  # bound on one client's whole exchange


async def _exchange(
    url: str, method: str, path: str, body: bytes, headers: dict[str, str], drop_after: int | None
) -> tuple[int, list[bytes]]:
    """One request on its own connection: (status, whole events read); with ``drop_after``, the
    connection is closed at once after that many events."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    try:
        async with asyncio.timeout(_TIMEOUT):
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            raw = await reader.readuntil(b"\r\n\r\n")
            status = int(raw.split(b" ", 2)[1])
            chunked = b"transfer-encoding: chunked" in raw.lower()
            events: list[bytes] = []
            pending = b""
            while True:
                if chunked:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        break
                    pending += (await reader.readexactly(size + 2))[:-2]
                else:
                    length = int(raw.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    pending += await reader.readexactly(length)
                while b"\n\n" in pending:
                    event, pending = pending.split(b"\n\n", 1)
                    events.append(event)
                    if drop_after is not None and len(events) >= drop_after:
                        return status, events
                if not chunked:
                    events.append(pending)
                    break
            return status, events
    finally:
        writer.transport.abort()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _sim_stats(url: str) -> dict[str, Any]:
    _, events = await _exchange(url, "GET", "/sim/stats", b"", {}, None)
    stats: dict[str, Any] = orjson.loads(b"\n\n".join(events))
    return stats


def _event_id(event: bytes) -> int | None:
    if event.startswith(b"id: "):
        return int(event.split(b"\n", 1)[0][4:])
    return None


async def _client(
    gateway: str, body: bytes, key: str | None, drop: int | None, api_key: str | None
) -> tuple[bool, int]:
    """One client: (ended with [DONE], content events it got)."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if key is not None:
        headers["Idempotency-Key"] = key
    status, events = await _exchange(gateway, "POST", _CHAT, body, headers, drop)
    if drop is not None and status == 200:
        retry = dict(headers)
        last = _event_id(events[-1]) if events and key is not None else None
        if last is not None:
            retry["Last-Event-ID"] = str(last)
        else:
            events = []  # a new request: its answer starts again
        status, more = await _exchange(gateway, "POST", _CHAT, body, retry, None)
        events += more
    content = sum(1 for e in events if b'"content"' in e)
    return status == 200 and bool(events) and events[-1].endswith(b"[DONE]"), content


async def run_retry(session: Session, spec: LoadSpec) -> dict[str, Any]:
    direct, gateway = session.targets[0], session.targets[1]
    clients = spec.concurrency or 100
    body = orjson.dumps(
        {
            "model": spec.model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": spec.max_tokens,
            "stream": True,
        }
    )
    phases = []
    for label, keyed in (("no keys", False), ("keys", True)):
        before = await _sim_stats(direct.url)
        results = await asyncio.gather(
            *(
                _client(
                    gateway.url,
                    body,
                    f"retry-{label}-{i}-{before['total']}" if keyed else None,
                    spec.max_tokens // 2 if i % 10 == 0 else None,
                    gateway.api_key,
                )
                for i in range(clients)
            )
        )
        # Work the gateway aborted, or a generation that goes on, settles before the count.
        for _ in range(600):
            after = await _sim_stats(direct.url)
            if after["running"] == 0:
                break
            await asyncio.sleep(0.05)
        phase = {
            "phase": label,
            "clients": clients,
            "dropped_and_retried": len(range(0, clients, 10)),
            "complete": sum(1 for ok, _ in results if ok),
            "content_events": sum(n for _, n in results),
            "upstream_requests": after["total"] - before["total"],
            "upstream_chunks": after["chunks"] - before["chunks"],
            "upstream_aborted": after["aborted"] - before["aborted"],
        }
        progress(f"retry, {label}: {phase}")
        phases.append(phase)
    plain, keyed_phase = phases
    findings: dict[str, Any] = {"phases": phases}
    if plain["upstream_chunks"]:
        findings["chunks_ratio_keys_to_no_keys"] = (
            keyed_phase["upstream_chunks"] / plain["upstream_chunks"]
        )
        findings["requests_ratio_keys_to_no_keys"] = (
            keyed_phase["upstream_requests"] / plain["upstream_requests"]
        )
    return {"levels": [], "goals": [], "findings": findings}
