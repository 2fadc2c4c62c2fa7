"""A rolling restart of every member of a pool of three, one at a time, under steady load, done as
an operator does it: drain through the admin API, wait until the member holds nothing or its drain
deadline passes (then its streams go on elsewhere, token-exact), kill it, start it again on the
same port, undrain it. No request fails and no stream breaks: every stream's text is the unbroken
greedy text. The pause each moved stream saw is printed (a figure for the report, not a bound);
``vllm-gateway bench --scenario rollout`` measures it against peers.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict

import httpx
import pytest

from tests.conftest import run_gateway, wait_for
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.settings import PoolSettings, Settings
from vllm_gateway_tools.bench.rollout import (
    Load,
    kill_one_of_two,
    pauses,
    roll,
    summary,
    unbroken_text,
)
from vllm_gateway_tools.bench.rollout_scenario import PRESET, markdown
from vllm_gateway_tools.soak import SimulatorProcess

pytestmark = pytest.mark.timeout(240)

PACE = 0.02  # the members' time to first token and between tokens (s)
STREAM_TOKENS = 200  # 4 s a stream: longer than the drain deadline, so some streams move
POST_TOKENS = 8
DRAIN = 1.5
# The members' answers end at their budget, not at an earlier end of text: the simulator's chat
# route writes max_tokens whatever its --tokens, and a continuation ends where the answer's own
# end of text is (--tokens in all), so that must lie beyond every budget.
NO_EARLY_EOS = ("--tokens", "4096")
ADMIN = {"Authorization": "Bearer admin-key"}


async def test_a_rolling_restart_of_every_member_under_load_fails_nothing() -> None:
    pace = ("--ttft", str(PACE), "--itl", str(PACE), *NO_EARLY_EOS)
    with (
        SimulatorProcess(*pace) as a,
        SimulatorProcess(*pace) as b,
        SimulatorProcess(*pace) as c,
    ):
        members = [a, b, c]
        settings = Settings(
            backend_urls=tuple(m.url for m in members),
            admin_api_keys=frozenset({"admin-key"}),
            pool=PoolSettings(
                health_interval=0.1, health_timeout=0.5, slow_start=1.0, drain_timeout=DRAIN
            ),
        )
        expected = {
            True: await unbroken_text(a.url, "sim-model", STREAM_TOKENS),
            False: await unbroken_text(a.url, "sim-model", POST_TOKENS),
        }
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=30) as admin:
            pool = gw.gateway.backend
            assert isinstance(pool, PoolBackend)
            base = gw.url + "/admin/backends"

            async def leave(url: str) -> None:
                resp = await admin.post(base + "/drain", headers=ADMIN, json={"url": url})
                assert resp.status_code == 200 and resp.json()["state"] == "draining"

            async def join(url: str) -> None:
                resp = await admin.post(base + "/undrain", headers=ADMIN, json={"url": url})
                assert resp.status_code == 200
                await wait_for(lambda: pool.fleet.find(url).state == "ready", timeout=30)

            load = Load(
                [gw.url],
                model="sim-model",
                streams=6,
                posts=2,
                stream_tokens=STREAM_TOKENS,
                post_tokens=POST_TOKENS,
                send_ids=False,  # the gateway names each request; its members see that name
            )
            async with load:
                await asyncio.sleep(1.0)  # every worker under way
                windows = await roll(members, leave, join, drain_deadline=DRAIN + 5.0)
            await wait_for(lambda: gw.gateway.admission.in_flight == 0)
            metrics = gw.app.observer.metrics.render()
            served_after = [m.url for m in members if (await _total(m.url)) > 0]
    moves = pauses(load.records, windows)
    got = summary(load.records, expected, moves)
    print(f"\nrolling restart of 3 members: {got}")  # the pause at each move: a figure, not a bound
    assert got["streams"] >= 12 and got["non_streamed"] >= 12
    assert got["failed"] == 0 and got["broken_streams"] == 0, got["errors"]
    # The drain deadline passed with streams open: they went on elsewhere, each once.
    resumed = re.findall(r'vllm_gateway_failovers_total\{[^}]*outcome="resumed"\} (\d+)', metrics)
    assert sum(map(int, resumed)) >= 1
    assert got["moved_streams"] == sum(map(int, resumed))  # the streams moved are those counted
    assert 'outcome="not_continued' not in metrics
    assert served_after == [m.url for m in members]  # each took traffic again after its restart


async def _total(url: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        return int((await client.get(url + "/sim/stats")).json()["total"])


async def test_the_benchmark_counts_a_killed_members_streams_as_broken_without_a_proxy() -> None:
    # The rollout scenario's accounting, on its "direct (round-robin)" column: with no proxy the
    # streams a SIGKILLed member held break, each is counted, and the others are complete.
    pace = ("--ttft", str(PACE), "--itl", str(PACE), *NO_EARLY_EOS)
    with SimulatorProcess(*pace) as a, SimulatorProcess(*pace) as b:
        expected = {True: await unbroken_text(a.url, "sim-model", 100), False: ""}
        records, window = await kill_one_of_two(
            [a.url, b.url], a, model="sim-model", streams=8, tokens=100, at=4
        )
    got = summary(records, expected, pauses(records, [window]))
    assert window["held"] == 4  # round-robin: half of them
    assert got["broken_streams"] == 4 and got["moved_streams"] == 0
    broken = {r.rid for r in records if not r.done}
    assert broken == window["moved"]  # exactly the killed member's streams
    doc = {
        "config": {**asdict(PRESET), "router_bin": None},
        "targets": {
            "direct (round-robin)": {
                "available": True,
                "rolling_restart": got,
                "kill_one_of_two": got,
            },
            "vllm-router": {"available": False, "reason": "no vllm-router binary"},
        },
    }
    report = markdown(doc)
    assert "| kill one of two | broken streams | 4 | n/a |" in report
    assert "vllm-router: not run: no vllm-router binary" in report
