"""No peer can pin the gateway: slow and hostile clients and backends, bounded in time and memory.

Each case of docs/reliability.md's "Bounds" table, tried as an attacker would: raw sockets that stop
reading, never send a byte, or trickle headers and bodies; headers of 32 MiB; a backend whose
header line never ends or whose body is 100 MB. Memory is read from /proc of a gateway running as
its own process (``spawn_gateway``), its peak reset first (``clear_refs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import chat_body, run_gateway, spawn_gateway, wait_for
from tests.integration.rogue import (
    SSE_HEAD,
    RogueBackend,
    chunk,
    raw_connect,
    read_until,
    read_until_closed,
    rss_kib,
    sse_block,
)
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

pytestmark = pytest.mark.timeout(90)

CHAT = "/v1/chat/completions"
NO_MODEL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _request(body: dict[str, Any], extra: bytes = b"") -> bytes:
    data = orjson.dumps(body)
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n%s" % (len(data), extra, data)
    )


def _final(response: bytes) -> bytes:
    """The response without the interim 1xx heads before it."""
    while response.startswith(b"HTTP/1.1 1"):
        response = response.partition(b"\r\n\r\n")[2]
    return response


def _status(response: bytes) -> int:
    return int(_final(response).split(b" ", 2)[1])


def _json_body(response: bytes) -> dict[str, Any]:
    head, _, body = _final(response).partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    out = orjson.loads(body)
    assert isinstance(out, dict)
    return out


async def _blast(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that streams as fast as it can, forever."""
    if b'"stream":true' not in head and b"stream" not in head:
        pass
    writer.write(SSE_HEAD)
    block = sse_block(256)
    while True:
        writer.write(block)
        await writer.drain()


def _clear_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS


# --- the client side --------------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_dropped_and_frees_its_permit() -> None:
    # Regression: a stream whose client stopped reading blocked in the send, the error event too,
    # and with a limit of 2 two such clients made every other request wait and get 503.
    rogue = RogueBackend(_blast)
    async with rogue.running():
        settings = Settings(
            backend_urls=(rogue.url,),
            max_concurrent_requests=2,
            queue_wait_timeout=20.0,
            client_send_timeout=0.5,
            stream_idle_timeout=60.0,
        )
        async with run_gateway(settings) as gw:
            stuck = [await raw_connect(gw.port, rcvbuf=4096) for _ in range(2)]
            loop = asyncio.get_running_loop()
            for sock in stuck:
                await loop.sock_sendall(sock, _request({**NO_MODEL, "stream": True}))
            await wait_for(lambda: gw.gateway.admission.in_flight == 2, timeout=5)
            # Both hold their permits only until the send timeout drops them.
            t0 = time.monotonic()
            await wait_for(lambda: gw.gateway.admission.in_flight == 0, timeout=15)
            freed_after = time.monotonic() - t0
            assert freed_after < 10
            assert gw.app.server_stats.send_timeouts >= 2
            await wait_for(lambda: rogue.open == 0, timeout=5)  # upstream requests aborted
            for sock in stuck:
                sock.close()
            text = gw.app.observer.metrics.render()
            slow = [
                line
                for line in text.splitlines()
                if line.startswith("vllm_gateway_requests_total")
                and 'outcome="client_too_slow"' in line
            ]
            assert slow and float(slow[0].rsplit(" ", 1)[1]) == 2


async def test_an_idle_timeout_with_a_client_not_reading_frees_the_permit_at_once(
    simulator: Simulator,
) -> None:
    simulator.configure(stall_after=2, itl=0.01, tokens=50)
    settings = Settings(
        backend_urls=(simulator.url,), stream_idle_timeout=0.3, client_send_timeout=30.0
    )
    async with run_gateway(settings) as gw:
        sock = await raw_connect(gw.port, rcvbuf=4096)
        await asyncio.get_running_loop().sock_sendall(
            sock, _request(chat_body(stream=True, max_tokens=50))
        )
        await wait_for(lambda: gw.gateway.admission.in_flight == 1, timeout=5)
        # The error event goes into the buffer; nothing waits for the client to take it.
        await wait_for(lambda: gw.gateway.admission.in_flight == 0, timeout=2)
        data = await read_until(sock, b"0\r\n\r\n", timeout=5)  # the response's last chunk
        assert b"stream_idle_timeout" in data and b"[DONE]" not in data
        sock.close()


