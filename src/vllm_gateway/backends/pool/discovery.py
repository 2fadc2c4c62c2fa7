"""The pool's members from DNS: ``DnsDiscovery`` turns a name's A and AAAA records into member URLs.

``VLLM_BACKEND_DISCOVERY=dns://NAME:PORT`` (a Kubernetes headless Service's name, typically) makes
each address NAME resolves to a member at PORT: ``http://10.0.0.7:8000``, ``http://[fd00::7]:8000``.
The source resolves both record types with dnspython's async resolver, hands the set to its
``apply`` callback when it differs from the last one handed, and resolves again after the answers'
TTL, raised to ``min_interval`` and lowered to ``max_interval``. The pool's ``apply`` is
``Fleet.reconcile(urls, "dns")``: new addresses join (health check, then slow start), those gone
from the answer drain, then leave.

What a peer (the DNS server) can do, and what it costs:

- a slow or silent server: each resolution is bounded by ``timeout`` (the resolver's lifetime, and
  an outer ``asyncio.timeout``); the next try comes ``min_interval`` later;
- a failure (timeout, SERVFAIL, REFUSED, no server, one family failing while the other answers) or
  an answer with no address at all (NXDOMAIN, NODATA): the last good set is kept and the result is
  counted (``counts``: ``ok``, ``empty``, ``error``). An empty answer is not taken as "no members":
  a headless Service publishes only ready pods, and while every pod restarts the kept members are
  still health-checked, so the pool waits for them or for the new ones instead of forgetting all;
- a huge answer: one DNS message is at most 64 KiB (a TCP length is two bytes), so one answer holds
  at most about 4,000 addresses; the set handed on is at most ``max_members`` of them, the lowest
  addresses (sorted, so every worker and every restart keeps the same ones); an answer cut to the
  cap (``pool_max_members``) is counted (``truncated``) and logged when the cut starts.

Invariants: one background task, started by ``start`` and cancelled and awaited by ``aclose``;
``apply`` is called from that task (and from ``start``'s first round) only, never with an empty
list, and only with a set that differs from the last one handed (one that ``apply`` failed on is
handed again at the next round).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = ["DnsDiscovery", "DnsTarget"]

log = logging.getLogger("vllm_gateway.backends.pool.discovery")

Result = Literal["ok", "empty", "error"]


class DnsTarget:
    """``dns://NAME:PORT``, parsed (``settings.parsers.discovery`` has checked it)."""

    __slots__ = ("name", "port")

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port

    @classmethod
    def parse(cls, value: str) -> DnsTarget:
        parts = urlsplit(value)
        if parts.scheme != "dns" or not parts.hostname or parts.port is None:
            raise ValueError(f"backend discovery must be dns://NAME:PORT, not {value!r}")
        return cls(parts.hostname.rstrip("."), parts.port)

    def __str__(self) -> str:
        return f"dns://{self.name}:{self.port}"

    def url(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"http://{host}:{self.port}"


class DnsDiscovery:
    def __init__(
        self,
        target: DnsTarget,
        apply: Callable[[list[str]], Awaitable[object]],
        *,
        min_interval: float,
        max_interval: float,
        timeout: float,
        max_members: int,
        nameservers: Sequence[str] = (),
    ) -> None:
        if not 0 < min_interval <= max_interval or timeout <= 0 or max_members < 1:
            raise ValueError("backend discovery: bad intervals, timeout or member cap")
        self.target = target
        self.apply = apply
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.timeout = timeout
        self.max_members = max_members
        self.resolver = _resolver(nameservers, timeout)
        # A name with a dot is absolute (no search list: one query per family, and no surprise from
        # a pod's ndots); a bare one is searched, as the system's resolver would.
        self._search = "." not in target.name
        self.members: tuple[str, ...] = ()  # the set last handed to ``apply``
        self.counts: dict[Result, int] = {"ok": 0, "empty": 0, "error": 0}
        self.truncated = 0  # answers cut to ``max_members``
        self.last_ttl: float | None = None  # the answers' TTL, as last read
        self._failing = False  # in a streak of failures: logged once, at its start and its end
        self._cut = False  # the last answer was cut to the cap: logged once per streak
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve once (a failure is counted and the loop tries again), then keep resolving."""
        delay = await self.resolve()
        self._task = asyncio.get_running_loop().create_task(
            self._loop(delay), name="backend-discovery"
        )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = await self.resolve()

    # --- one round -----------------------------------------------------------------------------

    async def resolve(self) -> float:
        """Resolve the name once, hand on a changed set, count the result; return the seconds
        until the next round."""
        results: Sequence[tuple[list[str], float | None] | Exception]
        try:
            async with asyncio.timeout(self.timeout):
                # Each query returns its failure rather than raising it, so neither is left
                # running when the other fails; the timeout cancels both.
                results = await asyncio.gather(self._query("A"), self._query("AAAA"))
        except TimeoutError:
            results = [TimeoutError(f"no answer within {self.timeout:g} s")]
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            self._count("error", f"{type(failed[0]).__name__}: {failed[0]}")
            return self.min_interval
        answers = [r for r in results if not isinstance(r, Exception)]
        addresses = sorted(
            {ipaddress.ip_address(a) for found, _ in answers for a in found},
            key=lambda a: (a.version, a),
        )
        if not addresses:
            self._count("empty", "no A or AAAA record")
            return self.min_interval
        self._count("ok", "")
        if len(addresses) > self.max_members:
            self.truncated += 1
            if not self._cut:
                log.warning(
                    "backend discovery %s: %d addresses, more than the cap of %d; the lowest %d "
                    "are the members (VLLM_POOL_MAX_MEMBERS)",
                    self.target,
                    len(addresses),
                    self.max_members,
                    self.max_members,
                )
            self._cut = True
            addresses = addresses[: self.max_members]
        else:
            self._cut = False
        urls = [self.target.url(a) for a in addresses]
        ttls = [ttl for _, ttl in answers if ttl is not None]
        self.last_ttl = min(ttls) if ttls else None
        if tuple(urls) != self.members:
            self._announce(urls)
            try:
                await self.apply(list(urls))
            except Exception:  # the source outlives a bad round; the next one hands it again
                log.exception("backend discovery %s: applying the members failed", self.target)
                return self.min_interval
            self.members = tuple(urls)
        ttl = self.last_ttl if self.last_ttl is not None else self.min_interval
        return min(max(ttl, self.min_interval), self.max_interval)

    async def _query(self, rdtype: str) -> tuple[list[str], float | None] | Exception:
        """One record type's addresses and TTL (no such name, or no such record: none), or why
        the server gave no answer."""
        try:
            answer = await self.resolver.resolve(
                self.target.name,
                dns.rdatatype.from_text(rdtype),
                search=self._search,
                raise_on_no_answer=False,
            )
        except dns.resolver.NXDOMAIN:
            return [], None
        except (dns.exception.DNSException, OSError) as exc:
            return exc
        rrset = answer.rrset
        if rrset is None:
            return [], None
        return [rdata.to_text() for rdata in rrset], float(rrset.ttl)

    def _count(self, result: Result, why: str) -> None:
        self.counts[result] += 1
        if result == "ok":
            if self._failing:
                log.info("backend discovery %s: resolving again", self.target)
            self._failing = False
            return
        if not self._failing:
            log.warning(
                "backend discovery %s: %s; keeping the %d members last resolved",
                self.target,
                why,
                len(self.members),
            )
        self._failing = True

    def _announce(self, urls: list[str]) -> None:
        before, after = set(self.members), set(urls)
        log.info(
            "backend discovery %s: %d members (joined: %s; left: %s)",
            self.target,
            len(urls),
            _few(after - before),
            _few(before - after),
        )

    def stats(self) -> dict[str, object]:
        return {
            "source": str(self.target),
            "members": len(self.members),
            "resolutions": dict(self.counts),
            "truncated": self.truncated,
            "ttl": self.last_ttl,
        }


def _few(urls: set[str], most: int = 5) -> str:
    """At most ``most`` URLs for a log line, and how many more."""
    if not urls:
        return "none"
    shown = sorted(urls)[:most]
    rest = len(urls) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def _resolver(nameservers: Sequence[str], timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver that asks ``nameservers`` (``ADDRESS:PORT``, ``[V6]:PORT``), or the system's."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[dns.nameserver.Nameserver | str] = []
        for item in nameservers:
            parts = urlsplit(f"//{item}")
            servers.append(dns.nameserver.Do53Nameserver(parts.hostname or "", parts.port or 53))
        resolver.nameservers = servers
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise ValueError(
                "backend discovery: no DNS server in /etc/resolv.conf; "
                "set VLLM_BACKEND_DISCOVERY_NAMESERVERS"
            ) from None
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 2.0)  # per server try; lifetime bounds the whole
    resolver.cache = None  # each round asks; the TTL is honoured by the interval
    return resolver
