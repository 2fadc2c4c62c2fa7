"""What ``up`` settles before it starts vLLM: vLLM's port, the model it serves, its log file.

The default model is converted on the first run only (``backends/embedded/model.py``, about 30 s),
and in a child process: the conversion loads torch, transformers and Triton, which would stay in
the launcher's process for the rest of its life and speak at its exit (Triton's
``nanobind: leaked ...`` report, ~30 lines after the launcher's last one). The terminal shows the
launcher's progress line only; the child's own output is shown if it fails.

Invariants:
- The model is the user's (``--model`` / ``VLLM_MODEL``) when given, else the default model's
  folder, which is returned only once it is complete (its marker file written).
- The launcher's process never imports torch, transformers or Triton.
- The conversion's child is waited for on every path. Interrupted (Ctrl-C, or a stop turned into
  an exception), it gets SIGINT, on which it removes its half-written folder, then SIGKILL after
  ``CHILD_STOP_S``; if the launcher dies, the kernel sends it SIGINT.
"""

from __future__ import annotations

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

__all__ = ["StepFailed", "free_port", "log_path_for", "model_to_serve", "run_step"]

# How long an interrupted step's child gets to clean up after SIGINT, before SIGKILL.
CHILD_STOP_S = 10.0
CONVERTING = "converting the packaged GGUF file to a bf16 folder"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
