"""What ``vllm-gateway up`` settles before it starts vLLM, with real processes and sockets: a port
already taken is named with its flag before vLLM starts; the default model's conversion runs in a
child whose failure is told and whose interruption is cleaned up. (The real conversion, and that
torch never loads in the launcher: tests/vllm/test_up_model.py.)
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.runtime.up import command, preflight


def test_a_failed_conversion_says_what_its_child_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "not-a-folder"
    cache.write_text("")  # the child cannot make <cache>/models under a file
    with pytest.raises(model_prep.ModelPrepError) as caught:
        preflight.model_to_serve(None, cache)
    message = str(caught.value)
    assert message.startswith("preparing the default model failed (exit code 1):")
    assert "NotADirectoryError" in message  # the child's own last lines
    err = capsys.readouterr().err
    assert "[up] preparing the default model" in err
    assert ": done in" not in err  # a failed step is not announced as done


def test_the_childs_own_error_line_is_the_message() -> None:
    output = ["Traceback? no:", "error: reading x needs the 'gguf' package: 'pip install gguf'"]
    assert (
        preflight._why_it_failed(1, output)
        == "reading x needs the 'gguf' package: 'pip install gguf'"
    )


def test_a_chosen_model_is_served_as_given(tmp_path: Path) -> None:
    assert preflight.model_to_serve("org/m", tmp_path) == "org/m"
    assert not (tmp_path / "models").exists()  # nothing converted


STEP = r"""
import os, signal, sys, time
events = sys.argv[1]
def note(text):
    with open(events, "a") as f:
        f.write(text + "\n")
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
note(f"ready {os.getpid()}")
try:
    time.sleep(60)
except KeyboardInterrupt:
    note("interrupted: half-written files removed")
    sys.exit(130)
"""


def _interrupt_when_ready(events: Path) -> threading.Thread:
    """SIGINT to this process (a Ctrl-C) once the step's child has started (within 20 s)."""

    def run() -> None:
        deadline = time.monotonic() + 20
        while "ready" not in (events.read_text() if events.exists() else ""):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _step(tmp_path: Path, mode: str) -> tuple[list[str], Path]:
    script = tmp_path / "step.py"
    script.write_text(STEP)
    events = tmp_path / "events.txt"
    return [sys.executable, str(script), str(events), mode], events


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_an_interrupted_step_lets_its_child_clean_up_then_waits_for_it(tmp_path: Path) -> None:
    command, events = _step(tmp_path, "orderly")
    helper = _interrupt_when_ready(events)
    with pytest.raises(KeyboardInterrupt):
        preflight.run_step(command, "stepping")
    helper.join(5)
    lines = events.read_text().splitlines()
    assert lines[-1] == "interrupted: half-written files removed"
    assert _pid_gone(int(lines[0].split()[1]))  # waited for: not even a zombie is left


def test_an_interrupted_step_whose_child_ignores_sigint_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "CHILD_STOP_S", 0.5)
    command, events = _step(tmp_path, "stubborn")
    helper = _interrupt_when_ready(events)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        preflight.run_step(command, "stepping")
    assert time.monotonic() - started < 20  # not the child's 60 s
    helper.join(5)
    lines = events.read_text().splitlines()
    assert len(lines) == 1  # it never got to clean up: SIGKILL
    assert _pid_gone(int(lines[0].split()[1]))


def _listening() -> socket.socket:
    """A socket that holds a loopback port, as another server would."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_up_names_the_gateways_taken_port_and_its_flag_before_starting_vllm(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with _listening() as other:
        port = other.getsockname()[1]
        # --vllm-startup-timeout: without the check, fail fast rather than warm a vLLM up.
        code = command.main(
            [
                *("--host", "127.0.0.1", "--port", str(port), "--model", "/nonexistent"),
                *("--vllm-startup-timeout", "1"),
            ]
        )
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"[up] error: the gateway cannot listen on 127.0.0.1:{port}: port {port} is taken" in err
    assert "another port with --port (env VLLM_PORT)" in err
    assert "starting vLLM" not in err


def test_up_names_vllms_taken_port_and_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with _listening() as other:
        port = other.getsockname()[1]
        code = command.main(
            [
                *("--host", "127.0.0.1", "--port", str(preflight.free_port())),
                *("--vllm-port", str(port), "--model", "/nonexistent"),
                *("--vllm-startup-timeout", "1"),
            ]
        )
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"[up] error: vLLM cannot listen on 127.0.0.1:{port}: port {port} is taken" in err
    assert "Choose another with --vllm-port, or leave it out for a free one" in err
    assert "starting vLLM" not in err


def test_a_wildcard_bind_finds_a_port_taken_on_loopback() -> None:
    with _listening() as other:
        port = other.getsockname()[1]
        error = preflight.bind_error("0.0.0.0", port)
    assert error is not None and error.errno == errno.EADDRINUSE
    assert preflight.bind_error("0.0.0.0", port) is None  # free again once it is closed
    assert preflight.port_problems("127.0.0.1", port, None) == []