async def test_connections_that_never_send_a_byte_are_closed_at_the_header_timeout(
    simulator: Simulator,
) -> None:
    settings = Settings(backend_urls=(simulator.url,), client_header_timeout=0.5)
    async with run_gateway(settings) as gw:
        socks = [await raw_connect(gw.port) for _ in range(200)]
        await wait_for(lambda: len(gw.runner.http.connections) == 200, timeout=5)
        t0 = time.monotonic()
        results = await asyncio.gather(*(read_until_closed(s, timeout=5) for s in socks))
        assert time.monotonic() - t0 < 0.5 + 3.0  # the timeout, plus a busy machine's slack
        assert all(r == b"" for r in results)  # closed without a word: nobody asked anything
        await wait_for(lambda: not gw.runner.http.connections, timeout=2)
        for s in socks:
            s.close()


async def test_headers_trickled_a_byte_at_a_time_get_408(simulator: Simulator) -> None:
    settings = Settings(backend_urls=(simulator.url,), client_header_timeout=0.6)
    async with run_gateway(settings) as gw:
        sock = await raw_connect(gw.port)
        loop = asyncio.get_running_loop()
        request = _request(chat_body())
        t0 = time.monotonic()

        async def trickle() -> None:
            for byte in request:
                await loop.sock_sendall(sock, bytes([byte]))
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        data = await read_until_closed(sock, timeout=5)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sender
        assert 0.5 <= time.monotonic() - t0 < 0.6 + 3.0
        assert _status(data) == 408
        assert _json_body(data)["error"]["type"] == "client_timeout"
        assert b"x-request-id:" in data.lower()
        assert simulator.stats()["total"] == 0
        sock.close()


async def test_a_body_trickled_a_byte_at_a_time_gets_408(simulator: Simulator) -> None:
    settings = Settings(backend_urls=(simulator.url,), client_body_timeout=0.6)
    async with run_gateway(settings) as gw:
        sock = await raw_connect(gw.port)
        loop = asyncio.get_running_loop()
        request = _request(chat_body())
        head, _, body = request.partition(b"\r\n\r\n")
        await loop.sock_sendall(sock, head + b"\r\n\r\n")
        t0 = time.monotonic()

        async def trickle() -> None:
            for byte in body:
                await loop.sock_sendall(sock, bytes([byte]))
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        data = await read_until_closed(sock, timeout=5)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await sender
        assert 0.5 <= time.monotonic() - t0 < 0.6 + 3.0
        assert _status(data) == 408
        assert simulator.stats()["total"] == 0
        sock.close()


