"""The benchmark's arithmetic: percentiles, TPOT, pooled ITL, goodput, comparison."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_gateway_tools.bench import metrics
from vllm_gateway_tools.bench.client import RequestResult
from vllm_gateway_tools.bench.runner import ProcMonitor
from vllm_gateway_tools.bench.scenarios import gateway_refusals_ms


def _req(
    idx: int, ttft: float, gaps: list[float], ok: bool = True, tokens: int | None = None
) -> RequestResult:
    e2el = ttft + sum(gaps)
    return RequestResult(
        idx=idx,
        ok=ok,
        error=None if ok else "http_503",
        ttft=ttft,
        e2el=e2el,
        chunks=len(gaps) + 1,
        tokens=len(gaps) + 1 if tokens is None else tokens,
        itl=list(gaps),
    )


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert metrics.percentile(values, 50) == pytest.approx(2.5)
    assert metrics.percentile(values, 99) == pytest.approx(3.97)
    assert metrics.percentile(values, 0) == 1.0
    assert metrics.percentile(values, 100) == 4.0
    assert metrics.percentile([7.0], 99) == 7.0
    assert math.isnan(metrics.percentile([], 50))


def test_percentile_ignores_input_order() -> None:
    assert metrics.percentile([4.0, 1.0, 3.0, 2.0], 90) == metrics.percentile(
        [1.0, 2.0, 3.0, 4.0], 90
    )


def test_summary_stats_in_milliseconds() -> None:
    s = metrics.summary_stats([0.001, 0.002, 0.003])
    assert s["n"] == 3
    assert s["p50"] == pytest.approx(2.0)
    assert s["max"] == pytest.approx(3.0)
    assert s["mean"] == pytest.approx(2.0)
    assert math.isnan(metrics.summary_stats([])["p99"])


def test_tpot_excludes_the_first_token() -> None:
    r = _req(0, ttft=0.1, gaps=[0.02, 0.02, 0.02])  # 4 tokens, E2EL 0.16
    assert metrics.tpot(r) == pytest.approx(0.02)
    assert metrics.tpot(_req(1, ttft=0.1, gaps=[])) is None  # one token: no TPOT


def test_tpot_uses_reported_tokens_not_chunks() -> None:
    r = _req(0, ttft=0.1, gaps=[0.03, 0.03], tokens=7)  # 3 chunks carried 7 tokens
    assert metrics.tpot(r) == pytest.approx(0.06 / 6)


def test_itl_is_pooled_over_requests_not_averaged() -> None:
    # One request with 99 gaps of 10 ms, one with a single gap of 1 s: pooling keeps the
    # outlier at its weight (1 of 100 gaps); a mean of per-request means would not.
    results = [_req(0, 0.0, [0.01] * 99), _req(1, 0.0, [1.0])]
    s = metrics.summarise(results, duration=1.0, limits=metrics.GoodputLimits())
    assert s["itl_ms"]["n"] == 100
    assert s["itl_ms"]["p50"] == pytest.approx(10.0)
    assert s["itl_ms"]["max"] == pytest.approx(1000.0)


def test_summarise_counts_errors_by_kind_and_excludes_them_from_latency() -> None:
    results = [_req(0, 0.01, [0.02]), _req(1, 5.0, [5.0], ok=False)]
    s = metrics.summarise(results, duration=2.0, limits=metrics.GoodputLimits())
    assert s["completed"] == 1
    assert s["errors"] == {"http_503": 1}
    assert s["ttft_ms"]["max"] == pytest.approx(10.0)
    assert s["req_per_s"] == pytest.approx(0.5)
    assert s["chunks"] == 2


def test_goodput_needs_every_limit_met() -> None:
    fast = _req(0, 0.05, [0.02, 0.02])
    gappy = _req(1, 0.05, [0.02, 0.3])
    slow_start = _req(2, 0.9, [0.02, 0.02])
    failed = _req(3, 0.01, [0.01], ok=False)
    limits = metrics.parse_goodput("itl:200,ttft:500")
    assert [limits.met_by(r) for r in (fast, gappy, slow_start, failed)] == [
        True,
        False,
        False,
        False,
    ]
    s = metrics.summarise([fast, gappy, slow_start, failed], duration=2.0, limits=limits)
    assert s["goodput_req_per_s"] == pytest.approx(0.5)
    assert s["goodput_fraction"] == pytest.approx(0.25)


def test_goodput_without_limits_counts_successes() -> None:
    s = metrics.summarise(
        [_req(0, 0.1, [0.1]), _req(1, 0.1, [0.1], ok=False)], 1.0, metrics.GoodputLimits()
    )
    assert s["goodput_req_per_s"] == pytest.approx(1.0)


@pytest.mark.parametrize("spec", ["itl", "itl:", "gap:5", "ttft:-1", "ttft:nan"])
def test_parse_goodput_rejects_bad_limits(spec: str) -> None:
    with pytest.raises(ValueError):
        metrics.parse_goodput(spec)


def test_parse_goodput_accepts_repeated_flags() -> None:
    limits = metrics.parse_goodput(["itl:200", "ttft:50,e2el:1000"])
    assert limits.as_dict() == {"ttft": 50.0, "itl": 200.0, "e2el": 1000.0}


def test_stalls_are_gaps_over_twice_the_pace() -> None:
    r = _req(0, 0.0, [0.02, 0.039, 0.041, 0.5])
    s = metrics.summarise([r], 1.0, metrics.GoodputLimits(), pace=0.02)
    assert s["stalls"] == 2


def test_compare_gives_added_and_ratio_for_nested_figures() -> None:
    direct = {"ttft_ms": {"p50": 1.0, "p99": 2.0}, "req_per_s": 100.0, "errors": {}}
    gateway = {"ttft_ms": {"p50": 1.5, "p99": 4.0}, "req_per_s": 90.0, "errors": {}}
    cmp = metrics.compare(direct, gateway)
    assert cmp["added"]["ttft_ms"] == {"p50": 0.5, "p99": 2.0}
    assert cmp["ratio"]["req_per_s"] == pytest.approx(0.9)
    assert math.isnan(metrics.compare({"x": 0.0}, {"x": 1.0})["ratio"]["x"])


def test_fidelity_matches_by_request_index() -> None:
    a = [RequestResult(idx=i, ok=True, digest=f"d{i}") for i in range(4)]
    b = [
        RequestResult(idx=i, ok=True, digest=f"d{i}" if i != 2 else "other")
        for i in reversed(range(4))
    ]
    f = metrics.fidelity(a, b)
    assert (f["compared"], f["identical"]) == (4, 3)


def test_a_process_is_measured_with_its_children() -> None:
    # A gateway with --workers N is a supervisor and N children: their CPU and memory count too.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'x = bytearray(64 << 20)\\n"
        "while True: pass'])\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        monitor = ProcMonitor(parent.pid)
        deadline = time.monotonic() + 20
        while len(monitor._tree()) < 2 or (monitor.cpu() or 0) < 0.5:
            assert time.monotonic() < deadline, "the child's CPU never showed"
            time.sleep(0.1)
        rss = monitor.rss()
        assert rss is not None and rss > 64 << 20  # the child's buffer is counted
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child too
        parent.wait()
    assert ProcMonitor(parent.pid).cpu() is None  # gone: nothing to read


def test_the_gateways_own_refusal_times_are_read_from_its_access_log(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    log.write_bytes(
        b"2026-12-01 20:12:53,515 INFO    vllm_gateway.access: request b1c5 /v1/chat/completions "
        b"503 overloaded model=None backend=http://127.0.0.1:40327 tenant=None queue_wait_ms=0.0 "
        b"ttft_ms=- backend_ms=- duration_ms=0.2 chunks=0 tokens=-/-\n"
        b"2026-12-01 20:12:53,581 INFO    vllm_gateway.access: request b1c6 /v1/chat/completions "
        b"200 completed model=sim-model backend=http://127.0.0.1:40327 tenant=anonymous "
        b"queue_wait_ms=0.0 ttft_ms=20.2 backend_ms=18.6 duration_ms=72.5 chunks=4 tokens=50/2\n"
        b"2026-12-01 20:12:53,600 INFO    vllm_gateway.access: request b1c7 /v1/chat/completions "
        b"503 overloaded model=None backend=- tenant=None queue_wait_ms=0.0 ttft_ms=- "
        b"backend_ms=- duration_ms=12.5 chunks=0 tokens=-/-\n"
    )
    assert gateway_refusals_ms(str(log)) == [0.2, 12.5]  # the 200 is not a refusal
    assert gateway_refusals_ms(str(tmp_path / "absent.log")) == []
    assert gateway_refusals_ms(None) == []
