"""``vllm-gateway bench``: argument parsing, the rig's lifetime and the output folder.

``main(argv)`` returns an exit status and is the only place the benchmark turns problems into
one. Exit 0: the run finished (goals are reported, never enforced); 2: bad arguments; 1: the rig
or a target could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import orjson

from vllm_gateway_tools.bench import cache_scenario, metrics, report
from vllm_gateway_tools.bench.cache_rig import POLICIES
from vllm_gateway_tools.bench.client import Target
from vllm_gateway_tools.bench.rig import Rig, RigConfig, RigError
from vllm_gateway_tools.bench.runner import LoadSpec, ProcMonitor, progress
from vllm_gateway_tools.bench.scenarios import PRESETS, SCENARIOS, Preset, run_sweep
from vllm_gateway_tools.bench.session import Session

__all__ = ["build_parser", "main"]


def _csv(kind: type) -> Any:
    def parse(raw: str) -> list[Any]:
        try:
            return [kind(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {raw!r}") from None

    return parse


def _targets(raw: str) -> list[Target]:
    out = []
    for item in raw.split(","):
        name, sep, url = item.partition("=")
        if not sep or not url.startswith("http://"):
            raise argparse.ArgumentTypeError(f"target {item!r}: expected NAME=http://HOST:PORT")
        out.append(Target(name.strip(), url.strip()))
    return out


def _member_urls(raw: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in raw.split(",") if u.strip()]
    if not urls or not all(u.startswith("http://") for u in urls):
        raise argparse.ArgumentTypeError(f"expected http://HOST:PORT,http://HOST:PORT: {raw!r}")
    return urls


def _policies(raw: str) -> list[str]:
    names = [p.strip() for p in raw.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of routing policies")
    return names


def _env_pair(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {raw!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-gateway bench",
        description="Side-by-side load test: the same seeded OpenAI load sent to the backend directly "
        "and through the gateway, in alternating rounds.",
    )
    where = p.add_argument_group("what to measure")
    where.add_argument(
        "--targets", type=_targets, help="NAME=URL,NAME=URL; the first is the baseline"
    )
    where.add_argument(
        "--rig", action="store_true", help="start the simulator and the gateway, pinned"
    )
    where.add_argument(
        "--scenario",
        choices=sorted([*SCENARIOS, "cache", "rollout"]),
        help="a named preset (implies --rig without --targets)",
    )
    where.add_argument("--quick", action="store_true", help="CI-sized scenario (seconds)")
    where.add_argument("--gateway-pid", type=int, help="sample this process's CPU and memory")
    where.add_argument("--backend-pid", type=int, help="sample this process's CPU and memory")
    where.add_argument(
        "--gateway-cmd",
        help="rig: start this instead, e.g. 'vllm-router --port {port} --worker-urls {backend}'",
    )
    where.add_argument(
        "--gateway-ready",
        default="/health/ready",
        metavar="PATH",
        help="rig: the gateway is ready when GET PATH answers 200 (vllm-router: /health)",
    )
    where.add_argument(
        "--no-gateway",
        action="store_true",
        help="rig: a second simulator stands in for the gateway",
    )
    where.add_argument("--max-concurrent-requests", type=int, help="rig: the gateway's limit")
    where.add_argument("--max-queued-requests", type=int, help="rig: the gateway's queue")
    where.add_argument("--ttft", type=float, help="rig: the simulator's time to first token (s)")
    where.add_argument("--itl", type=float, help="rig: the simulator's pace between chunks (s)")
    load = p.add_argument_group("load")
    load.add_argument(
        "--concurrency", type=int, help="closed loop: users, each waiting for its last reply"
    )
    load.add_argument(
        "--rate", type=_csv(float), help="open loop: Poisson arrivals per second (list to sweep)"
    )
    load.add_argument(
        "--sweep", type=_csv(int), help="closed loop over these concurrencies, e.g. 1,10,100"
    )
    load.add_argument("--num-requests", type=int, help="requests per phase (default 100)")
    load.add_argument("--duration", type=float, help="seconds per phase instead of a request count")
    load.add_argument("--rounds", type=int, help="phases per target per level, alternating order")
    load.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None)
    load.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    load.add_argument("--model", help="model name (default: the first target's first model)")
    load.add_argument("--max-tokens", type=int)
    load.add_argument("--prompt-len", type=int, default=32, help="prompt length in words")
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=600.0, help="per request (s)")
    load.add_argument("--api-key", help="sent as a bearer token to every target")
    load.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    load.add_argument(
        "--fidelity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hash each response to compare targets (one hash per request)",
    )
    load.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one short unrecorded request per user and target before each level",
    )
    cache = p.add_argument_group("the cache scenario (routing policies side by side)")
    cache.add_argument("--members", type=int, help="simulator members to start (default 2)")
    cache.add_argument(
        "--member-urls",
        type=_member_urls,
        help="external members (real vLLM with VLLM_SERVER_DEV_MODE=1): start only the gateways",
    )
    cache.add_argument(
        "--policies",
        type=_policies,
        help=f"routing policies, one gateway each (default {','.join(POLICIES)})",
    )
    cache.add_argument("--groups", type=int, help="shared system prompts")
    cache.add_argument("--conversations", type=int, help="conversations per phase")
    cache.add_argument("--turns", type=int, help="turns per conversation")
    cache.add_argument("--system-tokens", type=int, help="tokens per system prompt")
    cache.add_argument("--user-tokens", type=int, help="tokens per user message")
    cache.add_argument("--cache-blocks", type=int, help="each member's prefix cache, in blocks")
    cache.add_argument("--block-size", type=int, help="tokens per cache block")
    cache.add_argument(
        "--prefill-per-token", type=float, help="members' TTFT per uncached prompt token (s)"
    )
    cache.add_argument(
        "--gateway-env",
        type=_env_pair,
        action="append",
        help="NAME=VALUE set for every gateway (repeat), e.g. VLLM_POOL_MAX_OUTSTANDING=64",
    )
    roll = p.add_argument_group("the rollout scenario (a rolling restart and a member killed)")
    roll.add_argument(
        "--router-bin",
        help="vllm-router's binary for its column (default $VLLM_ROUTER_BIN, then PATH; "
        "without one the column is skipped)",
    )
    roll.add_argument("--kill-streams", type=int, help="streams when one of two members dies")
    out = p.add_argument_group("output")
    out.add_argument(
        "--goodput", action="append", help="limits in ms: itl:200,ttft:500,tpot:N,e2el:N"
    )
    out.add_argument("--pace", type=float, help="upstream pace (s) for stall counting (rig: --itl)")
    out.add_argument("--out", type=Path, help="folder for results.json, report.md, plot.png")
    return p


def _gateway_log(args: argparse.Namespace) -> str | None:
    """Where the rig keeps the gateway's output: OUT/gateway.log for the admission preset."""
    if args.scenario != "admission" or not args.out or args.gateway_cmd or args.no_gateway:
        return None
    path = Path(args.out) / "gateway.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # this run's lines only
    return str(path)


