"""Soak test: the gateway's promise under long, mixed, hostile traffic (reliability case R14).

``python -m vllm_gateway_tools.soak --duration 180`` starts the simulator and the gateway as child
processes on loopback, then runs about 90% of the gateway's concurrency limit worth of clients for
the duration: streamed and plain requests, some with fault knobs (stall, drop, hang, malformed
output, 500s), some abandoned by their client at a random moment, while the backend is killed
(SIGKILL) and restarted on the same port every ``--restart-every`` seconds.

Every response is judged by ``judge``: it must end in one of the four ways the gateway promises
(docs/reliability.md). Anything else (a hang past the configured bound, a bare reset, a truncated
200, ``[DONE]`` after an error, a stream with neither) is a broken promise. When traffic stops the
gateway must settle to zero in flight and zero queued, and the simulator to zero running. RSS, open
file descriptors (from /proc) and, where the gateway reports it, its asyncio task count are sampled
after a warm-up and at the end. A JSON report is written; the exit status is 1 if a promise broke
or the gateway did not settle.

The judge and ``SimulatorProcess`` are also used by the integration tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from vllm_gateway.proxy.sse import EventScanner, split_events
from vllm_gateway_tools.simulator import loopback_command

__all__ = ["ENDINGS", "SimulatorProcess", "judge", "main"]

# The four ways a request may end; anything else is a defect.
ENDINGS = ("json_200", "stream_done", "error_json", "stream_error")


def _events(body: bytes) -> list[bytes] | None:
    """The data payloads of an SSE body, or None when it does not end on an event boundary."""
    scanner = EventScanner(max_event_bytes=len(body) + 1)
    block = scanner.feed(body)
    if scanner.pending.strip():
        return None
    out = []
    for event in split_events(block):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out


def judge(status: int, headers: dict[str, str], body: bytes) -> tuple[str, str | None]:
    """Which promised ending a complete response is, and the defect if it is none of them.

    ``headers`` have lower-case names. Returns ``(ending, None)`` or ``("defect", reason)``.
    """
    ctype = headers.get("content-type", "")
    if status == 200 and ctype.startswith("text/event-stream"):
        events = _events(body)
        if events is None:
            return "defect", "stream cut in the middle of an event"
        if not events:
            return "defect", "empty stream"
        parsed: list[Any] = []
        for data in events:
            if data == b"[DONE]":
                parsed.append("[DONE]")
                continue
            try:
                parsed.append(orjson.loads(data))
            except orjson.JSONDecodeError:
                return "defect", "non-JSON event relayed"
        errors = [i for i, p in enumerate(parsed) if isinstance(p, dict) and "error" in p]
        if parsed[-1] == "[DONE]":
            if errors or parsed.count("[DONE]") != 1:
                return "defect", "[DONE] after an error or more than once"
            finishes = [
                c.get("finish_reason")
                for p in parsed[:-1]
                if isinstance(p, dict)
                for c in p.get("choices") or []
                if isinstance(c, dict)
            ]
            if not finishes or finishes[-1] is None:
                return "defect", "[DONE] without a finish_reason before it"
            return "stream_done", None
        if errors == [len(parsed) - 1] and "[DONE]" not in parsed:
            err = parsed[-1]["error"]
            if isinstance(err, dict) and {"message", "type", "code"} <= err.keys():
                return "stream_error", None
            return "defect", "error event without message/type/code"
        return "defect", "stream ended with neither [DONE] nor an error event"
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "defect", f"status {status} with a body that is not JSON"
    if not isinstance(obj, dict):
        return "defect", f"status {status} with a JSON body that is not an object"
    if status == 200:
        if "error" in obj or not obj.get("choices"):
            return "defect", "200 without choices"
        return "json_200", None
    if status < 400:
        return "defect", f"unexpected status {status}"
    err = obj.get("error")
    if not isinstance(err, dict) or not {"message", "type", "code"} <= err.keys():
        return "defect", f"status {status} without an OpenAI-shaped error"
    if not (headers.get("x-request-id") or err.get("request_id")):
        return "defect", f"status {status} without a request id"
    return "error_json", None


# --- child processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SimulatorProcess:
    """``python -m vllm_gateway_tools.simulator`` on a fixed port, so that it can be killed and restarted."""

    def __init__(self, *args: str, port: int | None = None, log_path: Path | None = None) -> None:
        self.args = args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            loopback_command(self.port, "--loop", "asyncio", *self.args),
            stdout=subprocess.PIPE,
            stderr=log,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the port may be in TIME_WAIT from the last run
            line = self.process.stdout.readline()
            if b"listening on" in line:
                return
            if self.process.poll() is not None:
                if time.monotonic() + 0.5 < deadline:
                    self._close_pipe()
                    time.sleep(0.2)
                    self.process = subprocess.Popen(
                        self.process.args, stdout=subprocess.PIPE, stderr=log
                    )
                    assert self.process.stdout is not None
                    continue
                break
        raise RuntimeError(f"simulator did not start on port {self.port}")

    def _close_pipe(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_pipe()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_pipe()

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def proc_sample(pid: int) -> dict[str, Any]:
    """RSS (KiB) and open file descriptors of a process, from /proc."""
    rss = None
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return {"rss_kib": rss, "fds": fds}


# --- traffic --------------------------------------------------------------------------------

FAULTS: list[tuple[float, dict[str, Any] | None]] = [
    (0.70, None),
    (0.05, {"stall_after": 3}),
    (0.05, {"drop_after": 4}),
    (0.03, {"hang": True}),
    (0.04, {"malformed": "bad_json"}),
    (0.03, {"malformed": "no_done"}),
    (0.03, {"malformed": "html"}),
    (0.04, {"status": 500}),
    (0.03, {"error_traceback": True}),
]


@dataclass
class Tally:
    endings: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    defects: list[dict[str, Any]] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    def defect(self, reason: str, **detail: Any) -> None:
        if len(self.defects) < 200:
            self.defects.append({"reason": reason, **detail})
        self.endings["defect"] += 1


async def one_request(
    http: Any, url: str, rng: random.Random, tally: Tally, bound: float, faults: bool = True
) -> None:
    import httpx

    stream = rng.random() < 0.7
    fault = rng.choices([f for _, f in FAULTS], [w for w, _ in FAULTS])[0] if faults else None
    body: dict[str, Any] = {
        "model": "sim-model",
        "stream": stream,
        "max_tokens": rng.randint(4, 40),
        "messages": [{"role": "user", "content": "soak"}],
    }
    if fault:
        body["vllm_sim"] = fault
    path = "/v1/chat/completions"
    if rng.random() < 0.2:
        path = "/v1/completions"
        body.pop("messages")
        body["prompt"] = "soak"
    leave_at = rng.uniform(0.0, 0.6) if rng.random() < 0.15 else None

    async def run() -> None:
        async with http.stream("POST", url + path, json=body) as resp:
            data = b"".join([c async for c in resp.aiter_raw()])
            tally.statuses[resp.status_code] += 1
            ending, reason = judge(resp.status_code, dict(resp.headers), data)
            if reason:
                tally.defect(
                    reason,
                    status=resp.status_code,
                    fault=fault,
                    body=data[-300:].decode("utf-8", "replace"),
                )
            else:
                tally.endings[ending] += 1

    task = asyncio.ensure_future(run())
    try:
        if leave_at is not None:
            done, _ = await asyncio.wait({task}, timeout=leave_at)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                tally.disconnects += 1
                return
        async with asyncio.timeout(bound):
            await task
    except TimeoutError:
        tally.defect("no ending within the configured bound (hang)", fault=fault, stream=stream)
    except httpx.HTTPError as exc:
        tally.defect(f"transport error: {type(exc).__name__}", fault=fault, stream=stream)


async def _metric(http: Any, url: str, name: str) -> float | None:
    try:
        text = (await http.get(url + "/metrics")).text
    except Exception:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def _tasks(http: Any, url: str) -> int | None:
    try:
        data = (await http.get(url + "/status/data")).json()
    except Exception:
        return None
    live = data.get("live") if isinstance(data, dict) else None
    value = live.get("tasks") if isinstance(live, dict) else None
    return int(value) if isinstance(value, (int, float)) else None


def _start_gateway(port: int, env: dict[str, str], verbose: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vllm_gateway", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=None if verbose else subprocess.DEVNULL,
    )


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    rng = random.Random(args.seed)
    c = args.concurrency
    timeouts = {"queue": 2.0, "first": 2.0, "idle": 1.0, "request": 8.0, "connect": 1.0}
    bound = timeouts["queue"] + timeouts["request"] + timeouts["connect"] + 5.0
    # One backend, or a pool of them (each restarted in turn; no per-request faults, so that
    # every stream the gateway fails to finish is one a member's death broke).
    sims = [
        SimulatorProcess("--ttft", "0.05", "--itl", "0.02", "--tokens", "20")
        for _ in range(max(1, args.pool))
    ]
    for sim in sims:
        sim.start()
    sim = sims[0]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(
        {
            "VLLM_BACKEND_URL": ",".join(s.url for s in sims),
            "VLLM_POOL_HEALTH_INTERVAL_SECONDS": "0.5",
            "VLLM_MAX_CONCURRENT_REQUESTS": str(c),
            "VLLM_MAX_QUEUED_REQUESTS": str(c),
            "VLLM_QUEUE_WAIT_TIMEOUT_SECONDS": str(timeouts["queue"]),
            "VLLM_FIRST_TOKEN_TIMEOUT_SECONDS": str(timeouts["first"]),
            "VLLM_STREAM_IDLE_TIMEOUT_SECONDS": str(timeouts["idle"]),
            "VLLM_REQUEST_TIMEOUT_SECONDS": str(timeouts["request"]),
            "VLLM_CONNECT_TIMEOUT_SECONDS": str(timeouts["connect"]),
            "VLLM_SHUTDOWN_TIMEOUT_SECONDS": "5",
            "VLLM_LOG_LEVEL": "error",
        }
    )
    gw = _start_gateway(port, env, args.verbose)
    url = f"http://127.0.0.1:{port}"
    tally = Tally()
    report: dict[str, Any] = {
        "duration_s": args.duration,
        "concurrency": c,
        "clients": max(1, round(c * args.load)),
        "seed": args.seed,
        "timeouts": timeouts,
        "restarts": 0,
    }
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=c * 2)
    try:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(bound, connect=5), limits=limits
        ) as http:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url + "/health/live")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the gateway did not start")
            end = time.monotonic() + args.duration
            start_sample: dict[str, Any] = {}

            async def client() -> None:
                while time.monotonic() < end:
                    await one_request(http, url, rng, tally, bound, faults=args.pool < 2)

            async def restarts() -> None:
                while time.monotonic() + args.restart_every < end:
                    await asyncio.sleep(args.restart_every)
                    victim = sims[report["restarts"] % len(sims)]
                    victim.kill()
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(victim.start)
                    report["restarts"] += 1

            async def warm_sample() -> None:
                await asyncio.sleep(min(5.0, args.duration / 4))
                start_sample.update(proc_sample(gw.pid), tasks=await _tasks(http, url))

            jobs = [asyncio.create_task(client()) for _ in range(report["clients"])]
            jobs += [asyncio.create_task(restarts()), asyncio.create_task(warm_sample())]
            await asyncio.gather(*jobs)
            # Settle: nothing of ours may stay in flight, queued, or running on the backend.
            settled = False
            for _ in range(100):
                in_flight = await _metric(http, url, "vllm_gateway_requests_in_flight")
                queued = await _metric(http, url, "vllm_gateway_queue_depth")
                running = 0
                for s in sims:
                    running += (await http.get(s.url + "/sim/stats")).json()["running"]
                if in_flight == 0 and queued == 0 and running == 0:
                    settled = True
                    break
                await asyncio.sleep(0.1)
            after = await http.post(
                url + "/v1/chat/completions",
                json={
                    "model": "sim-model",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 4,
                },
            )
            text = (await http.get(url + "/metrics")).text
            failovers = {
                line.split("{", 1)[1].rsplit("}", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("vllm_gateway_failovers_total{")
            }
            report.update(
                failovers=failovers,
                settled=settled,
                in_flight=in_flight,
                queued=queued,
                backend_running=running,
                after_status=after.status_code,
                start=start_sample,
                end={**proc_sample(gw.pid), "tasks": await _tasks(http, url)},
            )
    finally:
        if gw.poll() is None:
            gw.send_signal(signal.SIGTERM)
            try:
                report["gateway_exit"] = gw.wait(15)
            except subprocess.TimeoutExpired:
                gw.kill()
                report["gateway_exit"] = gw.wait(5)
        for s in sims:
            s.stop()
    report.update(
        endings=dict(tally.endings),
        disconnects=tally.disconnects,
        statuses={str(k): v for k, v in sorted(tally.statuses.items())},
        requests=sum(tally.endings.values()) + tally.disconnects,
        broken_promises=tally.endings.get("defect", 0),
        defects=tally.defects[:50],
    )
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vllm_gateway_tools.soak", description=__doc__.split("\n")[0]
    )
    p.add_argument("--duration", type=float, default=180.0, help="seconds of traffic (default 180)")
    p.add_argument("--concurrency", type=int, default=16, help="the gateway's concurrency limit C")
    p.add_argument("--load", type=float, default=0.9, help="clients as a fraction of C")
    p.add_argument(
        "--restart-every", type=float, default=40.0, help="seconds between backend kills"
    )
    p.add_argument(
        "--pool",
        type=int,
        default=1,
        help="backends: with 2 or more, a pool whose members are restarted in turn, and no "
        "per-request faults (every broken stream is one a member's death broke)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="soak-report.json", help="where the JSON report goes")
    p.add_argument("--verbose", action="store_true", help="show the gateway's log")
    args = p.parse_args(argv)
    report = asyncio.run(soak(args))
    Path(args.out).write_text(json.dumps(report, indent=2))
    ok = (
        report["broken_promises"] == 0
        and report.get("settled")
        and report.get("after_status") == 200
    )
    s, e = report.get("start", {}), report.get("end", {})
    print(
        f"soak: {report['requests']} requests in {args.duration:.0f} s, "
        f"{report['disconnects']} abandoned by the client, {report['restarts']} backend restarts"
    )
    print(f"endings: {report['endings']}  statuses: {report['statuses']}")
    print(f"settled: {report.get('settled')}  broken promises: {report['broken_promises']}")
    if args.pool > 1:
        print(
            f"streams ended by an error event: {report['endings'].get('stream_error', 0)}  "
            f"failovers: {report.get('failovers')}"
        )
    print(
        f"gateway RSS {s.get('rss_kib')} -> {e.get('rss_kib')} KiB, fds {s.get('fds')} -> "
        f"{e.get('fds')}, tasks {s.get('tasks')} -> {e.get('tasks')}; exit {report.get('gateway_exit')}"
    )
    print(f"report: {args.out}  verdict: {'OK' if ok else 'BROKEN'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
