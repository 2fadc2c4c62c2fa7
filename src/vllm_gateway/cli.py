"""The ``vllm-gateway`` command. The only place that reads the process environment for settings,
prints configuration errors and chooses an exit status.

    vllm-gateway serve      the gateway (settings from VLLM_* variables, flags override)
    vllm-gateway up         vLLM as a supervised child process, then the gateway in front of it
    vllm-gateway prepare-model   convert the default model (SmolLM2-135M-Instruct) once
    vllm-gateway simulate   the vLLM simulator, for tests and benchmarks   (vllm-gateway-tools)
    vllm-gateway bench      the load generator and its report             (vllm-gateway-tools)
    vllm-gateway soak       a soak with faults, counting broken promises   (vllm-gateway-tools)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from vllm_gateway import __version__
from vllm_gateway.settings import SettingsError, add_arguments, load_settings

__all__ = ["main"]


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-gateway serve",
        description="Run the gateway. Each flag overrides the environment variable it names.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(os.environ, vars(args))
    except SettingsError as exc:
        print(f"vllm-gateway: {exc}", file=sys.stderr)
        return 2
    from vllm_gateway.observability.logs import configure_logging

    configure_logging(settings)
    from vllm_gateway.runtime.serve import serve

    try:
        return serve(settings)
    except ImportError as exc:  # the embedded engine without vLLM installed, for one
        print(f"vllm-gateway: {exc}", file=sys.stderr)
        return 1


def _lazy(module: str) -> Callable[[list[str]], int]:
    """A command whose module is imported only when it runs. The tools (simulator, bench, soak)
    are a separate distribution, ``vllm-gateway-tools``: named here, not imported."""

    def run(argv: list[str]) -> int:
        import importlib

        try:
            entry = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name.startswith("vllm_gateway_tools"):
                print(
                    f"vllm-gateway: {(argv and argv[0]) or module}: the tools are not installed "
                    "(pip install -e tools, or make install)",
                    file=sys.stderr,
                )
                return 2
            raise
        return int(entry.main(argv))

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_serve, "run the gateway"),
    "up": (
        _lazy("vllm_gateway.runtime.up.command"),
        "start vLLM as a supervised child, then the gateway in front of it",
    ),
    "prepare-model": (
        _lazy("vllm_gateway.backends.embedded.model"),
        "convert the default model once, print its folder",
    ),
    "simulate": (
        _lazy("vllm_gateway_tools.simulator"),
        "run the vLLM simulator (tests and benchmarks; needs vllm-gateway-tools)",
    ),
    "bench": (
        _lazy("vllm_gateway_tools.bench.cli"),
        "benchmark a target, or the gateway against a direct connection (vllm-gateway-tools)",
    ),
    "soak": (
        _lazy("vllm_gateway_tools.soak"),
        "mixed traffic with faults and restarts, counting broken promises (vllm-gateway-tools)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if __doc__ else "")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    entry = COMMANDS.get(argv[0])
    if entry is None:
        print(
            f"vllm-gateway: unknown command {argv[0]!r}; try: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        return entry[0](argv[1:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
