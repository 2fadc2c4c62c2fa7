"""Who the client is: the peer's address, or the one a trusted proxy says it forwarded for.

``X-Forwarded-For`` is believed only when the peer is one of the configured trusted proxies
(``VLLM_TRUSTED_PROXIES``, off by default); otherwise anyone could name any address and dodge a
limit keyed by address. With trusted proxies the header is read from the right, skipping the
trusted hops, and the first address that is not trusted is the client (what nginx's
``real_ip_recursive`` does); a malformed entry stops the walk at the last good hop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["ClientResolver"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientResolver:
    def __init__(self, trusted: Iterable[str] = ()) -> None:
        self._trusted: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(item, strict=False) for item in trusted
        )

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def client(self, peer: str | None, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The client's address for limits and logs."""
        if not self._trusted or peer is None or not self._is_trusted(peer):
            return peer
        hops: list[str] = []
        for name, value in headers:
            if name == b"x-forwarded-for":
                hops.extend(part.strip() for part in value.decode("latin-1").split(","))
        client = peer
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break
            client = hop
            if not self._is_trusted(hop):
                break
        return client
