"""Where a pool's members come from at run time, with real servers on loopback: the backends file
(re-read when it changes and on SIGHUP, with --workers too) and the admin API; and where their
states show (/metrics, the status data, the access log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    GatewayProcess,
    RunningGateway,
    chat_body,
    run_gateway,
    spawn_gateway,
    wait_for,
)
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.file_source import MIN_GAP
from vllm_gateway.edge.admin import SharedMembers
from vllm_gateway.proxy.shared_admission import RemoteAdmission
from vllm_gateway.settings import PoolSettings, Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.timeout(240)

PACE = SimulatorConfig(ttft=0.01, itl=0.005, tokens=4)
FAST = PoolSettings(health_interval=0.1, health_timeout=0.5, slow_start=0.0, drain_timeout=2.0)
ADMIN = {"Authorization": "Bearer admin-key"}


def _write(path: Path, urls: list[str]) -> None:
    """Write-then-rename: the reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("backends:\n" + "".join(f"  - url: {u}\n" for u in urls))
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def sims(n: int) -> AsyncIterator[list[Simulator]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(run_simulator(PACE)) for _ in range(n)]


@contextlib.asynccontextmanager
async def file_gateway(
    path: Path, poll: float = 0.1, **extra: Any
) -> AsyncIterator[tuple[RunningGateway, PoolBackend]]:
    settings = Settings(
        backends_file=str(path), backend_urls=(), backends_file_poll=poll, pool=FAST, **extra
    )
    async with run_gateway(settings) as gw:
        pool = gw.gateway.backend
        assert isinstance(pool, PoolBackend)
        yield gw, pool


def _states(pool: PoolBackend) -> dict[str, str]:
    return {d["url"]: d["state"] for d in pool.fleet.describe()}


# --- the backends file -----------------------------------------------------------------------


async def test_a_changed_backends_file_is_applied_under_traffic(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    async with sims(3) as (a, b, c):
        _write(path, [a.url, b.url])
        async with file_gateway(path) as (gw, pool), httpx.AsyncClient(timeout=30) as client:
            stop = asyncio.Event()
            statuses: list[int] = []

            async def traffic() -> None:
                while not stop.is_set():
                    resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body())
                    statuses.append(resp.status_code)

            load = asyncio.create_task(traffic())
            await wait_for(lambda: len(statuses) >= 5)
            _write(path, [b.url, c.url])
            await wait_for(lambda: _states(pool).get(c.url) == "ready")
            await wait_for(lambda: _states(pool).get(a.url) == "gone")
            count = len(statuses)
            await wait_for(lambda: len(statuses) >= count + 10)
            stop.set()
            await load
    assert set(statuses) == {200}
    assert c.stats()["total"] > 0
    assert [m.source for m in pool.fleet.members] == ["file", "file"]


async def test_a_bad_backends_file_keeps_the_old_set_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "backends.yaml"
    async with sims(2) as (a, b):
        _write(path, [a.url, b.url])
        async with file_gateway(path) as (_, pool):
            source = pool.file
            assert source is not None
            with caplog.at_level(logging.WARNING, logger="vllm_gateway.backends.pool.backend"):
                path.write_text("backends:\n  - url: ftp://nowhere\n")
                await wait_for(lambda: source.errors >= 1)
                reads = source.reads
                pool.reload()  # a SIGHUP: read again, the same bad contents
                await wait_for(lambda: source.reads > reads)
            lines = [r.getMessage() for r in caplog.records if "keeping" in r.getMessage()]
            assert len(lines) == 1
            assert "backend #1" in lines[0] and "'url'" in lines[0]
            assert _states(pool) == {a.url: "ready", b.url: "ready"}
            _write(path, [a.url])  # fixed: applied
            await wait_for(lambda: _states(pool).get(b.url) == "gone")


