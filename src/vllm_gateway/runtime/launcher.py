"""``vllm-gateway up``: start vLLM's OpenAI server as a child process, then the gateway in front of it.

Lifecycle: pick the model (``--model`` / ``VLLM_MODEL``, else the prepared SmolLM2 folder), start
``python -m vllm.entrypoints.openai.api_server`` on a loopback port with its output in a log file,
wait for its ``/health`` while showing progress, then run the gateway in this process
(``server.serve``) with its backend pointing at the child. When the gateway returns (SIGINT/SIGTERM,
which it handles by draining), the child is stopped: SIGTERM to vLLM's server process alone, which
shuts its engine processes down in order (a SIGTERM to the whole group kills the engine under the
server, which then logs an ``EngineDeadError`` traceback), to the group if that does not end it
(and at once during warm-up), SIGKILL to the group after a deadline; the launcher's last line says
how vLLM ended and how long the stop took.

While vLLM warms up, a progress line shows the elapsed time and its log's last line; log lines
that look alarming but are expected during warm-up (``EXPECTED_DURING_WARMUP``) are explained once.

Invariants:
- No orphan vLLM. The child runs in its own process group (so a Ctrl-C in the terminal reaches only
  the launcher, which stops things in order), gets SIGTERM from the kernel if the launcher dies
  (``PR_SET_PDEATHSIG``), and the whole group is killed in ``finally`` and at exit.
- The gateway's own ``VLLM_*`` variables never reach vLLM, which reads ``VLLM_PORT`` and others
  itself: the child's environment is scrubbed of every name in ``settings.env_names()``.
- If vLLM dies while the gateway runs, that is said loudly with its exit code, the gateway is
  stopped (it drains, answering 502 meanwhile) and the launcher exits non-zero.
- Only ``main`` reads ``os.environ`` and exits with a status; the helpers take what they need.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.settings import (
    FIELDS,
    Settings,
    SettingsError,
    add_arguments,
    env_names,
    load_settings,
)

__all__ = ["VllmChild", "build_vllm_command", "child_environment", "main", "served_names"]

GPU_ARGS = (
    "--gpu-memory-utilization",
    "0.90",
    "--max-num-seqs",
    "256",
    "--tensor-parallel-size",
    "1",
    "--dtype",
    "bfloat16",
    "--trust-remote-code",
)
# CPU equivalents: bf16 runs well with AVX-512; a short context keeps the KV cache small.
CPU_ARGS = ("--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "256")
CPU_KVCACHE_GIB = "2"
# vLLM's keep-alive for the child, and the gateway's idle timeout below it: the gateway's pool to
# its own vLLM stays warm across quiet spells instead of reconnecting after 4 s (docs/deployment.md).
VLLM_KEEP_ALIVE_S = "300"
IDLE_SHARE_OF_KEEP_ALIVE = 0.8
PR_SET_PDEATHSIG = 1
# Off a terminal (a log, a CI transcript), one progress line this often.
PROGRESS_EVERY_S = 10.0
# How long a serving vLLM's server process gets to stop its engine itself, before its group gets
# SIGTERM too; and after the server has exited, how long its engine processes get to follow it.
SERVER_ALONE_S = 10.0
STRAGGLER_GRACE_S = 5.0
# A vLLM still starting holds no requests, and its server may not act on SIGTERM until its engine
# is up: past this, its group gets SIGKILL (or past the stop timeout, if that is shorter).
STARTING_STOP_S = 10.0

# What vLLM prints while it stops on request that reads like trouble but is not.
EXPECTED_AT_EXIT = (
    (
        "EngineDeadError",
        "vLLM 0.32's server stops its own engine on SIGTERM and force-kills it if it is slow to "
        "exit; its output handler, not told, then logs this traceback. After a requested stop it "
        "is harmless: nothing was in flight (the gateway had drained)",
    ),
    (
        "nanobind: leaked",
        "Triton's bindings list the objects still alive when vLLM's interpreter exits; printed "
        "at every stop and harmless (Triton hides the same report in its own worker processes)",
    ),
    (
        "resource_tracker: There appear to be",
        "Python's multiprocessing cleans up the shared memory vLLM's processes leave at exit; "
        "harmless",
    ),
)

# vLLM's warm-up lines that read like trouble but are not: (text in the line, what it means).
EXPECTED_DURING_WARMUP = (
    (
        "No available shared memory broadcast block found",
        "vLLM's server waits for its engine process, which is busy compiling the model "
        "(torch.compile); expected during warm-up, it stops once the engine is ready",
    ),
    (
        "Compiling model again due to a load failure",
        "the CPU build cannot load its cached compiled model, so every start compiles again "
        "(2 to 4 minutes on 2 cores)",
    ),
)


def log(message: str) -> None:
    print(f"[up] {message}", file=sys.stderr, flush=True)


# --- pure pieces ---------------------------------------------------------------------------------


def served_names(model: str) -> list[str]:
    """The short name first (what clients ask for and what responses carry), then the model as given."""
    short = Path(model.rstrip("/")).name or model
    return [short] if short == model else [short, model]


def build_vllm_command(
    python: str, model: str, port: int, *, gpu: bool, extra: Sequence[str] = ()
) -> list[str]:
    """The child's argv; ``extra`` comes last so that it overrides a default (vLLM keeps the last)."""
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        *served_names(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(GPU_ARGS if gpu else CPU_ARGS),
        *extra,
    ]


