"""The gateway's cache of the backend's model ids: stale answers at once, refreshes behind.

The backend here is a small in-test implementation of the ``Backend`` seam whose /v1/models
answer is held until the test releases it: the slow answer of a busy vLLM, on demand.
"""

from __future__ import annotations

import asyncio

from vllm_gateway import gateway as gateway_module
from vllm_gateway.backend import Backend, UpstreamRequest, UpstreamResponse
from vllm_gateway.gateway import Gateway
from vllm_gateway.settings import Settings


class HeldModels(Backend):
    name = "held"

    def __init__(self) -> None:
        self.models = ["a"]
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        raise NotImplementedError  # not used: only the model lookups are under test

    async def check_health(self, timeout: float) -> bool:
        return True

    async def model_ids(self, timeout: float) -> list[str] | None:
        self.calls += 1
        await self.release.wait()
        return list(self.models)


def _gateway() -> tuple[Gateway, HeldModels]:
    backend = HeldModels()
    return Gateway(Settings(backend_urls=("http://127.0.0.1:9",)), backend=backend), backend


async def test_stale_list_is_answered_at_once_and_refreshed_behind() -> None:
    gw, backend = _gateway()
    assert await gw.known_models() == ["a"]
    assert backend.calls == 1
    gw._models_at -= gateway_module._MODELS_TTL + 1  # the cached list is now stale
    backend.release.clear()  # and the backend is slow to answer
    backend.models = ["a", "b"]
    # Requests for a known model do not wait for the backend: all answered while it is held.
    results = await asyncio.wait_for(
        asyncio.gather(*(gw.model_exists("a") for _ in range(50))), timeout=1.0
    )
    assert all(results)
    assert backend.calls == 2  # one background refresh, not one per request
    backend.release.set()
    for _ in range(100):
        if gw._models == ["a", "b"]:
            break
        await asyncio.sleep(0.01)
    assert await gw.known_models() == ["a", "b"]
    assert gw._models_refresh is None
    await gw.aclose()


async def test_unknown_model_waits_for_a_fresh_list() -> None:
    gw, backend = _gateway()
    assert await gw.model_exists("a")
    backend.models = ["a", "new"]
    gw._models_at -= 2.0  # older than the 1 s floor between forced refreshes
    assert await gw.model_exists("new")
    assert backend.calls == 2
    assert not await gw.model_exists("never")  # refreshed again only after the floor
    assert backend.calls == 2
    await gw.aclose()


async def test_close_cancels_a_pending_refresh() -> None:
    gw, backend = _gateway()
    await gw.known_models()
    gw._models_at -= gateway_module._MODELS_TTL + 1
    backend.release.clear()
    await gw.known_models()
    task = gw._models_refresh
    assert task is not None and not task.done()
    await gw.aclose()
    assert task.cancelled()


async def test_model_known_answers_from_the_cache_without_waiting() -> None:
    gw, backend = _gateway()
    assert not gw.model_known("a")  # nothing cached yet: the caller must ask
    assert await gw.model_exists("a")
    assert gw.model_known("a") and not gw.model_known("b")
    gw._models_at -= gateway_module._MODELS_TTL + 1
    backend.release.clear()
    assert gw.model_known("a")  # stale but known: answered, refreshed behind
    assert gw._models_refresh is not None
    await asyncio.sleep(0)  # the refresh task starts and asks the (held) backend
    assert backend.calls == 2
    backend.release.set()
    await gw.aclose()
