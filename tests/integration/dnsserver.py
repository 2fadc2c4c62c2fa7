"""A real DNS server for the tests: dnsmasq on 127.0.0.1, an unprivileged port, records the test sets.

``dns_server(tmp)`` starts dnsmasq with no system configuration (no /etc/dnsmasq.conf, no
/etc/hosts, no upstream, no pid file), authoritative for ``test`` (an unknown name under it is
NXDOMAIN), serving the records of a hosts file in ``tmp``. ``DnsServer.set`` rewrites that file and
sends SIGHUP, then waits until the server says it has read it again and (for a set that fits one
message) answers with the new records, so a test that resolves afterwards sees them. ``--local-ttl`` is the TTL of every answer.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from tests.conftest import free_port

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"  # Debian puts it in sbin
START_TIMEOUT = 30.0  # dnsmasq takes seconds to index 10,000 records on a busy machine
# One DNS message (64 KiB) holds about 4,000 A records: dnsmasq cuts a longer answer there.
FULL_MESSAGE = 4000


class DnsServer:
    def __init__(self, tmp: Path, ttl: int) -> None:
        self.tmp = tmp
        self.ttl = ttl
        self.port = free_port()
        self.hosts = tmp / "hosts"
        self.log = tmp / "dnsmasq.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.records: dict[str, list[str]] = {}

    @property
    def address(self) -> str:
        """What ``VLLM_BACKEND_DISCOVERY_NAMESERVERS`` takes."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if not os.path.exists(DNSMASQ):
            raise RuntimeError("dnsmasq is not installed (scripts/system-deps.sh installs it)")
        self._write()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    DNSMASQ,
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--pid-file=",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    f"--port={self.port}",
                    "--local=/test/",
                    f"--addn-hosts={self.hosts}",
                    f"--local-ttl={self.ttl}",
                    "--cache-size=0",
                    "--log-facility=-",
                    f"--user={getpass.getuser()}",
                    f"--group={grp.getgrgid(os.getgid()).gr_name}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_for(self.records)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def set(self, name: str, addresses: Sequence[str]) -> None:
        """``name`` resolves to ``addresses`` (none: NXDOMAIN) once this returns."""
        self.records[name] = list(addresses)
        self._write()
        assert self.proc is not None
        reads = self._reads()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT
        while self._reads() == reads:  # its log line: the file read again
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not reload:\n{self._log_tail()}")
            time.sleep(0.02)
        if len(addresses) <= FULL_MESSAGE:
            self.wait_for({name: self.records[name]})

    def _reads(self) -> int:
        return self.log.read_text(errors="replace").count(f"read {self.hosts} - ")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def wait_for(self, records: dict[str, list[str]]) -> None:
        """Until the server answers each name with exactly its addresses (bounded)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited:\n{self._log_tail()}")
            with contextlib.suppress(dns.exception.DNSException, OSError):
                if all(_serves(self.query(n), a) for n, a in records.items()):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq does not serve {list(records)}:\n{self._log_tail()}")
            time.sleep(0.02)

    def query(self, name: str) -> list[str]:
        """The A and AAAA addresses the server gives for ``name`` now (TCP: never truncated)."""
        out: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            reply = dns.query.tcp(
                dns.message.make_query(name, rdtype), "127.0.0.1", timeout=15, port=self.port
            )
            out += [r.to_text() for rrset in reply.answer for r in rrset]
        return out

    def _write(self) -> None:
        lines = [f"{a} {name}\n" for name, addresses in self.records.items() for a in addresses]
        partial = self.hosts.with_suffix(".partial")
        partial.write_text("".join(lines), encoding="utf-8")
        partial.replace(self.hosts)  # dnsmasq never reads half a file


@contextlib.contextmanager
def dns_server(
    tmp: Path, records: dict[str, list[str]] | None = None, ttl: int = 0
) -> Iterator[DnsServer]:
    server = DnsServer(tmp, ttl)
    server.records = {k: list(v) for k, v in (records or {}).items()}
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _serves(answer: list[str], addresses: list[str]) -> bool:
    """The answer is the set, or as much of it as one message holds."""
    if len(addresses) <= FULL_MESSAGE:
        return sorted(answer) == sorted(addresses)
    return len(answer) >= FULL_MESSAGE and set(answer) <= set(addresses)
