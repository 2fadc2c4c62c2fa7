"""The benchmark against real simulators on loopback: counts, fidelity and the written report.

No timing asserts: the numbers are the benchmark's output, not its correctness.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vllm_gateway_tools.bench.client import Target
from vllm_gateway_tools.bench.runner import LoadSpec
from vllm_gateway_tools.bench.session import Session
from vllm_gateway_tools.simulator import Simulator, SimulatorConfig, run_simulator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def two_sims() -> AsyncIterator[tuple[Simulator, Simulator]]:
    cfg = SimulatorConfig(ttft=0.001, itl=0.001)
    async with run_simulator(cfg) as a, run_simulator(cfg) as b:
        yield a, b


def _session(a: Simulator, b: Simulator, rounds: int = 2) -> Session:
    return Session([Target("direct", a.url), Target("twin", b.url)], rounds=rounds, pace=0.001)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_closed_loop_counts_requests_and_chunks(
    two_sims: tuple[Simulator, Simulator], endpoint: str
) -> None:
    a, b = two_sims
    spec = LoadSpec(
        model="sim-model", endpoint=endpoint, max_tokens=5, concurrency=3, num_requests=7
    )
    level = await _session(a, b).run_level(spec)
    for name in ("direct", "twin"):
        s = level.summaries[name]
        assert s["requests"] == 14  # 7 per round, 2 rounds
        assert s["completed"] == 14, s["errors"]
        assert s["chunks"] == 14 * 5
        assert s["output_tokens"] == 14 * 5
        assert s["itl_ms"]["n"] == 14 * 4
        assert s["rounds"] == 2
        rounds = s["per_round"]
        assert [r["completed"] for r in rounds] == [7, 7]
        assert rounds[0]["wall_start"] < rounds[1]["wall_start"]
        assert all(r["ttft_ms"]["p99"] >= r["ttft_ms"]["p50"] > 0 for r in rounds)
    assert sorted(r.idx for r in level.results("direct")) == sorted(list(range(7)) * 2)


async def test_identical_targets_compare_equal(two_sims: tuple[Simulator, Simulator]) -> None:
    a, b = two_sims
    spec = LoadSpec(model="sim-model", max_tokens=6, concurrency=2, num_requests=6)
    level = await _session(a, b).run_level(spec)
    fid = level.fidelity["twin"]
    assert fid["compared"] == 12
    assert fid["identical"] == 12
    assert level.comparison["twin"]["ratio"]["chunks"] == pytest.approx(1.0)


async def test_different_output_is_caught_by_fidelity(
    two_sims: tuple[Simulator, Simulator],
) -> None:
    a, b = two_sims
    # Same seeded requests, but max_tokens differs on one side: the streams differ.
    base = LoadSpec(model="sim-model", max_tokens=4, concurrency=1, num_requests=3, fidelity=True)
    s = Session([Target("direct", a.url)], rounds=1)
    first = await s.run_level(base)
    s2 = Session([Target("direct", b.url)], rounds=1)
    second = await s2.run_level(LoadSpec(**{**_fields(base), "max_tokens": 5}))
    from vllm_gateway_tools.bench.metrics import fidelity

    f = fidelity(first.results("direct"), second.results("direct"))
    assert f["compared"] == 3
    assert f["identical"] == 0


def _fields(spec: LoadSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in spec.__dataclass_fields__}


async def test_non_streamed_open_loop_completes(two_sims: tuple[Simulator, Simulator]) -> None:
    a, b = two_sims
    spec = LoadSpec(model="sim-model", stream=False, max_tokens=3, rate=200.0, num_requests=20)
    level = await _session(a, b, rounds=1).run_level(spec)
    for name in ("direct", "twin"):
        s = level.summaries[name]
        assert s["completed"] == 20, s["errors"]
        assert s["output_tokens"] == 20 * 3
    assert level.fidelity["twin"]["identical"] == 20


async def test_server_errors_are_counted_by_kind() -> None:
    async with run_simulator(SimulatorConfig(ttft=0, itl=0, status=503)) as sim:
        spec = LoadSpec(model="sim-model", max_tokens=3, concurrency=2, num_requests=4)
        level = await Session([Target("direct", sim.url)], rounds=1).run_level(spec)
    s = level.summaries["direct"]
    assert s["errors"] == {"http_503": 4}
    assert s["completed"] == 0


async def test_refused_connections_are_errors_not_hangs() -> None:
    async with run_simulator() as sim:
        url = sim.url  # closed when the block ends: nothing listens there any more
    spec = LoadSpec(
        model="sim-model", max_tokens=3, concurrency=1, num_requests=2, connect_timeout=2
    )
    level = await Session([Target("gone", url)], rounds=1).run_level(spec)
    assert level.summaries["gone"]["errors"] == {"connect": 2}


async def test_cli_writes_json_markdown_and_plot(
    two_sims: tuple[Simulator, Simulator], tmp_path: Path
) -> None:
    a, b = two_sims
    out = tmp_path / "out"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vllm_gateway_tools.bench",
        "--targets",
        f"direct={a.url},gateway={b.url}",
        "--sweep",
        "1,2",
        "--num-requests",
        "4",
        "--max-tokens",
        "3",
        "--rounds",
        "2",
        "--goodput",
        "itl:1000",
        "--out",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode == 0, stderr.decode()
    assert b"round 2/2" in stderr  # progress, one line per round
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["model"] == "sim-model"  # read from /v1/models
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 2]
    for lv in doc["levels"]:
        assert lv["targets"]["gateway"]["completed"] == 8
        assert lv["targets"]["direct"]["chunks"] == 8 * 3
        assert lv["fidelity"]["gateway"]["identical"] == 8
        assert "added" in lv["comparison"]["gateway"]
    md = (out / "report.md").read_text()
    assert "| figure | direct | gateway | added | ratio |" in md
    if (out / "plot.png").exists():
        assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"


async def test_time_to_headers_is_measured_apart_from_the_first_token() -> None:
    # The simulator answers its status and headers at once and its first token after `ttft`,
    # as vLLM does: the two times must come out apart.
    async with run_simulator(SimulatorConfig(ttft=0.3, itl=0.001)) as sim:
        session = Session([Target("direct", sim.url)], rounds=1, pace=0.001, warmup=False)
        spec = LoadSpec(model="sim-model", max_tokens=2, concurrency=2, num_requests=4)
        level = await session.run_level(spec)
    s = level.summaries["direct"]
    assert s["completed"] == 4
    assert s["headers_ms"]["n"] == 4
    assert 0 < s["headers_ms"]["max"] < 300
    assert s["ttft_ms"]["mean"] >= 300
