"""The ``cache`` benchmark scenario against simulator members and real gateways on loopback.

The scenario runs as its own process (``python -m vllm_gateway_tools.bench``), as a user runs
it. Assertions are on structure and on what the cache model guarantees, never on timings: the
``single`` baseline (one member, the whole workload) hits most of each prompt, and a policy that
spreads one conversation's turns over two members (round robin) hits less.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT
from vllm_gateway_tools.bench.cache_probe import parse_metrics
from vllm_gateway_tools.bench.cache_report import markdown
from vllm_gateway_tools.bench.cache_workload import Workload, answer_text
from vllm_gateway_tools.simulator import SimulatorConfig, run_simulator
from vllm_gateway_tools.simulator.tokenizer import Vocabulary, chat_messages

pytestmark = pytest.mark.timeout(180)

# One conversation at a time: with every member idle at each turn, a policy without affinity
# takes the members in turn, so consecutive turns of a conversation land on different members.
QUICK = ["--scenario", "cache", "--quick", "--concurrency", "1", "--seed", "3"]


def _run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vllm_gateway_tools.bench", *QUICK, *args, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=ROOT)


def _bench(out: Path, *args: str) -> dict[str, Any]:
    proc = _run(out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc: dict[str, Any] = orjson.loads((out / "results.json").read_bytes())
    return doc


def _check_target(figures: dict[str, Any], requests: int, members: int, gateway: bool) -> None:
    assert figures["available"] is True
    assert figures["requests"] == figures["completed"] == requests, figures["errors"]
    assert figures["failed"] == 0 and figures["errors"] == {}
    assert 0 < figures["hits"] < figures["queries"]
    assert figures["hit_rate"] == pytest.approx(figures["hits"] / figures["queries"])
    assert figures["ttft_ms"]["p99"] >= figures["ttft_ms"]["p50"] > 0
    per = figures["per_member"]
    assert len(per["url"]) == len(per["requests"]) == len(per["hits"]) == members
    # The members' own counters agree with the client: every turn reached exactly one member.
    assert sum(per["requests"]) == requests
    assert sum(per["queries"]) == figures["queries"]
    assert len(figures["per_round"]) == figures["rounds"]
    if gateway:
        assert set(figures["spread"]) == {"max_over_min", "share_gap"}
        assert figures["gateway_cpu_us_per_request"] >= 0
    else:
        assert figures["spread"] is None and "gateway_cpu_s" not in figures


def test_quick_run_compares_policies(tmp_path: Path) -> None:
    doc = _bench(tmp_path, "--policies", "round_robin,least_outstanding,cache_aware")
    assert doc["scenario"] == "cache" and doc["levels"] == []
    cfg = doc["config"]
    requests = cfg["conversations"] * cfg["turns"] * cfg["rounds"]
    policies = doc["policies"]
    assert list(policies) == ["single", "round_robin", "least_outstanding", "cache_aware"]
    _check_target(policies["single"], requests, 1, gateway=False)
    for name in ("round_robin", "least_outstanding", "cache_aware"):
        _check_target(policies[name], requests, 2, gateway=True)
    single = policies["single"]["hit_rate"]
    assert single > 0.6
    # Round robin: each turn misses the history its other member never saw.
    spreading = "round_robin"
    assert policies[spreading]["hit_rate"] < single - 0.1
    assert policies[spreading]["spread"]["max_over_min"] == pytest.approx(1.0, abs=0.5)
    # Cache-aware routing keeps each conversation with the member that holds it, and spreads the
    # conversations: one member's hit rate, on both members evenly.
    aware = policies["cache_aware"]
    assert aware["hit_rate"] >= single - 0.02
    assert aware["spread"]["max_over_min"] == pytest.approx(1.0, abs=0.5)
    report = (tmp_path / "report.md").read_text()
    assert "| figure | single |" in report and "prefix cache hit rate" in report
    assert doc["findings"]["hit_rate"]["single"] == single


async def test_external_members(tmp_path: Path) -> None:
    """``--member-urls``: the rig starts only the gateways; the members are someone else's."""
    cfg = SimulatorConfig(ttft=0.002, itl=0.002, dev_mode=True, prefix_cache_blocks=1024,
                          prefill_per_token=0.0001)  # fmt: skip
    async with run_simulator(cfg) as a, run_simulator(cfg) as b:
        doc = await asyncio.to_thread(
            _bench, tmp_path, "--member-urls", f"{a.url},{b.url}", "--policies", "prefix"
        )
    assert doc["rig"]["external_members"] is True
    assert doc["rig"]["members"] == [a.url, b.url]
    assert doc["config"]["model"] == "sim-model"  # read from the first member's /v1/models
    cfg_doc = doc["config"]
    requests = cfg_doc["conversations"] * cfg_doc["turns"] * cfg_doc["rounds"]
    _check_target(doc["policies"]["single"], requests, 1, gateway=False)
    _check_target(doc["policies"]["prefix"], requests, 2, gateway=True)


