"""Shared fixtures: the real gateway (its own HTTP server) on loopback, in front of real servers.

``run_gateway`` runs the gateway in this process's event loop (port 0); ``spawn_gateway`` runs
it as a separate process, for signal and crash tests. ``simulator`` is the project's vLLM
simulator on loopback, fresh for each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from vllm_gateway.backends.base import Backend
from vllm_gateway.compose import App, create_app
from vllm_gateway.proxy.gateway import Gateway
from vllm_gateway.proxy.sse import EventScanner, split_events
from vllm_gateway.runtime.server import GatewayRunner
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytest_plugins = ["tests._skip_policy", "tests._progress", "tests._exit_output"]
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class RunningGateway:
    url: str
    port: int
    app: App
    runner: GatewayRunner

    @property
    def gateway(self) -> Gateway:
        return self.app.gateway


@contextlib.asynccontextmanager
async def run_gateway(
    settings: Settings | None = None, backend: Backend | None = None, **changes: Any
) -> AsyncIterator[RunningGateway]:
    """The real gateway on 127.0.0.1, port 0, in this event loop, for the ``async with`` block."""
    settings = (settings or Settings()).replace(host="127.0.0.1", port=0, **changes)
    app = create_app(settings, backend)
    runner = GatewayRunner(app, handle_signals=False)
    task = asyncio.get_running_loop().create_task(runner.serve())
    try:
        async with asyncio.timeout(10):
            while not runner.started:
                if task.done():
                    task.result()
                    raise RuntimeError("gateway stopped during startup")
                await asyncio.sleep(0.01)
        port = runner.port
        yield RunningGateway(f"http://127.0.0.1:{port}", port, app, runner)
    finally:
        runner.request_exit()
        # A failed start re-raises its own error here; a shutdown that fails or hangs fails the test.
        async with asyncio.timeout(10):
            await task


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    async with run_simulator(SimulatorConfig(ttft=0.01, itl=0.005, tokens=8)) as sim:
        yield sim


@pytest.fixture
async def gateway(simulator: Simulator) -> AsyncIterator[RunningGateway]:
    settings = Settings(
        backend_urls=(simulator.url,),
        max_concurrent_requests=4,
        max_queued_requests=8,
        queue_wait_timeout=1.0,
    )
    async with run_gateway(settings) as gw:
        yield gw


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as http:
        yield http


def chat_body(
    stream: bool = False, max_tokens: int = 8, model: str = "sim-model", **extra: Any
) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
        "max_tokens": max_tokens,
        **extra,
    }


def sse_blocks(body: bytes) -> list[bytes]:
    """The events of an SSE body without their blank line, cut by the gateway's own splitter
    (``proxy/sse.py``); an event the body does not finish (a cut stream) comes last."""
    scanner = EventScanner(max_event_bytes=len(body) + 1)
    events = split_events(scanner.feed(body))
    if scanner.pending:
        events.append(scanner.pending)
    return events


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    return [
        event[len(b"data: ") :].decode()
        for event in sse_blocks(text.encode())
        if event.startswith(b"data: ")
    ]


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail the test if it is not within ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling state owned by another server
            await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)


@contextlib.contextmanager
def spawn_gateway(
    env: dict[str, str], *args: str, name: str = "gateway"
) -> Iterator[GatewayProcess]:
    """``vllm-gateway serve`` as a child process on a free port; waits until it listens."""
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log_path = ARTIFACTS / f"{name}-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    full_env.update(env)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm_gateway",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *args,
            ],
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    running = GatewayProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{running.log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not listen within 20 s:\n{running.log()}")
            time.sleep(0.05)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