async def _closed_after_one_answer(port: int, wait: float) -> float:
    """Seconds from the end of one answer on a keep-alive connection until the gateway closes it
    (within ``wait``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health/live HTTP/1.1\r\nhost: gw\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        t0 = time.monotonic()
        async with asyncio.timeout(wait):
            assert await reader.read() == b""
        return time.monotonic() - t0
    finally:
        writer.close()


async def test_idle_keep_alive_connections_are_closed(simulator: Simulator) -> None:
    settings = Settings(backend_urls=(simulator.url,), client_idle_timeout=0.5)
    async with run_gateway(settings) as gw:
        assert 0.4 <= await _closed_after_one_answer(gw.port, 3) < 0.5 + 3.0


async def test_a_phase_deadline_moved_later_is_kept_not_fired_at_the_earlier_one(
    simulator: Simulator,
) -> None:
    # The connection's one timer is armed for the header deadline (0.4 s) when it opens; the
    # answer comes at once and the idle wait (1.5 s) moves the deadline later: the connection
    # must stay open past the first deadline and close at the second.
    settings = Settings(
        backend_urls=(simulator.url,), client_header_timeout=0.4, client_idle_timeout=1.5
    )
    async with run_gateway(settings) as gw:
        assert 1.4 <= await _closed_after_one_answer(gw.port, 5) < 1.5 + 3.0


async def test_past_max_connections_one_more_gets_503_at_once(simulator: Simulator) -> None:
    settings = Settings(backend_urls=(simulator.url,), max_connections=20)
    async with run_gateway(settings) as gw:
        held = [await raw_connect(gw.port) for _ in range(20)]
        await wait_for(lambda: len(gw.runner.http.connections) == 20, timeout=5)
        extra = await raw_connect(gw.port)
        t0 = time.monotonic()
        data = await read_until_closed(extra, timeout=3)
        assert time.monotonic() - t0 < 2.0  # at once: no timer involved
        assert _status(data) == 503
        body = _json_body(data)
        assert body["error"]["type"] == "too_many_connections"
        assert b"retry-after: 1" in data.lower()
        extra.close()
        for sock in held[:5]:
            sock.close()
        await wait_for(lambda: len(gw.runner.http.connections) == 15, timeout=5)
        async with httpx.AsyncClient() as client:
            assert (await client.post(gw.url + CHAT, json=chat_body())).status_code == 200
        for sock in held[5:]:
            sock.close()


async def _hold_a_stream(port: int) -> socket.socket:
    """A raw client whose stream holds a permit until it is read to its end."""
    sock = await raw_connect(port)
    await asyncio.get_running_loop().sock_sendall(sock, _request(chat_body(stream=True)))
    assert b"data: " in await read_until(sock, b"data: ", timeout=5)
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with a reset (RST), as a client killed mid-request does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_clients_that_reset_right_after_a_whole_request_leave_no_place_held(
    simulator: Simulator,
) -> None:
    # A request takes its permit or queue place when it is whole, before its task runs; a client
    # that resets in that instant (before the task, or during it) must give the place back.
    simulator.configure(itl=0.05, tokens=80)
    settings = Settings(
        backend_urls=(simulator.url,), max_concurrent_requests=2, max_queued_requests=1
    )
    async with run_gateway(settings) as gw:
        adm = gw.gateway.admission
        held = await _hold_a_stream(gw.port)
        loop = asyncio.get_running_loop()
        for _ in range(20):
            # One takes the free permit, the next the one queue place, a third is refused.
            socks = [await raw_connect(gw.port) for _ in range(3)]
            for sock in socks:
                await loop.sock_sendall(sock, _request(chat_body(stream=True)))
            for sock in socks:
                _reset(sock)
            await asyncio.sleep(0)
        await wait_for(
            lambda: adm.in_flight == 1 and adm.queued == 0 and len(gw.gateway.active) == 1,
            timeout=5,
        )
        held.close()
        await wait_for(lambda: adm.in_flight == 0, timeout=10)
        async with httpx.AsyncClient() as client:
            answers = await asyncio.gather(
                *(client.post(gw.url + CHAT, json=chat_body()) for _ in range(2))
            )
        assert [a.status_code for a in answers] == [200, 200]  # both permits are free again


async def test_a_full_gateway_refuses_at_once_and_keeps_the_connection(
    simulator: Simulator,
) -> None:
    simulator.configure(itl=0.05, tokens=40)
    settings = Settings(
        backend_urls=(simulator.url,), max_concurrent_requests=1, max_queued_requests=0
    )
    async with run_gateway(settings) as gw:
        held = await _hold_a_stream(gw.port)
        sock = await raw_connect(gw.port)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, _request(chat_body()))
        refused = await read_until(sock, b"}", timeout=5)
        assert _status(refused) == 503
        assert _json_body(refused)["error"]["type"] == "overloaded"
        assert b"retry-after: " in refused.lower()
        assert gw.gateway.admission.rejected_full_total == 1
        await read_until(held, b"[DONE]", timeout=10)  # the stream ends; its permit is free
        held.close()
        await wait_for(lambda: gw.gateway.admission.in_flight == 0, timeout=5)
        # The refusal came after the whole request: the same connection goes on.
        await loop.sock_sendall(sock, _request(chat_body()))
        answer = await read_until(sock, b'"usage"', timeout=5)
        sock.close()
        assert _status(answer) == 200


async def test_a_request_naming_an_unknown_model_holds_no_permit_while_the_list_is_slow() -> None:
    # A request takes its place when it is whole; one whose model must be checked against a model
    # list that is slow to come gives the place back for that wait, so that naming unknown models
    # cannot hold the permits other requests need.
    models_asked = 0

    async def backend(head: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal models_asked
        if head.startswith(b"GET /v1/models"):
            models_asked += 1
            if models_asked > 1:
                await asyncio.sleep(5)  # every later list is slow
            body = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
        else:
            body = (
                b'{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,'
                b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}'
            )
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await w.drain()

    rogue = RogueBackend(backend)
    async with rogue.running():
        settings = Settings(
            backend_urls=(rogue.url,),
            max_concurrent_requests=1,
            max_queued_requests=0,
            model_check_timeout=3.0,
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=10) as client:
            first = await client.post(gw.url + CHAT, json={**NO_MODEL, "model": "m"})
            assert first.status_code == 200  # the list is in (and fresh)
            await asyncio.sleep(1.2)  # past the least time between two fetches
            unknown = asyncio.create_task(
                client.post(gw.url + CHAT, json={**NO_MODEL, "model": "nope"})
            )
            await wait_for(lambda: models_asked == 2, timeout=5)  # it waits for the list
            known = await client.post(gw.url + CHAT, json={**NO_MODEL, "model": "m"})
            assert known.status_code == 200, known.text  # not 503: the permit was free
            # Still waiting for the list, and holding nothing.
            await wait_for(lambda: gw.gateway.admission.in_flight == 0, timeout=2)
            assert not unknown.done()
            # The check gives up at its timeout and the backend judges the model.
            assert (await unknown).status_code == 200


def _queue_depth(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("vllm_gateway_queue_depth"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no queue depth in /metrics")


async def test_bodies_queued_behind_a_held_slot_hold_no_parsed_json(simulator: Simulator) -> None:
    # A parsed body takes up to ~30 times its bytes, which the buffer budget does not count: a 4
    # MiB body of ``[]`` items parses to 85 MiB, and ten of them waiting in the queue once added
    # 1 GiB of RSS. A request that waits in the queue lets go of its parsed body and parses it
    # again when its slot comes.
    simulator.configure(tokens=3000, itl=0.01)
    env = {
        "VLLM_BACKEND_URL": simulator.url,
        "VLLM_MAX_CONCURRENT_REQUESTS": "1",
        "VLLM_MAX_QUEUED_REQUESTS": "20",
        "VLLM_MAX_BODY_BYTES": str(8 << 20),
    }
    items = (4 << 20) // 3
    body = b'{"model":"sim-model","messages":[{"role":"user","content":"hi"}],"max_tokens":1,'
    body += b'"padding":[' + b"[]," * items + b"[]]}"
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    with spawn_gateway(env, name="queued-json") as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        pid = gw.process.pid
        loop = asyncio.get_running_loop()
        holder = await raw_connect(port)  # a stream that holds the one slot for 30 s
        await loop.sock_sendall(holder, _request(chat_body(stream=True, max_tokens=3000)))
        assert b"data: " in await read_until(holder, b"data: ", timeout=10)
        base, _ = rss_kib(pid)
        queued = []
        async with httpx.AsyncClient(timeout=10) as client:
            for n in range(10):
                sock = await raw_connect(port)
                await loop.sock_sendall(sock, head + body)
                queued.append(sock)

                async def in_queue(n: int = n) -> bool:
                    return _queue_depth((await client.get(gw.url + "/metrics")).text) == n + 1

                async with asyncio.timeout(20):
                    while not await in_queue():  # noqa: ASYNC110 - another process's state
                        await asyncio.sleep(0.05)
        grown, _ = rss_kib(pid)
        for sock in [*queued, holder]:
            sock.close()
        # 40 MiB of bodies, in the budget; their parsed forms would be 850 MiB more.
        assert grown - base < 200 * 1024, f"RSS grew by {(grown - base) // 1024} MiB"


async def test_the_model_list_is_asked_for_at_start(simulator: Simulator) -> None:
    # So that the first burst after a start finds its model known and keeps the places it took
    # at arrival, instead of every request giving its place back to wait for the list.
    async with run_gateway(Settings(backend_urls=(simulator.url,))) as gw:
        await wait_for(lambda: gw.gateway.models.known("sim-model"), timeout=5)
        assert simulator.stats()["completed"] == 0  # no request was needed for it


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_half_closes_after_its_request_gets_its_answer(
    simulator: Simulator, stream: bool
) -> None:
    settings = Settings(backend_urls=(simulator.url,))
    async with run_gateway(settings) as gw:
        sock = await raw_connect(gw.port)
        await asyncio.get_running_loop().sock_sendall(sock, _request(chat_body(stream=stream)))
        sock.shutdown(socket.SHUT_WR)
        data = await read_until_closed(sock, timeout=10)
        sock.close()
        assert _status(data) == 200
        if stream:
            assert b"data: [DONE]" in data
        else:
            assert _json_body(data)["choices"]
        assert simulator.stats()["completed"] == 1


async def _431_with_flat_memory(gw: Any, head: bytes, piece: bytes, count: int) -> None:
    """Send ``head``, then ``piece`` ``count`` times while reading the answer: it is 431
    headers_too_large, and the gateway's peak RSS grew by less than 8 MiB."""
    port = int(gw.url.rsplit(":", 1)[1])
    pid = gw.process.pid
    _clear_peak(pid)
    base, _ = rss_kib(pid)
    sock = await raw_connect(port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, head)

    async def flood() -> None:
        for _ in range(count):
            await loop.sock_sendall(sock, piece)

    sender = asyncio.create_task(flood())
    data = await read_until_closed(sock, timeout=10)
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError, OSError):
        await sender
    sock.close()
    assert _status(data) == 431
    assert _json_body(data)["error"]["type"] == "headers_too_large"
    _, peak = rss_kib(pid)
    assert peak - base < 8 * 1024, f"peak RSS grew by {peak - base} KiB"


