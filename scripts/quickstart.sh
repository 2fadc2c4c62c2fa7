#!/usr/bin/env bash
# The first command of the README: install what is missing, then run vLLM and the gateway in the
# foreground (`vllm-gateway up`, which prepares the default model on its first run). Ctrl-C stops
# both.
#
#   ./scripts/quickstart.sh                  # SmolLM2-135M-Instruct on CPU, gateway on 127.0.0.1:7000
#   VLLM_MODEL=openai/gpt-oss-20b ./scripts/quickstart.sh   # your model (on a GPU machine)
#   ./scripts/quickstart.sh --port 7100      # any flag of `vllm-gateway up` passes through
#
# Re-running is quick: install.sh skips when nothing changed, the converted model is cached
# (~/.cache/vllm-gateway) and so is vLLM's compile cache (~/.cache/vllm).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_GATEWAY_VENV:-$ROOT/.venv}"

"$ROOT/scripts/install.sh"

# Loopback unless the caller chose a bind address: the quickstart serves no API key.
host=(--host "${VLLM_HOST:-127.0.0.1}")
for arg in "$@"; do
    [[ $arg == --host || $arg == --host=* ]] && host=()
done
exec "$VENV/bin/vllm-gateway" up "${host[@]}" "$@"
