"""The ``cache`` scenario: routing policies side by side, judged by the members' prefix cache.

The same seeded multi-turn workload (``cache_workload``) is sent, in turn, to one gateway per
routing policy (``round_robin``, ``least_outstanding``, ``prefix``, ``cache_aware``), all in front
of the same members, and to ``single``: one member served directly, the hit-rate ceiling of a
member with that cache. A *phase* is one target once through the whole workload: every member's
prefix cache is emptied first (``POST /reset_prefix_cache``) and every member's ``/metrics`` read
before and after, so each phase's figures come from its own traffic only. Rounds repeat the cycle
of targets, the order rotated each round, so that drift on a shared machine falls on every policy.

Per target (all rounds pooled): the prefix cache hit rate summed over members (Σ hits / Σ queries
of the metric deltas), TTFT p50/p99 of the streamed turns, the requests each member finished and
their spread (max / min, and max - min as a share of all), errors, and the gateway's CPU time per
request (``/proc``), so that the cost of a routing decision shows. A policy whose gateway would
not start is reported as unavailable, with the gateway's own words.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any

from vllm_gateway_tools.bench import cache_probe, metrics
from vllm_gateway_tools.bench.cache_probe import Snapshot
from vllm_gateway_tools.bench.cache_rig import POLICIES, CacheRig, CacheRigConfig
from vllm_gateway_tools.bench.cache_workload import Workload, answer_text
from vllm_gateway_tools.bench.client import Connection, RequestResult, Target, build_request
from vllm_gateway_tools.bench.rig import RigError
from vllm_gateway_tools.bench.runner import PhaseResult, ProcMonitor, progress, watch

__all__ = ["PRESET", "CachePreset", "run", "run_conversations"]

SINGLE = "single"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class CachePreset:
    """The scenario's defaults; ``quick`` values replace the full ones under ``--quick``."""

    members: int = 2
    groups: int = 4
    conversations: int = 48
    turns: int = 8
    concurrency: int = 8
    system_tokens: int = 256
    user_tokens: int = 64
    max_tokens: int = 16
    rounds: int = 2
    cache_blocks: int = 4096
    block_size: int = 16
    prefill_per_token: float = 0.00005
    ttft: float = 0.005
    itl: float = 0.005
    quick: dict[str, Any] | None = None

    def sized(self, quick: bool) -> CachePreset:
        return replace(self, **(self.quick or {}), quick=None) if quick else self


# Full: a few minutes on two cores. Quick: seconds; short turns over short system prompts, so that
# most of what a turn can hit is its own conversation's history (what routing decides).
PRESET = CachePreset(
    quick={
        "groups": 2,
        "conversations": 8,
        "turns": 5,
        "concurrency": 2,
        "system_tokens": 48,
        "user_tokens": 32,
        "max_tokens": 4,
        "rounds": 1,
    }
)


# --- one phase: the whole workload against one target -------------------------------------------


async def run_conversations(target: Target, work: Workload, timeout: float) -> PhaseResult:
    """Every conversation of ``work`` against ``target``, ``work.concurrency`` at a time, each
    turn after the previous one's answer. Result ``idx`` is ``conversation * turns + turn``."""
    out = PhaseResult()
    pending = iter(range(work.conversations))
    out.wall_start = time.time()
    t0 = perf_counter()

    async def user() -> None:
        conn: Connection | None = None
        for conv in pending:
            messages = work.opening(conv)
            for turn in range(work.turns):
                idx = conv * work.turns + turn
                if turn:
                    messages.append({"role": "user", "content": work.user_message(conv, turn)})
                if conn is None or conn.closed:
                    try:
                        conn = await Connection.open(target, True, True, 10.0)
                    except (TimeoutError, OSError):
                        out.results.append(RequestResult(idx=idx, error="connect"))
                        conn = None
                        await asyncio.sleep(0.01)
                        messages.append({"role": "assistant", "content": ""})
                        continue
                payload = build_request(target, CHAT, work.body(messages, conv, turn))
                out.results.append(await conn.request(idx, payload, timeout, t0))
                messages.append({"role": "assistant", "content": answer_text(conn.body)})
        if conn is not None:
            conn.close()

    await asyncio.gather(*(user() for _ in range(min(work.concurrency, work.conversations))))
    out.wall_end = time.time()
    out.results.sort(key=lambda r: r.idx)
    return out


