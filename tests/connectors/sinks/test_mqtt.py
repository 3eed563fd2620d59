"""MqttSink against a real mosquitto, watched by a real subscribing client, in real dataflows."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bytewax.operators as op
import paho.mqtt.client as paho
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main, run_main
from paho.mqtt.enums import CallbackAPIVersion

from connectors.devices.mosquitto import Mosquitto
from connectors.devices.mqtt import MqttSettings
from connectors.sinks.mqtt import MqttSink

FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "keepalive_s": 5}
ALARMS = "v1/devices/+/alarms"
Item = tuple[str, str]


def settings(broker: Mosquitto, **kwargs: Any) -> MqttSettings:
    return MqttSettings(url=broker.url, **{**FAST, "client_id": "pub", **kwargs})


def sink(cfg: MqttSettings, **kwargs: Any) -> MqttSink:
    return MqttSink(
        cfg,
        topic=lambda item: f"v1/devices/{item[0]}/alarms",
        payload=lambda item: item[1].encode(),
        **kwargs,
    )


def publish_flow(items: list[Item], cfg: MqttSettings) -> Dataflow:
    flow = Dataflow("mqtt_sink")
    stream = op.input("in", flow, TestingSource(items))
    op.output("alarms", stream, sink(cfg))
    return flow


class Watcher:
    """A plain paho client that records every message on ``ALARMS``.

    A fixed client id and a persistent session, so messages published while
    it reconnects (after a broker restart) are kept for it.
    """

    def __init__(self, broker: Mosquitto, **credentials: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.subscriptions = 0
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="watcher", clean_session=False)
        if credentials:
            client.username_pw_set(credentials["username"], credentials["password"])
        client.reconnect_delay_set(0.05, 0.5)
        client.on_connect = lambda c, *_: c.subscribe(ALARMS, qos=1)
        client.on_subscribe = lambda *_: self._subscribed()
        client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        client.connect_async(broker.host, broker.port)
        client.loop_start()
        self.client = client

    def _subscribed(self) -> None:
        self.subscriptions += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watch(wait_for: Callable[..., Any]) -> Iterator[Callable[..., Watcher]]:
    """Subscribe a :class:`Watcher` to a broker and wait for its SUBACK."""
    watchers: list[Watcher] = []

    def start(broker: Mosquitto, **credentials: str) -> Watcher:
        watcher = Watcher(broker, **credentials)
        watchers.append(watcher)
        wait_for(lambda: watcher.subscriptions, "the watcher to subscribe")
        return watcher

    yield start
    for watcher in watchers:
        watcher.close()


# --- delivery ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_items_are_published_on_their_topics(
    mosquitto: Mosquitto, watch: Any, wait_for: Any, protocol: str
) -> None:
    watcher = watch(mosquitto)
    items = [("pump-7", f"alarm-{i}") for i in range(20)] + [("fan-2", "fan alarm")]
    run_main(publish_flow(items, settings(mosquitto, protocol=protocol)))
    wait_for(lambda: len(watcher.messages) >= len(items), "every published item")
    # The flow is faster than the connection: items queued before it is up may
    # arrive after later ones (see MqttSink).
    assert sorted(watcher.messages) == sorted(
        (f"v1/devices/{device}/alarms", text.encode()) for device, text in items
    )


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_qos_0_is_sent_when_connected_and_dropped_with_a_warning_when_not(
    mosquitto: Mosquitto,
    watch: Any,
    wait_for: Any,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="edgesieve.mqtt")
    watcher = watch(mosquitto)
    part = sink(settings(mosquitto, protocol=protocol, qos=0)).build("alarms", 0, 1)
    wait_for(lambda: part.connected, "the publisher to connect")
    part.write_batch([("pump-7", "up 1"), ("pump-7", "up 2")])
    wait_for(lambda: len(watcher.messages) >= 2, "the QoS 0 messages")
    mosquitto.stop()
    wait_for(lambda: not part.connected, "the publisher to notice the outage")
    part.write_batch([("pump-7", "while down")])
    part.close()
    assert (part.published, part.dropped, part.outstanding) == (2, 1, 0)
    assert [payload for _, payload in watcher.messages] == [b"up 1", b"up 2"]
    assert (
        "mqtt publisher pub-w0: not connected to the broker, and QoS 0 messages are not "
        "queued; dropped a message for v1/devices/pump-7/alarms (it is still in the local "
        "outputs)"
    ) in caplog.text
    assert "not delivered before shutdown" not in caplog.text


def test_each_worker_publishes_with_its_own_client_id(
    mosquitto: Mosquitto, watch: Any, wait_for: Any
) -> None:
    watcher = watch(mosquitto)
    items = [(f"d{i}", f"a{i}") for i in range(40)]
    cluster_main(
        publish_flow(items, settings(mosquitto, client_id="pool")),
        [],
        0,
        worker_count_per_proc=2,
    )
    wait_for(lambda: len(watcher.messages) >= len(items), "every item over both workers")
    assert sorted(watcher.messages) == sorted(
        (f"v1/devices/{device}/alarms", text.encode()) for device, text in items
    )
    log = mosquitto.log_tail()
    assert " as pool-w0 " in log and " as pool-w1 " in log


def test_messages_queued_while_the_broker_is_down_are_sent_once_it_is_back(
    mosquitto: Mosquitto, watch: Any, wait_for: Any
) -> None:
    watcher = watch(mosquitto)
    mosquitto.stop()
    part = sink(settings(mosquitto)).build("alarms", 0, 1)
    part.write_batch([("pump-7", "while down 1"), ("pump-7", "while down 2")])
    assert (part.published, part.dropped, part.outstanding) == (2, 0, 2)
    mosquitto.start()
    wait_for(lambda: len(watcher.messages) >= 2, "the queued messages after the outage")
    wait_for(lambda: part.outstanding == 0, "the broker to acknowledge them")
    part.close()
    assert [payload for _, payload in watcher.messages] == [b"while down 1", b"while down 2"]


def test_full_queue_drops_with_a_warning_and_close_reports_the_unsent(
    mosquitto_factory: Callable[..., Mosquitto], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgesieve.mqtt")
    broker = mosquitto_factory()  # never started
    part = sink(settings(broker, qos=1), max_queued=3).build("alarms", 0, 1)
    part.write_batch([("pump-7", f"a{i}") for i in range(5)])
    assert (part.published, part.dropped) == (3, 2)
    assert (
        caplog.text.count(
            "mqtt publisher pub-w0: outgoing queue full while the broker is unreachable; "
            "dropped a message for v1/devices/pump-7/alarms (it is still in the local outputs)"
        )
        == 2
    )
    part.close()
    assert "mqtt publisher pub-w0: 3 message(s) not delivered before shutdown" in caplog.text


# --- credentials and settings --------------------------------------------------------------


@pytest.fixture
def secured_broker(mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path) -> Mosquitto:
    passwd = tmp_path / "passwd"
    for user, password in (("edge", "edge-secret"), ("pump-7", "token-7")):
        cmd = ["mosquitto_passwd", "-b", str(passwd), user, password]
        if not passwd.exists():
            cmd.insert(1, "-c")
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)
    acl = tmp_path / "acl"
    acl.write_text("user edge\ntopic write v1/devices/+/alarms\npattern read v1/devices/%u/#\n")
    return mosquitto_factory("secured", password_file=passwd, acl_file=acl).start()


def test_publishes_with_username_and_password(
    secured_broker: Mosquitto, watch: Any, wait_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgesieve.mqtt")
    watcher = watch(secured_broker, username="pump-7", password="token-7")
    cfg = settings(secured_broker, username="edge", password="edge-secret")
    run_main(publish_flow([("pump-7", "yours"), ("pump-8", "not yours")], cfg))
    wait_for(lambda: watcher.messages, "the device's own alarm")
    assert watcher.messages == [("v1/devices/pump-7/alarms", b"yours")]
    assert "edge-secret" not in caplog.text


def test_wrong_password_publishes_nothing_and_reports_it_at_close(
    secured_broker: Mosquitto, watch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgesieve.mqtt")
    watcher = watch(secured_broker, username="pump-7", password="token-7")
    cfg = settings(secured_broker, username="edge", password="not-the-secret")
    part = sink(cfg).build("alarms", 0, 1)
    part.write_batch([("pump-7", "never")])
    part.close()
    assert "pub-w0: 1 message(s) not delivered before shutdown" in caplog.text
    assert "not-the-secret" not in caplog.text
    assert watcher.messages == []


def test_sink_rejects_other_settings_objects() -> None:
    with pytest.raises(
        TypeError,
        match=r"^MqttSink: settings must be MqttSettings, got dict; hint: MqttSink\(MqttSettings",
    ):
        sink({"url": "mqtt://127.0.0.1:1883"})  # type: ignore[arg-type]
