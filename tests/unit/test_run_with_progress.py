"""scripts/run_with_progress.py: a progress line instead of pip's or apt's output, the output kept
in a log, the command's exit status kept, and its last lines shown when it fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run_with_progress.py"
sys.path.insert(0, str(ROOT / "scripts"))

import run_with_progress as rwp  # noqa: E402

# Lines as pip and apt-get print them, then a pause long enough for several progress lines.
FAKE_PIP = r"""
import os, sys, time
watch = sys.argv[1]
print("Collecting fastapi==0.136.3")
print("  Downloading fastapi-0.136.3-py3-none-any.whl (2.5 MB)")
print("WARNING: Location 'file:///opt/x/simple/y/' is ignored: it is neither a file nor a directory.")
print("WARNING: something the user should see")
print("Installing collected packages: a, b, c")
sys.stdout.flush()
with open(os.path.join(watch, "blob"), "wb") as f:
    f.write(b"x" * 3_000_000)
time.sleep(1.2)
print("Successfully installed a b c")
"""


def run(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--label",
            "install",
            "--log",
            str(tmp_path / "out.log"),
            "--watch",
            str(tmp_path / "venv"),
            "--every",
            "0.3",
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_progress_lines_say_what_how_much_and_how_long(tmp_path: Path) -> None:
    (tmp_path / "venv").mkdir()
    proc = run(tmp_path, sys.executable, "-c", FAKE_PIP, str(tmp_path / "venv"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    ticks = [line for line in lines if "installing 3 packages" in line]
    assert len(ticks) >= 2, proc.stdout  # a line every --every seconds while pip is quiet
    assert "2 MB downloaded" in ticks[-1]  # 2.5 MB, rounded
    assert "venv +3 MB" in ticks[-1]
    assert "[install] WARNING: something the user should see" in lines
    assert "is ignored" not in proc.stdout  # pip's noise about local indexes
    assert lines[-1].startswith("[install] done in ") and lines[-1].endswith("venv +3 MB")
    log = (tmp_path / "out.log").read_text()
    assert "Collecting fastapi==0.136.3" in log and "Successfully installed a b c" in log


def test_failure_keeps_the_exit_status_and_shows_the_last_lines(tmp_path: Path) -> None:
    (tmp_path / "venv").mkdir()
    script = "print('ERROR: No matching distribution found for nothing==1'); raise SystemExit(3)"
    proc = run(tmp_path, sys.executable, "-c", script)
    assert proc.returncode == 3
    assert "failed (exit code 3)" in proc.stdout
    assert proc.stdout.rstrip().endswith("ERROR: No matching distribution found for nothing==1")


@pytest.mark.parametrize(
    ("line", "phase", "mb"),
    [
        ("Collecting fastapi==0.136.3", "collecting fastapi==0.136.3", 0.0),
        (
            "  Downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (190.2 MB)",
            "downloading torch 2.13.0",
            190.2,
        ),
        (
            "Processing /opt/wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl",
            "reading torch 2.13.0+cpu",
            0.0,
        ),
        ("  Downloading pkg-1.0.tar.gz (12 kB)", "downloading pkg 1.0", 0.012),
        (
            "Get:7 http://deb.example/debian bookworm/main amd64 chromium amd64 156.0-1 [80.5 MB]",
            "downloading chromium",
            80.5,
        ),
        ("Get:1 http://deb.example/debian bookworm InRelease [151 kB]", None, 0.151),
        ("Unpacking chromium (156.0-1) ...", "unpacking chromium", 0.0),
        ("Processing triggers for man-db (2.11.2-2) ...", None, 0.0),
        ("Requirement already satisfied: six in ./venv", "checking six", 0.0),
        ("Processing triggers for libc-bin (2.36-9) ...", None, 0.0),
        ("Would install a-1.0 b-2.0 c-3.0", "resolved 3 packages", 0.0),
        ("I: Retrieving libc6 2.36-9+deb12u10", "downloading libc6", 0.0),
        ("I: Configuring passwd...", "installing passwd", 0.0),
        (
            "I: Resolving dependencies of required packages...",
            "Resolving dependencies of required packages",
            0.0,
        ),
    ],
)
def test_lines_of_pip_and_apt_are_described(line: str, phase: str | None, mb: float) -> None:
    assert rwp.describe(line) == phase
    assert rwp.megabytes(line) == pytest.approx(mb)
