"""A benchmark session: load levels x rounds x targets, measured side by side, summarised.

``Session.run_level`` sends every target the same seeded load ``rounds`` times, alternating the
order (A B, then B A, ...), watching the gateway and backend processes when their pids are known.
Its result (``LevelResult.as_dict``) holds, per target, the pooled figures of ``metrics.summarise``
plus the CPU and memory of each watched process and of the client itself; then ``added`` and
``ratio`` of every target against the first (the baseline, normally ``direct``), fidelity of each
target's digests against the baseline's, and the rig-limited verdict.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_gateway_tools.bench import metrics
from vllm_gateway_tools.bench.client import RequestResult, Target
from vllm_gateway_tools.bench.runner import (
    LoadSpec,
    PhaseResult,
    ProcMonitor,
    Sampled,
    make_bodies,
    new_pool,
    progress,
    run_phase,
    run_phase_parallel,
    watch,
)

__all__ = ["LevelResult", "Session"]

# "Within 10% of what the direct run itself reaches" (docs/benchmark.md, rig-limited).
RIG_MARGIN = 0.9
# A core this busy with client + backend work cannot produce more load.
RIG_BUSY = 0.85


@dataclass(slots=True)
class LevelResult:
    label: str
    spec: LoadSpec
    phases: dict[str, list[tuple[PhaseResult, Sampled]]] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparison: dict[str, dict[str, Any]] = field(default_factory=dict)
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)
    rig_limited: bool = False
    notes: list[str] = field(default_factory=list)

    def results(self, target: str) -> list[RequestResult]:
        return [r for phase, _ in self.phases.get(target, []) for r in phase.results]

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "concurrency": self.spec.concurrency if self.spec.rate is None else None,
            "rate": self.spec.rate,
            "stream": self.spec.stream,
            "max_tokens": self.spec.max_tokens,
            "targets": self.summaries,
            "comparison": self.comparison,
            "fidelity": self.fidelity,
            "rig_limited": self.rig_limited,
            "notes": self.notes,
        }


class Session:
    """Targets, watched processes and the client pool for one benchmark run."""

    def __init__(
        self,
        targets: list[Target],
        *,
        rounds: int = 2,
        limits: metrics.GoodputLimits | None = None,
        pace: float | None = None,
        monitors: dict[str, ProcMonitor] | None = None,
        client_procs: int = 1,
        warmup: bool = True,
    ) -> None:
        if not targets:
            raise ValueError("at least one target is needed")
        self.targets = targets
        self.rounds = max(1, rounds)
        self.limits = limits or metrics.GoodputLimits()
        self.pace = pace
        self.monitors = monitors or {}
        self.client_procs = max(1, client_procs)
        self.warmup = warmup
        self.gateway_log: str | None = None  # the rig's gateway's output, when it is kept
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._bodies: dict[LoadSpec, list[bytes]] = {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    async def _phase(self, target: Target, spec: LoadSpec) -> PhaseResult:
        if self.client_procs > 1:
            if self._pool is None:
                self._pool = new_pool(self.client_procs)
            return await run_phase_parallel(self._pool, self.client_procs, target, spec)
        if spec not in self._bodies:
            self._bodies = {spec: make_bodies(spec, spec.num_requests or 4096)}
        return await run_phase(target, spec, self._bodies[spec])

    async def run_level(self, spec: LoadSpec, label: str | None = None) -> LevelResult:
        label = label or (
            f"rate {spec.rate:g}/s" if spec.rate else f"concurrency {spec.concurrency}"
        )
        level = LevelResult(label=label, spec=spec)
        if self.warmup:
            await self._warm(spec)
        for rnd in range(self.rounds):
            order = self.targets if rnd % 2 == 0 else list(reversed(self.targets))
            for target in order:
                phase, sampled = await watch(
                    self.monitors, functools.partial(self._phase, target, spec)
                )
                level.phases.setdefault(target.name, []).append((phase, sampled))
                ok = sum(r.ok for r in phase.results)
                itl = metrics.summary_stats([g for r in phase.results if r.ok for g in r.itl])
                ttft = metrics.summary_stats([r.ttft for r in phase.results if r.ok])
                progress(
                    f"[{label}] round {rnd + 1}/{self.rounds} {target.name:>8}: "
                    f"{ok}/{len(phase.results)} ok in {phase.duration:.2f}s, "
                    f"{sum(r.chunks for r in phase.results) / phase.duration:,.0f} chunks/s, "
                    f"TTFT p50 {ttft['p50']:.2f} ms p99 {ttft['p99']:.2f} ms, "
                    f"ITL p99 {itl['p99']:.2f} ms"
                )
        self._summarise(level)
        return level

    async def _warm(self, spec: LoadSpec) -> None:
        """One short, unrecorded request per user and target: pools and caches fill first."""
        users = spec.concurrency if spec.rate is None else min(64, max(1, int(spec.rate)))
        warm = replace(
            spec,
            rate=None,
            concurrency=users,
            num_requests=users,
            duration=None,
            max_tokens=min(spec.max_tokens, 2),
            fidelity=False,
        )
        for target in self.targets:
            await run_phase(target, warm, make_bodies(warm, users))

    # --- turning phases into figures ------------------------------------------------------

    def _summarise(self, level: LevelResult) -> None:
        for name, phases in level.phases.items():
            results = [r for p, _ in phases for r in p.results]
            duration = sum(p.duration for p, _ in phases)
            summary = metrics.summarise(results, duration, self.limits, self.pace)
            summary["rounds"] = len(phases)
            summary["per_round"] = [_round_figures(p) for p, _ in phases]
            summary["resources"] = _resources(phases, summary, duration)
            level.summaries[name] = summary
        base = self.targets[0].name
        for target in self.targets[1:]:
            level.comparison[target.name] = metrics.compare(
                level.summaries[base], level.summaries[target.name]
            )
            level.fidelity[target.name] = _fidelity(level, base, target.name)
        self._judge_rig(level)

    def _judge_rig(self, level: LevelResult) -> None:
        base = level.summaries[self.targets[0].name]
        res = base["resources"]
        rig_busy = res.get("client_cpu_util", 0.0) + res.get("backend_cpu_util", 0.0)
        for target in self.targets[1:]:
            other = level.summaries[target.name]
            figure = "req_per_s" if not level.spec.stream else "chunks_per_s"
            if (
                base[figure] > 0
                and other[figure] >= RIG_MARGIN * base[figure]
                and rig_busy >= RIG_BUSY
            ):
                level.rig_limited = True
                level.notes.append(
                    f"{target.name} reaches {other[figure] / base[figure]:.0%} of direct {figure} while "
                    f"the load generator and backend kept {rig_busy:.0%} of a core busy: "
                    "the rig, not the gateway, is the limit at this level"
                )
            fid = level.fidelity.get(target.name, {})
            if fid.get("compared") and fid["identical"] != fid["compared"]:
                level.notes.append(
                    f"fidelity: {fid['compared'] - fid['identical']} of {fid['compared']} "
                    f"{target.name} responses differ from direct"
                )


def _fidelity(level: LevelResult, base: str, other: str) -> dict[str, Any]:
    """Digests compared round by round: request ``i`` of round ``k`` against the same on direct."""
    compared = identical = 0
    for (bp, _), (op, _) in zip(level.phases[base], level.phases[other], strict=False):
        f = metrics.fidelity(bp.results, op.results)
        compared += int(f["compared"])
        identical += int(f["identical"])
    return {
        "compared": compared,
        "identical": identical,
        "fraction": identical / compared if compared else math.nan,
    }


def _resources(
    phases: list[tuple[PhaseResult, Sampled]], summary: dict[str, Any], duration: float
) -> dict[str, Any]:
    """CPU per chunk and per request, and memory, of the client and of each watched process."""
    chunks = max(summary["chunks"], 1)
    done = max(summary["completed"], 1)
    client = sum(p.client_cpu for p, _ in phases)
    out: dict[str, Any] = {
        "client_cpu_s": client,
        "client_cpu_util": client / duration,
        "client_cpu_us_per_chunk": client / chunks * 1e6,
        "client_cpu_us_per_request": client / done * 1e6,
    }
    names = {k for _, s in phases for k in s.cpu}
    for name in sorted(names):
        cpu = sum(s.cpu.get(name, 0.0) for _, s in phases)
        out[f"{name}_cpu_s"] = cpu
        out[f"{name}_cpu_util"] = cpu / duration
        out[f"{name}_cpu_us_per_chunk"] = cpu / chunks * 1e6
        out[f"{name}_cpu_us_per_request"] = cpu / done * 1e6
        before = [s.rss_before[name] for _, s in phases if name in s.rss_before]
        peak = [s.rss_peak[name] for _, s in phases if name in s.rss_peak]
        after = [s.rss_after[name] for _, s in phases if name in s.rss_after]
        if before and peak and after:
            out[f"{name}_rss_idle_mib"] = before[0] / 2**20
            out[f"{name}_rss_peak_mib"] = max(peak) / 2**20
            out[f"{name}_rss_growth_mib"] = (after[-1] - before[0]) / 2**20
    return out


def _round_figures(phase: PhaseResult) -> dict[str, Any]:
    """One round's own figures: on a noisy machine the spread between rounds is the error bar."""
    ok = [r for r in phase.results if r.ok]

    def stats(values: list[float]) -> dict[str, float]:
        s = metrics.summary_stats(values)
        return {"p50": s["p50"], "p99": s["p99"]}

    return {
        "wall_start": phase.wall_start,
        "duration_s": phase.duration,
        "completed": len(ok),
        "failed": len(phase.results) - len(ok),
        "tokens_per_s": sum(r.tokens for r in ok) / phase.duration,
        "ttft_ms": stats([r.ttft for r in ok]),
        "headers_ms": stats([r.headers for r in ok]),
        "itl_ms": stats([g for r in ok for g in r.itl]),
    }
