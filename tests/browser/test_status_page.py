"""The status page in real headless Chromium, driven by Selenium: the numbers on screen follow
the gateway.

Needs Debian's ``chromium`` and ``chromium-driver`` (scripts/system-deps.sh installs them). Leaves
a screenshot in ``test-artifacts/status-page.png``.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest

from tests.browser.driver import open_page
from tests.conftest import ARTIFACTS, chat_body, run_gateway
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

pytestmark = pytest.mark.timeout(120)

CHAT = "/v1/chat/completions"


def text_of(element_id: str) -> str:
    return f"document.getElementById({json.dumps(element_id)}).textContent"


async def test_status_page_shows_live_in_flight_errors_and_backend(
    simulator: Simulator, client: httpx.AsyncClient
) -> None:
    settings = Settings(backend_urls=(simulator.url,), max_concurrent_requests=6)
    async with run_gateway(settings) as gw, open_page(gw.url + "/status") as page:
        # The page polls /status/data and renders the idle gateway.
        await page.wait_for("Number(document.body.dataset.updates || 0) >= 1", timeout=20)
        assert await page.eval(text_of("in-flight")) == "0"
        assert await page.eval(text_of("limit")) == "6"
        assert await page.eval(text_of("state")) == "serving"

        # N slow streams open: the page shows N in flight, then 0 once they are closed.
        slow = chat_body(stream=True, max_tokens=400, vllm_sim={"itl": 0.05})
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                resp = await stack.enter_async_context(
                    client.stream("POST", gw.url + CHAT, json=slow)
                )
                assert resp.status_code == 200
            await page.wait_for(f"{text_of('in-flight')} === '3'", timeout=10)
            # While they stream, the events/s tile shows a rate above zero.
            await page.wait_for(f"Number({text_of('event-rate')}) > 0", timeout=10)
        await page.wait_for(f"{text_of('in-flight')} === '0'", timeout=10)

        # A failed request appears in the error list with its id, outcome and status.
        r = await client.post(
            gw.url + CHAT,
            json=chat_body(vllm_sim={"status": 500}),
            headers={"x-request-id": "browser-failed-1"},
        )
        assert r.status_code == 502
        row = "document.querySelector('#errors tr[data-request-id=\"browser-failed-1\"]')"
        await page.wait_for(f"{row} !== null", timeout=10)
        assert (
            await page.eval(f"{row}.querySelector('.outcome').textContent")
            == "bad_backend_response"
        )
        assert await page.eval(f"{row}.querySelector('.status').textContent") == "502"

        # Some completed traffic for the charts, then the totals match the gateway's count.
        for _ in range(4):
            r = await client.post(gw.url + CHAT, json=chat_body(stream=True, max_tokens=8))
            assert r.status_code == 200
        board = gw.app.observer.board
        assert board is not None
        total = board.requests_total
        assert total == 8  # 3 disconnected streams, 1 failure, 4 completed
        await page.wait_for(f"{text_of('requests-total')} === '8'", timeout=10)
        await page.wait_for(f"{text_of('errors-total')} === '4'", timeout=10)
        # The backend is listed, healthy, with the failure counted against it.
        backend_row = "document.querySelector('#backends tr')"
        await page.wait_for(
            f"{backend_row} && {backend_row}.children[1].textContent === 'up'", timeout=10
        )
        assert "bad_backend_response: 1" in await page.eval(
            f"{backend_row}.children[3].textContent"
        )
        # Charts are drawn: at least one line in the TTFT chart.
        await page.wait_for("document.querySelectorAll('#c-ttft path').length > 0", timeout=10)

        await page.screenshot(ARTIFACTS / "status-page.png")
        assert await page.exceptions() == []
    png = (ARTIFACTS / "status-page.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
