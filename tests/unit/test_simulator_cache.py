"""The simulator's prefix cache model and its KV events, on loopback with a real ZMQ subscriber.

Each test starts its own simulator (port 0, a free event port) on the test's event loop. Timing
checks compare a cold prompt with a cached one, with margins of tens of milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import orjson
import pytest
import zmq
import zmq.asyncio

from vllm_gateway_tools.simulator import ConfigError, Simulator, SimulatorConfig, run_simulator
from vllm_gateway_tools.simulator.prefix_cache import PrefixCache, block_hashes
from vllm_gateway_tools.simulator.runner import build_parser, config_from_args
from vllm_gateway_tools.simulator.tokenizer import Vocabulary, chat_messages

pytestmark = pytest.mark.timeout(30)

B = 4  # tokens per block: small, so that short prompts span several blocks
CACHED = SimulatorConfig(
    ttft=0.005,
    itl=0.001,
    tokens=2,
    dev_mode=True,
    prefix_cache_blocks=64,
    block_size=B,
    kv_events_port=0,
    kv_events_topic="kv",
)
STORED_KEYS = {"type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
               "medium", "lora_name"}  # fmt: skip


def chat(*messages: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "model": "sim-model",
        "messages": [{"role": role, "content": text} for role, text in messages],
        "max_tokens": 2,
        **extra,
    }


def ids(body: dict[str, Any]) -> list[int]:
    """The prompt's token ids as the simulator sees them (ASCII ids are the same in any process)."""
    return Vocabulary().encode_chat(chat_messages(body["messages"]))


@dataclass
class Subscriber:
    """A real ZMQ SUB socket on the simulator's event port; ``frames`` are the raw multipart
    messages received, in order; ``drain`` decodes them as ``(topic, seq, [ts, events, rank])``."""

    sock: zmq.asyncio.Socket
    frames: list[list[bytes]] = field(default_factory=list)

    async def sync(self, http: httpx.AsyncClient) -> None:
        """Wait out ZMQ's slow joiner: reset the cache until the AllBlocksCleared arrives."""
        for _ in range(100):
            assert (await http.post("/reset_prefix_cache")).json() == {"success": True}
            if await self.sock.poll(50):
                await self.drain()
                return
        raise AssertionError("no event reached the subscriber")

    async def drain(self, wait: float = 0.2) -> list[tuple[bytes, int, list[Any]]]:
        """Every batch that arrives within ``wait`` seconds of the last one."""
        out = []
        while await self.sock.poll(int(wait * 1000)):
            frames = await self.sock.recv_multipart()
            self.frames.append(frames)
            assert len(frames) == 3
            topic, seq, payload = frames
            assert len(seq) == 8
            out.append((topic, int.from_bytes(seq, "big"), msgpack.unpackb(payload)))
            wait = 0.05
        return out


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with run_simulator(CACHED) as s:
        yield s


@pytest.fixture
async def http(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
        yield c


@pytest.fixture
async def sub(sim: Simulator, http: httpx.AsyncClient) -> AsyncIterator[Subscriber]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"kv")
    assert sim.state.kv_events is not None
    sock.connect(f"tcp://127.0.0.1:{sim.state.kv_events.port}")
    subscriber = Subscriber(sock)
    await subscriber.sync(http)
    try:
        yield subscriber
    finally:
        sock.close()
        ctx.term()


async def metric(http: httpx.AsyncClient, name: str) -> float:
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def cached_tokens(sim: Simulator) -> list[int]:
    return [r["cached_tokens"] for r in sim.stats()["requests"] if "cached_tokens" in r]


async def ttft(http: httpx.AsyncClient, body: dict[str, Any]) -> float:
    """Seconds from sending a streamed request to its first content chunk."""
    start = time.perf_counter()
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - start
    raise AssertionError("no content chunk")


# --- the model, directly ------------------------------------------------------------------------


def test_block_hashes_are_a_chain_of_full_blocks() -> None:
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # the partial third block is not hashed
    assert all(0 <= h < 2**64 for h in a)
    assert block_hashes(list(range(8)), 4) == a  # deterministic
    # Block 1 is the same tokens after a different block 0: a different hash.
    assert block_hashes([9, 9, 9, 9, 4, 5, 6, 7], 4)[1] != a[1]


