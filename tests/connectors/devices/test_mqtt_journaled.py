"""JournaledMqtt's paho client: batched PUBACKs and reads (paho-mqtt 2.x internals, pinned here)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from connectors.devices.journal import Journal, JournalReader, JournalSettings
from connectors.devices.mosquitto import Mosquitto
from connectors.devices.mqtt import journaled
from connectors.devices.mqtt.client import MqttSettings
from connectors.devices.mqtt.journaled import JournaledMqtt

N = 600


def settings_for(broker: Mosquitto, client_id: str = "edge-batched") -> MqttSettings:
    return MqttSettings(url=broker.url, channels=("telemetry",), client_id=client_id)


def publish_burst(broker: Mosquitto, n: int) -> None:
    """``n`` QoS 1 messages from 3 devices, published by one paho client as fast as it can."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="burst")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        infos = [
            client.publish(f"v1/devices/d{i % 3}/telemetry", f'{{"n": {i}}}', qos=1)
            for i in range(n)
        ]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def session_backlog(broker: Mosquitto, client_id: str) -> int:
    """Messages the broker still holds for ``client_id``'s session (redelivered on connect)."""
    got = threading.Event()
    count = 0

    def on_message(*_: Any) -> None:
        nonlocal count
        count += 1
        got.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    got.wait(1.0)
    client.disconnect()
    client.loop_stop()
    return count


@pytest.mark.parametrize("recv_bytes", [16_384, 7], ids=["whole-reads", "packets-cut"])
def test_a_burst_is_journaled_in_order_and_acknowledged_in_few_writes(
    tmp_path: Path,
    mosquitto: Mosquitto,
    wait_for: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    recv_bytes: int,
) -> None:
    # 7 bytes a read: every packet is cut across reads and left in paho's partial-packet state
    monkeypatch.setattr(journaled, "_RECV_BYTES", recv_bytes)
    journal = Journal(JournalSettings(root=tmp_path / "journal", partitions=1))
    mqtt = JournaledMqtt(settings_for(mosquitto), journal)
    client = mqtt._client
    queued: list[int] = []
    packet_queue = client._packet_queue

    def count_packets(command: int, packet: bytes, *args: Any) -> Any:
        if command == paho.PUBACK:
            queued.append(len(packet) // 4)
        return packet_queue(command, packet, *args)

    client._packet_queue = count_packets  # type: ignore[method-assign]
    try:
        mqtt.start()
        wait_for(lambda: mqtt.ready, "the journaled client to subscribe")
        publish_burst(mosquitto, N)
        wait_for(lambda: mqtt.acked == N, f"{N} PUBACKs", 30)
    finally:
        journal.close()
        mqtt.close()
    assert (mqtt.received, mqtt.committed, mqtt.duplicates, mqtt.withheld) == (N, N, 0, 0)
    assert sum(queued) == N and len(queued) < N  # PUBACKs queued a group at a time
    with JournalReader(tmp_path / "journal", 0) as reader:
        rows = reader.read(-1, N + 1)
    assert [m.payload for _, m in rows] == [f'{{"n": {i}}}'.encode() for i in range(N)]
    assert [m.device for _, m in rows] == [f"d{i % 3}" for i in range(N)]
    # every PUBACK reached the broker: nothing is redelivered to the session
    assert session_backlog(mosquitto, "edge-batched") == 0


def test_reads_pause_while_the_journal_writer_is_behind(
    tmp_path: Path, mosquitto: Mosquitto, wait_for: Callable[..., Any]
) -> None:
    journal = Journal(JournalSettings(root=tmp_path / "journal", partitions=1))
    mqtt = JournaledMqtt(settings_for(mosquitto), journal)
    busy = threading.Event()
    mqtt._client.busy = busy.is_set
    try:
        mqtt.start()
        wait_for(lambda: mqtt.ready, "the journaled client to subscribe")
        busy.set()
        threading.Event().wait(0.1)  # a read under way ends first
        publish_burst(mosquitto, 10)
        threading.Event().wait(0.3)
        assert mqtt.received == 0  # the socket is left unread
        busy.clear()
        wait_for(lambda: mqtt.acked == 10, "the messages once reads resume")
    finally:
        journal.close()
        mqtt.close()
