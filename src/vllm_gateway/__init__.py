"""vllm-gateway: admission control, bounded queueing, streaming relay, timeouts and graceful drain
in front of vLLM's OpenAI-compatible server."""

__version__ = "0.1.0"

__all__ = ["__version__"]
