"""The standard rig: simulator and load generator on one core, the gateway alone on another.

``Rig`` is an async context manager. On entry it starts the simulator
(``python -m vllm_gateway_tools.simulator --port 0 ...``, ready when it prints
``simulator listening on http://HOST:PORT``), then the gateway (``python -m vllm_gateway.cli
serve ...`` or any ``gateway_cmd`` template, ready when ``GET /health/ready`` answers 200), each
pinned with ``taskset`` when the machine has two cores or more, and pins the current process (the
load generator) to the simulator's core. On exit it stops both (SIGTERM, then SIGKILL after a
deadline) whatever happened, and restores this process's affinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from vllm_gateway_tools.simulator import loopback_command

__all__ = ["Rig", "RigConfig", "RigError", "discard_output", "pin_command", "probe_ready"]

LISTENING = re.compile(rb"listening on (http://\S+)")


class RigError(RuntimeError):
    """The rig could not be started; the message says which process and why."""


@dataclass(frozen=True, slots=True)
class RigConfig:
    ttft: float = 0.0
    itl: float = 0.02
    tokens: int = 64
    max_concurrent_requests: int = 10_000
    max_queued_requests: int = 10_000
    gateway: bool = True
    # A shell-style template; {backend}, {host} and {port} are filled in.
    gateway_cmd: str | None = None
    ready_path: str = "/health/ready"  # answers 200 once the gateway is ready
    gateway_args: tuple[str, ...] = ()
    gateway_core: int = 0
    rig_core: int = 1
    start_timeout: float = 60.0
    gateway_log: str | None = None  # write the gateway's output (its access log) here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_command(cmd: list[str], core: int) -> list[str]:
    """``cmd`` run on ``core`` through ``taskset``, when the machine has two cores or more."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core), *cmd]
    return cmd


async def probe_ready(port: int, path: str = "/health/ready") -> bool:
    """Whether ``GET path`` on 127.0.0.1:``port`` answers 200 now."""
    probe = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
        try:
            writer.write(probe.encode())
            status = await asyncio.wait_for(reader.readline(), 2)
        finally:
            writer.close()
        return status.split(b" ")[1:2] == [b"200"]
    return False


class Rig:
    def __init__(self, config: RigConfig) -> None:
        self.config = config
        self.backend_url = ""
        self.gateway_url: str | None = None
        self.backend_proc: asyncio.subprocess.Process | None = None
        self.gateway_proc: asyncio.subprocess.Process | None = None
        self._affinity: set[int] | None = None
        self._drain: list[asyncio.Task[None]] = []

    @property
    def pids(self) -> dict[str, int]:
        out = {}
        if self.backend_proc is not None:
            out["backend"] = self.backend_proc.pid
        if self.gateway_proc is not None:
            out["gateway"] = self.gateway_proc.pid
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "backend_url": self.backend_url,
            "gateway_url": self.gateway_url,
            "pids": self.pids,
            "pinned": (os.cpu_count() or 1) >= 2 and bool(shutil.which("taskset")),
            "gateway_core": self.config.gateway_core,
            "rig_core": self.config.rig_core,
            "ttft": self.config.ttft,
            "itl": self.config.itl,
            "max_concurrent_requests": self.config.max_concurrent_requests,
            "max_queued_requests": self.config.max_queued_requests,
            "gateway_cmd": self.config.gateway_cmd,
        }

    async def __aenter__(self) -> Rig:
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
        sim = loopback_command(
            0, "--ttft", str(c.ttft), "--itl", str(c.itl), "--tokens", str(c.tokens)
        )
        self.backend_proc = await asyncio.create_subprocess_exec(
            *pin_command(sim, c.rig_core),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.backend_url = await self._await_banner(self.backend_proc, "simulator")
        if (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
            self._affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {c.rig_core})
        if not c.gateway:
            return
        port = free_port()
        if c.gateway_cmd:
            cmd = shlex.split(
                c.gateway_cmd.format(backend=self.backend_url, host="127.0.0.1", port=port)
            )
        else:
            cmd = [
                sys.executable,
                "-m",
                "vllm_gateway.cli",
                "serve",
                "--backend-url",
                self.backend_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-concurrent-requests",
                str(c.max_concurrent_requests),
                "--max-queued-requests",
                str(c.max_queued_requests),
                *c.gateway_args,
            ]
        self.gateway_proc = await asyncio.create_subprocess_exec(
            *pin_command(cmd, c.gateway_core),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._drain.append(asyncio.create_task(discard_output(self.gateway_proc, c.gateway_log)))
        self.gateway_url = f"http://127.0.0.1:{port}"
        await self._await_ready(self.gateway_proc, port)

    async def _await_banner(self, proc: asyncio.subprocess.Process, what: str) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + self.config.start_timeout
        seen: list[bytes] = []
        while time.monotonic() < deadline:
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())
            except TimeoutError:
                break
            if not line:
                break
            seen.append(line)
            if m := LISTENING.search(line):
                # Keep reading its output so that a full pipe never blocks it.
                self._drain.append(asyncio.create_task(discard_output(proc)))
                return m.group(1).decode().rstrip("/")
        tail = b"".join(seen[-10:]).decode(errors="replace")
        raise RigError(f"{what} did not start (exit {proc.returncode}):\n{tail}")

    async def _await_ready(self, proc: asyncio.subprocess.Process, port: int) -> None:
        deadline = time.monotonic() + self.config.start_timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RigError(f"gateway exited with {proc.returncode} before it was ready")
            if await probe_ready(port, self.config.ready_path):
                return
            await asyncio.sleep(0.1)
        raise RigError("gateway did not answer /health/ready with 200 in time")

    async def stop(self) -> None:
        for proc in (self.gateway_proc, self.backend_proc):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in (self.gateway_proc, self.backend_proc):
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._drain:
            task.cancel()
        for task in self._drain:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._drain.clear()
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity)
            self._affinity = None


async def discard_output(proc: asyncio.subprocess.Process, keep: str | None = None) -> None:
    """Read ``proc``'s output, so that a full pipe never blocks it: dropped, or appended to the
    file ``keep``."""
    assert proc.stdout is not None
    if keep is None:
        while await proc.stdout.read(65536):
            pass
        return
    with await asyncio.to_thread(open, keep, "ab") as f:
        while data := await proc.stdout.read(65536):
            f.write(data)  # a local file, a few lines at a time
