"""The project's vLLM simulator: a real OpenAI-compatible server with a set pace and fault knobs.

``run_simulator`` runs it on the caller's event loop; ``python -m vllm_gateway_tools.simulator``
(or ``vllm-gateway simulate``) runs it as a process. See docs/simulator.md.
"""

from vllm_gateway_tools.simulator.config import ConfigError, SimulatorConfig
from vllm_gateway_tools.simulator.runner import (
    Simulator,
    loopback_command,
    main,
    run_simulator,
    start_simulator,
)

__all__ = [
    "ConfigError",
    "Simulator",
    "SimulatorConfig",
    "loopback_command",
    "main",
    "run_simulator",
    "start_simulator",
]
