"""Members from DNS (``backends/pool/discovery.py``) against a real DNS server: dnsmasq on 127.0.0.1
whose records each test changes (``tests/integration/dnsserver.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat_body, free_port, run_gateway, spawn_gateway, wait_for
from tests.integration.dnsserver import DnsServer, dns_server
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.discovery import DnsDiscovery, DnsTarget
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator

NAME = "vllm-headless.default.test"
PORT = 8000


class Applied:
    """``apply``'s calls, in order."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.changed = asyncio.Event()

    async def __call__(self, urls: list[str]) -> None:
        self.calls.append(urls)
        self.changed.set()

    @property
    def last(self) -> list[str]:
        return self.calls[-1]

    async def next(self, timeout: float = 30.0) -> list[str]:
        """The next set handed on (bounded)."""
        self.changed.clear()
        async with asyncio.timeout(timeout):
            await self.changed.wait()
        return self.last


def source(
    server: DnsServer,
    applied: Callable[[list[str]], Awaitable[None]],
    *,
    name: str = NAME,
    min_interval: float = 1.0,
    max_interval: float = 30.0,
    max_members: int = 256,
    timeout: float = 5.0,
) -> DnsDiscovery:
    return DnsDiscovery(
        DnsTarget(name, PORT),
        applied,
        min_interval=min_interval,
        max_interval=max_interval,
        timeout=timeout,
        max_members=max_members,
        nameservers=[server.address],
    )


def urls(*hosts: str, port: int = PORT) -> list[str]:
    return [f"http://{h}:{port}" for h in hosts]


async def test_records_added_and_removed_are_the_members(tmp_path: Path) -> None:
    with dns_server(tmp_path, {NAME: ["10.0.0.2", "10.0.0.1", "fd00::1"]}) as server:
        applied = Applied()
        dns = source(server, applied)
        await dns.resolve()
        # Sorted (IPv4 first): every worker and every restart hands on the same list.
        assert applied.calls == [urls("10.0.0.1", "10.0.0.2", "[fd00::1]")]

        server.set(NAME, ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1"])
        await dns.resolve()
        assert applied.last == urls("10.0.0.1", "10.0.0.2", "10.0.0.3", "[fd00::1]")

        server.set(NAME, ["10.0.0.3", "fd00::1"])
        await dns.resolve()
        assert applied.last == urls("10.0.0.3", "[fd00::1]")

        await dns.resolve()  # the same answer again: nothing handed on
        assert len(applied.calls) == 3
        assert dns.counts == {"ok": 4, "empty": 0, "error": 0}


async def test_the_loop_follows_the_records_until_closed(tmp_path: Path) -> None:
    # TTL 0: each round comes min_interval after the last.
    with dns_server(tmp_path, {NAME: ["10.0.0.1"]}, ttl=0) as server:
        applied = Applied()
        dns = source(server, applied, min_interval=0.05)
        await dns.start()
        try:
            assert applied.calls == [urls("10.0.0.1")]
            server.set(NAME, ["10.0.0.1", "10.0.0.2"])
            assert await applied.next() == urls("10.0.0.1", "10.0.0.2")
            server.set(NAME, ["10.0.0.2"])
            assert await applied.next() == urls("10.0.0.2")
        finally:
            await dns.aclose()
        task_names = {t.get_name() for t in asyncio.all_tasks()}
        assert "backend-discovery" not in task_names


@pytest.mark.parametrize(
    ("ttl", "min_interval", "max_interval", "expected"),
    [
        (7, 1.0, 30.0, 7.0),  # within the bounds: the TTL
        (7, 10.0, 30.0, 10.0),  # below the floor: raised to it
        (7, 1.0, 3.0, 3.0),  # above the ceiling: lowered to it
        (0, 0.5, 30.0, 0.5),  # TTL 0 (not to be cached) does not make a busy loop
    ],
)
async def test_the_next_round_comes_after_the_ttl_within_the_bounds(
    tmp_path: Path, ttl: int, min_interval: float, max_interval: float, expected: float
) -> None:
    with dns_server(tmp_path, {NAME: ["10.0.0.1", "fd00::1"]}, ttl=ttl) as server:
        dns = source(server, Applied(), min_interval=min_interval, max_interval=max_interval)
        assert await dns.resolve() == expected
        assert dns.last_ttl == ttl


async def test_a_resolver_down_keeps_the_last_good_set_and_is_counted(tmp_path: Path) -> None:
    with dns_server(tmp_path, {NAME: ["10.0.0.1", "10.0.0.2"]}) as server:
        applied = Applied()
        dns = source(server, applied, min_interval=0.5, timeout=1.0)
        await dns.resolve()
        server.stop()  # nobody answers on that port now

        assert await dns.resolve() == 0.5  # the next try comes at the floor
        assert await dns.resolve() == 0.5
        assert dns.counts == {"ok": 1, "empty": 0, "error": 2}
        assert applied.calls == [urls("10.0.0.1", "10.0.0.2")]  # nothing else handed on
        assert dns.members == tuple(urls("10.0.0.1", "10.0.0.2"))

        server.records[NAME] = ["10.0.0.2", "10.0.0.3"]
        server.start()  # back, with other records
        await dns.resolve()
        assert applied.last == urls("10.0.0.2", "10.0.0.3")
        assert dns.counts == {"ok": 2, "empty": 0, "error": 2}


async def test_a_refusing_or_empty_answer_keeps_the_last_good_set(tmp_path: Path) -> None:
    with dns_server(tmp_path, {NAME: ["10.0.0.1"]}) as server:
        applied = Applied()
        dns = source(server, applied)
        await dns.resolve()

        server.set(NAME, [])  # the name is gone: NXDOMAIN (every pod restarting, say)
        await dns.resolve()
        assert dns.counts == {"ok": 1, "empty": 1, "error": 0}

        # A name outside the server's zone: REFUSED, a failure.
        other = source(server, applied, name="elsewhere.example", max_members=8)
        await other.resolve()
        assert other.counts == {"ok": 0, "empty": 0, "error": 1}
        assert applied.calls == [urls("10.0.0.1")]


async def test_ten_thousand_records_stay_bounded(tmp_path: Path) -> None:
    many = [f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}" for i in range(10_000)]
    with dns_server(tmp_path, {NAME: ["10.0.0.1"]}) as server:
        server.set(NAME, many)  # more than one DNS message holds: the server cuts the answer
        applied = Applied()
        dns = source(server, applied, max_members=50, timeout=60.0)
        await dns.resolve()
        # The lowest 50 of the answer (which holds what one message can: about 4,000).
        answer = sorted(ipaddress.ip_address(a) for a in server.query(NAME))
        assert len(answer) > 50
        assert applied.last == urls(*map(str, answer[:50]))
        assert dns.truncated == 1
        assert dns.stats()["members"] == 50
        await dns.resolve()
        assert dns.truncated == 2
        assert len(applied.calls) == 1


async def test_a_set_the_pool_failed_to_take_is_handed_again(tmp_path: Path) -> None:
    with dns_server(tmp_path, {NAME: ["10.0.0.1"]}) as server:
        calls: list[list[str]] = []

        async def apply(urls: list[str]) -> None:
            calls.append(urls)
            if len(calls) == 1:
                raise RuntimeError("the pool refused it")

        dns = source(server, apply, min_interval=0.5, max_members=8)
        assert await dns.resolve() == 0.5  # failed: soon again, nothing taken as applied
        assert dns.members == ()
        await dns.resolve()
        assert calls == [urls("10.0.0.1"), urls("10.0.0.1")]
        assert dns.members == tuple(urls("10.0.0.1"))


def test_a_bad_source_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="dns://NAME:PORT"):
        DnsTarget.parse("http://vllm:8000")
    with pytest.raises(ValueError, match="bad intervals"):
        DnsDiscovery(
            DnsTarget(NAME, PORT),
            Applied(),
            min_interval=5.0,
            max_interval=1.0,
            timeout=1.0,
            max_members=1,
            nameservers=["127.0.0.1:53"],
        )


