"""Cache-aware routing for a pool (``pool_routing = cache_aware``): the index and what feeds it.

``CacheAware`` owns one ``MemberCache`` per member and the ``Links`` between prompt text and token
blocks (``cache_index.py``), and keeps them current in one background task: every
``health_interval`` it reads each member's ``/metrics`` (``engine_metrics.py``: waiting requests,
KV-cache usage, prefix-cache hits, block size, a restart) and, for a member with KV-cache events
that is not being read yet, finds its endpoint (``/kv_event_sources``, or the backends file's
``kv_events``) and starts reading it (``kv_events.py``).

On the request path: ``choose`` keys the prompt (``prompt_chain.py``), asks ``choose_cached`` and
records what the chosen member was sent. ``choose_cached`` picks the member with the longest cached
prefix unless that is a small share of the prompt (then the least loaded, ties to the emptiest
cache), and a cached member loaded well beyond the least loaded one yields, so a hot prefix never
makes a hot spot. Load is outstanding requests per weight plus the requests vLLM says are waiting.
``learned`` takes the prompt's token ids when a streamed response shows them (the gateway asks for
them to fail over; with ``pool_failover_max`` 0 nothing is learned and members without events are
judged by what they were sent) and links the prompt's text to its blocks. A member that leaves the
pool (ejected) or restarts is emptied: it starts cold.

Every wait here has a bound: a scrape or a discovery is one request under ``health_timeout``, read
up to ``MAX_METRICS_BYTES`` (``engine_metrics.scrape``); event reading is bounded in ``kv_events.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import orjson

from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.backends.pool.cache_index import Links, MemberCache
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.backends.pool.engine_metrics import parse_engine_metrics, scrape
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.prompt_chain import CHUNK, PromptChain, prompt_chain

__all__ = ["CacheAware", "RecentShare", "choose_cached"]

log = logging.getLogger("vllm_gateway.backends.pool.cache_aware")

_PENDING_KEPT = 4096  # requests whose prompt ids may still come (the newest)
_DEFAULT_BLOCK = 16  # vLLM's default on GPUs, until a member says otherwise
_RATIO_WEIGHT = 0.05  # of each new observation in the tokens-per-byte average


class RecentShare:
    """The pool's last ``window`` choices, counted per member (by name)."""

    __slots__ = ("_order", "counts", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self._order: deque[str] = deque()
        self.counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        self._order.append(name)
        self.counts[name] += 1
        if len(self._order) > self.window:
            self.counts[self._order.popleft()] -= 1


class CacheAware:
    def __init__(self, fleet: Fleet, config: PoolConfig) -> None:
        self.fleet = fleet
        self.config = config
        self.recent = RecentShare(config.cache_balance_window)
        self.tokens_per_byte = 0.25
        self.links: dict[int, Links] = {}  # by block size
        self.decisions: Counter[str] = Counter()
        self._pending: OrderedDict[str, PromptChain] = OrderedDict()
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._zmq_missing = False
        for m in fleet.members:
            m.cache = MemberCache(config.cache_index_blocks, self._sent_capacity(None))

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._round()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def aclose(self) -> None:
        tasks = [t for t in (self._loop_task, *self._readers.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._readers.clear()
        self._loop_task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self._round()
            except Exception:  # the loop must outlive any one bad round
                log.exception("cache-aware routing: a refresh round failed")

    async def _round(self) -> None:
        await asyncio.gather(*(self._refresh(m) for m in self.fleet.members if m.up))

    async def _refresh(self, m: Member) -> None:
        assert m.cache is not None
        body = await self._get(m, "/metrics")
        if body is not None:
            gauges = parse_engine_metrics(body)
            before = m.engine.started
            if before is not None and gauges.started is not None and gauges.started != before:
                log.info("backend %s restarted: its cache index starts empty", m.name)
                m.cache.clear()
            m.engine = gauges
            if gauges.num_blocks and gauges.block_size:
                m.cache.sent_capacity = self._sent_capacity(gauges.num_blocks * gauges.block_size)
                m.cache.max_blocks = max(self.config.cache_index_blocks, 2 * gauges.num_blocks)
            if gauges.block_size and m.cache.block_size is None:
                m.cache.block_size = gauges.block_size
        if m.kv_events != "off" and m.name not in self._readers:
            await self._start_reader(m)

    def _sent_capacity(self, tokens: int | None) -> int:
        tokens = tokens or self.config.cache_tokens
        return max(1, int(tokens / max(self.tokens_per_byte, 0.01) / CHUNK))

    async def _start_reader(self, m: Member) -> None:
        if self._zmq_missing:
            return
        try:
            import msgpack  # noqa: F401
            import zmq  # noqa: F401
        except ImportError:
            self._zmq_missing = True
            log.warning(
                "cache-aware routing: KV-cache events need the 'kv' extra (pyzmq, msgpack); "
                "routing on what was sent to each member instead"
            )
            return
        from vllm_gateway.backends.pool.kv_events import endpoint_for, subscribe

        if m.kv_events == "auto":
            body = await self._get(m, "/kv_event_sources")
            if body is None:
                return
            try:
                found = endpoint_for(orjson.loads(body), m.url)
            except orjson.JSONDecodeError:
                found = None
            if found is None:
                m.kv_events = "off"  # this member publishes none: do not ask again
                return
            endpoint, topic = found
        else:
            endpoint, topic = m.kv_events, ""
        assert m.cache is not None
        task = asyncio.get_running_loop().create_task(subscribe(endpoint, topic, m.cache, m.name))
        self._readers[m.name] = task
        task.add_done_callback(functools.partial(self._reader_done, m.name))

    def _reader_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._readers.get(name) is task:
            del self._readers[name]
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "backend %s: reading its KV-cache events failed: %r", name, task.exception()
            )

    async def _get(self, m: Member, path: str) -> bytes | None:
        return await scrape(m.backend, path, self.config.health_timeout, "cache")

    # --- the request path ----------------------------------------------------------------------

    def chain(self, request: UpstreamRequest) -> PromptChain | None:
        return prompt_chain(request.json) if request.json is not None else None

    def choose(
        self, candidates: Sequence[Member], chain: PromptChain | None, request_id: str
    ) -> Member:
        links = self.links.get(_block_size(candidates))
        member, why, hit = choose_cached(
            candidates, chain, links, self.tokens_per_byte, self.config, self.recent
        )
        self.decisions[why] += 1
        self.recent.add(member.name)
        if chain is not None:
            assert member.cache is not None
            member.cache.sent_chain(chain.keys)
            member.cache.note("predicted_tokens", hit)
            member.cache.note("prompt_tokens", int(chain.size * self.tokens_per_byte))
            self._pending[request_id] = chain
            if len(self._pending) > _PENDING_KEPT:
                self._pending.popitem(last=False)
        return member

    def learned(self, request_id: str, prompt_ids: Sequence[int]) -> None:
        """A streamed response showed the prompt's token ids: link its text to its blocks."""
        chain = self._pending.pop(request_id, None)
        if chain is None or not prompt_ids or chain.size == 0:
            return
        ratio = len(prompt_ids) / chain.size
        self.tokens_per_byte += _RATIO_WEIGHT * (ratio - self.tokens_per_byte)
        sizes = {m.cache.block_size for m in self.fleet.members if m.cache is not None}
        sizes.discard(None)
        for size in sizes or {_DEFAULT_BLOCK}:
            assert size is not None
            links = self.links.get(size)
            if links is None:
                links = self.links[size] = Links(size, self.config.cache_links_kept)
            links.learn(chain, prompt_ids)

    def joined(self, m: Member) -> None:
        """A member added at run time: an empty index, before any request can reach it."""
        m.cache = MemberCache(self.config.cache_index_blocks, self._sent_capacity(None))

    def gone(self, m: Member) -> None:
        """A member left the pool: its event reader stops (its done callback drops it)."""
        task = self._readers.get(m.name)
        if task is not None:
            task.cancel()
        self.forget(m)

    def forget(self, m: Member) -> None:
        """The member left the pool: it comes back cold."""
        if m.cache is not None:
            m.cache.clear()

    # --- what it shows -------------------------------------------------------------------------

    def member_stats(self, m: Member) -> dict[str, Any]:
        cache = m.cache
        if cache is None:
            return {}
        return {
            "events_live": cache.events_live,
            "block_size": cache.block_size,
            "index_blocks": len(cache.blocks),
            "sent_keys": len(cache.sent),
            "counts": dict(cache.counts),
            "engine_prefix_hits": m.engine.prefix_hits,
            "engine_prefix_queries": m.engine.prefix_queries,
            "engine_waiting": m.engine.waiting,
            "engine_kv_usage": m.engine.kv_usage,
        }


def _block_size(members: Sequence[Member]) -> int:
    for m in members:
        if m.cache is not None and m.cache.block_size is not None:
            return m.cache.block_size
    return _DEFAULT_BLOCK


def choose_cached(
    candidates: Sequence[Member],
    chain: PromptChain | None,
    links: Links | None,
    tokens_per_byte: float,
    config: PoolConfig,
    recent: RecentShare | None = None,
) -> tuple[Member, str, int]:
    """(member, why, its predicted hit in tokens) among ``candidates`` (up, eligible, with room).

    ``why`` is ``hit`` (the member with the longest cached prefix), ``yield`` (that member was a
    hot spot, and the request went elsewhere), or ``miss`` (no member holds ``cache_min_share`` of
    the prompt: the least loaded member, ties to the emptiest cache). A hot spot is a member
    either busier now (``cache_balance_abs`` more requests in flight than the least loaded and
    over ``cache_balance_rel`` * (least + 1): the request goes to the least loaded) or given more
    than ``cache_balance_share`` times the mean share of the pool's recent requests plus
    ``cache_balance_abs`` (a shared system prompt draws every new conversation to where it is
    cached: the request goes to the member with the best hit among those under the mean, so
    that a popular prefix is cached on a second member and the conversations spread)."""
    # One pass: each member's load, the least loaded (ties: the emptiest cache), and its hit.
    # A member that lacks the prompt's first piece is passed over without a search: in a large
    # pool that is nearly all of them (by its events: lacks the block of the first piece
    # linked to one).
    first = chain.keys[0] if chain is not None and chain.keys else None
    # The first piece of text that covers a whole block, and that block (events speak from it).
    first_link = links.first(chain.keys) if links is not None and chain is not None else None
    link = first_link[1] if first_link is not None else None
    low = float("inf")
    emptiest = best = candidates[0]
    empty_size = 0
    best_hit, best_load = 0, 0.0
    hits: dict[str, int] = {}
    for m in candidates:
        load = m.in_flight / m.weight + m.engine.waiting
        cache = m.cache
        size = cache.size() if cache is not None else 0
        if load < low or (load == low and size < empty_size):
            low, emptiest, empty_size = load, m, size
        if first is None or cache is None:
            continue
        if (
            link is not None
            and cache.events_live
            and links is not None
            and (links.block_size == cache.block_size)
        ):
            if link[0] not in cache.blocks and (link[0] in cache.gone or first not in cache.sent):
                continue
        elif first not in cache.sent:
            continue
        assert chain is not None
        hit = cache.hit_tokens(chain, links, tokens_per_byte, first_link)
        hits[m.name] = hit
        if hit > best_hit or (hit == best_hit and load < best_load):
            best, best_hit, best_load = m, hit, load
    if chain is None or len(candidates) == 1:
        return emptiest, "miss", 0
    floor = config.cache_min_share * chain.size * tokens_per_byte
    if best_hit <= 0 or best_hit < floor:
        return emptiest, "miss", 0
    if best_load - low > config.cache_balance_abs and best_load > config.cache_balance_rel * (
        low + 1
    ):
        return emptiest, "yield", 0
    if recent is not None:
        counts = recent.counts
        mean = sum(counts[m.name] for m in candidates) / len(candidates)
        if counts[best.name] > config.cache_balance_share * mean + config.cache_balance_abs:
            alt, alt_hit, alt_key = best, -1, (0, 0.0)
            for m in candidates:
                count = counts[m.name]
                if count > mean:
                    continue
                hit = hits.get(m.name, 0)
                # The best hit; among equal hits the fewest recent requests, then the least load.
                key = (count, m.in_flight / m.weight + m.engine.waiting)
                if hit > alt_hit or (hit == alt_hit and key < alt_key):
                    alt, alt_hit, alt_key = m, hit, key
            if alt is not best:
                return alt, "yield", alt_hit if alt_hit >= floor else 0
    return best, "hit", best_hit
