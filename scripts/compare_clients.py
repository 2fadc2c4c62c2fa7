"""Which HTTP client should the gateway use for the backend? CPU per chunk and per request, measured.

The candidates, each used the way the gateway would use it:

- ``aiohttp``: one ``ClientSession`` (no connection limit), ``content.readany()`` per piece, exactly
  as ``http_backend.py`` does;
- ``httpx``: one ``AsyncClient`` (no pool limits), ``client.stream`` + ``aiter_raw``;
- ``upstream``: ``vllm_gateway.backends.http.client.ConnectionPool`` (asyncio.Protocol + httptools).

The simulator runs as a separate process pinned to one core (``taskset -c 1`` by default), this
process pinned to the other, so this process's CPU time (user + sys) is the client's cost plus a
trivial consumer loop. The machine is shared: CPU time, not wall time, is the figure, and the
candidates alternate within each round (rotated order), the median over rounds reported.

Scenarios: N concurrent streams of M SSE events (/v1/completions, so M tokens + [DONE] = M + 1
events each), for N in --streams; a loop of non-streamed requests at --nonstream-concurrency; and
the time from "send" to "status and headers parsed" for one request at a time (keep-alive).

    python scripts/compare_clients.py --rounds 3
    python scripts/compare_clients.py --streams 1 100 1000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from vllm_gateway_tools.simulator import loopback_command

CANDIDATES = ("aiohttp", "httpx", "upstream")


class Client:
    """One candidate: ``stream`` (count bytes of a streamed body), ``call`` (read a whole body),
    ``head`` (seconds from send to headers parsed, then read the body)."""

    name = ""

    def __init__(self, url: str) -> None:
        self.url = url

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def stream(self, body: bytes) -> int:
        raise NotImplementedError

    async def call(self, body: bytes) -> int:
        raise NotImplementedError

    async def head(self, body: bytes) -> float:
        raise NotImplementedError


class AiohttpClient(Client):
    name = "aiohttp"

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self.headers = {"Content-Type": "application/json", "X-Request-ID": "bench"}

    async def close(self) -> None:
        await self.session.close()

    async def _send(self, body: bytes) -> Any:
        return await self.session.request(
            "POST",
            self.url + "/v1/completions",
            data=body,
            headers=self.headers,
            allow_redirects=False,
        )

    async def stream(self, body: bytes) -> int:
        resp = await self._send(body)
        n = 0
        content = resp.content
        while True:
            data = await content.readany()
            if not data:
                break
            n += len(data)
        resp.release()
        return n

    async def call(self, body: bytes) -> int:
        resp = await self._send(body)
        data = await resp.read()
        resp.release()
        return len(data)

    async def head(self, body: bytes) -> float:
        t0 = time.perf_counter()
        resp = await self._send(body)
        t = time.perf_counter() - t0
        await resp.read()
        resp.release()
        return t


class HttpxClient(Client):
    name = "httpx"

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(None, connect=5),
            trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )
        self.headers = {"Content-Type": "application/json", "X-Request-ID": "bench"}

    async def close(self) -> None:
        await self.client.aclose()

    async def stream(self, body: bytes) -> int:
        n = 0
        async with self.client.stream(
            "POST", "/v1/completions", content=body, headers=self.headers
        ) as resp:
            async for data in resp.aiter_raw():
                n += len(data)
        return n

    async def call(self, body: bytes) -> int:
        resp = await self.client.post("/v1/completions", content=body, headers=self.headers)
        return len(resp.content)

    async def head(self, body: bytes) -> float:
        t0 = time.perf_counter()
        async with self.client.stream(
            "POST", "/v1/completions", content=body, headers=self.headers
        ) as resp:
            t = time.perf_counter() - t0
            await resp.aread()
        return t


class UpstreamClient(Client):
    name = "upstream"

    async def start(self) -> None:
        from vllm_gateway.backends.http.client import ConnectionPool

        self.pool = ConnectionPool(self.url)
        self.lines = b"Content-Type: application/json\r\nX-Request-ID: bench\r\n"

    async def close(self) -> None:
        await self.pool.aclose()

    async def stream(self, body: bytes) -> int:
        resp = await self.pool.request("POST", "/v1/completions", self.lines, body)
        n = 0
        async for data in resp:
            n += len(data)
        await resp.aclose()
        return n

    async def call(self, body: bytes) -> int:
        resp = await self.pool.request("POST", "/v1/completions", self.lines, body)
        data = await resp.read(64 << 20)
        await resp.aclose()
        return len(data)

    async def head(self, body: bytes) -> float:
        t0 = time.perf_counter()
        resp = await self.pool.request("POST", "/v1/completions", self.lines, body)
        t = time.perf_counter() - t0
        await resp.read(64 << 20)
        await resp.aclose()
        return t


CLIENTS: dict[str, type[Client]] = {c.name: c for c in (AiohttpClient, HttpxClient, UpstreamClient)}


def body(stream: bool, tokens: int, itl: float) -> bytes:
    return orjson.dumps(
        {
            "model": "sim-model",
            "prompt": "hello",
            "max_tokens": tokens,
            "stream": stream,
            "vllm_sim": {"ttft": 0, "itl": itl},
        }
    )


def cpu() -> float:
    return time.process_time()


async def measure(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """CPU seconds and wall seconds of one awaited phase."""
    w0, c0 = time.perf_counter(), cpu()
    result = await fn()
    return cpu() - c0, time.perf_counter() - w0, result


async def run_streams(client: Client, n: int, tokens: int, itl: float) -> dict[str, float]:
    # Warm the pool to N connections first: the steady state of a gateway carrying N streams.
    warm = body(False, 1, 0)
    await asyncio.gather(*(client.call(warm) for _ in range(n)))
    req = body(True, tokens, itl)

    async def go() -> list[int]:
        return await asyncio.gather(*(client.stream(req) for _ in range(n)))

    c, w, sizes = await measure(go)
    events = n * (tokens + 1)
    return {
        "cpu_us_per_chunk": c / events * 1e6,
        "wall_s": w,
        "chunks": events,
        "bytes": sum(sizes),
        "cpu_s": c,
    }


async def run_calls(client: Client, total: int, concurrency: int) -> dict[str, float]:
    req = body(False, 16, 0)
    per = total // concurrency

    async def worker() -> None:
        for _ in range(per):
            await client.call(req)

    await asyncio.gather(*(client.call(req) for _ in range(concurrency)))  # warm

    async def go() -> None:
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    c, w, _ = await measure(go)
    done = per * concurrency
    return {"cpu_us_per_request": c / done * 1e6, "wall_s": w, "requests_per_s": done / w}


async def run_heads(client: Client, count: int) -> dict[str, float]:
    req = body(False, 1, 0)
    await client.head(req)
    times = sorted([await client.head(req) for _ in range(count)])
    return {
        "head_us_p50": times[len(times) // 2] * 1e6,
        "head_us_p90": times[int(len(times) * 0.9)] * 1e6,
    }


def start_simulator(core: str | None) -> tuple[subprocess.Popen[str], str]:
    cmd = loopback_command(0, "--ttft", "0", "--itl", "0.01")
    if core is not None:
        cmd = ["taskset", "-c", core, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"(http://\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"simulator did not start: {line!r}")
    return proc, m.group(1)


async def main_async(args: argparse.Namespace, url: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    order = list(args.candidates)
    for rnd in range(args.rounds):
        for name in order:
            client = CLIENTS[name](url)
            await client.start()
            try:
                for n in args.streams:
                    tokens, itl = args.plan[n]
                    r = await run_streams(client, n, tokens, itl)
                    results.setdefault(f"stream{n}", {}).setdefault(name, []).append(r)
                r = await run_calls(client, args.nonstream_requests, args.nonstream_concurrency)
                results.setdefault("nonstream", {}).setdefault(name, []).append(r)
                r = await run_heads(client, args.head_requests)
                results.setdefault("head", {}).setdefault(name, []).append(r)
            finally:
                await client.close()
            print(f"round {rnd + 1} {name} done", file=sys.stderr, flush=True)
        order = order[1:] + order[:1]  # rotate who goes first
    return results


def summarise(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, per in results.items():
        for name, runs in per.items():
            keys = runs[0].keys()
            out.setdefault(scenario, {})[name] = {
                k: statistics.median(r[k] for r in runs) for k in keys
            }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument("--streams", nargs="+", type=int, default=[1, 100, 1000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nonstream-requests", type=int, default=3000)
    p.add_argument("--nonstream-concurrency", type=int, default=8)
    p.add_argument("--head-requests", type=int, default=300)
    p.add_argument("--sim-core", default="1", help="core for the simulator ('' for none)")
    p.add_argument("--self-core", default="0", help="core for this process ('' for none)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--json", help="write the medians here")
    args = p.parse_args()
    # Pace per concurrency: fast enough to measure, slow enough that the simulator keeps up.
    args.plan = {1: (400, 0.002), 100: (100, 0.02), 1000: (40, 0.1)}
    for n in args.streams:
        args.plan.setdefault(n, (100, max(0.002, n / 10000)))
    if args.self_core:
        os.sched_setaffinity(0, {int(c) for c in args.self_core.split(",")})
    proc, url = start_simulator(args.sim_core or None)
    try:
        if args.loop == "uvloop":
            import uvloop

            results = uvloop.run(main_async(args, url))
        else:
            results = asyncio.run(main_async(args, url))
    finally:
        proc.terminate()
        proc.wait(10)
    summary = summarise(results)
    print(f"loop={args.loop} rounds={args.rounds} (median over rounds; CPU of this process)")
    for scenario, per in summary.items():
        for name, r in per.items():
            print(f"{scenario:10s} {name:9s} " + "  ".join(f"{k}={v:.2f}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": results, "loop": args.loop}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
