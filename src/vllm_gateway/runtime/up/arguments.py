"""``up``'s command line: its own flags (vLLM's model, port, extra arguments, log, start and stop
timeouts) and the gateway's settings, taken as ``serve`` takes them.

Invariants:
- The gateway's settings are built by ``settings.load_settings`` from the environment and the
  flags, as for ``serve``; ``up`` only fixes the backend (its own vLLM child) and, unless the user
  chose one, the idle timeout towards it (below vLLM's keep-alive).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from vllm_gateway.runtime.up.vllm_command import upstream_idle_for
from vllm_gateway.settings import FIELDS, add_arguments

__all__ = ["build_parser", "gateway_flags"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-gateway up",
        description="Start a vLLM OpenAI server as a child process and the gateway in front of it.",
    )
    # settings.add_arguments supplies --model (env VLLM_MODEL): here it names vLLM's model.
    add_arguments(parser)
    parser.add_argument(
        "--vllm-port", type=int, default=None, help="vLLM's loopback port (default: a free port)"
    )
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARGS",
        help="extra vLLM arguments, shell-split, repeatable (e.g. --vllm-arg='--enforce-eager')",
    )
    parser.add_argument(
        "--log-file", default=None, help="vLLM's log (default: <cache>/logs/vllm-<time>-<port>.log)"
    )
    parser.add_argument(
        "--vllm-startup-timeout",
        type=float,
        default=1200.0,
        help="seconds to wait for vLLM's /health (first start compiles: minutes)",
    )
    parser.add_argument(
        "--vllm-stop-timeout",
        type=float,
        default=30.0,
        help="seconds between SIGTERM and SIGKILL when stopping vLLM",
    )
    return parser


def gateway_flags(
    args: argparse.Namespace, backend_url: str, env: Mapping[str, str]
) -> dict[str, str | None]:
    """The flags ``load_settings`` takes for the gateway in front of vLLM at ``backend_url``."""
    flags: dict[str, str | None] = {spec.name: getattr(args, spec.name) for spec in FIELDS}
    flags["api_keys_file"] = args.api_keys_file
    flags["backend_urls"] = backend_url
    flags["use_embedded_engine"] = "false"
    if flags.get("upstream_idle_timeout") is None and not env.get(
        "VLLM_UPSTREAM_IDLE_TIMEOUT_SECONDS"
    ):
        flags["upstream_idle_timeout"] = upstream_idle_for(env)
    return flags