@dataclass(slots=True)
class Phase:
    """One target's pass through the workload, and what the members counted meanwhile."""

    target: str
    round: int
    order: int
    result: PhaseResult
    members: list[Snapshot]  # per member: the change during the phase
    gateway_cpu: float | None

    def figures(self) -> dict[str, Any]:
        ok = [r for r in self.result.results if r.ok]
        queries = sum(m.queries for m in self.members)
        hits = sum(m.hits for m in self.members)
        ttft = metrics.summary_stats([r.ttft for r in ok])
        return {
            "round": self.round,
            "order": self.order,
            "wall_start": self.result.wall_start,
            "duration_s": self.result.duration,
            "completed": len(ok),
            "failed": len(self.result.results) - len(ok),
            "hit_rate": hits / queries if queries else math.nan,
            "ttft_ms": {"p50": ttft["p50"], "p99": ttft["p99"]},
            "member_requests": [m.requests for m in self.members],
        }


async def _phase(
    target: Target,
    rnd: int,
    order: int,
    members: Sequence[str],
    work: Workload,
    monitor: ProcMonitor | None,
    *,
    timeout: float,
    settle: float,
) -> Phase:
    await asyncio.gather(*(cache_probe.reset(u) for u in members))
    before = await asyncio.gather(*(cache_probe.snapshot(u) for u in members))
    monitors = {"gateway": monitor} if monitor is not None else {}
    result, sampled = await watch(
        monitors, functools.partial(run_conversations, target, work, timeout)
    )
    if settle:
        await asyncio.sleep(settle)  # a real vLLM updates its counters a moment after the reply
    after = await asyncio.gather(*(cache_probe.snapshot(u) for u in members))
    phase = Phase(
        target=target.name,
        round=rnd,
        order=order,
        result=result,
        members=[a - b for a, b in zip(after, before, strict=True)],
        gateway_cpu=sampled.cpu.get("gateway"),
    )
    f = phase.figures()
    counts = [int(n) for n in f["member_requests"]]
    shown = counts if len(counts) <= 8 else f"{min(counts)}..{max(counts)} over {len(counts)}"
    progress(
        f"[cache] round {rnd + 1} {target.name:>17}: {f['completed']}/{len(result.results)} ok "
        f"in {result.duration:.2f}s, hit rate {f['hit_rate']:.1%}, "
        f"TTFT p50 {f['ttft_ms']['p50']:.2f} ms p99 {f['ttft_ms']['p99']:.2f} ms, "
        f"member requests {shown}"
    )
    return phase


# --- turning phases into figures -------------------------------------------------------------------


def spread(counts: Sequence[float]) -> dict[str, float | None]:
    """How evenly requests fell on members: max / min (None when a member got none) and
    (max - min) / total, the gap between the busiest and idlest member's share."""
    if not counts:
        return {"max_over_min": None, "share_gap": None}
    total = sum(counts)
    low, high = min(counts), max(counts)
    return {
        "max_over_min": high / low if low > 0 else None,
        "share_gap": (high - low) / total if total else None,
    }


def summarise(phases: list[Phase], members: Sequence[str], *, gateway: bool) -> dict[str, Any]:
    """One target's figures over all its rounds."""
    results = [r for p in phases for r in p.result.results]
    ok = [r for r in results if r.ok]
    count = range(len(members))
    requests = [sum(p.members[i].requests for p in phases) for i in count]
    queries_each = [sum(p.members[i].queries for p in phases) for i in count]
    hits_each = [sum(p.members[i].hits for p in phases) for i in count]
    per_member = {"url": list(members), "requests": requests, "queries": queries_each,
                  "hits": hits_each}  # fmt: skip
    queries, hits = sum(queries_each), sum(hits_each)
    out: dict[str, Any] = {
        "available": True,
        "rounds": len(phases),
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error or "unknown" for r in results if not r.ok)),
        "queries": queries,
        "hits": hits,
        "hit_rate": hits / queries if queries else math.nan,
        "ttft_ms": metrics.summary_stats([r.ttft for r in ok]),
        "e2el_ms": metrics.summary_stats([r.e2el for r in ok]),
        "duration_s": sum(p.result.duration for p in phases),
        "per_member": per_member,
        # A direct member has no routing to spread: only a gateway's spread is a finding.
        "spread": spread(requests) if gateway else None,
        "per_round": [p.figures() for p in phases],
    }
    cpu = [p.gateway_cpu for p in phases if p.gateway_cpu is not None]
    if gateway and cpu:
        out["gateway_cpu_s"] = sum(cpu)
        out["gateway_cpu_us_per_request"] = sum(cpu) / max(len(ok), 1) * 1e6
    return out


# --- the run -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    work: Workload
    rounds: int
    rig: CacheRigConfig
    timeout: float
    api_key: str | None
    quick: bool
    warmup: bool
    targets: list[tuple[Target, ProcMonitor | None]] = field(default_factory=list)


