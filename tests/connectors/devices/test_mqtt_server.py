"""The ThingsBoard MQTT endpoint: real paho clients against the real server and a real journal."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from connectors.codecs.decode import decode
from connectors.devices.ingress import Ingress
from connectors.devices.journal import Journal, JournalReader, JournalSettings
from connectors.devices.mqtt_server import MqttServer
from connectors.devices.registry import Device, DeviceRegistry
from operators.records import DeadLetter, RawMessage
from tests.conftest import TOKEN_1, TOKEN_2, free_port, write_file

GW_TOKEN = "tok-gateway-1-Xy7Pq2Lm"
REGISTRY = DeviceRegistry(
    [
        Device("pump-1", TOKEN_1),
        Device("fan-2", TOKEN_2),
        Device("gw-1", GW_TOKEN, ("line-1-*",)),
    ]
)


class Served:
    """An :class:`MqttServer` on an ephemeral loopback port, on its own loop thread."""

    def __init__(self, root: Path, journal: Any = None, **kwargs: Any) -> None:
        self.root = root
        self.journal = journal or Journal(JournalSettings(root=root / "journal", partitions=1))
        self.ingress = Ingress(journal=self.journal)
        self.server = MqttServer("127.0.0.1:0", REGISTRY, self.ingress, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())
        self.port = self.server.port

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=20)

    def close(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.journal.close()

    def journaled(self) -> list[RawMessage]:
        with JournalReader(self.root / "journal", 0) as reader:
            return [msg for _, msg in reader.read(-1, 1000)]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.close()


class Client:
    """A real paho client (VERSION2 callbacks) logged in with a token."""

    def __init__(
        self, port: int, token: str | None, *, keepalive: int = 60, protocol: int = mqtt.MQTTv311
    ) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=protocol)
        if token is not None:
            self.c.username_pw_set(token)
        self.connack: Any = None
        self.connected = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.got = threading.Event()
        self.granted: list[Any] = []
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_disconnect = lambda *a: self.disconnected.set()
        self.c.connect("127.0.0.1", port, keepalive=keepalive)
        self.c.loop_start()
        assert self.connected.wait(10), "no CONNACK"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.messages.append((msg.topic, msg.payload))
        self.got.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
        self.granted = [c.value for c in codes]
        self.subscribed.set()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 10) -> Any:
        info = self.c.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout)
        return info

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(params=[mqtt.MQTTv311, mqtt.MQTTv5], ids=["3.1.1", "5"])
def clients(request: pytest.FixtureRequest) -> Iterator[Callable[..., Client]]:
    """Real paho clients; every test using them runs with MQTT 3.1.1 and with MQTT 5."""
    made: list[Client] = []

    def make(port: int, token: str | None, **kwargs: Any) -> Client:
        client = Client(port, token, protocol=request.param, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    """Whether ``text`` is logged within 2 s (the server logs on its own thread)."""
    deadline = time.monotonic() + 2
    while text not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    return text in caplog.text


def dead_reason(msg: RawMessage) -> str:
    result = decode(msg)
    assert isinstance(result, DeadLetter)
    return result.reason


# --- devices --------------------------------------------------------------------------------


def test_token_login_and_telemetry_attributes_journaled_under_the_device(
    served: Served, clients: Callable[..., Client]
) -> None:
    client = clients(served.port, TOKEN_1)
    assert not client.connack.is_failure
    assert client.publish("v1/devices/me/telemetry", '{"temperature": 21.5}').is_published()
    assert client.publish("v1/devices/me/attributes", '{"fw": "1.2"}').is_published()
    assert client.publish("v1/devices/me/logs", "ERROR disk full").is_published()
    client.publish("v1/devices/me/telemetry", '{"t": 1}', qos=0)
    client.publish("v1/devices/me/telemetry", '{"t": 2}').wait_for_publish(10)  # after the QoS 0
    got = [(m.device, m.channel, m.transport, m.payload) for m in served.journaled()]
    assert got == [
        ("pump-1", "telemetry", "mqtt_server", b'{"temperature": 21.5}'),
        ("pump-1", "attributes", "mqtt_server", b'{"fw": "1.2"}'),
        ("pump-1", "logs", "mqtt_server", b"ERROR disk full"),
        ("pump-1", "telemetry", "mqtt_server", b'{"t": 1}'),
        ("pump-1", "telemetry", "mqtt_server", b'{"t": 2}'),
    ]


@pytest.mark.parametrize("token", ["tok-nobody-000000", None])
def test_unknown_or_missing_token_is_refused_bad_credentials(
    served: Served,
    clients: Callable[..., Client],
    token: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "edgesieve.mqtt_server")
    client = clients(served.port, token)
    assert client.connack.is_failure
    assert str(client.connack) == "Bad user name or password"
    assert served.server.refused_connections == 1
    assert served.journaled() == []
    assert logged(
        caplog,
        "refused: unknown access token (CONNACK 4); set the MQTT username to the device's "
        "token from devices.yaml",
    )
    assert "tok-nobody" not in caplog.text


def test_malformed_payload_is_acknowledged_and_kept_as_a_dead_letter(
    served: Served, clients: Callable[..., Client]
) -> None:
    client = clients(served.port, TOKEN_1)
    assert client.publish("v1/devices/me/telemetry", b"{not json").is_published()
    [msg] = served.journaled()
    assert (msg.device, msg.channel, msg.payload) == ("pump-1", "telemetry", b"{not json")
    assert dead_reason(msg).startswith("telemetry: not valid JSON")
    assert served.ingress.rejected == 1


def test_a_topic_outside_the_api_is_kept_as_a_dead_letter(
    served: Served, clients: Callable[..., Client]
) -> None:
    client = clients(served.port, TOKEN_1)
    assert client.publish("v1/devices/me/claim", b'{"secretKey": "x"}').is_published()
    [msg] = served.journaled()
    assert dead_reason(msg) == (
        "topic 'v1/devices/me/claim' is not part of the ThingsBoard device API; "
        "publish to v1/devices/me/telemetry, v1/devices/me/attributes or v1/devices/me/logs"
    )


def test_subscriptions_to_attribute_and_rpc_topics_are_granted(
    served: Served, clients: Callable[..., Client]
) -> None:
    client = clients(served.port, TOKEN_1)
    topics = [
        ("v1/devices/me/attributes", 1),
        ("v1/devices/me/attributes/response/+", 1),
        ("v1/devices/me/rpc/request/+", 1),
        ("v1/devices/me/rpc/response/+", 0),
        ("v1/devices/pump-1/telemetry", 1),
    ]
    client.c.subscribe(topics)
    assert client.subscribed.wait(10)
    assert client.granted == [1, 1, 1, 0, 0x80]


def test_get_session_limits_is_answered_in_thingsboards_shape(
    served: Served, clients: Callable[..., Client]
) -> None:
    client = clients(served.port, TOKEN_1)
    client.c.subscribe("v1/devices/me/rpc/response/+", 1)
    assert client.subscribed.wait(10)
    request = {"method": "getSessionLimits", "params": {"timeout": 5000}}
    client.publish("v1/devices/me/rpc/request/7", json.dumps(request))
    assert client.got.wait(10)
    [(topic, payload)] = client.messages
    assert topic == "v1/devices/me/rpc/response/7"
    assert json.loads(payload) == {
        "maxPayloadSize": 1024 * 1024,
        "maxInflightMessages": 16,
        "rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""},
    }
    client.got.clear()
    client.publish("v1/devices/me/rpc/request/8", '{"method": "reboot", "params": {}}')
    assert client.got.wait(10)
    assert client.messages[1] == (
        "v1/devices/me/rpc/response/8",
        b'{"error": "RPC method \'reboot\' is not supported by the edge; only '
        b'getSessionLimits is answered"}',
    )
    assert served.journaled() == []  # RPCs are not data


def test_qos_2_closes_the_connection(served: Served, clients: Callable[..., Client]) -> None:
    client = clients(served.port, TOKEN_1)
    client.c.publish("v1/devices/me/telemetry", b'{"t": 1}', qos=2)
    assert client.disconnected.wait(10)
    assert served.journaled() == []


def _connect_packet(token: str, keepalive: int) -> bytes:
    def s(text: str) -> bytes:
        return struct.pack("!H", len(text)) + text.encode()

    body = s("MQTT") + bytes((4, 0x82)) + struct.pack("!H", keepalive) + s("raw-1") + s(token)
    return bytes((0x10, len(body))) + body


def test_keepalive_silence_closes_the_connection_after_one_and_a_half_times(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edgesieve.mqtt_server")
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(_connect_packet(TOKEN_1, keepalive=1))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        waited = time.monotonic() - start
    assert 1.4 <= waited < 3.0
    assert served.server.keepalive_timeouts == 1
    assert logged(caplog, "disconnected: nothing received for 1.5s (1.5 x keepalive)")


def test_another_mqtt_version_is_refused_with_unacceptable_protocol(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        packet = bytearray(_connect_packet(TOKEN_1, keepalive=10))
        packet[8] = 3  # protocol level: MQTT 3.1
        sock.sendall(bytes(packet))
        assert sock.recv(4) == b"\x20\x02\x00\x01"
        assert sock.recv(1) == b""


# --- journal faults: PUBACK only after the commit ------------------------------------------


class _HeldCommits:
    """The real journal, with commits whose callbacks wait for ``release`` (fault injection)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self.release = threading.Event()
        self.pushback: str | None = None
        self.appended = 0

    def append(self, msg: RawMessage, done: Any, token: Any = None, **kwargs: Any) -> bool:
        def held(tokens: Any, outcomes: Any) -> None:
            threading.Thread(target=lambda: (self.release.wait(20), done(tokens, outcomes))).start()

        self.appended += 1
        return self._journal.append(msg, held, token, **kwargs)

    def admit(self, device: str | None = None) -> str | None:
        return self.pushback or self._journal.admit(device)

    def close(self) -> None:
        self._journal.close()


