"""The launcher's voice: its own lines go to stderr with an ``[up]`` prefix; vLLM's output goes to
its log file, never to the terminal. An exit by signal is spelled out (``-9 (SIGKILL)``)."""

from __future__ import annotations

import contextlib
import signal
import sys

__all__ = ["describe_exit", "log"]


def log(message: str) -> None:
    print(f"[up] {message}", file=sys.stderr, flush=True)


def describe_exit(code: int) -> str:
    """``-9`` reads better as ``-9 (SIGKILL)``: Popen reports death by signal as minus its number."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)
