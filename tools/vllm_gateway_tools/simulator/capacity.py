"""Measure the simulator's capacity: SSE chunks per second per core, with many concurrent streams.

Run: ``python -m vllm_gateway_tools.simulator.capacity --streams 1000 --tokens 200 --itl 0.05``.

It starts the simulator as a child process (pinned to one core with ``os.sched_setaffinity`` when
the machine has two or more), opens ``--streams`` keep-alive connections from a raw asyncio client
in this process (pinned to another core), and has each one request streams back to back for
``--seconds``. It reports chunks received per wall second and the simulator's chunks per CPU
second (its user + system time from ``/proc``), which is the figure that matters when the
simulator shares a core with a load generator. A measuring tool, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

__all__ = ["main"]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Client(asyncio.Protocol):
    """One connection that asks for a stream, counts its events, and asks again when it ends."""

    def __init__(self, request: bytes, counts: dict[str, int], deadline: float) -> None:
        self.request = request
        self.counts = counts
        self.deadline = deadline
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.counts["chunks"] += data.count(b"data: ")
        self.counts["bytes"] += len(data)
        if data.endswith(b"0\r\n\r\n"):  # the end of one chunked response
            self.counts["streams"] += 1
            assert self.transport is not None
            if time.monotonic() < self.deadline:
                self.transport.write(self.request)
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _load(port: int, streams: int, tokens: int, seconds: float) -> dict[str, int]:
    body = (
        b'{"model":"sim-model","messages":[{"role":"user","content":"hello"}],'
        b'"stream":true,"max_tokens":%d}' % tokens
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
    )
    counts = {"chunks": 0, "bytes": 0, "streams": 0}
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + seconds
    clients = []
    for _ in range(streams):
        _, proto = await loop.create_connection(
            lambda: _Client(request, counts, deadline), "127.0.0.1", port
        )
        clients.append(proto)
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), seconds + 60)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_gateway_tools.simulator.capacity")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--itl", type=float, default=0.05)
    p.add_argument("--ttft", type=float, default=0.05)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = p.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    cmd = [sys.executable, "-m", "vllm_gateway_tools.simulator", "--port", "0", "--loop", args.loop,
           "--ttft", str(args.ttft), "--itl", str(args.itl)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        if len(cpus) >= 2:
            os.sched_setaffinity(proc.pid, {cpus[0]})
            os.sched_setaffinity(0, {cpus[1]})
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        try:
            import uvloop

            counts = uvloop.run(_load(port, args.streams, args.tokens, args.seconds))
        except ImportError:
            counts = asyncio.run(_load(port, args.streams, args.tokens, args.seconds))
        wall, cpu = time.monotonic() - t0, _cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(10)
    chunks = counts["chunks"]
    print(
        f"streams={args.streams} tokens={args.tokens} itl={args.itl}s: {chunks} chunks "
        f"({counts['bytes'] / max(chunks, 1):.0f} B each with framing), {counts['streams']} "
        f"streams completed in {wall:.1f}s; {chunks / wall:,.0f} chunks/s wall; simulator CPU "
        f"{cpu:.2f}s = {cpu / wall:.0%} of one core; {chunks / max(cpu, 1e-9):,.0f} chunks per "
        "simulator CPU-second"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
