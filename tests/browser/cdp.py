"""A headless Chromium driven over the Chrome DevTools Protocol, for the status page's test.

No WebDriver: Chromium is started with ``--remote-debugging-port=0``, the browser's websocket
address is read from its log, and one page is opened and attached in flat session mode. Every
wait has a deadline, and the browser process is always ended in ``finally``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

__all__ = ["CHROMIUM", "Page", "open_page"]

CHROMIUM = next(
    (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p),
    None,
)

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,1200",
)
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class CDPError(Exception):
    pass


class Page:
    """One attached page: ``call`` a CDP method, ``eval`` JavaScript, ``wait_for`` a condition."""

    def __init__(self, ws: ClientConnection, session: str) -> None:
        self._ws = ws
        self._session = session
        self._next = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        async for raw in self._ws:
            msg = json.loads(raw)
            fut = self._pending.pop(msg.get("id", -1), None)
            if fut is None:
                self.events.append(msg)
            elif not fut.done():
                if "error" in msg:
                    fut.set_exception(CDPError(str(msg["error"])))
                else:
                    fut.set_result(msg.get("result", {}))

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        browser: bool = False,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if not browser:
            msg["sessionId"] = self._session
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        await self._ws.send(json.dumps(msg))
        async with asyncio.timeout(timeout):
            return await fut  # type: ignore[no-any-return]

    async def eval(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise CDPError(str(result["exceptionDetails"]))
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Poll a JS expression until it is truthy; its last value in the error if it never is."""
        value: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        value = await self.eval(expression)
                    except CDPError as exc:  # e.g. the page is still loading: no body yet
                        value = exc
                    else:
                        if value:
                            return value
                    await asyncio.sleep(interval)
        except TimeoutError:
            raise AssertionError(
                f"not true within {timeout} s: {expression} (last: {value!r})"
            ) from None

    async def screenshot(self, path: Path) -> None:
        shot = await self.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, timeout=30
        )
        data = base64.b64decode(shot["data"])
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, data)

    def exceptions(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"]


@contextlib.asynccontextmanager
async def open_page(url: str, start_timeout: float = 30.0) -> AsyncIterator[Page]:
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed")
    # Chromium's helper processes (renderer, GPU, crashpad) can still be writing to the profile
    # for a moment after the browser process exits: they are killed as a group below, and a
    # file one of them left behind must not fail the test that used the page.
    with tempfile.TemporaryDirectory(
        prefix="status-page-chromium-", ignore_cleanup_errors=True
    ) as tmp:
        log_path = Path(tmp) / "chromium.log"
        with open(log_path, "wb") as log_file:  # noqa: ASYNC230 - a local file, opened once
            proc = await asyncio.create_subprocess_exec(
                CHROMIUM,
                *_FLAGS,
                f"--user-data-dir={tmp}/profile",
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # its own process group, helpers included
            )
        try:
            ws_url = await _wait_listening(proc, log_path, start_timeout)
            async with connect(ws_url, max_size=64 << 20, open_timeout=start_timeout) as ws:
                page = Page(ws, "")
                page._reader = asyncio.create_task(page._read())
                try:
                    target = await page.call(
                        "Target.createTarget", {"url": "about:blank"}, browser=True
                    )
                    attached = await page.call(
                        "Target.attachToTarget",
                        {"targetId": target["targetId"], "flatten": True},
                        browser=True,
                    )
                    page._session = attached["sessionId"]
                    await page.call("Runtime.enable")
                    await page.call("Page.enable")
                    await page.call(
                        "Emulation.setDeviceMetricsOverride",
                        {"width": 1280, "height": 1200, "deviceScaleFactor": 1, "mobile": False},
                    )
                    await page.call("Page.navigate", {"url": url})
                    yield page
                finally:
                    page._reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await page._reader
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(5):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the browser
            await asyncio.sleep(0.1)


async def _wait_listening(proc: asyncio.subprocess.Process, log_path: Path, timeout: float) -> str:
    async with asyncio.timeout(timeout):
        while True:
            text = await asyncio.to_thread(log_path.read_text, errors="replace")
            found = _LISTENING.search(text)
            if found:
                return found.group(1)
            if proc.returncode is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}:\n{text[-2000:]}")
            await asyncio.sleep(0.05)
