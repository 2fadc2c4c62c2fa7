#!/usr/bin/env python3
"""Offline checks of the Grafana dashboard and the Prometheus alert rules.

The gateway's metric names are listed here once; every PromQL expression in the dashboard and the
alerts may select only those (with a histogram's ``_bucket``/``_sum``/``_count``) or vLLM's own
``vllm:`` metrics. Expressions are parsed with ``promql-parser`` when it is installed, else checked
for balanced brackets and scanned for names; ``promtool check rules`` runs when it is on PATH.
Used by scripts/validate_deploy.py and the tests.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "vllm-gateway-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"

# The gateway's metric names (the observability module exposes exactly these).
GATEWAY_COUNTERS = {
    "vllm_gateway_requests_total",
    "vllm_gateway_tokens_total",
    "vllm_gateway_backend_errors_total",
    "vllm_gateway_backend_ejections_total",
}
GATEWAY_GAUGES = {
    "vllm_gateway_requests_in_flight",
    "vllm_gateway_queue_depth",
    "vllm_gateway_draining",
    "vllm_gateway_backend_in_flight",
    "vllm_gateway_backend_healthy",
    "vllm_gateway_admission_limit",
}
GATEWAY_HISTOGRAMS = {
    "vllm_gateway_queue_wait_seconds",
    "vllm_gateway_time_to_first_token_seconds",
    "vllm_gateway_inter_token_latency_seconds",
    "vllm_gateway_request_duration_seconds",
    "vllm_gateway_overhead_seconds",
}
ALLOWED_METRICS = (
    GATEWAY_COUNTERS
    | GATEWAY_GAUGES
    | {f"{h}{suffix}" for h in GATEWAY_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
# The ``outcome`` label's values: the error tree's ``type`` strings plus the non-errors.
OUTCOMES = {
    "completed",
    "client_disconnected",
    "client_too_slow",
    "client_timeout",
    "malformed_request",
    "backend_rejected",
    "headers_too_large",
    "too_many_connections",
    "forbidden",
    "client_error",
    "uri_too_long",
    "expectation_failed",
    "unsupported_transfer_coding",
    "version_not_supported",
    "cancelled",
    "other",
    "authentication_error",
    "backend_error",
    "backend_unavailable",
    "bad_backend_response",
    "body_too_large",
    "first_token_timeout",
    "internal_error",
    "invalid_json",
    "invalid_request",
    "method_not_allowed",
    "model_not_found",
    "no_healthy_backend",
    "not_found",
    "overloaded",
    "queue_timeout",
    "deadline_unmeetable",
    "deadline_exceeded",
    "shed",
    "rate_limited",
    "request_timeout",
    "shutting_down",
    "stream_idle_timeout",
    "unavailable",
    "unsupported_media_type",
    "idempotency_key_reused",
    "result_lost",
}
# Outcomes that are the service's fault (the 5xx error types that are not a ClientError; the timeouts and
# backend errors among them may also end a stream that started with 200). The error-ratio panel
# and alert count exactly these; client disconnects and 4xx are the client's doing.
SERVER_SIDE_OUTCOMES = {
    "backend_error",
    "backend_unavailable",
    "bad_backend_response",
    "first_token_timeout",
    "internal_error",
    "no_healthy_backend",
    "overloaded",
    "queue_timeout",
    "deadline_unmeetable",
    "deadline_exceeded",
    "shed",
    "request_timeout",
    "shutting_down",
    "stream_idle_timeout",
    "too_many_connections",
    "unavailable",
}

# Grafana's variables, replaced by plain values before PromQL is parsed.
_GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__rate_interval}": "5m",
}


# --- PromQL ----------------------------------------------------------------------------------


def _grafana_to_promql(expr: str) -> str:
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects; raises ValueError on a syntax error."""
    try:
        import promql_parser  # type: ignore[import-not-found]
    except ImportError:
        return _promql_names_fallback(expr)
    names: set[str] = set()

    def walk(node: Any) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            name = node.name or next(
                (m.value for m in node.matchers.matchers if m.name == "__name__"), None
            )
            if name:
                names.add(name)
        elif kind == "MatrixSelector":
            walk(node.vector_selector)
        elif kind == "Call":
            for arg in node.args:
                walk(arg)
        elif kind == "BinaryExpr":
            walk(node.lhs)
            walk(node.rhs)
        elif kind in ("AggregateExpr", "ParenExpr", "UnaryExpr", "SubqueryExpr"):
            walk(node.expr)

    walk(promql_parser.parse(expr))
    return names


