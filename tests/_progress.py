"""A line every 10 s while one test phase (setup, call, teardown) or the collection of the test
files runs for longer than 10 s.

pytest prints a dot when a test ends, so a fixture or test that waits for minutes (vLLM's warm-up,
building a container image) would be minutes of silence. The line names the test, the phase, the
time it has run and, when the test said so with ``note()``, what it is waiting for::

    [pytest] 40s tests/vllm/test_up.py::test_up_serves (setup): vLLM: Loading weights took 1.20 s

pytest captures file descriptors 1 and 2 while a test runs, so the lines go to a duplicate of the
terminal's descriptor taken at configure time, when capturing is suspended.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Generator

import pytest

EVERY_S = 10.0

_lock = threading.Lock()
_note: str | Callable[[], str] | None = None


def note(text: str | Callable[[], str] | None) -> None:
    """What the running test waits for, shown on its progress lines; a callable is asked each time."""
    global _note
    with _lock:
        _note = text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Heartbeat:
    def __init__(self, config: pytest.Config, fd: int, every: float) -> None:
        self.config = config
        self.fd = fd
        self.every = every
        self.width_after_last = 0
        self.phase: tuple[str, str, float] | None = None  # nodeid, phase, start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pytest-progress", daemon=True)

    def _run(self) -> None:
        last = -1e9
        while not self.stop.wait(min(1.0, self.every / 4)):
            with _lock:
                current, text = self.phase, _note
            if current is None:
                continue
            nodeid, phase, started = current
            now = time.monotonic()
            if now - started < self.every or now - last < self.every:
                continue
            last = now
            line = f"[pytest] {_clock(now - started)} {nodeid} ({phase})"
            try:
                detail = text() if callable(text) else text
            except Exception as exc:  # a note must never break the run it describes
                detail = f"(note failed: {exc!r})"
            if detail:
                line += f": {detail}"
            self._write(line[:300])

    def _write(self, line: str) -> None:
        # pytest's writer does not see these lines: it still counts the dots printed before the
        # last one, so a line break is due only when it has printed something since.
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        width = reporter._tw.width_of_current_line if reporter else 0
        mid_line = width not in (0, self.width_after_last)
        with contextlib.suppress(OSError):
            os.write(self.fd, (("\n" if mid_line else "") + line + "\n").encode())
        self.width_after_last = width

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._timed(item, "setup"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._timed(item, "call"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._timed(item, "teardown"))

    @pytest.hookimpl(wrapper=True)
    def pytest_collection(self, session: pytest.Session) -> Generator[None, object, object]:
        return (yield from self._timed(None, "collecting"))

    def _timed(self, item: pytest.Item | None, phase: str) -> Generator[None, object, object]:
        global _note
        with _lock:
            self.phase = (item.nodeid if item else "the test files", phase, time.monotonic())
            _note = None
        try:
            return (yield)
        finally:
            with _lock:
                self.phase = None
                _note = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--progress-every",
        type=float,
        default=EVERY_S,
        help="seconds between the progress lines of a long test phase (default 10)",
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        fd = os.dup(1)
    except OSError:
        return
    heartbeat = Heartbeat(config, fd, config.getoption("progress_every"))
    config.pluginmanager.register(heartbeat, "progress-heartbeat")
    heartbeat.thread.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    heartbeat = config.pluginmanager.get_plugin("progress-heartbeat")
    if isinstance(heartbeat, Heartbeat):
        heartbeat.stop.set()
        heartbeat.thread.join(5)
        os.close(heartbeat.fd)
