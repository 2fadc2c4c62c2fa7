"""Drives the load: seeded requests, closed and open loop, alternating rounds over targets.

A *phase* sends one target one load (``LoadSpec``) and returns raw ``RequestResult``s plus the
client's own CPU time. A *level* runs ``rounds`` phases per target, alternating the order each
round (A B, B A, ...) so that drift on a shared machine falls on both sides, and sends every
target the same seeded request bodies. With ``client_procs > 1`` each phase is split over worker
processes (users, request indices and Poisson streams partitioned by process number) and merged.

Invariants: request ``i`` has the same body for every target and round, so digests compare by
index; connections of a closed-loop phase are opened before its clock starts; every task a phase
starts is awaited before it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any, TypeVar

import orjson

from vllm_gateway_tools.bench.client import Connection, RequestResult, Target, build_request

__all__ = [
    "LoadSpec",
    "PhaseResult",
    "ProcMonitor",
    "make_bodies",
    "run_phase",
    "run_phase_parallel",
]

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
    "on",
    "distant",
    "hills",
    "under",
    "pale",
    "evening",
    "light",
]


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What one phase sends; the same spec (and seed) gives the same bodies."""

    model: str = "default"
    endpoint: str = "chat"  # "chat" or "completions"
    stream: bool = True
    max_tokens: int = 64
    prompt_len: int = 32
    ignore_eos: bool = True
    include_usage: bool = True
    seed: int = 0
    concurrency: int = 1
    rate: float | None = None  # open loop when set
    num_requests: int | None = 100
    duration: float | None = None
    timeout: float = 600.0
    connect_timeout: float = 10.0
    fidelity: bool = True
    extra_body: tuple[tuple[str, Any], ...] = ()

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


@dataclass(slots=True)
class PhaseResult:
    results: list[RequestResult] = field(default_factory=list)
    wall_start: float = 0.0
    wall_end: float = 0.0
    client_cpu: float = 0.0

    @property
    def duration(self) -> float:
        return max(self.wall_end - self.wall_start, 1e-9)


def make_bodies(spec: LoadSpec, count: int) -> list[bytes]:
    """``count`` seeded JSON bodies; body ``i`` depends only on (spec, i)."""
    bodies = []
    for i in range(count):
        rng = random.Random(spec.seed * 1_000_003 + i)
        prompt = " ".join(rng.choice(_WORDS) for _ in range(max(spec.prompt_len, 1)))
        doc: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens}
        if spec.endpoint == "chat":
            doc["messages"] = [{"role": "user", "content": prompt}]
        else:
            doc["prompt"] = prompt
        doc["stream"] = spec.stream
        if spec.stream and spec.include_usage:
            doc["stream_options"] = {"include_usage": True}
        if spec.ignore_eos:
            doc["ignore_eos"] = True
        doc["seed"] = spec.seed * 1_000_003 + i
        doc.update(dict(spec.extra_body))
        bodies.append(orjson.dumps(doc))
    return bodies


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_phase(
    target: Target,
    spec: LoadSpec,
    bodies: Sequence[bytes],
    proc: int = 0,
    nprocs: int = 1,
    start_at: float | None = None,
) -> PhaseResult:
    """One target, one load; this process's share ``proc`` of ``nprocs``."""
    payloads = [build_request(target, spec.path, b) for b in bodies]
    if spec.rate is not None:
        return await _open_loop(target, spec, payloads, proc, nprocs, start_at)
    return await _closed_loop(target, spec, payloads, proc, nprocs, start_at)


async def _connect(target: Target, spec: LoadSpec) -> Connection | None:
    try:
        return await Connection.open(target, spec.stream, spec.fidelity, spec.connect_timeout)
    except (TimeoutError, OSError):
        return None


async def _sleep_until(wall: float | None) -> None:
    if wall is not None and (delay := wall - time.time()) > 0:
        await asyncio.sleep(delay)