_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def _promql_names_fallback(expr: str) -> set[str]:
    """Without a parser: balanced brackets, then identifiers that are not functions or labels."""
    stack = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for ch in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            raise ValueError(f"unbalanced {ch!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r}")
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)  # label matchers, ranges
    # Numbers and durations (1e-9, 0.99, 5m) hold letters that are not names.
    text = re.sub(r"(?<![A-Za-z0-9_:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def expression_problems(where: str, expr: str) -> list[str]:
    try:
        names = promql_metric_names(expr)
    except ValueError as exc:
        return [f"{where}: PromQL syntax error: {exc}"]
    if not names:
        return [f"{where}: selects no metric"]
    unknown = sorted(n for n in names if n not in ALLOWED_METRICS and not n.startswith("vllm:"))
    return [f"{where}: unknown metric {n}" for n in unknown]


def _outcome_problems(where: str, expr: str) -> list[str]:
    problems = []
    for match in re.finditer(r'outcome\s*=~?\s*"([^"]*)"', expr):
        for value in match.group(1).split("|"):
            if value not in OUTCOMES:
                problems.append(f"{where}: unknown outcome {value!r}")
    return problems


# --- Grafana ---------------------------------------------------------------------------------


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    out = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", "?"), target["expr"]))
            visit(panel.get("panels", []))

    visit(dashboard.get("panels", []))
    return out


def check_dashboard() -> list[str]:
    try:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except ValueError as exc:
        return [f"dashboard: invalid JSON: {exc}"]
    problems = []
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in dashboard:
            problems.append(f"dashboard: {key} missing")
    ids = [p.get("id") for p in dashboard.get("panels", [])]
    if len(ids) != len(set(ids)):
        problems.append("dashboard: panel ids repeat")
    exprs = dashboard_expressions(dashboard)
    if not exprs:
        problems.append("dashboard: no PromQL targets")
    for title, expr in exprs:
        problems += expression_problems(f"dashboard panel {title!r}", _grafana_to_promql(expr))
        problems += _outcome_problems(f"dashboard panel {title!r}", expr)
    return problems


# --- alerts ----------------------------------------------------------------------------------


REQUIRED_ALERTS = {
    "queue growing": "vllm_gateway_queue_depth",
    "error rate": "vllm_gateway_requests_total",
    "backend unhealthy": "vllm_gateway_backend_healthy",
    "backend ejected": "vllm_gateway_backend_ejections_total",
    "TTFT p99": "vllm_gateway_time_to_first_token_seconds_bucket",
    "draining too long": "vllm_gateway_draining",
}


def check_alerts() -> list[str]:
    try:
        doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        return [f"alerts: invalid YAML: {exc}"]
    problems = []
    if shutil.which("promtool"):
        proc = subprocess.run(
            ["promtool", "check", "rules", str(ALERTS)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            problems.append(f"promtool check rules:\n{proc.stdout}{proc.stderr}")
    rules = [r for g in doc.get("groups", []) for r in g.get("rules", [])]
    if not rules:
        return [*problems, "alerts: no rules"]
    seen_names = set()
    selected: set[str] = set()
    for rule in rules:
        name = rule.get("alert", "?")
        if name in seen_names:
            problems.append(f"alerts: {name} appears twice")
        seen_names.add(name)
        for field in ("alert", "expr", "labels", "annotations"):
            if field not in rule:
                problems.append(f"alert {name}: {field} missing")
        if "severity" not in rule.get("labels", {}):
            problems.append(f"alert {name}: labels.severity missing")
        if "summary" not in rule.get("annotations", {}):
            problems.append(f"alert {name}: annotations.summary missing")
        expr = str(rule.get("expr", ""))
        problems += expression_problems(f"alert {name}", expr)
        problems += _outcome_problems(f"alert {name}", expr)
        with contextlib.suppress(ValueError):
            selected |= promql_metric_names(expr)
    for purpose, metric in REQUIRED_ALERTS.items():
        if metric not in selected:
            problems.append(f"alerts: no rule for {purpose} (on {metric})")
    return problems
