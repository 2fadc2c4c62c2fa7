"""The ``rollout`` scenario: a rolling restart and a member's death, side by side for this gateway,
vllm-router in front of the same kind of members, and a direct connection through a client-side
round-robin list.

Two parts per target, each on members of its own (simulator processes, the same pace):

- ``rolling restart``: three members; steady load (streams and non-streamed requests, each worker
  sending one after the other) for ``--duration`` seconds at least, while every member is
  restarted in turn as an operator does it (``bench/rollout.py``). The member leaves (the gateway:
  ``POST /admin/backends/drain``; vllm-router: ``POST /remove_worker``; the client: its list no
  longer names it), holds nothing or reaches the drain deadline (the gateway's
  ``VLLM_POOL_DRAIN_TIMEOUT_SECONDS``, the same wait for the others), is SIGKILLed, starts again on
  its port and comes back (``/undrain``, ``/add_worker``, the list names it again).
- ``kill one of two``: two members, ``--kill-streams`` streams at once; once each has 8 chunks,
  one member is SIGKILLed.

Each target runs with its defaults but for the drain deadline (the gateway) and its members. The
client tries the next member once when a connection is refused, as the OpenAI SDKs retry a
connection error; vllm-router retries as it does by default. Per part: requests, failed
(non-streamed requests not answered with the unbroken text), broken streams (no end marker, an
error event, or text other than the unbroken greedy text), the streams that moved and their pause
at the move (p50/max, ms). vllm-router's column is left out, with a note, when its binary
(``--router-bin``, ``$VLLM_ROUTER_BIN`` or ``vllm-router`` on ``PATH``) is absent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from vllm_gateway_tools.bench.rig import RigError, free_port, probe_ready
from vllm_gateway_tools.bench.rollout import (
    Load,
    kill_one_of_two,
    pauses,
    roll,
    summary,
    unbroken_text,
)
from vllm_gateway_tools.bench.runner import progress
from vllm_gateway_tools.soak import SimulatorProcess

__all__ = ["PRESET", "RolloutPreset", "markdown", "run"]

MODEL = "sim-model"
ADMIN_KEY = "rollout-admin"
TARGETS = ("vllm-gateway", "vllm-router", "direct (round-robin)")


@dataclass(frozen=True, slots=True)
class RolloutPreset:
    members: int = 3
    pace: float = 0.02  # the members' time to first token and between tokens (s)
    duration: float = 40.0  # the rolling restart's load lasts this long at least (s)
    streams: int = 8
    posts: int = 4
    stream_tokens: int = 300  # 6 s a stream: longer than the drain deadline
    post_tokens: int = 8
    drain_deadline: float = 2.0
    kill_streams: int = 64
    kill_tokens: int = 256
    quick: dict[str, Any] | None = None

    def sized(self, quick: bool) -> RolloutPreset:
        return replace(self, **(self.quick or {}), quick=None) if quick else self


PRESET = RolloutPreset(quick={"duration": 10.0, "streams": 4, "posts": 2, "kill_streams": 16})


def router_bin(flag: str | None) -> str | None:
    """vllm-router's binary: the flag, ``$VLLM_ROUTER_BIN`` or ``vllm-router`` on ``PATH``."""
    path = flag or os.environ.get("VLLM_ROUTER_BIN") or shutil.which("vllm-router")
    return path if path and os.access(path, os.X_OK) else None


@contextlib.asynccontextmanager
async def _members(n: int, pace: float, logs: Path | None) -> AsyncIterator[list[SimulatorProcess]]:
    # "--tokens": each answer's end of text lies past every budget, so a continuation (which
    # ends at that end of text) and the unbroken answer (max_tokens long) agree.
    knobs = ("--ttft", str(pace), "--itl", str(pace), "--tokens", "4096")
    sims = [
        SimulatorProcess(*knobs, log_path=logs / f"member-{i}.log" if logs else None)
        for i in range(n)
    ]
    try:
        for s in sims:
            await asyncio.to_thread(s.start, 30.0)
        yield sims
    finally:
        for s in sims:
            await asyncio.to_thread(s.stop)


def _spawn(cmd: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen[bytes]:
    """``cmd`` with its output appended to ``log`` (dropped without one)."""
    if log is None:
        out: Any = subprocess.DEVNULL
        return subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **env})
    with open(log, "ab") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})


@contextlib.asynccontextmanager
async def _proxy(
    cmd: list[str], port: int, ready: str, env: dict[str, str], log: Path | None
) -> AsyncIterator[str]:
    proc = await asyncio.to_thread(_spawn, cmd, env, log)
    try:
        deadline = time.monotonic() + 60
        while not await probe_ready(port, ready):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RigError(f"{cmd[0]} did not get ready on port {port} (exit {proc.poll()})")
            await asyncio.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)