def test_a_whole_cached_prompt_still_computes_one_token() -> None:
    cache = PrefixCache(capacity=16, block_size=4)
    assert cache.admit(list(range(8)))[0] == 0
    assert cache.admit(list(range(8)))[0] == 4  # (8 - 1) // 4 blocks may hit
    assert cache.admit(list(range(9)))[0] == 8
    assert (cache.queries, cache.hits, len(cache)) == (25, 12, 2)


def test_a_prompt_longer_than_the_cache_keeps_its_head() -> None:
    cache = PrefixCache(capacity=2, block_size=4)
    tokens = list(range(16))
    cache.admit(tokens)
    assert len(cache) == 2
    assert all(h in cache for h in block_hashes(tokens, 4)[:2])


# --- over HTTP ----------------------------------------------------------------------------------


async def test_repeated_prompt_and_shared_prefix_hit(
    sim: Simulator, http: httpx.AsyncClient
) -> None:
    system = ("system", "You are a terse assistant. " * 4)
    first = chat(system, ("user", "What is a block?"))
    n = len(ids(first))
    assert (await http.post("/v1/chat/completions", json=first)).status_code == 200
    assert (await http.post("/v1/chat/completions", json=first)).status_code == 200
    assert cached_tokens(sim) == [0, (n - 1) // B * B]

    # Another question after the same system prompt: the shared full blocks hit.
    second = chat(system, ("user", "And what is a token, exactly?"))
    a, b = ids(first), ids(second)
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert (await http.post("/v1/chat/completions", json=second)).status_code == 200
    assert cached_tokens(sim)[-1] == common // B * B > 0
    m = len(b)
    assert await metric(http, "vllm:prefix_cache_queries_total") == 2 * n + m
    assert await metric(http, "vllm:prefix_cache_hits_total") == (n - 1) // B * B + common // B * B


async def test_completions_prompts_use_the_cache(sim: Simulator, http: httpx.AsyncClient) -> None:
    body = {"model": "sim-model", "prompt": "0123456789abcdef" * 4, "max_tokens": 1}
    for _ in range(2):
        assert (await http.post("/v1/completions", json=body)).status_code == 200
    assert cached_tokens(sim) == [0, 12]  # 16 tokens: 15 // 4 blocks of 4


async def test_the_ids_are_those_returned_as_prompt_token_ids(
    http: httpx.AsyncClient, sub: Subscriber
) -> None:
    body = chat(("user", "x" * 40), stream=True, return_token_ids=True)
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        text = (await r.aread()).decode()
    first = orjson.loads(text.split("\n\n")[0][len("data: ") :])
    prompt_ids = first["prompt_token_ids"]
    (batch,) = await sub.drain()
    (stored,) = batch[2][1]
    full = len(prompt_ids) // B * B
    assert stored["token_ids"] == prompt_ids[:full]
    assert stored["block_hashes"] == block_hashes(prompt_ids, B)


async def test_ttft_grows_with_uncached_tokens(sim: Simulator, http: httpx.AsyncClient) -> None:
    sim.configure(prefill_per_token=0.002)  # 2 ms per token to compute
    body = chat(("system", "s" * 4 * 120), ("user", "hi"))  # about 130 tokens
    cold = await ttft(http, body)
    warm = await ttft(http, body)  # all but the last partial block cached: a few tokens to compute
    assert cold >= 0.2
    assert warm < cold - 0.15
    sim.configure(prefill_per_token=0.0)
    assert await ttft(http, chat(("system", "t" * 4 * 120), ("user", "hi"))) < cold - 0.15


async def test_events_wire_format_and_parent_chain(
    http: httpx.AsyncClient, sub: Subscriber
) -> None:
    seq0 = int.from_bytes(sub.frames[-1][1], "big")
    first = chat(("system", "a" * 4 * 10), ("user", "one"))
    assert (await http.post("/v1/chat/completions", json=first)).status_code == 200
    (batch,) = await sub.drain()
    topic, seq, payload = batch
    assert (topic, seq) == (b"kv", seq0 + 1)
    assert isinstance(payload, list) and len(payload) == 3
    ts, events, rank = payload
    assert isinstance(ts, float) and abs(ts - time.time()) < 5 and rank == 0
    (stored,) = events
    assert set(stored) == STORED_KEYS
    a = ids(first)
    hashes = block_hashes(a, B)
    assert stored == {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": a[: len(hashes) * B],
        "block_size": B,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    # A continuation of the same conversation publishes only its new blocks, after the last reused.
    second = chat(("system", "a" * 4 * 10), ("user", "one"), ("assistant", "ok"), ("user", "two"))
    assert (await http.post("/v1/chat/completions", json=second)).status_code == 200
    ((_, seq2, (_, events2, _)),) = await sub.drain()
    assert seq2 == seq0 + 2
    b = ids(second)
    b_hashes = block_hashes(b, B)
    reused = len(hashes)  # the first prompt's full blocks are a prefix of the second's
    assert b_hashes[:reused] == hashes
    (stored2,) = events2
    assert stored2["parent_block_hash"] == hashes[-1]
    assert stored2["block_hashes"] == b_hashes[reused:]
    assert stored2["token_ids"] == b[reused * B : len(b_hashes) * B]
    # The same request again stores nothing: no batch at all.
    assert (await http.post("/v1/chat/completions", json=second)).status_code == 200
    assert await sub.drain(0.2) == []


async def test_lru_eviction_publishes_block_removed(
    sim: Simulator, http: httpx.AsyncClient, sub: Subscriber
) -> None:
    sim.configure(prefix_cache_blocks=4)  # a new, empty cache: announced as AllBlocksCleared
    ((_, _, (_, cleared, _)),) = await sub.drain()
    assert cleared == [{"type": "AllBlocksCleared"}]
    a = [1, 3, *range(1000, 1010)]  # 12 tokens: 3 blocks
    b = [1, 3, *range(2000, 2010)]
    await http.post("/v1/completions", json={"prompt": a, "max_tokens": 1})
    await sub.drain()
    await http.post("/v1/completions", json={"prompt": b, "max_tokens": 1})
    ((_, _, (_, events, _)),) = await sub.drain()
    ha, hb = block_hashes(a, B), block_hashes(b, B)
    # 3 + 3 blocks in 4: a's two tail blocks go first (a sequence's tail is evicted before its head).
    assert events[:2] == [
        {"type": "BlockRemoved", "block_hashes": [ha[2]], "medium": "GPU"},
        {"type": "BlockRemoved", "block_hashes": [ha[1]], "medium": "GPU"},
    ]
    assert events[2]["type"] == "BlockStored" and events[2]["block_hashes"] == hb
    assert len(events) == 3
    assert sim.state.prefix_cache is not None and len(sim.state.prefix_cache) == 4
    assert await metric(http, "vllm:kv_cache_usage_perc") == 1.0


async def test_reset_publishes_all_blocks_cleared(
    sim: Simulator, http: httpx.AsyncClient, sub: Subscriber
) -> None:
    body = chat(("user", "z" * 40))
    await http.post("/v1/chat/completions", json=body)
    await sub.drain()
    assert await metric(http, "vllm:kv_cache_usage_perc") > 0
    assert (await http.post("/reset_prefix_cache")).json() == {"success": True}
    ((_, _, (_, events, _)),) = await sub.drain()
    assert events == [{"type": "AllBlocksCleared"}]
    assert await metric(http, "vllm:kv_cache_usage_perc") == 0.0
    await http.post("/v1/chat/completions", json=body)
    assert cached_tokens(sim)[-1] == 0  # nothing left to hit


async def test_kv_event_sources_on(sim: Simulator, http: httpx.AsyncClient) -> None:
    assert sim.state.kv_events is not None
    assert (await http.get("/kv_event_sources")).json() == {
        "0": {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{sim.state.kv_events.port}",
            "replay_endpoint": None,
            "buffer_steps": 10000,
            "hwm": 100000,
            "max_queue_size": 100000,
            "topic": "kv",
        }
    }


async def test_off_by_default() -> None:
    async with (
        run_simulator(SimulatorConfig(ttft=0.001, itl=0.001, dev_mode=True)) as s,
        httpx.AsyncClient(base_url=s.url) as http,
    ):
        assert (await http.get("/kv_event_sources")).json() == {}
        await http.post("/v1/chat/completions", json=chat(("user", "x" * 64)))
        text = (await http.get("/metrics")).text
        assert "prefix_cache" not in text and "cache_config_info" not in text
        assert "cached_tokens" not in s.stats()["requests"][-1]
        assert (await http.post("/reset_prefix_cache")).json() == {"success": True}


async def test_metrics_text(http: httpx.AsyncClient) -> None:
    await http.post("/v1/chat/completions", json=chat(("user", "q" * 40)))
    text = (await http.get("/metrics")).text
    for line in (
        "# TYPE vllm:prefix_cache_queries_total counter",
        'vllm:prefix_cache_queries_total{model_name="sim-model",engine="0"} 13.0',
        "# TYPE vllm:prefix_cache_hits_total counter",
        'vllm:prefix_cache_hits_total{model_name="sim-model",engine="0"} 0.0',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f'vllm:kv_cache_usage_perc{{model_name="sim-model",engine="0"}} {3 / 64}',
        'vllm:num_requests_waiting{model_name="sim-model",engine="0"} 0.0',
        'vllm:num_requests_running{model_name="sim-model",engine="0"} 0.0',
        'vllm:cache_config_info{block_size="4",enable_prefix_caching="True",engine="0",'
        'num_gpu_blocks="64",prefix_caching_hash_algo="sha256"} 1.0',
        # Finished requests by finish reason: how a benchmark counts each member's requests.
        "# TYPE vllm:request_success_total counter",
        'vllm:request_success_total{model_name="sim-model",engine="0",finished_reason="length"} 1.0',
    ):
        assert line in text.splitlines(), line
    await http.post("/v1/completions", json={"prompt": "hi"})  # no max_tokens: finishes on stop
    text = (await http.get("/metrics")).text
    assert 'finished_reason="stop"} 1.0' in text


def test_command_line_knobs() -> None:
    args = build_parser().parse_args(
        ["--prefix-cache-blocks", "100", "--block-size", "32", "--prefill-per-token", "0.0001",
         "--kv-events-port", "0", "--kv-events-topic", "t"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.prefix_cache_blocks, cfg.block_size, cfg.prefill_per_token) == (100, 32, 0.0001)
    assert (cfg.kv_events_port, cfg.kv_events_topic) == (0, "t")
    off = config_from_args(build_parser().parse_args([]))
    assert (off.prefix_cache_blocks, off.kv_events_port) == (0, None)


@pytest.mark.parametrize(
    "changes",
    [{"prefix_cache_blocks": -1}, {"block_size": 0}, {"prefill_per_token": -0.1},
     {"kv_events_port": 70000}, {"kv_events_port": "x"}, {"kv_events_topic": 3}],
)  # fmt: skip
def test_bad_cache_knobs_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SimulatorConfig().updated(changes)


async def test_configure_over_http_turns_the_cache_off(
    sim: Simulator, http: httpx.AsyncClient
) -> None:
    r = await http.post("/sim/config", json={"prefix_cache_blocks": 0})
    assert r.status_code == 200 and r.json()["prefix_cache_blocks"] == 0
    assert sim.state.prefix_cache is None
    assert "prefix_cache" not in (await http.get("/metrics")).text
    r = await http.post("/sim/config", json={"prefix_cache_blocks": 8, "block_size": 2})
    assert sim.state.prefix_cache is not None and sim.state.prefix_cache.block_size == 2


async def test_configure_reopens_the_event_socket(sim: Simulator, http: httpx.AsyncClient) -> None:
    assert sim.state.kv_events is not None
    sim.configure(kv_events_topic="other")
    assert (await http.get("/kv_event_sources")).json()["0"]["topic"] == "other"
    sim.configure(kv_events_port=None)
    assert (await http.get("/kv_event_sources")).json() == {}
    sim.configure(kv_events_port=0)
    source = (await http.get("/kv_event_sources")).json()["0"]
    assert source["endpoint"] == f"tcp://*:{sim.state.kv_events.port}"
    # A port that is taken is refused and the old socket stays.
    taken = sim.state.kv_events.port
    async with run_simulator(SimulatorConfig(kv_events_port=0)) as other:
        assert other.state.kv_events is not None
        with pytest.raises(ConfigError):
            other.configure(kv_events_port=taken)
        assert other.state.config.kv_events_port == 0 and other.state.kv_events is not None
