"""The benchmark: the same seeded OpenAI load sent to a backend directly and through the gateway.

Modules: ``client`` (the lean HTTP/SSE client), ``metrics`` (TTFT, TPOT, ITL, E2EL, goodput),
``runner`` (closed and open loop, client processes, process monitors), ``session`` (levels,
alternating rounds, comparison), ``scenarios`` (the named presets), ``rig`` (simulator and gateway
pinned to cores), ``report`` (JSON, markdown, plot) and ``cli`` (``main``).
"""

from vllm_gateway_tools.bench.cli import main

__all__ = ["main"]