# --- the pool's members from DNS, under load ---------------------------------------------------

LOADED = SimulatorConfig(ttft=0.01, itl=0.01, tokens=30)
FAST = PoolConfig(
    health_interval=0.1, health_timeout=0.5, readmit_backoff=0.2, slow_start=1.0, drain_timeout=20.0
)


class Load:
    """Clients sending streams and non-streamed requests back to back until ``stop``; every
    answer that is not a 200 with a whole body (a stream: ``[DONE]``, no error event) is kept."""

    def __init__(self, client: httpx.AsyncClient, url: str, clients: int) -> None:
        self.client, self.url = client, url
        self.done = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(i % 2 == 0)) for i in range(clients)]

    async def _run(self, stream: bool) -> None:
        while not self._stop.is_set():
            body = chat_body(stream=stream, max_tokens=30)
            async with self.client.stream(
                "POST", self.url + "/v1/chat/completions", json=body
            ) as resp:
                text = (await resp.aread()).decode()
            whole = "data: [DONE]" in text and '"error"' not in text if stream else True
            if resp.status_code != 200 or not whole:
                self.failed.append(f"{resp.status_code} {text[-300:]}")
            self.done += 1

    async def stop(self) -> None:
        self._stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*self._tasks)


async def test_dns_records_changed_under_load_fail_no_request(tmp_path: Path) -> None:
    port = free_port()
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    with dns_server(tmp_path, {NAME: hosts[:2]}) as server:
        settings = Settings(
            backend_discovery=f"dns://{NAME}:{port}",
            backend_discovery_nameservers=(server.address,),
            backend_discovery_min_interval=0.1,
        )
        async with contextlib.AsyncExitStack() as stack:
            a, b, c = [
                await stack.enter_async_context(run_simulator(LOADED, host=h, port=port))
                for h in hosts
            ]
            pool = PoolBackend(settings, config=FAST)
            gw = await stack.enter_async_context(run_gateway(settings, backend=pool))
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=60))

            def members() -> dict[str, str]:
                return {d["url"]: d["state"] for d in pool.fleet.describe()}

            a_url, b_url, c_url = urls(*hosts, port=port)
            await wait_for(lambda: members() == {a_url: "ready", b_url: "ready"}, timeout=30)

            load = Load(client, gw.url, clients=8)
            await wait_for(lambda: load.done >= 20, timeout=60)

            # A member added: it joins, passes its checks, ramps up, then takes its share.
            server.set(NAME, hosts)
            await wait_for(lambda: c_url in members(), timeout=30)
            new = pool.fleet.find(c_url)
            await wait_for(lambda: new.state == "ready", timeout=30)
            await wait_for(lambda: new.weight == new.base_weight, timeout=30)
            after_ramp = c.stats()["total"]
            await wait_for(lambda: c.stats()["total"] >= after_ramp + 10, timeout=60)

            # A member removed while it serves: no new request goes to it, the ones it holds end
            # there (the drain deadline is far), and it leaves once it holds none.
            await wait_for(lambda: a.stats()["running"] > 0, timeout=30)
            server.set(NAME, hosts[1:])
            old = pool.fleet.find(a_url)
            await wait_for(lambda: old.state == "draining", timeout=30)
            # It goes once nothing is in flight on it: every request it was given has ended.
            await wait_for(lambda: a_url not in {m.url for m in pool.fleet.members}, timeout=30)
            assert old.state == "gone"
            sent_to_old = a.stats()["total"]
            assert a.stats()["completed"] == sent_to_old  # each ended there, none cut
            done_at_removal = load.done
            await wait_for(lambda: load.done >= done_at_removal + 40, timeout=60)
            await load.stop()

            assert load.failed == []
            assert a.stats()["total"] == sent_to_old  # nothing new once it left
            assert b.stats()["total"] > 0 and c.stats()["total"] > after_ramp
            stats = pool.pool_stats()["discovery"]
            assert stats["resolutions"]["error"] == 0
            assert stats["members"] == 2
            metrics = (await client.get(gw.url + "/metrics")).text
            assert 'vllm_gateway_backend_discovery_resolutions_total{result="ok"}' in metrics
            assert "vllm_gateway_backend_discovery_members 2" in metrics


