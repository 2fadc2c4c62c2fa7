"""vLLM's process group: start it, signal it, stop it, wait until every process of it has gone.

vLLM's OpenAI server leads its own process group, with its engine processes under it. A stop on
request goes to the server alone once it serves: it shuts its engine down in order (a SIGTERM to
the whole group kills the engine under the server, which then logs an ``EngineDeadError``
traceback). The group gets SIGTERM if the server does not end, or at once while vLLM is still
starting; SIGKILL after a deadline.

Invariants:
- No orphan vLLM. The child runs in its own process group (so a Ctrl-C in the terminal reaches
  only the launcher, which stops things in order), gets SIGTERM from the kernel if the launcher
  dies however it dies (``PR_SET_PDEATHSIG``), and ``stop`` returns only once every process of the
  group has exited (zombies aside) or been sent SIGKILL.
- Every wait here has a bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vllm_gateway.runtime.up.console import log

__all__ = ["ChildDied", "VllmChild", "dies_with_parent", "signal_group"]

PR_SET_PDEATHSIG = 1
# How long a serving vLLM's server process gets to stop its engine itself, before its group gets
# SIGTERM too; and after the server has exited, how long its engine processes get to follow it.
SERVER_ALONE_S = 10.0
STRAGGLER_GRACE_S = 5.0
# A vLLM still starting holds no requests, and its server may not act on SIGTERM until its engine
# is up: past this, its group gets SIGKILL (or past the stop timeout, if that is shorter).
STARTING_STOP_S = 10.0


class ChildDied(RuntimeError):
    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"vLLM exited with code {code}")


def dies_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the kernel sends the child ``sig`` when the launcher dies, however it dies.

    (The signal is sent when the thread that started the child ends: start children from the
    main thread, before any other thread runs, as a preexec_fn must be anyway.)"""

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return preexec


@dataclass
class VllmChild:
    """A running vLLM server: its process (leader of its own group), URL and log file."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    model: str
    serving: bool = False  # its /health has answered: it stops in order on SIGTERM

    @classmethod
    def start(
        cls, command: Sequence[str], env: Mapping[str, str], log_path: Path, model: str, port: int
    ) -> VllmChild:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle: IO[bytes] = log_path.open("ab")
        try:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
                preexec_fn=dies_with_parent(),
            )
        finally:
            handle.close()  # the child holds its own descriptor
        return cls(process, f"http://127.0.0.1:{port}", log_path, model)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float) -> int | None:
        """Stop vLLM; return the server process's exit code.

        A serving vLLM gets SIGTERM at its server process alone, which shuts its engine processes
        down in order; a SIGTERM to the whole group would kill the engine under the server, which
        then logs an ``EngineDeadError`` traceback. The group gets SIGTERM when the server has not
        exited after ``SERVER_ALONE_S``, or at once while vLLM is still starting (its server does
        not act on SIGTERM while it waits for its engine), and SIGKILL past ``timeout`` (past
        ``STARTING_STOP_S`` while starting: there is nothing to finish). Engine
        processes still there ``STRAGGLER_GRACE_S`` after the server has exited get SIGTERM, then
        SIGKILL.
        """
        if self.process.poll() is None:
            began = time.monotonic()
            if not self.serving:
                timeout = min(timeout, STARTING_STOP_S)
            if self.serving:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(min(SERVER_ALONE_S, timeout))
            if self.process.poll() is None:
                signal_group(self.pid, signal.SIGTERM)
                try:
                    self.process.wait(max(0.0, timeout - (time.monotonic() - began)))
                except subprocess.TimeoutExpired:
                    log(f"vLLM (pid {self.pid}) did not stop within {timeout:g} s: killing it")
                    signal_group(self.pid, signal.SIGKILL)
                    self.process.wait()
        if not _wait_group_gone(self.pid, STRAGGLER_GRACE_S):
            signal_group(self.pid, signal.SIGTERM)
            if not _wait_group_gone(self.pid, STRAGGLER_GRACE_S):
                signal_group(self.pid, signal.SIGKILL)
        return self.process.returncode


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an engine process
    orphaned by its server waits for PID 1 to reap it, which may take a while."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, deadline_s: float) -> bool:
    """Whether every process of the group has exited within ``deadline_s`` (polled)."""
    end = time.monotonic() + deadline_s
    while _group_alive(pgid):
        if time.monotonic() >= end:
            return False
        time.sleep(0.1)
    return True
