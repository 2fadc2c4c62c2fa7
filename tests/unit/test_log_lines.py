"""A route's parameter is the whole rest of the path, and the backend gets the route's own
spelling of it: a decoded line break never travels (S11)."""

from __future__ import annotations

from vllm_gateway.proxy.routes import match, target


def test_a_route_parameter_is_the_whole_rest_of_the_path() -> None:
    assert match("/v1/responses/resp_1") is not None
    for path in ("/v1/responses/resp_1\n", "/v1/responses/resp_1\n/cancel", "/adapters/x\n"):
        assert match(path) is None, path
    found = match("/v1/responses/resp_1/cancel")
    assert found is not None
    assert target(*found) == "/v1/responses/resp_1/cancel"
    found = match("/adapters/lora-1")
    assert found is not None and target(*found) == "/adapters/lora-1"
    found = match("/v1/chat/completions")
    assert found is not None and target(*found) == "/v1/chat/completions"
