"""The cache of the backend's model ids (``ModelCatalog``): answers from the cache without a wait,
one fetch in flight however many ask, and never a convoy when the backend's /v1/models hangs.

The fetch here is a small in-test function whose answer is held until the test releases it: the
slow /v1/models of a busy (or wedged) vLLM, on demand.
"""

from __future__ import annotations

import asyncio
import time

from vllm_gateway.proxy import catalog as models_module
from vllm_gateway.proxy.catalog import ModelCatalog


class HeldFetch:
    def __init__(self) -> None:
        self.models: list[str] | None = ["a"]
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, timeout: float) -> list[str] | None:
        self.calls += 1
        async with asyncio.timeout(timeout):
            await self.release.wait()
        return None if self.models is None else list(self.models)


def _catalog(
    check_timeout: float = 0.5, fetch_timeout: float = 5.0
) -> tuple[ModelCatalog, HeldFetch]:
    fetch = HeldFetch()
    return ModelCatalog(fetch, check_timeout=check_timeout, fetch_timeout=fetch_timeout), fetch


def _age(catalog: ModelCatalog, seconds: float) -> None:
    catalog._fetched_at -= seconds


async def test_stale_list_is_answered_at_once_and_refreshed_behind() -> None:
    catalog, fetch = _catalog()
    assert await catalog.check("a") is True
    assert fetch.calls == 1
    _age(catalog, models_module.TTL + 1)  # the cached list is now stale
    fetch.release.clear()  # and the backend is slow to answer
    fetch.models = ["a", "b"]
    # Requests for a known model do not wait for the backend.
    assert all(catalog.known("a") for _ in range(50))
    await asyncio.sleep(0)
    assert fetch.calls == 2  # one background refresh, not one per request
    task = catalog._inflight
    assert task is not None
    fetch.release.set()
    await asyncio.wait_for(task, 1)
    assert catalog.ids == frozenset({"a", "b"})
    await catalog.aclose()


async def test_unknown_model_waits_for_a_fresh_list_at_most_once_a_second() -> None:
    catalog, fetch = _catalog()
    assert await catalog.check("a") is True
    fetch.models = ["a", "new"]
    _age(catalog, models_module.MIN_INTERVAL + 0.1)
    assert await catalog.check("new") is True
    assert fetch.calls == 2
    assert await catalog.check("never") is False  # the list is younger than the floor
    assert fetch.calls == 2
    assert catalog.checks["unknown"] == 1
    await catalog.aclose()


async def test_a_hanging_model_list_is_no_convoy() -> None:
    # Regression: with a cold cache and a /v1/models that hangs, 14 concurrent requests were
    # answered one every 2 s, each waiting for the one before it.
    catalog, fetch = _catalog(check_timeout=0.3)
    fetch.release.clear()
    started = time.monotonic()
    results = await asyncio.gather(*(catalog.check("a") for _ in range(14)))
    elapsed = time.monotonic() - started
    assert results == [None] * 14  # could not tell in time: the backend will judge
    assert elapsed < 0.3 + 0.25  # together, within one check timeout: nobody waited for another
    assert fetch.calls == 1  # single flight
    assert catalog.checks["timeout"] == 14
    task = catalog._inflight
    assert task is not None
    fetch.release.set()
    await asyncio.wait_for(task, 1)
    assert catalog.known("a")
    await catalog.aclose()


async def test_a_failed_fetch_is_retried_at_most_once_a_second() -> None:
    catalog, fetch = _catalog()
    fetch.models = None  # the backend cannot tell
    assert await catalog.check("a") is None
    assert await catalog.check("a") is None
    assert fetch.calls == 1
    _age(catalog, models_module.MIN_INTERVAL + 0.1)
    fetch.models = ["a"]
    assert await catalog.check("a") is True
    assert fetch.calls == 2
    await catalog.aclose()


async def test_close_cancels_a_pending_fetch() -> None:
    catalog, fetch = _catalog()
    fetch.release.clear()
    catalog._refresh()
    task = catalog._inflight
    assert task is not None and not task.done()
    await catalog.aclose()
    assert task.cancelled()


async def test_known_answers_from_the_cache_without_waiting() -> None:
    catalog, fetch = _catalog()
    assert not catalog.known("a")  # nothing cached yet: the caller must check
    assert await catalog.check("a") is True
    assert catalog.known("a") and not catalog.known("b")
    _age(catalog, models_module.TTL + 1)
    fetch.release.clear()
    assert catalog.known("a")  # stale but known: answered, refreshed behind
    assert catalog._inflight is not None
    await asyncio.sleep(0)
    assert fetch.calls == 2
    fetch.release.set()
    await catalog.aclose()


async def test_a_404_names_what_is_served_within_bounds() -> None:
    catalog, fetch = _catalog()
    assert catalog.served() == ""  # no list yet: nothing to name
    fetch.models = [f"org/model-{i:02d}-" + "x" * 100 for i in range(30)]
    assert await catalog.check("nope") is False
    served = catalog.served({"short": fetch.models[0], "dangling": "not-served"})
    names = served.split("'")[1::2]
    assert len(names) == models_module.NAMED
    assert all(len(name) <= models_module.NAME_CHARS for name in names)
    assert names[0].startswith("org/model-00-") and names[0].endswith("...")
    # 30 listed and one alias of a listed model (an alias of nothing is not served): 11 unnamed.
    assert "and 11 more" in served and "dangling" not in served
    assert served.endswith("(GET /v1/models lists them).")
    fetch.models = ["a", "b"]
    catalog._fetched_at = -1e9
    assert await catalog.check("nope") is False
    assert catalog.served({"c": "b"}) == "Served: 'a', 'b', 'c' (GET /v1/models lists them)."
