"""Writes a run's results: ``results.json``, ``report.md`` and ``plot.png`` in one folder.

The JSON is the source of truth (NaN becomes null); the markdown puts every figure as
baseline / other / added / ratio, one table per compared target and level (the ``cache``
scenario has its own table: ``cache_report``); the plot draws
latency percentiles and throughput against concurrency (or rate), one line per target. matplotlib
is optional (the ``bench`` extra): without it the plot is skipped with a note on stderr.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

from vllm_gateway_tools.bench import cache_report
from vllm_gateway_tools.bench.metrics import lookup

__all__ = ["markdown", "plot", "write"]

# (label, path into a target's summary, decimals)
ROWS: list[tuple[str, tuple[str, ...], int]] = [
    ("TTFT p50 (ms)", ("ttft_ms", "p50"), 2),
    ("TTFT p90 (ms)", ("ttft_ms", "p90"), 2),
    ("TTFT p99 (ms)", ("ttft_ms", "p99"), 2),
    ("TTFT max (ms)", ("ttft_ms", "max"), 2),
    ("TPOT p50 (ms)", ("tpot_ms", "p50"), 2),
    ("TPOT p99 (ms)", ("tpot_ms", "p99"), 2),
    ("ITL p50 (ms)", ("itl_ms", "p50"), 2),
    ("ITL p90 (ms)", ("itl_ms", "p90"), 2),
    ("ITL p99 (ms)", ("itl_ms", "p99"), 2),
    ("ITL max (ms)", ("itl_ms", "max"), 2),
    ("E2EL p50 (ms)", ("e2el_ms", "p50"), 2),
    ("E2EL p99 (ms)", ("e2el_ms", "p99"), 2),
    ("requests/s", ("req_per_s",), 1),
    ("output tokens/s", ("tokens_per_s",), 0),
    ("chunks/s", ("chunks_per_s",), 0),
    ("goodput (req/s)", ("goodput_req_per_s",), 1),
    ("goodput fraction", ("goodput_fraction",), 3),
    ("completed", ("completed",), 0),
    ("failed", ("failed",), 0),
    ("stalls", ("stalls",), 0),
    ("gateway CPU per chunk (µs)", ("resources", "gateway_cpu_us_per_chunk"), 1),
    ("gateway CPU per request (µs)", ("resources", "gateway_cpu_us_per_request"), 0),
    ("gateway CPU (share of a core)", ("resources", "gateway_cpu_util"), 2),
    ("gateway RSS idle (MiB)", ("resources", "gateway_rss_idle_mib"), 1),
    ("gateway RSS peak (MiB)", ("resources", "gateway_rss_peak_mib"), 1),
    ("backend CPU (share of a core)", ("resources", "backend_cpu_util"), 2),
    ("client CPU per chunk (µs)", ("resources", "client_cpu_us_per_chunk"), 1),
    ("client CPU per request (µs)", ("resources", "client_cpu_us_per_request"), 0),
    ("client CPU (share of a core)", ("resources", "client_cpu_util"), 2),
]


def _fmt(value: Any, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:,.{decimals}f}"
    return str(value)


def _level_table(level: dict[str, Any], base: str, other: str) -> list[str]:
    b, o = level["targets"][base], level["targets"][other]
    cmp = level["comparison"].get(other, {})
    lines = [f"| figure | {base} | {other} | added | ratio |", "|---|---:|---:|---:|---:|"]
    for label, path, dec in ROWS:
        bv, ov = lookup(b, path), lookup(o, path)
        if bv is None and ov is None:
            continue
        added = lookup(cmp.get("added"), path)
        ratio = lookup(cmp.get("ratio"), path)
        lines.append(
            f"| {label} | {_fmt(bv, dec)} | {_fmt(ov, dec)} | {_fmt(added, dec)} | {_fmt(ratio, 3)} |"
        )
    errors = {**b.get("errors", {}), **o.get("errors", {})}
    if errors:
        be, oe = b.get("errors", {}), o.get("errors", {})
        for kind in sorted(errors):
            lines.append(f"| errors: {kind} | {be.get(kind, 0)} | {oe.get(kind, 0)} | | |")
    fid = level["fidelity"].get(other)
    if fid and fid.get("compared"):
        lines.append(
            f"| chunk fidelity (identical/compared) | | {fid['identical']}/{fid['compared']} | | "
            f"{_fmt(fid['fraction'], 3)} |"
        )
    return lines


def markdown(doc: dict[str, Any]) -> str:
    if doc.get("scenario") == "cache":
        return cache_report.markdown(doc)
    if doc.get("scenario") == "rollout":
        from vllm_gateway_tools.bench import rollout_scenario

        return rollout_scenario.markdown(doc)
    cfg = doc.get("config", {})
    targets = cfg.get("targets", [])
    out = [f"# Benchmark: {doc.get('scenario') or 'sweep'}", ""]
    out.append(
        f"Load: {'streamed' if cfg.get('stream') else 'non-streamed'} {cfg.get('endpoint')}, "
        f"max_tokens {cfg.get('max_tokens')}, prompt {cfg.get('prompt_len')} words, "
        f"{cfg.get('rounds')} round(s) per target alternating, seed {cfg.get('seed')}, "
        f"{cfg.get('client_procs')} client process(es)."
    )
    if rig := doc.get("rig"):
        out.append(
            f"Rig: simulator TTFT {rig.get('ttft')} s, pace {rig.get('itl')} s per chunk; "
            f"gateway on core {rig.get('gateway_core')}, simulator and load generator on core "
            f"{rig.get('rig_core')} (pinned: {_fmt(rig.get('pinned'), 0)})."
        )
    out.append("Targets: " + ", ".join(f"{t['name']}={t['url']}" for t in targets) + ".")
    if doc.get("goals"):
        out += [
            "",
            "## Goals",
            "",
            "| goal | figure | measured | limit | met |",
            "|---|---|---:|---:|---|",
        ]
        for g in doc["goals"]:
            out.append(
                f"| {g['goal']} | {g['figure']} | {_fmt(g['measured'], 2)} | {_fmt(g['limit'], 2)} | "
                f"{'-' if g['met'] is None else ('yes' if g['met'] else 'no')} |"
            )
    if doc.get("findings"):
        out += ["", "## Findings", ""]
        for k, v in doc["findings"].items():
            if k == "rss_series_mib":
                continue
            out.append(
                f"- {k}: {orjson.dumps(v).decode() if isinstance(v, (dict, list)) else _fmt(v, 2)}"
            )
    names = [t["name"] for t in targets]
    for level in doc.get("levels", []):
        out += ["", f"## {level['label']}", ""]
        present = [n for n in names if n in level["targets"]]
        if len(present) == 1:
            out += _single_table(level, present[0])
        for other in present[1:]:
            out += _level_table(level, present[0], other)
            out.append("")
        for note in level.get("notes", []):
            out.append(f"- {note}")
        if level.get("rig_limited"):
            out.append(
                "- **rig-limited**: read throughput here as a floor for the gateway, not its ceiling."
            )
    return "\n".join(out).rstrip() + "\n"


def _single_table(level: dict[str, Any], name: str) -> list[str]:
    s = level["targets"][name]
    lines = [f"| figure | {name} |", "|---|---:|"]
    for label, path, dec in ROWS:
        if (v := lookup(s, path)) is not None:
            lines.append(f"| {label} | {_fmt(v, dec)} |")
    return lines


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Latency percentiles and throughput against load; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = [lv for lv in doc.get("levels", []) if lv["targets"]]
    if not levels:
        return False
    by_rate = all(lv.get("rate") for lv in levels)
    xs = [lv["rate"] if by_rate else (lv.get("concurrency") or 0) for lv in levels]
    names = [t["name"] for t in doc["config"]["targets"]]
    panels: list[tuple[str, list[tuple[str, tuple[str, ...]]]]] = [
        ("TTFT (ms)", [("p50", ("ttft_ms", "p50")), ("p99", ("ttft_ms", "p99"))]),
        ("ITL (ms)", [("p50", ("itl_ms", "p50")), ("p99", ("itl_ms", "p99"))]),
        ("E2EL (ms)", [("p50", ("e2el_ms", "p50")), ("p99", ("e2el_ms", "p99"))]),
        ("throughput", [("chunks/s", ("chunks_per_s",)), ("req/s", ("req_per_s",))]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, series) in zip(axes.flat, panels, strict=False):
        # One colour per target, one line style per series: direct and gateway read side by side.
        twin = ax.twinx() if title == "throughput" else None
        for n, name in enumerate(names):
            for k, (label, figure) in enumerate(series):
                ys = [lookup(lv["targets"].get(name), figure) for lv in levels]
                ys = [math.nan if y is None else y for y in ys]
                where = twin if twin is not None and k == 1 else ax
                where.plot(
                    xs, ys, "-o" if k == 0 else "--s", color=f"C{n}", label=f"{name} {label}"
                )
        ax.set_title(title)
        ax.set_xlabel("offered rate (req/s)" if by_rate else "concurrency")
        if twin is not None:
            ax.set_ylabel("chunks/s (solid)")
            twin.set_ylabel("req/s (dashed)")
        if len(set(xs)) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if twin is not None:
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, fontsize=8)
    fig.suptitle(f"{doc.get('scenario') or 'sweep'}: direct and through the gateway, side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "report.md"}
    paths["json"].write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    paths["markdown"].write_text(markdown(doc), encoding="utf-8")
    png = out_dir / "plot.png"
    if plot(doc, png):
        paths["plot"] = png
    return paths
