#!/usr/bin/env bash
# vllm-gateway beside its peers, in one run: the same seeded load sent to the simulator directly,
# through vllm-gateway, through vllm-router (vLLM's production-stack router, Rust) and through
# LiteLLM's proxy, in alternating rounds (`python -m vllm_gateway_tools.bench`, 4 targets).
#
#   scripts/compare_peers.sh stream OUT   # 100 streams, 64 chunks 20 ms apart: added latency
#   scripts/compare_peers.sh body OUT     # non-streamed, no pace: each proxy's ceiling (req/s)
#
# The peers are not dependencies of the project: install them into their own environment first,
#   python3 -m venv /tmp/peers && /tmp/peers/bin/pip install vllm-router 'litellm[proxy]'
# Every proxy is pinned to core 0, the simulator and the load generator to core 1 (2 cores or
# more). Each proxy runs one process with its defaults, as its documentation starts it; the
# gateway's admission limit is raised above the load so that no proxy queues. Proxy CPU seconds
# (user + sys from /proc, whole run) are written to OUT/cpu.txt: each one is busy only during its
# own phases, so CPU per request is that total over the requests it served. Every request carries
# one API key, checked by vllm-gateway (--api-keys) and by LiteLLM (its master key, which it needs
# to start); vllm-router and the simulator ignore it.
#
# In body mode LiteLLM, about 100 times slower there, gets its own run (direct vs litellm) with
# NUM_SLOW requests, so that the fast proxies' phases are long enough to measure.
#
# Environment: PEERS_VENV (/tmp/peers), PYTHON (the project's interpreter, python3), USERS
# (100 stream, 64 body), NUM (600 stream, 20000 body), NUM_SLOW (1000), ROUNDS (2).
# BEFORE=DIR adds a fifth target, gateway-before: the gateway run from another checkout's src/
# (e.g. `git worktree add DIR HEAD~1`), pinned beside the others: a change's before and after in
# one run. NO_LITELLM=1 leaves LiteLLM out.
set -euo pipefail
mode=${1:?stream or body}
out=${2:?output folder}
case $mode in
stream) SIM_TTFT=0.05 SIM_ITL=0.02 ;;
body) SIM_TTFT=0 SIM_ITL=0 ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
mkdir -p "$out"
PY=${PYTHON:-python3}
PEERS=${PEERS_VENV:-/tmp/peers}
ROUNDS=${ROUNDS:-2}
SIM_PORT=18101 GW_PORT=18102 ROUTER_PORT=18103 LITELLM_PORT=18104 BEFORE_PORT=18105
KEY=sk-bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_http() {  # wait_http URL NAME: until the URL answers 200 (60 s at most)
    for _ in $(seq 120); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.5
    done
    echo "$2 did not come up at $1" >&2
    return 1
}

descendants() {  # descendants PID: the PID and every live process below it
    echo "$1"
    local child
    for child in $(pgrep -P "$1" || true); do descendants "$child"; done
}

cpu_seconds() {  # cpu_seconds PID: user + sys of the process tree (live and reaped) so far
    local total=0 p
    for p in $(descendants "$1"); do
        [ -r "/proc/$p/stat" ] || continue
        total=$(awk -v hz="$(getconf CLK_TCK)" -v t="$total" \
            '{ sub(/^.*\) /, ""); print t + ($12 + $13 + $14 + $15) / hz }' "/proc/$p/stat")
    done
    echo "$total"
}

start() {  # start NAME CORE CMD...: in the background, pinned, output to OUT/NAME.log
    local name=$1 core=$2; shift 2
    taskset -c "$core" "$@" > "$out/$name.log" 2>&1 &
    pids+=($!)
    eval "${name//-/_}_pid=$!"
}

start sim 1 "$PY" -m vllm_gateway simulate --host 127.0.0.1 --port $SIM_PORT --model sim-model \
    --ttft "$SIM_TTFT" --itl "$SIM_ITL"
wait_http "http://127.0.0.1:$SIM_PORT/health" simulator

