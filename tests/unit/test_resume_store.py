"""The in-process store of keyed generations: its budget, the order it evicts in, the grace
period, and every counted byte given back."""

from __future__ import annotations

import asyncio

import pytest

from vllm_gateway.errors import Overloaded
from vllm_gateway.proxy.resume.store import CUT, Claim, Head, LocalStore

_SSE = [(b"content-type", b"text/event-stream")]


async def _finished(store: LocalStore, key: str, size: int) -> Claim:
    claim = await store.claim("t:a", key, "fp")
    assert claim.writer is not None and claim.reader is not None
    claim.writer.head(Head(200, _SSE))
    claim.writer.append([b"x" * size], ended=True)
    claim.writer.close()
    claim.reader.close()
    return claim


async def test_past_the_budget_the_oldest_finished_entry_goes_first() -> None:
    store = LocalStore(limit=1000, grace=60.0)
    await _finished(store, "old", 300)
    await _finished(store, "mid", 300)
    await _finished(store, "new", 300)
    assert store.entries == 3 and store.used <= 1000
    await _finished(store, "next", 300)
    assert store.counts["evicted"] == 1
    again = await store.claim("t:a", "old", "fp")  # evicted: runs again
    assert again.writer is not None
    mid = await store.claim("t:a", "mid", "fp")  # kept: replayed
    assert mid.writer is None and mid.replayed
    assert store.used <= store.limit


async def test_a_generation_the_budget_cannot_keep_is_cut_and_its_bytes_given_back() -> None:
    store = LocalStore(limit=500, grace=60.0)
    claim = await store.claim("t:a", "big", "fp")
    assert claim.writer is not None and claim.reader is not None
    stopped = []
    claim.writer.on_abandon = lambda: stopped.append(True)
    claim.writer.head(Head(200, _SSE))
    claim.writer.append([b"x" * 100], ended=False)
    claim.writer.append([b"x" * 1000], ended=False)
    assert stopped == [True] and store.counts["cut"] == 1
    batch = await claim.reader.read(0, 0.01)
    assert batch.lost == CUT and [seq for seq, _ in batch.events] == [1]
    claim.reader.close()
    claim.writer.close()
    assert store.used == 0 and store.entries == 0


async def test_a_new_key_past_the_budget_is_refused() -> None:
    store = LocalStore(limit=200, grace=60.0)
    running = await store.claim("t:a", "running", "fp")
    assert running.writer is not None
    running.writer.head(Head(200, _SSE))
    running.writer.append([b"x" * (200 - store.used)], ended=False)
    assert store.used == store.limit and store.counts["cut"] == 0
    with pytest.raises(Overloaded):
        await store.claim("t:a", "another", "fp")


async def test_a_finished_entry_leaves_at_the_end_of_its_grace_period() -> None:
    store = LocalStore(limit=1000, grace=0.05)
    await _finished(store, "k", 10)
    assert store.entries == 1
    await asyncio.sleep(0.2)  # the grace period is the store's own timer
    assert store.entries == 0 and store.used == 0 and store.counts["expired"] == 1


async def test_scopes_never_share_a_key() -> None:
    store = LocalStore(limit=1000, grace=60.0)
    a = await store.claim("t:a", "k", "fp-a")
    b = await store.claim("t:b", "k", "fp-b")
    assert a.writer is not None and b.writer is not None
    conflict = await store.claim("t:a", "k", "fp-b")
    assert conflict.reader is None and store.counts["conflicts"] == 1
