"""What ``up`` tells its user about vLLM and the gateway once vLLM has started: that the gateway
is ready (with a curl line that works), that vLLM died, and how vLLM ended when it was stopped.

Invariants:
- A stop on request ends with one line, the launcher's last: ``[up] vLLM stopped (exit code N,
  T s); its log: PATH``. vLLM's log gets the same line, after a mark where the stop began and a
  note beside each line its shutdown printed that reads like trouble and is not.
- A vLLM that dies while the gateway runs is said loudly, with its exit code and its log's last
  lines, and the gateway is asked to stop (SIGTERM to this process: it drains as on a user's stop).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

from vllm_gateway.runtime.up.console import describe_exit, log
from vllm_gateway.runtime.up.vllm_log import EXPECTED_AT_EXIT, LogExplainer, annotate, tail_lines
from vllm_gateway.runtime.up.vllm_process import VllmChild
from vllm_gateway.runtime.up.warmup import http_ok
from vllm_gateway.settings import Settings

__all__ = ["announce_when_ready", "stop_and_report", "watch_for_death"]


def _client_host(settings: Settings) -> str:
    """The address a local client uses to reach the gateway (a wildcard bind is loopback)."""
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def print_ready(settings: Settings, model: str) -> None:
    host = _client_host(settings)
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


def announce_when_ready(settings: Settings, model: str, stop: threading.Event) -> None:
    """A thread's body: print the ready banner once the gateway's readiness answers 200."""
    url = f"http://{_client_host(settings)}:{settings.port}/health/ready"
    while not stop.wait(0.5):
        if http_ok(url):
            print_ready(settings, model)
            return


def watch_for_death(child: VllmChild, stopping: threading.Event, died: list[int]) -> None:
    """A thread's body: if vLLM exits while nobody asked it to, say so and stop the gateway."""
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


def stop_and_report(child: VllmChild, timeout: float) -> None:
    """Stop vLLM and say how it ended: the launcher's last line."""
    if child.process.poll() is not None:  # it died: said where that was noticed
        child.stop(timeout)  # its engine processes, if any are left
        return
    log(f"stopping vLLM (pid {child.pid}; SIGKILL after {timeout:g} s)")
    target = "its server" if child.serving else "its process group (still starting)"
    mark = annotate(child.log_path, f"stopping vLLM on request: SIGTERM to {target}")
    began = time.monotonic()
    code = child.stop(timeout)
    took = time.monotonic() - began
    shown = describe_exit(code) if code is not None else "unknown"
    # What vLLM printed while it stopped, explained where it is read: in its own log.
    notes = LogExplainer(child.log_path, EXPECTED_AT_EXIT, offset=mark).new_notes(final=True)
    for note in notes:
        annotate(child.log_path, f"note: {note}")
    annotate(child.log_path, f"vLLM stopped (exit code {shown}, {took:.1f} s)")
    log(f"vLLM stopped (exit code {shown}, {took:.1f} s); its log: {child.log_path}")
