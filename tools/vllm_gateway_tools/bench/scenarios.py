"""Named scenarios matching the goals table of docs/benchmark.md, and the plain sweep.

Each scenario is a ``Preset`` (the rig's pace and the load's shape, full and ``--quick`` sizes)
plus an async function that runs its levels through a ``Session`` and returns
``{"levels": [...], "goals": [...], "findings": {...}}``. A goal row is
``{"goal", "figure", "measured", "limit", "met"}``; ``met`` is None when the figure is missing.
Scenarios never assert: they measure and report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vllm_gateway_tools.bench import metrics
from vllm_gateway_tools.bench.retry_scenario import run_retry
from vllm_gateway_tools.bench.runner import LoadSpec, progress
from vllm_gateway_tools.bench.session import LevelResult, Session

__all__ = ["PRESETS", "SCENARIOS", "Preset", "run_sweep"]


@dataclass(frozen=True, slots=True)
class Preset:
    """Defaults of one scenario; ``quick`` values replace the full ones under ``--quick``."""

    itl: float
    max_tokens: int
    concurrency: int
    num_requests: int | None
    rounds: int
    stream: bool = True
    ttft: float = 0.0
    duration: float | None = None
    limit: int | None = None  # the gateway's concurrency limit (admission)
    levels: tuple[int, ...] = ()
    quick: dict[str, Any] | None = None

    def sized(self, quick: bool) -> Preset:
        return replace(self, **(self.quick or {}), quick=None) if quick else self


PRESETS: dict[str, Preset] = {
    "single": Preset(
        itl=0.02,
        max_tokens=64,
        concurrency=1,
        num_requests=20,
        rounds=3,
        quick={"num_requests": 4, "max_tokens": 16, "rounds": 2},
    ),
    "c1000": Preset(
        itl=0.1,
        max_tokens=256,
        concurrency=1000,
        num_requests=1000,
        rounds=2,
        quick={"concurrency": 50, "num_requests": 50, "max_tokens": 16, "rounds": 1},
    ),
    "ceiling": Preset(
        itl=0.02,
        max_tokens=64,
        concurrency=0,
        num_requests=None,
        rounds=1,
        levels=(50, 100, 200, 300, 400, 600, 800, 1200),
        quick={"levels": (10, 40), "max_tokens": 16},
    ),
    "nonstream": Preset(
        itl=0.0,
        max_tokens=16,
        concurrency=64,
        num_requests=None,
        rounds=2,
        stream=False,
        duration=10.0,
        quick={"duration": 1.5, "concurrency": 16, "rounds": 1},
    ),
    "memory": Preset(
        itl=0.1,
        max_tokens=100,
        concurrency=1000,
        num_requests=1000,
        rounds=1,
        duration=120.0,
        quick={"concurrency": 50, "num_requests": 50, "max_tokens": 20, "duration": 4.0},
    ),
    "retry": Preset(
        itl=0.02,
        max_tokens=64,
        concurrency=200,
        num_requests=200,
        rounds=1,
        quick={"concurrency": 20, "num_requests": 20, "max_tokens": 16},
    ),
    "admission": Preset(
        itl=0.05,
        max_tokens=64,
        concurrency=200,
        num_requests=200,
        rounds=2,
        limit=100,
        quick={"concurrency": 20, "num_requests": 20, "limit": 10, "max_tokens": 16, "rounds": 1},
    ),
}


def _goal(
    goal: str, figure: str, measured: float | None, limit: float, higher_is_better: bool = False
) -> dict[str, Any]:
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        met = None
    else:
        met = measured >= limit if higher_is_better else measured <= limit
    return {"goal": goal, "figure": figure, "measured": measured, "limit": limit, "met": met}


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _gw(session: Session) -> str | None:
    return session.targets[1].name if len(session.targets) > 1 else None


async def run_sweep(
    session: Session, spec: LoadSpec, levels: list[int] | None, rates: list[float] | None
) -> dict[str, Any]:
    out: list[LevelResult] = []
    if rates:
        for rate in rates:
            out.append(await session.run_level(replace(spec, rate=rate)))
    else:
        for c in levels or [spec.concurrency]:
            out.append(await session.run_level(replace(spec, concurrency=c)))
    return {"levels": out, "goals": [], "findings": {}}


async def _single(session: Session, spec: LoadSpec, p: Preset) -> dict[str, Any]:
    level = await session.run_level(replace(spec, concurrency=1))
    gw = _gw(session)
    cmp = level.comparison.get(gw or "", {})
    goals = [
        _goal("single stream", "added TTFT p50 (ms)", _get(cmp, "added", "ttft_ms", "p50"), 0.5),
        _goal("single stream", "added TTFT p99 (ms)", _get(cmp, "added", "ttft_ms", "p99"), 1.5),
        _goal("single stream", "added ITL p99 (ms)", _get(cmp, "added", "itl_ms", "p99"), 0.5),
    ]
    return {"levels": [level], "goals": goals, "findings": {}}


async def _c1000(session: Session, spec: LoadSpec, p: Preset) -> dict[str, Any]:
    level = await session.run_level(spec)
    gw = _gw(session)
    cmp = level.comparison.get(gw or "", {})
    errors = _get(level.summaries.get(gw or "", {}), "failed")
    goals = [
        _goal(
            f"{spec.concurrency} streams",
            "goodput ratio (share of requests meeting the limits)",
            _get(cmp, "ratio", "goodput_fraction"),
            0.99,
            True,
        ),
        _goal(
            f"{spec.concurrency} streams",
            "added TTFT p99 (ms)",
            _get(cmp, "added", "ttft_ms", "p99"),
            50,
        ),
        _goal(
            f"{spec.concurrency} streams",
            "added ITL p99 (ms)",
            _get(cmp, "added", "itl_ms", "p99"),
            10,
        ),
        _goal(f"{spec.concurrency} streams", "errors", errors, 0),
    ]
    return {"levels": [level], "goals": goals, "findings": {}}


async def _ceiling(session: Session, spec: LoadSpec, p: Preset) -> dict[str, Any]:
    """Raise concurrency until added ITL p99 passes 10 ms or anything fails."""
    gw = _gw(session)
    levels: list[LevelResult] = []
    best: dict[str, Any] = {}
    stop_reason = "all levels passed"
    for c in p.levels:
        level = await session.run_level(replace(spec, concurrency=c, num_requests=2 * c))
        levels.append(level)
        if gw is None:
            continue
        added_itl = _get(level.comparison[gw], "added", "itl_ms", "p99")
        failed = level.summaries[gw]["failed"] + level.summaries[session.targets[0].name]["failed"]
        if failed or added_itl is None or added_itl > 10:
            stop_reason = f"concurrency {c}: added ITL p99 {added_itl:.2f} ms, {failed} errors"
            progress(f"[ceiling] stop: {stop_reason}")
            break
        best = {
            "concurrency": c,
            "gateway_chunks_per_s": level.summaries[gw]["chunks_per_s"],
            "direct_chunks_per_s": level.summaries[session.targets[0].name]["chunks_per_s"],
            "added_itl_p99_ms": added_itl,
            "rig_limited": level.rig_limited,
        }
    goals = [
        _goal(
            "relay ceiling",
            "chunks/s through the gateway, added ITL p99 <= 10 ms",
            best.get("gateway_chunks_per_s"),
            15000,
            True,
        )
    ]
    return {"levels": levels, "goals": goals, "findings": {"ceiling": best, "stopped": stop_reason}}


async def _nonstream(session: Session, spec: LoadSpec, p: Preset) -> dict[str, Any]:
    """Max req/s in closed loop, then added p99 latency in open loop at 80% of the gateway's."""
    gw = _gw(session)
    spec = replace(spec, stream=False)
    top = await session.run_level(spec, label=f"max req/s, concurrency {spec.concurrency}")
    levels = [top]
    findings: dict[str, Any] = {
        "max_req_per_s": {k: v["req_per_s"] for k, v in top.summaries.items()}
    }
    goals = []
    if gw is not None:
        rate = 0.8 * top.summaries[gw]["req_per_s"]
        findings["open_loop_rate"] = rate
        at80 = await session.run_level(
            replace(spec, rate=rate), label=f"80% of max: {rate:,.0f} req/s"
        )
        levels.append(at80)
        goals = [
            _goal(
                "non-streaming",
                "gateway req/s (one core)",
                top.summaries[gw]["req_per_s"],
                2500,
                True,
            ),
            _goal(
                "non-streaming",
                "added E2EL p99 at 80% (ms)",
                _get(at80.comparison[gw], "added", "e2el_ms", "p99"),
                5,
            ),
        ]
    return {"levels": levels, "goals": goals, "findings": findings}


