"""Failover against the real engine: one vLLM CPU server reached through two pool members, one of
them through a small proxy that cuts the connection after N events of a stream. With greedy
decoding, the failed-over answer equals the unbroken one token for token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import run_gateway, sse_blocks, wait_for
from tests.vllm.conftest import VllmServer
from vllm_gateway.settings import Settings


class CuttingProxy:
    """Forwards to vLLM; the response to a streamed request is cut after ``cut`` SSE events."""

    def __init__(self, target: str, cut: int) -> None:
        parts = urlsplit(target)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.cut = cut
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        upward = asyncio.create_task(self._pipe(reader, up_writer))
        events = 0
        streaming = False
        try:
            while data := await up_reader.read(65536):
                if b"text/event-stream" in data:
                    streaming = True
                if streaming:
                    events += data.count(b"\n\n")
                    if events >= self.cut:
                        self.cuts += 1
                        break  # the member dies mid-stream
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            upward.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upward
            up_writer.transport.abort()
            writer.transport.abort()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CuttingProxy]:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield self
        finally:
            self._server.close()
            for task in list(self._tasks):  # pool connections the gateway left open
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()


def _answer(raw: bytes) -> tuple[str, list[Any]]:
    chunks = [orjson.loads(e[6:]) for e in sse_blocks(raw) if e.startswith(b"data: {")]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    return text, chunks


async def _stream(url: str, body: dict[str, Any]) -> bytes:
    async with (
        httpx.AsyncClient(timeout=300) as client,
        client.stream("POST", url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        return b"".join([c async for c in resp.aiter_raw()])


@pytest.mark.parametrize("cut", [4, 11])
async def test_a_failed_over_greedy_answer_equals_the_unbroken_one(
    vllm_server: VllmServer, tmp_path: Path, cut: int
) -> None:
    body = {
        "model": vllm_server.model,
        "messages": [{"role": "user", "content": "Name five fruits, one per line."}],
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    settings = Settings(
        backend_urls=(vllm_server.url,), request_timeout=300.0, first_token_timeout=290.0
    )
    async with run_gateway(settings) as gw:
        unbroken, unbroken_chunks = _answer(await _stream(gw.url, body))
    proxy = CuttingProxy(vllm_server.url, cut)
    async with proxy.running():
        path = tmp_path / "backends.yaml"
        path.write_text(
            "backends:\n"
            f"  - url: {proxy.url}\n    name: cut\n    weight: 100\n"
            f"  - url: {vllm_server.url}\n    name: whole\n"
        )
        async with run_gateway(settings.replace(backend_urls=(), backends_file=str(path))) as gw:
            raw = await _stream(gw.url, body)
            await wait_for(lambda: gw.gateway.admission.in_flight == 0)
            metrics = gw.app.observer.metrics.render()
    assert proxy.cuts == 1
    text, chunks = _answer(raw)
    assert raw.rstrip().endswith(b"data: [DONE]") and raw.count(b"[DONE]") == 1
    assert text == unbroken  # token for token: the same greedy answer
    assert len({c["id"] for c in chunks}) == 1
    assert (
        chunks[-1]["usage"]["completion_tokens"]
        == unbroken_chunks[-1]["usage"]["completion_tokens"]
    )
    assert chunks[-1]["usage"]["prompt_tokens"] == unbroken_chunks[-1]["usage"]["prompt_tokens"]
    assert 'reason="connection_lost",outcome="resumed"} 1' in metrics