async def test_a_32_mib_header_gets_431_and_memory_stays_flat(simulator: Simulator) -> None:
    with spawn_gateway({"VLLM_BACKEND_URL": simulator.url}, name="big-header") as gw:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nx-junk: "
        await _431_with_flat_memory(gw, head, b"a" * (1 << 20), 32)


@pytest.mark.parametrize("shape", ["one_value", "tiny_fields"])
async def test_trailers_past_their_bounds_get_431_and_memory_stays_flat(
    simulator: Simulator, shape: str
) -> None:
    """32 MiB of one trailer value once added 64 MiB of RSS, and 6 MiB of tiny trailer fields
    92 MiB, merged into the request's headers."""
    with spawn_gateway({"VLLM_BACKEND_URL": simulator.url}, name=f"trailers-{shape}") as gw:
        body = orjson.dumps(chat_body())
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
            b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n" % (len(body), body)
        )
        if shape == "one_value":
            await _431_with_flat_memory(gw, head + b"x-trailer: ", b"a" * (1 << 20), 32)
        else:
            await _431_with_flat_memory(gw, head, b"t: 1\r\n" * (1 << 17), 6)
        assert simulator.stats()["total"] == 0


async def test_a_valid_request_followed_by_junk_gets_its_own_answer(simulator: Simulator) -> None:
    """The junk behind a valid request once got the 400 while the backend ran the request: the
    client was told it failed and the GPU did the work. Now: the request's 200, then the junk's
    400, and the backend ran exactly the one request."""
    async with run_gateway(backend_urls=(simulator.url,)) as gw:
        sock = await raw_connect(gw.port)
        await asyncio.get_running_loop().sock_sendall(sock, _request(chat_body()) + b"JUNK\r\n\r\n")
        data = await read_until_closed(sock, timeout=10)
        sock.close()
        first, _, rest = data.partition(b"HTTP/1.1 400")
        assert _status(first) == 200 and _json_body(first)["choices"]
        assert rest, "the junk got no answer of its own"
        assert simulator.stats()["total"] == 1
        await wait_for(lambda: not gw.runner.http.connections and gw.app.budget.used == 0)


