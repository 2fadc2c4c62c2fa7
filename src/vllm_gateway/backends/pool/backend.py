"""A pool of vLLM servers behind one ``Backend``: ``PoolBackend`` wires the pool's parts.

``PoolBackend`` is the pool's one implementation of the ``Backend`` seam (``backends/base.py``), so
the gateway above it is the same for one server and for many. It builds the parts and owns their
lifecycle (``start`` and ``aclose``, in that order and the reverse); each job is one module:

- ``fleet.py``: the set of members (``member.py``), and a member's ejection;
- ``acquire.py``: a member's slot for an attempt, and the wait when every member is full;
- ``routing.py``: which member, by ``pool_routing`` (``cache_aware.py`` for ``cache_aware``);
- ``saturation.py``: admission from the engines' state (``pool_saturation_max_waiting``);
- ``retry.py``: sending, and moving to another member before the first byte; the retry budget;
- ``response.py``: the pool's responses (a member's, swapped before its first byte; its own);
- ``holders.py``: which member holds a stored response;
- ``broadcast.py``, ``model_list.py``: admin requests to every member; the merged model list;
- ``health.py``: the background checks, the watchdog and readmission;
- ``discovery.py``: members from DNS (``VLLM_BACKEND_DISCOVERY``), reconciled into the fleet;
- ``file_source.py``: the backends file, re-read when it changes (and on SIGHUP).

``send`` sends a request: ``GET /v1/models`` and admin requests to every member, any other to one
member (the holder of the stored response it names, when one is found; never a member in
``request.avoid``, a failover's failed ones).

Invariants: the parts are built here and nowhere else, each given the one ``Fleet``; ``start``
starts the members' clients, then DNS discovery (its first answer's members join), then the health
task (whose first round admits those that pass and marks the members that are down at start),
then cache-aware routing's task, then the saturation readings' task, then the backends file's
watcher; ``aclose`` stops them in the reverse order.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from vllm_gateway.backends.base import Backend, BackendStats, UpstreamRequest, UpstreamResponse
from vllm_gateway.backends.http.backend import HTTPBackend
from vllm_gateway.backends.pool.acquire import Acquirer
from vllm_gateway.backends.pool.broadcast import broadcast
from vllm_gateway.backends.pool.cache_aware import CacheAware
from vllm_gateway.backends.pool.config import (
    BackendSpec,
    PoolConfig,
    load_backends_file,
    specs_from_urls,
)
from vllm_gateway.backends.pool.discovery import DnsDiscovery, DnsTarget
from vllm_gateway.backends.pool.file_source import BackendsFile
from vllm_gateway.backends.pool.fleet import Fleet
from vllm_gateway.backends.pool.health import PoolHealth
from vllm_gateway.backends.pool.holders import Holders
from vllm_gateway.backends.pool.member import Member
from vllm_gateway.backends.pool.model_list import model_ids, model_listing
from vllm_gateway.backends.pool.response import PoolResponse
from vllm_gateway.backends.pool.retry import Retries
from vllm_gateway.backends.pool.routing import Router
from vllm_gateway.backends.pool.saturation import Saturation
from vllm_gateway.settings import Settings

__all__ = ["PoolBackend", "PoolResponse", "load_backends_file"]


class PoolBackend(Backend):
    name = "pool"

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        specs: list[BackendSpec] | None = None,
        config: PoolConfig | None = None,
        **overrides: Any,
    ) -> None:
        settings = settings if settings is not None else Settings()
        specs_given = specs
        # Members from DNS start none: the first resolution, in ``start``, adds them.
        discovery = settings.backend_discovery if specs is None else None
        if discovery is not None:
            specs = []
        elif specs is None:
            path = settings.backends_file
            specs = load_backends_file(path) if path else specs_from_urls(settings.backend_urls)
        if not specs and discovery is None:
            raise ValueError("a pool needs at least one backend")
        self.config = cfg = config if config is not None else settings.pool.replace(**overrides)
        self.settings = settings

        def make(spec: BackendSpec) -> Member:
            backend = HTTPBackend.from_settings(settings, spec.url, spec.name or spec.url)
            return Member(spec, cfg, backend)

        if len(specs) > cfg.max_members:
            raise ValueError(
                f"{len(specs)} backends given; a pool holds {cfg.max_members} at most "
                "(VLLM_POOL_MAX_MEMBERS)"
            )
        self.fleet = Fleet([make(s) for s in specs], cfg, make)
        source = "file" if settings.backends_file and specs_given is None else "start"
        for m in self.fleet.members:
            m.source = source
        self.cache_aware = CacheAware(self.fleet, cfg) if cfg.routing == "cache_aware" else None
        if self.cache_aware is not None:
            self.fleet.on_leave.append(self.cache_aware.forget)
            self.fleet.on_join.append(self.cache_aware.joined)
            self.fleet.on_gone.append(self.cache_aware.gone)
        self.router = Router(self.fleet, cfg, self.cache_aware)
        self.saturation = (
            Saturation(self.fleet, cfg, settings.queue_wait_timeout, settings.first_token_timeout)
            if cfg.saturation_max_waiting is not None
            else None
        )
        if self.saturation is not None:
            self.fleet.on_gone.append(self.saturation.gone)
        self.acquirer = Acquirer(
            self.fleet, cfg, self.router, settings.queue_wait_timeout, self.saturation
        )
        self.retries = Retries(self.fleet, cfg, self.acquirer)
        self.holders = Holders(self.fleet, cfg)
        self.health = PoolHealth(self.fleet, cfg)
        self.discovery: DnsDiscovery | None = None
        if discovery is not None:
            self.discovery = DnsDiscovery(
                DnsTarget.parse(discovery),
                self._discovered,
                min_interval=settings.backend_discovery_min_interval,
                max_interval=settings.backend_discovery_max_interval,
                timeout=settings.backend_discovery_timeout,
                max_members=cfg.max_members,
                nameservers=settings.backend_discovery_nameservers or (),
            )
        self.file: BackendsFile | None = None
        if source == "file" and settings.backends_file:
            self.file = BackendsFile(
                settings.backends_file, self.fleet, settings.backends_file_poll
            )
            with contextlib.suppress(OSError):
                self.file.seen(Path(settings.backends_file).read_bytes())

    async def _discovered(self, urls: list[str]) -> None:
        await self.fleet.reconcile(urls, "dns")

    @classmethod
    def from_file(cls, path: str, settings: Any = None, **kwargs: Any) -> PoolBackend:
        """A pool whose members come from a backends file (see ``pool_config``)."""
        return cls(settings, specs=load_backends_file(path), **kwargs)

    @property
    def members(self) -> list[Member]:
        return self.fleet.members

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        for m in self.fleet.members:
            await m.backend.start()
        if self.discovery is not None:  # before the health task: its first round admits them
            await self.discovery.start()
        await self.health.start()
        if self.cache_aware is not None:
            await self.cache_aware.start()
        if self.saturation is not None:
            await self.saturation.start()
        if self.file is not None:
            await self.file.start()

    async def aclose(self) -> None:
        if self.file is not None:
            await self.file.aclose()
        if self.saturation is not None:
            await self.saturation.aclose()
        if self.cache_aware is not None:
            await self.cache_aware.aclose()
        await self.health.aclose()
        if self.discovery is not None:
            await self.discovery.aclose()
        for m in self.fleet.members:
            await m.backend.aclose()

    def reload(self) -> None:
        """Read the backends file now (SIGHUP); nothing without one."""
        if self.file is not None:
            self.file.wake()

    def describe(self) -> list[dict[str, Any]]:
        """Each member with its lifecycle state (the admin API's list)."""
        return self.fleet.describe()

    # --- the Backend seam ------------------------------------------------------------------

    async def check_health(self, timeout: float) -> bool:
        return any(m.up for m in self.fleet.members)  # the background checks keep this current

    async def model_ids(self, timeout: float) -> list[str] | None:
        return await model_ids(self.fleet, timeout)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        if request.method == "GET" and request.path == "/v1/models":
            return await model_listing(self.fleet, self.config, request)
        if request.broadcast:
            return await broadcast(self.fleet, request)
        retries = self.retries
        retries.budget.request()
        members = self.fleet.members
        avoid = request.avoid  # a failover's failed members; most requests have none
        tried: list[Member] = [m for m in members if m.name in avoid] if avoid else []
        if request.locate is not None:
            holder = await self.holders.find(request.locate, request.request_id)
            if holder is not None:
                # Only the holder has what the request names: every other member is "tried".
                tried.extend(m for m in members if m is not holder)
        member, resp = await retries.open(request, tried)
        return PoolResponse(retries, request, member, resp, tried)

    def may_fail_over(self) -> bool:
        # Read per stream: a pool of one asks no token ids (what a continuation needs) until a
        # second member is added; its streams then in flight may only finish by the drain deadline.
        return self.config.failover_max > 0 and len(self.fleet.members) > 1

    def can_fail_over(self, model: str | None, avoid: frozenset[str], done: int) -> str | None:
        return self.retries.may_fail_over(model, avoid, done)

    def note_prompt_ids(self, request_id: str, prompt_ids: list[int]) -> None:
        if self.cache_aware is not None:
            self.cache_aware.learned(request_id, prompt_ids)

    def stats(self) -> list[BackendStats]:
        """Per member: name, url, in_flight, healthy, errors, ejections, requests (and more)."""
        members = self.fleet.members
        stats = [m.stats() for m in members]
        if self.cache_aware is not None:
            for entry, m in zip(stats, members, strict=True):
                entry["cache"] = self.cache_aware.member_stats(m)
        stats.extend(m.stats() for m in self.fleet.gone)  # the last ones gone (bounded)
        return stats

    def pool_stats(self) -> dict[str, Any]:
        stats = {
            "retries": self.retries.count,
            "retry_budget_exhausted": self.retries.budget.exhausted,
            "affinity_yields": self.router.affinity_yields,
            "routing": self.config.routing,
        }
        if self.cache_aware is not None:
            stats["cache_decisions"] = dict(self.cache_aware.decisions)
        if self.saturation is not None:
            stats["saturation"] = self.saturation.stats()
        if self.discovery is not None:
            stats["discovery"] = self.discovery.stats()
        return stats
