"""The ``cache`` scenario's rig: M members and one gateway per routing policy in front of them all.

``CacheRig`` is an async context manager. On entry it starts ``members`` simulators with the prefix
cache model and KV events on (``--dev-mode``, so ``POST /reset_prefix_cache`` exists), or takes
``member_urls`` (real vLLM servers, started by someone else), then one gateway per policy
(``python -m vllm_gateway.cli serve --backend-url M1,M2,...`` with ``VLLM_POOL_ROUTING=<policy>``),
all started at once. A gateway that exits before it is ready (an unknown policy: the gateway
refuses ``VLLM_POOL_ROUTING`` values it does not know) or is not ready in time is recorded in
``unavailable`` with the reason, and the run goes on without it.

Pinning, when the machine has two cores or more: the gateways on ``gateway_core``, the members on
the other cores in turn, the load generator (this process) on ``rig_core``. On exit every process
it started is stopped (SIGTERM, then SIGKILL after 10 s) and this process's affinity restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vllm_gateway_tools.bench.rig import (
    LISTENING,
    RigError,
    discard_output,
    free_port,
    pin_command,
    probe_ready,
)
from vllm_gateway_tools.simulator import loopback_command

__all__ = ["POLICIES", "CacheRig", "CacheRigConfig"]

POLICIES = ("round_robin", "least_outstanding", "prefix", "cache_aware")


@dataclass(frozen=True, slots=True)
class CacheRigConfig:
    members: int = 2
    member_urls: tuple[str, ...] = ()  # external members: start no simulator
    policies: tuple[str, ...] = POLICIES
    ttft: float = 0.005
    itl: float = 0.005
    cache_blocks: int = 4096
    block_size: int = 16
    prefill_per_token: float = 0.00005
    gateway_env: tuple[tuple[str, str], ...] = ()  # more VLLM_* settings for every gateway
    gateway_core: int = 0
    rig_core: int = 1
    start_timeout: float = 60.0


@dataclass(slots=True)
class _Process:
    proc: asyncio.subprocess.Process
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    drain: asyncio.Task[None] | None = None


def _cores(config: CacheRigConfig) -> list[int]:
    """The cores members run on: every core but the gateways' (all of them on one core)."""
    count = os.cpu_count() or 1
    if count < 2:
        return [0]
    return [c for c in range(count) if c != config.gateway_core] or [config.rig_core]


class CacheRig:
    def __init__(self, config: CacheRigConfig) -> None:
        self.config = config
        self.member_urls: list[str] = list(config.member_urls)
        self.gateways: dict[str, str] = {}  # policy -> URL, ready ones only
        self.gateway_pids: dict[str, int] = {}
        self.unavailable: dict[str, str] = {}  # policy -> why
        self._members: list[_Process] = []
        self._gateways: dict[str, _Process] = {}
        self._affinity: set[int] | None = None

    @property
    def external(self) -> bool:
        return bool(self.config.member_urls)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "members": self.member_urls,
            "external_members": self.external,
            "gateways": dict(self.gateways),
            "unavailable": dict(self.unavailable),
            "pids": {
                "members": [m.proc.pid for m in self._members],
                "gateways": dict(self.gateway_pids),
            },
            "pinned": (os.cpu_count() or 1) >= 2,
            "gateway_core": c.gateway_core,
            "rig_core": c.rig_core,
            "member_cores": _cores(c),
            "ttft": None if self.external else c.ttft,
            "itl": None if self.external else c.itl,
            "cache_blocks": None if self.external else c.cache_blocks,
            "block_size": None if self.external else c.block_size,
            "prefill_per_token": None if self.external else c.prefill_per_token,
            "gateway_env": dict(c.gateway_env),
        }

    async def __aenter__(self) -> CacheRig:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _start(self) -> None:
        c = self.config
        if not self.external:
            cores = _cores(c)
            starts = [self._start_member(cores[i % len(cores)]) for i in range(c.members)]
            self.member_urls = list(await asyncio.gather(*starts))
        if (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
            self._affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {c.rig_core})
        await asyncio.gather(*(self._start_gateway(p) for p in c.policies))

    async def _start_member(self, core: int) -> str:
        c = self.config
        cmd = loopback_command(
            0,
            "--ttft", str(c.ttft), "--itl", str(c.itl), "--dev-mode",
            "--prefix-cache-blocks", str(c.cache_blocks), "--block-size", str(c.block_size),
            "--prefill-per-token", str(c.prefill_per_token), "--kv-events-port", "0",
        )  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *pin_command(cmd, core),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        member = _Process(proc)
        self._members.append(member)
        assert proc.stdout is not None
        deadline = time.monotonic() + c.start_timeout
        while time.monotonic() < deadline:
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
            except TimeoutError:
                break
            if not line:
                break
            member.tail.append(line.decode(errors="replace").rstrip())
            if m := LISTENING.search(line):
                member.drain = asyncio.create_task(discard_output(proc))
                return m.group(1).decode().rstrip("/")
        tail = "\n".join(member.tail)
        raise RigError(f"member simulator did not start (exit {proc.returncode}):\n{tail}")

    async def _start_gateway(self, policy: str) -> None:
        c = self.config
        port = free_port()
        cmd = [
            sys.executable, "-m", "vllm_gateway.cli", "serve",
            "--backend-url", ",".join(self.member_urls),
            "--host", "127.0.0.1", "--port", str(port),
            "--max-concurrent-requests", "10000", "--max-queued-requests", "10000",
        ]  # fmt: skip
        env = {**os.environ, **dict(c.gateway_env), "VLLM_POOL_ROUTING": policy}
        proc = await asyncio.create_subprocess_exec(
            *pin_command(cmd, c.gateway_core),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        gateway = _Process(proc)
        gateway.drain = asyncio.create_task(_keep_tail(proc, gateway.tail))
        self._gateways[policy] = gateway
        deadline = time.monotonic() + c.start_timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                break
            if await probe_ready(port):
                self.gateways[policy] = f"http://127.0.0.1:{port}"
                self.gateway_pids[policy] = proc.pid
                return
            await asyncio.sleep(0.1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(gateway.drain), 1)  # its last words
        if proc.returncode is None:
            why = f"not ready within {c.start_timeout:g} s"
            await _stop(proc)
        else:
            why = f"exited with {proc.returncode} at start"
        said = " | ".join(line for line in gateway.tail if line.strip())
        self.unavailable[policy] = f"{why}: {said}" if said else why

    async def stop(self) -> None:
        procs = [g.proc for g in self._gateways.values()] + [m.proc for m in self._members]
        await asyncio.gather(*(_stop(p) for p in procs))
        for p in [*self._gateways.values(), *self._members]:
            if p.drain is not None:
                p.drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await p.drain
                p.drain = None
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity)
            self._affinity = None


async def _keep_tail(proc: asyncio.subprocess.Process, tail: deque[str]) -> None:
    """Read ``proc``'s output to the end, keeping its last lines (the reason it stopped)."""
    assert proc.stdout is not None
    pending = b""
    while chunk := await proc.stdout.read(65536):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()[-4096:]
        for line in lines[-(tail.maxlen or 1) :]:
            tail.append(line[-4096:].decode(errors="replace").rstrip())
    if pending:
        tail.append(pending.decode(errors="replace").rstrip())


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