async def test_refused_pipelines_give_every_buffered_byte_back(simulator: Simulator) -> None:
    """A lasting denial of service from anyone: bodies read ahead behind an early refusal were
    never given back to the buffer budget. With a 1 MiB budget, ten such connections once left it
    full and every later request with a body got 503 until a restart."""
    filler = {"user": "x" * 100_000}  # a body of 100 KB that the backend takes
    async with run_gateway(backend_urls=(simulator.url,), buffer_budget_bytes=1 << 20) as gw:
        loop = asyncio.get_running_loop()
        for _ in range(10):
            sock = await raw_connect(gw.port)
            await loop.sock_sendall(
                sock,
                _request(chat_body(stream=True, max_tokens=32))
                + _request({**chat_body(), **filler})
                + b"\x00junk\r\n\r\n",
            )
            await read_until_closed(sock, timeout=10)
            sock.close()
        await wait_for(lambda: not gw.runner.http.connections and gw.app.budget.used == 0)
        async with httpx.AsyncClient() as client:
            resp = await client.post(gw.url + CHAT, json={**chat_body(), **filler}, timeout=10)
        assert resp.status_code == 200, resp.text


async def test_an_upgrade_on_a_stored_response_route_is_refused_and_not_forwarded(
    simulator: Simulator,
) -> None:
    """'Upgrade: h2c' once got a 400 while the GET (or a cancel) still went to the backend."""

    def store_calls() -> int:
        routes = simulator.stats()["routes"]
        return sum(v["total"] for k, v in routes.items() if k.startswith("/v1/responses/"))

    async with run_gateway(backend_urls=(simulator.url,)) as gw, httpx.AsyncClient() as client:
        created = await client.post(
            gw.url + "/v1/responses", json={"model": "sim-model", "input": "hi"}, timeout=10
        )
        rid = created.json()["id"].encode()
        retrieved = await client.get(gw.url + "/v1/responses/" + rid.decode(), timeout=10)
        assert retrieved.status_code == 200
        before = store_calls()
        assert before == 1  # the count sees a retrieve that went upstream
        for head in (
            b"GET /v1/responses/%s HTTP/1.1\r\nhost: gw\r\n" % rid,
            b"POST /v1/responses/%s/cancel HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n" % rid,
        ):
            sock = await raw_connect(gw.port)
            await asyncio.get_running_loop().sock_sendall(
                sock, head + b"upgrade: h2c\r\nconnection: Upgrade, HTTP2-Settings\r\n\r\n"
            )
            data = await read_until_closed(sock, timeout=5)
            sock.close()
            assert _status(data) == 400
        assert store_calls() == before


