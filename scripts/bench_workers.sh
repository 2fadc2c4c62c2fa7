#!/usr/bin/env bash
# Throughput against the number of workers (docs/performance.md, "Several workers"): the simulator
# directly, and the gateway with --workers 1, 2 and 4 in front of it, in alternating rounds of one
# run, each pinned to its own cores, so that a worker count gets as many cores as workers.
#
#   scripts/bench_workers.sh OUT
#
# Environment: LOAD (nonstream or stream, default nonstream), WORKERS (default "1 2 4"),
# SIM_CORE (default 1), GW_FIRST_CORE (the gateway with N workers gets the N cores from here;
# default 2), GW_CORES (instead, every gateway on these cores: a small host), CLIENT_CORES (default
# 8-15), CLIENT_PROCS (default 4), USERS, NUM, ROUNDS (default 2), BEFORE (a source tree of another
# version, e.g. a `git worktree` of main: its gateway runs too, as targets bN, in the same rounds).
# Needs a core for the simulator, max(WORKERS) cores for the gateway and CLIENT_CORES: a host with
# 16 cores. OUT/cpu.txt: each target's CPU over the whole run (every process of it, user + system,
# in ticks of 10 ms) and per request (per chunk for the stream load: 64 a request).
set -euo pipefail
out=${1:?output folder}
mkdir -p "$out"
PY=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here/src:$here/tools"  # this checkout, whatever is installed
LOAD=${LOAD:-nonstream}
WORKERS=${WORKERS:-1 2 4}
SIM_CORE=${SIM_CORE:-1}
GW_FIRST_CORE=${GW_FIRST_CORE:-2}
CLIENT_CORES=${CLIENT_CORES:-8-15}
CLIENT_PROCS=${CLIENT_PROCS:-4}
ROUNDS=${ROUNDS:-2}
if [ "$LOAD" = nonstream ]; then
    TTFT=0 ITL=0
    DEFAULT_NUM=40000
    SHAPE=(--concurrency "${USERS:-256}" --num-requests "${NUM:-$DEFAULT_NUM}" --max-tokens 16 --no-stream)
else
    TTFT=0.05 ITL=0.02
    DEFAULT_NUM=4000
    SHAPE=(--concurrency "${USERS:-1000}" --num-requests "${NUM:-$DEFAULT_NUM}" --max-tokens 64 --stream)
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

sim_port=18300
taskset -c "$SIM_CORE" "$PY" -m vllm_gateway simulate --host 127.0.0.1 --port $sim_port \
    --model sim-model --ttft $TTFT --itl $ITL > "$out/simulator.log" 2>&1 &
pids+=($!)
targets="direct=http://127.0.0.1:$sim_port"
declare -A gw_pid
ports=()
start_gateway() {  # NAME SOURCE-TREE PORT N
    local cores=${GW_CORES:-$GW_FIRST_CORE-$((GW_FIRST_CORE + $4 - 1))}
    PYTHONPATH="$2/src:$2/tools" taskset -c "$cores" "$PY" -m vllm_gateway serve --host 127.0.0.1 \
        --port "$3" --backend-url http://127.0.0.1:$sim_port --workers "$4" --log-level warning \
        --max-concurrent-requests 10000 --max-queued-requests 10000 > "$out/gateway-$1.log" 2>&1 &
    gw_pid[$1]=$!
    pids+=($!)
    ports+=("$3")
    targets="$targets,$1=http://127.0.0.1:$3"
}
names=()
for n in $WORKERS; do
    start_gateway "w$n" "$here" $((18300 + n)) "$n"
    names+=("w$n")
    if [ -n "${BEFORE:-}" ]; then
        start_gateway "b$n" "$BEFORE" $((18320 + n)) "$n"
        names+=("b$n")
    fi
done
for port in $sim_port "${ports[@]}"; do
    path=/health/ready
    [ "$port" = $sim_port ] && path=/health
    for _ in $(seq 120); do curl -sf -o /dev/null "http://127.0.0.1:$port$path" && break; sleep 0.5; done
done

cpu_tree() {  # user + system ticks of a process and its children
    local total=0 p
    for p in $1 $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo $total
}
declare -A before
for name in "${names[@]}"; do before[$name]=$(cpu_tree "${gw_pid[$name]}"); done
taskset -c "$CLIENT_CORES" "$PY" -m vllm_gateway_tools.bench --model sim-model --targets "$targets" \
    --rounds "$ROUNDS" --client-procs "$CLIENT_PROCS" "${SHAPE[@]}" --out "$out/bench" \
    > "$out/bench.log" 2>&1
: > "$out/cpu.txt"
per=$((${NUM:-$DEFAULT_NUM} * ROUNDS)) unit=request
[ "$LOAD" = nonstream ] || per=$((per * 64)) unit=chunk
for name in "${names[@]}"; do
    ticks=$(( $(cpu_tree "${gw_pid[$name]}") - ${before[$name]} ))
    echo "$name cpu ticks: $ticks, $((ticks * 10000 / per)) us per $unit" | tee -a "$out/cpu.txt"
done
grep -E "req/s|round" "$out/bench.log" | tail -20 || true
