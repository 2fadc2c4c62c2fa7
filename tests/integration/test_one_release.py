"""One owner, one release: a request's admission place, taken when the request is whole, is given
back exactly once on every path it can take, by the one release in the call's cleanup (or, for a
wait that is not the admission's own, by the place stepping aside before it).

Each test runs the real gateway with one slot and ends with the admission idle: nothing in flight,
nothing queued, no call left. Where it matters, a path is tried both with the slot taken at once
and with the place queued behind a stream that holds the slot. Taking the cleanup's release out of
``ProxyCall.run`` fails every test here but the model check's (whose place stepped aside first);
taking it out of ``step_aside`` fails that one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway, chat_body, run_gateway, wait_for
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"


def _settings(simulator: Simulator, **changes: Any) -> Settings:
    given: dict[str, Any] = {"max_queued_requests": 4, "queue_wait_timeout": 5.0, **changes}
    return Settings(backend_urls=(simulator.url,), max_concurrent_requests=1, **given)


async def _idle(gw: RunningGateway) -> None:
    """The admission is back where it started: nothing held, nothing queued, no call left."""
    adm = gw.gateway.admission
    await wait_for(lambda: not gw.gateway.active, timeout=5)
    assert (adm.in_flight, adm.queued) == (0, 0)


@contextlib.asynccontextmanager
async def _slot_held(client: httpx.AsyncClient, gw: RunningGateway) -> AsyncIterator[None]:
    """A stream that holds the one slot for the block (its client leaves at the end)."""
    body = chat_body(stream=True, max_tokens=400)
    async with client.stream("POST", gw.url + CHAT, json=body) as held:
        assert held.status_code == 200
        raw = held.aiter_raw()  # kept: a dropped iterator would close the stream
        await anext(raw)
        assert gw.gateway.admission.in_flight == 1
        yield


@pytest.fixture
async def sim(simulator: Simulator) -> Simulator:
    simulator.configure(tokens=400, itl=0.01)  # the holding stream lasts 4 s; others are short
    return simulator


@pytest.mark.parametrize("queued", [False, True])
async def test_refused_at_validation(sim: Simulator, queued: bool) -> None:
    async with run_gateway(_settings(sim)) as gw, httpx.AsyncClient(timeout=10) as client:
        if queued:
            async with _slot_held(client, gw):
                bad = await client.post(gw.url + CHAT, content=b'{"model": "sim-model"')
                assert (gw.gateway.admission.in_flight, gw.gateway.admission.queued) == (1, 0)
        else:
            bad = await client.post(gw.url + CHAT, content=b'{"model": "sim-model"')
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_json"
        await _idle(gw)


@pytest.mark.parametrize("queued", [False, True])
async def test_refused_at_the_model_check(sim: Simulator, queued: bool) -> None:
    async with run_gateway(_settings(sim)) as gw, httpx.AsyncClient(timeout=10) as client:
        await wait_for(lambda: gw.gateway.models.ids is not None, timeout=5)
        if queued:
            async with _slot_held(client, gw):
                unknown = await client.post(gw.url + CHAT, json=chat_body(model="no-such-model"))
                assert (gw.gateway.admission.in_flight, gw.gateway.admission.queued) == (1, 0)
        else:
            unknown = await client.post(gw.url + CHAT, json=chat_body(model="no-such-model"))
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error"]["type"] == "model_not_found"
        await _idle(gw)


async def test_a_model_checked_late_takes_its_place_again_and_gives_it_back(
    sim: Simulator,
) -> None:
    async with run_gateway(_settings(sim)) as gw, httpx.AsyncClient(timeout=10) as client:
        models = gw.gateway.models
        await wait_for(lambda: models.ids is not None, timeout=5)
        models.ids = frozenset()  # the list is stale: the model is checked again, and found
        models._fetched_at = -1e9
        answer = await client.post(gw.url + CHAT, json=chat_body(max_tokens=2))
        assert answer.status_code == 200, answer.text
        await _idle(gw)


@pytest.mark.parametrize("queued", [False, True])
async def test_refused_by_the_rate_limit(sim: Simulator, queued: bool) -> None:
    async with (
        run_gateway(_settings(sim, rate_limit_rpm=1)) as gw,
        httpx.AsyncClient(timeout=10) as client,
    ):
        if queued:
            async with _slot_held(client, gw):  # the one request of this minute
                limited = await client.post(gw.url + CHAT, json=chat_body(max_tokens=2))
                assert (gw.gateway.admission.in_flight, gw.gateway.admission.queued) == (1, 0)
        else:
            first = await client.post(gw.url + CHAT, json=chat_body(max_tokens=2))
            assert first.status_code == 200
            limited = await client.post(gw.url + CHAT, json=chat_body(max_tokens=2))
        assert limited.status_code == 429, limited.text
        await _idle(gw)


async def test_a_client_gone_while_queued(sim: Simulator) -> None:
    async with run_gateway(_settings(sim)) as gw, httpx.AsyncClient(timeout=10) as client:
        adm = gw.gateway.admission
        async with _slot_held(client, gw):
            waiting = asyncio.create_task(client.post(gw.url + CHAT, json=chat_body()))
            await wait_for(lambda: adm.queued == 1, timeout=5)
            waiting.cancel()  # the client closes its connection while its place queues
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await wait_for(lambda: adm.queued == 0, timeout=5)
            assert adm.in_flight == 1  # the holder's
        await _idle(gw)


async def test_a_queue_timeout(sim: Simulator) -> None:
    async with (
        run_gateway(_settings(sim, queue_wait_timeout=0.3)) as gw,
        httpx.AsyncClient(timeout=10) as client,
    ):
        async with _slot_held(client, gw):
            late = await client.post(gw.url + CHAT, json=chat_body())
            assert late.status_code == 503 and late.json()["error"]["type"] == "queue_timeout"
            assert gw.gateway.admission.queued == 0
        await _idle(gw)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("queued", [False, True])
async def test_success(sim: Simulator, queued: bool, stream: bool) -> None:
    async with run_gateway(_settings(sim)) as gw, httpx.AsyncClient(timeout=10) as client:
        body = chat_body(stream=stream, max_tokens=2)
        if queued:
            async with _slot_held(client, gw):
                answer = asyncio.create_task(client.post(gw.url + CHAT, json=body))
                await wait_for(lambda: gw.gateway.admission.queued == 1, timeout=5)
            # The holder left: the slot passed to the queued place.
            done = await answer
        else:
            done = await client.post(gw.url + CHAT, json=body)
        assert done.status_code == 200, done.text
        assert gw.gateway.admission.admitted_total == (2 if queued else 1)
        await _idle(gw)


async def test_a_stream_error(sim: Simulator) -> None:
    sim.configure(drop_after=2)  # the backend drops the stream after its second event
    async with run_gateway(_settings(sim)) as gw, httpx.AsyncClient(timeout=10) as client:
        cut = await client.post(gw.url + CHAT, json=chat_body(stream=True, max_tokens=20))
        assert cut.status_code == 200
        assert '"error"' in cut.text and "[DONE]" not in cut.text
        await _idle(gw)