async def test_headers_past_the_limit_in_one_read_get_431(simulator: Simulator) -> None:
    settings = Settings(backend_urls=(simulator.url,), max_header_bytes=8192)
    async with run_gateway(settings) as gw:
        sock = await raw_connect(gw.port)
        await asyncio.get_running_loop().sock_sendall(
            sock, _request(chat_body(), b"x-junk: " + b"a" * 12000 + b"\r\n")
        )
        data = await read_until_closed(sock, timeout=5)
        sock.close()
        assert _status(data) == 431
        assert simulator.stats()["total"] == 0


async def test_options_needs_the_key_when_cors_is_off(simulator: Simulator) -> None:
    settings = Settings(backend_urls=(simulator.url,), api_keys=frozenset({"k"}))
    async with run_gateway(settings) as gw, httpx.AsyncClient() as client:
        bodies = []
        for path in (CHAT, "/no/such/route", "/v1/models"):
            resp = await client.options(gw.url + path)
            assert resp.status_code == 401, path
            body = resp.json()
            body["error"].pop("request_id")
            bodies.append(body)
        assert bodies[0] == bodies[1] == bodies[2]  # nothing tells which routes exist


async def test_a_malformed_request_gets_a_json_400_with_a_request_id(
    simulator: Simulator,
) -> None:
    async with run_gateway(Settings(backend_urls=(simulator.url,))) as gw:
        for junk in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"POST /x HTTP/1.1\r\nbad\r\n\r\n",
        ):
            sock = await raw_connect(gw.port)
            await asyncio.get_running_loop().sock_sendall(sock, junk)
            data = await read_until_closed(sock, timeout=3)
            sock.close()
            assert _status(data) == 400, junk
            assert _json_body(data)["error"]["type"] == "malformed_request"
            assert b"x-request-id:" in data.lower()


async def test_only_json_media_types_are_taken_as_json(simulator: Simulator) -> None:
    async with (
        run_gateway(Settings(backend_urls=(simulator.url,))) as gw,
        httpx.AsyncClient() as client,
    ):
        body = orjson.dumps(chat_body())
        for ctype, status in (
            ("text/notjson", 415),
            ("application/jsonx", 415),
            ("multipart/form-data", 415),
            ("application/json", 200),
            ("Application/JSON; charset=utf-8", 200),
            ("application/vnd.api+json", 200),
        ):
            resp = await client.post(gw.url + CHAT, content=body, headers={"content-type": ctype})
            assert resp.status_code == status, ctype


async def test_forwarded_for_is_believed_only_from_a_trusted_proxy(simulator: Simulator) -> None:
    base = Settings(backend_urls=(simulator.url,), rate_limit_rpm=3)
    async with httpx.AsyncClient() as client:
        async with run_gateway(base) as gw:
            statuses = []
            for i in range(8):
                resp = await client.post(
                    gw.url + CHAT, json=chat_body(), headers={"x-forwarded-for": f"10.0.0.{i}"}
                )
                statuses.append(resp.status_code)
            # Regression: the 4th got 429, and the next ones, each naming another address, 200.
            assert statuses == [200, 200, 200] + [429] * 5
        async with run_gateway(base.replace(trusted_proxies=("127.0.0.1/32",))) as gw:
            for i in range(4):
                resp = await client.post(
                    gw.url + CHAT, json=chat_body(), headers={"x-forwarded-for": f"10.0.0.{i}"}
                )
                assert resp.status_code == 200  # each forwarded client has its own bucket
            for _ in range(2):
                resp = await client.post(
                    gw.url + CHAT, json=chat_body(), headers={"x-forwarded-for": "10.0.0.1"}
                )
            assert resp.status_code == 200
            resp = await client.post(
                gw.url + CHAT, json=chat_body(), headers={"x-forwarded-for": "10.0.0.1"}
            )
            assert resp.status_code == 429  # 10.0.0.1's fourth


async def test_a_backends_html_4xx_never_reaches_the_client() -> None:
    page = b"<html><body><pre>Traceback (most recent call last): secret.py</pre></body></html>"

    async def html_400(head: bytes, reader: Any, writer: Any) -> None:
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s"
            % (len(page), page)
        )
        await writer.drain()

    rogue = RogueBackend(html_400)
    async with rogue.running(), run_gateway(Settings(backend_urls=(rogue.url,))) as gw:
        async with httpx.AsyncClient() as client:
            resp = await client.post(gw.url + CHAT, json=NO_MODEL)
        assert resp.status_code == 400
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["error"]["type"] == "backend_rejected"
        assert b"Traceback" not in resp.content and b"secret" not in resp.content


