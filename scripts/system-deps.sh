#!/usr/bin/env bash
# Debian packages some tests need: shellcheck (the start script), redis-server (shared rate
# limits), chromium + chromium-driver (the status page in a real browser).
# Installs them when run as root with apt-get; otherwise says what is missing.
set -euo pipefail
need=()
command -v shellcheck >/dev/null || need+=(shellcheck)
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if ((${#need[@]} == 0)); then
    echo "[system-deps] all present"
    exit 0
fi
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "[system-deps] installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
    echo "[system-deps] missing: ${need[*]} (install them with your package manager; the tests that need them will fail)" >&2
    exit 1
fi