def _plan(args: argparse.Namespace) -> _Plan:
    p = PRESET.sized(args.quick)

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    member_urls = tuple(args.member_urls or ())
    rig = CacheRigConfig(
        members=len(member_urls) or pick("members", p.members),
        member_urls=member_urls,
        policies=tuple(args.policies or POLICIES),
        ttft=pick("ttft", p.ttft),
        itl=pick("itl", p.itl),
        cache_blocks=pick("cache_blocks", p.cache_blocks),
        block_size=pick("block_size", p.block_size),
        prefill_per_token=pick("prefill_per_token", p.prefill_per_token),
        gateway_env=tuple(args.gateway_env or ()),
    )
    work = Workload(
        model=args.model or "default",
        groups=pick("groups", p.groups),
        conversations=pick("conversations", p.conversations),
        turns=pick("turns", p.turns),
        concurrency=pick("concurrency", p.concurrency),
        system_tokens=pick("system_tokens", p.system_tokens),
        user_tokens=pick("user_tokens", p.user_tokens),
        max_tokens=pick("max_tokens", p.max_tokens),
        seed=args.seed,
    )
    return _Plan(work, pick("rounds", p.rounds), rig, args.timeout, args.api_key, args.quick,
                 args.warmup)  # fmt: skip


async def _warm(target: Target, work: Workload, timeout: float) -> None:
    """One short unrecorded turn per user: connections (and the gateway's to its members) open
    before the clock starts. The caches it fills are emptied before each phase."""
    warm = replace(work, conversations=work.concurrency, turns=1, max_tokens=1, system_tokens=8,
                   user_tokens=8, seed=work.seed + 7919)  # fmt: skip
    await run_conversations(target, warm, timeout)


async def _rounds(plan: _Plan, members: list[str], *, settle: float) -> dict[str, list[Phase]]:
    """Warm every target, then ``plan.rounds`` cycles of phases, the order rotated each round."""
    if plan.warmup:
        for target, _ in plan.targets:
            await _warm(target, plan.work, plan.timeout)
    phases: dict[str, list[Phase]] = {t.name: [] for t, _ in plan.targets}
    n = len(plan.targets)
    for rnd in range(plan.rounds):
        rotated = plan.targets[rnd % n :] + plan.targets[: rnd % n]
        for k, (target, monitor) in enumerate(rotated):
            phase = await _phase(target, rnd, k, members, plan.work, monitor,
                                 timeout=plan.timeout, settle=settle)  # fmt: skip
            phases[target.name].append(phase)
    return phases


async def run(args: argparse.Namespace, model_of: Any) -> dict[str, Any]:
    """The whole scenario; ``model_of(target)`` names the served model when ``--model`` is not
    given. Returns the results document (``report.write`` turns it into files)."""
    plan = _plan(args)
    started = time.time()
    async with CacheRig(plan.rig) as rig:
        members = rig.member_urls
        progress(
            f"cache rig: {len(members)} member(s), gateways "
            + ", ".join(f"{k} {v}" for k, v in rig.gateways.items())
            + "".join(f"; {k} unavailable ({v[:200]})" for k, v in rig.unavailable.items())
        )
        single = Target(SINGLE, members[0], api_key=plan.api_key)
        if args.model is None:
            plan.work = replace(plan.work, model=await model_of(single))
        plan.targets = [(single, None)] + [
            (Target(p, rig.gateways[p], api_key=plan.api_key), ProcMonitor(rig.gateway_pids[p]))
            for p in plan.rig.policies
            if p in rig.gateways
        ]
        try:
            phases = await _rounds(plan, members, settle=1.0 if rig.external else 0.0)
        except OSError as exc:  # a member that cannot be read or reset (TimeoutError included)
            raise RigError(f"cache scenario: {exc}") from None
        policies: dict[str, Any] = {}
        for target, _ in plan.targets:
            used = members[:1] if target.name == SINGLE else members
            ran = phases[target.name]
            if target.name == SINGLE:  # only the first member served it
                ran = [replace(p, members=p.members[:1]) for p in ran]
            policies[target.name] = {
                "url": target.url,
                **summarise(ran, used, gateway=target.name != SINGLE),
            }
        for policy, why in rig.unavailable.items():
            policies[policy] = {"available": False, "reason": why}
        rig_doc = rig.describe()
    order = [SINGLE, *plan.rig.policies]
    policies = {k: policies[k] for k in order if k in policies}
    return {
        "scenario": "cache",
        "quick": plan.quick,
        "started": started,
        "elapsed_s": time.time() - started,
        "config": {
            **plan.work.as_dict(),
            "rounds": plan.rounds,
            "members": len(rig_doc["members"]),
            "policies": list(plan.rig.policies),
            "timeout": plan.timeout,
            "targets": [{"name": t.name, "url": t.url} for t, _ in plan.targets],
        },
        "rig": rig_doc,
        "policies": policies,
        "levels": [],
        "goals": [],
        "findings": {
            "hit_rate": {k: v.get("hit_rate") for k, v in policies.items() if v["available"]},
            "unavailable": sorted(k for k, v in policies.items() if not v["available"]),
        },
    }
