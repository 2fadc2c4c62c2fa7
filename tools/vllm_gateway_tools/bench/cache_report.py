"""The ``cache`` scenario's report: one table, a column per target (``single`` and each policy).

``report.markdown`` hands a ``cache`` document here; the JSON (``results.json``) holds the same
figures and more (every member's counts, every round).
"""

from __future__ import annotations

import math
from typing import Any

from vllm_gateway_tools.bench.metrics import lookup

__all__ = ["markdown"]

# (label, path into a target's figures, decimals; None: a percentage)
ROWS: list[tuple[str, tuple[str, ...], int | None]] = [
    ("prefix cache hit rate (Σ hits / Σ queries)", ("hit_rate",), None),
    ("cached tokens", ("hits",), 0),
    ("prompt tokens", ("queries",), 0),
    ("TTFT p50 (ms)", ("ttft_ms", "p50"), 2),
    ("TTFT p99 (ms)", ("ttft_ms", "p99"), 2),
    ("E2EL p50 (ms)", ("e2el_ms", "p50"), 2),
    ("requests", ("requests",), 0),
    ("failed", ("failed",), 0),
    ("load spread: max / min requests per member", ("spread", "max_over_min"), 2),
    ("load spread: max - min share", ("spread", "share_gap"), None),
    ("gateway CPU per request (µs)", ("gateway_cpu_us_per_request",), 0),
]


def _fmt(value: Any, decimals: int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if decimals is None:
        return f"{100 * value:.1f}%"
    return f"{value:,.{decimals}f}"


def markdown(doc: dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    rig = doc.get("rig") or {}
    policies: dict[str, dict[str, Any]] = doc.get("policies", {})
    out = ["# Benchmark: cache", ""]
    out.append(
        f"Load: {cfg.get('conversations')} conversations of {cfg.get('turns')} turns, "
        f"{cfg.get('concurrency')} at a time, over {cfg.get('groups')} shared system prompts of "
        f"{cfg.get('system_tokens')} tokens; {cfg.get('user_tokens')}-token user turns, "
        f"max_tokens {cfg.get('max_tokens')}, streamed; {cfg.get('rounds')} round(s), the order "
        f"of targets rotated each round; seed {cfg.get('seed')}."
    )
    members = rig.get("members", [])
    if rig.get("external_members"):
        out.append(f"Members: {len(members)} external server(s): {', '.join(members)}.")
    else:
        out.append(
            f"Members: {len(members)} simulator(s), each a prefix cache of "
            f"{rig.get('cache_blocks')} blocks of {rig.get('block_size')} tokens, TTFT "
            f"{rig.get('ttft')} s + {rig.get('prefill_per_token')} s per uncached prompt token, "
            f"{rig.get('itl')} s per chunk."
        )
    out.append(
        "`single` is the first member served directly: the hit rate one member's cache reaches "
        "on the whole workload. Each policy is one gateway in front of every member. Every "
        "member's cache is emptied before each phase."
    )
    available = [k for k, v in policies.items() if v.get("available")]
    if available:
        out += ["", "| figure | " + " | ".join(available) + " |"]
        out.append("|---|" + "---:|" * len(available))
        for label, path, dec in ROWS:
            values = [lookup(policies[k], path) for k in available]
            if all(v is None for v in values):
                continue
            out.append(f"| {label} | " + " | ".join(_fmt(v, dec) for v in values) + " |")
        errors = sorted({e for k in available for e in policies[k].get("errors", {})})
        for kind in errors:
            cells = [str(policies[k].get("errors", {}).get(kind, 0)) for k in available]
            out.append(f"| errors: {kind} | " + " | ".join(cells) + " |")
        out += ["", "Requests per member:", ""]
        for k in available:
            per = policies[k].get("per_member", {})
            counts = ", ".join(f"{n:,.0f}" for n in per.get("requests", []))
            out.append(f"- {k}: {counts}")
    missing = {k: v for k, v in policies.items() if not v.get("available")}
    if missing:
        out += ["", "Unavailable:", ""]
        for k, v in missing.items():
            out.append(f"- {k}: {v.get('reason', '')}")
    return "\n".join(out).rstrip() + "\n"
