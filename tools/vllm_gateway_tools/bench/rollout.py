"""A rolling restart under steady load, and a member's death under many streams: the parts that the
``rollout`` scenario and the suite's test share.

``Load`` runs steady traffic (streams and non-streamed requests, each worker sending one after the
other) until stopped, and keeps one ``Record`` per request: whether it completed, its generated
text and, for a stream, when each content chunk arrived. ``roll`` restarts every member one at a
time, the way an operator does: the member leaves (``leave``: drain through the gateway's admin
API, remove from the router, drop from the client's list), holds nothing or reaches the drain
deadline, is killed, starts again on the same port, comes back (``join``) and takes traffic again.

A stream *moved* when its member was generating it as the member left and it did not finish
there (the member's ``/sim/stats`` records, matched by the ``X-Request-Id`` the member saw); its
*pause at the move* is its longest gap between two chunks while the member was out. A stream that ended without its end marker, with an error event or with text other than the
unbroken text is *broken*.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import orjson

__all__ = [
    "Load",
    "Member",
    "Record",
    "kill_one_of_two",
    "pauses",
    "roll",
    "summary",
    "unbroken_text",
]

CHAT = "/v1/chat/completions"


class Member(Protocol):
    """A member process that can be killed and started again on its port (``SimulatorProcess``)."""

    url: str

    def kill(self) -> None: ...

    def start(self, timeout: float = ...) -> None: ...


@dataclass(slots=True)
class Record:
    stream: bool
    started: float
    ended: float = 0.0
    status: int = 0
    text: str = ""
    done: bool = False  # the end marker (streams) or a complete JSON answer
    error: str = ""
    times: list[float] = field(default_factory=list)  # content chunk arrivals (streams)
    rid: str = ""  # the id its member saw (the answer's X-Request-Id)


def _body(model: str, tokens: int, stream: bool) -> dict[str, Any]:
    """One prompt for every request: the unbroken greedy text is then one text (a real model's
    answer depends on its prompt)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Count slowly from one to fifty."}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": stream,
    }
    return body


def _content(event: bytes) -> str | None:
    """The text of one SSE ``data:`` payload, None when it carries none."""
    try:
        doc = orjson.loads(event)
    except orjson.JSONDecodeError:
        return None
    if "error" in doc:
        raise _ErrorEvent(str(doc["error"])[:200])
    choices = doc.get("choices") or []
    if not choices:
        return None
    delta = choices[0].get("delta") or {}
    text = delta.get("content")
    return text if isinstance(text, str) and text else None


class _ErrorEvent(Exception):
    pass


