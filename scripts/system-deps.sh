#!/usr/bin/env bash
# The Debian packages some tests need (make test runs this first). It says which are missing and
# what each is for, then installs them with apt-get when run as root (a progress line while apt
# works; its output goes to test-artifacts/system-deps.log); otherwise it names them and fails.
#
#   scripts/system-deps.sh           # check, install what is missing
#   scripts/system-deps.sh --list    # what is needed and why; installs nothing
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="$ROOT/test-artifacts/system-deps.log"

# package | why the tests need it
NEEDED=(
    "shellcheck|lints scripts/start_vllm_h100.sh (tests/unit/test_deploy.py)"
    "redis-server|gateway replicas sharing rate limits (tests/integration/test_replicas_share_limits.py)"
    "chromium|the status page in a real browser (tests/browser)"
    "chromium-driver|drives that browser through Selenium (tests/browser)"
    "podman|builds and runs the gateway's container image (tests/container)"
    "runc|the container runtime podman uses here (the default crun fails on this machine's limits)"
    "catatonit|PID 1 of the test container (podman run --init), so podman stop delivers SIGTERM"
    "debootstrap|makes the container's Debian base image locally (no registry is reachable)"
    "dnsmasq|a real DNS server on loopback whose records the tests change (tests/integration/test_discovery.py)"
)

say() { printf '[system-deps] %s\n' "$*"; }

installed() {
    if command -v dpkg-query >/dev/null; then
        [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
    else
        command -v "$1" >/dev/null
    fi
}

if [[ "${1:-}" == "--list" ]]; then
    for entry in "${NEEDED[@]}"; do printf '%-16s %s\n' "${entry%%|*}" "${entry#*|}"; done
    exit 0
fi

missing=()
for entry in "${NEEDED[@]}"; do
    installed "${entry%%|*}" || missing+=("$entry")
done
if ((${#missing[@]} == 0)); then
    say "all present: ${NEEDED[*]%%|*}"
    exit 0
fi

say "the tests need these Debian packages, missing here:"
names=()
for entry in "${missing[@]}"; do
    names+=("${entry%%|*}")
    say "$(printf '  %-16s %s' "${entry%%|*}" "${entry#*|}")"
done

if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    say "install them with your package manager (as root: apt-get install ${names[*]}); the tests that need them fail without them" >&2
    exit 1
fi

say "installing them with apt-get (a few hundred MB on a fresh machine, about 2 minutes); log: ${LOG#"$ROOT"/}"
mkdir -p "$(dirname "$LOG")"
progress=(python3 "$ROOT/scripts/run_with_progress.py" --label system-deps --log "$LOG" --)
# Another apt-get may hold the lock for a while (a bounded wait, not a failure at once).
lock_wait=(-o DPkg::Lock::Timeout=300)
"${progress[@]}" apt-get "${lock_wait[@]}" update
DEBIAN_FRONTEND=noninteractive "${progress[@]}" \
    apt-get "${lock_wait[@]}" install -y --no-install-recommends "${names[@]}"
