"""Keep pytest's summary line the last thing a run prints.

After the summary the interpreter shuts down, and what vLLM's in-process engine leaves behind
speaks then: ``Exception ignored in: <function AsyncLLM.__del__>`` with a ``TypeError`` (the
destructor runs after the modules it calls are torn down) and libtriton's nanobind report
(``nanobind: leaked N instances of type ...``, which Triton itself silences in its own workers).
None of it is a test result, and read after the summary it looks like one.

So: closed engines are garbage-collected at session end, while their modules still exist; and
once pytest is done, the first exit handler points file descriptors 1 and 2 at
``test-artifacts/interpreter-exit.log``, where whatever the shutdown prints is kept.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from pathlib import Path

import pytest

EXIT_LOG = Path(__file__).resolve().parent.parent / "test-artifacts" / "interpreter-exit.log"


def _redirect_to(path: Path) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            continue
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError:
        return
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--exit-log",
        type=Path,
        default=EXIT_LOG,
        help="where output printed after pytest's summary goes (test-artifacts/interpreter-exit.log)",
    )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    gc.collect()  # after the session's fixtures are torn down, before the summary


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # Registered last, so it runs first at exit: after pytest has restored the terminal's
    # descriptors (its capture ends after this hook) and before anything else shuts down.
    atexit.register(_redirect_to, config.getoption("exit_log"))
