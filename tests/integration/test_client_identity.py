"""Who the client is, through the real gateway on loopback: the address its rate limit is keyed by,
with ``X-Forwarded-For`` of several hops, a spoofed leftmost entry, and a peer that is not a trusted
proxy. The header is believed only from a trusted proxy and read from the right: the client is the
first address, walking from the peer towards the left, that is not a trusted proxy. Everything left
of it is what the client wrote itself.

Each request is keyed by what the gateway decided (an observer reads the call's ``rate_key``), and
with one request a minute per key the second request of the same client is refused whatever it
writes in the header.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import chat_body, run_gateway
from vllm_gateway.proxy.record import CallRecord
from vllm_gateway.settings import Settings
from vllm_gateway_tools.simulator import Simulator

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"


class Keys:
    """Records the rate-limit key of every request the gateway ends."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def request_ended(self, call: CallRecord) -> None:
        self.seen.append(getattr(call, "rate_key", None))


@pytest.fixture
async def send(simulator: Simulator) -> AsyncIterator[Any]:
    """``send(trusted, *forwarded)`` -> (status, rate key) of one chat request from 127.0.0.1 with
    those ``X-Forwarded-For`` header lines, to a gateway trusting ``trusted`` (one per trust set,
    one request a minute per key)."""
    gateways: dict[tuple[str, ...], Any] = {}
    keys = Keys()
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30))

        async def _send(trusted: tuple[str, ...], *forwarded: str) -> tuple[int, str | None]:
            if trusted not in gateways:
                settings = Settings(
                    backend_urls=(simulator.url,), rate_limit_rpm=1, trusted_proxies=trusted
                )
                gw = await stack.enter_async_context(run_gateway(settings))
                gw.gateway.observers.append(keys)
                gateways[trusted] = gw
            headers = [("x-forwarded-for", value) for value in forwarded]
            resp = await client.post(
                gateways[trusted].url + CHAT, json=chat_body(), headers=headers
            )
            return resp.status_code, keys.seen[-1]

        yield _send


PROXIES = ("127.0.0.1", "10.0.0.0/8")  # the gateway's peer, and the inner proxies behind it


async def test_several_hops_are_read_from_the_right_past_the_trusted_proxies(send: Any) -> None:
    # client 203.0.113.7 -> proxy 10.0.0.2 -> proxy 127.0.0.1 (the peer) -> gateway
    assert await send(PROXIES, "203.0.113.7, 10.0.0.2") == (200, "ip:203.0.113.7")
    # The same client through another inner proxy: the same bucket, refused.
    assert await send(PROXIES, "203.0.113.7, 10.0.0.3") == (429, "ip:203.0.113.7")
    # The header over several lines is one list, in order.
    assert await send(PROXIES, "203.0.113.7", "10.0.0.9") == (429, "ip:203.0.113.7")
    assert await send(PROXIES, "203.0.113.8, 10.0.0.2") == (200, "ip:203.0.113.8")


async def test_a_spoofed_leftmost_entry_does_not_pick_the_bucket(send: Any) -> None:
    # Each request names a different "client" on the left; the proxies appended the real one.
    assert await send(PROXIES, "198.51.100.1, 203.0.113.7, 10.0.0.2") == (200, "ip:203.0.113.7")
    for spoofed in ("198.51.100.2", "6.6.6.6, 1.1.1.1", "203.0.113.99"):
        status, key = await send(PROXIES, f"{spoofed}, 203.0.113.7, 10.0.0.2")
        assert (status, key) == (429, "ip:203.0.113.7"), spoofed
    # Garbage on the left stops nothing: the walk from the right never reaches it.
    assert await send(PROXIES, "not-an-ip, 203.0.113.7") == (429, "ip:203.0.113.7")
    # A malformed hop stops the walk at the last good one (a trusted proxy: its bucket).
    assert await send(PROXIES, "203.0.113.50, bogus, 10.0.0.2") == (200, "ip:10.0.0.2")


async def test_an_untrusted_peer_is_the_client_whatever_it_forwards(send: Any) -> None:
    # Trusted proxies configured, but the peer (127.0.0.1) is not one of them.
    untrusted = ("10.0.0.0/8", "192.0.2.1")
    assert await send(untrusted, "203.0.113.1") == (200, "ip:127.0.0.1")
    assert await send(untrusted, "203.0.113.2") == (429, "ip:127.0.0.1")
    assert await send(untrusted, "203.0.113.3, 10.0.0.1") == (429, "ip:127.0.0.1")
    # No trusted proxies at all (the default): the same.
    assert await send((), "203.0.113.4") == (200, "ip:127.0.0.1")
    assert await send((), "203.0.113.5") == (429, "ip:127.0.0.1")


async def test_with_api_keys_the_bucket_is_the_tenant_not_the_address(
    simulator: Simulator,
) -> None:
    keys = Keys()
    settings = Settings(
        backend_urls=(simulator.url,),
        rate_limit_rpm=1,
        trusted_proxies=PROXIES,
        api_keys=frozenset({"k1:team-a", "k2:team-b"}),
    )
    async with run_gateway(settings) as gw, httpx.AsyncClient(timeout=30) as client:
        gw.gateway.observers.append(keys)

        async def post(key: str, forwarded: str) -> tuple[int, str | None]:
            resp = await client.post(
                gw.url + CHAT,
                json=chat_body(),
                headers={"authorization": f"Bearer {key}", "x-forwarded-for": forwarded},
            )
            return resp.status_code, keys.seen[-1]

        assert await post("k1", "203.0.113.1") == (200, "team-a")
        assert await post("k1", "203.0.113.2") == (429, "team-a")  # another address, same tenant
        assert await post("k2", "203.0.113.1") == (200, "team-b")  # same address, another tenant