async def _closed_loop(
    target: Target,
    spec: LoadSpec,
    payloads: list[bytes],
    proc: int,
    nprocs: int,
    start_at: float | None,
) -> PhaseResult:
    users = len(range(proc, spec.concurrency, nprocs))
    out = PhaseResult()
    if users == 0:
        return out
    conns: list[Connection | None] = list(
        await asyncio.gather(*(_connect(target, spec) for _ in range(users)))
    )
    total = spec.num_requests
    indices = iter(range(proc, 1 << 62, nprocs))
    await _sleep_until(start_at)
    cpu0 = _cpu_self()
    out.wall_start = time.time()
    t0 = perf_counter()
    deadline = t0 + spec.duration if spec.duration else None

    async def user(u: int) -> None:
        conn = conns[u]
        while True:
            if deadline is not None and perf_counter() >= deadline:
                break
            idx = next(indices)
            if total is not None and idx >= total:
                break
            if conn is None or conn.closed:
                conn = await _connect(target, spec)
                if conn is None:
                    out.results.append(
                        RequestResult(idx=idx, error="connect", start=perf_counter() - t0)
                    )
                    await asyncio.sleep(0.01)  # a refused connect must not spin the loop
                    continue
            out.results.append(
                await conn.request(idx, payloads[idx % len(payloads)], spec.timeout, t0)
            )
        if conn is not None:
            conn.close()

    await asyncio.gather(*(user(u) for u in range(users)))
    out.wall_end = time.time()
    out.client_cpu = _cpu_self() - cpu0
    return out


async def _open_loop(
    target: Target,
    spec: LoadSpec,
    payloads: list[bytes],
    proc: int,
    nprocs: int,
    start_at: float | None,
) -> PhaseResult:
    assert spec.rate is not None
    rate = spec.rate / nprocs
    rng = random.Random(spec.seed * 7919 + proc)
    idle: list[Connection] = []
    out = PhaseResult()
    tasks: set[asyncio.Task[None]] = set()
    await _sleep_until(start_at)
    cpu0 = _cpu_self()
    out.wall_start = time.time()
    t0 = perf_counter()

    async def one(idx: int) -> None:
        conn = idle.pop() if idle else None
        while conn is not None and conn.closed:
            conn = idle.pop() if idle else None
        if conn is None:
            conn = await _connect(target, spec)
            if conn is None:
                out.results.append(
                    RequestResult(idx=idx, error="connect", start=perf_counter() - t0)
                )
                return
        out.results.append(await conn.request(idx, payloads[idx % len(payloads)], spec.timeout, t0))
        if not conn.closed:
            idle.append(conn)

    at = 0.0
    for n, idx in enumerate(range(proc, 1 << 62, nprocs)):
        if spec.num_requests is not None and idx >= spec.num_requests:
            break
        at += rng.expovariate(rate) if n else 0.0
        if spec.duration is not None and at >= spec.duration:
            break
        if (delay := t0 + at - perf_counter()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(idx))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    out.wall_end = time.time()
    out.client_cpu = _cpu_self() - cpu0
    return out


# --- several client processes ---------------------------------------------------------------


def _worker_phase(args: tuple[Target, LoadSpec, int, int, float]) -> PhaseResult:
    target, spec, proc, nprocs, start_at = args
    count = spec.num_requests or 4096
    bodies = make_bodies(spec, count)
    return _run(run_phase(target, spec, bodies, proc, nprocs, start_at))


_T = TypeVar("_T")


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def new_pool(nprocs: int) -> concurrent.futures.ProcessPoolExecutor:
    """Worker processes for ``--client-procs``; spawned, so no event loop state is inherited."""
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=nprocs, mp_context=multiprocessing.get_context("spawn")
    )


