"""What ``up`` settles before it starts vLLM: vLLM's port, the model it serves, its log file.

Invariants:
- The model is the user's (``--model`` / ``VLLM_MODEL``) when given, else the default model's
  prepared folder, converted on the first run only.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.runtime.up.console import log
from vllm_gateway.runtime.up.warmup import ticking

__all__ = ["free_port", "log_path_for", "model_to_serve"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def model_to_serve(chosen: str | None, cache: Path) -> str:
    """The model vLLM serves: ``chosen``, else the default model's folder under ``cache``.

    Raises ``model_prep.ModelPrepError`` when the default model cannot be prepared.
    """
    if chosen:
        return chosen
    folder = model_prep.default_model_dir(cache)
    if model_prep.is_prepared(folder):
        return str(folder)
    log("preparing the default model (first run only, about 30 s)")
    with ticking("converting the packaged GGUF file to a bf16 folder", sys.stderr):
        return str(model_prep.prepare_default_model(cache))


def log_path_for(chosen: str | None, env: Mapping[str, str], port: int, stamp: str) -> Path:
    """vLLM's log file: ``chosen``, else ``<cache>/logs/vllm-<stamp>-<port>.log``."""
    if chosen:
        return Path(chosen)
    return model_prep.default_cache_dir(env) / "logs" / f"vllm-{stamp}-{port}.log"
