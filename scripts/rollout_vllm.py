"""A rolling restart of two real vLLM CPU servers behind the gateway, each restarted once under a
light load: every request and stream is counted, each text compared with the unbroken greedy text.

    PYTHONPATH=src:tools python scripts/rollout_vllm.py --out OUT

Two vLLM servers (the default model, started as ``vllm-gateway up`` starts it) and one gateway
process (``--admin-api-keys``, ``VLLM_POOL_DRAIN_TIMEOUT_SECONDS``); the load of
``bench/rollout.py`` (``--streams`` stream workers, ``--posts`` non-streamed workers, the same
prompt); each member in turn drained through ``POST /admin/backends/drain``, given until the drain
deadline and a second, stopped (SIGTERM, as Kubernetes does at the end of a grace period), started
again on its port, undrained, and ready again at the gateway before the next. Writes
``OUT/results.json`` and ``OUT/report.md``; the logs go to ``OUT/logs/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.runtime.up.preflight import free_port
from vllm_gateway.runtime.up.vllm_command import build_vllm_command, child_environment, served_names
from vllm_gateway.runtime.up.vllm_process import VllmChild
from vllm_gateway.runtime.up.warmup import wait_healthy
from vllm_gateway_tools.bench.rollout import Load, roll, summary, unbroken_text
from vllm_gateway_tools.bench.rollout_scenario import _proxy

ADMIN_KEY = "rollout-admin"


class VllmMember:
    """One vLLM CPU server on a fixed port, stopped and started again on it."""

    def __init__(self, model_dir: Path, logs: Path, index: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = served_names(str(model_dir))[0]
        self.command = build_vllm_command(sys.executable, str(model_dir), self.port, gpu=False)
        self.log = logs / f"vllm-{index}.log"
        self.child: VllmChild | None = None
        self.started_s: list[float] = []

    def start(self, timeout: float = 600.0) -> None:
        env = child_environment(os.environ, gpu=False)
        self.child = VllmChild.start(self.command, env, self.log, self.name, self.port)
        self.started_s.append(round(wait_healthy(self.child, timeout, sys.stderr), 1))

    def kill(self) -> None:
        if self.child is not None:
            self.child.stop(30.0)
            self.child = None


async def main(args: argparse.Namespace) -> dict[str, Any]:
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model_dir = model_prep.prepare_default_model(model_prep.default_cache_dir(os.environ))
    members = [VllmMember(model_dir, logs, i) for i in range(2)]
    try:
        await asyncio.gather(*(asyncio.to_thread(m.start) for m in members))
        model = members[0].name
        expected = {
            True: await unbroken_text(members[0].url, model, args.stream_tokens),
            False: await unbroken_text(members[0].url, model, args.post_tokens),
        }
        port = free_port()
        cmd = [
            sys.executable, "-m", "vllm_gateway.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--backend-url", ",".join(m.url for m in members),
            "--admin-api-keys", ADMIN_KEY, "--log-level", "warning",
        ]  # fmt: skip
        env = {"VLLM_POOL_DRAIN_TIMEOUT_SECONDS": str(args.drain)}
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with (
            _proxy(cmd, port, "/health/ready", env, logs / "gateway.log") as gw,
            httpx.AsyncClient(timeout=30) as admin,
        ):

            async def state(url: str) -> str:
                resp = await admin.get(gw + "/admin/backends", headers=auth)
                return str({d["url"]: d["state"] for d in resp.json()["data"]}.get(url))

            async def leave(url: str) -> None:
                resp = await admin.post(
                    gw + "/admin/backends/drain", headers=auth, json={"url": url}
                )
                resp.raise_for_status()

            async def join(url: str) -> None:
                resp = await admin.post(
                    gw + "/admin/backends/undrain", headers=auth, json={"url": url}
                )
                resp.raise_for_status()
                for _ in range(600):  # 2 minutes at most
                    if await state(url) == "ready":
                        break
                    await asyncio.sleep(0.2)

            load = Load([gw], model=model, streams=args.streams, posts=args.posts,
                        stream_tokens=args.stream_tokens, post_tokens=args.post_tokens,
                        send_ids=False, timeout=300)  # fmt: skip
            started = time.monotonic()
            async with load:
                await asyncio.sleep(5)
                await roll(members, leave, join, drain_deadline=args.drain + 1.0,
                           back_within=0.1, settle=5.0)  # fmt: skip
            elapsed = time.monotonic() - started
    finally:
        for m in members:
            await asyncio.to_thread(m.kill)
    got = summary(load.records, expected, [])
    return {
        "scenario": "rollout-vllm",
        "model": model,
        "config": {**vars(args), "out": str(args.out)},
        "seconds": round(elapsed, 1),
        "members_ready_after_s": [m.started_s for m in members],
        "result": got,
    }


def report(doc: dict[str, Any]) -> str:
    r, c = doc["result"], doc["config"]
    return "\n".join([
        "# Rollout: two vLLM CPU servers",
        "",
        f"Model `{doc['model']}`; {c['streams']} stream workers ({c['stream_tokens']} tokens) and "
        f"{c['posts']} non-streamed workers ({c['post_tokens']} tokens) for {doc['seconds']} s; "
        f"each server drained (deadline {c['drain']:g} s), stopped, started again, undrained.",
        "",
        "| requests | streams | failed | broken streams |",
        "|---:|---:|---:|---:|",
        f"| {r['requests']} | {r['streams']} | {r['failed']} | {r['broken_streams']} |",
        "",
        f"Seconds each server took to be healthy (first start, restart): "
        f"{doc['members_ready_after_s']}.",
        *(f"- {k} (x{v})" for k, v in r["errors"].items()),
        "",
    ])  # fmt: skip


def cli() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--posts", type=int, default=1)
    p.add_argument("--stream-tokens", type=int, default=48)
    p.add_argument("--post-tokens", type=int, default=8)
    p.add_argument("--drain", type=float, default=10.0, help="the gateway's drain deadline (s)")
    args = p.parse_args()
    doc = asyncio.run(main(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (args.out / "report.md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
