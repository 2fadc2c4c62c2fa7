"""Tools for testing and measuring vllm-gateway: the vLLM simulator, the benchmark and the soak.

They live beside the gateway, not in it: the gateway's own package holds the gateway only.
"""
