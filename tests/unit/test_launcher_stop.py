"""How `vllm-gateway up` stops vLLM and talks during its warm-up, with stand-in processes.

A fake vLLM: a "server" process leading its own group with an "engine" child, like vLLM's API
server and its EngineCore. A requested stop must reach the server alone (vLLM's server shuts its
engine down; an engine killed under it makes the server log an EngineDeadError traceback), end
with the whole group gone, and be confirmed by the launcher's last line.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from vllm_gateway.runtime.up import report, vllm_log, vllm_process, warmup

FAKE_VLLM = r"""
import os, signal, sys, time
events = sys.argv[1]
mode = sys.argv[2]

def note(text):
    with open(events, "a") as f:
        f.write(text + "\n")

engine = os.fork()
if engine == 0:
    signal.signal(signal.SIGTERM, lambda *_: (note("engine: SIGTERM"), os._exit(0)))
    signal.signal(signal.SIGUSR1, lambda *_: (note("engine: asked to stop"), os._exit(0)))
    note("engine: ready")
    while True:
        time.sleep(0.1)

def on_term(*_):
    note("server: SIGTERM")
    if mode == "orderly":
        time.sleep(0.3)  # a signal sent to the whole group reaches the engine first
        os.kill(engine, signal.SIGUSR1)
        os.waitpid(engine, 0)
    # What vLLM 0.32's own shutdown may print, then what libtriton prints at every exit.
    print("vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.")
    print("nanobind: leaked 4 instances!", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
note("server: ready")
while True:
    time.sleep(0.1)
"""


def start_fake(
    tmp_path: Path, mode: str, serving: bool = True
) -> tuple[vllm_process.VllmChild, Path]:
    events = tmp_path / "events.txt"
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    child = vllm_process.VllmChild.start(
        [sys.executable, str(script), str(events), mode],
        dict(os.environ),
        tmp_path / "vllm.log",
        "fake",
        1,
    )
    deadline = time.monotonic() + 20
    while not events.exists() or events.read_text().count("ready") < 2:
        assert time.monotonic() < deadline, "the fake vLLM did not start"
        time.sleep(0.05)
    child.serving = serving
    return child, events


def group_gone(pgid: int, within_s: float = 5.0) -> bool:
    """Whether the group is empty within a bound (an orphan is reaped by PID 1, a bit later)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_requested_stop_signals_the_server_alone_which_stops_its_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    child, events = start_fake(tmp_path, "orderly")
    report.stop_and_report(child, timeout=20)
    lines = events.read_text().splitlines()
    assert "server: SIGTERM" in lines
    assert "engine: asked to stop" in lines
    assert "engine: SIGTERM" not in lines  # a group-wide SIGTERM would have reached it
    assert group_gone(child.pid)
    # vLLM's log says what the launcher did, and what the alarming exit lines mean.
    log = (tmp_path / "vllm.log").read_text().splitlines()
    assert log[-6].startswith("[vllm-gateway up] stopping vLLM on request: SIGTERM to its server")
    assert log[-5].endswith("EngineDeadError: EngineCore encountered an issue.")
    assert log[-4] == "nanobind: leaked 4 instances!"
    assert log[-3].startswith('[vllm-gateway up] note: "EngineDeadError": vLLM 0.32')
    assert log[-2].startswith('[vllm-gateway up] note: "nanobind: leaked": Triton')
    assert log[-1].startswith("[vllm-gateway up] vLLM stopped (exit code 0, ")
    said = capsys.readouterr().err.strip().splitlines()
    assert said[0] == f"[up] stopping vLLM (pid {child.pid}; SIGKILL after 20 s)"
    assert said[-1].startswith("[up] vLLM stopped (exit code 0, ")
    assert said[-1].endswith(f" s); its log: {tmp_path / 'vllm.log'}")


def test_engine_processes_left_by_an_exited_server_get_sigterm_after_a_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_process, "STRAGGLER_GRACE_S", 0.5)
    child, events = start_fake(tmp_path, "abandon")
    started = time.monotonic()
    assert child.stop(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert "engine: SIGTERM" in events.read_text().splitlines()
    assert group_gone(child.pid)


def test_a_stop_during_warm_up_signals_the_whole_group_at_once(tmp_path: Path) -> None:
    child, events = start_fake(tmp_path, "orderly", serving=False)
    started = time.monotonic()
    assert child.stop(timeout=20) == 0
    assert time.monotonic() - started < vllm_process.SERVER_ALONE_S
    assert "engine: SIGTERM" in events.read_text().splitlines()
    assert group_gone(child.pid)


def _stubborn_child(tmp_path: Path) -> vllm_process.VllmChild:
    """A child that ignores SIGTERM, once it has said it is ready (within 20 s)."""
    script = tmp_path / "stubborn.py"
    script.write_text(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\ntime.sleep(60)\n"
    )
    child = vllm_process.VllmChild.start(
        [sys.executable, str(script)], dict(os.environ), tmp_path / "v.log", "x", 1
    )
    deadline = time.monotonic() + 20
    while "ready" not in (tmp_path / "v.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return child


def test_a_starting_server_that_ignores_sigterm_is_killed_sooner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_process, "STARTING_STOP_S", 0.5)
    child = _stubborn_child(tmp_path)
    started = time.monotonic()
    assert child.stop(timeout=30) == -signal.SIGKILL
    assert time.monotonic() - started < 10  # not the 30 s a serving vLLM may take
    assert group_gone(child.pid)


def test_a_server_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    child = _stubborn_child(tmp_path)
    child.serving = True
    assert child.stop(timeout=0.5) == -signal.SIGKILL
    assert group_gone(child.pid)


def test_expected_warmup_warnings_are_explained_once(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    explainer = vllm_log.LogExplainer(log)
    assert explainer.new_notes() == []  # no log yet
    line = "(EngineCore pid=1) INFO [shm_broadcast.py:871] No available shared memory broadcast block found in 60 seconds."
    with log.open("a") as out:
        out.write("INFO loading weights\n" + line[:40])  # a line still being written
    assert explainer.new_notes() == []
    with log.open("a") as out:
        out.write(line[40:] + "\n" + line + "\n")
    notes = explainer.new_notes()
    assert len(notes) == 1
    assert "busy compiling the model" in notes[0] and "expected" in notes[0]
    with log.open("a") as out:
        out.write(line + "\n")
    assert explainer.new_notes() == []


def test_a_blocking_step_shows_progress_and_its_time(tmp_path: Path) -> None:
    out = tmp_path / "progress.txt"
    with out.open("w") as progress:
        original = warmup.PROGRESS_EVERY_S
        warmup.PROGRESS_EVERY_S = 0.2
        try:
            with warmup.ticking("converting", progress):
                time.sleep(0.7)
        finally:
            warmup.PROGRESS_EVERY_S = original
    lines = out.read_text().splitlines()
    assert len([line for line in lines if line.startswith("[up] converting ")]) >= 2
    assert lines[-1] == "[up] converting: done in 1 s"
