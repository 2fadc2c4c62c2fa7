"""vLLM's preStop hook from the Helm chart (deploy/helm/vllm-gateway/files/vllm-drain.py), run as
the kubelet would, against the real gateway on loopback: it drains its pod through the admin API."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from tests.conftest import run_gateway
from vllm_gateway.backends.pool.backend import PoolBackend
from vllm_gateway.backends.pool.config import PoolConfig
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator

HOOK = Path(__file__).resolve().parents[2] / "deploy/helm/vllm-gateway/files/vllm-drain.py"
PACE = SimulatorConfig(ttft=0.01, itl=0.005, tokens=4)


async def run_hook(env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HOOK),
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_the_prestop_hook_drains_its_pod_at_the_gateway() -> None:
    async with run_simulator(PACE) as a, run_simulator(PACE) as b:
        settings = Settings(backend_urls=(a.url, b.url), admin_api_keys=frozenset({"adm1"}))
        pool = PoolBackend(settings, config=PoolConfig(health_interval=0.1, slow_start=0.0))
        async with run_gateway(settings, backend=pool) as gw:
            pod = urlsplit(a.url)
            env = {
                "POD_IP": str(pod.hostname),
                "VLLM_PORT": str(pod.port),
                "GATEWAY_PODS": f"localhost:{gw.port}",
                "DRAIN_SECONDS": "0",
            }
            # Without a key the hook only waits: the pod leaves through DNS.
            assert await run_hook(env) == ""
            assert pool.fleet.find(a.url).state == "ready"

            out = await run_hook({**env, "DRAIN_ADMIN_KEYS": "adm1:ops,other"})
            assert f"{a.url} draining at gateway 127.0.0.1 (200)" in out
            assert pool.fleet.find(a.url).state == "draining"
            assert pool.fleet.find(b.url).state == "ready"

            # A wrong key changes nothing, and the hook still ends (it must not block the stop).
            out = await run_hook(
                {
                    **env,
                    "POD_IP": str(urlsplit(b.url).hostname),
                    "VLLM_PORT": str(urlsplit(b.url).port),
                    "DRAIN_ADMIN_KEYS": "wrong",
                }
            )
            assert "gateway 127.0.0.1: HTTP Error" in out
            assert pool.fleet.find(b.url).state == "ready"
