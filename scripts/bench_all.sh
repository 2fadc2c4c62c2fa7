#!/usr/bin/env bash
# The standard benchmark scenarios of docs/performance.md, one after another, each writing
# results.json, report.md and plot.png under OUT/<scenario>/.
#   scripts/bench_all.sh [OUT] [--quick]
set -euo pipefail
out=${1:-bench-results/latest}
shift || true
PY=${PYTHON:-.venv/bin/python}
for scenario in single c1000 ceiling nonstream memory admission; do
    echo "== $scenario"
    "$PY" -m vllm_gateway_tools.bench --scenario "$scenario" --out "$out/$scenario" "$@"
done
echo "reports: $out/*/report.md"
