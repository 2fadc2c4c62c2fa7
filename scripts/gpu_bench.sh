#!/usr/bin/env bash
# The GPU benchmark of docs/performance.md, run on a machine with an NVIDIA GPU where vLLM is
# installed and serving on 127.0.0.1:8001 (served model name "m"): the gateway in front of it,
# `vllm-gateway bench` direct vs gateway in alternating rounds, and `vllm bench serve` through it.
#
#   scripts/gpu_bench.sh sweep OUT      # 64, 100, 256 users; gateway limit 256 (the relay's cost)
#   scripts/gpu_bench.sh poisson OUT    # Poisson arrivals at RATE/s (open loop); gateway limit 256
#   scripts/gpu_bench.sh seed OUT       # 1,000 users against the seed's limit of 100
#   scripts/gpu_bench.sh vllm OUT       # vLLM's own client, direct and through the gateway
#   scripts/gpu_bench.sh embedded OUT   # 100 users: two processes, then the embedded engine
#                                       # (the vLLM server is stopped in between)
#
# Environment: TOKENIZER (folder with the model's tokenizer, for `vllm bench serve`),
# CLIENT_PROCS (load generator processes, default 4), ENGINE_ARGS (embedded engine arguments),
# GW_ARGS (more `vllm-gateway serve` flags, e.g. --upstream-idle-timeout 240 --log-level info),
# ROUNDS (alternating rounds per level, default 1), PROFILE (seconds of py-spy sampling of the
# gateway during the first level, when py-spy is installed), VLLM_URL, GW_PORT, SWEEP, USERS,
# NUM (to try the script against the simulator first), RATE (poisson: arrivals per second; or
# RATE_FROM=a sweep's results.json, and the rate is its direct output tok/s over its max_tokens,
# times RATE_SCALE, default 1). Every phase also leaves the gateway's /metrics and the kernel's
# listen-queue counters (before and after) in OUT; sweep and poisson also sample, twice a second,
# vLLM's gauges and histograms, the gateway's own-time histograms and the CPU time of the gateway
# (all its processes), of vLLM's API server (its event-loop thread, and in all) and of vLLM's
# engine processes (OUT/vllm-metrics.jsonl, for scripts/round_breakdown.py).
set -euo pipefail
phase=${1:?phase}
out=${2:?output folder}
mkdir -p "$out"
PY=${PYTHON:-python3}
VLLM_URL=${VLLM_URL:-http://127.0.0.1:8001}
GW_PORT=${GW_PORT:-7000}
GW_URL=http://127.0.0.1:$GW_PORT
CLIENT_PROCS=${CLIENT_PROCS:-4}
ROUNDS=${ROUNDS:-1}
read -r -a GW_EXTRA <<< "${GW_ARGS:-}"
BENCH=("$PY" -m vllm_gateway_tools.bench --model m --max-tokens 256 --prompt-len 200 --ignore-eos
       --client-procs "$CLIENT_PROCS" --goodput itl:200)

start_gateway() {  # start_gateway LIMIT [extra serve args]: in its own session, logs in $out
    local limit=$1; shift
    stop_gateway
    setsid "$PY" -m vllm_gateway serve --host 127.0.0.1 --port "$GW_PORT" \
        --max-concurrent-requests "$limit" --max-queued-requests 5000 \
        --queue-wait-timeout 60 --first-token-timeout 300 --request-timeout 600 \
        --stream-idle-timeout 120 --log-level warning "$@" ${GW_EXTRA[@]+"${GW_EXTRA[@]}"} \
        > "$out/gateway-$limit.log" 2>&1 &
    echo $! > /root/gateway.pid
    local t=0
    until curl -sf "$GW_URL/health/ready" > /dev/null; do
        sleep 1; t=$((t + 1))
        kill -0 "$(cat /root/gateway.pid)" 2>/dev/null || { tail -30 "$out/gateway-$limit.log"; return 1; }
        [ $t -lt 900 ] || { echo "gateway not ready"; tail -30 "$out/gateway-$limit.log"; return 1; }
    done
    echo "gateway ready (limit $limit) after ${t}s"
}

stop_gateway() {
    if [ -f /root/gateway.pid ]; then
        curl -sf "$GW_URL/metrics" > "$out/gateway-metrics-$(date +%s).txt" || true
        kill -TERM "$(cat /root/gateway.pid)" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$(cat /root/gateway.pid)" 2>/dev/null || break; sleep 1; done
        rm -f /root/gateway.pid
    fi
}

sample_vllm() {  # sample_vllm FILE URL: metrics and CPU times twice a second (see the header)
    # One JSON line per sample (scripts/round_breakdown.py splits them by round). Its output goes
    # to /dev/null: a background child holding the $(...) pipe would make the caller's command
    # substitution wait for it forever. The gateway's process is read from /root/gateway.pid.
    "$PY" - "$1" "$2" "$GW_URL" > /dev/null 2>&1 <<'EOF' &
import json, os, sys, time, urllib.request
path, url, gw_url = sys.argv[1], sys.argv[2], sys.argv[3]
TICK = os.sysconf("SC_CLK_TCK")
API = "vllm.entrypoints.openai.api_server"
VLLM_GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting"}
VLLM_HISTS = {"vllm:time_to_first_token_seconds": "ttft", "vllm:request_queue_time_seconds": "queue"}
GW_GAUGES = {"vllm_gateway_requests_in_flight": "gw_in_flight", "vllm_gateway_queue_depth": "gw_queued"}
GW_HISTS = {"vllm_gateway_overhead_seconds": "gw_overhead", "vllm_gateway_queue_wait_seconds": "gw_queue"}


def scrape(base, gauges, hists, row):
    try:
        text = urllib.request.urlopen(base + "/metrics", timeout=2).read().decode()
    except Exception:
        return
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if name in gauges:
            row[gauges[name]] = row.get(gauges[name], 0.0) + float(value)
            continue
        for base_name, key in hists.items():
            if name == base_name + "_bucket":
                le = name_labels.split('le="', 1)[1].split('"', 1)[0]
                buckets = row.setdefault(key + "_buckets", {})
                buckets[le] = buckets.get(le, 0.0) + float(value)
            elif name in (base_name + "_sum", base_name + "_count"):
                k = key + name[len(base_name):]
                row[k] = row.get(k, 0.0) + float(value)


def cpu(stat):  # utime + stime, seconds
    try:
        with open(stat, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def processes():  # pid -> (parent pid, command line)
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                raw = open(f"/proc/{d}/stat", "rb").read()
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out[int(d)] = (int(raw[raw.rindex(b")") + 2 :].split()[1]), cmd)
    return out


def tree(procs, root):
    found, todo = set(), [root]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += [q for q, (pp, _) in procs.items() if pp == p and q not in found]
    return found


def roles():  # CPU key -> the /proc stat files it sums
    procs = processes()
    out = {}
    try:
        gw = int(open("/root/gateway.pid").read().strip())
        out["gw_cpu"] = [f"/proc/{p}/stat" for p in sorted(tree(procs, gw))]
    except (OSError, ValueError):
        pass
    api = [p for p, (pp, cmd) in procs.items() if API in cmd and API not in procs.get(pp, (0, ""))[1]]
    if api:
        out["vllm_api_cpu"] = [f"/proc/{api[0]}/stat"]
        out["vllm_api_loop_cpu"] = [f"/proc/{api[0]}/task/{api[0]}/stat"]  # its main thread
        out["vllm_engine_cpu"] = [f"/proc/{p}/stat" for p in sorted(tree(procs, api[0]) - {api[0]})]
    return out


who, who_at = roles(), time.time()
with open(path, "w") as out:
    while True:
        t = time.time()
        if t - who_at > 5:  # workers and engine processes started since
            who, who_at = roles(), t
        row = {"t": round(t, 3)}
        scrape(url, VLLM_GAUGES, VLLM_HISTS, row)
        scrape(gw_url, GW_GAUGES, GW_HISTS, row)
        for key, stats in who.items():
            values = [v for v in map(cpu, stats) if v is not None]
            if values:
                row[key] = round(sum(values), 2)
        out.write(json.dumps(row) + "\n")
        out.flush()
        time.sleep(max(0.0, 0.5 - (time.time() - t)))
EOF
    echo $!
}

net_counters() {  # net_counters LABEL: listen queue size and overflow counters of the kernel
    {
        echo "somaxconn $(cat /proc/sys/net/core/somaxconn 2>/dev/null || echo '?')"
        awk '/^TcpExt:/ { if (!h) { split($0, k); h = 1 } else { for (i = 2; i <= NF; i++)
             if (k[i] ~ /^Listen(Overflows|Drops)$|^TCPReqQFullDrop$/) print k[i], $i } }' \
            /proc/net/netstat 2>/dev/null
    } > "$out/net-$1.txt"
}