async def test_a_file_rewritten_100_times_a_second_costs_a_bounded_number_of_reads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "backends.yaml"
    async with sims(3) as (a, b, c):
        _write(path, [a.url, b.url])
        async with file_gateway(path, poll=0.05) as (_, pool):
            source = pool.file
            assert source is not None
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(100):
                _write(path, [a.url, b.url] if i % 2 else [a.url, c.url])
                pool.reload()  # a SIGHUP with each write, too
                await asyncio.sleep(0.01)
            elapsed = loop.time() - start
            # At most one read per MIN_GAP, whatever the writer does.
            assert source.reads <= elapsed / MIN_GAP + 2, (source.reads, elapsed)
            assert len(pool.fleet.members) <= 3


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_rereads_the_backends_file(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "backends.yaml"
    async with sims(3) as (a, b, c):
        _write(path, [a.url, b.url])
        env = {
            "VLLM_BACKENDS_FILE": str(path),
            "VLLM_BACKENDS_FILE_POLL_SECONDS": "3600",  # only the signal reads it
            "VLLM_POOL_HEALTH_INTERVAL_SECONDS": "0.1",
            "VLLM_POOL_SLOW_START_SECONDS": "0",
            "VLLM_ADMIN_API_KEYS": "admin-key",
            "VLLM_WORKERS": str(workers),
        }
        with spawn_gateway(env, name=f"sighup-{workers}") as gw:
            # Generous: on a loaded host the workers may take many seconds to start accepting.
            async with httpx.AsyncClient(timeout=60) as client:

                async def urls() -> set[str]:
                    # A new connection each time: with workers, any of them may answer.
                    resp = await client.get(
                        gw.url + "/admin/backends", headers={**ADMIN, "Connection": "close"}
                    )
                    assert resp.status_code == 200, resp.text
                    return {d["url"] for d in resp.json()["data"] if d["state"] == "ready"}

                # Every worker serving (and so taking SIGHUP) before the file changes.
                seen = 0
                for _ in range(400):
                    seen = seen + 1 if await urls() == {a.url, b.url} else 0
                    if seen >= 4 * workers:
                        break
                    await asyncio.sleep(0.05)
                assert seen >= 4 * workers, gw.log()
                _write(path, [a.url, b.url, c.url])
                gw.terminate(signal.SIGHUP)
                seen = 0
                for _ in range(400):
                    seen = seen + 1 if await urls() == {a.url, b.url, c.url} else 0
                    if seen >= 4 * workers:  # every worker, asked again and again, says so
                        break
                    await asyncio.sleep(0.05)
                assert seen >= 4 * workers, gw.log()
                resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body())
                assert resp.status_code == 200
            assert gw.process.poll() is None  # SIGHUP did not end anything


# --- the admin API ---------------------------------------------------------------------------


