"""The benchmark's arithmetic: pure functions from request results to figures.

Definitions follow vLLM's ``vllm bench serve`` so that numbers compare:
- TTFT: send to the first non-empty content chunk (the whole response when not streamed).
- E2EL: send to the last byte.
- TPOT: per request, (E2EL - TTFT) / (output tokens - 1); requests with one token have none.
- ITL: every gap between consecutive content chunks, pooled over all requests.
- Goodput: requests meeting every limit, per second.
Times go in as seconds and come out as milliseconds. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_gateway_tools.bench.client import RequestResult

__all__ = [
    "GoodputLimits",
    "compare",
    "lookup",
    "parse_goodput",
    "percentile",
    "summarise",
    "summary_stats",
    "tpot",
]

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by linear interpolation (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    frac = pos - lo
    return float(data[lo] + (data[hi] - data[lo]) * frac)


def summary_stats(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, p50, p90, p99 and max of ``values`` times ``scale`` (seconds to ms by default)."""
    if not values:
        return {
            "n": 0,
            "mean": math.nan,
            "p50": math.nan,
            "p90": math.nan,
            "p99": math.nan,
            "max": math.nan,
        }
    data = sorted(v * scale for v in values)
    out: dict[str, float] = {"n": len(data), "mean": math.fsum(data) / len(data)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(data, q)
    out["max"] = data[-1]
    return out


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first, in seconds; None when there is no second token."""
    if result.tokens <= 1:
        return None
    return (result.e2el - result.ttft) / (result.tokens - 1)


@dataclass(frozen=True, slots=True)
class GoodputLimits:
    """Per-request limits in milliseconds; a request is "good" if it meets every one set."""

    ttft: float | None = None
    tpot: float | None = None
    itl: float | None = None  # the largest gap between chunks
    e2el: float | None = None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft is not None and r.ttft * 1000 > self.ttft:
            return False
        if self.e2el is not None and r.e2el * 1000 > self.e2el:
            return False
        if self.itl is not None and r.itl and max(r.itl) * 1000 > self.itl:
            return False
        if self.tpot is not None:
            t = tpot(r)
            if t is not None and t * 1000 > self.tpot:
                return False
        return True

    def as_dict(self) -> dict[str, float]:
        return {
            k: v for k in ("ttft", "tpot", "itl", "e2el") if (v := getattr(self, k)) is not None
        }


def parse_goodput(spec: str | Iterable[str] | None) -> GoodputLimits:
    """``"itl:200,ttft:500"`` (or a list of such items) to limits; raises ValueError if invalid."""
    if not spec:
        return GoodputLimits()
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    limits: dict[str, float] = {}
    for item in items:
        key, sep, value = item.strip().partition(":")
        if not sep or key not in ("ttft", "tpot", "itl", "e2el"):
            raise ValueError(f"goodput limit {item!r}: expected ttft|tpot|itl|e2el:<ms>")
        number = float(value)
        if not math.isfinite(number) or number <= 0:
            raise ValueError(f"goodput limit {item!r}: must be a positive number of ms")
        limits[key] = number
    return GoodputLimits(**limits)


def summarise(
    results: Sequence[RequestResult],
    duration: float,
    limits: GoodputLimits,
    pace: float | None = None,
) -> dict[str, Any]:
    """Every figure of one target at one load level; ``pace`` is the upstream chunk gap (s)."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error or "unknown" for r in results if not r.ok)
    error_ms: dict[str, dict[str, float]] = {}
    for kind in errors:
        error_ms[kind] = summary_stats([r.e2el for r in results if not r.ok and r.error == kind])
    itl = [g for r in ok for g in r.itl]
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    chunks = sum(r.chunks for r in ok)
    tokens = sum(r.tokens for r in ok)
    good = sum(1 for r in ok if limits.met_by(r))
    duration = max(duration, 1e-9)
    stall_gap = 2 * pace if pace else None
    stalls = sum(1 for g in itl if g > stall_gap) if stall_gap else 0
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(errors),
        "error_ms": error_ms,
        "duration_s": duration,
        "chunks": chunks,
        "output_tokens": tokens,
        "ttft_ms": summary_stats([r.ttft for r in ok]),
        "headers_ms": summary_stats([r.headers for r in ok]),
        "tpot_ms": summary_stats(tpots),
        "itl_ms": summary_stats(itl),
        "e2el_ms": summary_stats([r.e2el for r in ok]),
        "req_per_s": len(ok) / duration,
        "tokens_per_s": tokens / duration,
        "chunks_per_s": chunks / duration,
        "goodput_req_per_s": good / duration,
        "goodput_fraction": good / len(results) if results else math.nan,
        "stalls": stalls,
        "stall_gap_ms": stall_gap * 1000 if stall_gap else None,
    }


def fidelity(
    baseline: Sequence[RequestResult], other: Sequence[RequestResult]
) -> dict[str, int | float]:
    """Compare the per-request digests of two runs of the same seeded requests, by index."""
    base = {r.idx: r.digest for r in baseline if r.ok and r.digest}
    compared = same = 0
    for r in other:
        if r.ok and r.digest and r.idx in base:
            compared += 1
            same += r.digest == base[r.idx]
    return {
        "compared": compared,
        "identical": same,
        "fraction": same / compared if compared else math.nan,
    }


def _walk(a: Any, b: Any, fn: Any) -> Any:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return {k: _walk(a[k], b[k], fn) for k in a if k in b and not isinstance(a[k], str)}
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return fn(float(a), float(b))
    return None


def compare(direct: Mapping[str, Any], gateway: Mapping[str, Any]) -> dict[str, Any]:
    """``added`` (gateway - direct) and ``ratio`` (gateway / direct) for every numeric figure."""

    def added(a: float, b: float) -> float:
        return b - a

    def ratio(a: float, b: float) -> float:
        if a == 0 or math.isnan(a) or math.isnan(b):
            return math.nan
        return b / a

    return {"added": _walk(direct, gateway, added), "ratio": _walk(direct, gateway, ratio)}


def lookup(d: Any, path: tuple[str, ...]) -> Any:
    """``d[path[0]][path[1]]...`` of a results document, or None where a step is missing."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d