start_profile() {  # start_profile: py-spy samples the gateway for $PROFILE seconds, if asked
    [ -n "${PROFILE:-}" ] && command -v py-spy > /dev/null || return 0
    py-spy record --pid "$(cat /root/gateway.pid)" --duration "$PROFILE" --rate 200 \
        --nonblocking --format raw --output "$out/gateway-profile.txt" \
        > "$out/py-spy.log" 2>&1 &
}

case $phase in
sweep)
    start_gateway 256 --backend-url "$VLLM_URL"
    net_counters before
    sampler=$(sample_vllm "$out/vllm-metrics.jsonl" "$VLLM_URL")
    start_profile
    "${BENCH[@]}" --targets "direct=$VLLM_URL,gateway=$GW_URL" --gateway-pid "$(cat /root/gateway.pid)" \
        --sweep "${SWEEP:-64,100,256}" --num-requests "${NUM:-512}" --rounds "$ROUNDS" --out "$out/sweep"
    kill "$sampler" || true
    net_counters after
    stop_gateway
    ;;
poisson)
    rate=${RATE:-}
    if [ -z "$rate" ]; then
        rate=$("$PY" -c 'import json, sys
d = json.load(open(sys.argv[1]))
tok = d["levels"][-1]["targets"]["direct"]["tokens_per_s"]
print(round(tok / d["config"]["max_tokens"] * float(sys.argv[2]), 1))' \
            "${RATE_FROM:?set RATE or RATE_FROM}" "${RATE_SCALE:-1}")
    fi
    echo "poisson: $rate arrivals/s"
    start_gateway 256 --backend-url "$VLLM_URL"
    net_counters before
    sampler=$(sample_vllm "$out/vllm-metrics.jsonl" "$VLLM_URL")
    start_profile
    "${BENCH[@]}" --targets "direct=$VLLM_URL,gateway=$GW_URL" --gateway-pid "$(cat /root/gateway.pid)" \
        --rate "$rate" --num-requests "${NUM:-512}" --rounds "$ROUNDS" --out "$out/poisson"
    kill "$sampler" || true
    net_counters after
    stop_gateway
    ;;
seed)
    start_gateway 100 --backend-url "$VLLM_URL"
    sampler=$(sample_vllm "$out/vllm-metrics.jsonl" "$VLLM_URL")
    "${BENCH[@]}" --targets "direct=$VLLM_URL,gateway=$GW_URL" --gateway-pid "$(cat /root/gateway.pid)" \
        --concurrency "${USERS:-1000}" --num-requests "${NUM:-2000}" --rounds "$ROUNDS" --timeout 900 \
        --out "$out/seed1000"
    kill "$sampler" || true
    stop_gateway
    ;;
