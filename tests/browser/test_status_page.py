"""The edge's status page in a real browser: the numbers of ``/status``, kept up to date.

``edgesieve run flows.edge`` runs in its own process group with the HTTP
device API and ``metrics_listen`` on free loopback ports. Devices send with
the real ``curl``: telemetry of two sensors, and vibration blocks of an
out-of-balance machine (so an ISO-zone alarm is raised). Headless Chromium
opens ``http://127.0.0.1:PORT/``; once the page has refreshed itself from
``/status``, every number it shows (``data-value``) must equal the JSON that
``/status`` returns (fetched here with urllib); after more data is sent the
page must show the new numbers without a reload. The page must not log to
the console nor fetch anything but its own origin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.codecs.evb1 import encode_evb1
from flows.machines import Machine
from tests.browser.conftest import Browser
from tests.conftest import ROOT, curl, free_port, refused, wait_for, write_devices

pytest.importorskip("flows.status", reason="flows.status (the status page) is not on this branch")

DEVICES = {
    "sensor-1": "tok-sensor-1-Ab3dE5",
    "sensor-2": "tok-sensor-2-Fg6hI8",
    "fan-2": "tok-fan-2-Jk9lM1",
}
FLOW_FIELDS = (
    "messages_in",
    "raw_bytes",
    "rows_out",
    "wire_bytes",
    "ratio",
    "dead_letters",
    "alarms",
)
"""The number cells of a flow's row (``td[data-field]``), keys of ``/status`` ``flows.NAME``."""
BLOCK_FRAMES = 4096
ALARM_BLOCKS = 30
"""Blocks of the out-of-balance machine (4.8 s): enough for features and an ISO zone alarm
while the edge runs (10 blocks raise it only when the stop flushes the flow)."""

PAGE_NUMBERS = """
const value = (el) => el === null ? undefined : el.dataset.value;
const flows = {};
for (const tr of document.querySelectorAll('table#flows tr[data-flow]')) {
  flows[tr.dataset.flow] = Object.fromEntries([...tr.querySelectorAll('td[data-field]')].map(
    td => [td.dataset.field, td.dataset.value]
  ));
}
const cloud = document.getElementById('cloud-state');
return {
  flows: flows,
  devices_seen: value(document.getElementById('devices-seen')),
  journal_messages: value(document.getElementById('journal-messages')),
  journal_unread: value(document.getElementById('journal-unread')),
  outbox_batches: value(document.getElementById('outbox-batches')),
  cloud_state: cloud === null ? undefined : cloud.innerText.trim(),
  alarms: [...document.querySelectorAll('table#recent-alarms tr.alarm')].map(
    tr => tr.innerText
  ),
};
"""
"""What the page shows: flow rows' ``data-value``s, the single numbers, cloud state, alarm rows."""


class EdgeProcess:
    """``edgesieve run flows.edge`` with the HTTP device API and the status page on loopback."""

    def __init__(self, tmp: Path) -> None:
        self.http_port = free_port()
        self.status_port = free_port()
        self.data = tmp / "var"
        write_devices(tmp, DEVICES)
        config = tmp / "edge.yaml"
        config.write_text(
            f"edge_id: status-page-edge\n"
            f"data_dir: {self.data}\n"
            f'metrics_listen: "127.0.0.1:{self.status_port}"\n'
            "devices: devices.yaml\n"
            f'transports: {{http: {{listen: "127.0.0.1:{self.http_port}"}}}}\n'
            "telemetry: {window: {length: 3600}}\n"
        )
        self.log = tmp / "edge.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "flows.edge", "--config", str(config)],
            cwd=ROOT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.status_port}/"
        wait_for(self._running, "the edge's /status to say running and its HTTP API", 60)

    def _running(self) -> bool:
        assert self.proc.poll() is None, f"the edge exited {self.proc.returncode}: {self.tail()}"
        try:
            return self.status()["state"] == "running" and not refused(self.http_port)
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        """``GET /status`` as JSON."""
        with urllib.request.urlopen(self.url + "status", timeout=5) as reply:
            assert reply.headers.get_content_type() == "application/json"
            return json.load(reply)

    def post(self, device: str, channel: str, body: bytes) -> None:
        url = f"http://127.0.0.1:{self.http_port}/api/v1/{DEVICES[device]}/{channel}"
        reply = curl(url, body, headers=("Content-Type: application/octet-stream",))
        assert reply.status == 200, (reply.status, reply.body)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture
def edge() -> Iterator[EdgeProcess]:
    with tempfile.TemporaryDirectory(prefix="status-page-") as tmp:
        running = EdgeProcess(Path(tmp))
        try:
            yield running
        finally:
            running.stop()


def send_telemetry(edge: EdgeProcess, start: int, count: int) -> None:
    """``count`` readings per sensor (one request each), from reading ``start`` on."""
    t0 = int(datetime(2026, 3, 2, 8, 0, tzinfo=UTC).timestamp() * 1000)
    for i in range(start, start + count):
        for n, device in enumerate(("sensor-1", "sensor-2")):
            body = {"ts": t0 + i * 1000, "values": {"temperature": 20.0 + n + (i % 7) * 0.5}}
            edge.post(device, "telemetry", json.dumps(body).encode())


