"""Waiting while something slow happens, and showing that it does: the wait for vLLM's
``/health`` (minutes on a CPU: torch.compile), and a progress line for any other blocking step.

On a terminal the progress line is rewritten in place each second; elsewhere (a log, a CI
transcript) a new line is written every ``PROGRESS_EVERY_S``. While vLLM warms up, the line shows
the seconds so far and the last line of vLLM's log, and the log's expected-but-alarming lines are
explained once each, as ``[up] note:`` lines.

Invariants:
- Every wait has a bound: ``wait_healthy`` ends when vLLM answers, when its process exits
  (``ChildDied``) or past its deadline (``TimeoutError``); a probe of ``/health`` takes at most 2 s.
- The progress thread of ``ticking`` is joined before ``ticking`` returns, whatever the step did.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO

from vllm_gateway.runtime.up.vllm_log import LogExplainer, last_line
from vllm_gateway.runtime.up.vllm_process import ChildDied, VllmChild

__all__ = ["http_ok", "ticking", "wait_healthy"]

# Off a terminal (a log, a CI transcript), one progress line this often.
PROGRESS_EVERY_S = 10.0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(child: VllmChild, deadline_s: float, progress: IO[str]) -> float:
    """Block until vLLM's ``/health`` answers 200; return the seconds it took.

    Raises ``ChildDied`` if the process exits first and ``TimeoutError`` past the deadline. Once
    healthy, ``child.serving`` is set: from then on vLLM stops in order on SIGTERM.
    """
    started = time.monotonic()
    tty = progress.isatty()
    last_report = -1e9
    explainer = LogExplainer(child.log_path)

    def end_line() -> None:
        if tty:
            progress.write("\n")

    while True:
        elapsed = time.monotonic() - started
        code = child.process.poll()
        if code is not None:
            end_line()
            raise ChildDied(code)
        if http_ok(f"{child.url}/health"):
            end_line()
            child.serving = True
            return elapsed
        if elapsed > deadline_s:
            end_line()
            raise TimeoutError(f"vLLM did not become healthy within {deadline_s:.0f} s")
        for note in explainer.new_notes():
            progress.write(("\r\x1b[K" if tty else "") + f"[up] note: {note}\n")
        # One rewritten line on a terminal; a line every 10 s in a log or a CI transcript.
        if tty or elapsed - last_report >= PROGRESS_EVERY_S:
            last_report = elapsed
            width = shutil.get_terminal_size((120, 20)).columns
            text = f"[up] vLLM warming up {elapsed:5.0f}s | {last_line(child.log_path)}"
            if tty:
                progress.write("\r\x1b[K" + text[: width - 1])
            else:
                progress.write(text[:200] + "\n")
        progress.flush()
        time.sleep(1.0)


@contextlib.contextmanager
def ticking(what: str, progress: IO[str]) -> Iterator[None]:
    """A progress line for a blocking step: rewritten each second on a terminal, else every 10 s."""
    done = threading.Event()
    tty = progress.isatty()
    started = time.monotonic()

    def tick() -> None:
        interval = 1.0 if tty else PROGRESS_EVERY_S
        while not done.wait(interval):
            text = f"[up] {what} {time.monotonic() - started:5.0f}s"
            progress.write(f"\r\x1b[K{text}" if tty else f"{text}\n")
            progress.flush()

    thread = threading.Thread(target=tick, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if tty:
            progress.write("\r\x1b[K")
    progress.write(f"[up] {what}: done in {time.monotonic() - started:.0f} s\n")
    progress.flush()