# --- the backend side -------------------------------------------------------------------------


async def test_a_backend_whose_header_line_never_ends_is_cut_off() -> None:
    async def endless_header(head: bytes, reader: Any, writer: Any) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nx-junk: ")
        piece = b"a" * 65536
        while True:
            writer.write(piece)
            await writer.drain()

    rogue = RogueBackend(endless_header)
    async with rogue.running():
        with spawn_gateway({"VLLM_BACKEND_URL": rogue.url}, name="endless-header") as gw:
            pid = gw.process.pid
            _clear_peak(pid)
            base, _ = rss_kib(pid)
            async with httpx.AsyncClient(timeout=30) as client:
                t0 = time.monotonic()
                resp = await client.post(gw.url + CHAT, json=NO_MODEL)
            assert time.monotonic() - t0 < 5  # long before the 60 s first-token timeout
            assert resp.status_code == 502
            assert resp.json()["error"]["type"] == "bad_backend_response"
            _, peak = rss_kib(pid)
            assert peak - base < 8 * 1024, f"peak RSS grew by {peak - base} KiB"
            await wait_for(lambda: rogue.open == 0, timeout=5)


@pytest.mark.parametrize("declared", [True, False])
async def test_huge_backend_bodies_are_refused_without_being_held(declared: bool) -> None:
    size = 100 * 1000 * 1000

    async def huge_body(head: bytes, reader: Any, writer: Any) -> None:
        if declared:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n{"
                % size
            )
            piece = b" " * 65536
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + chunk(b"{")
            )
            piece = chunk(b" " * 65536)
        for _ in range(size // 65536):
            writer.write(piece)
            await writer.drain()

    rogue = RogueBackend(huge_body)
    async with rogue.running():
        with spawn_gateway({"VLLM_BACKEND_URL": rogue.url}, name="huge-body") as gw:
            pid = gw.process.pid
            _clear_peak(pid)
            base, _ = rss_kib(pid)
            async with httpx.AsyncClient(timeout=60) as client:
                results = await asyncio.gather(
                    *(client.post(gw.url + CHAT, json=NO_MODEL) for _ in range(8))
                )
            assert [r.status_code for r in results] == [502] * 8
            _, peak = rss_kib(pid)
            # At most the 16 MiB cap each, and in practice far less: each is dropped at the cap.
            assert peak - base < 8 * 20 * 1024, f"peak RSS grew by {peak - base} KiB"
            await wait_for(lambda: rogue.open == 0, timeout=5)


async def test_buffered_answers_beyond_the_budget_get_503() -> None:
    body = b'{"choices": [], "pad": "' + b"x" * (1 << 20) + b'"}'
    release = asyncio.Event()

    async def big_answer(head: bytes, reader: Any, writer: Any) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(body)
        )
        half = len(body) // 2
        writer.write(body[:half])
        await writer.drain()
        await release.wait()  # every answer is half-held at once
        writer.write(body[half:])
        await writer.drain()

    rogue = RogueBackend(big_answer)
    async with rogue.running():
        settings = Settings(backend_urls=(rogue.url,), buffer_budget_bytes=2 << 20)
        async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=30) as client:
            tasks = [
                asyncio.create_task(client.post(gw.url + CHAT, json=NO_MODEL)) for _ in range(6)
            ]
            # (>= : the gateway's own health probe is a request too)
            await wait_for(lambda: rogue.requests >= 6, timeout=5)
            await asyncio.sleep(0.3)
            release.set()
            results = await asyncio.gather(*tasks)
            statuses = sorted(r.status_code for r in results)
            assert 200 in statuses and 503 in statuses
            assert set(statuses) <= {200, 503}
            for r in results:
                if r.status_code == 503:
                    assert r.json()["error"]["type"] == "overloaded"
            assert gw.app.budget.used == 0  # every take was given back


# --- the memory budget, all at once -----------------------------------------------------------