start vllm-gateway 0 "$PY" -m vllm_gateway serve --host 127.0.0.1 --port $GW_PORT \
    --backend-url "http://127.0.0.1:$SIM_PORT" --max-concurrent-requests 1000 --log-level warning \
    --api-keys "$KEY"
proxies="vllm_gateway vllm_router"
if [ -n "${BEFORE:-}" ]; then
    PYTHONPATH="$BEFORE/src" start gateway-before 0 "$PY" -m vllm_gateway serve --host 127.0.0.1 \
        --port $BEFORE_PORT --backend-url "http://127.0.0.1:$SIM_PORT" \
        --max-concurrent-requests 1000 --log-level warning --api-keys "$KEY"
    proxies+=" gateway_before"
fi
start vllm-router 0 "$PEERS/bin/vllm-router" --host 127.0.0.1 --port $ROUTER_PORT \
    --worker-urls "http://127.0.0.1:$SIM_PORT" --policy round_robin --log-level warning
cat > "$out/litellm.yaml" <<EOF
model_list:
  - model_name: sim-model
    litellm_params:
      model: hosted_vllm/sim-model
      api_base: http://127.0.0.1:$SIM_PORT/v1
      api_key: none
EOF
if [ -z "${NO_LITELLM:-}" ]; then
    LITELLM_MASTER_KEY=$KEY start litellm 0 "$PEERS/bin/litellm" --config "$out/litellm.yaml" \
        --host 127.0.0.1 --port $LITELLM_PORT --num_workers 1
    proxies+=" litellm"
fi
wait_http "http://127.0.0.1:$GW_PORT/health/ready" vllm-gateway
wait_http "http://127.0.0.1:$ROUTER_PORT/v1/models" vllm-router
[ -n "${BEFORE:-}" ] && wait_http "http://127.0.0.1:$BEFORE_PORT/health/ready" gateway-before
[ -z "${NO_LITELLM:-}" ] && wait_http "http://127.0.0.1:$LITELLM_PORT/health/liveliness" litellm

fast="direct=http://127.0.0.1:$SIM_PORT,vllm-gateway=http://127.0.0.1:$GW_PORT"
[ -n "${BEFORE:-}" ] && fast+=",gateway-before=http://127.0.0.1:$BEFORE_PORT"
fast+=",vllm-router=http://127.0.0.1:$ROUTER_PORT"
targets=$fast
[ -z "${NO_LITELLM:-}" ] && targets+=",litellm=http://127.0.0.1:$LITELLM_PORT"
cpu_all() {  # cpu_all LABEL: every proxy's CPU seconds so far
    for name in $proxies; do
        pid_var="${name}_pid"
        echo "$name $1 $(cpu_seconds "${!pid_var}")"
    done >> "$out/cpu.txt"
}
: > "$out/cpu.txt"
cpu_all before
bench() {  # bench TARGETS OUT LOAD...
    local to=$1 dir=$2; shift 2
    taskset -c 1 "$PY" -m vllm_gateway_tools.bench --model sim-model --targets "$to" \
        --rounds "$ROUNDS" --api-key "$KEY" "$@" --out "$dir"
}
if [ "$mode" = stream ]; then
    bench "$targets" "$out/stream" \
        --concurrency "${USERS:-100}" --num-requests "${NUM:-600}" --max-tokens 64 --stream
    cpu_all after
else
    bench "$fast" "$out/body" \
        --concurrency "${USERS:-64}" --num-requests "${NUM:-20000}" --max-tokens 16 --no-stream
    cpu_all after-fast
    if [ -z "${NO_LITELLM:-}" ]; then
        bench "direct=http://127.0.0.1:$SIM_PORT,litellm=http://127.0.0.1:$LITELLM_PORT" \
            "$out/body-litellm" --concurrency "${USERS:-64}" --num-requests "${NUM_SLOW:-1000}" \
            --max-tokens 16 --no-stream
        cpu_all after
    fi
fi
cat "$out/cpu.txt"