async def test_every_worker_follows_the_records(tmp_path: Path) -> None:
    # Each worker resolves the name for its own pool: a worker that did not would have no member
    # and fail its requests at the (short) queue wait.
    port = free_port()
    with dns_server(tmp_path, {NAME: ["127.0.0.2"]}) as server:
        async with (
            run_simulator(LOADED, host="127.0.0.2", port=port) as a,
            run_simulator(LOADED, host="127.0.0.3", port=port) as b,
        ):
            env = {
                "VLLM_BACKEND_DISCOVERY": f"dns://{NAME}:{port}",
                "VLLM_BACKEND_DISCOVERY_NAMESERVERS": server.address,
                "VLLM_BACKEND_DISCOVERY_MIN_INTERVAL_SECONDS": "0.2",
                "VLLM_POOL_HEALTH_INTERVAL_SECONDS": "0.2",
                "VLLM_POOL_SLOW_START_SECONDS": "0",
                "VLLM_QUEUE_WAIT_TIMEOUT_SECONDS": "5",
            }
            with spawn_gateway(env, "--workers", "2", name="workers-dns") as gw:

                async def send(n: int) -> list[int]:
                    # Separate connections, so the kernel spreads them over both workers.
                    async def one() -> int:
                        async with httpx.AsyncClient(timeout=30) as c:
                            body = chat_body(max_tokens=4)
                            r = await c.post(gw.url + "/v1/chat/completions", json=body)
                            return r.status_code

                    return list(await asyncio.gather(*(one() for _ in range(n))))

                async def until_ready() -> None:
                    while True:
                        with contextlib.suppress(httpx.TransportError):
                            async with httpx.AsyncClient(timeout=5) as c:
                                if (await c.get(gw.url + "/health/ready")).status_code == 200:
                                    return
                        await asyncio.sleep(0.1)

                await asyncio.wait_for(until_ready(), 30)
                assert await send(30) == [200] * 30
                assert b.stats()["total"] == 0

                server.set(NAME, ["127.0.0.3"])  # a replaced: b joins, a drains and goes

                async def a_left() -> None:  # until two rounds in a row send a nothing
                    clean = 0
                    while clean < 2:
                        seen = a.stats()["total"]
                        assert await send(10) == [200] * 10
                        clean = clean + 1 if a.stats()["total"] == seen else 0

                await asyncio.wait_for(a_left(), 60)
                left_at = a.stats()["total"]
                assert await send(30) == [200] * 30  # over both workers: none sends to a
                assert a.stats()["total"] == left_at
                assert b.stats()["total"] >= 30
