"""A vLLM simulator: an OpenAI-compatible server that answers like vLLM's, at a set pace, with faults.

It exists for the gateway's tests and benchmarks. It speaks the same JSON and SSE shapes as
vLLM 0.32's server on every route a client uses (chat, completions, Responses, Anthropic Messages,
the pooling routes, tokenize, audio, the dev/admin routes; ``simulator.render*``), and adds
``/sim/stats``, ``/sim/config`` and ``/sim/reset`` to inspect and steer it. See docs/simulator.md
for the routes and the knobs.

Two ways in:

- in-process, on the caller's event loop::

      async with run_simulator(SimulatorConfig(ttft=0.01), port=0) as sim:
          sim.url, sim.stats(), sim.configure(stall_after=3), sim.reset()

- as a process: ``main(argv)`` (``python -m vllm_gateway_tools.simulator --port 0``), which prints
  ``simulator listening on http://HOST:PORT`` once it is ready and exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from vllm_gateway_tools.simulator.config import (
    MALFORMED_KINDS,
    RUNNERS,
    ConfigError,
    SimulatorConfig,
)
from vllm_gateway_tools.simulator.kv_events import KVEventsError
from vllm_gateway_tools.simulator.server import SimProtocol
from vllm_gateway_tools.simulator.state import SimState
from vllm_gateway_tools.simulator.store import ResponseStore

__all__ = [
    "ConfigError",
    "Simulator",
    "SimulatorConfig",
    "main",
    "run_simulator",
    "start_simulator",
]


class Simulator:
    """A running simulator. Use ``run_simulator``; ``close`` stops it and drops its connections."""

    def __init__(self, state: SimState, store: ResponseStore, server: asyncio.Server, host: str,
                 port: int) -> None:  # fmt: skip
        self.state = state
        self.store = store  # the Responses API store
        self.server = server
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def config(self) -> SimulatorConfig:
        return self.state.config

    def stats(self) -> dict[str, Any]:
        """The same dict as ``GET /sim/stats``."""
        return self.state.stats()

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Change knobs, as ``POST /sim/config`` does; returns the full config. Raises ``ConfigError``."""
        self.state.configure(self.state.config.updated(knobs))
        return self.state.config.as_dict()

    def reset(self) -> dict[str, Any]:
        """Zero the counters and forget the records, as ``POST /sim/reset`` does."""
        self.state.reset()
        return self.state.stats()

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache, as ``POST /reset_prefix_cache`` does (without dev mode)."""
        self.state.reset_prefix_cache()

    async def close(self) -> None:
        self.server.close()
        # Abort rather than close: a hung or stalled stream must not keep shutdown waiting.
        for conn in list(self.state.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await self.server.wait_closed()
        # Let connection_lost callbacks run, so the counters are final when close() returns.
        await asyncio.sleep(0)
        self.state.close()


def loopback_command(port: int | str = 0, *args: str, python: str = sys.executable) -> list[str]:
    """The command that runs the simulator as its own process on 127.0.0.1 (port 0: any free
    one, printed in its first line); ``args`` are more of its command-line options."""
    return [
        python,
        "-m",
        "vllm_gateway_tools.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]


async def start_simulator(
    config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Simulator:
    """Start listening on the running loop; the caller must ``await sim.close()``."""
    state = SimState(config or SimulatorConfig())  # may raise KVEventsError
    store = ResponseStore()
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            lambda: SimProtocol(state, store), host, port, backlog=4096, reuse_address=True
        )
    except BaseException:
        state.close()
        raise
    bound = server.sockets[0].getsockname()
    return Simulator(state, store, server, host, int(bound[1]))


@contextlib.asynccontextmanager
async def run_simulator(
    config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Simulator]:
    """A simulator that lives for the ``async with`` block, on the current event loop."""
    sim = await start_simulator(config, host=host, port=port)
    try:
        yield sim
    finally:
        await sim.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-gateway simulate",
        description="A vLLM simulator: vLLM-shaped OpenAI responses at a set pace, with fault knobs.",
    )
    d = SimulatorConfig()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0 picks a free port (printed at start)")
    p.add_argument(
        "--model",
        action="append",
        help=f"a served model name; repeat or comma-separate for several (default {d.models[0]})",
    )
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and /v2"
    )
    p.add_argument(
        "--runner", choices=RUNNERS, default=d.runner, help="serve the generate or pooling routes"
    )
    p.add_argument(
        "--dev-mode", action="store_true", help="serve the dev/admin routes (VLLM_SERVER_DEV_MODE)"
    )
    p.add_argument(
        "--no-responses-store",
        action="store_true",
        help="as vLLM without VLLM_ENABLE_RESPONSES_API_STORE: no store, no background responses",
    )
    pace = p.add_argument_group("pace")
    pace.add_argument("--ttft", type=float, default=d.ttft, help="seconds to the first token")
    pace.add_argument("--itl", type=float, default=d.itl, help="seconds between tokens")
    pace.add_argument(
        "--tokens", type=int, default=d.tokens, help="tokens when max_tokens is absent"
    )
    faults = p.add_argument_group("faults")
    faults.add_argument(
        "--status", type=int, default=None, help="answer this status with vLLM's error JSON"
    )
    faults.add_argument(
        "--error-traceback", action="store_true", help="500 with a traceback in the body"
    )
    faults.add_argument("--hang", action="store_true", help="never send the response head")
    faults.add_argument("--stall-after", type=int, default=None, help="send N chunks, then nothing")
    faults.add_argument(
        "--drop-after", type=int, default=None, help="send N chunks, then close the connection"
    )
    faults.add_argument("--malformed", choices=MALFORMED_KINDS, default=None)
    faults.add_argument("--huge-line-bytes", type=int, default=d.huge_line_bytes)
    faults.add_argument("--unhealthy", action="store_true", help="/health answers 503")
    cache = p.add_argument_group("prefix cache (off while --prefix-cache-blocks is 0)")
    cache.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=d.prefix_cache_blocks,
        help="cache capacity in blocks, LRU (chat and completions prompts)",
    )
    cache.add_argument("--block-size", type=int, default=d.block_size, help="tokens per block")
    cache.add_argument(
        "--prefill-per-token",
        type=float,
        default=d.prefill_per_token,
        help="seconds added to TTFT per prompt token not found in the cache",
    )
    cache.add_argument(
        "--kv-events-port",
        type=int,
        default=None,
        help="publish vLLM's KV events on a ZMQ PUB socket on 127.0.0.1:PORT (0: a free port)",
    )
    cache.add_argument("--kv-events-topic", default=d.kv_events_topic, help="the events' topic")
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="requests run at once, the rest wait (vLLM's --max-num-seqs; 0: no limit)",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (auto: uvloop if installed)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    return SimulatorConfig(
        models=tuple(args.model) if args.model else SimulatorConfig().models,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        ttft=args.ttft,
        itl=args.itl,
        tokens=args.tokens,
        status=args.status,
        error_traceback=args.error_traceback,
        hang=args.hang,
        stall_after=args.stall_after,
        drop_after=args.drop_after,
        malformed=args.malformed,
        huge_line_bytes=args.huge_line_bytes,
        unhealthy=args.unhealthy,
        runner=args.runner,
        dev_mode=args.dev_mode,
        responses_store=not args.no_responses_store,
        prefix_cache_blocks=args.prefix_cache_blocks,
        block_size=args.block_size,
        prefill_per_token=args.prefill_per_token,
        kv_events_port=args.kv_events_port,
        kv_events_topic=args.kv_events_topic,
        max_num_seqs=args.max_num_seqs,
    )


async def _serve(config: SimulatorConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_simulator(config, host=host, port=port) as sim:
        if sim.state.kv_events is not None:
            print(f"kv events on tcp://127.0.0.1:{sim.state.kv_events.port}", flush=True)
        print(f"simulator listening on {sim.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """The ``vllm-gateway simulate`` command. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    runner: Any = asyncio.run
    if args.loop != "asyncio":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            if args.loop == "uvloop":
                print("simulator: uvloop is not installed", file=sys.stderr)
                return 2
    try:
        runner(_serve(config, args.host, args.port))
    except KVEventsError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
