"""Fail the run on a skipped test that ``tests/allowed-skips.txt`` does not list with a reason.

A skip usually means a missing feature or a missing tool (vLLM, Chromium, podman) on the machine,
and a green run that skipped it proves nothing. Each line of the list is ``PATTERN | REASON``:
PATTERN is a test id or an ``fnmatch`` pattern over test ids (``tests/x.py::test_y[*]``), REASON
says why skipping it is right. Unlisted skips are named after the test results, above pytest's
summary line, and turn the exit status into 1.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

ALLOWED_FILE = Path(__file__).resolve().parent / "allowed-skips.txt"


def load_allowed(path: Path = ALLOWED_FILE) -> dict[str, str]:
    """PATTERN -> REASON; a line without a reason is an error, so every entry says why."""
    allowed: dict[str, str] = {}
    if not path.exists():
        return allowed
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = (part.strip() for part in line.partition("|"))
        if not pattern or not reason:
            raise pytest.UsageError(f"{path.name}:{number}: want 'PATTERN | REASON', got {raw!r}")
        allowed[pattern] = reason
    return allowed


def is_allowed(nodeid: str, allowed: dict[str, str]) -> bool:
    return any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in allowed)


class SkipPolicy:
    def __init__(self, allowed: dict[str, str]) -> None:
        self.allowed = allowed
        self.unlisted: list[tuple[str, str]] = []

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        if is_allowed(report.nodeid, self.allowed):
            return
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        self.unlisted.append((report.nodeid, reason.removeprefix("Skipped: ")))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unlisted and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.unlisted:
            return
        terminalreporter.section("skipped tests not in tests/allowed-skips.txt", sep="=", red=True)
        for nodeid, reason in self.unlisted:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(
            "A skip hides a missing feature or tool: install what it needs "
            "(make test installs everything), or list it with its reason."
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--allowed-skips",
        type=Path,
        default=ALLOWED_FILE,
        help="the list of skips that do not fail the run (default: tests/allowed-skips.txt)",
    )


def pytest_configure(config: pytest.Config) -> None:
    allowed = load_allowed(config.getoption("allowed_skips"))
    config.pluginmanager.register(SkipPolicy(allowed), "skip-policy")
