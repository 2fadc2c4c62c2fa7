"""``vllm-gateway up``: start vLLM's OpenAI server as a child process, then the gateway in front of it.

The sequence: read the flags and validate the gateway's settings, check that the ports are free
and settle vLLM's model and log (``preflight``), all before minutes of warm-up rather than after;
start vLLM (``vllm_process``) with its command line and environment (``vllm_command``); wait for
its ``/health`` while showing progress (``warmup``); then run the gateway in this process
(``serve``) with its backend pointing at the child. When the gateway returns (SIGINT/SIGTERM,
which it handles by draining), vLLM is stopped and the launcher's last line says how it ended
(``report``).

Invariants:
- No orphan vLLM: whatever ends this function, vLLM is stopped in ``finally``, and its group is
  killed at exit (``atexit``) as well.
- If vLLM dies while the gateway runs, that is said loudly with its exit code, the gateway is
  stopped (it drains, answering 502 meanwhile) and the launcher exits non-zero.
- Only ``main`` reads ``os.environ`` and chooses the exit status; the parts take what they need.
"""

from __future__ import annotations

import atexit
import os
import shlex
import signal
import sys
import threading
import time

from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.runtime.up import preflight
from vllm_gateway.runtime.up.arguments import gateway_flags, parse_arguments
from vllm_gateway.runtime.up.console import describe_exit, log
from vllm_gateway.runtime.up.report import announce_when_ready, stop_and_report, watch_for_death
from vllm_gateway.runtime.up.vllm_command import (
    build_vllm_command,
    child_environment,
    has_nvidia_gpu,
    served_names,
)
from vllm_gateway.runtime.up.vllm_log import tail_lines
from vllm_gateway.runtime.up.vllm_process import ChildDied, VllmChild, signal_group
from vllm_gateway.runtime.up.warmup import wait_healthy
from vllm_gateway.settings import SettingsError, load_settings

__all__ = ["main"]


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    env = os.environ
    gpu = has_nvidia_gpu()
    port = args.vllm_port or preflight.free_port()
    try:  # validate the gateway's settings before minutes of warm-up, not after
        settings = load_settings(env, gateway_flags(args, f"http://127.0.0.1:{port}", env))
    except SettingsError as exc:
        log(f"error: {exc}")
        return 2
    problems = preflight.port_problems(settings.host, settings.port, args.vllm_port)
    for problem in problems:
        log(f"error: {problem}")
    if problems:
        return 2
    try:
        model = preflight.model_to_serve(settings.model, model_prep.default_cache_dir(env))
    except model_prep.ModelPrepError as exc:
        log(f"error: {exc}")
        return 2
    command = build_vllm_command(sys.executable, model, port, gpu=gpu, extra=args.vllm_args)
    log_path = preflight.log_path_for(args.log_file, env, port, time.strftime("%Y%m%d-%H%M%S"))
    short = served_names(model)[0]

    log(f"starting vLLM ({'GPU' if gpu else 'CPU'}) for {short} on 127.0.0.1:{port}")
    log(f"vLLM's log: {log_path}")
    log("$ " + shlex.join(command))
    child = VllmChild.start(command, child_environment(env, gpu=gpu), log_path, short, port)
    atexit.register(signal_group, child.pid, signal.SIGKILL)
    stopping = threading.Event()
    died: list[int] = []
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        try:
            took = wait_healthy(child, args.startup_timeout, sys.stderr)
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
            target=watch_for_death, args=(child, stopping, died), name="vllm-watch", daemon=True
        ).start()
        threading.Thread(
            target=announce_when_ready,
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
        stop_and_report(child, args.stop_timeout)


if __name__ == "__main__":
    sys.exit(main())
