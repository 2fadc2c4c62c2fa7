"""The backends file as a source of members: re-read when it changes, and on demand (SIGHUP).

``BackendsFile`` runs one task that looks at the file every ``backends_file_poll`` seconds (its
modification time, size and inode; the contents only when one of those changed) or at once when
``wake`` is called (the process's SIGHUP). A new, valid file becomes the ``file`` source's
members through ``Fleet.reconcile`` in one step: members it no longer names drain then go, new
ones join. A file that cannot be read or parsed, or is larger than ``MAX_BYTES``, changes nothing:
the old set stays and one warning names the error (once per distinct content, not once a poll).

Bounds: at most one read per poll interval plus one per wake, and wakes closer together than
``MIN_GAP`` are taken as one, so a file rewritten 100 times a second costs a read per interval,
whatever its writer does; the file is read up to ``MAX_BYTES`` + 1 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from pathlib import Path

from vllm_gateway.backends.pool.config import BackendSpec, parse_backends_text
from vllm_gateway.backends.pool.fleet import Fleet

__all__ = ["MAX_BYTES", "MIN_GAP", "BackendsFile"]

log = logging.getLogger("vllm_gateway.backends.pool.backend")

MAX_BYTES = 1 << 20  # a backends file larger than this is refused (4,096 members fit easily)
MIN_GAP = 0.2  # seconds: wakes closer together than this are one read


class BackendsFile:
    def __init__(self, path: str, fleet: Fleet, interval: float) -> None:
        self.path = Path(path)
        self.fleet = fleet
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stamp: tuple[int, int, int] | None = None  # mtime_ns, size, inode of the last look
        self._digest: bytes | None = None  # of the contents last applied or refused
        self.reads = 0  # contents read (tests, and the bound)
        self.applied = 0  # new sets applied
        self.errors = 0  # files refused
        self.last_error: str | None = None

    def seen(self, text: bytes) -> None:
        """The contents the pool was built from: the first poll finds nothing new."""
        self._digest = hashlib.sha256(text).digest()
        self._stamp = self._look()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="backends-file")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """Read the file now (SIGHUP), whether or not it looks changed."""
        self._stamp = None
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.check()
            except Exception:  # the task must outlive any one bad round
                log.exception("backends file %s: a reload failed", self.path)
            await asyncio.sleep(MIN_GAP)

    def _look(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(MAX_BYTES + 1)

    async def check(self) -> bool:
        """Apply the file if it changed; True when a new set was applied."""
        stamp = self._look()
        if stamp is not None and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            raw = await asyncio.to_thread(self._read)
        except OSError as exc:
            return self._refuse(f"cannot be read ({exc.strerror})", None)
        self.reads += 1
        digest = hashlib.sha256(raw).digest()
        if digest == self._digest:
            return False
        if len(raw) > MAX_BYTES:
            return self._refuse(f"larger than {MAX_BYTES} bytes", digest)
        try:
            specs: list[BackendSpec] = parse_backends_text(raw.decode("utf-8"), str(self.path))
        except (ValueError, UnicodeDecodeError) as exc:
            return self._refuse(str(exc), digest)
        self._digest = digest
        self.last_error = None
        got = await self.fleet.reconcile(specs, "file")
        self.applied += 1
        log.warning(
            "backends file %s reloaded: %d added, %d leaving, %d refused (the cap)",
            self.path,
            got["added"],
            got["removed"],
            got["refused"],
        )
        return True

    def _refuse(self, error: str, digest: bytes | None) -> bool:
        if digest is not None:
            self._digest = digest  # the same bad contents are not reported again
        self.errors += 1
        message = (
            error if error.startswith("backends file") else f"backends file {self.path}: {error}"
        )
        if message != self.last_error:
            log.warning("%s; keeping the current backends", message)
        self.last_error = message
        return False