async def test_the_admin_api_lists_adds_drains_undrains_and_removes_members() -> None:
    async with sims(3) as (a, b, c):
        settings = Settings(
            backend_urls=(a.url, b.url),
            admin_api_keys=frozenset({"admin-key"}),
            api_keys=frozenset({"client-key"}),
            pool=FAST.replace(max_members=3),
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=10) as client:
            base = gw.url + "/admin/backends"
            # Closed to everyone but the admin key.
            assert (await client.get(base)).status_code == 403
            client_key = {"Authorization": "Bearer client-key"}
            assert (await client.get(base, headers=client_key)).status_code == 403
            resp = await client.get(base, headers=ADMIN)
            assert resp.status_code == 200
            assert {d["url"]: d["state"] for d in resp.json()["data"]} == {
                a.url: "ready",
                b.url: "ready",
            }
            # Add: it joins, then is ready.
            resp = await client.post(base, headers=ADMIN, json={"url": c.url})
            assert resp.status_code == 201 and resp.json()["state"] == "joining"
            pool = gw.gateway.backend
            assert isinstance(pool, PoolBackend)
            await wait_for(lambda: _states(pool)[c.url] == "ready")
            # The cap.
            resp = await client.post(base, headers=ADMIN, json={"url": "http://127.0.0.1:9"})
            assert resp.status_code == 409 and "holds 3 members" in resp.json()["error"]["message"]
            # Drain and undrain.
            resp = await client.post(base + "/drain", headers=ADMIN, json={"url": a.url})
            assert resp.status_code == 200 and resp.json()["state"] == "draining"
            before = a.stats()["total"]
            for _ in range(4):
                r = await client.post(
                    gw.url + "/v1/chat/completions", json=chat_body(), headers=client_key
                )
                assert r.status_code == 200
            assert a.stats()["total"] == before
            resp = await client.post(base + "/undrain", headers=ADMIN, json={"url": a.url})
            assert resp.status_code == 200
            await wait_for(lambda: _states(pool)[a.url] == "ready")
            # Remove: drained, then gone.
            resp = await client.delete(base, headers=ADMIN, params={"url": c.url})
            assert resp.status_code == 200 and resp.json()["state"] == "draining"
            await wait_for(lambda: _states(pool)[c.url] == "gone")
            # Bad input: a clear 4xx, nothing changed.
            bad = await client.post(base, headers=ADMIN, json={"url": "ftp://x"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
            bad = await client.post(base, headers=ADMIN, content=b"{not json")
            assert bad.status_code == 400
            missing = await client.post(base + "/drain", headers=ADMIN, json={"url": "http://x:1"})
            assert missing.status_code == 404
            assert {m.url for m in pool.fleet.members} == {a.url, b.url}


def _worker_of(parent: int, port: int, client_port: int) -> int:
    """The worker process (a child of ``parent``) holding the gateway's end of the connection
    from ``client_port``: its socket's inode, from /proc/net/tcp, among the children's fds."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{client_port:04X}"
    inodes = [
        f[9]
        for f in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if f[1] == local and f[2] == remote
    ]
    assert inodes, "the gateway's end of the connection is not in /proc/net/tcp"
    target = f"socket:[{inodes[0]}]"
    children = [
        int(pid)
        for task in Path(f"/proc/{parent}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    for child in children:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{child}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return child
    raise AssertionError(f"no worker of {parent} holds {target}")


async def _chat(gw: GatewayProcess) -> int:
    """One request on a fresh connection; the pid of the worker that answered it."""
    port = int(gw.url.rsplit(":", 1)[1])
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", gw.url + "/v1/chat/completions", json=chat_body()) as resp,
    ):
        await resp.aread()
        assert resp.status_code == 200, resp.text
        client_port = resp.extensions["network_stream"].get_extra_info("client_addr")[1]
        return _worker_of(gw.process.pid, port, client_port)


async def _admin(gw: GatewayProcess, op: str, url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        resp = await client.post(f"{gw.url}/admin/backends/{op}", headers=ADMIN, json={"url": url})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def _spread(gw: GatewayProcess, sim: Simulator, each: int) -> dict[int, list[int]]:
    """Requests on fresh connections until every worker has answered ``each`` of them (at most
    400): per worker pid, how many of its requests reached ``sim``, one by one."""
    reached: dict[int, list[int]] = {}
    for _ in range(400):
        before = sim.stats()["total"]
        pid = await _chat(gw)
        reached.setdefault(pid, []).append(sim.stats()["total"] - before)
        if len(reached) >= 2 and all(len(v) >= each for v in reached.values()):
            break
    assert len(reached) >= 2 and all(len(v) >= each for v in reached.values()), reached
    return reached


async def test_an_admin_drain_reaches_every_worker_and_outlives_a_worker_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "backends.yaml"
    async with sims(2) as (a, b):
        _write(path, [a.url, b.url])
        env = {
            "VLLM_BACKENDS_FILE": str(path),
            "VLLM_POOL_HEALTH_INTERVAL_SECONDS": "0.1",
            "VLLM_POOL_SLOW_START_SECONDS": "0",
            "VLLM_ADMIN_API_KEYS": "admin-key",
            "VLLM_WORKERS": "2",
        }
        with spawn_gateway(env, name="admin-workers") as gw:
            # Both workers serving, both members taking requests from each of them.
            reached = await _spread(gw, a, each=1)
            for _ in range(20):
                if all(sum(v) for v in reached.values()):
                    break
                reached = await _spread(gw, a, each=4)
            assert all(sum(v) for v in reached.values()), reached

            drained = await _admin(gw, "drain", a.url)
            assert drained["state"] == "draining"
            assert drained["workers"] == {"applied": 2, "of": 2}
            # From the moment the drain returned, no request of either worker reaches it.
            reached = await _spread(gw, a, each=5)
            assert all(v == [0] * len(v) for v in reached.values()), reached

            undrained = await _admin(gw, "undrain", a.url)
            assert undrained["workers"] == {"applied": 2, "of": 2}
            # Back in both: each worker sends it requests again.
            for _ in range(20):
                reached = await _spread(gw, a, each=4)
                if all(sum(v) for v in reached.values()):
                    break
            assert all(sum(v) for v in reached.values()), reached

            # Drained again, then one worker killed: the one started in its place keeps it.
            await _admin(gw, "drain", a.url)
            victim = next(iter(reached))
            os.kill(victim, signal.SIGKILL)
            reached = {}
            for _ in range(40):
                reached = await _spread(gw, a, each=5)
                if victim not in reached and len(reached) >= 2:
                    break
            assert victim not in reached and len(reached) >= 2, reached
            assert all(v == [0] * len(v) for v in reached.values()), reached
            assert b.stats()["total"] > 0
            assert "restarting it" in gw.log()


async def test_a_replayed_drain_of_a_member_not_there_yet_is_applied_as_it_joins() -> None:
    # A restarted worker whose pool comes from DNS holds none of its members at start: a drain
    # it is told then waits for the member to join, and takes it before any request can.
    async with sims(3) as (a, b, c):
        settings = Settings(backend_urls=(a.url, c.url), pool=FAST.replace(max_members=3))
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=10) as client:
            pool = gw.gateway.backend
            assert isinstance(pool, PoolBackend)
            remote = RemoteAdmission(4, 4, 5.0)  # fed as the supervisor feeds a new worker
            members = SharedMembers(pool.fleet, remote)
            task = asyncio.create_task(members.run())
            try:
                assert remote.on_members is not None
                remote.on_members(["O", 0, "drain", b.url])
                remote.on_members(["Y"])
                await asyncio.wait_for(members.synced.wait(), 10)
                assert b.url not in _states(pool)
                await pool.fleet.add(b.url, "dns")  # as discovery adds it
                await wait_for(lambda: _states(pool)[b.url] == "draining")
                for _ in range(6):
                    resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body())
                    assert resp.status_code == 200
                assert b.stats()["total"] == 0
                assert a.stats()["total"] + c.stats()["total"] >= 6
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def test_the_admin_api_is_closed_without_admin_keys() -> None:
    async with (
        sims(2) as (a, b),
        run_gateway(Settings(backend_urls=(a.url, b.url))) as gw,
        httpx.AsyncClient(timeout=10) as client,
    ):
        assert (await client.get(gw.url + "/admin/backends")).status_code == 404
        resp = await client.post(gw.url + "/admin/backends", json={"url": "http://x:1"})
        assert resp.status_code == 404


# --- where the states show -------------------------------------------------------------------


async def test_member_states_show_in_metrics_status_and_the_access_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with sims(2) as (a, b):
        settings = Settings(backend_urls=(a.url, b.url), pool=FAST)
        with caplog.at_level(logging.INFO, logger="vllm_gateway.access"):
            async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=10) as client:
                pool = gw.gateway.backend
                assert isinstance(pool, PoolBackend)
                pool.fleet.drain(a.url)
                metrics = (await client.get(gw.url + "/metrics")).text
                assert f'vllm_gateway_backend_state{{backend="{a.url}",state="draining"}} 1' in (
                    metrics
                )
                assert f'vllm_gateway_backend_state{{backend="{a.url}",state="ready"}} 0' in (
                    metrics
                )
                assert f'vllm_gateway_backend_state{{backend="{b.url}",state="ready"}} 1' in (
                    metrics
                )
                data = (await client.get(gw.url + "/status/data")).json()
                assert {e["name"]: e["state"] for e in data["backends"]} == {
                    a.url: "draining",
                    b.url: "ready",
                }
    lines = [r for r in caplog.records if getattr(r, "event", None) == "backend_state"]
    assert [(getattr(r, "backend", None), getattr(r, "state", None)) for r in lines] == [
        (a.url, "draining")
    ]
