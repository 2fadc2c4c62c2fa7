"""What ``up`` settles before it starts vLLM: the ports (the gateway's and vLLM's free), the model
vLLM serves, its log file. A port already taken is found here, with the flag that changes it,
rather than after minutes of vLLM's warm-up, when the gateway would fail to listen.

The default model is converted on the first run only (``backends/embedded/model.py``, about 30 s),
and in a child process: the conversion loads torch, transformers and Triton, which would stay in
the launcher's process for the rest of its life and speak at its exit (Triton's
``nanobind: leaked ...`` report, ~30 lines after the launcher's last one). The terminal shows the
launcher's progress line only; the child's own output is shown if it fails.

Invariants:
- A port is judged free as the gateway's server would bind it: every address its host resolves
  to, with ``SO_REUSEADDR`` (so a port left in TIME_WAIT by an earlier run counts as free).
- The model is the user's (``--model`` / ``VLLM_MODEL``) when given, else the default model's
  folder, which is returned only once it is complete (its marker file written).
- The launcher's process never imports torch, transformers or Triton.
- The conversion's child is waited for on every path. Interrupted (Ctrl-C, or a stop turned into
  an exception), it gets SIGINT, on which it removes its half-written folder, then SIGKILL after
  ``CHILD_STOP_S``; if the launcher dies, the kernel sends it SIGINT.
"""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.runtime.up.console import describe_exit, log
from vllm_gateway.runtime.up.vllm_process import dies_with_parent
from vllm_gateway.runtime.up.warmup import ticking

__all__ = [
    "StepFailed",
    "bind_error",
    "free_port",
    "log_path_for",
    "model_to_serve",
    "port_problems",
    "run_step",
]

# How long an interrupted step's child gets to clean up after SIGINT, before SIGKILL.
CHILD_STOP_S = 10.0
CONVERTING = "converting the packaged GGUF file to a bf16 folder"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on ``host:port`` now, or None if it could."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio binds it: the IPv4 address is its own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return exc
    return None


def port_problems(host: str, port: int, vllm_port: int | None) -> list[str]:
    """What stands in the way of the gateway listening on ``host:port``, and of vLLM on its
    chosen loopback port (none when it is left to ``free_port``): one sentence each, naming the
    port and the flag that changes it."""
    problems = []
    error = bind_error(host, port)
    if error is not None:
        problems.append(
            f"the gateway cannot listen on {host}:{port}: "
            + (
                f"port {port} is taken by another process ({error.strerror}). Stop it, or give "
                "the gateway another port with --port (env VLLM_PORT)"
                if error.errno == errno.EADDRINUSE
                else f"{error.strerror or error}. Change --host or --port (env VLLM_HOST, VLLM_PORT)"
            )
        )
    error = bind_error("127.0.0.1", vllm_port) if vllm_port else None
    if error is not None:
        problems.append(
            f"vLLM cannot listen on 127.0.0.1:{vllm_port}: "
            + (
                f"port {vllm_port} is taken by another process ({error.strerror})"
                if error.errno == errno.EADDRINUSE
                else f"{error.strerror or error}"
            )
            + ". Choose another with --vllm-port, or leave it out for a free one"
        )
    return problems


def model_to_serve(chosen: str | None, cache: Path) -> str:
    """The model vLLM serves: ``chosen``, else the default model's folder under ``cache``.

    Raises ``model_prep.ModelPrepError`` when the default model cannot be prepared.
    """
    if chosen:
        return chosen
    folder = model_prep.default_model_dir(cache)
    if model_prep.is_prepared(folder):
        return str(folder)
    log("preparing the default model (first run only, about 30 s)")
    command = [sys.executable, "-m", model_prep.__name__, "--cache-dir", str(cache)]
    try:
        run_step(command, CONVERTING)
    except StepFailed as exc:
        raise model_prep.ModelPrepError(_why_it_failed(exc.code, exc.output)) from None
    if not model_prep.is_prepared(folder):
        raise model_prep.ModelPrepError(f"the conversion ended without a complete {folder}")
    return str(folder)


class StepFailed(RuntimeError):
    def __init__(self, code: int, output: list[str]) -> None:
        self.code = code
        self.output = output
        super().__init__(f"exit code {describe_exit(code)}")


def run_step(command: Sequence[str], what: str) -> None:
    """Run ``command`` to its end in a child process behind a progress line. Its output (stdout and
    stderr together) is kept in a temporary file, and given with its exit code by ``StepFailed``
    when the child fails.

    Interrupted, the child gets SIGINT, then SIGKILL after ``CHILD_STOP_S``; it is waited for, and
    the exception goes on.
    """
    with tempfile.TemporaryFile() as output:
        # Started before the progress thread: a preexec_fn is unsafe once other threads run.
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the launcher alone
            preexec_fn=dies_with_parent(signal.SIGINT),
        )
        try:
            with ticking(what, sys.stderr):  # says "done" only if nothing is raised
                code = process.wait()
                if code != 0:
                    output.seek(0)
                    raise StepFailed(code, output.read().decode("utf-8", "replace").splitlines())
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(CHILD_STOP_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _why_it_failed(code: int, output: list[str]) -> str:
    """The child's own ``error: ...`` line when it wrote one, else its exit code and last lines."""
    for line in reversed(output):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    tail = "\n".join(f"    {line}" for line in output[-15:])
    return f"preparing the default model failed (exit code {describe_exit(code)}):\n{tail}"


def log_path_for(chosen: str | None, env: Mapping[str, str], port: int, stamp: str) -> Path:
    """vLLM's log file: ``chosen``, else ``<cache>/logs/vllm-<stamp>-<port>.log``."""
    if chosen:
        return Path(chosen)
    return model_prep.default_cache_dir(env) / "logs" / f"vllm-{stamp}-{port}.log"