def _preset(args: argparse.Namespace) -> Preset:
    if args.scenario and args.scenario in PRESETS:
        return PRESETS[args.scenario].sized(args.quick)
    return Preset(itl=0.02, max_tokens=64, concurrency=1, num_requests=100, rounds=2)


def _spec(args: argparse.Namespace, preset: Preset, model: str) -> LoadSpec:
    duration = args.duration if args.duration is not None else preset.duration
    num = args.num_requests if args.num_requests is not None else preset.num_requests
    if args.duration is not None and args.num_requests is None:
        num = None
    stream = preset.stream if args.stream is None else args.stream
    return LoadSpec(
        model=model,
        endpoint=args.endpoint,
        stream=stream,
        max_tokens=args.max_tokens or preset.max_tokens,
        prompt_len=args.prompt_len,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        concurrency=args.concurrency or preset.concurrency or 1,
        num_requests=num if (num or duration) else 100,
        duration=duration if num is None else None,
        timeout=args.timeout,
        fidelity=args.fidelity,
    )


async def _first_model(target: Target) -> str:
    """The first id of ``GET /v1/models``, so that a real vLLM needs nothing but its URL."""
    with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError, KeyError, IndexError):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port), 5
        )
        auth = f"Authorization: Bearer {target.api_key}\r\n" if target.api_key else ""
        writer.write(
            f"GET {target.base_path}/v1/models HTTP/1.1\r\nHost: {target.host}\r\n{auth}"
            "Connection: close\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        body = raw.split(b"\r\n\r\n", 1)[1]
        if body[:1] != b"{":  # chunked: size line first
            body = body.split(b"\r\n", 1)[1]
        return str(orjson.loads(body[: body.rfind(b"}") + 1])["data"][0]["id"])
    return "default"


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.scenario == "cache":
        return await cache_scenario.run(args, _first_model)
    if args.scenario == "rollout":
        from vllm_gateway_tools.bench import rollout_scenario  # httpx: only this scenario needs it

        return await rollout_scenario.run(args)
    preset = _preset(args)
    use_rig = args.rig or (args.scenario is not None and not args.targets)
    limits = metrics.parse_goodput(args.goodput)
    async with contextlib.AsyncExitStack() as stack:
        rig = None
        if use_rig:
            limit = args.max_concurrent_requests or preset.limit or 10_000
            queued = args.max_queued_requests
            if queued is None:
                queued = 0 if args.scenario == "admission" else 10_000
            rig_cfg = RigConfig(
                ttft=args.ttft if args.ttft is not None else preset.ttft,
                itl=args.itl if args.itl is not None else preset.itl,
                tokens=args.max_tokens or preset.max_tokens,
                max_concurrent_requests=limit,
                max_queued_requests=queued,
                gateway=not args.no_gateway,
                gateway_cmd=args.gateway_cmd,
                ready_path=args.gateway_ready,
                # The admission preset reads the gateway's own refusal times from its access log.
                gateway_log=_gateway_log(args),
            )
            rig = await stack.enter_async_context(Rig(rig_cfg))
            if args.no_gateway:
                twin = await stack.enter_async_context(Rig(replace(rig_cfg, gateway=False)))
                targets = [Target("direct", rig.backend_url), Target("twin", twin.backend_url)]
            else:
                assert rig.gateway_url is not None
                targets = [Target("direct", rig.backend_url), Target("gateway", rig.gateway_url)]
            progress(f"rig: backend {rig.backend_url}, {targets[1].name} {targets[1].url}")
        else:
            targets = args.targets
        if args.api_key:
            targets = [replace(t, api_key=args.api_key) for t in targets]
        model = args.model or await _first_model(targets[0])
        spec = _spec(args, preset, model)
        if args.scenario == "c1000" and not args.goodput:
            limits = metrics.parse_goodput(f"itl:{2 * preset.itl * 1000:g}")
        monitors = {}
        if rig is not None and not args.no_gateway:
            monitors = {name: ProcMonitor(pid) for name, pid in rig.pids.items()}
        elif rig is not None:
            monitors = {"backend": ProcMonitor(rig.pids["backend"])}
        if args.gateway_pid:
            monitors["gateway"] = ProcMonitor(args.gateway_pid)
        if args.backend_pid:
            monitors["backend"] = ProcMonitor(args.backend_pid)
        pace = args.pace or (
            args.itl if args.itl is not None else (preset.itl if use_rig else None)
        )
        session = Session(
            targets,
            rounds=args.rounds or preset.rounds,
            limits=limits,
            pace=pace or None,
            monitors=monitors,
            client_procs=args.client_procs,
            warmup=args.warmup,
        )
        if rig is not None:
            session.gateway_log = rig.config.gateway_log
        stack.callback(session.close)
        started = time.time()
        if args.scenario:
            result = await SCENARIOS[args.scenario](session, spec, preset)
        else:
            result = await run_sweep(session, spec, args.sweep, args.rate)
        return {
            "scenario": args.scenario,
            "quick": args.quick,
            "started": started,
            "elapsed_s": time.time() - started,
            "config": {
                **{k: v for k, v in asdict(spec).items() if k != "extra_body"},
                "targets": [{"name": t.name, "url": t.url} for t in targets],
                "rounds": session.rounds,
                "client_procs": session.client_procs,
                "goodput_limits_ms": limits.as_dict(),
                "pace_s": pace,
            },
            "rig": rig.describe() if rig is not None else None,
            "levels": [lv.as_dict() for lv in result["levels"]],
            "goals": result["goals"],
            "findings": result["findings"],
        }


def _event_loop_runner() -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.targets and not args.rig and not args.scenario:
        parser.error("give --targets, --rig or --scenario")
    if args.targets and args.rig:
        parser.error("--targets and --rig exclude each other")
    if args.scenario == "rollout" and args.targets:
        parser.error("--scenario rollout starts its own members and proxies: no --targets")
    if args.kill_streams is not None and args.kill_streams < 2:
        parser.error("--kill-streams must be >= 2")
    if args.scenario == "cache" and args.targets:
        parser.error("--scenario cache starts its own gateways: give --member-urls, not --targets")
    for name in ("members", "groups", "conversations", "turns", "system_tokens", "user_tokens",
                 "cache_blocks", "block_size"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    try:
        metrics.parse_goodput(args.goodput)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        doc = _event_loop_runner()(_run(args))
    except RigError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.out:
        paths = report.write(doc, args.out)
        progress("wrote " + ", ".join(str(p) for p in paths.values()))
    else:
        sys.stdout.write(report.markdown(doc))
    return 0
