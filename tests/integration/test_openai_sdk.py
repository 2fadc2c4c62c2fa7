"""The official ``openai`` SDK as the client of the gateway: what users will actually run.

Chat and completions, streamed and not, and the error paths: a gateway status surfaces as the
SDK's ``APIStatusError`` subclass with that status, and an error event mid-stream raises
``openai.APIError`` in the consumer's loop (the SDK raises on a ``data: {"error": ...}`` event), so a
failed stream is never mistaken for a short, complete one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import RunningGateway, run_gateway, wait_for
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

pytestmark = pytest.mark.timeout(60)

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
EXPECTED = "".join(f" tok{i}" for i in range(6))


@pytest.fixture
async def keyed(simulator: Simulator) -> AsyncIterator[RunningGateway]:
    settings = Settings(
        backend_urls=(simulator.url,),
        api_keys=frozenset({"sdk-key"}),
        max_concurrent_requests=1,
        max_queued_requests=0,
        stream_idle_timeout=0.5,
    )
    async with run_gateway(settings) as gw:
        yield gw


def _sdk(gw: RunningGateway, key: str = "sdk-key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


async def test_chat_and_completions_streamed_and_not(keyed: RunningGateway) -> None:
    async with _sdk(keyed) as sdk:
        chat = await sdk.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=6)
        assert chat.choices[0].message.content == EXPECTED
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None and chat.usage.completion_tokens == 6

        stream = await sdk.chat.completions.create(
            model="sim-model",
            messages=MESSAGES,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        finish: str | None = None
        usage: CompletionUsage | None = None
        async for chunk in stream:
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        assert "".join(parts) == EXPECTED and finish == "length"
        assert usage is not None and usage.completion_tokens == 6

        comp = await sdk.completions.create(model="sim-model", prompt="hi", max_tokens=6)
        assert comp.choices[0].text == EXPECTED
        text_stream = await sdk.completions.create(
            model="sim-model", prompt="hi", max_tokens=6, stream=True
        )
        assert "".join([c.choices[0].text async for c in text_stream]) == EXPECTED

        models = await sdk.models.list()
        assert "sim-model" in [m.id for m in models.data]


async def test_gateway_statuses_surface_as_sdk_errors(
    keyed: RunningGateway, simulator: Simulator
) -> None:
    async with _sdk(keyed, key="wrong") as bad:
        with pytest.raises(openai.AuthenticationError) as auth:
            await bad.chat.completions.create(model="sim-model", messages=MESSAGES)
        assert auth.value.status_code == 401
    async with _sdk(keyed) as sdk:
        with pytest.raises(openai.BadRequestError) as bad_req:
            await sdk.chat.completions.create(model="sim-model", messages=MESSAGES, max_tokens=0)
        assert bad_req.value.body["param"] == "max_tokens"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)

        # The only slot is held and the queue is 0 deep: the next request is refused with 503.
        holder = await sdk.chat.completions.create(
            model="sim-model", messages=MESSAGES, max_tokens=2000, stream=True
        )
        first = await anext(aiter(holder))
        assert first.choices
        with pytest.raises(openai.APIStatusError) as over:
            await sdk.chat.completions.create(model="sim-model", messages=MESSAGES, stream=True)
        assert over.value.status_code == 503
        assert over.value.body["type"] == "overloaded"  # type: ignore[index]
        assert int(over.value.response.headers["retry-after"]) >= 1
        await holder.close()
        await wait_for(lambda: keyed.gateway.admission.in_flight == 0)
        await wait_for(lambda: simulator.stats()["running"] == 0)


@pytest.mark.parametrize(
    ("knobs", "kind"),
    [
        ({"drop_after": 4}, "backend_unavailable"),
        ({"stall_after": 4}, "stream_idle_timeout"),
        ({"malformed": "bad_json"}, "bad_backend_response"),
    ],
)
async def test_a_mid_stream_error_raises_in_the_sdk_consumer(
    keyed: RunningGateway, knobs: dict[str, Any], kind: str
) -> None:
    async with _sdk(keyed) as sdk:
        stream = await sdk.chat.completions.create(
            model="sim-model",
            messages=MESSAGES,
            max_tokens=20,
            stream=True,
            extra_body={"vllm_sim": knobs},
        )
        received: list[str] = []
        with pytest.raises(openai.APIError) as err:
            async for chunk in stream:
                received.extend(c.delta.content or "" for c in chunk.choices)
        assert err.value.body["type"] == kind  # type: ignore[index]
        assert "".join(received).startswith(" tok0")  # what came before the error arrived