def send_vibration(edge: EdgeProcess) -> None:
    """Blocks of an out-of-balance machine: its ISO zone alarm is raised."""
    machine = Machine("imbalance", seed=2)
    t0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    for i in range(ALARM_BLOCKS):
        start = t0 + timedelta(seconds=i * BLOCK_FRAMES / machine.sample_rate_hz)
        block = encode_evb1(
            machine.signal(i * BLOCK_FRAMES, BLOCK_FRAMES),
            sample_rate_hz=machine.sample_rate_hz,
            start_ts=start,
        )
        edge.post("fan-2", "vibration", block)


def expected(status: dict[str, Any]) -> dict[str, Any]:
    """What the page must show for ``status`` (numbers as ``data-value`` text turned to numbers)."""
    cloud = status["cloud"]
    state = (
        "not configured"
        if not cloud["configured"]
        else "connected"
        if cloud["connected"]
        else "disconnected"
    )
    return {
        "flows": {
            name: {field: flow[field] for field in FLOW_FIELDS}
            for name, flow in status["flows"].items()
        },
        "devices_seen": status["devices_seen"],
        "journal_messages": status["journal"]["messages"],
        "journal_unread": status["journal"]["unread"],
        "outbox_batches": status["outbox"]["batches"],
        "cloud_state": state,
        "alarms": len(status["recent_alarms"]),
    }


def as_number(text: str | None) -> float | None:
    if text is None or text in ("", "null"):
        return None
    return float(text)


def shown(browser: Browser) -> dict[str, Any]:
    """The page's numbers in the shape of :func:`expected`."""
    page = browser.js(PAGE_NUMBERS)
    return {
        "flows": {
            name: {field: as_number(cells.get(field)) for field in FLOW_FIELDS}
            for name, cells in page["flows"].items()
        },
        "devices_seen": as_number(page["devices_seen"]),
        "journal_messages": as_number(page["journal_messages"]),
        "journal_unread": as_number(page["journal_unread"]),
        "outbox_batches": as_number(page["outbox_batches"]),
        "cloud_state": page["cloud_state"],
        "alarms": len(page["alarms"]),
    }


def page_shows_status(browser: Browser, edge: EdgeProcess, what: str) -> None:
    """Wait up to 10 s (the page refreshes every 2 s) for the page to show ``/status``."""
    deadline = time.monotonic() + 10
    while True:
        page, truth = shown(browser), expected(edge.status())
        if page == truth or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert page == truth, what


def settled(edge: EdgeProcess, check: Any, what: str) -> dict[str, Any]:
    """Wait until ``check(status)`` holds and ``/status`` stops changing for half a second."""
    last: list[Any] = [None]

    def steady() -> dict[str, Any] | None:
        now = edge.status()
        same = check(now) and last[0] is not None and expected(now) == expected(last[0])
        last[0] = now
        return now if same else None

    def slow() -> dict[str, Any] | None:
        time.sleep(0.5)
        return steady()

    return wait_for(slow, what, 30)


def test_the_status_page_shows_and_follows_status(edge: EdgeProcess, browser: Browser) -> None:
    # ``edge`` first, so it stops after the browser closed: the page fetches /status every
    # 2 s until then, and one fetch from a stopped edge is a console error in the teardown.
    send_telemetry(edge, 0, 5)
    send_vibration(edge)
    first = settled(
        edge,
        lambda s: (
            s["flows"]["telemetry"]["messages_in"] == 10
            and s["flows"]["vibration"]["messages_in"] == ALARM_BLOCKS
            and s["recent_alarms"]
        ),
        "the edge to count every message and raise the alarm",
    )
    assert first["devices_seen"] == 3
    assert first["cloud"]["configured"] is False

    browser.open(edge.url, label="status")
    # The page refreshes itself from /status every 2 s: wait for one fetch, then the numbers.
    browser.wait(
        "performance.getEntriesByType('resource').some(e => e.name.endsWith('/status'))",
        "the page to fetch /status",
    )
    page_shows_status(browser, edge, "the page shows /status")
    assert browser.js("return document.querySelector('#cloud-state').innerText.trim()") == (
        "not configured"
    )
    alarm_text = " ".join(browser.js(PAGE_NUMBERS)["alarms"])
    newest = first["recent_alarms"][0]
    assert newest["device"] in alarm_text and newest["rule"] in alarm_text, alarm_text
    browser.screenshot("status-first")

    send_telemetry(edge, 5, 7)
    settled(
        edge,
        lambda s: s["flows"]["telemetry"]["messages_in"] == 24,
        "the edge to count the new messages",
    )
    page_shows_status(browser, edge, "the page updated itself to the new /status")
    assert shown(browser)["flows"]["telemetry"]["messages_in"] == 24
    assert browser.js("return performance.getEntriesByType('navigation').length") == 1, (
        "the page reloaded instead of updating itself"
    )
    browser.screenshot("status-updated")
    browser.assert_quiet()

    # Read-only, and everything inline (no CDN).
    assert curl(edge.url, b"x", method="POST").status == 405
    page = curl(edge.url)
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b"<script src=" not in page.body and b'rel="stylesheet"' not in page.body
