"""The simulator's shared state: config, counters, recent request records, and the /metrics text.

``running`` is a live gauge (engine requests between arrival and their one recorded outcome) and
survives ``reset``; the other counters and the records start again from zero. ``total`` counts every
engine request (generation and pooling), so after traffic settles
``total == completed + aborted + failed + dropped``, overall and in each entry of ``routes``.

Besides the counters it holds what the dev routes change: whether the engine sleeps or is paused
(``holding``), the jobs held meanwhile, the loaded LoRA adapters, and the log of admin calls; and,
when the config turns them on, the prefix cache model and the KV event publisher
(``simulator.prefix_cache``, ``simulator.kv_events``), which ``configure`` keeps in step with the
config. ``reset`` zeroes the cache's counters but keeps its blocks; ``reset_prefix_cache`` empties it.
While the cache model is on, ``/metrics`` also counts finished requests by finish reason
(``vllm:request_success_total``), so that a benchmark can tell how many requests each member served.
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from vllm_gateway_tools.simulator.config import ConfigError, SimulatorConfig
from vllm_gateway_tools.simulator.kv_events import KVEventPublisher, KVEventsError
from vllm_gateway_tools.simulator.prefix_cache import PrefixCache
from vllm_gateway_tools.simulator.tokenizer import Vocabulary, prompt_tokens

__all__ = ["RECORDS_KEPT", "SimState", "authorized", "prompt_tokens"]

RECORDS_KEPT = 500
_OUTCOMES = {"completed": "completed", "aborted": "aborted", "dropped": "dropped"}


def _route_counters() -> dict[str, int]:
    return {"total": 0, "running": 0, "completed": 0, "aborted": 0, "failed": 0, "dropped": 0}


class SimState:
    """Config, counters and recent request records, shared by every connection of one simulator."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.prefix_cache: PrefixCache | None = None
        self.kv_events: KVEventPublisher | None = None
        self._sync_cache(None)
        self.created = int(time.time())
        self.connections: set[Any] = set()  # the open SimProtocol connections
        self.running = 0
        self.running_by_model: dict[str, int] = {}
        self.active: set[Any] = set()  # engine.Job with a step scheduled
        self.held: set[Any] = set()  # engine.Job waiting for /wake_up or /resume
        # engine.Job waiting for one of max_num_seqs places, in arrival order (an ordered set).
        self.waiting: dict[Any, None] = {}
        self.paused = False
        self.sleeping_tags: set[str] = set()  # what /sleep put to sleep; empty: awake
        self.sleep_level = 0
        self.idle_waiters: list[Callable[[], None]] = []  # /pause?mode=wait answers
        self.loras: dict[str, str] = {}  # loaded LoRA adapters: name -> path
        self.vocab = Vocabulary()
        self.reset()

    def reset(self) -> None:
        """Zero the counters and forget the records; ``running`` is a live gauge and stays."""
        if self.prefix_cache is not None:
            self.prefix_cache.reset_counters()
        self.total = self.completed = self.aborted = self.failed = self.dropped = 0
        self.chunks = 0
        self.prompt_tokens: dict[str, int] = {}
        self.generation_tokens: dict[str, int] = {}
        # Finished engine requests by (model, finish reason), as vllm:request_success_total.
        self.finished: dict[tuple[str, str], int] = {}
        self.records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        self.admin: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        # Each route's running gauge survives, like the overall one.
        old: dict[str, dict[str, int]] = getattr(self, "routes", {})
        self.routes: dict[str, dict[str, int]] = {
            route: {**_route_counters(), "running": c["running"]}
            for route, c in old.items()
            if c["running"]
        }

    # --- config, prefix cache and KV events -------------------------------------------------------
    def configure(self, config: SimulatorConfig) -> None:
        """Take a new config; rebuild the prefix cache (and say so with ``AllBlocksCleared``) or
        reopen the event socket when their knobs changed. Raises ``ConfigError`` (and keeps the
        old config) when the new event port cannot be bound."""
        old, self.config = self.config, config
        try:
            self._sync_cache(old)
        except KVEventsError as exc:
            self.config = old
            raise ConfigError(str(exc)) from None
        self.schedule()  # a larger max_num_seqs lets waiting jobs begin

    def schedule(self) -> None:
        """Begin waiting jobs, oldest first, while fewer than ``max_num_seqs`` run. A job begins
        from the loop, not here: an end inside an end would nest as deep as the queue."""
        limit = self.config.max_num_seqs
        waiting = self.waiting
        while waiting and (not limit or self.running - len(waiting) < limit):
            job = next(iter(waiting))
            del waiting[job]  # running now: its place is taken
            job.loop.call_soon(job.begin)

    def _sync_cache(self, old: SimulatorConfig | None) -> None:
        cfg = self.config
        if old is None or cfg.kv_events_port != old.kv_events_port:
            fresh = None
            if cfg.kv_events_port is not None:  # open the new socket before closing the old one
                fresh = KVEventPublisher(cfg.kv_events_port, cfg.kv_events_topic)
            if self.kv_events is not None:
                self.kv_events.close()
            self.kv_events = fresh
        elif self.kv_events is not None:
            self.kv_events.set_topic(cfg.kv_events_topic)
        shape = (cfg.prefix_cache_blocks, cfg.block_size)
        if old is None or shape != (old.prefix_cache_blocks, old.block_size):
            had = self.prefix_cache is not None
            self.prefix_cache = PrefixCache(*shape) if cfg.prefix_cache_blocks else None
            if had and self.kv_events is not None:
                self.kv_events.publish([{"type": "AllBlocksCleared"}])

    def prefix_lookup(self, prompts: list[list[int]]) -> tuple[int, int]:
        """Admit a request's prompts to the prefix cache and publish what changed.
        Returns (cached tokens, tokens to compute); (0, 0) without a cache."""
        cache = self.prefix_cache
        if cache is None:
            return 0, 0
        publisher = self.kv_events
        hit = total = 0
        batch: list[Any] = []
        for tokens in prompts:
            found, events = cache.admit(tokens, events=publisher is not None)
            hit += found
            total += len(tokens)
            batch += events
        if publisher is not None:
            publisher.publish(batch)
        return hit, total - hit

    def reset_prefix_cache(self) -> None:
        """``POST /reset_prefix_cache``: forget every cached block; publish ``AllBlocksCleared``."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        if self.kv_events is not None:
            self.kv_events.publish([{"type": "AllBlocksCleared"}])

    def kv_event_sources(self) -> dict[str, Any]:
        """``GET /kv_event_sources``: the publisher per data-parallel rank; ``{}`` when off."""
        return {} if self.kv_events is None else {"0": self.kv_events.source()}

    def close(self) -> None:
        if self.kv_events is not None:
            self.kv_events.close()
            self.kv_events = None

    @property
    def sleeping(self) -> bool:
        return bool(self.sleeping_tags)

    @property
    def holding(self) -> bool:
        """New and frozen generation waits: the engine sleeps or is paused."""
        return self.paused or bool(self.sleeping_tags)

    def models(self) -> tuple[str, ...]:
        """What a request may name: the served models and the loaded LoRA adapters."""
        return self.config.models + tuple(self.loras)

    # --- accounting ----------------------------------------------------------------------------
    def _route(self, route: str) -> dict[str, int]:
        counters = self.routes.get(route)
        if counters is None:
            counters = self.routes[route] = _route_counters()
        return counters

    def job_started(self, route: str, model: str, prompt_tokens: int) -> None:
        self.total += 1
        self.running += 1
        self.running_by_model[model] = self.running_by_model.get(model, 0) + 1
        self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt_tokens
        counters = self._route(route)
        counters["total"] += 1
        counters["running"] += 1

    def job_finished(self, job: Any, outcome: str, tokens: int) -> None:
        self.active.discard(job)
        self.held.discard(job)
        self.waiting.pop(job, None)
        self.running -= 1
        self.running_by_model[job.model] -= 1
        name = _OUTCOMES.get(outcome, "failed")
        setattr(self, name, getattr(self, name) + 1)
        counters = self._route(job.route)
        counters["running"] -= 1
        counters[name] += 1
        self.generation_tokens[job.model] = self.generation_tokens.get(job.model, 0) + tokens
        if name != "failed":  # a simulated error is the API server's, not a finished request
            key = (job.model, job.script.finish if name == "completed" else "abort")
            self.finished[key] = self.finished.get(key, 0) + 1
        if self.waiting:
            self.schedule()
        if self.idle_waiters and not self.active:
            waiters, self.idle_waiters = self.idle_waiters, []
            for wake in waiters:
                wake()

    def rejected(self, route: str) -> None:
        """An engine request refused before it ran (400, 404): counted in total and failed."""
        self.total += 1
        self.failed += 1
        counters = self._route(route)
        counters["total"] += 1
        counters["failed"] += 1

    def served(self, route: str, status: int) -> None:
        """A request that is not an engine request (tokenize, models, admin, retrieve...)."""
        counters = self._route(route)
        counters["total"] += 1
        counters["completed" if status < 400 else "failed"] += 1

    def stats(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "held": len(self.held),
            "waiting": len(self.waiting),
            "total": self.total,
            "completed": self.completed,
            "aborted": self.aborted,
            "failed": self.failed,
            "dropped": self.dropped,
            "chunks": self.chunks,
            "connections": len(self.connections),
            "paused": self.paused,
            "sleeping": self.sleeping,
            "loras": dict(self.loras),
            "routes": {route: dict(c) for route, c in self.routes.items()},
            "admin": [dict(a) for a in self.admin],
            "requests": [dict(r) for r in self.records],
        }

    def metrics(self) -> bytes:
        """Prometheus text with vLLM's metric names and labels (``model_name``, ``engine``)."""
        lines = []
        # A held request waits before the scheduler, as vLLM holds it while asleep or paused; a
        # request beyond max_num_seqs waits in the scheduler's queue.
        running = dict(self.running_by_model)
        waiting: dict[str, int] = {}
        for job in self.held:
            running[job.model] = running.get(job.model, 0) - 1
        for job in self.waiting:
            running[job.model] = running.get(job.model, 0) - 1
            waiting[job.model] = waiting.get(job.model, 0) + 1
        gauges: tuple[tuple[str, str, str, dict[str, int]], ...] = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", "gauge", running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "gauge", waiting),
            ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", "counter", self.prompt_tokens),
            ("vllm:generation_tokens_total", "Number of generation tokens processed.", "counter", self.generation_tokens),
        )  # fmt: skip
        for name, help_text, kind, values in gauges:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for model in self.config.models:
                value = float(values.get(model, 0))
                lines.append(f'{name}{{model_name="{model}",engine="0"}} {value}')
        limit = self.config.max_num_seqs
        if self.prefix_cache is None and limit:
            # Without the cache model, each running sequence holds an equal share of the KV cache.
            used = (self.running - len(self.waiting) - len(self.held)) / limit
            lines += [
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f'vllm:kv_cache_usage_perc{{model_name="{self.config.models[0]}",engine="0"}} '
                f"{float(min(max(used, 0.0), 1.0))}",
            ]
        if self.prefix_cache is not None:
            lines += self._cache_metrics(self.prefix_cache)
            lines += [
                "# HELP vllm:request_success_total Count of successfully processed requests.",
                "# TYPE vllm:request_success_total counter",
            ]
            for (model, reason), count in sorted(self.finished.items()):
                lines.append(
                    f'vllm:request_success_total{{model_name="{model}",engine="0",'
                    f'finished_reason="{reason}"}} {float(count)}'
                )
        return ("\n".join(lines) + "\n").encode()

    def _cache_metrics(self, cache: PrefixCache) -> list[str]:
        """vLLM's prefix cache figures: one engine, labelled with the first served model."""
        labels = f'model_name="{self.config.models[0]}",engine="0"'
        rows = (
            ("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.", "counter", cache.queries),
            ("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", "counter", cache.hits),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "gauge", cache.usage),
        )  # fmt: skip
        lines = []
        for name, help_text, kind, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines.append(f"{name}{{{labels}}} {float(value)}")
        info = (
            f'block_size="{cache.block_size}",enable_prefix_caching="True",engine="0",'
            f'num_gpu_blocks="{cache.capacity}",prefix_caching_hash_algo="sha256"'
        )
        lines += [
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
            "# TYPE vllm:cache_config_info gauge",
            f"vllm:cache_config_info{{{info}}} 1.0",
        ]
        return lines


def authorized(headers: dict[str, str], key: str) -> bool:
    """vLLM's ``--api-key`` check: ``Authorization: Bearer <key>``, compared in constant time."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())
