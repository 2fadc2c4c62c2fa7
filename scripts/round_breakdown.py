"""Where the time to first token goes, round by round, in a `scripts/gpu_bench.sh sweep` (or
`poisson`) folder.

    python scripts/round_breakdown.py OUT [--json FILE]
    python scripts/round_breakdown.py --results R.json --samples S.jsonl.gz --access A.log.gz

The second form reads a GPU run's raw files as they were kept in docs/results/gpu/ (gzipped where
large; in git history since: docs/results/README.md).

For every level, target and round of ``OUT/sweep/results.json`` (or ``OUT/poisson/``) it prints
what the client saw
(TTFT and time to headers, p50/p99), what vLLM's engine saw in the same window (its own TTFT
histogram, from arrival in the engine, and its queue time: ``OUT/vllm-metrics.jsonl``), and for
the gateway's rounds what the gateway saw (``OUT/gateway-*.log`` access lines in JSON): its own
time to first byte, and ``backend_ms``, the wait for vLLM's response headers, which covers vLLM's
HTTP and preprocessing (chat template, tokenization) before the request reaches the engine.

Where the samples hold them (``gpu_bench.sh`` since run 3), each round also gets: the requests
in flight in vLLM (running and waiting, mean and max of the samples), in the gateway (holding a
slot, queued), the gateway's own time before the upstream send (``vllm_gateway_overhead_seconds``)
and its admission queue wait, and the CPU used, as a share of one core, by the gateway (all its
processes), vLLM's API server (its event-loop thread and in all) and vLLM's engine processes.
A second table sets each round pair side by side: round k of the gateway against round k of
direct, with the TTFT p99 ratio of the pair, and over all rounds.

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
    span = b["t"] - a["t"]
    for key in CPU_KEYS:
        if key in a and key in b and span > 0:
            out[f"{key}_util"] = (b[key] - a[key]) / span
    inside = [s for s in samples if start <= s["t"] <= end]
    for key in ("running", "waiting", "gw_in_flight", "gw_queued"):
        values = [s[key] for s in inside if key in s]
        if values:
            out[f"{key}_mean"] = sum(values) / len(values)
            out[f"{key}_max"] = max(values)
    for key in ("gw_overhead", "gw_queue"):
        count = b.get(f"{key}_count", 0.0) - a.get(f"{key}_count", 0.0)
        if count <= 0:
            continue
        out[f"{key}_n"] = count
        out[f"{key}_mean_ms"] = 1000 * (b.get(f"{key}_sum", 0.0) - a.get(f"{key}_sum", 0.0)) / count
        ba, bb = a.get(f"{key}_buckets", {}), b.get(f"{key}_buckets", {})
        delta = {le: bb[le] - ba.get(le, 0.0) for le in bb}
        out[f"{key}_p99_ms"] = 1000 * bucket_quantile(delta, 0.99)
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


# CPU seconds in the samples: the gateway's processes, vLLM's API server (its main thread, which
# runs its event loop, and in all) and vLLM's engine processes (the API server's children).
CPU_KEYS = ("gw_cpu", "vllm_api_loop_cpu", "vllm_api_cpu", "vllm_engine_cpu")


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
    queue = [r.get("queue_wait_ms") or 0.0 for r in recs]
    return {
        "n": len(recs),
        "queue_wait_p99_ms": percentile(queue, 99),
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
        "| engine TTFT mean / p50 / p99 | engine queue mean | gateway backend_ms p50 / p99 "
        "| gateway TTFT p50 / p99 | gateway queue wait p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"| {_f(g.get('backend_p50_ms'))} / {_f(g.get('backend_p99_ms'))} "
            f"| {_f(g.get('ttft_p50_ms'))} / {_f(g.get('ttft_p99_ms'))} "
            f"| {_g(g.get('queue_wait_p99_ms'))} |"
        )
    out += [
        "",
        "| level | order | target | in flight vLLM running / waiting, mean (max) "
        "| gateway in flight / queued, mean (max) | gateway own time before send mean / p99 "
        "| CPU (cores): gateway / vLLM API loop / API all / engine |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {}
    for r in rows:
        order[r["level"]] = order.get(r["level"], 0) + 1
        e = r["engine"]

        def mm(key: str, e: dict[str, float] = e) -> str:
            return f"{_f(e.get(key + '_mean'))} ({_f(e.get(key + '_max'))})"

        cpu = " / ".join(_c(e.get(f"{k}_util")) for k in CPU_KEYS)
        out.append(
            f"| {r['level']} | {order[r['level']]} | {r['target']} "
            f"| {mm('running')} / {mm('waiting')} | {mm('gw_in_flight')} / {mm('gw_queued')} "
            f"| {_g(e.get('gw_overhead_mean_ms'))} / {_g(e.get('gw_overhead_p99_ms'))} | {cpu} |"
        )
    return "\n".join(out)


def pairs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Round k of each other target against round k of the first (the baseline)."""
    out = []
    for level in doc["levels"]:
        names = list(level["targets"])
        base = names[0]
        for other in names[1:]:
            a = level["targets"][base].get("per_round", [])
            b = level["targets"][other].get("per_round", [])
            for k, (ra, rb) in enumerate(zip(a, b, strict=False), 1):
                out.append(_pair(level["label"], str(k), base, other, ra, rb))
            ta, tb = level["targets"][base], level["targets"][other]
            whole = _pair(level["label"], "all", base, other, ta, tb)
            ratios = sorted(p["ttft_p99_ratio"] for p in out[-len(a) :] if a) if a else []
            whole["median_pair_ratio"] = percentile(ratios, 50) if ratios else math.nan
            out.append(whole)
    return out