class Load:
    """``streams`` + ``posts`` workers against ``urls`` (one URL: a proxy; several: a client-side
    round-robin list, which tries the next URL once when a connection is refused)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model: str,
        streams: int,
        posts: int,
        stream_tokens: int,
        post_tokens: int,
        timeout: float = 60.0,
        headers: dict[str, str] | None = None,
        send_ids: bool = True,
        connections: int = 0,
    ) -> None:
        self.urls = list(urls)
        self.connections = connections or streams + posts + 8
        self.send_ids = send_ids  # False: the proxy names each request (and says so)
        self.model = model
        self.streams = streams
        self.posts = posts
        self.stream_tokens = stream_tokens
        self.post_tokens = post_tokens
        self.timeout = timeout
        self.headers = headers or {}
        self.records: list[Record] = []
        self._turn = itertools.count()
        self._ids = itertools.count()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    def remove(self, url: str) -> None:
        """The client's list no longer names ``url`` (a rollout's operator edits the list)."""
        if url in self.urls and len(self.urls) > 1:
            self.urls.remove(url)

    def add(self, url: str) -> None:
        if url not in self.urls:
            self.urls.append(url)

    async def __aenter__(self) -> Load:
        limits = httpx.Limits(max_connections=self.connections)
        self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        for i in range(self.streams):
            self._tasks.append(asyncio.create_task(self._worker(i, True)))
        for i in range(self.posts):
            self._tasks.append(asyncio.create_task(self._worker(self.streams + i, False)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks), self.timeout + 5)
        finally:
            for t in self._tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._client is not None:
                await self._client.aclose()

    async def _worker(self, i: int, stream: bool) -> None:
        n = 0
        while not self._stop.is_set():
            rec = await self.one(i * 1000 + n, stream)
            self.records.append(rec)
            n += 1

    def _pick(self) -> list[str]:
        urls = list(self.urls)
        k = next(self._turn) % len(urls)
        ordered = urls[k:] + urls[:k]
        return ordered[:2]

    async def one(self, i: int, stream: bool, rec: Record | None = None) -> Record:
        """One request; ``rec`` (new when None) is filled as it goes."""
        assert self._client is not None
        rec = rec or Record(stream=stream, started=time.monotonic())
        tokens = self.stream_tokens if stream else self.post_tokens
        body = _body(self.model, tokens, stream)
        headers = dict(self.headers)
        if self.send_ids:
            rec.rid = headers["X-Request-Id"] = f"roll-{id(self):x}-{next(self._ids)}"
        for attempt, base in enumerate(self._pick()):
            try:
                if stream:
                    await self._stream(base, body, headers, rec)
                else:
                    resp = await self._client.post(base + CHAT, json=body, headers=headers)
                    rec.rid = resp.headers.get("x-request-id", rec.rid)
                    rec.status = resp.status_code
                    if resp.status_code == 200:
                        rec.text = resp.json()["choices"][0]["message"]["content"] or ""
                        rec.done = True
                    else:
                        rec.error = f"status {resp.status_code}: {resp.text[:200]}"
                break
            except httpx.ConnectError as exc:  # nothing was sent: the next URL, once
                rec.error = f"connect: {exc}"
                if attempt or len(self.urls) < 2:
                    break
            except (httpx.HTTPError, _ErrorEvent, ValueError, KeyError) as exc:
                rec.error = f"{type(exc).__name__}: {exc}"[:300]
                break
        rec.ended = time.monotonic()
        return rec

    async def _stream(
        self, base: str, body: dict[str, Any], headers: dict[str, str], rec: Record
    ) -> None:
        assert self._client is not None
        parts: list[str] = []
        req = self._client.stream("POST", base + CHAT, json=body, headers=headers)
        async with req as resp:
            rec.status = resp.status_code
            rec.rid = resp.headers.get("x-request-id", rec.rid)
            if resp.status_code != 200:
                rec.error = f"status {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    rec.done = True
                    continue
                text = _content(payload.encode())
                if text is not None:
                    parts.append(text)
                    rec.times.append(time.monotonic())
        rec.text = "".join(parts)
        if not rec.done:
            rec.error = "stream ended without its end marker"


async def unbroken_text(url: str, model: str, tokens: int) -> str:
    """The text of one greedy generation of ``tokens`` tokens, asked of a member directly."""
    async with httpx.AsyncClient(timeout=60) as client:
        resp = await client.post(url + CHAT, json=_body(model, tokens, False))
        resp.raise_for_status()
        return str(resp.json()["choices"][0]["message"]["content"])


async def _stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.get(url + "/sim/stats")
        doc: dict[str, Any] = resp.json()
        return doc


async def _held(url: str) -> set[str]:
    """The ids of the streams the member is generating now."""
    try:
        doc = await _stats(url)
    except (httpx.HTTPError, ValueError):
        return set()
    return {
        str(r["request_id"])
        for r in doc.get("requests", ())
        if r.get("stream") and r.get("outcome") == "running" and r.get("request_id")
    }


async def _unfinished(url: str, ids: set[str]) -> set[str]:
    """Of ``ids``, those that did not complete on the member (still running, or aborted by the
    proxy that took them elsewhere)."""
    try:
        doc = await _stats(url)
    except (httpx.HTTPError, ValueError):
        return set(ids)
    done = {
        str(r["request_id"]) for r in doc.get("requests", ()) if r.get("outcome") == "completed"
    }
    return ids - done


async def roll(
    members: Sequence[Member],
    leave: Callable[[str], Awaitable[None]],
    join: Callable[[str], Awaitable[None]],
    *,
    drain_deadline: float,
    back_within: float = 30.0,
    settle: float = 1.0,
) -> list[dict[str, Any]]:
    """Restart each member in turn. Per member: its out-window (monotonic ``left``, ``back``),
    how long it took to empty (``emptied_s``; the deadline when it did not), and ``moved``: the
    ids of the streams it held when it left that did not finish there."""
    windows = []
    for m in members:
        held = await _held(m.url)
        left = time.monotonic()
        await leave(m.url)
        deadline = left + drain_deadline
        while time.monotonic() < deadline:  # every stream it holds meanwhile is counted
            running = await _held(m.url)
            held |= running
            if not running:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    if (await _stats(m.url))["running"] == 0:
                        break
            await asyncio.sleep(0.05)
        emptied = time.monotonic() - left
        moved = await _unfinished(m.url, held)
        await asyncio.to_thread(m.kill)
        await asyncio.to_thread(m.start, 30.0)
        await join(m.url)
        # Back when it takes requests again (its first request after the restart), bounded.
        until = time.monotonic() + back_within
        while time.monotonic() < until:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                if (await _stats(m.url))["total"]:
                    break
            await asyncio.sleep(0.05)
        back = time.monotonic()
        windows.append(
            {"left": left, "back": back, "emptied_s": emptied, "held": len(held), "moved": moved}
        )
        await asyncio.sleep(settle)
    return windows


def pauses(records: Sequence[Record], windows: Sequence[dict[str, Any]]) -> list[float]:
    """Each moved stream's pause (s): its longest gap between two chunks in its member's
    out-window, for the streams that went on (a broken stream has no pause: it ended)."""
    out = []
    for w in windows:
        for r in records:
            if not r.stream or r.rid not in w["moved"] or not r.done or len(r.times) < 2:
                continue
            gaps = [
                b - a for a, b in itertools.pairwise(r.times) if b >= w["left"] and a <= w["back"]
            ]
            if gaps:
                out.append(max(gaps))
    return out


def summary(
    records: Sequence[Record],
    expected: dict[bool, str],
    moves: Sequence[float],
) -> dict[str, Any]:
    """Counts for a report: requests, failed (non-streamed not answered), broken streams, and
    the pause at the move (ms)."""
    posts = [r for r in records if not r.stream]
    streams = [r for r in records if r.stream]
    failed = [r for r in posts if not (r.done and r.text == expected[False])]
    broken = [r for r in streams if not (r.done and not r.error and r.text == expected[True])]
    errors: dict[str, int] = {}
    for r in [*failed, *broken]:
        why = (r.error or "text differs from the unbroken text")[:80]
        errors[why] = errors.get(why, 0) + 1
    ms = sorted(1000 * p for p in moves)
    return {
        "requests": len(records),
        "streams": len(streams),
        "non_streamed": len(posts),
        "failed": len(failed),
        "broken_streams": len(broken),
        "moved_streams": len(ms),
        "pause_ms": {
            "p50": statistics.median(ms) if ms else None,
            "max": ms[-1] if ms else None,
        },
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }


async def kill_one_of_two(
    urls: Sequence[str],
    victim: Member,
    *,
    model: str,
    streams: int,
    tokens: int,
    at: int,
    headers: dict[str, str] | None = None,
    send_ids: bool = True,
) -> tuple[list[Record], dict[str, Any]]:
    """``streams`` streams at once (one URL: a proxy; several: round-robin); once each has ``at``
    chunks, ``victim`` is SIGKILLed. Returns the records and the kill as an out-window for
    ``pauses`` (the streams it was generating are ``moved``)."""
    load = Load(urls, model=model, streams=0, posts=0, stream_tokens=tokens, post_tokens=1,
                headers=headers, send_ids=send_ids, connections=streams + 8)  # fmt: skip
    records = [Record(stream=True, started=time.monotonic()) for _ in range(streams)]
    window: dict[str, Any] = {}

    async def watch() -> None:
        until = time.monotonic() + 120
        while time.monotonic() < until:
            if all(len(r.times) >= at or r.ended for r in records):
                break
            await asyncio.sleep(0.01)
        window["moved"] = await _held(victim.url)
        window["left"] = window["back"] = time.monotonic()
        await asyncio.to_thread(victim.kill)

    async with load:
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(load.one(i, True, records[i]) for i in range(streams)))
        await watcher
    window["held"] = len(window["moved"])
    return records, window
