#!/usr/bin/env python3
"""Throughput of a pool as members are added: 1, 2, 4 simulators, each with a fixed capacity.

The simulator has no capacity limit of its own, so each member's capacity is emulated with the
pool's per-member limit (``max_outstanding``): with ``C`` slots per member and a request taking
``ttft + itl * (tokens - 1)`` seconds, one member completes at most ``C / duration`` requests per
second, and ``n`` members ``n`` times that. The load is a closed loop of ``--clients`` concurrent
clients (more than the pool's total slots, so the members stay full), each sending non-streamed
requests through a ``PoolBackend`` for ``--seconds``. Everything runs in this process on loopback.

Prints one line per pool size and, with ``--json``, writes the numbers. A pool that scales shows
requests/s close to ``n * C / duration`` and a scaling factor close to ``n``; the rig (one event
loop for simulators, pool and clients) is the limit well before the pool is.

    .venv/bin/python scripts/bench_pool.py --sizes 1,2,4 --capacity 4 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import orjson

from vllm_gateway.backends.base import UpstreamRequest
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.config import BackendSpec, PoolConfig
from vllm_gateway.errors import GatewayError
from vllm_gateway_tools.simulator import SimulatorConfig, start_simulator


async def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    sim_cfg = SimulatorConfig(ttft=args.ttft, itl=args.itl, tokens=args.tokens)
    sims = [await start_simulator(sim_cfg) for _ in range(n)]
    pool = PoolBackend(
        specs=[BackendSpec(url=s.url) for s in sims],
        config=PoolConfig(
            max_outstanding=args.capacity,
            admission_wait=60.0,
            health_interval=1.0,
            watchdog_stall=30.0,
        ),
    )
    await pool.start()
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": args.tokens,
    }
    raw = orjson.dumps(body)
    done = 0
    errors = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + args.seconds

    async def client() -> None:
        nonlocal done, errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            req = UpstreamRequest("POST", "/v1/chat/completions", raw, body, False, "", "sim-model")
            try:
                resp = await pool.send(req)
                try:
                    await resp.read(1 << 20)
                    ok = resp.status == 200
                finally:
                    await resp.aclose()
            except GatewayError:
                ok = False
            if ok:
                done += 1
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(args.clients)))
    finally:
        elapsed = time.perf_counter() - started
        per_member = [m["requests"] for m in pool.stats()]
        await pool.aclose()
        for s in sims:
            await s.close()
    duration = args.ttft + args.itl * (args.tokens - 1)
    latencies.sort()
    return {
        "members": n,
        "capacity_per_member": args.capacity,
        "requests": done,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(done / elapsed, 2),
        "ideal_requests_per_s": round(n * args.capacity / duration, 2),
        "latency_p50_s": round(latencies[len(latencies) // 2], 4) if latencies else None,
        "per_member_requests": per_member,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for n in args.sizes:
        result = await run_size(n, args)
        base = results[0]["requests_per_s"] / results[0]["members"] if results else None
        result["scaling"] = round(result["requests_per_s"] / base, 2) if base else 1.0
        results.append(result)
        print(
            f"{n} member(s): {result['requests_per_s']:8.1f} req/s "
            f"(ideal {result['ideal_requests_per_s']:.1f}, scaling x{result['scaling']:.2f}), "
            f"errors {result['errors']}, per member {result['per_member_requests']}",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,2,4", help="comma-separated pool sizes")
    p.add_argument("--capacity", type=int, default=4, help="outstanding requests per member")
    p.add_argument("--clients", type=int, default=0, help="concurrent clients (0: 2x total slots)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--ttft", type=float, default=0.1)
    p.add_argument("--itl", type=float, default=0.01)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if not args.clients:
        args.clients = 2 * args.capacity * max(args.sizes)
    results = asyncio.run(main_async(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
