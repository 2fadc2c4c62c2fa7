"""The suite's own pytest plugins, each run on a small suite of its own in a pytest subprocess:
the skip policy (tests/_skip_policy.py), the progress lines of long tests (tests/_progress.py), and
the summary as the last line (tests/_exit_output.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SUITE = """
import time

import pytest

from tests._progress import note


def test_passes():
    pass


def test_listed_skip():
    pytest.skip("the machine lacks a thing, for a listed reason")


def test_unlisted_skip():
    pytest.skip("a missing feature, hidden")


@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    raise AssertionError


def test_slow():
    note(lambda: "waiting for the slow thing")
    time.sleep(1.6)
"""


def run_suite(tmp_path: Path, allowed: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "allowed.txt").write_text(textwrap.dedent(allowed))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests._skip_policy",
            "-p",
            "tests._progress",
            "--allowed-skips",
            str(tmp_path / "allowed.txt"),
            "--rootdir",
            str(tmp_path),
            "-c",
            str(tmp_path / "pytest.ini"),
            *args,
            str(tmp_path / "test_suite.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_unlisted_skip_fails_the_run_and_is_named_above_the_summary(tmp_path: Path) -> None:
    proc = run_suite(tmp_path, "test_suite.py::test_listed_skip | listed, with its reason\n")
    assert proc.returncode == 1, proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert "test_suite.py::test_unlisted_skip: a missing feature, hidden" in lines
    assert not any("test_listed_skip:" in line for line in lines)
    assert "2 passed, 2 skipped, 1 xfailed" in lines[-1]  # pytest's summary stays the last line


def test_listed_skips_pass_and_a_long_test_phase_prints_progress_with_its_note(
    tmp_path: Path,
) -> None:
    proc = run_suite(tmp_path, "test_suite.py::test_*_skip | both\n", "--progress-every", "0.5")
    assert proc.returncode == 0, proc.stdout
    assert "not in tests/allowed-skips.txt" not in proc.stdout
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[pytest] ")]
    assert progress, proc.stdout
    assert all(
        line.endswith("test_suite.py::test_slow (call): waiting for the slow thing")
        for line in progress
    ), progress
    assert 2 <= len(progress) <= 3  # one every 0.5 s from 0.5 s into a 1.6 s call


def test_an_entry_without_a_reason_is_refused(tmp_path: Path) -> None:
    proc = run_suite(tmp_path, "test_suite.py::test_unlisted_skip\n")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "want 'PATTERN | REASON'" in proc.stderr


NOISY_EXIT = """
import atexit
import sys


class Engine:
    def __del__(self):
        print("Exception ignored in: Engine.__del__ (at interpreter exit)", file=sys.stderr)


KEPT = Engine()
atexit.register(lambda: print("nanobind: leaked 3 instances", file=sys.stderr))


def test_passes():
    pass
"""


def test_what_the_interpreter_prints_at_exit_goes_after_the_summary_to_a_log(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_noisy.py").write_text(NOISY_EXIT)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    exit_log = tmp_path / "exit.log"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests._exit_output",
            "--exit-log",
            str(exit_log),
            "-c",
            str(tmp_path / "pytest.ini"),
            str(tmp_path / "test_noisy.py"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("1 passed")
    assert "leaked" not in proc.stdout + proc.stderr
    assert "Engine.__del__" not in proc.stdout + proc.stderr
    kept = exit_log.read_text()
    assert "nanobind: leaked 3 instances" in kept
    assert "Engine.__del__" in kept
