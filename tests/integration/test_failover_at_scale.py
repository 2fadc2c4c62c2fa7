"""Failover under load, with the gateway's default settings: a member's death in a pool of two
breaks no stream, and the death of every member at once ends every stream with its error event
while the extra requests sent upstream stay within streams x ``pool_failover_max``.

Regression: continuations used to take tokens of the pool's retry budget (20% of the last 10 s of
requests), so when one of two members died with 64 streams open only about 15 of its 32 streams
went on; the rest ended with an error event.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest

from tests.conftest import run_gateway, wait_for
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator
from vllm_gateway_tools.soak import SimulatorProcess

pytestmark = pytest.mark.timeout(180)

STREAMS = 64
TOKENS = 256  # 5 s a stream at 20 ms a token: still generating when the member dies
# The answers' end of text lies past TOKENS: a continuation ends there, and the unbroken chat
# answer writes its whole max_tokens.
EOS = ("--tokens", str(2 * TOKENS))


def _body(i: int) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": f"stream {i}"}],
        "stream": True,
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }


_ID = re.compile(rb'"id":"[^"]*"')
_CREATED = re.compile(rb'"created":\d+')


def _normal(raw: bytes) -> bytes:
    """A stream's bytes with its own id and timestamp blanked (the rest is the generation's)."""
    return _CREATED.sub(b'"created":0', _ID.sub(b'"id":"x"', raw))


class Streams:
    """``STREAMS`` concurrent streams; ``ready`` is set once each has relayed ``at`` tokens."""

    def __init__(self, url: str, at: int) -> None:
        self.url = url
        self.at = at
        self.seen = [0] * STREAMS
        self.ready = asyncio.Event()

    async def one(self, client: httpx.AsyncClient, i: int) -> bytes:
        raw = b""
        async with client.stream("POST", self.url + "/v1/chat/completions", json=_body(i)) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_raw():
                raw += chunk
                self.seen[i] = raw.count(b'"content":" tok')
                if min(self.seen) >= self.at:
                    self.ready.set()
        return raw

    async def run(self) -> tuple[asyncio.Future[list[bytes]], httpx.AsyncClient]:
        client = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=STREAMS))
        gathered = asyncio.gather(*(self.one(client, i) for i in range(STREAMS)))
        return gathered, client


async def _unbroken(url: str) -> list[bytes]:
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int) -> bytes:
            resp = await client.post(url + "/v1/chat/completions", json=_body(i))
            assert resp.status_code == 200
            return _normal(resp.content)

        return await asyncio.gather(*(one(i) for i in range(STREAMS)))


async def test_one_of_two_members_killed_under_64_streams_breaks_none_with_defaults() -> None:
    pace = ("--ttft", "0.02", "--itl", "0.02", *EOS)
    with SimulatorProcess(*pace) as first, SimulatorProcess(*pace) as second:
        async with run_gateway(Settings(backend_urls=(first.url, second.url))) as gw:
            expected = await _unbroken(gw.url)
            streams = Streams(gw.url, at=8)
            gathered, client = await streams.run()
            async with client:
                await asyncio.wait_for(streams.ready.wait(), 60)
                pool = gw.gateway.backend
                assert isinstance(pool, PoolBackend)
                held = sum(m.in_flight for m in pool.members if m.url == first.url)
                first.kill()  # SIGKILL, mid-stream for every stream it holds
                results = await gathered
            metrics = gw.app.observer.metrics.render()
            await wait_for(lambda: gw.gateway.admission.in_flight == 0)
    assert held >= STREAMS // 4  # least outstanding gave the victim its share
    broken = [i for i, raw in enumerate(results) if _normal(raw) != expected[i]]
    assert broken == []  # 64 of 64, each byte for byte the unbroken stream
    # Each stream the victim held went on once (reasons: connection_lost, or ejected once the
    # drops in a row took it out of the pool, which drops its other streams at once).
    resumed = re.findall(
        r'vllm_gateway_failovers_total\{reason="[a-z_]+",outcome="resumed"\} (\d+)', metrics
    )
    assert sum(map(int, resumed)) == held
    assert 'outcome="not_continued' not in metrics


@pytest.mark.parametrize("eject_after", [None, 1000])
async def test_every_member_failing_at_once_ends_each_stream_and_bounds_the_extra_requests(
    eject_after: int | None,
) -> None:
    # Three members that each drop every stream they serve after a few chunks, continuations too:
    # every member fails at once, for every stream, however often it is asked. With the defaults
    # the drops soon eject every member (no member left to go on on); with ejection put off
    # (1000 failures in a row), each stream goes on on each other member: the bound itself.
    config = SimulatorConfig(ttft=0.01, itl=0.01, drop_after=6, tokens=2 * TOKENS)
    async with (
        run_simulator(config) as a,
        run_simulator(config) as b,
        run_simulator(config) as c,
    ):
        settings = Settings(backend_urls=(a.url, b.url, c.url))
        if eject_after is not None:
            settings = settings.replace(
                pool=settings.pool.replace(eject_after_failures=eject_after)
            )
        async with run_gateway(settings) as gw:
            streams = Streams(gw.url, at=0)
            gathered, client = await streams.run()
            async with client:
                results = await gathered
            await wait_for(lambda: gw.gateway.admission.in_flight == 0)
            metrics = gw.app.observer.metrics.render()
        failover_max = settings.pool.failover_max
        sent = sum(s.stats()["total"] for s in (a, b, c))
    for raw in results:
        assert b"data: [DONE]" not in raw
        assert raw.rstrip().endswith(b"}") and b'"error"' in raw.rsplit(b"data: ", 1)[-1]
    assert sent <= STREAMS * (1 + failover_max)  # nothing resent past each stream's limit
    if eject_after is not None:
        assert sent == STREAMS * (1 + failover_max)  # and the bound is reached: it is the one
        assert f'outcome="resumed"}} {STREAMS * failover_max}' in metrics.replace(
            'reason="connection_lost",', ""
        )


async def test_every_member_sigkilled_at_once_ends_each_stream_with_its_error_event() -> None:
    pace = ("--ttft", "0.02", "--itl", "0.02", *EOS)
    with SimulatorProcess(*pace) as first, SimulatorProcess(*pace) as second:
        async with run_gateway(Settings(backend_urls=(first.url, second.url))) as gw:
            streams = Streams(gw.url, at=8)
            gathered, client = await streams.run()
            async with client:
                await asyncio.wait_for(streams.ready.wait(), 60)
                first.kill()
                second.kill()
                results = await gathered
            await wait_for(lambda: gw.gateway.admission.in_flight == 0)
    for raw in results:
        assert b"data: [DONE]" not in raw
        last = raw.rstrip().rsplit(b"data: ", 1)[-1]
        assert b'"error"' in last and b"backend_unavailable" in last
