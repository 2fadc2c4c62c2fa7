"""The ``vllm-gateway`` command: one entry per subcommand in ``COMMANDS``, with the line that
``vllm-gateway --help`` shows for it. The only place that reads the process environment for
settings, prints configuration errors and chooses an exit status.
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


SERVE_EXAMPLES = """\
examples:
  # one vLLM server
  vllm-gateway serve --backend-url http://127.0.0.1:8000
  # two, routed by what each has cached
  vllm-gateway serve --backend-url http://gpu1:8000,http://gpu2:8000 \\
    --pool-routing cache_aware
  # 32 requests at a time, 200 more waiting at most 10 s each
  vllm-gateway serve --max-concurrent-requests 32 \\
    --max-queued-requests 200 --queue-wait-timeout 10
  # two tenants' keys (KEY:TENANT:PRIORITY), 600 requests a minute each
  vllm-gateway serve --api-keys sk-a:team-a,sk-b:team-b:1 --rate-limit-rpm 600
  # four processes, JSON logs; the environment works as well as the flags
  VLLM_WORKERS=4 vllm-gateway serve --log-format json
"""


def serve_parser() -> argparse.ArgumentParser:
    """``serve``'s command line: one flag per setting, grouped, then a few examples."""
    parser = argparse.ArgumentParser(
        prog="vllm-gateway serve",
        usage="%(prog)s [-h] [--FLAG VALUE ...]",
        description="Run the gateway. Each setting is an environment variable and a flag;\n"
        "the flag overrides the variable it names.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def _serve(argv: list[str]) -> int:
    args = serve_parser().parse_args(argv)
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
    "up": (
        _lazy("vllm_gateway.runtime.up.command"),
        "start vLLM as a supervised child and the gateway in front of it (start here)",
    ),
    "serve": (
        _serve,
        "run the gateway in front of running vLLM servers, or of an embedded engine",
    ),
    "prepare-model": (
        _lazy("vllm_gateway.backends.embedded.model"),
        "convert the default model once, print its folder",
    ),
    "simulate": (
        _lazy("vllm_gateway_tools.simulator"),
        "run the vLLM simulator, for tests and benchmarks (needs vllm-gateway-tools)",
    ),
    "bench": (
        _lazy("vllm_gateway_tools.bench.cli"),
        "benchmark a target, or the gateway against a direct connection (needs vllm-gateway-tools)",
    ),
    "soak": (
        _lazy("vllm_gateway_tools.soak"),
        "traffic with faults and restarts, counting broken promises (needs vllm-gateway-tools)",
    ),
}


def usage() -> str:
    """What ``vllm-gateway --help`` prints: the commands, each with its line."""
    width = max(len(name) for name in COMMANDS)
    return "\n".join(
        [
            "usage: vllm-gateway <command> [flags]",
            "",
            "An asyncio gateway in front of vLLM's OpenAI server: admission control, bounded",
            "queueing, streaming relay, timeouts and graceful drain.",
            "",
            "commands:",
            *(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()),
            "",
            "'vllm-gateway <command> --help' shows a command's flags; "
            "'vllm-gateway --version' the version.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
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