vllm)
    start_gateway 256 --backend-url "$VLLM_URL"
    for target in direct gateway; do
        url=$VLLM_URL; [ $target = gateway ] && url=$GW_URL
        "$PY" -m vllm.entrypoints.cli.main bench serve --backend openai-chat \
            --endpoint /v1/chat/completions --base-url "$url" --model m --tokenizer "$TOKENIZER" \
            --dataset-name random --random-input-len 256 --random-output-len 256 \
            --num-prompts 768 --max-concurrency 256 --ignore-eos --save-result \
            --result-dir "$out" --result-filename "vllm-bench-$target.json" 2>&1 \
            | grep -vE "^\s*$|it/s\]$" | tail -40
    done
    stop_gateway
    ;;
embedded)
    # The two-process setup first, at the same load, for the comparison.
    start_gateway 100 --backend-url "$VLLM_URL"
    "${BENCH[@]}" --targets "two-process=$GW_URL" --gateway-pid "$(cat /root/gateway.pid)" \
        --concurrency 100 --num-requests 400 --rounds "$ROUNDS" --out "$out/two-process100"
    stop_gateway
    pkill -f "vllm.entrypoints.openai.api_server" || true
    for _ in $(seq 60); do pgrep -f "vllm.entrypoints.openai.api_server" > /dev/null || break; sleep 1; done
    export VLLM_USE_EMBEDDED_ENGINE=true VLLM_BACKEND_URL="" VLLM_MODEL="${EMBED_MODEL:?}"
    export VLLM_ENGINE_ARGS="${ENGINE_ARGS:-}"
    start_gateway 100
    "${BENCH[@]}" --targets "embedded=$GW_URL" --gateway-pid "$(cat /root/gateway.pid)" \
        --concurrency 100 --num-requests 400 --rounds "$ROUNDS" --out "$out/embedded100"
    stop_gateway
    ;;
*)
    echo "unknown phase $phase" >&2; exit 2 ;;
esac