Ops = tuple[Callable[[str], Awaitable[None]], Callable[[str], Awaitable[None]]]


@contextlib.asynccontextmanager
async def _target(
    name: str, urls: list[str], p: RolloutPreset, router: str | None, logs: Path | None
) -> AsyncIterator[tuple[list[str], Callable[[Load], Ops], bool]]:
    """The URL(s) the load uses, how an operator takes a member out and back, and whether the
    load names its requests (a gateway names them itself)."""
    port = free_port()
    log = logs / f"{name.split()[0]}-{port}.log" if logs else None
    if name == "vllm-gateway":
        cmd = [
            sys.executable, "-m", "vllm_gateway.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--backend-url", ",".join(urls),
            "--admin-api-keys", ADMIN_KEY, "--log-level", "warning",
        ]  # fmt: skip
        env = {"VLLM_POOL_DRAIN_TIMEOUT_SECONDS": str(p.drain_deadline)}
        async with (
            _proxy(cmd, port, "/health/ready", env, log) as url,
            httpx.AsyncClient(timeout=10) as admin,
        ):
            auth = {"Authorization": f"Bearer {ADMIN_KEY}"}

            def ops(load: Load) -> Ops:
                async def leave(member: str) -> None:
                    r = await admin.post(f"{url}/admin/backends/drain", headers=auth,
                                         json={"url": member})  # fmt: skip
                    r.raise_for_status()

                async def join(member: str) -> None:
                    r = await admin.post(f"{url}/admin/backends/undrain", headers=auth,
                                         json={"url": member})  # fmt: skip
                    r.raise_for_status()

                return leave, join

            yield [url], ops, False
    elif name == "vllm-router":
        assert router is not None
        cmd = [router, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
               "--policy", "round_robin", "--log-level", "warning",
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]  # fmt: skip
        async with (
            _proxy(cmd, port, "/health", {}, log) as url,
            httpx.AsyncClient(timeout=10) as admin,
        ):

            def ops(load: Load) -> Ops:
                async def leave(member: str) -> None:
                    r = await admin.post(f"{url}/remove_worker", params={"url": member})
                    r.raise_for_status()

                async def join(member: str) -> None:
                    r = await admin.post(f"{url}/add_worker", params={"url": member})
                    r.raise_for_status()

                return leave, join

            yield [url], ops, True
    else:

        def ops(load: Load) -> Ops:
            async def leave(member: str) -> None:
                load.remove(member)

            async def join(member: str) -> None:
                load.add(member)

            return leave, join

        yield list(urls), ops, True


async def _rolling(
    name: str, p: RolloutPreset, router: str | None, logs: Path | None
) -> dict[str, Any]:
    async with _members(p.members, p.pace, logs) as sims:
        urls = [s.url for s in sims]
        expected = {
            True: await unbroken_text(urls[0], MODEL, p.stream_tokens),
            False: await unbroken_text(urls[0], MODEL, p.post_tokens),
        }
        async with _target(name, urls, p, router, logs) as (entry, ops, names):
            load = Load(entry, model=MODEL, streams=p.streams, posts=p.posts,
                        stream_tokens=p.stream_tokens, post_tokens=p.post_tokens,
                        send_ids=names)  # fmt: skip
            leave, join = ops(load)
            started = time.monotonic()
            async with load:
                await asyncio.sleep(1.0)  # every worker under way
                windows = await roll(sims, leave, join, drain_deadline=p.drain_deadline + 1.0)
                rest = p.duration - (time.monotonic() - started)
                if rest > 0:
                    await asyncio.sleep(rest)
            elapsed = time.monotonic() - started
    got = summary(load.records, expected, pauses(load.records, windows))
    got["seconds"] = round(elapsed, 1)
    got["members"] = [
        {"held": w["held"], "moved": len(w["moved"]), "emptied_s": round(w["emptied_s"], 2)}
        for w in windows
    ]
    return got


async def _kill(
    name: str, p: RolloutPreset, router: str | None, logs: Path | None
) -> dict[str, Any]:
    async with _members(2, p.pace, logs) as sims:
        urls = [s.url for s in sims]
        expected = {True: await unbroken_text(urls[0], MODEL, p.kill_tokens), False: ""}
        async with _target(name, urls, p, router, logs) as (entry, _, names):
            records, window = await kill_one_of_two(
                entry, sims[0], model=MODEL, streams=p.kill_streams, tokens=p.kill_tokens,
                at=8, send_ids=names,
            )  # fmt: skip
    got = summary(records, expected, pauses(records, [window]))
    got["victim_held"] = window["held"]
    return got