async def _memory(session: Session, spec: LoadSpec, p: Preset) -> dict[str, Any]:
    """RSS per active stream at ``concurrency`` streams, then growth over ``duration``."""
    gw = _gw(session)
    spec = replace(spec, duration=spec.duration or p.duration or 60.0)
    gw_session = Session(
        session.targets[1:] or session.targets,
        rounds=1,
        limits=session.limits,
        pace=session.pace,
        monitors=session.monitors,
        client_procs=session.client_procs,
        warmup=session.warmup,
    )
    try:
        held = await gw_session.run_level(
            replace(spec, duration=None), label=f"{spec.concurrency} streams held"
        )
        growth_spec = replace(
            spec,
            concurrency=max(1, spec.concurrency // 10),
            num_requests=None,
            max_tokens=max(4, spec.max_tokens // 4),
        )
        long = await gw_session.run_level(growth_spec, label=f"growth over {spec.duration:g}s")
    finally:
        gw_session.close()
    findings: dict[str, Any] = {}
    goals = []
    name = gw_session.targets[0].name
    _, s_held = held.phases[name][0]
    _, s_long = long.phases[name][0]
    if "gateway" in s_held.rss_before:
        per_stream = (s_held.rss_peak["gateway"] - s_held.rss_before["gateway"]) / max(
            spec.concurrency, 1
        )
        findings["rss_idle_mib"] = s_held.rss_before["gateway"] / 2**20
        findings["rss_peak_mib"] = s_held.rss_peak["gateway"] / 2**20
        findings["kib_per_active_stream"] = per_stream / 1024
        series = s_long.rss_series.get("gateway", [])
        # Growth after warm-up: the first fifth of the run fills caches and pools.
        warm = [r for t, r in series if t >= 0.2 * (spec.duration or 0)] or [r for _, r in series]
        findings["growth_mib"] = (warm[-1] - warm[0]) / 2**20 if warm else None
        findings["rss_series_mib"] = [(round(t, 2), r / 2**20) for t, r in series]
        goals = [
            _goal("memory", "KiB per active stream", findings["kib_per_active_stream"], 64),
            _goal(
                "memory", f"RSS growth over {spec.duration:g}s (MiB)", findings["growth_mib"], 1.0
            ),
        ]
    elif gw is not None:
        findings["note"] = "no gateway pid: pass --gateway-pid or use --rig to measure memory"
    return {"levels": [held, long], "goals": goals, "findings": findings}


_REFUSAL = re.compile(rb" 503 overloaded .* duration_ms=([0-9.]+)")


def gateway_refusals_ms(log: str | None) -> list[float]:
    """The gateway's own time for each 503 ``overloaded``, from its access log: from the request
    whole to the answer written."""
    if log is None or not Path(log).exists():
        return []
    return [
        float(m.group(1)) for m in map(_REFUSAL.search, Path(log).read_bytes().splitlines()) if m
    ]


async def _admission(session: Session, spec: LoadSpec, p: Preset) -> dict[str, Any]:
    """2N streams offered to a gateway limited to N with no queue: how fast is the excess refused?
    Seen by the client (which includes the rig's own delay for a burst of 2N, the same that shows
    in direct's TTFT) and by the gateway (its access log, when the rig kept it)."""
    level = await session.run_level(spec, label=f"limit {p.limit}, {spec.concurrency} offered")
    gw = _gw(session)
    findings: dict[str, Any] = {"limit": p.limit, "offered": spec.concurrency}
    goals = []
    if gw is not None:
        s = level.summaries[gw]
        refusals = {k: v for k, v in s["error_ms"].items() if k in ("http_429", "http_503")}
        worst = max((v["p99"] for v in refusals.values()), default=None)
        findings["refused"] = sum(s["errors"].get(k, 0) for k in refusals)
        findings["admitted"] = s["completed"]
        findings["refusal_ms"] = refusals
        # The log's last refusals are the measured rounds' (the warm-up round comes first): as
        # many as the client counted.
        refused = findings["refused"]
        own = gateway_refusals_ms(session.gateway_log)[-refused:] if refused else []
        own_p99 = None
        if own:
            findings["gateway_refusal_ms"] = metrics.summary_stats(own, scale=1.0)
            own_p99 = findings["gateway_refusal_ms"]["p99"]
        cmp = level.comparison[gw]
        goals = [
            _goal("admission", "excess refused within (p99 ms), as the client saw it", worst, 5),
            _goal(
                "admission",
                "excess refused within (p99 ms), the gateway's own: request whole to answer written",
                own_p99,
                5,
            ),
            _goal(
                "admission",
                "admitted: added TTFT p99 (ms)",
                _get(cmp, "added", "ttft_ms", "p99"),
                50,
            ),
            _goal(
                "admission", "admitted: added ITL p99 (ms)", _get(cmp, "added", "itl_ms", "p99"), 10
            ),
        ]
    return {"levels": [level], "goals": goals, "findings": findings}


async def _retry(session: Session, spec: LoadSpec, p: Preset) -> dict[str, Any]:
    return await run_retry(session, spec)


SCENARIOS: dict[str, Callable[[Session, LoadSpec, Preset], Awaitable[dict[str, Any]]]] = {
    "single": _single,
    "c1000": _c1000,
    "ceiling": _ceiling,
    "nonstream": _nonstream,
    "memory": _memory,
    "admission": _admission,
    "retry": _retry,
}
