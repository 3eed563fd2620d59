"""SIGTERM to the edge's whole process group (systemd's default) is a clean stop.

``edgesieve run`` is the flow process and its ingest child in one process
group; ``kill -TERM -<pgid>`` (and systemd's ``KillMode=control-group``)
signals both. The edge must stop as cleanly as after a SIGTERM to the flow
process alone: ingest stops accepting and commits, the flow drains the journal
and exits 0, every accepted message is processed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from connectors.devices import reader_priority
from connectors.devices.journal import JournalReader, journal_partitions
from connectors.devices.mosquitto import Mosquitto
from tests.conftest import DEVICES, ROOT, free_port, query_parquet, wait_for, write_devices

EDGE = [sys.executable, "-m", "flows.cli", "run", "flows.telemetry"]
STOP_S = 20.0
"""How long a clean stop of a small edge may take (it takes about a second)."""
T0_MS = 1_763_800_000_000


def body(seq: int) -> bytes:
    return json.dumps({"ts": T0_MS + seq * 10, "values": {"seq": float(seq)}}).encode()


class Edge:
    """``edgesieve run flows.telemetry`` in its own process group, logging to a file."""

    def __init__(self, tmp_path: Path, broker: Mosquitto) -> None:
        self.http_port = free_port()
        self.data = tmp_path / "var"
        self.config = tmp_path / "edge.yaml"
        self.config.write_text(
            f"data_dir: {self.data}\n"
            f"devices: {write_devices(tmp_path, DEVICES)}\n"
            "transports:\n"
            f'  mqtt: {{url: "{broker.url}", client_id: stop-edge}}\n'
            f'  http: {{listen: "127.0.0.1:{self.http_port}"}}\n'
            "telemetry:\n  window: {length: 3600}\n"
            "parquet: {max_file_age: 3600}\n"
        )
        self.log = tmp_path / "edge.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Edge:
        readies = self.log.read_bytes().count(b"ingest: ready") if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [*EDGE, "--config", str(self.config)],
            cwd=ROOT,
            start_new_session=True,  # its own process group, like a systemd unit's cgroup
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        wait_for(
            lambda: (
                self.log.read_bytes().count(b"ingest: ready") > readies
                or self.proc.poll() is not None
            ),
            "the edge to be ready",
            60,
        )
        assert self.proc.poll() is None, self.tail()
        return self

    def signal_group(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = STOP_S) -> int:
        """The exit status; fails (and kills the group) when the edge is still running."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the edge did not exit within {timeout:g}s:\n{self.tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def post(self, seq: int) -> bool:
        """POST one reading of pump-1; whether the edge answered 200 (accepted)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
        try:
            conn.request("POST", f"/api/v1/{DEVICES['pump-1']}/telemetry", body(seq))
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def processed(self) -> list[tuple[str, int]]:
        """(device, seq) of every telemetry point written to Parquet, duplicates included."""
        rows = query_parquet(self.data, "telemetry_points", "select device, value from {src}")
        return [(device, int(value)) for device, value in rows]

    def journaled(self) -> set[tuple[str, int]]:
        """(device, seq) of what the journal still holds."""
        root = self.data / "journal"
        seen: set[tuple[str, int]] = set()
        for partition in range(journal_partitions(root) or 0):
            with JournalReader(root, partition) as reader:
                for _, msg in reader.read(-1, 10_000_000):
                    seen.add((msg.device, int(json.loads(msg.payload)["values"]["seq"])))
        return seen


@pytest.fixture
def edge(tmp_path: Path, mosquitto: Mosquitto):
    edge = Edge(tmp_path, mosquitto)
    yield edge
    edge.kill()


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM,), (signal.SIGTERM, signal.SIGTERM)],
    ids=["sigterm", "sigterm-twice"],
)
def test_sigterm_to_the_process_group_of_an_idle_edge_is_a_clean_stop(
    edge: Edge, signals: tuple[signal.Signals, ...]
) -> None:
    edge.start()
    assert edge.post(0)
    time.sleep(0.5)  # idle
    if reader_priority._can_return() is None:  # noqa: SLF001 - the same check as the code
        # caught up, the thread that waits for the workers yields the CPU too,
        # and still handles the signal
        assert edge.proc is not None
        wait_for(lambda: os.sched_getscheduler(edge.proc.pid) == os.SCHED_IDLE, "SCHED_IDLE", 10)
    t0 = time.monotonic()
    for signum in signals:  # a second one lands while ingest stops and commits
        edge.signal_group(signum)
        time.sleep(0.02)
    assert edge.wait() == 0, edge.tail()
    assert time.monotonic() - t0 < 10, edge.tail()
    assert edge.processed() == [("pump-1", 0)]
    assert "ingest: stopped" in edge.tail()
    report = json.loads((edge.data / "report-telemetry.json").read_text())
    assert report["journal_lag"] == 0 and report["journal_messages"] == 0


@pytest.mark.slow
def test_sigterm_then_sigint_to_the_process_group_does_not_hang(edge: Edge) -> None:
    edge.start()
    edge.signal_group(signal.SIGTERM)
    time.sleep(0.2)
    edge.signal_group(signal.SIGINT)  # a second Ctrl-C aborts the flow; nothing may hang
    edge.wait()
    wait_for(lambda: b"ingest: stopped" in edge.log.read_bytes(), "the ingest process to stop")


class Devices:
    """pump-1 posting over HTTP, mq-1 publishing QoS 1 to the broker; each records its accepted."""

    def __init__(self, edge: Edge, broker: Mosquitto) -> None:
        self.edge, self.broker = edge, broker
        self.http: set[int] = set()
        self.mqtt: set[int] = set()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._post, daemon=True),
            threading.Thread(target=self._publish, daemon=True),
        ]

    def start(self) -> Devices:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _post(self) -> None:
        seq = 0
        while not self._stop.is_set():
            if self.edge.post(seq):
                self.http.add(seq)
            else:
                time.sleep(0.01)
            seq += 1

    def _publish(self) -> None:
        inflight: dict[int, int] = {}
        lock = threading.Lock()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="stop-device")

        def on_publish(client, userdata, mid, reason, properties) -> None:  # noqa: ANN001
            with lock:
                seq = inflight.pop(mid, None)
            if seq is not None:
                self.mqtt.add(seq)

        client.on_publish = on_publish
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        seq = 0
        while not self._stop.is_set():
            with lock:
                inflight[client.publish("v1/devices/mq-1/telemetry", body(seq), qos=1).mid] = seq
            seq += 1
            time.sleep(0.004)
        wait_for(lambda: not inflight, "the broker to acknowledge every publish", 30)
        client.loop_stop()
        client.disconnect()


@pytest.mark.slow
def test_sigterm_to_the_process_group_while_devices_stream_processes_every_accepted_message(
    edge: Edge, mosquitto: Mosquitto
) -> None:
    edge.start()  # the edge's persistent session exists before mq-1 publishes
    devices = Devices(edge, mosquitto).start()
    try:
        wait_for(lambda: len(devices.http) > 50 and len(devices.mqtt) > 50, "devices streaming", 30)
        time.sleep(1.0)
        edge.signal_group(signal.SIGTERM)
        assert edge.wait() == 0, edge.tail()
        time.sleep(0.5)  # mq-1 keeps publishing into the edge's session meanwhile
    finally:
        devices.stop()
    first = edge.processed()
    assert len(first) == len(set(first)), "a message was processed twice"
    assert {("pump-1", s) for s in devices.http} <= set(first)  # 200 means committed
    assert {d for d, _ in first} == {"pump-1", "mq-1"}

    # What the broker accepted after the edge's clean stop waits in its session for the next run.
    edge.start()
    wanted = {("mq-1", s) for s in devices.mqtt}
    wait_for(lambda: wanted <= set(first) | edge.journaled(), "the session's backlog", 30)
    edge.signal_group(signal.SIGTERM)
    assert edge.wait() == 0, edge.tail()
    processed = edge.processed()
    assert len(processed) == len(set(processed)), "a message was processed twice"
    assert wanted <= set(processed)
    assert {("pump-1", s) for s in devices.http} <= set(processed)
