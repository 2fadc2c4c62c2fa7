"""A newcomer's wrong turns, answered with the way back: a model the backend does not serve is
told which ones it does, and a path the gateway does not serve is told what it serves, with the
path meant when one is (a base URL without /v1, or with it twice). Every such answer keeps the
OpenAI error shape and stays short whatever the backend lists or the client sends.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import RunningGateway, chat_body, run_gateway
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.timeout(60)


def _message(resp: httpx.Response, status: int, kind: str) -> str:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["type"] == kind
    assert resp.headers["x-request-id"]
    message = error["message"]
    assert isinstance(message, str)
    return message


async def test_an_unknown_model_is_told_the_served_ones(
    gateway: RunningGateway, simulator: Simulator, client: httpx.AsyncClient
) -> None:
    resp = await client.post(gateway.url + "/v1/chat/completions", json=chat_body(model="gpt-4"))
    message = _message(resp, 404, "model_not_found")
    assert message == (
        "The model 'gpt-4' does not exist. Served: 'sim-model' (GET /v1/models lists them)."
    )
    assert simulator.stats()["total"] == 0


async def test_a_long_model_list_is_named_within_bounds() -> None:
    names = tuple(f"org/finetune-{i:03d}-" + "x" * 200 for i in range(500))
    config = SimulatorConfig(ttft=0.01, itl=0.005, tokens=8, models=names)
    async with (
        run_simulator(config) as sim,
        run_gateway(Settings(backend_urls=(sim.url,), model_aliases={"mine": names[3]})) as gw,
        httpx.AsyncClient(timeout=10) as client,
    ):
        resp = await client.post(gw.url + "/v1/chat/completions", json=chat_body(model="z" * 5000))
        message = _message(resp, 404, "model_not_found")
        assert len(message) < 2000
        assert message.startswith("The model '" + "z" * 200 + "' does not exist. Served: ")
        assert "'org/finetune-000-" in message and "and 481 more" in message
        assert "org/finetune-020-" not in message  # the 21st is past the bound


@pytest.mark.parametrize(
    ("method", "path", "meant"),
    [
        ("POST", "/chat/completions", "/v1/chat/completions"),
        ("GET", "/models", "/v1/models"),
        ("POST", "/v1/v1/chat/completions", "/v1/chat/completions"),
        ("POST", "/messages", "/v1/messages"),
    ],
)
async def test_a_path_without_or_with_twice_v1_is_pointed_to_the_one_meant(
    gateway: RunningGateway, client: httpx.AsyncClient, method: str, path: str, meant: str
) -> None:
    resp = await client.request(method, gateway.url + path, json=chat_body())
    message = _message(resp, 404, "not_found")
    assert message.startswith(f"No route {path}. Did you mean {meant}? ")
    assert "/docs" in message


@pytest.mark.parametrize("path", ["/", "/v2/nothing", "/v1/nothing", "/favicon.ico"])
async def test_a_path_nothing_serves_is_told_what_the_gateway_serves(
    gateway: RunningGateway, client: httpx.AsyncClient, path: str
) -> None:
    message = _message(await client.get(gateway.url + path), 404, "not_found")
    assert message.startswith(f"No route {path}. The gateway serves the OpenAI API under /v1")
    assert "POST /v1/chat/completions" in message and "/docs" in message
    assert "Did you mean" not in message


async def test_a_long_path_is_cut_and_the_routes_off_the_hot_path_answer_as_before(
    gateway: RunningGateway, client: httpx.AsyncClient
) -> None:
    long = "/" + "a" * 6000
    message = _message(await client.get(gateway.url + long), 404, "not_found")
    assert len(message) < 1000 and "No route /" + "a" * 196 + "...." in message
    health = await client.get(gateway.url + "/v1/health")
    assert health.status_code == 200
    # A trailing slash is still FastAPI's redirect, and a wrong method its 405.
    slash = await client.get(gateway.url + "/v1/health/", follow_redirects=False)
    assert slash.status_code == 307 and slash.headers["location"].endswith("/v1/health")
    assert (await client.post(gateway.url + "/v1/models")).status_code == 405
