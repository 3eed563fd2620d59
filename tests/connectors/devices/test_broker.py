"""Loopback brokers: the real mosquitto process and the embedded amqtt broker."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from connectors.devices.broker import start_broker
from connectors.devices.embedded import EmbeddedBroker
from connectors.devices.mosquitto import Mosquitto
from flows.cli import main


class PahoPair:
    """A paho subscriber on ``#`` and a paho publisher, both connected."""

    def __init__(self, port: int, client_prefix: str = "t") -> None:
        self.got: list[paho.MQTTMessage] = []
        subscribed = threading.Event()
        self.sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_prefix}-sub")
        self.sub.on_connect = lambda c, *_: c.subscribe("t/#", 1)
        self.sub.on_subscribe = lambda *_: subscribed.set()
        self.sub.on_message = lambda _c, _u, m: self.got.append(m)
        self.sub.connect("127.0.0.1", port)
        self.sub.loop_start()
        assert subscribed.wait(5), "subscriber did not get its SUBACK"
        self.pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{client_prefix}-pub")
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        info = self.pub.publish(topic, payload, qos=qos)
        info.wait_for_publish(5)
        assert info.is_published()

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


@pytest.fixture
def paho_pair() -> Iterator[Callable[[int], PahoPair]]:
    pairs: list[PahoPair] = []

    def make(port: int) -> PahoPair:
        pair = PahoPair(port)
        pairs.append(pair)
        return pair

    yield make
    for pair in pairs:
        pair.close()


# --- Mosquitto -----------------------------------------------------------------------------


def test_mosquitto_serves_paho_and_restarts_on_same_port_with_persistence(
    mosquitto: Mosquitto, paho_pair: Callable[[int], PahoPair], wait_for: Any
) -> None:
    assert Mosquitto.available()
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert mosquitto.running
    pair = paho_pair(mosquitto.port)
    pair.publish("t/q0", b"zero", 0)
    pair.publish("t/q1", b"one", 1)
    pair.pub.publish("t/retained", b"kept", qos=1, retain=True).wait_for_publish(5)
    wait_for(lambda: len(pair.got) >= 3, "3 messages")
    assert [(m.topic, m.payload, m.qos) for m in pair.got[:2]] == [
        ("t/q0", b"zero", 0),
        ("t/q1", b"one", 1),
    ]
    pair.close()

    port = mosquitto.port
    mosquitto.restart()
    assert mosquitto.port == port
    assert (mosquitto.data_dir / "persistence" / "mosquitto.db").is_file()
    # The retained message survived the restart: persistence works.
    after = paho_pair(mosquitto.port)
    wait_for(lambda: after.got, "the retained message after restart")
    assert (after.got[0].topic, after.got[0].payload, after.got[0].retain) == (
        "t/retained",
        b"kept",
        True,
    )


def test_mosquitto_context_manager_stops_the_process(tmp_path: Path) -> None:
    if not Mosquitto.available():
        pytest.skip("mosquitto not installed")
    with Mosquitto(tmp_path / "b") as broker:
        port = broker.port
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    assert not broker.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    broker.stop()  # idempotent


def test_mosquitto_start_fails_with_log_tail_when_port_is_taken(
    mosquitto_factory: Callable[..., Mosquitto],
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        broker = mosquitto_factory(port=blocker.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"(?s)exited with code \d+.*log tail:.*in use"):
            broker.start()
        assert time.monotonic() - started < 10
        assert not broker.running


def test_mosquitto_start_fails_clearly_without_the_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Mosquitto, "binary", staticmethod(lambda: None))
    assert not Mosquitto.available()
    with pytest.raises(RuntimeError, match=r"'mosquitto' binary was not found.*hint: install"):
        Mosquitto(tmp_path).start()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"port": 70_000}, r"Mosquitto: port must be 0..65535 \(0 = pick a free one\), got 70000"),
        ({"port": -1}, r"port must be 0..65535"),
        ({"host": "0.0.0.0"}, r"Mosquitto: host must be a loopback address, got '0.0.0.0'; hint"),
        (
            {"password_file": Path("/nonexistent/passwd")},
            r"password_file '/nonexistent/passwd' does not exist; hint: create it",
        ),
        ({"acl_file": Path("/nonexistent/acl")}, r"acl_file '/nonexistent/acl' does not exist"),
    ],
)
def test_mosquitto_argument_errors(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mosquitto(tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"port": 70_000}, r"EmbeddedBroker: port must be 0..65535"),
        ({"host": "10.0.0.1"}, r"EmbeddedBroker: host must be a loopback address, got '10.0.0.1'"),
    ],
)
def test_embedded_broker_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmbeddedBroker(**kwargs)


