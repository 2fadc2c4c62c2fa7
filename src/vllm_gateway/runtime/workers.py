"""Several gateway worker processes on one listening socket (``--workers N``), one admission.

The supervisor binds the socket once and starts N workers that all accept on it; the kernel spreads
connections among them. The admission is not split among the workers: the supervisor holds the one
``Admission`` (``coordinator.py``) and every worker holds permits it granted over a Unix socket
pair (a small lease of them idle while nobody is queued: ``proxy/shared_admission.py``), so
``VLLM_MAX_CONCURRENT_REQUESTS`` in flight and one FIFO queue hold across all of them, with the
order and the 503s of a single process. A scrape of any worker's ``/metrics`` answers for all of
them (the others' snapshots come through the supervisor).

Signals: the supervisor installs its handlers before it binds or spawns. The first SIGTERM/SIGINT
closes the admission (queued requests get 503 ``shutting_down``) and is forwarded to every worker
(each drains on its own); the supervisor waits for them up to the drain deadline plus a margin,
then kills what is left. A second signal kills them at once. A SIGHUP is forwarded to every
worker: each re-reads the backends file for its own pool. A worker that dies while the gateway
is serving is restarted; the permits it held, leased ones too, are released when its socket closes.

Each worker keeps its own pool, and every worker's pool takes every change made through the admin
API: the worker that is asked sends it through the supervisor to all of them (``coordinator.py``),
and a restarted worker starts with the changes made so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
from multiprocessing.context import SpawnProcess
from typing import Any

from vllm_gateway.proxy.admission import Admission
from vllm_gateway.runtime.coordinator import AdmissionCoordinator
from vllm_gateway.settings import Settings

__all__ = ["serve_workers"]

log = logging.getLogger("vllm_gateway")

# Beyond the drain deadline, how long the supervisor waits for workers to exit before killing them.
_EXIT_MARGIN = 5.0


async def _exited(proc: SpawnProcess) -> None:
    """Wait for ``proc`` to end: its sentinel becomes readable then."""
    if not proc.is_alive():
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    sentinel = proc.sentinel

    def on_ready() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(sentinel, on_ready)
    try:
        await ended
    finally:
        loop.remove_reader(sentinel)


def _detach_from_terminal_group() -> None:
    """A worker leaves the terminal's process group, so a Ctrl-C reaches only the supervisor,
    which forwards one SIGTERM (two signals would mean 'stop now'); and it dies with it."""
    os.setpgrp()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the supervisor's finally still stops the workers


def _exit_before_serving(signum: int, _frame: object) -> None:
    # Stopped while still starting: nothing was accepted, so nothing is lost.
    raise SystemExit(0)


def _worker_main(
    settings: Settings, sock: socket.socket, control: socket.socket, started: Any
) -> None:
    # Until the server installs its drain-first handlers, a SIGTERM (the supervisor stopping
    # soon after start) ends a worker that has accepted nothing with status 0, not -SIGTERM.
    signal.signal(signal.SIGTERM, _exit_before_serving)
    # A SIGHUP (the supervisor forwarding one) before the server takes it must not end the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    started.set()
    _detach_from_terminal_group()
    from vllm_gateway.compose import create_app
    from vllm_gateway.observability.logs import configure_logging
    from vllm_gateway.runtime.server import run

    configure_logging(settings)
    raise SystemExit(run(create_app(settings, supervisor=control), sock))


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


class _Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[SpawnProcess | None] = [None] * settings.workers
        self.started: dict[SpawnProcess, Any] = {}  # the Event each worker sets once it runs
        self.stopping: asyncio.Event | None = None
        self.signals = 0
        self.coordinator = AdmissionCoordinator(
            Admission(
                settings.max_concurrent_requests,
                settings.max_queued_requests,
                settings.queue_wait_timeout,
                shed=settings.shed_low_priority,
            ),
            member_cap=settings.pool.max_members,
        )

    def on_signal(self) -> None:
        self.signals += 1
        assert self.stopping is not None
        if self.signals > 1:  # a second signal: stop waiting
            for proc in self.procs:
                if proc is not None and proc.is_alive():
                    proc.kill()
            return
        self.stopping.set()
        self.coordinator.close()
        for proc in self.procs:
            if proc is not None and proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    async def start(self, index: int, sock: socket.socket) -> None:
        ours, theirs = socket.socketpair()
        event = self.ctx.Event()
        proc = self.ctx.Process(
            target=_worker_main,
            args=(self.settings.replace(workers=1), sock, theirs, event),
            name=f"vllm-gateway-worker-{index}",
        )
        proc.start()
        theirs.close()
        self.procs[index] = proc
        self.started[proc] = event
        await self.coordinator.attach(ours, f"worker-{index}")
        log.info("worker %d started (pid %s)", index, proc.pid)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        # The handlers go in before the socket is bound and the workers are spawned: a SIGTERM
        # in that window must stop the gateway cleanly, not kill the supervisor.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal)
        loop.add_signal_handler(signal.SIGHUP, self.on_hangup)
        sock = _bind(self.settings)
        try:
            for i in range(self.settings.workers):
                if self.stopping.is_set():
                    break
                await self.start(i, sock)
            if self.stopping.is_set():  # a signal came while they were being spawned
                for proc in self.procs:
                    if proc is not None and proc.pid is not None and proc.is_alive():
                        os.kill(proc.pid, signal.SIGTERM)
            while not self.stopping.is_set():
                watched: dict[asyncio.Future[None], int] = {
                    asyncio.ensure_future(_exited(proc)): i
                    for i, proc in enumerate(self.procs)
                    if proc is not None
                }
                stop: asyncio.Future[Any] = asyncio.ensure_future(self.stopping.wait())
                done, pending = await asyncio.wait(
                    [stop, *watched], return_when=asyncio.FIRST_COMPLETED
                )
                for fut in pending:
                    fut.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                if self.stopping.is_set():
                    break
                for fut in done:
                    if fut is stop:
                        continue
                    i = watched[fut]
                    proc = self.procs[i]
                    assert proc is not None
                    log.error(
                        "worker %d (pid %s) exited with %s; restarting it",
                        i,
                        proc.pid,
                        proc.exitcode,
                    )
                    await self.start(i, sock)
            return await self._wait_for_exit()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.coordinator.aclose()
            sock.close()

    def on_hangup(self) -> None:
        """SIGHUP: each worker re-reads the backends file (each keeps its own pool)."""
        for proc in self.procs:
            if proc is not None and proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGHUP)

    async def _wait_for_exit(self) -> int:
        procs = [p for p in self.procs if p is not None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_timeout + _EXIT_MARGIN):
                await asyncio.gather(*(_exited(p) for p in procs))
        codes = []
        for proc in procs:
            if proc.is_alive():
                log.error("worker pid %s did not exit by the drain deadline; killing it", proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.join, 2)
            code = proc.exitcode
            if code == -signal.SIGTERM and not self.started[proc].is_set():
                code = 0  # stopped while the interpreter was still starting: it held nothing
            codes.append(code)
        return 0 if all(code == 0 for code in codes) else 1


def serve_workers(settings: Settings) -> int:
    return asyncio.run(_Supervisor(settings).run())
