"""What the ``cache`` scenario asks each member (a simulator or a real vLLM) between rounds.

``snapshot`` reads a member's ``/metrics``: the prefix cache counters
(``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total``, in tokens) and the
finished requests (``vllm:request_success_total``), each summed over its label sets. ``reset``
empties the member's prefix cache with ``POST /reset_prefix_cache`` (a dev route: a real vLLM needs
``VLLM_SERVER_DEV_MODE=1``; it refuses while blocks are held, so it is retried). One request per
call, on its own connection, parsed with ``httptools``: no client library is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
import orjson

__all__ = ["Snapshot", "call", "parse_metrics", "reset", "snapshot"]

QUERIES = "vllm:prefix_cache_queries_total"
HITS = "vllm:prefix_cache_hits_total"
REQUESTS = "vllm:request_success_total"


class _Response:
    def __init__(self) -> None:
        self.body = bytearray()
        self.done = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def call(
    url: str, method: str, path: str, *, api_key: str | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One request to ``url`` + ``path`` (no body). Returns (status, body); raises ``OSError`` or
    ``TimeoutError`` when the member cannot be reached."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    base = parts.path.rstrip("/")
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"{method} {base}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(head.encode("latin-1"))
            response = _Response()
            parser = httptools.HttpResponseParser(response)
            while not response.done:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed_data(data)
            return parser.get_status_code(), bytes(response.body)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def parse_metrics(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each of ``names`` summed over its label sets (0 when absent) from Prometheus text."""
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            with contextlib.suppress(ValueError):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A member's counters at one moment."""

    queries: float = 0.0
    hits: float = 0.0
    requests: float = 0.0

    def __sub__(self, other: Snapshot) -> Snapshot:
        return Snapshot(
            self.queries - other.queries, self.hits - other.hits, self.requests - other.requests
        )


async def snapshot(url: str, *, api_key: str | None = None) -> Snapshot:
    status, body = await call(url, "GET", "/metrics", api_key=api_key)
    if status != 200:
        raise OSError(f"{url}/metrics answered {status}")
    m = parse_metrics(body.decode("utf-8", "replace"), (QUERIES, HITS, REQUESTS))
    return Snapshot(m[QUERIES], m[HITS], m[REQUESTS])


async def reset(url: str, *, api_key: str | None = None, attempts: int = 20) -> None:
    """Empty ``url``'s prefix cache; raises ``OSError`` when it will not."""
    for _ in range(attempts):
        status, body = await call(url, "POST", "/reset_prefix_cache", api_key=api_key)
        if status == 404:
            raise OSError(
                f"{url}: no /reset_prefix_cache (a real vLLM needs VLLM_SERVER_DEV_MODE=1)"
            )
        ok = False
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            ok = status == 200 and (not body or orjson.loads(body).get("success") is not False)
        if ok:
            return
        await asyncio.sleep(0.25)  # vLLM refuses while running requests hold blocks
    raise OSError(f"{url}: POST /reset_prefix_cache did not succeed ({status} {body[:200]!r})")
