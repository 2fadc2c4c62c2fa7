"""Security cases S1-S7 of docs/reliability.md, against the real gateway and simulator on loopback.

S1/S2 API keys on every route; S3 body limits read no further than the cap; S4 validation forwards
nothing; S5 the upstream comes from configuration only (no body field, Host header, absolute
request URI, redirect or proxy variable changes it, and the client's key never travels upstream);
S6 backend tracebacks stay hidden; S7 one flooding key is limited alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningGateway, chat_body, run_gateway, spawn_gateway, wait_for
from vllm_gateway.settings import Settings, load_settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
KEYS = frozenset({"key-one", "key-two"})


@pytest.fixture
async def keyed(simulator: Simulator) -> AsyncIterator[RunningGateway]:
    async with run_gateway(Settings(backend_urls=(simulator.url,), api_keys=KEYS)) as gw:
        yield gw


def _minus_request_id(body: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = orjson.loads(body)
    obj["error"].pop("request_id", None)
    return obj


# --- S1, S2: API keys ---------------------------------------------------------------------------


async def test_s1_missing_wrong_or_malformed_keys_get_the_same_401(
    keyed: RunningGateway, client: httpx.AsyncClient
) -> None:
    bad: list[dict[str, str]] = [
        {},
        {"authorization": "Bearer key-three"},
        {"authorization": "Bearer key-one-and-more"},
        {"authorization": "Bearer"},
        {"authorization": "Basic a2V5LW9uZTo="},
        {"authorization": "key-one"},
        {"x-api-key": "nope"},
        {"x-api-key": ""},
        {"authorization": "Bearer\tkey-one"},
        {"authorization": "Bearer key-one, Bearer key-two"},
    ]
    bodies = []
    for headers in bad:
        resp = await client.post(keyed.url + CHAT, json=chat_body(), headers=headers)
        assert resp.status_code == 401, headers
        assert resp.headers["www-authenticate"] == "Bearer"
        bodies.append(_minus_request_id(resp.content))
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["error"]["type"] == "authentication_error"
    for headers in (
        {"authorization": "Bearer key-one"},
        {"authorization": "bearer key-two"},
        {"x-api-key": "key-one"},
    ):
        resp = await client.post(keyed.url + CHAT, json=chat_body(), headers=headers)
        assert resp.status_code == 200, headers


async def test_s2_every_route_but_the_probes_needs_a_key(
    keyed: RunningGateway, client: httpx.AsyncClient
) -> None:
    open_routes = {"/health/live", "/health/ready", "/v1/health", "/health", "/ping"}
    paths = {
        path for r in keyed.app.api.routes if isinstance(path := getattr(r, "path", None), str)
    }
    paths |= {
        CHAT,
        "/v1/completions",
        "/v1/models",
        "/metrics",
        "/docs",
        "/openapi.json",
        "/status",
        "/status/data",
        "/no/such/route",
    }
    assert {"/metrics", "/docs", "/openapi.json", "/v1/models"} <= paths
    for path in sorted(paths - open_routes):
        for method in ("GET", "POST"):
            resp = await client.request(method, keyed.url + path)
            assert resp.status_code == 401, (method, path, resp.status_code)
        ok = await client.get(keyed.url + path, headers={"authorization": "Bearer key-one"})
        assert ok.status_code != 401, path
    for path in sorted(open_routes):
        assert (await client.get(keyed.url + path)).status_code == 200, path


# --- S3: request bodies -------------------------------------------------------------------------


async def _raw(port: int, head: bytes, body: bytes, wait: float = 3.0) -> bytes:
    """Send a head and part of a body, keep the connection open, return what the gateway answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        async with asyncio.timeout(wait):
            data = await reader.readuntil(b"\r\n\r\n")
        return data
    finally:
        writer.transport.abort()


async def test_s3_oversized_bodies_are_413_before_they_are_read(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    cap = 2048
    async with run_gateway(Settings(backend_urls=(simulator.url,), max_body_bytes=cap)) as gw:
        # By Content-Length: 10 MB announced, 10 bytes sent; the answer comes without the rest.
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n"
        )
        assert (await _raw(gw.port, head, b'{"model":')).startswith(b"HTTP/1.1 413")
        # Streamed: chunked, past the cap, never finished; the answer still comes.
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (1500, b" " * 1500)
        assert (await _raw(gw.port, head, chunk * 2)).startswith(b"HTTP/1.1 413")
        for content, ctype, status in (
            (b"{nope", "application/json", 400),
            (orjson.dumps(chat_body()), "text/plain", 415),
        ):
            resp = await client.post(
                gw.url + CHAT, content=content, headers={"content-type": ctype}
            )
            assert resp.status_code == status
        await wait_for(lambda: gw.gateway.admission.in_flight == 0)
        assert simulator.stats()["total"] == 0


