"""Headless Chromium for the page tests: Debian's ``chromium`` driven through ``chromium-driver``.

The :func:`browser` fixture starts a fresh headless Chromium per test (fixed
window size) through Selenium and the system ``/usr/bin/chromedriver``
(Selenium's own driver download is never used). It records the page's
console (``goog:loggingPrefs`` browser ALL) and every request the page makes
(the DevTools network events of the performance log); at the end of the test
it fails on any console error or warning and on any request that leaves the
page's own origin. Every page opened is saved as a full-page screenshot,
with the console, under ``test-artifacts/<test>/`` at the repository root
(or ``$EDGESIEVE_ARTIFACTS``). Without chromium and chromedriver the tests
skip (fail when ``CI`` is set); ``./dev.sh test`` installs them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT, require_tool

WINDOW = (1400, 1000)
"""Window size (CSS pixels) of every page: screenshots and layouts are comparable run to run."""
ARTIFACTS = Path(os.environ.get("EDGESIEVE_ARTIFACTS") or ROOT / "test-artifacts")
"""Where screenshots and console logs of the page tests go (git-ignored)."""
MAX_SHOT_HEIGHT = 12_000
"""Full-page screenshots stop here (CSS pixels)."""
LOCAL_SCHEMES = {"data", "blob", "about", "chrome-error"}
"""URL schemes that never leave the machine."""


def chromium_paths() -> tuple[str, str]:
    """The paths of chromium and chromedriver; skip (locally) or fail (CI set) without them."""
    chromium = require_tool(
        "chromium", "chromium-browser", package="chromium chromium-driver", tests="browser"
    )
    driver = require_tool("chromedriver", package="chromium-driver", tests="browser")
    return chromium, driver


def chrome_options(chromium: str, *, window: tuple[int, int] = WINDOW) -> Any:
    """Selenium options of a headless Chromium that logs its console and network events."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={window[0]},{window[1]}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return options


def start_chromium(*, window: tuple[int, int] = WINDOW) -> Any:
    """A Selenium WebDriver on a new headless Chromium (the caller quits it)."""
    pytest.importorskip("selenium", reason="selenium is a test extra: pip install -e '.[test]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = chromium_paths()
    return webdriver.Chrome(
        options=chrome_options(chromium, window=window), service=Service(executable_path=driver)
    )


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url`` (``file://`` for files)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Browser:
    """One headless Chromium: open pages, run JavaScript, screenshots, console and requests."""

    def __init__(self, driver: Any, artifacts: Path) -> None:
        self.driver = driver
        self.artifacts = artifacts
        self.console: list[dict[str, Any]] = []
        """Every console entry so far: ``level`` (SEVERE, WARNING, INFO...), ``message``."""
        self.requests: list[tuple[str, str]] = []
        """Every request so far: (the page's URL then, the requested URL)."""
        self.pages: list[str] = []
        self._shots = 0

    def open(self, url: str, *, label: str | None = None, ready: str | None = None) -> None:
        """Load ``url``, wait until it and its scripts are done (and ``ready``), screenshot it.

        ``ready`` is a JavaScript expression that must become truthy (e.g. the
        charts are drawn).
        """
        self.collect()
        self.driver.get(url)
        self.pages.append(url)
        self.wait("document.readyState === 'complete'", f"{url} to load")
        if ready is not None:
            self.wait(ready, f"{url}: {ready}")
        self.screenshot(label or Path(urlsplit(url).path).name or "index")

    def js(self, script: str, *args: Any) -> Any:
        """The value of ``script`` (a function body: use ``return``) run in the page."""
        return self.driver.execute_script(script, *args)

    def wait(self, expression: str, what: str, timeout: float = 10.0) -> Any:
        """Poll the JavaScript ``expression`` until it is truthy; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(f"return ({expression});")
            if value:
                return value
            if time.monotonic() > deadline:
                self.screenshot("timeout")
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.05)

    def screenshot(self, label: str) -> Path:
        """Save the whole page (up to :data:`MAX_SHOT_HEIGHT` pixels high) as a PNG artefact."""
        metrics = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        width = max(int(size["width"]), WINDOW[0])
        height = min(max(int(size["height"]), 1), MAX_SHOT_HEIGHT)
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        self._shots += 1
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "page"
        path = self.artifacts / f"{self._shots:02d}-{name}.png"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def collect(self) -> None:
        """Move the driver's pending console entries and network events into the lists."""
        page = self.driver.current_url
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            event = json.loads(entry["message"])["message"]
            if event.get("method") == "Network.requestWillBeSent":
                self.requests.append((page, event["params"]["request"]["url"]))

    def problems(self) -> list[str]:
        """Console errors and warnings so far (any is a failure)."""
        self.collect()
        return [
            f"{e['level']}: {e['message']}"
            for e in self.console
            if e["level"] in ("SEVERE", "WARNING")
        ]

    def outside_requests(self) -> list[str]:
        """Requests that went elsewhere than the page's own origin (a file page: any network)."""
        self.collect()
        # Entries of performance.getEntriesByType('resource') too, in case an event was missed.
        page = self.driver.current_url
        entries = self.js("return performance.getEntriesByType('resource').map(e => e.name);")
        seen = self.requests + [(page, url) for url in entries or []]
        outside = []
        for page_url, url in seen:
            scheme = urlsplit(url).scheme
            if scheme in LOCAL_SCHEMES or (scheme == "file" and page_url.startswith("file:")):
                continue
            if scheme in ("http", "https") and origin(url) == origin(page_url):
                continue
            outside.append(f"{url} (from {page_url})")
        return sorted(set(outside))

    def assert_quiet(self) -> None:
        """No console error or warning, and nothing requested outside the page's origin."""
        assert self.problems() == [], f"console errors/warnings on {self.pages}"
        assert self.outside_requests() == [], f"requests leaving {self.pages}"

    def save_console(self) -> None:
        """Write the console entries next to the screenshots."""
        self.collect()
        self.artifacts.mkdir(parents=True, exist_ok=True)
        lines = [f"{e['level']} {e['message']}" for e in self.console]
        lines += [f"REQUEST {url} (from {page})" for page, url in self.requests]
        (self.artifacts / "console.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def artifacts_dir(node: pytest.Item | pytest.Module, name: str | None = None) -> Path:
    """``ARTIFACTS/<module>/<name or the test's name>``, emptied first."""
    name = name or node.name
    folder = ARTIFACTS / Path(str(node.path)).stem / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    shutil.rmtree(folder, ignore_errors=True)
    return folder


@contextmanager
def chromium(artifacts: Path, *, window: tuple[int, int] = WINDOW) -> Iterator[Browser]:
    """A fresh headless Chromium; at the end, a last screenshot, the console saved, and
    a failure on console errors/warnings or requests leaving the page's origin."""
    driver = start_chromium(window=window)
    page = Browser(driver, artifacts)
    try:
        yield page
        if page.pages:
            page.screenshot("end")
        page.save_console()
        page.assert_quiet()
    finally:
        driver.quit()


@pytest.fixture
def browser(request: pytest.FixtureRequest) -> Iterator[Browser]:
    """A headless Chromium for one test (see :func:`chromium`)."""
    with chromium(artifacts_dir(request.node)) as page:
        yield page
