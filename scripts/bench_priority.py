"""Priority classes into a real vLLM engine: the high class's TTFT beside the low class's, with
``VLLM_PRIORITY_SCHEDULING`` on and off, alternating in one run.

One vLLM CPU server with the default model (SmolLM2-135M-Instruct, prepared as
``vllm-gateway up`` prepares it) started with ``--scheduling-policy priority --enforce-eager`` and
a small ``--max-num-seqs``, so that the engine itself holds a waiting queue; one gateway process in
front of it with two tenants of different classes (``hi:gold:5``, ``lo:bronze:0``). Its own limit
(the seed's 100) is far above the load, so nothing waits in the gateway: any difference between
the classes is the engine's order. Phases of ``--phase`` seconds alternate ``on``, ``off``, ``on``
... (a fresh gateway each phase, the same engine); each phase runs closed loops of streamed chat
requests (``--high`` clients of the high class, ``--low`` of the low one) and records each
request's time to its first token, per class.

    PYTHONPATH=src:tools .venv/bin/python scripts/bench_priority.py --out /tmp/prio

Writes ``report.md`` and ``results.json`` under ``--out`` (docs/results/priority/ keeps a run's);
figures go to docs/performance.md ("Priority classes in the engine").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.runtime.up.vllm_command import (
    build_vllm_command,
    child_environment,
    served_names,
)
from vllm_gateway.runtime.up.vllm_process import VllmChild
from vllm_gateway.runtime.up.warmup import wait_healthy

PY = sys.executable
KEYS = {"high": "hi", "low": "lo"}
API_KEYS = "hi:gold:5,lo:bronze:0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@contextlib.contextmanager
def vllm_server(out: Path, max_num_seqs: int) -> Iterator[tuple[str, str]]:
    """The default model with the priority policy; yields (url, served model name)."""
    model = str(model_prep.prepare_default_model(model_prep.default_cache_dir(os.environ)))
    port = free_port()
    extra = (
        "--scheduling-policy",
        "priority",
        "--enforce-eager",
        "--max-num-seqs",
        str(max_num_seqs),
    )
    command = build_vllm_command(PY, model, port, gpu=False, extra=extra)
    name = served_names(model)[0]
    child = VllmChild.start(
        command, child_environment(os.environ, gpu=False), out / "vllm.log", name, port
    )
    try:
        wait_healthy(child, 600.0, sys.stderr)
        yield child.url, name
    finally:
        child.stop(30.0)


@contextlib.contextmanager
def gateway(engine: str, mapping: bool, out: Path) -> Iterator[str]:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env = {
        **base,
        "VLLM_BACKEND_URL": engine,
        "VLLM_API_KEYS": API_KEYS,
        "VLLM_PRIORITY_SCHEDULING": "true" if mapping else "false",
    }
    argv = [PY, "-m", "vllm_gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with (out / "gateway.log").open("ab") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not listen within 60 s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def phase(
    url: str, model: str, args: argparse.Namespace
) -> tuple[dict[str, list[float]], list[int]]:
    """Closed loops of streams, ``args.high`` + ``args.low`` clients, for ``args.phase`` s."""
    ttfts: dict[str, list[float]] = {"high": [], "low": []}
    errors: list[int] = []
    end = time.monotonic() + args.phase
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def loop(cls: str, i: int) -> None:
            headers = {"Authorization": f"Bearer {KEYS[cls]}"}
            n = 0
            while time.monotonic() < end:
                n += 1
                body = {
                    "model": model,
                    # Distinct prompts: no prefix-cache hit makes one class's prefill cheaper.
                    "messages": [{"role": "user", "content": f"{cls} {i} {n}: tell me a story."}],
                    "max_tokens": args.max_tokens,
                    "stream": True,
                }
                t0 = time.monotonic()
                first = None
                try:
                    async with client.stream(
                        "POST", url + "/v1/chat/completions", json=body, headers=headers
                    ) as resp:
                        async for line in resp.aiter_lines():
                            if first is None and resp.status_code == 200 and has_text(line):
                                first = time.monotonic() - t0
                        if resp.status_code != 200:
                            errors.append(resp.status_code)
                            await asyncio.sleep(0.5)
                            continue
                except httpx.HTTPError:
                    errors.append(0)
                    await asyncio.sleep(0.5)
                    continue
                if first is not None:
                    ttfts[cls].append(first)

        jobs = [loop("high", i) for i in range(args.high)]
        jobs += [loop("low", i) for i in range(args.low)]
        await asyncio.gather(*jobs)
    return ttfts, errors


def has_text(line: str) -> bool:
    """An SSE data line whose chunk carries generated text (not the role-only first chunk)."""
    if not line.startswith("data: {"):
        return False
    chunk = json.loads(line[6:])
    return any(c.get("delta", {}).get("content") for c in chunk.get("choices", []))


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--phase", type=float, default=20.0, help="seconds of one phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (on, off)")
    p.add_argument("--high", type=int, default=4, help="clients of the high class")
    p.add_argument("--low", type=int, default=8, help="clients of the low class")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=4)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    phases: list[dict[str, Any]] = []
    totals: dict[str, dict[str, list[float]]] = {m: {"high": [], "low": []} for m in ("on", "off")}
    errors_total = {"on": 0, "off": 0}
    with vllm_server(args.out, args.max_num_seqs) as (engine, model):
        # Warm the engine (the first requests pay for its first batch shapes).
        with gateway(engine, False, args.out) as gw:
            warm = argparse.Namespace(**{**vars(args), "phase": 5.0})
            asyncio.run(phase(gw, model, warm))
        for r in range(args.rounds):
            for mode in ("on", "off"):
                load_before = loadavg()
                with gateway(engine, mode == "on", args.out) as gw:
                    ttfts, errors = asyncio.run(phase(gw, model, args))
                row = {
                    "round": r + 1,
                    "mapping": mode,
                    "load_average_before": load_before,
                    "errors": len(errors),
                }
                for cls in ("high", "low"):
                    row[f"{cls}_done"] = len(ttfts[cls])
                    row[f"{cls}_ttft_p50_ms"] = round(pct(ttfts[cls], 50) * 1000)
                    row[f"{cls}_ttft_p99_ms"] = round(pct(ttfts[cls], 99) * 1000)
                    totals[mode][cls] += ttfts[cls]
                errors_total[mode] += len(errors)
                phases.append(row)
                print(json.dumps(row), flush=True)
    summary: dict[str, Any] = {}
    for mode in ("on", "off"):
        summary[mode] = {"errors": errors_total[mode]}
        for cls in ("high", "low"):
            values = totals[mode][cls]
            summary[mode][cls] = {
                "done": len(values),
                "per_s": round(len(values) / (args.phase * args.rounds), 2),
                "ttft_p50_ms": round(pct(values, 50) * 1000),
                "ttft_p99_ms": round(pct(values, 99) * 1000),
            }
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "api_keys": API_KEYS,
        "load_average_end": loadavg(),
        "phases": phases,
        "summary": summary,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| mapping | class | requests | TTFT p50 ms | TTFT p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode in ("on", "off"):
        for cls in ("high", "low"):
            s = summary[mode][cls]
            lines.append(
                f"| {mode} | {cls} | {s['done']} | {s['ttft_p50_ms']:,} | {s['ttft_p99_ms']:,} "
                f"| {summary[mode]['errors'] if cls == 'high' else ''} |"
            )
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