async def test_a_member_without_the_reset_route_stops_the_run(tmp_path: Path) -> None:
    """A real vLLM without VLLM_SERVER_DEV_MODE has no /reset_prefix_cache: exit 1, and why."""
    cfg = SimulatorConfig(ttft=0.002, itl=0.002, prefix_cache_blocks=64)  # dev routes off
    async with run_simulator(cfg) as a:
        proc = await asyncio.to_thread(
            _run, tmp_path, "--member-urls", a.url, "--policies", "least_outstanding"
        )
    assert proc.returncode == 1
    assert "VLLM_SERVER_DEV_MODE" in proc.stderr


# --- the parts, without processes -----------------------------------------------------------------


def test_workload_is_seeded_and_each_turn_extends_the_last() -> None:
    w = Workload(groups=3, conversations=5, turns=3, system_tokens=40, user_tokens=10, seed=1)
    assert w.opening(2) == Workload(groups=3, conversations=5, turns=3, system_tokens=40,
                                    user_tokens=10, seed=1).opening(2)  # fmt: skip
    assert len(w.system_prompt(0)) == 160 and len(w.user_message(0, 1)) == 40
    assert len({w.system_prompt(g)[:12] for g in range(3)}) == 3  # groups differ from the start
    vocab = Vocabulary()
    first = w.opening(1)
    later = [*first, {"role": "assistant", "content": " tok0"}, {"role": "user", "content": "x"}]
    a = vocab.encode_chat(chat_messages(first))
    assert vocab.encode_chat(chat_messages(later))[: len(a)] == a
    assert orjson.loads(w.body(first, 1, 0))["messages"] == first


def test_answer_text_reads_the_stream() -> None:
    body = (
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":" tok0"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":" tok1"}}]}\n\n'
        b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert answer_text(body) == " tok0 tok1"


def test_parse_metrics_sums_label_sets() -> None:
    text = (
        "# TYPE vllm:request_success_total counter\n"
        'vllm:request_success_total{engine="0",finished_reason="length"} 3.0\n'
        'vllm:request_success_total{engine="0",finished_reason="stop"} 2.0\n'
        'vllm:prefix_cache_hits_total{engine="0"} 48.0\n'
        "vllm:prefix_cache_hits_created 1.7e9\n"
    )
    got = parse_metrics(text, ("vllm:request_success_total", "vllm:prefix_cache_hits_total", "x"))
    assert got == {"vllm:request_success_total": 5.0, "vllm:prefix_cache_hits_total": 48.0,
                   "x": 0.0}  # fmt: skip


def test_report_lists_unavailable_policies() -> None:
    doc = {"scenario": "cache", "config": {}, "rig": {"members": []},
           "policies": {"cache_aware": {"available": False, "reason": "exited with 2"}}}  # fmt: skip
    text = markdown(doc)
    assert "- cache_aware: exited with 2" in text