async def run(args: argparse.Namespace) -> dict[str, Any]:
    p = PRESET.sized(args.quick)
    if args.duration is not None:
        p = replace(p, duration=args.duration)
    if args.kill_streams is not None:
        p = replace(p, kill_streams=args.kill_streams)
    router = router_bin(args.router_bin)
    logs = Path(args.out) / "logs" if args.out else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    targets: dict[str, Any] = {}
    for name in TARGETS:
        if name == "vllm-router" and router is None:
            targets[name] = {
                "available": False,
                "reason": "no vllm-router binary (--router-bin, $VLLM_ROUTER_BIN or PATH)",
            }
            progress("rollout: vllm-router skipped: no binary")
            continue
        progress(f"rollout: {name}: rolling restart")
        rolling = await _rolling(name, p, router, logs)
        progress(f"rollout: {name}: {rolling}")
        progress(f"rollout: {name}: one of two killed under {p.kill_streams} streams")
        kill = await _kill(name, p, router, logs)
        progress(f"rollout: {name}: {kill}")
        targets[name] = {"available": True, "rolling_restart": rolling, "kill_one_of_two": kill}
    return {
        "scenario": "rollout",
        "quick": args.quick,
        "started": started,
        "elapsed_s": time.time() - started,
        "config": {**asdict(p), "router_bin": router},
        "targets": targets,
        "levels": [],
        "goals": [],
        "findings": {},
    }


# --- the report ---------------------------------------------------------------------------------

ROWS: list[tuple[str, str, tuple[str, ...]]] = [
    ("rolling restart", "requests", ("requests",)),
    ("rolling restart", "of which streams", ("streams",)),
    ("rolling restart", "failed", ("failed",)),
    ("rolling restart", "broken streams", ("broken_streams",)),
    (
        "rolling restart",
        "streams a leaving member had not finished at its deadline",
        ("unfinished",),
    ),
    ("rolling restart", "of which went on elsewhere (moved)", ("moved_streams",)),
    ("rolling restart", "pause at the move p50 (ms)", ("pause_ms", "p50")),
    ("rolling restart", "pause at the move max (ms)", ("pause_ms", "max")),
    ("kill one of two", "streams", ("streams",)),
    ("kill one of two", "streams the killed member held", ("victim_held",)),
    ("kill one of two", "broken streams", ("broken_streams",)),
    ("kill one of two", "pause at the move p50 (ms)", ("pause_ms", "p50")),
    ("kill one of two", "pause at the move max (ms)", ("pause_ms", "max")),
]


def _cell(part: dict[str, Any] | None, path: tuple[str, ...]) -> str:
    if part is not None and path == ("unfinished",):
        part = {"unfinished": sum(m["moved"] for m in part.get("members", ()))}
    value: Any = part
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return "-"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    names = list(doc["targets"])
    out = [
        "# Benchmark: rollout",
        "",
        f"Rolling restart: {cfg['members']} simulator members (pace {cfg['pace'] * 1000:g} ms), "
        f"{cfg['streams']} stream workers ({cfg['stream_tokens']} tokens) and {cfg['posts']} "
        f"non-streamed workers ({cfg['post_tokens']} tokens) for {cfg['duration']:g} s at "
        f"least; each member out in turn (drain deadline {cfg['drain_deadline']:g} s), "
        f"SIGKILLed, started again, back. Kill: 2 members, {cfg['kill_streams']} streams of "
        f"{cfg['kill_tokens']} tokens, one member SIGKILLed once each stream has 8 chunks.",
        "",
        "| part | figure | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    key = {"rolling restart": "rolling_restart", "kill one of two": "kill_one_of_two"}
    for part, label, path in ROWS:
        cells = [
            _cell(doc["targets"][n].get(key[part]), path)
            if doc["targets"][n]["available"]
            else "n/a"
            for n in names
        ]
        out.append(f"| {part} | {label} | " + " | ".join(cells) + " |")
    out.append("")
    for n in names:
        t = doc["targets"][n]
        if not t["available"]:
            out.append(f"- {n}: not run: {t['reason']}")
            continue
        for part in ("rolling_restart", "kill_one_of_two"):
            if t[part]["errors"]:
                errs = "; ".join(f"{k} (x{v})" for k, v in t[part]["errors"].items())
                out.append(f"- {n}, {part.replace('_', ' ')}: {errs}")
    out.append("")
    return "\n".join(out)