def child_environment(env: Mapping[str, str], *, gpu: bool) -> dict[str, str]:
    """The parent's environment without the gateway's own variables, plus vLLM's CPU defaults."""
    own = set(env_names())
    child = {k: v for k, v in env.items() if k not in own}
    if not gpu:
        child.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    child.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", VLLM_KEEP_ALIVE_S)
    child["PYTHONUNBUFFERED"] = "1"  # so the log's last line is current during warm-up
    return child


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(200 <= response.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a growing log file (only its tail is read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            lines = handle.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def tail_lines(path: Path, count: int = 20) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-count:]
    except OSError:
        return []


# --- the child -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: ask the kernel for SIGTERM when the launcher dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass
class VllmChild:
    """A running vLLM server: its process (leader of its own group), URL and log file."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    model: str
    serving: bool = False  # its /health has answered: it stops in order on SIGTERM

    @classmethod
    def start(
        cls, command: Sequence[str], env: Mapping[str, str], log_path: Path, model: str, port: int
    ) -> VllmChild:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle: IO[bytes] = log_path.open("ab")
        try:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            handle.close()  # the child holds its own descriptor
        return cls(process, f"http://127.0.0.1:{port}", log_path, model)

    @property
    def pid(self) -> int:
        return self.process.pid

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")

    def wait_healthy(self, deadline_s: float, progress: IO[str]) -> float:
        """Block until ``/health`` answers 200; return the seconds it took.

        Raises ``ChildDied`` if the process exits first and ``TimeoutError`` past the deadline.
        """
        started = time.monotonic()
        tty = progress.isatty()
        last_report = -1e9
        explainer = LogExplainer(self.log_path)

        def end_line() -> None:
            if tty:
                progress.write("\n")

        while True:
            elapsed = time.monotonic() - started
            code = self.process.poll()
            if code is not None:
                end_line()
                raise ChildDied(code)
            if self.healthy():
                end_line()
                self.serving = True
                return elapsed
            if elapsed > deadline_s:
                end_line()
                raise TimeoutError(f"vLLM did not become healthy within {deadline_s:.0f} s")
            for note in explainer.new_notes():
                progress.write(("\r\x1b[K" if tty else "") + f"[up] note: {note}\n")
            # One rewritten line on a terminal; a line every 10 s in a log or a CI transcript.
            if tty or elapsed - last_report >= PROGRESS_EVERY_S:
                last_report = elapsed
                width = shutil.get_terminal_size((120, 20)).columns
                text = f"[up] vLLM warming up {elapsed:5.0f}s | {last_line(self.log_path)}"
                if tty:
                    progress.write("\r\x1b[K" + text[: width - 1])
                else:
                    progress.write(text[:200] + "\n")
            progress.flush()
            time.sleep(1.0)

    def stop(self, timeout: float) -> int | None:
        """Stop vLLM; return the server process's exit code.

        A serving vLLM gets SIGTERM at its server process alone, which shuts its engine processes
        down in order; a SIGTERM to the whole group would kill the engine under the server, which
        then logs an ``EngineDeadError`` traceback. The group gets SIGTERM when the server has not
        exited after ``SERVER_ALONE_S``, or at once while vLLM is still starting (its server does
        not act on SIGTERM while it waits for its engine), and SIGKILL past ``timeout`` (past
        ``STARTING_STOP_S`` while starting: there is nothing to finish). Engine
        processes still there ``STRAGGLER_GRACE_S`` after the server has exited get SIGTERM, then
        SIGKILL.
        """
        if self.process.poll() is None:
            began = time.monotonic()
            if not self.serving:
                timeout = min(timeout, STARTING_STOP_S)
            if self.serving:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(min(SERVER_ALONE_S, timeout))
            if self.process.poll() is None:
                _signal_group(self.pid, signal.SIGTERM)
                try:
                    self.process.wait(max(0.0, timeout - (time.monotonic() - began)))
                except subprocess.TimeoutExpired:
                    log(f"vLLM (pid {self.pid}) did not stop within {timeout:g} s: killing it")
                    _signal_group(self.pid, signal.SIGKILL)
                    self.process.wait()
        if not _wait_group_gone(self.pid, STRAGGLER_GRACE_S):
            _signal_group(self.pid, signal.SIGTERM)
            if not _wait_group_gone(self.pid, STRAGGLER_GRACE_S):
                _signal_group(self.pid, signal.SIGKILL)
        return self.process.returncode


@contextlib.contextmanager
def ticking(what: str, progress: IO[str]) -> Iterator[None]:
    """A progress line for a blocking step: rewritten each second on a terminal, else every 10 s."""
    done = threading.Event()
    tty = progress.isatty()
    started = time.monotonic()

    def tick() -> None:
        interval = 1.0 if tty else PROGRESS_EVERY_S
        while not done.wait(interval):
            text = f"[up] {what} {time.monotonic() - started:5.0f}s"
            progress.write(f"\r\x1b[K{text}" if tty else f"{text}\n")
            progress.flush()

    thread = threading.Thread(target=tick, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if tty:
            progress.write("\r\x1b[K")
    progress.write(f"[up] {what}: done in {time.monotonic() - started:.0f} s\n")
    progress.flush()


class LogExplainer:
    """Reads a growing log and returns, once each, the meaning of expected-but-alarming lines."""

    def __init__(
        self,
        log_path: Path,
        table: Sequence[tuple[str, str]] = EXPECTED_DURING_WARMUP,
        offset: int = 0,
    ) -> None:
        self.log_path = log_path
        self.table = table
        self.offset = offset
        self.seen: set[str] = set()
        self.partial = b""

    def new_notes(self, final: bool = False) -> list[str]:
        """Notes for the lines written since the last call (``final``: the last line too, even
        without its newline)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read(1 << 20)
        except OSError:
            return []
        self.offset += len(chunk)
        text = (self.partial + chunk).decode("utf-8", "replace")
        lines = text.split("\n")
        self.partial = b"" if final else lines.pop().encode()  # an unfinished line waits
        notes = []
        for line in lines:
            for needle, meaning in self.table:
                if needle in line and needle not in self.seen:
                    self.seen.add(needle)
                    notes.append(f'"{needle}": {meaning}')
        return notes


def describe_exit(code: int) -> str:
    """``-9`` reads better as ``-9 (SIGKILL)``: Popen reports death by signal as minus its number."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


class ChildDied(RuntimeError):
    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"vLLM exited with code {code}")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an engine process
    orphaned by its server waits for PID 1 to reap it, which may take a while."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group_gone(pgid: int, deadline_s: float) -> bool:
    """Whether every process of the group has exited within ``deadline_s`` (polled)."""
    end = time.monotonic() + deadline_s
    while _group_alive(pgid):
        if time.monotonic() >= end:
            return False
        time.sleep(0.1)
    return True


# --- the command ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-gateway up",
        description="Start a vLLM OpenAI server as a child process and the gateway in front of it.",
    )
    # settings.add_arguments supplies --model (env VLLM_MODEL): here it names vLLM's model.
    add_arguments(parser)
    parser.add_argument(
        "--vllm-port", type=int, default=None, help="vLLM's loopback port (default: a free port)"
    )
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARGS",
        help="extra vLLM arguments, shell-split, repeatable (e.g. --vllm-arg='--enforce-eager')",
    )
    parser.add_argument(
        "--log-file", default=None, help="vLLM's log (default: <cache>/logs/vllm-<time>-<port>.log)"
    )
    parser.add_argument(
        "--vllm-startup-timeout",
        type=float,
        default=1200.0,
        help="seconds to wait for vLLM's /health (first start compiles: minutes)",
    )
    parser.add_argument(
        "--vllm-stop-timeout",
        type=float,
        default=30.0,
        help="seconds between SIGTERM and SIGKILL when stopping vLLM",
    )
    return parser


def _gateway_flags(
    args: argparse.Namespace, backend_url: str, env: Mapping[str, str]
) -> dict[str, str | None]:
    flags: dict[str, str | None] = {spec.name: getattr(args, spec.name) for spec in FIELDS}
    flags["api_keys_file"] = args.api_keys_file
    flags["backend_urls"] = backend_url
    flags["use_embedded_engine"] = "false"
    if flags.get("upstream_idle_timeout") is None and not env.get(
        "VLLM_UPSTREAM_IDLE_TIMEOUT_SECONDS"
    ):
        flags["upstream_idle_timeout"] = upstream_idle_for(env)
    return flags


def upstream_idle_for(env: Mapping[str, str]) -> str:
    """The gateway's idle timeout for its own vLLM child: below the child's keep-alive."""
    try:
        keep_alive = float(env.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE") or VLLM_KEEP_ALIVE_S)
    except ValueError:
        keep_alive = float(VLLM_KEEP_ALIVE_S)  # vLLM itself will refuse the value, loudly
    return f"{max(0.5, keep_alive * IDLE_SHARE_OF_KEEP_ALIVE):g}"


def _print_ready(settings: Settings, model: str) -> None:
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    auth = " -H 'Authorization: Bearer YOUR_KEY'" if settings.api_keys else ""
    # temperature 0: a sampled answer from a 135M model is a poor first impression.
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "temperature": 0,
            "max_tokens": 64,
            "messages": [
                {"role": "user", "content": "What is the capital of France? Answer in one word."}
            ],
        },
        separators=(",", ":"),
    )
    print(
        f"\nvllm-gateway is ready on http://{host}:{settings.port} (model {model}). Try:\n\n"
        f"  curl -N http://{host}:{settings.port}/v1/chat/completions "
        f"-H 'Content-Type: application/json'{auth} -d '{body}'\n\n"
        "Ctrl-C to stop.\n",
        flush=True,
    )


def _announce_when_ready(settings: Settings, model: str, stop: threading.Event) -> None:
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = f"http://{host if ':' not in host else f'[{host}]'}:{settings.port}/health/ready"
    while not stop.wait(0.5):
        if http_ok(url):
            _print_ready(settings, model)
            return


def _watch_child(child: VllmChild, stopping: threading.Event, died: list[int]) -> None:
    code = child.process.wait()
    if stopping.is_set():
        return
    died.append(code)
    bar = "!" * 72
    lines = "\n".join(f"    {line}" for line in tail_lines(child.log_path, 15))
    print(
        f"\n{bar}\n[up] vLLM (pid {child.pid}) DIED with exit code {describe_exit(code)}; stopping the gateway.\n"
        f"[up] last lines of {child.log_path}:\n{lines}\n{bar}",
        file=sys.stderr,
        flush=True,
    )
    # The gateway drains on SIGTERM like on a user's stop; serve() then returns.
    os.kill(os.getpid(), signal.SIGTERM)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ
    gpu = has_nvidia_gpu()
    port = args.vllm_port or free_port()
    try:  # validate the gateway's settings before minutes of warm-up, not after
        settings = load_settings(env, _gateway_flags(args, f"http://127.0.0.1:{port}", env))
    except SettingsError as exc:
        log(f"error: {exc}")
        return 2
    try:
        if settings.model:  # --model or VLLM_MODEL
            model = settings.model
        else:
            cache = model_prep.default_cache_dir(env)
            if model_prep.is_prepared(model_prep.default_model_dir(cache)):
                model = str(model_prep.default_model_dir(cache))
            else:
                log("preparing the default model (first run only, about 30 s)")
                with ticking("converting the packaged GGUF file to a bf16 folder", sys.stderr):
                    model = str(model_prep.prepare_default_model(cache))
    except model_prep.ModelPrepError as exc:
        log(f"error: {exc}")
        return 2
    extra = [part for chunk in args.vllm_arg for part in shlex.split(chunk)]
    command = build_vllm_command(sys.executable, model, port, gpu=gpu, extra=extra)
    log_path = (
        Path(args.log_file)
        if args.log_file
        else (
            model_prep.default_cache_dir(env)
            / "logs"
            / f"vllm-{time.strftime('%Y%m%d-%H%M%S')}-{port}.log"
        )
    )
    short = served_names(model)[0]

    log(f"starting vLLM ({'GPU' if gpu else 'CPU'}) for {short} on 127.0.0.1:{port}")
    log(f"vLLM's log: {log_path}")
    log("$ " + shlex.join(command))
    child = VllmChild.start(command, child_environment(env, gpu=gpu), log_path, short, port)
    atexit.register(_signal_group, child.pid, signal.SIGKILL)
    stopping = threading.Event()
    died: list[int] = []
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        try:
            took = child.wait_healthy(args.vllm_startup_timeout, sys.stderr)
        except ChildDied as exc:
            log(
                f"vLLM exited with code {describe_exit(exc.code)} before it became healthy; last lines of {log_path}:"
            )
            for line in tail_lines(log_path, 25):
                print(f"    {line}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            log(f"error: {exc}; see {log_path}")
            return 1
        except (KeyboardInterrupt, _Stop):
            log("stopped during vLLM's warm-up")
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous_term)
        log(f"vLLM is healthy after {took:.0f} s (pid {child.pid})")

        from vllm_gateway.observability.logs import configure_logging
        from vllm_gateway.runtime.serve import serve

        configure_logging(settings)
        threading.Thread(
            target=_watch_child, args=(child, stopping, died), name="vllm-watch", daemon=True
        ).start()
        threading.Thread(
            target=_announce_when_ready,
            args=(settings, short, stopping),
            name="ready-banner",
            daemon=True,
        ).start()
        # serve() drains on SIGINT/SIGTERM. uvicorn re-raises a captured signal once it has
        # stopped, and a server that installs no handlers would see it directly: either way the
        # signal surfaces here as an exception, and means "stopped on request".
        signal.signal(signal.SIGTERM, _raise_stop)
        try:
            code = serve(settings)
        except (KeyboardInterrupt, _Stop):
            code = 0
        stopping.set()
        if died:
            log(f"exiting because vLLM died (exit code {describe_exit(died[0])})")
            return 1
        return code
    finally:
        stopping.set()
        _stop_child(child, args.vllm_stop_timeout)


def _stop_child(child: VllmChild, timeout: float) -> None:
    """Stop vLLM and say how it ended: the launcher's last line."""
    if child.process.poll() is not None:  # it died: said where that was noticed
        child.stop(timeout)  # its engine processes, if any are left
        return
    log(f"stopping vLLM (pid {child.pid}; SIGKILL after {timeout:g} s)")
    target = "its server" if child.serving else "its process group (still starting)"
    mark = _annotate(child.log_path, f"stopping vLLM on request: SIGTERM to {target}")
    began = time.monotonic()
    code = child.stop(timeout)
    took = time.monotonic() - began
    shown = describe_exit(code) if code is not None else "unknown"
    # What vLLM printed while it stopped, explained where it is read: in its own log.
    notes = LogExplainer(child.log_path, EXPECTED_AT_EXIT, offset=mark).new_notes(final=True)
    for note in notes:
        _annotate(child.log_path, f"note: {note}")
    _annotate(child.log_path, f"vLLM stopped (exit code {shown}, {took:.1f} s)")
    log(f"vLLM stopped (exit code {shown}, {took:.1f} s); its log: {child.log_path}")


def _annotate(log_path: Path, text: str) -> int:
    """Append a line of the launcher's own to vLLM's log; return the log's size before it."""
    try:
        with log_path.open("ab") as handle:
            size = handle.tell()
            handle.write(f"[vllm-gateway up] {text}\n".encode())
            return size
    except OSError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