# --- S4: validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", "10"),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("n", 0),
        ("n", 1000),
        ("n", "2"),
        ("temperature", -1),
        ("temperature", 3.5),
        ("temperature", "hot"),
        ("top_p", 0),
        ("top_p", 1.5),
        ("stream", "yes"),
        ("stream", 1),
        ("messages", []),
        ("messages", "hi"),
        ("messages", [{"content": "no role"}]),
        ("model", ""),
        ("model", 7),
    ],
)
async def test_s4_bad_fields_are_400_naming_the_field_and_nothing_is_forwarded(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient, field: str, value: Any
) -> None:
    body = chat_body()
    body[field] = value
    resp = await client.post(gateway.url + CHAT, json=body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"].startswith(field) and field in err["message"]
    assert simulator.stats()["total"] == 0


async def test_s4_unknown_model_is_404_on_both_routes_and_nothing_is_forwarded(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    for path, body in (
        (CHAT, chat_body(model="gpt-nope", stream=True)),
        ("/v1/completions", {"model": "gpt-nope", "prompt": "x"}),
    ):
        resp = await client.post(gateway.url + path, json=body)
        assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"
    assert simulator.stats()["total"] == 0


# --- S5: the upstream comes from configuration only ----------------------------------------------


@pytest.fixture
async def decoy() -> AsyncIterator[Simulator]:
    async with run_simulator(SimulatorConfig(ttft=0.01, itl=0.005)) as sim:
        yield sim


async def test_s5_nothing_in_the_request_chooses_the_upstream(
    gateway: RunningGateway, simulator: Simulator, decoy: Simulator, client: httpx.AsyncClient
) -> None:
    extras: tuple[dict[str, Any], ...] = (
        {"base_url": decoy.url},
        {"api_base": decoy.url + "/v1"},
        {"url": decoy.url},
        {"backend": decoy.url},
    )
    for extra in extras:
        resp = await client.post(gateway.url + CHAT, json=chat_body(**extra))
        assert resp.status_code == 200
    resp = await client.post(
        gateway.url + CHAT, json=chat_body(), headers={"host": f"127.0.0.1:{decoy.port}"}
    )
    assert resp.status_code == 200
    # An absolute URI in the request line names the decoy; the gateway still uses its backend.
    body = orjson.dumps(chat_body())
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        b"POST %s/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (decoy.url.encode(), decoy.port, len(body), body)
    )
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") or answer.startswith(b"HTTP/1.1 404")
    assert decoy.stats()["total"] == 0 and decoy.stats()["connections"] == 0
    assert simulator.stats()["total"] >= 5


@contextlib.asynccontextmanager
async def _redirector(location: str) -> AsyncIterator[str]:
    """A backend that answers every request with 307 to ``location``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 307 Temporary Redirect\r\nLocation: "
                + location.encode()
                + b"/v1/chat/completions\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_s5_redirects_from_the_backend_are_not_followed(
    decoy: Simulator, client: httpx.AsyncClient
) -> None:
    async with _redirector(decoy.url) as url, run_gateway(Settings(backend_urls=(url,))) as gw:
        for stream in (False, True):
            resp = await client.post(gw.url + CHAT, json=chat_body(stream=stream))
            assert (
                resp.status_code == 502 and resp.json()["error"]["type"] == "bad_backend_response"
            )
        assert decoy.url not in resp.text
    assert decoy.stats()["total"] == 0 and decoy.stats()["connections"] == 0


async def test_s5_proxy_variables_are_ignored(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens there
    env = {
        "VLLM_BACKEND_URL": simulator.url,
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "ALL_PROXY": dead,
        "http_proxy": dead,
        "https_proxy": dead,
        "all_proxy": dead,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    with spawn_gateway(env, name="proxy-env") as gw:
        resp = await client.post(gw.url + CHAT, json=chat_body())
        assert resp.status_code == 200
        assert (await client.get(gw.url + "/health/ready")).status_code == 200
    assert simulator.stats()["total"] == 1


async def test_s5_the_clients_key_never_reaches_the_backend(client: httpx.AsyncClient) -> None:
    async with run_simulator(
        SimulatorConfig(ttft=0.01, itl=0.005, api_key="backend-secret")
    ) as sim:
        settings = Settings(
            backend_urls=(sim.url,),
            api_keys=frozenset({"client-secret"}),
            backend_api_key="backend-secret",
        )
        async with run_gateway(settings) as gw:
            for stream in (False, True):
                resp = await client.post(
                    gw.url + CHAT,
                    json=chat_body(stream=stream),
                    headers={"authorization": "Bearer client-secret"},
                )
                assert resp.status_code == 200
            resp = await client.post(
                gw.url + CHAT, json=chat_body(), headers={"x-api-key": "client-secret"}
            )
            assert resp.status_code == 200
        records = sim.stats()["requests"]
        assert len(records) == 3
        for rec in records:
            assert rec["headers"]["authorization"] == "Bearer backend-secret"
            assert "x-api-key" not in rec["headers"]
            assert "client-secret" not in orjson.dumps(rec["headers"]).decode()

    async with run_simulator(SimulatorConfig(ttft=0.01, itl=0.005)) as sim:
        settings = Settings(backend_urls=(sim.url,), api_keys=frozenset({"client-secret"}))
        async with run_gateway(settings) as gw:
            resp = await client.post(
                gw.url + CHAT, json=chat_body(), headers={"authorization": "Bearer client-secret"}
            )
            assert resp.status_code == 200
        assert "authorization" not in sim.stats()["requests"][0]["headers"]


async def test_s5_no_cors_headers_unless_origins_are_configured(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST"}

    def cors(resp: httpx.Response) -> list[str]:
        return [k for k in resp.headers if k.startswith("access-control-")]

    async with run_gateway(Settings(backend_urls=(simulator.url,))) as gw:
        assert cors(await client.options(gw.url + CHAT, headers=preflight)) == []
        resp = await client.post(
            gw.url + CHAT, json=chat_body(), headers={"origin": "https://evil.example"}
        )
        assert resp.status_code == 200 and cors(resp) == []
    async with run_gateway(
        Settings(backend_urls=(simulator.url,), cors_origins=("https://ok.example",))
    ) as gw:
        resp = await client.post(
            gw.url + CHAT, json=chat_body(), headers={"origin": "https://ok.example"}
        )
        assert resp.headers["access-control-allow-origin"] == "https://ok.example"
        resp = await client.post(
            gw.url + CHAT, json=chat_body(), headers={"origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in resp.headers


# --- S6: tracebacks stay hidden -----------------------------------------------------------------


async def test_s6_streamed_request_to_a_failing_backend_shows_no_traceback(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    resp = await client.post(
        gateway.url + CHAT, json=chat_body(stream=True, vllm_sim={"error_traceback": True})
    )
    assert resp.status_code == 502
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code", "request_id"}
    for leak in ("Traceback", "/opt/vllm", 'File "', "10.", simulator.url):
        assert leak not in resp.text


# --- S7: one key floods --------------------------------------------------------------------------


async def test_s7_a_flooding_key_gets_429_and_another_key_neither_queues_nor_meets_the_flood(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = load_settings(
        {
            "VLLM_BACKEND_URL": simulator.url,
            "VLLM_API_KEYS": "flood:flood,calm:calm",
            "VLLM_RATE_LIMIT_RPM": "20",
        }
    )
    async with run_gateway(settings) as gw:
        calm = {"authorization": "Bearer calm"}

        async def latency() -> float:
            start = time.monotonic()
            resp = await client.post(gw.url + CHAT, json=chat_body(), headers=calm)
            assert resp.status_code == 200
            return time.monotonic() - start

        for _ in range(3):
            await latency()
        flood = [
            client.post(gw.url + CHAT, json=chat_body(), headers={"authorization": "Bearer flood"})
            for _ in range(60)
        ]
        ended: list[Any] = []

        class Record:
            def request_ended(self, call: Any) -> None:
                ended.append(call)

        gw.gateway.observers.append(Record())
        results, _ = await asyncio.gather(asyncio.gather(*flood), latency())
        limited = [r for r in results if r.status_code == 429]
        assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
        assert all(r.json()["error"]["type"] == "rate_limited" for r in limited)
        # The flood is refused before admission and never reaches the backend, so the calm key
        # neither waits for a slot nor shares the backend with it. (Timing would only measure
        # this machine; these are what the gateway decides.)
        calm_calls = [c for c in ended if c.tenant == "calm"]
        assert len(calm_calls) == 1 and calm_calls[0].queue_wait == 0.0
        assert calm_calls[0].status == 200
        assert simulator.stats()["total"] == 3 + (60 - len(limited)) + 1
