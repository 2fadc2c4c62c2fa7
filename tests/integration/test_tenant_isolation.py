"""Cases S10 and S11 of docs/reliability.md: tenants do not reach each other's stored state, and
peers cannot write into the gateway's logs or memory. Two tenants' keys against the real gateway
in front of the simulator (and, for the default text log, the gateway as a child process).

S10: a stored response (retrieve, stream replay, cancel, ``previous_response_id``) named by
another tenant is the same 404 as an id that never existed, and the backend never hears of it;
ownership holds across a restart and across replicas; the client's ``X-Request-ID`` never reaches
vLLM and the gateway's own ids cannot be guessed; ``/status/data`` shows a tenant its own requests.
S11: a model name with a line break or of a mebibyte, and a decoded path, leave one log line per
request, a bounded status board, and nothing upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningGateway, chat_body, run_gateway, spawn_gateway, wait_for
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


def _store_calls(sim: Simulator) -> int:
    """Requests the simulator answered on the Responses routes (create, retrieve, cancel)."""
    routes = sim.stats()["routes"]
    return sum(v["total"] for k, v in routes.items() if k.startswith("/v1/responses"))


def _never_minted() -> str:
    """An id of the very form the gateway gives, that it never gave."""
    return "resp_" + os.urandom(32).hex()


def _shape(resp: httpx.Response, rid: str) -> tuple[int, str, dict[str, Any]]:
    """What a 404 tells: status, type, and body with the id and the request id taken out."""
    body = orjson.loads(resp.content)
    body["error"].pop("request_id", None)
    body["error"]["message"] = body["error"]["message"].replace(rid, "<id>")
    return resp.status_code, resp.headers["content-type"], body


async def _create(
    client: httpx.AsyncClient, gw: RunningGateway, headers: dict[str, str], **extra: Any
) -> str:
    resp = await client.post(
        gw.url + "/v1/responses", json={"model": MODEL, "input": "hi", **extra}, headers=headers
    )
    assert resp.status_code == 200, resp.text
    rid = resp.json()["id"]
    assert isinstance(rid, str)
    return rid


async def _each_store_route(
    client: httpx.AsyncClient, gw: RunningGateway, rid: str, headers: dict[str, str]
) -> list[httpx.Response]:
    """Retrieve, stream replay, cancel and a continuation naming ``rid``."""
    url = f"{gw.url}/v1/responses/{rid}"
    return [
        await client.get(url, headers=headers),
        await client.get(url + "?stream=true", headers=headers),
        await client.post(url + "/cancel", headers=headers),
        await client.post(
            gw.url + "/v1/responses",
            json={"model": MODEL, "input": "more", "previous_response_id": rid},
            headers=headers,
        ),
    ]


# --- S10: stored Responses are their tenant's ---------------------------------------------------


async def test_s10_another_tenant_meets_the_404_of_an_id_that_never_existed(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.configure(tokens=400)  # a background response that runs for 20 s
    async with run_gateway(_settings(sim)) as gw:
        rid = await _create(client, gw, A, background=True)
        # The id is the gateway's, whatever the client asked for.
        chosen = await _create(
            client, gw, A, request_id="resp_chosen_by_the_client", max_output_tokens=2
        )
        assert chosen != "resp_chosen_by_the_client" and chosen.startswith("resp_")
        before = _store_calls(sim)
        theirs = await _each_store_route(client, gw, rid, B)
        ghost = _never_minted()
        never = await _each_store_route(client, gw, ghost, B)
        for foreign, unknown in zip(theirs, never, strict=True):
            assert foreign.status_code == 404, foreign.text
            assert _shape(foreign, rid) == _shape(unknown, ghost)
        assert theirs[0].json()["error"]["type"] == "not_found"
        # Nothing of B's reached the backend: no retrieve, no cancel, no continuation.
        assert _store_calls(sim) == before
        # A still has all of it: B's cancel cancelled nothing.
        got = await client.get(f"{gw.url}/v1/responses/{rid}", headers=A)
        assert got.status_code == 200 and got.json()["status"] in ("queued", "in_progress")
        more = await client.post(
            gw.url + "/v1/responses",
            json={
                "model": MODEL,
                "input": "more",
                "previous_response_id": chosen,
                "max_output_tokens": 2,
            },
            headers=A,
        )
        assert more.status_code == 200, more.text
        # An admin key reads (and may cancel) any tenant's.
        seen = await client.get(f"{gw.url}/v1/responses/{rid}", headers=ROOT)
        assert seen.status_code == 200 and seen.json()["id"] == rid
        cancelled = await client.post(f"{gw.url}/v1/responses/{rid}/cancel", headers=A)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


async def test_s10_ownership_holds_across_replicas_and_a_restart(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    settings = _settings(sim)
    async with run_gateway(settings) as one, run_gateway(settings) as two:
        rid = await _create(client, one, A)
        assert (await client.get(f"{two.url}/v1/responses/{rid}", headers=A)).status_code == 200
        before = _store_calls(sim)
        assert (await client.get(f"{two.url}/v1/responses/{rid}", headers=B)).status_code == 404
        assert _store_calls(sim) == before
    async with run_gateway(settings) as again:
        assert (await client.get(f"{again.url}/v1/responses/{rid}", headers=A)).status_code == 200
        before = _store_calls(sim)
        assert (await client.get(f"{again.url}/v1/responses/{rid}", headers=B)).status_code == 404
        assert _store_calls(sim) == before


async def test_s10_a_response_id_secret_keeps_ids_across_a_key_rotation(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    rotated = frozenset({"key-a2:alpha", "key-b:beta"})
    # Without the secret, a tenant's ids are keyed by its API keys: rotating them forgets its ids.
    async with run_gateway(_settings(sim)) as gw:
        rid = await _create(client, gw, A)
    async with run_gateway(_settings(sim, api_keys=rotated)) as gw:
        got = await client.get(f"{gw.url}/v1/responses/{rid}", headers={"x-api-key": "key-a2"})
        assert got.status_code == 404
    # With it, the tenant keeps them, and the other tenant still cannot name them.
    secret = "a shared secret of the replicas"
    async with run_gateway(_settings(sim, response_id_secret=secret)) as gw:
        rid = await _create(client, gw, A)
    async with run_gateway(_settings(sim, api_keys=rotated, response_id_secret=secret)) as gw:
        got = await client.get(f"{gw.url}/v1/responses/{rid}", headers={"x-api-key": "key-a2"})
        assert got.status_code == 200 and got.json()["id"] == rid
        assert (await client.get(f"{gw.url}/v1/responses/{rid}", headers=B)).status_code == 404


async def test_s10_a_foreign_previous_response_id_is_refused_before_any_wait(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    """The check comes before admission: B naming A's response gets its 404 at once, even when
    every permit is busy, rather than a place in the queue (and a 503 at its timeout)."""
    settings = _settings(sim, max_concurrent_requests=1, queue_wait_timeout=1.0)
    async with run_gateway(settings) as gw:
        rid = await _create(client, gw, A)
        sim.configure(tokens=100)  # A's next request holds the one permit for 5 s
        holder = asyncio.create_task(
            client.post(gw.url + "/v1/responses", json={"model": MODEL, "input": "x"}, headers=A)
        )
        await wait_for(lambda: gw.gateway.admission.in_flight == 1)
        refused = await client.post(
            gw.url + "/v1/responses",
            json={"model": MODEL, "input": "more", "previous_response_id": rid},
            headers=B,
        )
        assert refused.status_code == 404, refused.text
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder


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


async def test_s10_status_data_shows_a_tenant_its_own_failures_only(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    async with run_gateway(_settings(sim)) as gw:
        for headers, rid in ((A, "a-failed"), (B, "b-failed")):
            resp = await client.post(
                gw.url + "/v1/chat/completions",
                json=chat_body(model="no-such-model"),
                headers={**headers, "x-request-id": rid},
            )
            assert resp.status_code == 404

        async def failed(headers: dict[str, str]) -> set[str]:
            resp = await client.get(gw.url + "/status/data", headers=headers)
            assert resp.status_code == 200
            return {e["request_id"] for e in resp.json()["errors"]}

        assert await failed(A) == {"a-failed"}
        assert await failed(B) == {"b-failed"}
        assert await failed(ROOT) == {"a-failed", "b-failed"}
        # The admin key opens reading, not the clients' routes.
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body(), headers=ROOT)
        assert resp.status_code == 401


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