def test_puback_is_sent_only_after_the_commit(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    held = _HeldCommits(Journal(JournalSettings(root=tmp_path / "journal", partitions=1)))
    served = Served(tmp_path, held)
    try:
        client = clients(served.port, TOKEN_1)
        info = client.c.publish("v1/devices/me/telemetry", b'{"t": 1}', qos=1)
        time.sleep(0.5)
        assert not info.is_published()
        held.release.set()
        info.wait_for_publish(10)
        assert info.is_published()
        assert [m.payload for m in served.journaled()] == [b'{"t": 1}']
    finally:
        served.close()


def test_one_connection_has_at_most_max_inflight_messages_waiting_for_their_commit(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    held = _HeldCommits(Journal(JournalSettings(root=tmp_path / "journal", partitions=1)))
    served = Served(tmp_path, held, max_inflight=4)
    try:
        client = clients(served.port, TOKEN_1)
        infos = [
            client.c.publish("v1/devices/me/telemetry", f'{{"t": {i}}}', qos=1) for i in range(10)
        ]
        time.sleep(0.8)
        assert held.appended == 4  # the fifth waits unread in the socket
        other = clients(served.port, TOKEN_2)  # another device is not held up by it
        assert other.c.publish("v1/devices/me/telemetry", b'{"t": 0}', qos=0).rc == 0
        time.sleep(0.3)
        assert held.appended == 5
        held.release.set()
        for info in infos:
            info.wait_for_publish(10)
        assert [m.payload for m in served.journaled() if m.device == "pump-1"] == [
            f'{{"t": {i}}}'.encode() for i in range(10)
        ]
    finally:
        served.close()


def test_a_refusing_journal_withholds_the_puback_and_the_message_is_retried(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    held = _HeldCommits(Journal(JournalSettings(root=tmp_path / "journal", partitions=1)))
    held.release.set()
    held.pushback = "journal full: 10 payload bytes held of journal.max_bytes=10"
    served = Served(tmp_path, held)
    try:
        client = clients(served.port, TOKEN_1)
        info = client.c.publish("v1/devices/me/telemetry", b'{"t": 1}', qos=1)
        time.sleep(0.6)
        assert not info.is_published()
        assert served.journaled() == []
        held.pushback = None
        info.wait_for_publish(10)
        assert info.is_published()
        assert [m.payload for m in served.journaled()] == [b'{"t": 1}']  # once
    finally:
        served.close()


# --- gateways -------------------------------------------------------------------------------


def test_gateway_connects_and_sends_telemetry_for_two_devices(
    served: Served, clients: Callable[..., Client]
) -> None:
    gw = clients(served.port, GW_TOKEN)
    assert gw.publish("v1/gateway/connect", '{"device": "line-1-a", "type": "pump"}').is_published()
    telemetry = {
        "line-1-a": [{"ts": 1763800000000, "values": {"t": 1.5}}],
        "line-1-b": [{"ts": 1763800000000, "values": {"t": 2.5}}],
    }
    assert gw.publish("v1/gateway/telemetry", json.dumps(telemetry)).is_published()
    assert gw.publish("v1/gateway/attributes", '{"line-1-a": {"model": "X1"}}').is_published()
    assert gw.publish("v1/gateway/disconnect", '{"device": "line-1-a"}').is_published()
    got = sorted((m.device, m.channel, m.transport, m.payload) for m in served.journaled())
    assert got == [
        ("line-1-a", "attributes", "gateway:gw-1", b'{"model":"X1"}'),
        ("line-1-a", "telemetry", "gateway:gw-1", b'[{"ts":1763800000000,"values":{"t":1.5}}]'),
        ("line-1-b", "telemetry", "gateway:gw-1", b'[{"ts":1763800000000,"values":{"t":2.5}}]'),
    ]
    for msg in served.journaled():
        if msg.channel == "telemetry":
            assert not isinstance(decode(msg), DeadLetter)


def test_a_device_the_gateway_may_not_speak_for_is_a_dead_letter_and_the_rest_is_kept(
    served: Served, clients: Callable[..., Client]
) -> None:
    gw = clients(served.port, GW_TOKEN)
    telemetry = {"line-1-a": {"t": 1}, "pump-1": {"t": 666}}
    assert gw.publish("v1/gateway/telemetry", json.dumps(telemetry)).is_published()
    assert gw.publish("v1/gateway/connect", '{"device": "line-2-x"}').is_published()
    kept, refused, refused_connect = served.journaled()
    assert (kept.device, kept.channel, kept.payload) == ("line-1-a", "telemetry", b'{"t":1}')
    assert (refused.device, refused.transport) == ("gw-1", "gateway:gw-1")
    assert refused.payload == b'{"pump-1":{"t":666}}'
    assert dead_reason(refused) == (
        "gateway 'gw-1' may not speak for device 'pump-1'; its devices.yaml patterns are "
        "[line-1-*]; hint: add a pattern matching it"
    )
    assert "may not speak for device 'line-2-x'" in dead_reason(refused_connect)


def test_gateway_payload_problems_are_dead_letters(
    served: Served, clients: Callable[..., Client]
) -> None:
    gw = clients(served.port, GW_TOKEN)
    gw.publish("v1/gateway/telemetry", "[1, 2]")
    gw.publish("v1/gateway/connect", '{"name": "line-1-a"}')
    gw.publish("v1/gateway/telemetry", '{"line 1/a": {"t": 1}}')
    gw.publish("v1/gateway/claim", "{}")
    reasons = [dead_reason(m) for m in served.journaled()]
    assert reasons == [
        "v1/gateway/telemetry: expected a JSON object of device names, got list; "
        'e.g. {"Dev A": [{"ts": 1763800000000, "values": {"temp": 21.5}}]}',
        'v1/gateway/connect: expected a JSON object with a "device" name, got dict; '
        'e.g. {"device": "Dev A", "type": "default"}',
        "gateway 'gw-1' sent device name 'line 1/a', which is not a valid device id "
        "(1-128 letters, digits, '.', '_', ':' or '-')",
        "topic 'v1/gateway/claim' is not part of the gateway API; use v1/gateway/connect, "
        "disconnect, telemetry or attributes",
    ]


def test_a_plain_device_on_gateway_topics_is_a_dead_letter(
    served: Served, clients: Callable[..., Client]
) -> None:
    client = clients(served.port, TOKEN_1)
    assert client.publish("v1/gateway/telemetry", '{"line-1-a": {"t": 1}}').is_published()
    [msg] = served.journaled()
    assert (msg.device, msg.transport) == ("pump-1", "mqtt_server")
    assert dead_reason(msg) == (
        "device 'pump-1' is not a gateway but published to v1/gateway/telemetry; hint: give it "
        "`gateway: {devices: [...]}` in devices.yaml, or publish to v1/devices/me/telemetry, "
        "v1/devices/me/attributes or v1/devices/me/logs"
    )


def test_gateway_subscriptions_are_granted_to_gateways_only(
    served: Served, clients: Callable[..., Client]
) -> None:
    gw = clients(served.port, GW_TOKEN)
    gw.c.subscribe([("v1/gateway/attributes", 1), ("v1/gateway/rpc", 1)])
    assert gw.subscribed.wait(10) and gw.granted == [1, 1]
    device = clients(served.port, TOKEN_1)
    device.c.subscribe("v1/gateway/rpc", 1)
    assert device.subscribed.wait(10) and device.granted == [0x80]


# --- the whole edge -------------------------------------------------------------------------


def test_edgesieve_run_with_mqtt_server_stores_a_thingsboard_devices_telemetry(
    tmp_path: Path,
) -> None:
    data = tmp_path / "var"
    port = free_port()
    devices = write_file(
        tmp_path, "devices.yaml", f'devices:\n  - {{id: pump-1, token: "{TOKEN_1}"}}\n'
    )
    config = write_file(
        tmp_path,
        "edge.yaml",
        f"""
data_dir: {data}
devices: {devices}
transports:
  mqtt_server: {{listen: "127.0.0.1:{port}"}}
telemetry:
  window: {{length: 3600}}
parquet: {{max_file_age: 3600}}
""",
    )
    cmd = [sys.executable, "-m", "flows.cli", "run", "flows.telemetry", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[3], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        client = None
        while client is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                client = Client(port, TOKEN_1)
            except (ConnectionRefusedError, AssertionError):
                time.sleep(0.2)
        assert client is not None, "the edge did not listen"
        for i in range(5):
            body = {"ts": 1763800000000 + i * 1000, "values": {"t": float(i)}}
            assert client.publish("v1/devices/me/telemetry", json.dumps(body)).is_published()
        assert client.publish("v1/devices/me/claim", b"{}").is_published()
        client.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    glob = str(data / "parquet" / "telemetry_points" / "**" / "*.parquet")
    rows = duckdb.sql(f"select device, value from read_parquet('{glob}') order by ts").fetchall()
    assert rows == [("pump-1", float(i)) for i in range(5)]
    glob = str(data / "parquet" / "dead_letters" / "**" / "*.parquet")
    dead = duckdb.sql(f"select device, transport, reason from read_parquet('{glob}')").fetchall()
    assert dead == [
        (
            "pump-1",
            "mqtt_server",
            "topic 'v1/devices/me/claim' is not part of the ThingsBoard device API; "
            "publish to v1/devices/me/telemetry, v1/devices/me/attributes or v1/devices/me/logs",
        )
    ]


def test_mqtt_5_connack_carries_the_limits(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        packet = bytearray(_connect_packet(TOKEN_1, keepalive=10))
        packet[8] = 5
        packet[1] += 1
        packet.insert(12, 0)  # no CONNECT properties
        sock.sendall(bytes(packet))
        limit = 1024 * 1024 + 64 * 1024
        props = b"\x21\x00\x10" + b"\x24\x01" + b"\x27" + struct.pack("!I", limit)
        assert sock.recv(64) == b"\x20" + bytes((3 + len(props), 0, 0, len(props))) + props


def _raw_login(port: int, token: str, client_id: str = "raw-1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    packet = bytearray(_connect_packet(token, keepalive=30))
    packet[14:19] = client_id.encode()  # same length as "raw-1"
    sock.sendall(bytes(packet))
    return sock


def test_a_token_over_its_connections_gets_server_unavailable(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edgesieve.mqtt_server")
    socks = [_raw_login(served.port, TOKEN_1, f"raw-{i}") for i in range(5)]
    try:
        answers = [sock.recv(4) for sock in socks]
        assert answers == [b"\x20\x02\x00\x00"] * 4 + [b"\x20\x02\x00\x03"]
        assert socks[4].recv(1) == b""
        other = _raw_login(served.port, TOKEN_2, "raw-9")  # other devices still connect
        assert other.recv(4) == b"\x20\x02\x00\x00"
        other.close()
    finally:
        for sock in socks:
            sock.close()
    assert logged(
        caplog,
        "pump-1: too many connections (4 of this token, 4 in all; "
        "transports.mqtt_server.max_device_connections / max_connections) (CONNACK 3)",
    )


def test_the_same_client_id_again_closes_the_older_connection(served: Served) -> None:
    first = _raw_login(served.port, TOKEN_1, "raw-1")
    assert first.recv(4) == b"\x20\x02\x00\x00"
    second = _raw_login(served.port, TOKEN_1, "raw-1")
    assert second.recv(4) == b"\x20\x02\x00\x00"
    assert first.recv(1) == b""
    first.close()
    second.close()


def test_a_packet_over_the_limit_closes_the_connection_before_its_body(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "edgesieve.mqtt_server")
    served = Served(tmp_path)
    served.ingress.max_payload_bytes = 100
    try:
        sock = _raw_login(served.port, TOKEN_1)
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        size = 100 + 64 * 1024 + 1
        sock.sendall(b"\x32" + bytes((size & 0x7F | 0x80, (size >> 7) & 0x7F | 0x80, size >> 14)))
        assert sock.recv(1) == b""
        sock.close()
    finally:
        served.close()
    assert logged(
        caplog,
        f"a packet of {size} bytes is over the limit of {size - 1} (max_payload_bytes plus "
        "the topic); split the payload into smaller messages",
    )


def test_qos_2_is_logged_with_a_hint(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "edgesieve.mqtt_server")
    sock = _raw_login(served.port, TOKEN_1)
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    topic = b"v1/devices/me/telemetry"
    body = struct.pack("!H", len(topic)) + topic + b"\x00\x01" + b'{"t": 1}'
    sock.sendall(bytes((0x34, len(body))) + body)
    assert sock.recv(1) == b""
    sock.close()
    time.sleep(0.2)
    assert logged(
        caplog, "PUBLISH with QoS 2, which the edge does not serve; publish with QoS 0 or 1"
    )


def test_a_taken_port_is_an_error_naming_the_address(taken_port: int) -> None:
    server = MqttServer(f"127.0.0.1:{taken_port}", REGISTRY, Ingress())
    with pytest.raises(OSError) as info:
        asyncio.run(server.start())
    assert info.value.strerror == (
        f"MqttServer: cannot listen on '127.0.0.1:{taken_port}': Address already in use; hint: "
        f"another process may hold port {taken_port} (pick another, or 0 for an ephemeral "
        "port), or '127.0.0.1' is not an address of this machine"
    )
    assert not server.running


@pytest.mark.parametrize("key", ["max_inflight", "max_connections", "max_device_connections"])
@pytest.mark.parametrize("value", [0, True, 1.5])
def test_bounds_must_be_positive_integers(key: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        MqttServer("127.0.0.1:0", REGISTRY, Ingress(), **{key: value})
    assert str(info.value) == f"MqttServer: {key} must be a positive integer (got {value!r})"


def test_connections_and_refusals_reach_the_ingest_metrics(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    from flows.accounting import IngestCollector
    from flows.ingest_stats import MeteredJournal, StatsWriter

    journal = MeteredJournal(JournalSettings(root=tmp_path / "journal", partitions=1))
    served = Served(tmp_path, journal)
    try:
        clients(served.port, TOKEN_1)
        clients(served.port, "tok-nobody-000000")
        StatsWriter(journal, served.ingress, None, served.server).write()
        metrics = {
            f.name: f.samples[0].value for f in IngestCollector(journal.root, lambda: 0).collect()
        }
    finally:
        served.close()
    assert metrics["edgesieve_mqtt_server_connections"] == 1
    assert metrics["edgesieve_mqtt_server_refused_connections"] == 1
    assert metrics["edgesieve_mqtt_server_keepalive_timeouts"] == 0


def _publish_packet(payload: bytes, packet_id: int, *, dup: bool) -> bytes:
    topic = b"v1/devices/me/telemetry"
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id) + payload
    return bytes((0x32 | (0x08 if dup else 0), len(body))) + body


def test_a_publish_sent_again_with_dup_is_stored_once(served: Served) -> None:
    sock = _raw_login(served.port, TOKEN_1)
    try:
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        sock.sendall(_publish_packet(b'{"t": 1}', 1, dup=False))
        assert sock.recv(4) == b"\x40\x02\x00\x01"
        sock.sendall(_publish_packet(b'{"t": 1}', 1, dup=True))  # its PUBACK was "lost"
        assert sock.recv(4) == b"\x40\x02\x00\x01"
        sock.sendall(_publish_packet(b'{"t": 1}', 2, dup=False))  # the same reading, sent anew
        assert sock.recv(4) == b"\x40\x02\x00\x02"
    finally:
        sock.close()
    assert [m.payload for m in served.journaled()] == [b'{"t": 1}', b'{"t": 1}']


def test_a_stop_sends_the_pubacks_of_messages_committed_meanwhile(
    tmp_path: Path, clients: Callable[..., Client]
) -> None:
    held = _HeldCommits(Journal(JournalSettings(root=tmp_path / "journal", partitions=1)))
    served = Served(tmp_path, held)
    try:
        client = clients(served.port, TOKEN_1)
        info = client.c.publish("v1/devices/me/telemetry", b'{"t": 1}', qos=1)
        time.sleep(0.3)
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(), served.loop)
        time.sleep(0.3)
        assert not info.is_published() and not stopping.done()  # the stop waits for the commit
        held.release.set()
        stopping.result(10)
        info.wait_for_publish(5)  # sent before the stop returned; the client reads it meanwhile
        assert info.is_published()
        assert not served.server.running
    finally:
        served.close()