# --- EmbeddedBroker ------------------------------------------------------------------------


def test_embedded_broker_paho_pub_sub_qos0_and_qos1(
    embedded_broker: EmbeddedBroker, paho_pair: Callable[[int], PahoPair], wait_for: Any
) -> None:
    assert embedded_broker.url == f"mqtt://127.0.0.1:{embedded_broker.port}"
    pair = paho_pair(embedded_broker.port)
    for i in range(20):
        pair.publish(f"t/{i}", f"q0-{i}".encode(), 0)
        pair.publish(f"t/{i}", f"q1-{i}".encode(), 1)
    wait_for(lambda: len(pair.got) >= 40, "40 messages through amqtt")
    payloads = sorted(m.payload.decode() for m in pair.got)
    assert payloads == sorted([f"q0-{i}" for i in range(20)] + [f"q1-{i}" for i in range(20)])
    assert all(m.qos == 1 for m in pair.got if m.payload.startswith(b"q1"))


def test_embedded_broker_stops_and_restarts(embedded_broker: EmbeddedBroker) -> None:
    port = embedded_broker.port
    embedded_broker.restart()
    assert embedded_broker.port == port and embedded_broker.running
    embedded_broker.stop()
    assert not embedded_broker.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


# --- start_broker --------------------------------------------------------------------------


def test_start_broker_prefers_mosquitto(tmp_path: Path) -> None:
    if not Mosquitto.available():
        pytest.skip("mosquitto not installed")
    broker = start_broker(tmp_path)
    try:
        assert isinstance(broker, Mosquitto) and broker.running
    finally:
        broker.stop()


def test_start_broker_falls_back_to_embedded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    paho_pair: Callable[[int], PahoPair],
    wait_for: Any,
) -> None:
    monkeypatch.setattr(Mosquitto, "available", staticmethod(lambda: False))
    broker = start_broker(tmp_path)
    try:
        assert isinstance(broker, EmbeddedBroker) and broker.running
        pair = paho_pair(broker.port)
        pair.publish("t/x", b"x", 1)
        wait_for(lambda: pair.got, "a message through the fallback broker")
    finally:
        broker.stop()


def _without_amqtt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: importing amqtt (or any of its modules) fails as if it were not installed."""
    for name in [n for n in sys.modules if n == "amqtt" or n.startswith("amqtt.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "amqtt", None)
    monkeypatch.delitem(sys.modules, "connectors.devices.embedded", raising=False)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (
            "embedded",
            r"^start_broker \(kind='embedded'\): the embedded MQTT broker needs amqtt, which is "
            r"not installed; hint: pip install 'edgesieve\[demo\]'$",
        ),
        (
            "auto",
            r"^start_broker \(kind='auto'\): mosquitto is not installed and the embedded MQTT "
            r"broker needs amqtt, .*hint: pip install 'edgesieve\[demo\]' or apt-get install",
        ),
    ],
)
def test_start_broker_without_amqtt_names_the_demo_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, match: str
) -> None:
    _without_amqtt(monkeypatch)
    monkeypatch.setattr(Mosquitto, "available", staticmethod(lambda: False))
    with pytest.raises(ValueError, match=match):
        start_broker(tmp_path, kind=kind)  # type: ignore[arg-type]


def test_the_cli_reports_a_missing_amqtt_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without_amqtt(monkeypatch)
    argv = ["demo", "--broker", "embedded", "--seconds", "1", "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith("hint: pip install 'edgesieve[demo]'\n") and err.count("\n") == 1, err
