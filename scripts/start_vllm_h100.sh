#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server with the H100 parameters (docs/design.md says why each).
#
#   VLLM_MODEL=openai/gpt-oss-20b VLLM_PORT=7001 ./scripts/start_vllm_h100.sh [extra vLLM args...]
#   ./scripts/start_vllm_h100.sh --print [extra vLLM args...]   # print the command, run nothing
#   ./scripts/start_vllm_h100.sh --help                         # this text
#
# Every value of the table can be overridden by an environment variable; arguments after the
# script's own are passed to vLLM unchanged (they come last, so they win over the table).
#
#   VLLM_MODEL                    model name or folder            (openai/gpt-oss-20b)
#   VLLM_SERVED_MODEL_NAME        names clients may ask for, space-separated; the first is the one
#                                 responses carry (the last path part, then the model:
#                                 "gpt-oss-20b openai/gpt-oss-20b")
#   VLLM_SERVER_HOST              bind address                    (0.0.0.0)
#   VLLM_PORT                     bind port                       (7001)
#   VLLM_GPU_MEMORY_UTILIZATION   --gpu-memory-utilization        (0.90)
#   VLLM_MAX_NUM_SEQS             --max-num-seqs                  (256)
#   VLLM_TENSOR_PARALLEL_SIZE     --tensor-parallel-size          (1)
#   VLLM_DTYPE                    --dtype                         (bfloat16)
#   VLLM_TRUST_REMOTE_CODE        true adds --trust-remote-code   (true)
#   VLLM_ENFORCE_EAGER            true adds --enforce-eager       (false; debugging only)
#   VLLM_LAUNCHER                 auto | serve | module           (auto)
#   VLLM_PYTHON                   interpreter for the module form (python3 if it has vLLM, else
#                                 the project's .venv/bin/python if that has it)
#   VLLM_DRY_RUN=1 or --print     print the command instead of running it
#
# These variables are the script's own: they are removed from vLLM's environment (vLLM warns
# about unknown VLLM_* names, and reads VLLM_PORT itself as the base of its internal ports).
# vLLM's own variables (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, ...) pass through.
#
# The command is `vllm serve` when the `vllm` console script works, else
# `python -m vllm.entrypoints.openai.api_server` (the CPU build's console script cannot find its
# own metadata). The script `exec`s vLLM so that SIGTERM from a supervisor reaches it directly.
# vLLM's own options: `vllm serve --help` (or `python -m vllm.entrypoints.openai.api_server --help`).
#
# Note: VLLM_PORT is vLLM's port here. The gateway reads VLLM_PORT as its own bind port, so do not
# export it into the gateway's shell (or pass `vllm-gateway serve --port 7000`).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OWN_VARIABLES=(
    VLLM_MODEL VLLM_SERVED_MODEL_NAME VLLM_SERVER_HOST VLLM_PORT VLLM_GPU_MEMORY_UTILIZATION
    VLLM_MAX_NUM_SEQS VLLM_TENSOR_PARALLEL_SIZE VLLM_DTYPE VLLM_TRUST_REMOTE_CODE
    VLLM_ENFORCE_EAGER VLLM_LAUNCHER VLLM_PYTHON VLLM_DRY_RUN
)

dry_run="${VLLM_DRY_RUN:-0}"
case "${1:-}" in
    --print)
        dry_run=1
        shift
        ;;
    -h | --help)
        sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed -e 's/^# \{0,1\}//' -e '$d'
        exit 0
        ;;
esac

is_true() {
    case "${1,,}" in
        1 | true | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

model="${VLLM_MODEL:-openai/gpt-oss-20b}"
host="${VLLM_SERVER_HOST:-0.0.0.0}"
port="${VLLM_PORT:-7001}"
gpu_memory_utilization="${VLLM_GPU_MEMORY_UTILIZATION:-0.90}"
max_num_seqs="${VLLM_MAX_NUM_SEQS:-256}"
tensor_parallel_size="${VLLM_TENSOR_PARALLEL_SIZE:-1}"
dtype="${VLLM_DTYPE:-bfloat16}"
trust_remote_code="${VLLM_TRUST_REMOTE_CODE:-true}"
enforce_eager="${VLLM_ENFORCE_EAGER:-false}"

has_vllm() {
    "$1" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)' \
        >/dev/null 2>&1
}

# Clients of the seed ask for "gpt-oss-20b" while the model is "openai/gpt-oss-20b": serve both.
# The short name comes first because vLLM reports the first name in its responses' "model".
served_names=()
if [[ -n "${VLLM_SERVED_MODEL_NAME:-}" ]]; then
    read -r -a served_names <<<"${VLLM_SERVED_MODEL_NAME}"
else
    short_name="${model%/}"
    short_name="${short_name##*/}"
    if [[ -n "$short_name" && "$short_name" != "$model" ]]; then
        served_names=("$short_name" "$model")
    else
        served_names=("$model")
    fi
fi

launcher="${VLLM_LAUNCHER:-auto}"
if [[ "$launcher" == "auto" ]]; then
    # `vllm --version` fails fast when the console script is broken (the CPU build's looks up
    # metadata of a distribution named `vllm` that is not installed).
    if command -v vllm >/dev/null 2>&1 && vllm --version >/dev/null 2>&1; then
        launcher=serve
    else
        launcher=module
    fi
fi
python_bin="${VLLM_PYTHON:-}"
if [[ "$launcher" == "module" && -z "$python_bin" ]]; then
    python_bin=python3
    if ! has_vllm python3; then
        if [[ -x "$ROOT/.venv/bin/python" ]] && has_vllm "$ROOT/.venv/bin/python"; then
            python_bin="$ROOT/.venv/bin/python"
            echo "start_vllm_h100: python3 has no vLLM; using the project's $python_bin" >&2
        elif ! is_true "$dry_run"; then
            echo "start_vllm_h100: vLLM is not installed for python3 (nor in $ROOT/.venv)." >&2
            echo "  Install it (make install), activate its venv (source .venv/bin/activate)," >&2
            echo "  or name the interpreter: VLLM_PYTHON=/path/to/python." >&2
            exit 1
        fi
    fi
fi
case "$launcher" in
    serve) cmd=(vllm serve "$model") ;;
    module) cmd=("$python_bin" -m vllm.entrypoints.openai.api_server --model "$model") ;;
    *)
        echo "start_vllm_h100: VLLM_LAUNCHER must be auto, serve or module, not '$launcher'" >&2
        exit 2
        ;;
esac

cmd+=(
    --host "$host"
    --port "$port"
    --served-model-name "${served_names[@]}"
    --gpu-memory-utilization "$gpu_memory_utilization"
    --max-num-seqs "$max_num_seqs"
    --tensor-parallel-size "$tensor_parallel_size"
    --dtype "$dtype"
)
if is_true "$trust_remote_code"; then
    cmd+=(--trust-remote-code)
fi
if is_true "$enforce_eager"; then
    cmd+=(--enforce-eager)
fi
cmd+=("$@")

if is_true "$dry_run"; then
    # Shell-quoted, so the line can be pasted into a shell (and split back by shlex).
    echo "${cmd[*]@Q}"
    exit 0
fi

echo "start_vllm_h100: ${cmd[*]@Q}" >&2
unset "${OWN_VARIABLES[@]}"
exec "${cmd[@]}"
