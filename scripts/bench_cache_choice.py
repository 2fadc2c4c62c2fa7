"""The CPU cost of cache-aware routing's steps, in-process: keying a prompt (``prompt_chain``),
choosing among 2, 8 and 32 members (``choose_cached``), and the index's memory per entry.

    .venv/bin/python scripts/bench_cache_choice.py

Figures go to docs/performance.md (section "Cache-aware routing").
"""

from __future__ import annotations

import random
import time
import tracemalloc
from typing import Any

from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.backends.pool.cache_aware import RecentShare, choose_cached
from vllm_gateway.backends.pool.cache_index import Links, MemberCache
from vllm_gateway.backends.pool.config import BackendSpec, PoolConfig
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.prompt_chain import PromptChain, prompt_chain

rng = random.Random(1)


def body(words: int) -> dict[str, Any]:
    text = " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta", "epsilon"]) for _ in range(words)
    )
    return {
        "model": "m",
        "messages": [{"role": "system", "content": text}, {"role": "user", "content": "hi"}],
    }


def chain_of(b: dict[str, Any]) -> PromptChain:
    chain = prompt_chain(b)
    assert chain is not None
    return chain


def keying() -> None:
    for words, reps in ((10, 2000), (200, 2000), (800, 2000), (3000, 200)):
        b = body(words)
        start = time.perf_counter()
        for _ in range(reps):
            chain = chain_of(b)
        took = (time.perf_counter() - start) / reps
        print(f"prompt_chain: {chain.size} bytes, {len(chain.keys)} keys: {took * 1e6:.1f} us")


def memory() -> None:
    tracemalloc.start()
    cache = MemberCache(max_blocks=10**7, sent_capacity=10**7)
    ids = [rng.randrange(50000) for _ in range(16 * 100_000)]
    before = tracemalloc.get_traced_memory()[0]
    cache.stored(list(range(100_000)), None, ids, 16)
    print(f"index: {(tracemalloc.get_traced_memory()[0] - before) / 100_000:.0f} bytes per block")
    links = Links(16, 10**7)
    before = tracemalloc.get_traced_memory()[0]
    for i in range(200):
        chain = chain_of({"model": "m", "prompt": f"{i} " * 3000})
        links.learn(chain, list(range(chain.size // 4)))
    print(f"links: {(tracemalloc.get_traced_memory()[0] - before) / len(links):.0f} bytes per link")
    before = tracemalloc.get_traced_memory()[0]
    cache.sent_chain(list(range(100_000)))
    print(f"sent: {(tracemalloc.get_traced_memory()[0] - before) / 100_000:.0f} bytes per key")
    tracemalloc.stop()


def choosing() -> None:
    config = PoolConfig(routing="cache_aware")
    for count in (2, 8, 32):
        members = []
        for i in range(count):
            spec = BackendSpec(url=f"http://m{i}:1")
            member = Member(spec, config, HTTPBackend(spec.url, connect_timeout=1))
            member.cache = MemberCache(100_000, 100_000)
            members.append(member)
        chains = [chain_of(body(400)) for _ in range(50)]
        for i, chain in enumerate(chains):  # each prompt held by one member
            cache = members[i % count].cache
            assert cache is not None
            cache.sent_chain(chain.keys)
        recent = RecentShare(config.cache_balance_window)  # the pool's last requests, even
        for i in range(config.cache_balance_window):
            recent.add(members[i % count].name)
        start = time.perf_counter()
        for _ in range(40):
            for chain in chains:
                choose_cached(members, chain, None, 0.25, config, recent)
        took = (time.perf_counter() - start) / (40 * len(chains))
        print(
            f"choose_cached: {count} members, {len(chains[0].keys)}-key prompt: {took * 1e6:.1f} us"
        )


if __name__ == "__main__":
    keying()
    choosing()
    memory()
