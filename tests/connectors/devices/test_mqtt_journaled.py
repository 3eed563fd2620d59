"""JournaledMqtt against a real mosquitto: batched PUBACKs and reads (paho-mqtt 2.x internals,
pinned here), and what the ingest process relies on (QoS, sessions, reconnects, credentials)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
import pytest

from connectors.devices.broker_auth import EdgeAccount, write_mosquitto_config
from connectors.devices.journal import Journal, JournalReader, JournalSettings
from connectors.devices.mosquitto import Mosquitto
from connectors.devices.mqtt import ingest_client
from connectors.devices.mqtt.client import MqttSettings
from connectors.devices.mqtt.journaled import JournaledMqtt
from operators.records import RawMessage
from tests.conftest import TOKEN_1, Broker, device_registry

if TYPE_CHECKING:
    from connectors.devices.embedded import EmbeddedBroker

N = 600
CHANNELS = ("telemetry", "vibration")


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
    monkeypatch.setattr(ingest_client, "_RECV_BYTES", recv_bytes)
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


# --- the client against a real broker: what the ingest process relies on -------------------------

FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "keepalive_s": 5}


def settings(broker: Broker, **kwargs: Any) -> MqttSettings:
    return MqttSettings(url=broker.url, **{**FAST, "client_id": "edge", **kwargs})


class Ingest:
    """A started JournaledMqtt on the journal at ``root``, as the ingest process runs it."""

    def __init__(self, root: Path, cfg: MqttSettings) -> None:
        self.root = root
        self.journal = Journal(JournalSettings(root=root, partitions=1))
        self.mqtt = JournaledMqtt(cfg, self.journal)
        self.mqtt.start()

    def rows(self) -> list[RawMessage]:
        with JournalReader(self.root, 0) as reader:
            return [msg for _, msg in reader.read(-1, 100_000)]

    def payloads(self) -> list[str]:
        return [msg.payload.decode() for msg in self.rows()]

    def close(self) -> None:
        """Commit, send the last PUBACKs, disconnect (as the ingest process stops)."""
        self.journal.close()
        self.mqtt.close()


@pytest.fixture
def ingest(tmp_path: Path, wait_for: Callable[..., Any]) -> Iterator[Callable[..., Ingest]]:
    """Start an :class:`Ingest` (one at a time, on one journal) and wait until it subscribed."""
    started: list[Ingest] = []

    def start(cfg: MqttSettings, *, wait_ready: bool = True) -> Ingest:
        one = Ingest(tmp_path / "journal", cfg)
        started.append(one)
        if wait_ready:
            wait_for(lambda: one.mqtt.ready, "the journaled client to subscribe")
        return one

    yield start
    for one in started:
        one.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("qos", [0, 1])
def test_device_messages_are_journaled_as_raw_messages(
    mosquitto: Mosquitto,
    mosquitto_pub: Any,
    ingest: Callable[..., Ingest],
    wait_for: Any,
    tmp_path: Path,
    qos: int,
    protocol: str,
) -> None:
    edge = ingest(settings(mosquitto, qos=qos, protocol=protocol, channels=CHANNELS))
    pub = {"qos": qos, "protocol": "mqttv5" if protocol == "5" else "mqttv311"}
    block = tmp_path / "block.bin"
    block.write_bytes(b"EVB1\x01\x01\x00\x00" + bytes(range(256)))
    before = datetime.now(UTC)
    mosquitto_pub(mosquitto, "v1/devices/pump-7/telemetry", message='{"t": 21.5}', **pub)
    mosquitto_pub(mosquitto, "v1/devices/fan-2/telemetry", message=b"\x00\xffraw", **pub)
    mosquitto_pub(mosquitto, "v1/devices/pump-7/vibration", file=block, **pub)
    wait_for(lambda: edge.mqtt.committed == 3, "3 journaled messages")
    edge.close()
    rows = edge.rows()
    assert [(m.device, m.channel, m.transport, m.payload) for m in rows] == [
        ("pump-7", "telemetry", "mqtt", b'{"t": 21.5}'),
        ("fan-2", "telemetry", "mqtt", b"\x00\xffraw"),
        ("pump-7", "vibration", "mqtt", block.read_bytes()),
    ]
    assert all(before <= m.received_at <= datetime.now(UTC) for m in rows)
    assert all(m.received_at.tzinfo is UTC for m in rows)
    assert (edge.mqtt.received, edge.mqtt.acked) == (3, 3 if qos else 0)  # QoS 0 has no PUBACK


def test_other_topics_and_channels_are_acknowledged_and_ignored(
    mosquitto: Mosquitto, mosquitto_pub: Any, ingest: Callable[..., Ingest], wait_for: Any
) -> None:
    # the persistent session of an earlier run subscribed "vibration" too; this run only wants
    # "telemetry", and "+" also matches an empty device id
    ingest(settings(mosquitto, channels=CHANNELS)).close()
    edge = ingest(settings(mosquitto, channels=("telemetry",)))
    mosquitto_pub(mosquitto, "v1/devices/pump-7/vibration", message="old channel")
    mosquitto_pub(mosquitto, "v1/devices//telemetry", message="no device")
    mosquitto_pub(mosquitto, "v1/devices/pump-7/telemetry", message="good")
    wait_for(lambda: edge.mqtt.committed == 1 and edge.mqtt.ignored == 2, "1 message, 2 ignored")
    edge.close()
    assert edge.payloads() == ["good"]
    assert session_backlog(mosquitto, "edge") == 0  # the ignored ones were acknowledged too


def test_broker_down_at_start_then_connects(
    mosquitto_factory: Callable[..., Mosquitto],
    mosquitto_pub: Any,
    ingest: Callable[..., Ingest],
    wait_for: Any,
) -> None:
    broker = mosquitto_factory()  # not started yet
    edge = ingest(settings(broker), wait_ready=False)
    wait_for(lambda: edge.mqtt.connect_failures >= 2, "failed connection attempts")
    broker.start()
    wait_for(lambda: edge.mqtt.ready, "the client to subscribe once the broker is up")
    mosquitto_pub(broker, "v1/devices/late/telemetry", message="hello")
    wait_for(lambda: edge.mqtt.acked == 1, "the message")
    assert edge.payloads() == ["hello"]


def test_close_while_the_broker_is_unreachable_is_prompt(
    mosquitto_factory: Callable[..., Mosquitto], ingest: Callable[..., Ingest]
) -> None:
    edge = ingest(settings(mosquitto_factory()), wait_ready=False)  # never started
    started = time.monotonic()
    edge.close()
    assert time.monotonic() - started < 3
    assert edge.rows() == []


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_broker_restart_mid_stream_loses_and_doubles_nothing(
    mosquitto: Mosquitto,
    mosquitto_pub: Any,
    ingest: Callable[..., Ingest],
    wait_for: Any,
    protocol: str,
) -> None:
    batch_a = [f"a-{i}" for i in range(300)]
    batch_b = [f"b-{i}" for i in range(300)]
    edge = ingest(settings(mosquitto, protocol=protocol, reconnect_min_s=0.5, reconnect_max_s=1))
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=batch_a)
    mosquitto.restart()  # part of batch A is still queued in the broker or in flight
    connects_while_b_published = edge.mqtt.connects
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=batch_b)
    wait_for(lambda: set(edge.payloads()) >= {*batch_a, *batch_b}, "all of A and B", 20)
    edge.close()
    assert connects_while_b_published == 1, "B was published while the edge was away"
    assert edge.mqtt.connects == 2
    # what was in flight at the restart is redelivered (DUP) and journaled once
    assert sorted(edge.payloads()) == sorted(batch_a + batch_b)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "clean"])
def test_messages_published_while_the_edge_is_down_wait_only_in_a_persistent_session(
    mosquitto: Mosquitto,
    mosquitto_pub: Any,
    ingest: Callable[..., Ingest],
    wait_for: Any,
    protocol: str,
    persistent: bool,
) -> None:
    cfg = settings(mosquitto, protocol=protocol, persistent=persistent)
    ingest(cfg).close()
    offline = [f"offline-{i}" for i in range(50)]
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=offline)
    edge = ingest(cfg)
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", message="live")
    wait_for(lambda: "live" in edge.payloads(), "the live message")
    edge.close()
    assert edge.payloads() == ([*offline, "live"] if persistent else ["live"])


def test_the_edge_account_logs_in_and_its_password_is_never_logged(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    mosquitto_pub: Any,
    ingest: Callable[..., Ingest],
    wait_for: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    passwd, acl = write_mosquitto_config(
        device_registry(), EdgeAccount("edge", "edge-secret-0123"), tmp_path / "auth"
    )
    broker = mosquitto_factory(password_file=passwd, acl_file=acl).start()
    caplog.set_level(logging.DEBUG, logger="edgesieve.mqtt")
    cfg = settings(broker, username="edge", password="edge-secret-0123")
    edge = ingest(cfg)
    mosquitto_pub(
        broker, "v1/devices/pump-1/telemetry", message="mine", username="pump-1", password=TOKEN_1
    )
    wait_for(lambda: edge.mqtt.acked == 1, "the device's message")
    edge.close()
    assert [(m.device, m.payload) for m in edge.rows()] == [("pump-1", b"mine")]
    assert "edge-secret-0123" not in caplog.text and "edge-secret-0123" not in repr(cfg)


def test_through_the_embedded_broker(
    embedded_broker: EmbeddedBroker, ingest: Callable[..., Ingest], wait_for: Any
) -> None:
    edge = ingest(settings(embedded_broker))
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev")
    pub.connect("127.0.0.1", embedded_broker.port)
    pub.loop_start()
    try:
        for i in range(10):
            pub.publish(f"v1/devices/d{i}/telemetry", b"%d" % i, qos=1).wait_for_publish(5)
    finally:
        pub.disconnect()
        pub.loop_stop()
    wait_for(lambda: edge.mqtt.acked == 10, "10 PUBACKs through amqtt")
    edge.close()
    assert sorted((m.device, m.payload) for m in edge.rows()) == [
        (f"d{i}", b"%d" % i) for i in range(10)
    ]


def publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    """QoS 1 messages ``(device, payload)`` in this order, each acknowledged by the broker."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="devices")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        infos = [
            client.publish(f"v1/devices/{device}/telemetry", payload, qos=1)
            for device, payload in messages
        ]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_device_over_its_journal_share_is_acknowledged_and_kept_until_the_reserve(
    tmp_path: Path, mosquitto: Mosquitto, wait_for: Callable[..., Any]
) -> None:
    # 10,000 bytes, 2,500 a device; messages over a share are kept while 2,500 stay free
    root = tmp_path / "journal"
    journal = Journal(JournalSettings(root=root, partitions=1, max_bytes=10_000))
    mqtt = JournaledMqtt(settings_for(mosquitto), journal)

    def body(device: str, i: int) -> bytes:
        return f'{{"{device}": {i}}}'.encode().ljust(100)

    first = [("flood", body("flood", i)) for i in range(50)]
    first += [("calm", body("calm", i)) for i in range(10)]
    later = [("flood", body("flood", i)) for i in range(50, 80)]
    later += [("calm", body("calm", i)) for i in range(10, 15)]
    try:
        mqtt.start()
        wait_for(lambda: mqtt.ready, "the journaled client to subscribe")
        publish_all(mosquitto, first)  # flood: 5,000 bytes, twice its share; nothing withheld
        wait_for(lambda: mqtt.acked == 60, "60 PUBACKs")
        assert (mqtt.withheld, journal.stats().over_share) == (0, 25)
        publish_all(mosquitto, later)  # past 7,500 bytes: flood's next one waits, calm behind it
        wait_for(lambda: mqtt.acked == 74 and mqtt.withheld_now == 21, "the reserve reached")
        assert journal.stats().bytes == 7_400
        with JournalReader(root, 0) as reader:
            released = reader.last_offset()
            reader.release("flow", released)
            wait_for(lambda: mqtt.acked == 95, "every PUBACK once the flow took its messages")
        assert mqtt.withheld_now == 0
    finally:
        journal.close()
        mqtt.close()
    with JournalReader(root, 0) as reader:
        rows = reader.read(released, 200)
    assert released == 73  # the first 74, in arrival order; the rest after them:
    assert [m.payload for _, m in rows] == [b for _, b in first + later][74:]
    assert session_backlog(mosquitto, "edge-batched") == 0
