"""Cases S10 (request ids) and S11 of docs/reliability.md, against the real gateway in front of the
simulator with two tenants' keys (and, for the default text log, the gateway as a child process).

S10: the client's ``X-Request-ID`` never reaches vLLM and the gateway's own ids cannot be guessed.
S11: a model name with a line break or of a mebibyte, and a decoded path, leave one log line per
request, a bounded status board, and nothing upstream.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import chat_body, run_gateway, spawn_gateway, wait_for
from tests.integration.rogue import RogueBackend, rss_kib
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.timeout(90)

KEYS = frozenset({"key-a:alpha", "key-b:beta"})
ADMIN = frozenset({"key-root:ops"})
A = {"authorization": "Bearer key-a"}
B = {"authorization": "Bearer key-b"}
ROOT = {"authorization": "Bearer key-root"}
MODEL = "sim-model"


def _settings(sim: Simulator, **changes: Any) -> Settings:
    base = Settings(backend_urls=(sim.url,), api_keys=KEYS, admin_api_keys=ADMIN)
    return base.replace(**changes)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    # Long enough for a background response to still be running while the tests poke at it.
    async with run_simulator(SimulatorConfig(ttft=0.01, itl=0.05, tokens=8)) as s:
        yield s


# --- S10: request ids ---------------------------------------------------------------------------


async def test_s10_the_clients_request_id_never_reaches_the_backend(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    async with run_gateway(_settings(sim)) as gw:

        async def stream(headers: dict[str, str]) -> httpx.Response:
            resp = await client.post(
                gw.url + "/v1/chat/completions",
                json=chat_body(stream=True, model=MODEL),
                headers={**headers, "x-request-id": "same-id"},
            )
            assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
            return resp

        both = await asyncio.gather(stream(A), stream(B))
        # Each client is told its own id back, and its logs know the request by it.
        assert [r.headers["x-request-id"] for r in both] == ["same-id", "same-id"]
        seen = [r["request_id"] for r in sim.stats()["requests"]]
        assert len(seen) == 2 and len(set(seen)) == 2 and "same-id" not in seen
        # The gateway's own ids: nothing in one tells the next.
        fresh = []
        for _ in range(20):
            resp = await client.post(
                gw.url + "/v1/chat/completions", json=chat_body(max_tokens=1), headers=A
            )
            fresh.append(resp.headers["x-request-id"])
        assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in fresh)
        assert len({i[:12] for i in fresh}) == 20  # no shared prefix, no counter
        # Without a client's id, the backend knows the request by the one the client was told.
        assert [r["request_id"] for r in sim.stats()["requests"]][-20:] == fresh


# --- S11: what a peer writes stays one bounded line -----------------------------------------------


class Recorder:
    """A backend that notes each request line and answers 404 JSON (and an empty model list)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.backend = RogueBackend(self._answer)

    async def _answer(self, head: bytes, reader: Any, writer: Any) -> None:
        line = head.split(b"\r\n", 1)[0]
        self.lines.append(line)
        body = b'{"object":"list","data":[]}' if b" /v1/models " in line else b'{"error":{}}'
        status = b"200 OK" if b" /v1/models " in line else b"404 Not Found"
        writer.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )
        await writer.drain()


async def test_s11_a_decoded_path_never_reaches_the_backend(client: httpx.AsyncClient) -> None:
    recorder = Recorder()
    async with recorder.backend.running():
        settings = Settings(
            backend_urls=(recorder.backend.url,), api_keys=KEYS, admin_api_keys=ADMIN
        )
        async with run_gateway(settings) as gw:
            for method, path, headers, status in (
                ("GET", "/v1/responses/resp_1%0A", A, 404),
                ("POST", "/v1/responses/resp_1%0A/cancel", A, 404),
                # No admin route by that name: a path like any other, which needs a client key.
                ("DELETE", "/adapters/lora%0A", ROOT, 401),
            ):
                resp = await client.request(method, gw.url + path, headers=headers)
                assert resp.status_code == status, (path, resp.text)
            # An admin route with a parameter travels as the route's table spells it.
            resp = await client.request("DELETE", gw.url + "/adapters/lora%2D1", headers=ROOT)
            assert resp.status_code == 404  # the recorder's answer, relayed
    assert not any(b"resp_1" in line for line in recorder.lines)
    adapters = [line for line in recorder.lines if b"/adapters/" in line]
    assert adapters == [b"DELETE /adapters/lora-1 HTTP/1.1"]


async def test_s11_model_names_leave_one_line_each_and_a_bounded_status_board(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    env = {"VLLM_BACKEND_URL": simulator.url, "VLLM_API_KEYS": "key-a:alpha"}
    forged = "x\n2031-01-01 00:00:00,000 INFO    vllm_gateway.access: request forged 200 completed"
    huge = "m" * (1 << 20)
    with spawn_gateway(env, name="s11-log") as gw:
        pid = gw.process.pid
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=A)
        assert resp.status_code == 200
        base, _ = rss_kib(pid)
        models = [forged, "y\r\u2028z", *[huge] * 40, *[f"small-{i}" for i in range(20)]]
        for i, model in enumerate(models):
            resp = await client.post(
                gw.url + "/v1/chat/completions",
                json=chat_body(model=model),
                headers={**A, "x-request-id": f"s11-{i}"},
            )
            assert resp.status_code == 404
        data = await client.get(gw.url + "/status/data", headers=A)
        rss, _ = rss_kib(pid)
        await wait_for(lambda: "s11-61 " in gw.log())
    errors = data.json()["errors"]
    assert len(errors) == 50  # the last 50 only
    assert len(data.content) < 64 * 1024, len(data.content)  # 31 MiB before the bound
    assert max(len(e["model"]) for e in errors) < 300
    print(f"/status/data: {len(data.content)} bytes; RSS {base} -> {rss} KiB")
    assert rss - base < 24 * 1024  # 75 MiB before the bound
    lines = gw.log().splitlines()
    access = [line for line in lines if "vllm_gateway.access:" in line]
    assert len(access) == 1 + len(models)  # one line per request, none forged
    assert not any(line.startswith("2031-") for line in lines)
    assert any("model=x\\x0a2031-01-01" in line for line in access)
    assert any("model=y\\x0d\\u2028z" in line for line in access)
    assert max(len(line) for line in lines) < 2048
