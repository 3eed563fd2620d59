"""The unique-keys attack on a real edge: memory stays bounded, other devices are served.

``edgesieve run flows.telemetry`` runs in its own process group with a real
mosquitto; one device publishes messages full of new telemetry keys (whole
messages over ``limits.keys_per_message`` and, below it, far more distinct keys
than ``limits.series_per_device``), another device publishes ordinary
telemetry at the same time. The edge's RSS (flow and ingest process) must stay
under the bound docs/config.md documents, the refused keys must be dead letters
with the limit as their reason, the other device's readings must all be
processed, and once the attacker's series are evicted as idle the memory they
took must come back. A clean stop must be quick.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from connectors.devices.mosquitto import Mosquitto
from flows.config import LimitsSection
from flows.ingest import SERIES_BYTES
from tests.conftest import ROOT, free_port, mosquitto_pub, query_parquet, wait_for

EDGE = [sys.executable, "-m", "flows.cli", "run", "flows.telemetry"]
PAGE = os.sysconf("SC_PAGE_SIZE")
ATTACK_KEYS = 50_000
"""Keys of each over-size message, as in the probe that found the unbounded growth."""
SMALL_KEYS = 1000
"""New keys of each message under ``keys_per_message``."""
SMALL_MESSAGES = 30
SERIES_PER_DEVICE = 20_000
SERIES_TOTAL = SERIES_PER_DEVICE + 5000
GOOD = 100
"""Messages of the well-behaved device."""
IDLE_S = 3


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in the process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            total += int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


class Sampler:
    """The process group's RSS every 50 ms in a thread; its peak."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, group_rss(self.pgid))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Edge:
    """The telemetry edge in its own process group, with /metrics."""

    def __init__(self, tmp_path: Path, broker: Mosquitto) -> None:
        self.metrics_port = free_port()
        self.data = tmp_path / "var"
        self.config = tmp_path / "edge.yaml"
        self.config.write_text(
            f"data_dir: {self.data}\n"
            f'metrics_listen: "127.0.0.1:{self.metrics_port}"\n'
            "transports:\n"
            f'  mqtt: {{url: "{broker.url}", client_id: limits-edge}}\n'
            "telemetry:\n  window: {length: 3600}\n"
            "parquet: {max_file_age: 1}\n"
            "recovery: {snapshot_interval: 1}\n"
            f"limits: {{series_per_device: {SERIES_PER_DEVICE}, "
            f"state_bytes_per_device: {SERIES_PER_DEVICE * 4 * SERIES_BYTES}, "
            f"series_total: {SERIES_TOTAL}, series_idle_evict: {IDLE_S}}}\n"
        )
        self.log = tmp_path / "edge.log"
        self.proc = subprocess.Popen(
            [*EDGE, "--config", str(self.config)],
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_for(
            lambda: b"ingest: ready" in self.log.read_bytes() or self.proc.poll() is not None,
            "the edge to be ready",
            60,
        )
        assert self.proc.poll() is None, self.tail()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stage(self, stage: str, device: str) -> float:
        """``edgesieve_messages_total`` of ``stage`` and ``device`` on /metrics (0 if absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("edgesieve_messages_total{"):
                labels, value = line[len("edgesieve_messages_total{") :].rsplit("} ", 1)
                pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                if pairs.get("stage") == stage and pairs.get("device") == device:
                    return float(value)
        return 0.0

    def rss(self) -> int:
        return group_rss(self.proc.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def edge(tmp_path: Path, mosquitto: Mosquitto):
    edge = Edge(tmp_path, mosquitto)
    yield edge
    edge.kill()


def attack_lines(prefix: str, messages: int, keys: int) -> list[str]:
    """``messages`` telemetry documents of ``keys`` keys each, none seen before.

    50,000 keys make about 0.8 MB, under the 1 MiB payload limit (the probe sent 0.64 MB).
    """
    return [
        json.dumps({f"{prefix}{m}-{k}": 1 for k in range(keys)}, separators=(",", ":"))
        for m in range(messages)
    ]


def rss_bound(limits: LimitsSection, idle: int) -> int:
    """The bound docs/config.md documents: the idle edge, the series the limits let it
    hold, and the messages in flight (here a few, under 1 MiB each)."""
    return idle + limits.series_total * (SERIES_BYTES + 256) + 256 * 1024 * 1024


def live_snapshot_keys(recovery: Path, step: str) -> int:
    """Keys of ``step`` whose latest recovery snapshot holds state (not a deletion)."""
    live = 0
    for part in recovery.glob("part-*.sqlite3"):
        with sqlite3.connect(part) as db:
            live += db.execute(
                "select count(*) from snaps s where step_id = ? and ser_change is not null "
                "and snap_epoch = (select max(snap_epoch) from snaps t "
                "where t.step_id = s.step_id and t.state_key = s.state_key)",
                (step,),
            ).fetchone()[0]
    return live


@pytest.mark.slow
def test_the_unique_keys_attack_stays_bounded_and_other_devices_are_served(
    edge: Edge, mosquitto: Mosquitto
) -> None:
    mosquitto_pub(mosquitto, "v1/devices/pump-1/telemetry", message='{"seq": -1}')
    wait_for(lambda: edge.stage("readings", "pump-1") == 1, "the first reading", 30)
    idle = edge.rss()
    limits = LimitsSection(series_per_device=SERIES_PER_DEVICE, series_total=SERIES_TOTAL)

    def good() -> None:
        mosquitto_pub(
            mosquitto,
            "v1/devices/pump-1/telemetry",
            lines=[json.dumps({"seq": float(i), "temp": 20.0 + i}) for i in range(GOOD)],
        )

    def wave(n: int) -> None:
        """New keys, more than the attacker may hold; then its series go idle and are evicted."""
        mosquitto_pub(
            mosquitto,
            "v1/devices/evil/telemetry",
            lines=attack_lines(f"w{n}-", SMALL_MESSAGES, SMALL_KEYS),
        )

    with Sampler(edge.proc.pid) as sampler:
        honest = threading.Thread(target=good)
        honest.start()
        mosquitto_pub(
            mosquitto, "v1/devices/evil/telemetry", lines=attack_lines("big", 3, ATTACK_KEYS)
        )
        wave(0)
        honest.join(60)
        sent = 3 + SMALL_MESSAGES
        wait_for(
            lambda: (
                edge.stage("received", "evil") == sent
                and edge.stage("received", "pump-1") == GOOD + 1
            ),
            "the flow to take every message",
            60,
        )
        time.sleep(1)
        held = edge.rss()
        evictions = []
        for n in (1, 2):
            time.sleep(IDLE_S + 0.5)  # the attacker's series go idle; its next message evicts
            mosquitto_pub(mosquitto, "v1/devices/evil/telemetry", message=f'{{"again{n}": 1}}')
            sent += 1
            wait_for(
                lambda n=n: edge.stage("evicted_series", "evil") >= SERIES_PER_DEVICE * n,
                "the eviction",
                30,
            )
            time.sleep(2)  # the operators drop the evicted state, the heap is trimmed
            evictions.append(edge.rss())
            wave(n)
            sent += SMALL_MESSAGES
            wait_for(lambda sent=sent: edge.stage("received", "evil") == sent, "the next wave", 60)
            time.sleep(1)
    again = edge.rss()
    bound = rss_bound(limits, idle)
    print(
        f"RSS idle {idle >> 20} MiB, holding the first wave {held >> 20} MiB, after evictions "
        f"{[r >> 20 for r in evictions]} MiB, after the last wave {again >> 20} MiB, peak "
        f"{sampler.peak >> 20} MiB, bound {bound >> 20} MiB"
    )
    assert sampler.peak < bound, (sampler.peak >> 20, bound >> 20)
    # A wave after an eviction is admitted in the memory the evicted one left: where the
    # first wave took `growth`, the last one (20,000 series admitted again) takes far less
    # (measured: 100-120 MiB, then 15-20 MiB, most of it DuckDB holding the new rows).
    growth = held - idle
    assert again - evictions[-1] < growth // 2, (idle >> 20, held >> 20, evictions, again >> 20)
    refused = SMALL_MESSAGES * SMALL_KEYS - SERIES_PER_DEVICE
    assert edge.stage("refused_keys_per_message", "evil") == 3
    assert edge.stage("refused_series_per_device", "evil") == 3 * refused + 2
    assert edge.stage("evicted_series", "evil") == 2 * SERIES_PER_DEVICE
    for stage in ("refused_keys_per_message", "refused_series_per_device", "evicted_series"):
        assert edge.stage(stage, "pump-1") == 0

    t0 = time.monotonic()
    os.killpg(edge.proc.pid, signal.SIGTERM)
    assert edge.proc.wait(30) == 0, edge.tail()
    stop_s = time.monotonic() - t0
    print(f"stop took {stop_s:.1f} s")
    assert stop_s < 10, edge.tail()

    # The recovery snapshot holds the attacker's last wave and pump-1, not every key it sent.
    recovery = edge.data / "recovery" / "telemetry"
    step = "telemetry.deadband.filter.stateful.stateful_batch"
    assert live_snapshot_keys(recovery, step) == SERIES_PER_DEVICE + 2
    letters = query_parquet(
        edge.data, "dead_letters", "select device, reason, octet_length(payload) from {src}"
    )
    assert {device for device, _, _ in letters} == {"evil"}
    whole = [r for r in letters if r[1].startswith("limits.keys_per_message: ")]
    assert len(whole) == 3 and all(size > ATTACK_KEYS * 10 for _, _, size in whole)
    assert f"has {ATTACK_KEYS} distinct keys, more than the limit of 1000" in whole[0][1]
    keys = [r for r in letters if r[1].startswith("limits.series_per_device: ")]
    assert sum(int(re.search(r"(\d+) readings", r[1]).group(1)) for r in keys) == 3 * refused + 2
    assert all(f"has {SERIES_PER_DEVICE} series, the limit" in r[1] for r in keys)
    points = query_parquet(
        edge.data,
        "telemetry_points",
        "select value from {src} where device = 'pump-1' and key = 'seq'",
    )
    assert sorted(v for (v,) in points) == [float(i) for i in range(-1, GOOD)]
