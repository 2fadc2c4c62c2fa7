"""Which ASGI server (and which upstream client) should serve the gateway? Gateway CPU, measured.

The same app (``create_app(Settings(...))``) served by:

- ``uvicorn``: the project's own ``server.serve`` (uvicorn, httptools + uvloop when installed);
- ``granian``: granian's ASGI interface, one worker, single-threaded runtime, uvloop;

each with either backend client: ``aiohttp`` (``HTTPBackend``) or ``upstream`` (``FastHTTPBackend``).
The gateway (all its processes) is pinned to one core, the simulator and the load generator
(``python -m vllm_gateway.bench``) to the other. The figure is the CPU time (user + sys, summed over
the gateway's process tree from /proc) per SSE event and per non-streamed request, as counted by the
simulator, with the candidates alternated in rounds; the median over rounds is reported.

    python scripts/compare_servers.py --rounds 3
    python scripts/compare_servers.py --check-disconnect   # does a client leaving abort upstream?

As the bench rig's gateway (added TTFT of one stream, with either client):

    python -m vllm_gateway.bench --scenario single --gateway-cmd \
      "python scripts/compare_servers.py --serve uvicorn --client upstream --backend {backend} --port {port}"

Internal modes (how this script starts the gateway): ``--serve uvicorn|granian --client ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from vllm_gateway.simulator import loopback_command

HERE = Path(__file__).resolve().parent
PY = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")


def make_app() -> Any:
    """The gateway app, configured from GW_BACKEND / GW_CLIENT (granian's factory target)."""
    from vllm_gateway.app import create_app
    from vllm_gateway.settings import Settings

    url = os.environ["GW_BACKEND"]
    settings = Settings().replace(
        backend_urls=(url,), max_concurrent_requests=2000, max_queued_requests=2000
    )
    backend = None
    if os.environ.get("GW_CLIENT") == "upstream":
        from vllm_gateway.upstream import FastHTTPBackend

        backend = FastHTTPBackend(url, connect_timeout=settings.connect_timeout)
    return create_app(settings, backend)


def serve_uvicorn(port: int) -> int:
    from vllm_gateway.server import GatewayServer, uvicorn_config

    app = make_app()
    settings = app.gateway.settings.replace(host="127.0.0.1", port=port)
    server = GatewayServer(uvicorn_config(app, settings), app)
    server.run()
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and all its descendants (alive ones)."""
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def start_gateway(
    server: str, client: str, backend: str, core: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "GW_BACKEND": backend, "GW_CLIENT": client}
    if server == "uvicorn":
        cmd = [PY, str(HERE / "compare_servers.py"), "--serve", "uvicorn", "--port", str(port)]
    else:
        cmd = [
            PY,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--factory",
            "--working-dir",
            str(HERE),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--runtime-mode",
            "st",
            "--runtime-threads",
            "1",
            "--no-ws",
            "--no-access-log",
            "--log-level",
            "warning",
            "compare_servers:make_app",
        ]
    proc = subprocess.Popen(["taskset", "-c", core, *cmd], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"{server}/{client} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sim_call(sim: str, path: str, method: str = "GET", body: bytes = b"{}") -> dict[str, Any]:
    req = urllib.request.Request(sim + path, method=method, data=body if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def bench(url: str, core: str, stream: bool, args: argparse.Namespace) -> None:
    n = args.num_requests if stream else args.nonstream_requests
    conc = args.concurrency if stream else args.nonstream_concurrency
    cmd = [
        "taskset",
        "-c",
        core,
        PY,
        "-m",
        "vllm_gateway.bench",
        "--targets",
        f"gw={url}",
        "--concurrency",
        str(conc),
        "--num-requests",
        str(n),
        "--max-tokens",
        str(args.max_tokens if stream else 16),
        "--rounds",
        "1",
        "--no-warmup",
        "--stream" if stream else "--no-stream",
        "--out",
        str(args.out / "bench"),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(server: str, client: str, sim: str, args: argparse.Namespace) -> dict[str, float]:
    proc, url = start_gateway(server, client, sim, args.gateway_core)
    try:
        out: dict[str, float] = {}
        for stream in (True, False):
            # Streams at the set pace; non-streamed answers at once, so the gateway is what limits.
            itl = float(args.itl) if stream else 0.0
            sim_call(sim, "/sim/config", "POST", json.dumps({"itl": itl}).encode())
            sim_call(sim, "/sim/reset", "POST")
            c0, w0 = tree_cpu(proc.pid), time.perf_counter()
            bench(url, args.load_core, stream, args)
            c, w = tree_cpu(proc.pid) - c0, time.perf_counter() - w0
            stats = sim_call(sim, "/sim/stats")
            if stream:
                out["cpu_us_per_chunk"] = c / max(1, stats["chunks"]) * 1e6
                out["chunks_per_s"] = stats["chunks"] / w
                out["stream_errors"] = stats["total"] - stats["completed"]
            else:
                out["cpu_us_per_request"] = c / max(1, stats["completed"]) * 1e6
                out["requests_per_s"] = stats["completed"] / w
                out["nonstream_errors"] = stats["total"] - stats["completed"]
        return out
    finally:
        stop(proc)


def check_disconnect(server: str, client: str, sim: str, args: argparse.Namespace) -> str:
    """Open a stream through the gateway, read one event, close: does the simulator see an abort?"""
    proc, url = start_gateway(server, client, sim, args.gateway_core)
    try:
        sim_call(sim, "/sim/reset", "POST")
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps(
            {
                "model": "sim-model",
                "stream": True,
                "max_tokens": 500,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            got = s.recv(65536)
            assert b"200" in got.split(b"\r\n")[0], got[:200]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            if sim_call(sim, "/sim/stats")["aborted"] == 1:
                return f"aborted upstream {1000 * (time.monotonic() - t0):.0f} ms after the close"
            time.sleep(0.02)
        return "NOT aborted within 5 s"
    finally:
        stop(proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", choices=("uvicorn",), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--client", choices=("aiohttp", "upstream"), help=argparse.SUPPRESS)
    p.add_argument("--servers", nargs="+", default=["uvicorn", "granian"])
    p.add_argument("--clients", nargs="+", default=["aiohttp", "upstream"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--nonstream-requests", type=int, default=3000)
    p.add_argument("--nonstream-concurrency", type=int, default=32)
    p.add_argument("--itl", default="0.01")
    p.add_argument("--gateway-core", default="0")
    p.add_argument("--load-core", default="1")
    p.add_argument("--check-disconnect", action="store_true")
    p.add_argument("--out", type=Path, default=Path("/tmp/compare-servers"))
    p.add_argument("--json")
    args = p.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so the gateway and simulator children are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.serve == "uvicorn":
        # Also usable as the bench rig's --gateway-cmd (--backend {backend} --port {port}).
        if args.backend:
            os.environ["GW_BACKEND"] = args.backend
        if args.client:
            os.environ["GW_CLIENT"] = args.client
        return serve_uvicorn(args.port)

    sim_proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            args.load_core,
            *loopback_command(0, "--ttft", "0", "--itl", args.itl, python=PY),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sim_proc.stdout is not None
    m = re.search(r"(http://\S+)", sim_proc.stdout.readline())
    assert m, "simulator did not start"
    sim = m.group(1)
    combos = [(s, c) for s in args.servers for c in args.clients]
    try:
        if args.check_disconnect:
            for s, c in combos:
                print(f"{s:8s} {c:9s} {check_disconnect(s, c, sim, args)}", flush=True)
            return 0
        runs: dict[str, list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for s, c in combos:
                r = measure(s, c, sim, args)
                runs.setdefault(f"{s}+{c}", []).append(r)
                print(
                    f"round {rnd + 1} {s}+{c}: " + "  ".join(f"{k}={v:.1f}" for k, v in r.items()),
                    file=sys.stderr,
                    flush=True,
                )
            combos = combos[1:] + combos[:1]
    finally:
        sim_proc.terminate()
        sim_proc.wait(10)
    print(f"gateway CPU (its process tree), median of {args.rounds} rounds")
    summary = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    for k, v in summary.items():
        print(f"{k:18s} " + "  ".join(f"{m}={x:.1f}" for m, x in v.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