def memory_budget_kib(
    *, max_connections: int, max_header_bytes: int, buffer_budget: int, max_concurrent: int
) -> int:
    """docs/reliability.md's stated bound on what peers can add to the gateway's RSS, in KiB:
    per connection its head, the heads read ahead in one read (256 KiB), its write buffer (64 KiB
    high water) and one of the gateway's own answers written whole (80 KiB); the buffer budget for
    bodies; per stream in flight the unread backend bytes (512 KiB) and the unfinished event with
    the block written past the high water (1.5 MiB); plus 16 MiB for the allocator's own slack."""
    per_connection = max_header_bytes + (256 + 64 + 80) * 1024
    per_stream = 2 << 20
    total = (
        max_connections * per_connection + buffer_budget + max_concurrent * per_stream + (16 << 20)
    )
    return total // 1024


async def test_rss_stays_within_the_stated_budget_whatever_peers_send() -> None:
    body = b'{"choices": [], "pad": "' + b"x" * (3 << 20) + b'"}'

    async def mixed(head: bytes, reader: Any, writer: Any) -> None:
        if b"blast" in head:
            await _blast(head, reader, writer)
            return
        if b"huge" in head:  # past the cap: dropped at it
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + chunk(b"{")
            )
            for _ in range(1600):
                writer.write(chunk(b" " * 65536))
                await writer.drain()
            return
        writer.write(  # under the cap: held whole, within the buffer budget
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()

    limits = {
        "max_connections": 300,
        "max_header_bytes": 32 * 1024,
        "buffer_budget": 32 << 20,
        "max_concurrent": 40,
    }
    env = {
        "VLLM_MAX_CONNECTIONS": str(limits["max_connections"]),
        "VLLM_MAX_HEADER_BYTES": str(limits["max_header_bytes"]),
        "VLLM_BUFFER_BUDGET_BYTES": str(limits["buffer_budget"]),
        "VLLM_MAX_CONCURRENT_REQUESTS": str(limits["max_concurrent"]),
        "VLLM_MAX_BACKEND_BODY_BYTES": str(4 << 20),
        "VLLM_MAX_BODY_BYTES": str(2 << 20),
        "VLLM_CLIENT_SEND_TIMEOUT_SECONDS": "3",
        "VLLM_CLIENT_HEADER_TIMEOUT_SECONDS": "20",
        "VLLM_CLIENT_BODY_TIMEOUT_SECONDS": "20",
        "VLLM_LOG_LEVEL": "warning",
    }
    rogue = RogueBackend(mixed)
    async with rogue.running():
        with spawn_gateway({**env, "VLLM_BACKEND_URL": rogue.url}, name="rss-budget") as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            pid = gw.process.pid
            loop = asyncio.get_running_loop()
            _clear_peak(pid)
            base, _ = rss_kib(pid)
            socks: list[socket.socket] = []

            async def header_hog() -> None:  # headers just under the cap, never finished
                sock = await raw_connect(port)
                socks.append(sock)
                await loop.sock_sendall(sock, b"POST /v1/chat/completions HTTP/1.1\r\nx-a: ")
                await loop.sock_sendall(sock, b"a" * (30 * 1024))

            async def body_hog() -> None:  # a body just under its cap, never finished
                sock = await raw_connect(port)
                socks.append(sock)
                await loop.sock_sendall(
                    sock,
                    b"POST /v1/chat/completions HTTP/1.1\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n" % (2 << 20),
                )
                await loop.sock_sendall(sock, b" " * ((2 << 20) - 10))

            async def stuck_stream(i: int) -> None:  # a stream nobody reads
                sock = await raw_connect(port, rcvbuf=4096)
                socks.append(sock)
                await loop.sock_sendall(
                    sock,
                    _request({**NO_MODEL, "stream": True}, b"x-request-id: blast-%d\r\n" % i),
                )

            async def reader(tag: bytes, i: int) -> None:
                sock = await raw_connect(port)
                socks.append(sock)
                await loop.sock_sendall(
                    sock, _request(NO_MODEL, b"x-request-id: %s-%d\r\n" % (tag, i))
                )
                with contextlib.suppress(TimeoutError):
                    await read_until_closed(sock, timeout=20, limit=0)

            await asyncio.gather(*(header_hog() for _ in range(150)))
            await asyncio.gather(*(body_hog() for _ in range(100)))  # 200 MiB offered
            await asyncio.gather(*(stuck_stream(i) for i in range(20)))
            await asyncio.gather(
                *(reader(b"huge", i) for i in range(10)), *(reader(b"big", i) for i in range(15))
            )
            await asyncio.sleep(1.0)
            _, peak = rss_kib(pid)
            for sock in socks:
                sock.close()
            budget = memory_budget_kib(**limits)
            print(
                f"RSS: base {base} KiB, peak {peak} KiB, growth {peak - base} KiB, "
                f"budget {budget} KiB"
            )
            assert peak - base <= budget
