"""Cache-aware routing through the real gateway, in front of simulators on loopback: where the
conversations go, a hot prefix under load, a member leaving, and a hostile event publisher (a raw
ZMQ socket) that cannot make the gateway hold more than its stated budget."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any, TypedDict

import httpx
import msgpack
import orjson
import zmq
import zmq.asyncio

from tests.conftest import RunningGateway, free_port, run_gateway, wait_for
from tests.integration.test_pool import sims
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.kv_events import MAX_MESSAGE_BYTES
from vllm_gateway.backends.pool.prompt_chain import prompt_chain
from vllm_gateway.settings import PoolSettings, Settings
from vllm_gateway_tools.simulator import Simulator


class _Fast(TypedDict):
    health_interval: float
    health_timeout: float


FAST = _Fast(health_interval=0.1, health_timeout=0.5)


def pool(gw: RunningGateway) -> PoolBackend:
    backend = gw.gateway.backend
    assert isinstance(backend, PoolBackend)
    return backend


async def converse(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], stream: bool = True
) -> str:
    body: dict[str, Any] = {"model": "sim-model", "messages": messages, "max_tokens": 6}
    if not stream:
        resp = await client.post(url + "/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["choices"][0]["message"]["content"])
    body["stream"] = True
    text = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunk = orjson.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    text.append(choice["delta"].get("content") or "")
    return "".join(text)


def served_by(members: list[Simulator], marker: str) -> set[int]:
    """Which members saw a request whose last user message starts with ``marker``."""
    found = set()
    for i, sim in enumerate(members):
        for record in sim.stats()["requests"]:
            messages = (record.get("body") or {}).get("messages") or []
            users = [m["content"] for m in messages if m.get("role") == "user"]
            if users and users[-1].startswith(marker):
                found.add(i)
    return found


async def test_each_conversation_stays_with_the_member_that_holds_it(tmp_path: Path) -> None:
    async with sims(2, tokens=6) as members:
        settings = Settings(
            backend_urls=tuple(m.url for m in members),
            pool=PoolSettings(routing="cache_aware", **FAST),
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=30) as client:
            rng = random.Random(7)
            history: dict[int, list[dict[str, str]]] = {}
            for c in range(6):
                system = f"Conversation {c}. " + " ".join(
                    rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(300)
                )
                history[c] = [{"role": "system", "content": system}]
            for turn in range(3):
                for c in range(6):
                    marker = f"c{c}t{turn}:"
                    history[c].append({"role": "user", "content": marker + " go on " * 20})
                    answer = await converse(client, gw.url, history[c], stream=turn != 1)
                    history[c].append({"role": "assistant", "content": answer})
            where = {
                c: set().union(*(served_by(members, f"c{c}t{t}:") for t in range(3)))
                for c in range(6)
            }
            decisions = pool(gw).pool_stats()["cache_decisions"]
            aware = pool(gw).cache_aware
            assert aware is not None
            links = sum(len(by_size) for by_size in aware.links.values())
    assert all(len(s) == 1 for s in where.values()), where  # every turn where the first went
    homes = [next(iter(s)) for s in where.values()]
    assert min(homes.count(0), homes.count(1)) >= 2  # new conversations spread
    assert decisions["hit"] == 12 and decisions["miss"] == 6
    assert links > 0  # the streamed turns' prompt ids linked text to token blocks


async def test_a_hot_prefix_spills_over_when_its_member_is_busy() -> None:
    async with sims(2, tokens=40, itl=0.02) as members:
        settings = Settings(
            backend_urls=tuple(m.url for m in members),
            pool=PoolSettings(routing="cache_aware", cache_balance_abs=2, **FAST),
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=30) as client:
            messages = [{"role": "system", "content": "The same long instructions. " * 60},
                        {"role": "user", "content": "Hello"}]  # fmt: skip
            await converse(client, gw.url, messages)  # one member now holds it
            await asyncio.gather(*(converse(client, gw.url, messages) for _ in range(12)))
            decisions = pool(gw).pool_stats()["cache_decisions"]
    counts = [m.stats()["total"] for m in members]
    assert decisions["yield"] > 0 and decisions["hit"] > 0
    assert min(counts) >= 3, counts  # the other member took a share


async def test_a_member_that_leaves_comes_back_cold() -> None:
    async with sims(2, tokens=4) as members:
        settings = Settings(
            backend_urls=tuple(m.url for m in members),
            pool=PoolSettings(
                routing="cache_aware", eject_after_failures=1, readmit_backoff=60.0, **FAST
            ),
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=30) as client:
            messages = [{"role": "system", "content": "Remember me. " * 80},
                        {"role": "user", "content": "Hi"}]  # fmt: skip
            await converse(client, gw.url, messages)
            holder = next(m for m in pool(gw).members if m.cache and m.cache.sent)
            index = pool(gw).members.index(holder)
            members[index].configure(status=500)  # its next answer fails: ejected
            await converse(client, gw.url, messages)  # retried on the other member
            await wait_for(lambda: not holder.up)
            assert holder.cache is not None and not holder.cache.sent
            assert holder.cache.counts["resets"] == 1


def rss_kib() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_hostile_event_publisher_cannot_grow_the_gateway(tmp_path: Path) -> None:
    # A member whose event socket sends garbage, oversized messages and a flood of blocks: the
    # gateway indexes at most pool_cache_index_blocks of them, drops the rest, and keeps routing.
    port = free_port()
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    try:
        async with sims(2, tokens=4) as members:
            path = tmp_path / "backends.yaml"
            path.write_text(
                "backends:\n"
                f"  - url: {members[0].url}\n    kv_events: tcp://127.0.0.1:{port}\n"
                f"  - url: {members[1].url}\n    kv_events: 'off'\n"
            )
            settings = Settings(
                backends_file=str(path),
                pool=PoolSettings(routing="cache_aware", cache_index_blocks=5000, **FAST),
            )
            async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=30) as client:
                target = pool(gw).members[0]
                assert target.cache is not None
                cache = target.cache

                async def send(*frames: bytes) -> None:
                    await pub.send_multipart([b"", *frames])

                # The subscription connects in the background: publish until one arrives.
                seq = 0
                while not cache.events_live:
                    await send(seq.to_bytes(8, "big"), msgpack.packb([0.0, [], 0]))
                    seq += 1
                    await asyncio.sleep(0.05)
                before = rss_kib()

                async def until_bad() -> None:  # a malformed message arrives and is counted
                    seen = cache.counts["bad"]
                    while cache.counts["bad"] == seen:
                        await send(b"\x00" * 8, b"\xc1\xc1")
                        await asyncio.sleep(0.1)

                await asyncio.wait_for(until_bad(), 10)
                # Over the size limit: ZMQ drops the connection, nothing is read, the index is
                # emptied and the next refresh subscribes again.
                await send(seq.to_bytes(8, "big"), b"x" * (MAX_MESSAGE_BYTES + 1024))
                await wait_for(lambda: cache.counts["disconnects"] == 1, timeout=10)
                await asyncio.wait_for(until_bad(), 10)
                rng = random.Random(3)
                for _ in range(20):  # 20 batches of 500 blocks of 16 tokens: 10,000 blocks
                    seq += 1
                    events = [{"type": "BlockStored", "block_hashes": [rng.getrandbits(64) for _ in range(500)],
                               "parent_block_hash": None, "token_ids": [rng.randrange(50000) for _ in range(8000)],
                               "block_size": 16}]  # fmt: skip
                    seen = cache.counts["events"]
                    await send(seq.to_bytes(8, "big"), msgpack.packb([0.0, events, 0]))
                    await wait_for(lambda seen=seen: cache.counts["events"] > seen, timeout=10)
                await wait_for(lambda: cache.counts["dropped"] > 0, timeout=20)
                await asyncio.sleep(0.5)
                grew = rss_kib() - before
                answer = await converse(
                    client, gw.url, [{"role": "user", "content": "still there?"}]
                )
    finally:
        pub.close(0)
        ctx.term()
    assert answer
    assert len(cache.by_vllm) <= 5000 and len(cache.blocks) <= 5000
    assert cache.counts["bad"] >= 2
    assert cache.counts["dropped"] == 5000  # 10,000 sent, 5,000 indexed
    assert grew < 64 * 1024, f"the gateway grew {grew} KiB"  # 5,000 entries are about 1 MiB


async def test_the_index_follows_the_members_own_kv_events() -> None:
    # Simulators that model vLLM's prefix cache and publish its KV-cache events: the gateway finds
    # the endpoints through /kv_event_sources, indexes the blocks, links the prompt's text to
    # them from the streamed prompt ids, and forgets a member's blocks when it resets its cache.
    knobs = {"prefix_cache_blocks": 256, "block_size": 16, "kv_events_port": 0, "dev_mode": True}
    async with sims(2, tokens=4, **knobs) as members:
        settings = Settings(
            backend_urls=tuple(m.url for m in members),
            pool=PoolSettings(routing="cache_aware", **FAST),
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=30) as client:
            messages = [{"role": "system", "content": "Index me, block by block. " * 40},
                        {"role": "user", "content": "first"}]  # fmt: skip
            answer = await converse(client, gw.url, messages)
            holder = next(m for m in pool(gw).members if m.cache and m.cache.sent)
            assert holder.cache is not None
            await wait_for(lambda: holder.cache is not None and len(holder.cache.blocks) > 10)
            assert holder.cache.events_live and holder.cache.block_size == 16
            await wait_for(lambda: holder.engine.prefix_queries)  # its /metrics were read
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "second"}]  # fmt: skip
            chain = prompt_chain({"model": "sim-model", "messages": messages})
            assert chain is not None
            links = pool(gw).cache_aware.links[16]  # type: ignore[union-attr]
            sent = dict(holder.cache.sent)
            holder.cache.sent.clear()  # what was sent aside: only its events can tell
            predicted = holder.cache.hit_tokens(chain, links, 0.25)
            assert predicted >= 16 * 10  # from its real blocks, in whole blocks
            holder.cache.sent.update(sent)
            await converse(client, gw.url, messages)
            assert pool(gw).pool_stats()["cache_decisions"] == {"miss": 1, "hit": 1}
            index = pool(gw).members.index(holder)
            reset = await client.post(members[index].url + "/reset_prefix_cache")
            assert reset.status_code == 200
            await converse(client, gw.url, [{"role": "user", "content": "anything"}])  # a step
            await wait_for(lambda: holder.cache is not None and not holder.cache.blocks)
            assert holder.cache.hit_tokens(chain, links, 0.25) == 0  # its cache is empty now