def _pair(
    label: str, k: str, base: str, other: str, ra: dict[str, Any], rb: dict[str, Any]
) -> dict[str, Any]:
    return {
        "level": label,
        "pair": k,
        "baseline": base,
        "target": other,
        "ttft_p50_ms": [ra["ttft_ms"]["p50"], rb["ttft_ms"]["p50"]],
        "ttft_p99_ms": [ra["ttft_ms"]["p99"], rb["ttft_ms"]["p99"]],
        "ttft_p99_ratio": rb["ttft_ms"]["p99"] / ra["ttft_ms"]["p99"],
        "tokens_per_s": [ra["tokens_per_s"], rb["tokens_per_s"]],
        "failed": [ra["failed"], rb["failed"]],
    }


def render_pairs(rows: list[dict[str, Any]]) -> str:
    out = [
        "| level | pair | TTFT p50 base / other | TTFT p99 base / other | p99 ratio "
        "| tok/s base / other | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        note = ""
        if p["pair"] == "all" and not math.isnan(p.get("median_pair_ratio", math.nan)):
            note = f" (median of pairs {p['median_pair_ratio']:.3f})"
        out.append(
            f"| {p['level']} | {p['pair']} | {_f(p['ttft_p50_ms'][0])} / {_f(p['ttft_p50_ms'][1])} "
            f"| {_f(p['ttft_p99_ms'][0])} / {_f(p['ttft_p99_ms'][1])} "
            f"| {p['ttft_p99_ratio']:.3f}{note} "
            f"| {_f(p['tokens_per_s'][0])} / {_f(p['tokens_per_s'][1])} "
            f"| {p['failed'][0]} / {p['failed'][1]} |"
        )
    return "\n".join(out)


def _c(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def _g(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folder", type=Path, nargs="?", help="a `gpu_bench.sh sweep` output folder")
    parser.add_argument("--results", type=Path, help="the bench's results.json")
    parser.add_argument("--samples", type=Path, help="vLLM's metric samples (jsonl, may be .gz)")
    parser.add_argument("--access", type=Path, action="append", default=[], help="access log")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    if args.folder is not None:
        results = args.results or next(
            (
                args.folder / sub / "results.json"
                for sub in ("sweep", "poisson", "seed1000")
                if (args.folder / sub / "results.json").exists()
            ),
            args.folder / "sweep" / "results.json",
        )
        samples = args.samples or args.folder / "vllm-metrics.jsonl"
        logs = args.access or sorted(args.folder.glob("gateway-*.log"))
    elif args.results is not None:
        results, samples, logs = args.results, args.samples, args.access
    else:
        parser.error("give a folder or --results")
    rows = breakdown(results, samples, logs)
    pair_rows = pairs(json.loads(read_text(results)))
    print(render(rows))
    print()
    print(render_pairs(pair_rows))
    if args.json:
        args.json.write_text(json.dumps({"rounds": rows, "pairs": pair_rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
