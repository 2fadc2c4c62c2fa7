"""Several gateway worker processes on one listening socket (``--workers N``).

The parent binds the socket once and starts N workers that all accept on it; the kernel spreads
connections among them. Each worker is a whole gateway with its own admission: the configured
limit and queue are split among the workers (``split_limit``), so the total in flight never
exceeds ``VLLM_MAX_CONCURRENT_REQUESTS``. The split is static: a connection lands on one worker,
so one worker can be full while another has room; keep N small next to the limit (see
docs/performance.md for the measured trade-off).

Signals: the parent forwards SIGTERM/SIGINT to every worker (each drains on its own) and waits for
them up to the drain deadline plus a margin, then kills what is left. A worker that dies while
the gateway is serving is restarted.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.context import SpawnProcess
from typing import Any

from vllm_gateway.settings import Settings

__all__ = ["serve_workers", "split_limit"]

log = logging.getLogger("vllm_gateway")

# Beyond the drain deadline, how long the parent waits for workers to exit before killing them.
_EXIT_MARGIN = 5.0


def split_limit(total: int, workers: int, index: int, minimum: int = 0) -> int:
    """Worker ``index``'s share of ``total``: shares differ by at most one and add up to total."""
    share = total // workers + (1 if index < total % workers else 0)
    return max(minimum, share)


def worker_settings(settings: Settings, index: int) -> Settings:
    return settings.replace(
        workers=1,
        max_concurrent_requests=split_limit(
            settings.max_concurrent_requests, settings.workers, index, minimum=1
        ),
        max_queued_requests=split_limit(settings.max_queued_requests, settings.workers, index),
    )


def _detach_from_terminal_group() -> None:
    """A worker leaves the terminal's process group, so a Ctrl-C reaches only the parent, which
    forwards one SIGTERM (two signals would mean 'stop now'); and it dies with the parent."""
    os.setpgrp()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent's finally still stops the workers


def _exit_before_serving(signum: int, _frame: object) -> None:
    # Stopped while still starting: nothing was accepted, so nothing is lost.
    raise SystemExit(0)


def _worker_main(settings: Settings, sock: socket.socket, started: Any) -> None:
    # Until the server installs its drain-first handlers, a SIGTERM (the supervisor stopping
    # soon after start) ends a worker that has accepted nothing with status 0, not -SIGTERM.
    signal.signal(signal.SIGTERM, _exit_before_serving)
    started.set()
    _detach_from_terminal_group()
    from vllm_gateway.compose import create_app
    from vllm_gateway.observability.logs import configure_logging
    from vllm_gateway.runtime.server import run

    configure_logging(settings)
    raise SystemExit(run(create_app(settings), sock))


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def serve_workers(settings: Settings) -> int:
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    procs: list[SpawnProcess] = []

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set():  # a second signal: stop waiting
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            return
        stopping.set()
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    # The handlers go in before the socket is bound and the workers are spawned: a SIGTERM in
    # that window must stop the gateway cleanly, not kill the supervisor.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sock = _bind(settings)
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise

    started: dict[SpawnProcess, Any] = {}  # the Event each worker sets once its handler is in

    def start(index: int) -> SpawnProcess:
        event = ctx.Event()
        proc = ctx.Process(
            target=_worker_main,
            args=(worker_settings(settings, index), sock, event),
            name=f"vllm-gateway-worker-{index}",
        )
        proc.start()
        started[proc] = event
        log.info(
            "worker %d started (pid %s, limit %d)",
            index,
            proc.pid,
            split_limit(settings.max_concurrent_requests, settings.workers, index, minimum=1),
        )
        return proc

    try:
        for i in range(settings.workers):
            if stopping.is_set():
                break
            procs.append(start(i))
        if stopping.is_set():  # a signal came while they were being spawned
            for proc in procs:
                if proc.pid is not None and proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)
        while not stopping.is_set():
            for i, proc in enumerate(procs):
                if not proc.is_alive() and not stopping.is_set():
                    log.error(
                        "worker %d (pid %s) exited with %s; restarting it",
                        i,
                        proc.pid,
                        proc.exitcode,
                    )
                    procs[i] = start(i)
            stopping.wait(0.5)
        deadline = time.monotonic() + settings.shutdown_timeout + _EXIT_MARGIN
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        codes = []
        for proc in procs:
            if proc.is_alive():
                log.error("worker pid %s did not exit by the drain deadline; killing it", proc.pid)
                proc.kill()
                proc.join(2)
            code = proc.exitcode
            if code == -signal.SIGTERM and not started[proc].is_set():
                code = 0  # stopped while the interpreter was still starting: it held nothing
            codes.append(code)
        return 0 if all(code == 0 for code in codes) else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
