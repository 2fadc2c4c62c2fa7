"""``vllm-gateway up`` as a user runs it: a subprocess that starts real vLLM, then the gateway.

Checked: a streamed chat completion through the gateway answers from the real model; the ready
banner carries a working curl line; SIGTERM stops the gateway, then vLLM, exit 0, no vLLM left;
when vLLM dies, the launcher says so loudly and exits non-zero, and takes the gateway down; when the
launcher is killed outright, the kernel takes vLLM down (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests._progress import note
from tests.vllm.conftest import ARTIFACTS, ROOT, STARTUP_DEADLINE_S
from vllm_gateway.runtime.up.preflight import free_port
from vllm_gateway.runtime.up.vllm_command import has_nvidia_gpu
from vllm_gateway.settings import env_names

pytestmark = pytest.mark.timeout(int(STARTUP_DEADLINE_S) + 180)

QUESTION = "What is the capital of France? Answer in one word."


@dataclass
class Up:
    process: subprocess.Popen[str]
    gateway_url: str
    vllm_log: Path
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, deadline_s: float) -> re.Match[str]:
        note(lambda: f"vllm-gateway up says: {self.lines[-1] if self.lines else '(nothing yet)'}")
        end = time.monotonic() + deadline_s
        exited_at: float | None = None
        while time.monotonic() < end:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            if self.process.poll() is not None:
                # Its last lines may still be on their way through the pipe.
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 2:
                    break
            time.sleep(0.5)
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output()}")


def _group_alive(pgid: int) -> bool:
    """Whether any process of vLLM's group (server, engine core, workers) is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pgid: int, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not _group_alive(pgid):
            return True
        time.sleep(0.2)
    # Do not leak a vLLM into the rest of the session, whatever the test concludes.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return False


@pytest.fixture
def up(request: pytest.FixtureRequest) -> Iterator[Up]:
    gateway_port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    vllm_log = ARTIFACTS / f"up-{request.node.name}-vllm.log"
    vllm_log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in set(env_names())}
    # The trap this guards against: the gateway's VLLM_PORT must not reach vLLM.
    env["VLLM_PORT"] = str(gateway_port)
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_gateway.cli",
            "up",
            "--host",
            "127.0.0.1",
            "--log-file",
            str(vllm_log),
            "--shutdown-timeout",
            "5",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    running = Up(process, f"http://127.0.0.1:{gateway_port}", vllm_log)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            running.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        reader.join(10)  # EOF once every holder of the pipe has exited
        assert process.stdout is not None
        process.stdout.close()
        (ARTIFACTS / f"up-{request.node.name}.out").write_text(running.output() + "\n")


def _healthy_vllm_pid(up: Up) -> int:
    found = up.wait_for_line(r"vLLM is healthy after \d+ s \(pid (\d+)\)", STARTUP_DEADLINE_S)
    return int(found.group(1))


def test_up_serves_real_model_and_stops_cleanly_on_sigterm(up: Up) -> None:
    vllm_pid = _healthy_vllm_pid(up)
    child_env = Path(f"/proc/{vllm_pid}/environ").read_bytes().split(b"\0")
    assert not [item for item in child_env if item.startswith(b"VLLM_PORT=")]
    assert b"VLLM_CPU_KVCACHE_SPACE=2" in child_env or has_nvidia_gpu()
    curl = up.wait_for_line(r"curl -N (http://\S+/v1/chat/completions) .* -d '(.*)'", 60)
    assert curl.group(1) == f"{up.gateway_url}/v1/chat/completions"
    assert json.loads(curl.group(2))["model"] == "SmolLM2-135M-Instruct"
    assert "Ctrl-C to stop" in up.output()

    body = {
        "model": "SmolLM2-135M-Instruct",
        "stream": True,
        "max_tokens": 24,
        "temperature": 0,
        "messages": [{"role": "user", "content": QUESTION}],
    }
    text = ""
    with httpx.stream(
        "POST", f"{up.gateway_url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    for event in data[:-1]:
        for choice in json.loads(event)["choices"]:
            text += choice["delta"].get("content") or ""
    assert "paris" in text.lower(), text

    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(90) == 0, up.output()
    assert _wait_gone(vllm_pid, 5), f"vLLM (pid {vllm_pid}) outlived the launcher"
    # A requested stop is quiet and confirmed: no traceback on the terminal, the launcher's last
    # line says how vLLM ended, and vLLM's log says when the stop began; what vLLM's own shutdown
    # logs after that and reads like trouble (an EngineDeadError traceback when it force-kills
    # its slow engine) is explained there.
    last = up.wait_for_line(r"^\[up\] vLLM stopped \(exit code (\S+), [\d.]+ s\)", 10)
    assert last.group(1) == "0", up.output()
    assert re.match(r"\[up\] vLLM stopped ", up.lines[-1]), up.output()
    assert "Traceback" not in up.output()
    log = up.vllm_log.read_text(errors="replace")
    before, marker, after = log.partition("[vllm-gateway up] stopping vLLM on request")
    assert marker, log[-3000:]
    assert "Traceback" not in before, before[-3000:]
    if "EngineDeadError" in after:
        assert '[vllm-gateway up] note: "EngineDeadError"' in after, after[-3000:]
    assert after.rstrip().splitlines()[-1].startswith("[vllm-gateway up] vLLM stopped (exit code 0")


def test_up_exits_nonzero_when_vllm_dies(up: Up) -> None:
    vllm_pid = _healthy_vllm_pid(up)
    up.wait_for_line(r"Ctrl-C to stop", 60)
    os.kill(vllm_pid, signal.SIGKILL)
    code = up.process.wait(90)
    assert code != 0, up.output()
    assert f"vLLM (pid {vllm_pid}) DIED with exit code -9" in up.output()
    assert _wait_gone(vllm_pid, 10), "vLLM's engine processes outlived their server"
    with pytest.raises(httpx.TransportError):  # the gateway is gone too
        httpx.get(f"{up.gateway_url}/health/live", timeout=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_vllm_does_not_outlive_a_killed_launcher(up: Up) -> None:
    vllm_pid = _healthy_vllm_pid(up)
    os.kill(up.process.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel can help
    up.process.wait(10)
    assert _wait_gone(vllm_pid, 60), f"vLLM (pid {vllm_pid}) survived its launcher"