async def run_phase_parallel(
    pool: concurrent.futures.ProcessPoolExecutor, nprocs: int, target: Target, spec: LoadSpec
) -> PhaseResult:
    """One phase split over ``nprocs`` worker processes, started together, results merged."""
    loop = asyncio.get_running_loop()
    # Leave time for connects (closed loop) before the common start.
    start_at = time.time() + 0.5 + spec.concurrency / 2000
    parts = await asyncio.gather(
        *(
            loop.run_in_executor(pool, _worker_phase, (target, spec, p, nprocs, start_at))
            for p in range(nprocs)
        )
    )
    merged = PhaseResult(
        wall_start=min(p.wall_start for p in parts if p.wall_start)
        if any(p.wall_start for p in parts)
        else 0.0,
        wall_end=max(p.wall_end for p in parts),
        client_cpu=sum(p.client_cpu for p in parts),
    )
    for p in parts:
        merged.results.extend(p.results)
    merged.results.sort(key=lambda r: r.idx)
    return merged


# --- watching the gateway and the backend from outside ---------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ProcMonitor:
    """CPU seconds (utime + stime) and RSS of one process and its descendants (a gateway's
    ``--workers``), read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _tree(self) -> dict[int, bytes]:
        """Each process of the tree: its ``stat`` fields after the command name."""
        stats: dict[int, bytes] = {}
        parents: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue  # ended meanwhile
            # The command name may hold spaces; fields are counted after its closing ")".
            rest = raw[raw.rindex(b")") + 2 :]
            stats[int(entry)] = rest
            parents.setdefault(int(rest.split(maxsplit=2)[1]), []).append(int(entry))
        tree: dict[int, bytes] = {}
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            if pid in stats:
                tree[pid] = stats[pid]
                todo.extend(parents.get(pid, ()))
        return tree

    def cpu(self) -> float | None:
        tree = self._tree()
        if self.pid not in tree:
            return None
        return sum(int(f[11]) + int(f[12]) for f in (r.split() for r in tree.values())) / _TICK

    def rss(self) -> int | None:
        tree = self._tree()
        if self.pid not in tree:
            return None
        # RSS in pages is field 24 of stat (21 after the command name and state).
        return sum(int(r.split()[21]) for r in tree.values()) * _PAGE


@dataclass(slots=True)
class Sampled:
    """What the monitors saw during one phase."""

    cpu: dict[str, float] = field(default_factory=dict)
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_peak: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    rss_series: dict[str, list[tuple[float, int]]] = field(default_factory=dict)


async def watch(
    monitors: dict[str, ProcMonitor], body: Callable[[], Any], interval: float = 0.25
) -> tuple[Any, Sampled]:
    """Run ``body()`` (a coroutine factory) while sampling every monitored process."""
    s = Sampled()
    cpu0 = {k: m.cpu() for k, m in monitors.items()}
    for k, m in monitors.items():
        if (r := m.rss()) is not None:
            s.rss_before[k] = s.rss_peak[k] = r
            s.rss_series[k] = [(0.0, r)]
    stop = asyncio.Event()
    t0 = perf_counter()

    async def sampler() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            for k, m in monitors.items():
                if (r := m.rss()) is not None:
                    s.rss_peak[k] = max(s.rss_peak.get(k, 0), r)
                    s.rss_series.setdefault(k, []).append((perf_counter() - t0, r))

    task = asyncio.create_task(sampler())
    try:
        value = await body()
    finally:
        stop.set()
        await task
    for k, m in monitors.items():
        c1 = m.cpu()
        if c1 is not None and (c0 := cpu0[k]) is not None:
            s.cpu[k] = c1 - c0
        if (r := m.rss()) is not None:
            s.rss_after[k] = r
    return value, s


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def spec_for_level(
    spec: LoadSpec, concurrency: int | None = None, rate: float | None = None
) -> LoadSpec:
    changes: dict[str, Any] = {}
    if concurrency is not None:
        changes["concurrency"] = concurrency
    if rate is not None:
        changes["rate"] = rate
    return replace(spec, **changes)
