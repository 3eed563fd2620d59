"""Accepted means kept: kill -9 ingest at random moments while devices stream; count what was acked.

MQTT, HTTP and CoAP devices stream numbered readings into the ingest process
(``python -m flows.ingest_process``, in its own process group, killed with
SIGKILL again and again and restarted). A device counts a message as accepted
when it got PUBACK from the broker (MQTT; the broker holds it for the edge's
persistent session), 200 (HTTP) or 2.04 (CoAP). At the end every accepted
message is in the journal exactly once.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from aiocoap import POST, Context, Message
from paho.mqtt.enums import CallbackAPIVersion

from connectors.devices.journal import JournalReader, journal_partitions
from tests.conftest import DEVICES, ROOT, free_port, wait_for, write_devices

CYCLES = 20


class Devices:
    """Three devices streaming numbered readings; each records what it was told was accepted."""

    def __init__(self, mqtt_port: int, http_port: int, coap_port: int) -> None:
        self.accepted: dict[str, set[int]] = {"mq-1": set(), "pump-1": set(), "fan-2": set()}
        self.sent = Counter[str]()
        self._stop = threading.Event()
        self._mqtt_port, self._http_port, self._coap_port = mqtt_port, http_port, coap_port
        self._threads = [
            threading.Thread(target=self._mqtt, daemon=True),
            threading.Thread(target=self._http, daemon=True),
            threading.Thread(target=lambda: asyncio.run(self._coap()), daemon=True),
        ]

    def start(self) -> Devices:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    @staticmethod
    def body(seq: int) -> bytes:
        return json.dumps({"seq": seq}).encode()

    def _mqtt(self) -> None:
        inflight: dict[int, int] = {}
        early: set[int] = set()  # acknowledged before publish() returned its mid
        lock = threading.Lock()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="chaos-device")

        def on_publish(client, userdata, mid, reason, properties) -> None:
            with lock:
                seq = inflight.pop(mid, None)
                if seq is None:
                    early.add(mid)
            if seq is not None:
                self.accepted["mq-1"].add(seq)

        client.on_publish = on_publish
        client.max_inflight_messages_set(50)
        client.connect("127.0.0.1", self._mqtt_port)
        client.loop_start()
        seq = 0
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            # paho calls on_publish holding its own lock, which publish() takes too: publishing
            # while holding ours would deadlock against the callback
            info = client.publish("v1/devices/mq-1/telemetry", self.body(seq), qos=1)
            with lock:
                if info.mid in early:
                    early.discard(info.mid)
                    self.accepted["mq-1"].add(seq)
                else:
                    inflight[info.mid] = seq
            self.sent["mq-1"] += 1
            seq += 1
            time.sleep(0.004)
        wait_for(lambda: not inflight, "the broker to acknowledge every MQTT publish", timeout=30)
        client.loop_stop()
        client.disconnect()

    def _http(self) -> None:
        seq = 0
        deadline = time.monotonic() + 300
        token = DEVICES["pump-1"]
        while not self._stop.is_set() and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self._http_port, timeout=5)
            try:
                conn.request("POST", f"/api/v1/{token}/telemetry", self.body(seq))
                if conn.getresponse().status == 200:
                    self.accepted["pump-1"].add(seq)
            except OSError:
                time.sleep(0.02)  # ingest is down: the device tries again later
            finally:
                conn.close()
            self.sent["pump-1"] += 1
            seq += 1

    async def _coap(self) -> None:
        context = await Context.create_client_context()
        seq = 0
        deadline = time.monotonic() + 300
        uri = f"coap://127.0.0.1:{self._coap_port}/api/v1/{DEVICES['fan-2']}/telemetry"
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                request = Message(code=POST, uri=uri, payload=self.body(seq))
                try:
                    response = await asyncio.wait_for(context.request(request).response, 3)
                    if str(response.code) == "2.04 Changed":
                        self.accepted["fan-2"].add(seq)
                except Exception:
                    await asyncio.sleep(0.02)
                self.sent["fan-2"] += 1
                seq += 1
        finally:
            await context.shutdown()


def journaled(root: Path) -> Counter[tuple[str, int]]:
    """Every (device, seq) in the journal, with how many times it is there."""
    seen: Counter[tuple[str, int]] = Counter()
    for partition in range(journal_partitions(root) or 0):
        reader = JournalReader(root, partition)
        try:
            for _, msg in reader.read(after=-1, limit=10_000_000):
                seen[msg.device, json.loads(msg.payload)["seq"]] += 1
        finally:
            reader.close()
    return seen


INGEST = [sys.executable, "-m", "flows.ingest_process"]
EDGE = [sys.executable, "-m", "flows.cli", "run", "flows.edge"]
"""The whole edge: the flow's process and its ingest child, one process group."""


def start(command: list[str], config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*command, "--config", str(config)],
        cwd=ROOT,
        start_new_session=True,  # its own process group, killed whole
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


@pytest.mark.parametrize(
    ("command", "run_s"), [(INGEST, (0.3, 1.2)), (EDGE, (1.0, 2.5))], ids=["ingest", "edge"]
)
def test_kill_9_at_random_moments_loses_and_doubles_nothing_accepted(
    tmp_path, mosquitto, command, run_s
):
    # With the whole edge, the flow releases journal rows only after a snapshot; with snapshots an
    # hour apart no run reaches one, so the journal still holds everything it was given.
    rng = random.Random(9)
    http_port, coap_port = free_port(), free_port()
    config = tmp_path / "edge.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'var'}\n"
        f"devices: {write_devices(tmp_path, DEVICES)}\n"
        "transports:\n"
        f'  mqtt: {{url: "{mosquitto.url}", client_id: chaos-edge}}\n'
        f'  http: {{listen: "127.0.0.1:{http_port}"}}\n'
        f'  coap: {{listen: "127.0.0.1:{coap_port}"}}\n'
        "recovery: {snapshot_interval: 3600}\n"
    )
    log = tmp_path / "ingest.log"
    # the edge's persistent session exists before the first device publishes
    first = start(command, config, log)
    wait_for(lambda: b"ready" in log.read_bytes() or first.poll() is not None, "ingest to start", 30)
    devices = Devices(mosquitto.port, http_port, coap_port).start()
    kills = 0
    try:
        proc = first
        for _ in range(CYCLES):
            time.sleep(rng.uniform(*run_s))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            kills += 1
            proc = start(command, config, log)
        time.sleep(1.0)
    finally:
        devices.stop()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    readies = log.read_bytes().count(b"ingest: ready")
    proc = start(INGEST, config, log)
    try:
        wait_for(lambda: log.read_bytes().count(b"ingest: ready") > readies, "ingest to start", 30)
        # ingest alone drains what the broker kept for the session, then stops cleanly
        accepted = {(d, s) for d, seqs in devices.accepted.items() for s in seqs}
        root = tmp_path / "var" / "journal"
        wait_for(lambda: accepted <= set(journaled(root)), "every accepted message in the journal", 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seen = journaled(root)
    doubled = {k: n for k, n in seen.items() if n > 1}
    assert not doubled, f"stored more than once: {sorted(doubled)[:10]}"
    assert kills == CYCLES
    for device, seqs in devices.accepted.items():
        assert len(seqs) > 20, f"{device} got too few messages accepted to mean anything: {len(seqs)}"
    assert accepted <= set(seen)

