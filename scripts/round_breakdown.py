"""Where the time to first token goes, round by round, in a `scripts/gpu_bench.sh sweep` folder.

    python scripts/round_breakdown.py OUT [--json FILE]
    python scripts/round_breakdown.py --results R.json --samples S.jsonl.gz --access A.log.gz

The second form reads the files as kept in docs/results/gpu/ (gzipped where large).

For every level, target and round of ``OUT/sweep/results.json`` it prints what the client saw
(TTFT and time to headers, p50/p99), what vLLM's engine saw in the same window (its own TTFT
histogram, from arrival in the engine, and its queue time: ``OUT/vllm-metrics.jsonl``), and for
the gateway's rounds what the gateway saw (``OUT/gateway-*.log`` access lines in JSON): its own
time to first byte, and ``backend_ms``, the wait for vLLM's response headers, which covers vLLM's
HTTP and preprocessing (chat template, tokenization) before the request reaches the engine.

Engine percentiles are interpolated inside the histogram's buckets (as PromQL's
``histogram_quantile`` does): read them as coarse; the means are exact.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    data = sorted(values)
    k = (len(data) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def bucket_quantile(buckets: dict[str, float], q: float) -> float:
    """``histogram_quantile`` over cumulative bucket counts keyed by their ``le`` label."""
    points = sorted((math.inf if le == "+Inf" else float(le), n) for le, n in buckets.items())
    total = points[-1][1] if points else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in points:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


def read_text(path: Path) -> str:
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode(errors="replace")
    return path.read_text(errors="replace")


def load_samples(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    rows = []
    for line in read_text(path).splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short when the sampler was stopped
    return sorted(rows, key=lambda r: r["t"])


def engine_window(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """vLLM's histograms between the last samples taken at or before ``start`` and ``end``.

    First tokens of a round come well after its start and none in its last half second (the
    streams are finishing), so these two samples bound the round without its neighbours.
    """
    before = [s for s in samples if s["t"] <= start]
    until = [s for s in samples if s["t"] <= end]
    if not before or not until or until[-1] is before[-1]:
        return {}
    a, b = before[-1], until[-1]
    out: dict[str, float] = {}
    for key in ("ttft", "queue"):
        count = b.get(f"{key}_count", 0.0) - a.get(f"{key}_count", 0.0)
        if count <= 0:
            continue
        total = b.get(f"{key}_sum", 0.0) - a.get(f"{key}_sum", 0.0)
        out[f"{key}_n"] = count
        out[f"{key}_mean_ms"] = 1000 * total / count
        if key == "ttft":
            ba, bb = a.get("ttft_buckets", {}), b.get("ttft_buckets", {})
            delta = {le: bb[le] - ba.get(le, 0.0) for le in bb}
            out["ttft_p50_ms"] = 1000 * bucket_quantile(delta, 0.50)
            out["ttft_p99_ms"] = 1000 * bucket_quantile(delta, 0.99)
    return out


def load_access(logs: list[Path]) -> list[dict[str, Any]]:
    """The gateway's access lines, each with ``t0``: its arrival, as epoch seconds."""
    lines = []
    for log in logs:
        for text in read_text(log).splitlines():
            if not text.startswith("{"):
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                continue
            if rec.get("logger") != "vllm_gateway.access":
                continue
            ended = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            rec["t0"] = ended - rec["duration_ms"] / 1000
            lines.append(rec)
    return lines


def gateway_window(access: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    recs = [r for r in access if start <= r["t0"] <= end and r.get("ttft_ms") is not None]
    if not recs:
        return {}
    backend = [r["backend_ms"] for r in recs if r.get("backend_ms") is not None]
    ttft = [r["ttft_ms"] for r in recs]
    return {
        "n": len(recs),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "backend_p50_ms": percentile(backend, 50),
        "backend_p99_ms": percentile(backend, 99),
        # The rest of the gateway's time to first byte: its own work before the send, plus
        # vLLM's time from its headers to its first token.
        "after_headers_p99_ms": percentile([r["ttft_ms"] - r["backend_ms"] for r in recs], 99),
    }


def breakdown(results: Path, samples_path: Path | None, logs: list[Path]) -> list[dict[str, Any]]:
    doc = json.loads(read_text(results))
    samples = load_samples(samples_path)
    access = load_access(logs)
    rows = []
    for position, level in enumerate(doc["levels"]):
        for target, summary in level["targets"].items():
            for i, rnd in enumerate(summary.get("per_round", []), 1):
                start, end = rnd["wall_start"], rnd["wall_start"] + rnd["duration_s"]
                row = {
                    "level": level["label"],
                    "position": position,
                    "target": target,
                    "round": i,
                    "wall_start": start,
                    "tokens_per_s": rnd["tokens_per_s"],
                    "client": {"ttft": rnd["ttft_ms"], "headers": rnd["headers_ms"]},
                    "engine": engine_window(samples, start, end),
                    "gateway": gateway_window(access, start, end) if target != "direct" else {},
                }
                rows.append(row)
    return sorted(rows, key=lambda r: (r["position"], r["wall_start"]))


def _f(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f}"


def render(rows: list[dict[str, Any]]) -> str:
    out = [
        "| level | order | target | tok/s | client TTFT p50 / p99 | client headers p99 "
        "| engine TTFT mean / p50 / p99 | engine queue mean | gateway backend_ms p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order: dict[str, int] = {}
    for r in rows:
        order[r["level"]] = order.get(r["level"], 0) + 1
        c, e, g = r["client"], r["engine"], r["gateway"]
        out.append(
            f"| {r['level']} | {order[r['level']]} | {r['target']} | {_f(r['tokens_per_s'])} "
            f"| {_f(c['ttft']['p50'])} / {_f(c['ttft']['p99'])} | {_f(c['headers']['p99'])} "
            f"| {_f(e.get('ttft_mean_ms'))} / {_f(e.get('ttft_p50_ms'))} / "
            f"{_f(e.get('ttft_p99_ms'))} | {_f(e.get('queue_mean_ms'))} "
            f"| {_f(g.get('backend_p50_ms'))} / {_f(g.get('backend_p99_ms'))} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folder", type=Path, nargs="?", help="a `gpu_bench.sh sweep` output folder")
    parser.add_argument("--results", type=Path, help="the bench's results.json")
    parser.add_argument("--samples", type=Path, help="vLLM's metric samples (jsonl, may be .gz)")
    parser.add_argument("--access", type=Path, action="append", default=[], help="access log")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    if args.folder is not None:
        results = args.results or args.folder / "sweep" / "results.json"
        samples = args.samples or args.folder / "vllm-metrics.jsonl"
        logs = args.access or sorted(args.folder.glob("gateway-*.log"))
    elif args.results is not None:
        results, samples, logs = args.results, args.samples, args.access
    else:
        parser.error("give a folder or --results")
    rows = breakdown(results, samples, logs)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
