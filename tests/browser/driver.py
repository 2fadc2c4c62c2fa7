"""Headless Chromium driven by Selenium through Debian's ChromeDriver, for the status page's test.

Both programs are Debian's (``chromium``, ``chromium-driver``), found on PATH and named to
Selenium, so Selenium Manager (which would download a driver) is never asked. Selenium's calls
block, and the gateway under test runs in the test's own event loop: every browser call therefore
runs in a worker thread, or the page would wait on a server that cannot answer. Every wait has a
deadline, and ChromeDriver with its Chromium runs in a process group of its own that is killed
in ``finally``, helpers included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import JavascriptException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

__all__ = ["CHROMEDRIVER", "CHROMIUM", "Page", "open_page"]

CHROMIUM = next(
    (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p),
    None,
)
CHROMEDRIVER = shutil.which("chromedriver")

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium calls Google's hosts, which this machine's closed network refuses.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
    "--window-size=1280,1200",
)
# Uncaught errors and rejected promises of the page, collected from before its first script.
ERROR_COLLECTOR = """
window.__pageErrors = [];
window.addEventListener("error", (e) => window.__pageErrors.push(String(e.message || e)));
window.addEventListener("unhandledrejection",
    (e) => window.__pageErrors.push("unhandled rejection: " + String(e.reason)));
"""


class Page:
    """One page: ``eval`` a JavaScript expression, ``wait_for`` it to be true, ``screenshot``."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def eval(self, expression: str) -> Any:
        return await asyncio.to_thread(self.driver.execute_script, f"return ({expression});")

    async def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.1) -> Any:
        """Poll a JS expression until it is truthy; its last value in the error if it never is."""
        value: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        value = await self.eval(expression)
                    except JavascriptException as exc:  # e.g. the element is not there yet
                        value = exc.msg
                    else:
                        if value:
                            return value
                    await asyncio.sleep(interval)
        except TimeoutError:
            raise AssertionError(
                f"not true within {timeout} s: {expression} (last: {value!r})"
            ) from None

    async def screenshot(self, path: Path) -> None:
        png = await asyncio.to_thread(self.driver.get_screenshot_as_png)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, png)

    async def exceptions(self) -> list[str]:
        """The page's uncaught errors so far."""
        return list(await self.eval("window.__pageErrors || ['the error collector is missing']"))


def _load(driver: webdriver.Chrome, url: str) -> None:
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(15)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_COLLECTOR})
    driver.get(url)


@contextlib.asynccontextmanager
async def open_page(url: str, start_timeout: float = 60.0) -> AsyncIterator[Page]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        raise RuntimeError("chromium and chromedriver are needed (Debian: chromium-driver)")
    # Chromium's helpers can still be writing to the profile for a moment after it exits: they
    # are killed as a group below, and a file one of them left must not fail the test.
    with tempfile.TemporaryDirectory(
        prefix="status-page-chromium-", ignore_cleanup_errors=True
    ) as tmp:
        options = Options()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={tmp}/profile"):
            options.add_argument(flag)
        service = Service(
            executable_path=CHROMEDRIVER,
            log_output=str(Path(tmp) / "chromedriver.log"),
            popen_kw={"start_new_session": True},  # its own process group, Chromium included
        )
        driver: webdriver.Chrome | None = None
        try:
            async with asyncio.timeout(start_timeout):
                driver = await asyncio.to_thread(webdriver.Chrome, options=options, service=service)
                await asyncio.to_thread(_load, driver, url)
            yield Page(driver)
        finally:
            if driver is not None:
                with contextlib.suppress(WebDriverException, OSError, TimeoutError):
                    async with asyncio.timeout(15):
                        await asyncio.to_thread(driver.quit)
            process = getattr(service, "process", None)
            if process is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)  # whatever outlived quit()
            await asyncio.sleep(0.1)
