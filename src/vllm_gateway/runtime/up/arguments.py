"""``up``'s command line: its own flags (vLLM's model, extra arguments, port, log, start and stop
timeouts), then the gateway's settings, taken as ``serve`` takes them.

Two parsers read one command line: ``build_parser`` knows ``up``'s own flags, and its ``--help``
shows only those, then says where the gateway's settings come from; what it does not know goes to
a parser of ``serve``'s flags (``settings.add_arguments``), which reads them as ``serve`` does.

Invariants:
- The gateway's settings are built by ``settings.load_settings`` from the environment and these
  flags, as for ``serve``; ``up`` only fixes the backend (the vLLM it starts) and, unless the user
  chose one, the idle timeout towards it (below vLLM's keep-alive).
- A ``serve`` flag that has no meaning for ``up`` (``NOT_FOR_UP``) is refused with the reason,
  not silently overridden.
- ``--model`` is ``up``'s (vLLM's model), and reaches the settings as ``VLLM_MODEL`` would.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_gateway.runtime.up.vllm_command import upstream_idle_for
from vllm_gateway.settings import add_arguments

__all__ = ["NOT_FOR_UP", "UpArguments", "build_parser", "gateway_flags", "parse_arguments"]

USAGE = "%(prog)s [up's flags] [serve's flags]"

EPILOG = """\
the gateway in front of vLLM:
  Its settings come from the VLLM_* environment variables, as for 'vllm-gateway serve', and up
  takes serve's flags too, each overriding its variable: 'vllm-gateway serve --help' lists them
  (where it listens: --host, --port; client keys: --api-keys-file; limits, timeouts, logs).
  up points the gateway at the vLLM it starts: --backend-url, --embedded and --engine-args do not
  apply (vLLM's arguments go with --vllm-arg).

examples:
  vllm-gateway up                                        SmolLM2-135M-Instruct, on a CPU too
  vllm-gateway up --port 7100 --max-concurrent-requests 8
  vllm-gateway up --model openai/gpt-oss-20b             on a GPU machine
  vllm-gateway up --vllm-arg='--max-model-len 4096 --enforce-eager'
"""

# serve's flags that have no meaning for up: (the setting, its flag, why).
NOT_FOR_UP = (
    ("backend_urls", "--backend-url", "up points the gateway at the vLLM it starts"),
    ("use_embedded_engine", "--embedded", "up runs vLLM as a child process, not in the gateway"),
    ("engine_args", "--engine-args", "vLLM's arguments go with --vllm-arg"),
)


@dataclass(frozen=True)
class UpArguments:
    model: str | None  # None: VLLM_MODEL, else the default model
    vllm_args: tuple[str, ...]  # shell-split, in order
    vllm_port: int | None  # None: a free port
    log_file: str | None
    startup_timeout: float
    stop_timeout: float
    gateway: Mapping[str, str | None]  # serve's flags by setting name; None: not given


def build_parser() -> argparse.ArgumentParser:
    """``up``'s own flags: what ``vllm-gateway up --help`` shows."""
    parser = argparse.ArgumentParser(
        prog="vllm-gateway up",
        usage=USAGE,
        description="Start vLLM's OpenAI server as a child process, then the gateway in front of "
        "it.\nCtrl-C stops both: the gateway drains, then vLLM stops.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # A prefix of a serve flag (--log for --log-level) must not land on up's own (--log-file).
        allow_abbrev=False,
    )
    parser.add_argument(
        "--model",
        default=None,
        help="vLLM's model: a Hugging Face name or a folder (env VLLM_MODEL; default: the "
        "packaged SmolLM2-135M-Instruct, converted on the first run)",
    )
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARGS",
        help="extra vLLM arguments, shell-split, repeatable; they come last and override up's "
        "defaults (e.g. --vllm-arg='--enforce-eager')",
    )
    parser.add_argument(
        "--vllm-port",
        type=int,
        default=None,
        metavar="PORT",
        help="vLLM's loopback port (default: a free port)",
    )
    parser.add_argument(
        "--log-file",
        default=None,
        metavar="PATH",
        help="vLLM's log (default: <cache>/logs/vllm-<time>-<port>.log; <cache> is "
        "$VLLM_GATEWAY_CACHE or ~/.cache/vllm-gateway)",
    )
    parser.add_argument(
        "--vllm-startup-timeout",
        type=float,
        default=1200.0,
        metavar="SECONDS",
        help="how long to wait for vLLM's /health (its start compiles the model: minutes on a "
        "CPU; default 1200)",
    )
    parser.add_argument(
        "--vllm-stop-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between SIGTERM and SIGKILL when stopping vLLM (default 30)",
    )
    return parser


def _gateway_parser() -> argparse.ArgumentParser:
    """``serve``'s flags, for what ``up``'s own parser leaves."""
    parser = argparse.ArgumentParser(prog="vllm-gateway up", usage=USAGE, add_help=False)
    add_arguments(parser)
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> UpArguments:
    """Read ``up``'s command line; exit 2 with a message on a flag it cannot take (argparse)."""
    own, rest = build_parser().parse_known_args(argv)
    serve = _gateway_parser()
    gateway = vars(serve.parse_args(rest))
    for name, flag, why in NOT_FOR_UP:
        if gateway.get(name) is not None:
            serve.error(f"{flag} does not apply to up: {why}")
    try:
        vllm_args = tuple(part for chunk in own.vllm_arg for part in shlex.split(chunk))
    except ValueError as exc:
        serve.error(f"--vllm-arg: {exc}")
    return UpArguments(
        model=own.model,
        vllm_args=vllm_args,
        vllm_port=own.vllm_port,
        log_file=own.log_file,
        startup_timeout=own.vllm_startup_timeout,
        stop_timeout=own.vllm_stop_timeout,
        gateway=gateway,
    )


def gateway_flags(
    args: UpArguments, backend_url: str, env: Mapping[str, str]
) -> dict[str, str | None]:
    """The flags ``load_settings`` takes for the gateway in front of vLLM at ``backend_url``."""
    flags = dict(args.gateway)
    if args.model is not None:
        flags["model"] = args.model
    flags["backend_urls"] = backend_url
    flags["use_embedded_engine"] = "false"
    if flags.get("upstream_idle_timeout") is None and not env.get(
        "VLLM_UPSTREAM_IDLE_TIMEOUT_SECONDS"
    ):
        flags["upstream_idle_timeout"] = upstream_idle_for(env)
    return flags
