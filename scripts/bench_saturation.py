"""Admission from the engines' state against the per-replica semaphore, with gateway replicas.

Two simulators (separate processes) stand for two engines of unequal size (``max_num_seqs`` 8 and
2); 2 or 4 gateway processes in front of both, and a closed-loop load of streams spread over the
replicas. Each configuration runs alone, in turn, in one run:

- ``fleet``: every client the same; per mode (``semaphore``: the seed's default, 100 per replica;
  ``saturation``: ``VLLM_POOL_SATURATION_MAX_WAITING``) and replica count: completed requests per
  second, goodput (those whose first token came within ``--slo`` seconds), TTFT p50/p99, errors,
  and the longest waiting queue each engine's ``/metrics`` showed (sampled every 20 ms).
- ``tenants``: 2 replicas sharing Redis, 2 tenants; the polite one (``--polite`` clients) alone,
  then beside a flood (``--flood`` clients) of the other: the polite tenant's goodput and TTFT.
- ``cost``: the pool's acquire and release in-process, without and with the rule.

With ``--engines vllm`` the ``fleet`` runs against two real vLLM CPU servers instead (the default
model, ``--enforce-eager``, ``max_num_seqs`` 4 and 2: ``--vllm-seqs``), started once for the whole
run; each request asks ``--max-tokens`` tokens. ``--stale`` sets the rule's staleness bound:
raise it with a ``--scrape`` near its default of 2 s, or members count as unknown between readings.

    PYTHONPATH=src:tools .venv/bin/python scripts/bench_saturation.py --seconds 10
    PYTHONPATH=src:tools .venv/bin/python scripts/bench_saturation.py --engines vllm \
        --only fleet --seconds 30 --clients 12 --replicas 2 --slo 2

Figures go to docs/performance.md (section "Admission from the engines' state").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

PY = sys.executable
LIMITS = httpx.Limits(max_connections=1000)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen within 30 s")
        time.sleep(0.05)


@contextlib.contextmanager
def processes(commands: list[tuple[list[str], dict[str, str], int]]) -> Iterator[list[str]]:
    """Start each (argv, env, port); yield their URLs; SIGTERM, then kill, at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv, env, port in commands:
            base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
            proc = subprocess.Popen(
                argv, env={**base, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            procs.append(proc)
            wait_listening(port, proc, argv[2])
        yield [f"http://127.0.0.1:{port}" for _, _, port in commands]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def simulators(capacities: list[int]) -> list[tuple[list[str], dict[str, str], int]]:
    out: list[tuple[list[str], dict[str, str], int]] = []
    for cap in capacities:
        port = free_port()
        argv = [PY, "-m", "vllm_gateway_tools.simulator", "--port", str(port)]
        argv += ["--ttft", "0.02", "--itl", "0.01", "--tokens", "32", "--max-num-seqs", str(cap)]
        out.append((argv, {}, port))
    return out


def gateways(n: int, env: dict[str, str]) -> list[tuple[list[str], dict[str, str], int]]:
    out = []
    for _ in range(n):
        port = free_port()
        argv = [PY, "-m", "vllm_gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
        out.append((argv, env, port))
    return out


@contextlib.contextmanager
def redis() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is needed (scripts/system-deps.sh)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp]
        with processes([(argv, {}, port)]):
            yield f"redis://127.0.0.1:{port}/0"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


_WAITING = re.compile(r"^vllm:num_requests_waiting\{[^}]*\} (\S+)$", re.M)


async def peak_waiting(client: httpx.AsyncClient, engines: list[str], stop: asyncio.Event) -> list[float]:  # fmt: skip
    peaks = [0.0] * len(engines)
    while not stop.is_set():
        for i, url in enumerate(engines):
            text = (await client.get(url + "/metrics")).text
            peaks[i] = max(peaks[i], sum(float(v) for v in _WAITING.findall(text)))
        await asyncio.sleep(0.02)
    return peaks


@contextlib.contextmanager
def vllm_engines(seqs: list[int]) -> Iterator[tuple[list[str], str]]:
    """Real vLLM CPU servers of the default model, one per ``max_num_seqs`` in ``seqs``;
    yields their URLs and the served model name. Logs under ``$TMPDIR/bench-saturation-vllm``."""
    from vllm_gateway.backends.embedded import model as model_prep
    from vllm_gateway.runtime.up.vllm_command import (
        build_vllm_command,
        child_environment,
        served_names,
    )
    from vllm_gateway.runtime.up.vllm_process import VllmChild
    from vllm_gateway.runtime.up.warmup import wait_healthy

    model = str(model_prep.prepare_default_model(model_prep.default_cache_dir(os.environ)))
    name = served_names(model)[0]
    logs = os.path.join(tempfile.gettempdir(), "bench-saturation-vllm")
    children: list[Any] = []
    try:
        for i, n in enumerate(seqs):
            port = free_port()
            extra = ("--enforce-eager", "--max-num-seqs", str(n))
            command = build_vllm_command(PY, model, port, gpu=False, extra=extra)
            env = child_environment(os.environ, gpu=False)
            log = Path(logs) / f"vllm-{i}-seqs{n}.log"
            children.append(VllmChild.start(command, env, log, name, port))
        for child in children:
            wait_healthy(child, 600.0, sys.stderr)
        yield [child.url for child in children], name
    finally:
        for child in children:
            child.stop(30.0)


def first_text(line: str) -> bool:
    """An SSE data line whose chunk carries generated text (not vLLM's role-only first chunk)."""
    if not line.startswith("data: {"):
        return False
    chunk = json.loads(line[6:])
    return any(c.get("delta", {}).get("content") for c in chunk.get("choices", []))


async def load(
    client: httpx.AsyncClient,
    urls: list[str],
    clients: int,
    seconds: float,
    key: str | None,
    ttfts: list[float],
    errors: list[int],
    model: str = "sim-model",
    max_tokens: int | None = None,
) -> None:
    """``clients`` closed loops of one stream after another, spread over ``urls``."""
    end = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens

    async def loop(i: int) -> None:
        url = urls[i % len(urls)] + "/v1/chat/completions"
        n = 0
        while time.monotonic() < end:
            n += 1
            payload = dict(body)
            if max_tokens is not None:  # a real engine: distinct prompts, no prefix-cache hits
                payload["messages"] = [{"role": "user", "content": f"{i} {n}: tell me a story."}]
            t0 = time.monotonic()
            first = None
            try:
                async with client.stream("POST", url, json=payload, headers=headers) as resp:
                    if max_tokens is None:
                        async for chunk in resp.aiter_bytes():
                            if first is None and resp.status_code == 200 and chunk:
                                first = time.monotonic() - t0
                    else:
                        async for line in resp.aiter_lines():
                            if first is None and resp.status_code == 200 and first_text(line):
                                first = time.monotonic() - t0
                    if resp.status_code != 200:
                        errors.append(resp.status_code)
                        await asyncio.sleep(0.1)
                        continue
            except httpx.HTTPError:
                errors.append(0)
                continue
            if first is not None:
                ttfts.append(first)

    await asyncio.gather(*(loop(i) for i in range(clients)))


def summary(ttfts: list[float], errors: list[int], seconds: float, slo: float) -> dict[str, Any]:
    """``seconds``: from the load's start to its last answer (the closed loops finish the
    request in hand after the set time, the queued ones too)."""
    return {
        "done_per_s": round(len(ttfts) / seconds, 1),
        "goodput_per_s": round(sum(1 for t in ttfts if t <= slo) / seconds, 1),
        "ttft_p50_ms": round(pct(ttfts, 50) * 1000),
        "ttft_p99_ms": round(pct(ttfts, 99) * 1000),
        "errors": len(errors),
    }


def mode_env(mode: str, engines: list[str], args: argparse.Namespace) -> dict[str, str]:
    env = {"VLLM_BACKEND_URL": ",".join(engines)}
    if mode == "saturation":
        env["VLLM_POOL_SATURATION_MAX_WAITING"] = str(args.max_waiting)
        env["VLLM_POOL_SATURATION_SCRAPE_SECONDS"] = str(args.scrape)
        if args.stale is not None:
            env["VLLM_POOL_SATURATION_STALE_SECONDS"] = str(args.stale)
    return env


async def fleet_row(
    engines: list[str],
    n: int,
    mode: str,
    clients: int,
    args: argparse.Namespace,
    model: str = "sim-model",
    max_tokens: int | None = None,
) -> str:
    """One configuration: ``n`` gateway replicas in ``mode`` in front of ``engines``."""
    with processes(gateways(n, mode_env(mode, engines, args))) as urls:
        async with httpx.AsyncClient(timeout=120, limits=LIMITS) as client:
            stop = asyncio.Event()
            sampler = asyncio.create_task(peak_waiting(client, engines, stop))
            ttfts: list[float] = []
            errors: list[int] = []
            t0 = time.monotonic()
            await load(client, urls, clients, args.seconds, None, ttfts, errors, model, max_tokens)
            elapsed = time.monotonic() - t0
            stop.set()
            peaks = await sampler
    s = summary(ttfts, errors, elapsed, args.slo)
    return (
        f"| {clients} | {n} | {mode} | {s['done_per_s']} | {s['goodput_per_s']} "
        f"| {s['ttft_p50_ms']} | {s['ttft_p99_ms']} | {s['errors']} "
        f"| {', '.join(f'{p:g}' for p in peaks)} |"
    )


async def fleet(args: argparse.Namespace) -> None:
    seqs = [8, 2] if args.engines == "sim" else args.vllm_seqs
    names = ", ".join(f"engine {n}" for n in seqs)
    print(
        f"## fleet ({args.engines}): engines max_num_seqs {' and '.join(map(str, seqs))}, "
        f"{args.seconds:g} s, TTFT SLO {args.slo:g} s, saturation: max waiting "
        f"{args.max_waiting} read every {args.scrape:g} s (stale after {args.stale or 'default'}); "
        f"load average {loadavg()}"
    )
    print(f"| clients | replicas | mode | done/s | goodput/s | TTFT p50 ms | TTFT p99 ms | errors | peak waiting ({names}) |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    configs = list(itertools.product(args.clients, args.replicas, ("semaphore", "saturation")))
    if args.engines == "sim":
        for clients, n, mode in configs:
            with processes(simulators(seqs)) as engines:
                print(await fleet_row(engines, n, mode, clients, args), flush=True)
        return
    with vllm_engines(seqs) as (engines, model):
        tokens = args.max_tokens
        async with httpx.AsyncClient(timeout=120, limits=LIMITS) as client:  # warm-up
            await load(client, engines, 2 * sum(seqs), 5.0, None, [], [], model, tokens)
        for clients, n, mode in configs:
            print(await fleet_row(engines, n, mode, clients, args, model, tokens), flush=True)
    print(f"load average at the end: {loadavg()}")


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def tenants(args: argparse.Namespace) -> None:
    print(f"\n## tenants: 2 replicas, Redis, polite {args.polite} clients, flood {args.flood}")
    print("| mode | polite alone: goodput/s, TTFT p99 ms | polite beside the flood: goodput/s, TTFT p99 ms | flood done/s | errors |")  # fmt: skip
    print("|---|---|---|---:|---:|")
    with redis() as redis_url:
        for mode in ("semaphore", "saturation"):
            row = []
            flood_done = 0.0
            errors: list[int] = []
            for with_flood in (False, True):
                with processes(simulators([4, 4])) as engines:
                    env = {
                        **mode_env(mode, engines, args),
                        "VLLM_API_KEYS": "key-a:team-a,key-b:team-b",
                        "VLLM_REDIS_URL": redis_url,
                        "VLLM_RATE_LIMIT_RPM": "1000000",
                    }
                    with processes(gateways(2, env)) as urls:
                        async with httpx.AsyncClient(timeout=120, limits=LIMITS) as client:
                            polite: list[float] = []
                            flood: list[float] = []
                            t0 = time.monotonic()
                            jobs = [load(client, urls, args.polite, args.seconds, "key-b", polite, errors)]  # fmt: skip
                            if with_flood:
                                jobs.append(load(client, urls, args.flood, args.seconds, "key-a", flood, errors))  # fmt: skip
                            await asyncio.gather(*jobs)
                            elapsed = time.monotonic() - t0
                s = summary(polite, [], elapsed, args.slo)
                row.append(f"{s['goodput_per_s']}, {s['ttft_p99_ms']}")
                if with_flood:
                    flood_done = round(len(flood) / elapsed, 1)
            print(f"| {mode} | {row[0]} | {row[1]} | {flood_done} | {len(errors)} |", flush=True)


async def cost(args: argparse.Namespace) -> None:
    """The pool's acquire and release, in-process, without and with the rule (fresh readings
    with room): the CPU the rule adds per request."""
    from vllm_gateway.backends.base import UpstreamRequest
    from vllm_gateway.backends.pool.backend import PoolBackend
    from vllm_gateway.backends.pool.saturation import Reading
    from vllm_gateway.settings import Settings

    urls = ("http://127.0.0.1:9", "http://127.0.0.1:10")
    request = UpstreamRequest("POST", "/v1/chat/completions", model="m", request_id="r")
    print("\n## cost: acquire + release, µs per request (best of 5 rounds of 100,000)")
    for mode in ("off", "on"):
        pool = Settings(backend_urls=urls).pool
        if mode == "on":
            pool = pool.replace(saturation_max_waiting=1_000_000)
        backend = PoolBackend(Settings(backend_urls=urls, pool=pool))
        sat = backend.saturation
        best = float("inf")
        for _ in range(5):
            if sat is not None:
                for m in backend.members:
                    sat.readings[m.name] = Reading(0.0, 0.0, 0.1, time.monotonic() + 3600, 0)
            t0 = time.perf_counter()
            for _ in range(100_000):
                member = await backend.acquirer.acquire(request, [])
                backend.acquirer.release(member)
            best = min(best, (time.perf_counter() - t0) / 100_000 * 1e6)
        print(f"| {mode} | {best:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--clients", type=int, nargs="+", default=[12, 48])
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    p.add_argument("--max-waiting", type=int, default=2)
    p.add_argument("--scrape", type=float, default=0.1)
    p.add_argument("--stale", type=float, default=None, help="VLLM_POOL_SATURATION_STALE_SECONDS")
    p.add_argument("--slo", type=float, default=1.0, help="TTFT bound of goodput, seconds")
    p.add_argument("--polite", type=int, default=2)
    p.add_argument("--flood", type=int, default=64)
    p.add_argument("--only", choices=("fleet", "tenants", "cost"), default=None)
    p.add_argument("--engines", choices=("sim", "vllm"), default="sim", help="fleet's engines")
    p.add_argument("--vllm-seqs", type=int, nargs="+", default=[4, 2], help="their max_num_seqs")
    p.add_argument("--max-tokens", type=int, default=16, help="per request, vllm engines only")
    args = p.parse_args()
    if args.only in (None, "fleet"):
        asyncio.run(fleet(args))
    if args.only in (None, "tenants"):
        asyncio.run(tenants(args))
    if args.only in (None, "cost"):
        asyncio.run(cost(args))


if __name__ == "__main__":
    main()
