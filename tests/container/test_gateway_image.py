"""The gateway's image (deploy/Dockerfile), built and run with podman as an operator would.

The base is a Debian made on this machine (scripts/local_base_image.sh: no registry is reachable
here), kept between runs under a name that says what it holds; the build gets the machine's CA
bundle as the ``pip-ca`` secret, and its own wheels at the versions of constraints.txt. Each
container runs on the host's network in front of the project's simulator on loopback, and:

- answers ``/v1/health``, passes its own HEALTHCHECK, runs as uid 10001 with the locked fastapi;
- relays a plain and a streamed chat completion from the simulator;
- on ``podman stop`` drains: a stream in flight ends with ``[DONE]``, ``/v1/health`` says
  ``draining``, and the gateway exits 0 well within the grace period (not killed).

Podman here is Debian's 4.3 with runc (crun fails on this machine's rlimits and hybrid cgroups),
explicit ulimits, and ``--init`` so that a PID 1 forwards ``podman stop``'s SIGTERM. The image
and every container are removed at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests._progress import note

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
BUILD_TIMEOUT_S = 900
GRACE_S = 20  # podman stop -t: SIGKILL after this
DRAIN_S = 10  # VLLM_SHUTDOWN_TIMEOUT_SECONDS, below the grace period
CHAT = "/v1/chat/completions"

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 300)


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    proc = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout.strip()


def last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").splitlines()
        return next((line.strip() for line in reversed(lines) if line.strip()), "")
    return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ca_bundle() -> str | None:
    """The build machine's CA trust store, which pip inside the build needs behind a TLS proxy."""
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def locked(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise KeyError(name)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    assert shutil.which("podman"), "podman is missing: scripts/system-deps.sh installs it"
    ARTIFACTS.mkdir(exist_ok=True)
    base_log = ARTIFACTS / "container-base.log"
    note(lambda: f"local base image: {last_line(base_log)}")
    with base_log.open("w") as err:
        base = subprocess.run(
            [str(ROOT / "scripts" / "local_base_image.sh")],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    assert base.returncode == 0, f"local_base_image.sh failed:\n{base_log.read_text()}"
    base_image = base.stdout.strip()

    tag = f"localhost/vllm-gateway-test:{os.getpid()}"
    log = ARTIFACTS / "container-build.log"
    secret = [f"--secret=id=pip-ca,src={ca}"] if (ca := ca_bundle()) else []
    note(lambda: f"podman build: {last_line(log)}")
    try:
        with log.open("w") as out:
            build = subprocess.run(
                [
                    *PODMAN,
                    "build",
                    "--layers=false",  # no intermediate images left behind
                    "--force-rm",  # nor containers of a failed step
                    "--format=docker",  # keeps HEALTHCHECK
                    "--network=host",
                    *ULIMITS,
                    "--ignorefile",
                    str(ROOT / "deploy" / "Dockerfile.dockerignore"),
                    *secret,
                    "--build-arg",
                    f"PYTHON_IMAGE={base_image}",
                    "-f",
                    str(ROOT / "deploy" / "Dockerfile"),
                    "-t",
                    tag,
                    str(ROOT),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        assert build.returncode == 0, f"podman build failed; last lines of {log}:\n{tail}"
        note(None)
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


@dataclass
class Backend:
    url: str
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def simulator() -> Iterator[Backend]:
    """The project's simulator on loopback, as `vllm-gateway simulate` starts it."""
    port = free_port()
    with (ARTIFACTS / "container-simulator.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "vllm_gateway", "simulate", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, lambda: process.poll() is None)
        yield Backend(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        process.wait(10)


def wait_http(url: str, deadline_s: float, alive: object, status: int = 200) -> httpx.Response:
    end = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < end:
        assert callable(alive) and alive(), f"gave up waiting for {url}: its server is gone"
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == status:
                return response
            last = response.status_code
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status} within {deadline_s} s (last: {last!r})")


@dataclass
class Container:
    name: str
    url: str

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.name, check=False) == "true"

    def logs(self) -> str:
        proc = subprocess.run(
            [*PODMAN, "logs", self.name], capture_output=True, text=True, timeout=30, check=False
        )
        return proc.stdout + proc.stderr


@pytest.fixture
def container(
    image: str, simulator: Backend, request: pytest.FixtureRequest
) -> Iterator[Container]:
    port = free_port()
    name = f"vllm-gateway-test-{os.getpid()}-{request.node.name}"[:60]
    podman(
        "run",
        "--detach",
        "--init",
        "--network=host",
        *ULIMITS,
        "--name",
        name,
        "-e",
        f"VLLM_BACKEND_URL={simulator.url}",
        "-e",
        "VLLM_HOST=127.0.0.1",
        "-e",
        f"VLLM_PORT={port}",
        "-e",
        f"VLLM_SHUTDOWN_TIMEOUT_SECONDS={DRAIN_S}",
        image,
    )
    running = Container(name, f"http://127.0.0.1:{port}")
    try:
        note("waiting for the container's /v1/health")
        try:
            wait_http(running.url + "/v1/health", 60, running.running)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ncontainer log:\n{running.logs()}") from None
        note(None)
        yield running
    finally:
        (ARTIFACTS / f"container-{request.node.name}.log").write_text(running.logs())
        podman("rm", "--force", "--time", "0", name, check=False)


def chat(stream: bool, max_tokens: int = 8, **sim: float) -> dict[str, object]:
    body: dict[str, object] = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
        "max_tokens": max_tokens,
    }
    if sim:
        body["vllm_sim"] = sim
    return body


def sse_data(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_container_answers_health_and_relays_requests(container: Container) -> None:
    health = httpx.get(container.url + "/v1/health", timeout=5)
    assert health.json() == {"status": "ok"}
    assert (
        subprocess.run(
            [*PODMAN, "healthcheck", "run", container.name], capture_output=True, timeout=30
        ).returncode
        == 0
    ), "the image's own HEALTHCHECK failed"
    assert podman("exec", container.name, "id", "-u") == "10001"
    fastapi = podman(
        "exec", container.name, "python", "-c", "import fastapi; print(fastapi.__version__)"
    )
    assert fastapi == locked("fastapi")  # the image's packages come from constraints.txt

    plain = httpx.post(container.url + CHAT, json=chat(stream=False), timeout=30)
    assert plain.status_code == 200, plain.text
    answer = plain.json()
    assert answer["choices"][0]["message"]["content"]
    assert answer["choices"][0]["finish_reason"] == "length"

    streamed = httpx.post(container.url + CHAT, json=chat(stream=True), timeout=30)
    assert streamed.status_code == 200
    events = sse_data(streamed.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_container_drains_on_podman_stop_within_the_grace_period(container: Container) -> None:
    # A stream of about 3 s (60 tokens, 50 ms apart) is in flight when the stop comes.
    result: dict[str, object] = {}
    first_byte = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream(
                "POST", container.url + CHAT, json=chat(True, 60, itl=0.05), timeout=30
            ) as response:
                result["status"] = response.status_code
                chunks = []
                for chunk in response.iter_text():
                    chunks.append(chunk)
                    first_byte.set()
                result["body"] = "".join(chunks)
        except Exception as exc:
            result["error"] = exc
        finally:
            first_byte.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first_byte.wait(20), "the stream did not start"
    assert "error" not in result, result

    stopped_at = time.monotonic()
    stop = subprocess.Popen(
        [*PODMAN, "stop", "--time", str(GRACE_S), container.name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # While it drains, the gateway says so and still finishes what it started.
    draining = wait_http(container.url + "/v1/health", 10, lambda: True, status=503)
    assert draining.json()["status"] == "draining"
    assert stop.wait(GRACE_S + 30) == 0
    took = time.monotonic() - stopped_at
    reader.join(30)

    assert result.get("status") == 200, result
    events = sse_data(str(result.get("body", "")))
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container.name)
    assert exit_code == "0", f"exit code {exit_code} (137 is SIGKILL after the grace period)"
    assert took < GRACE_S, f"the stop took {took:.1f} s, the grace period is {GRACE_S} s"
    assert "drained" in container.logs()
