"""MqttSink against a real mosquitto, watched by a real subscribing client, in real dataflows."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
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
from connectors.sinks.mqtt import MqttSink, alarm_id, alarm_payload
from operators.threshold import Alarm

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
    op.output("alarms", op.key_on("by_device", stream, lambda item: item[0]), sink(cfg))
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
    part = sink(settings(mosquitto, protocol=protocol, qos=0)).build_part("alarms", "p0", None)
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
        "mqtt publisher pub-p0: not connected to the broker, and QoS 0 messages are not "
        "queued; dropped a message for v1/devices/pump-7/alarms (it is still in the local "
        "outputs)"
    ) in caplog.text
    assert "not delivered before shutdown" not in caplog.text


def test_each_partition_publishes_with_its_own_client_id(
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
    assert all(f" as pool-p{n} " in log for n in range(4))


def test_messages_queued_while_the_broker_is_down_are_sent_once_it_is_back(
    mosquitto: Mosquitto, watch: Any, wait_for: Any
) -> None:
    watcher = watch(mosquitto)
    mosquitto.stop()
    part = sink(settings(mosquitto)).build_part("alarms", "p0", None)
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
    part = sink(settings(broker, qos=1), max_queued=3).build_part("alarms", "p0", None)
    part.write_batch([("pump-7", f"a{i}") for i in range(5)])
    assert (part.published, part.dropped) == (3, 2)
    assert (
        caplog.text.count(
            "mqtt publisher pub-p0: outgoing queue full while the broker is unreachable; "
            "dropped a message for v1/devices/pump-7/alarms (it is still in the local outputs)"
        )
        == 2
    )
    part.close()
    assert "mqtt publisher pub-p0: 3 message(s) not delivered before shutdown" in caplog.text


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
    part = sink(cfg).build_part("alarms", "p0", None)
    part.write_batch([("pump-7", "never")])
    part.close()
    assert "pub-p0: 1 message(s) not delivered before shutdown" in caplog.text
    assert "not-the-secret" not in caplog.text
    assert watcher.messages == []


def test_sink_rejects_other_settings_objects() -> None:
    with pytest.raises(
        TypeError,
        match=r"^MqttSink: settings must be MqttSettings, got dict; hint: MqttSink\(MqttSettings",
    ):
        sink({"url": "mqtt://127.0.0.1:1883"})  # type: ignore[arg-type]


# --- at-least-once and alarm ids -----------------------------------------------------------


def test_unacknowledged_messages_are_snapshotted_and_published_again_on_resume(
    mosquitto: Mosquitto, watch: Any, wait_for: Any
) -> None:
    watcher = watch(mosquitto)
    mosquitto.stop()
    part = sink(settings(mosquitto)).build_part("alarms", "p0", None)
    part.write_batch([("pump-7", "queued 1"), ("pump-7", "queued 2")])
    state = part.snapshot()
    assert state == {
        "version": 1,
        "pending": [
            ["v1/devices/pump-7/alarms", b"queued 1", 1],
            ["v1/devices/pump-7/alarms", b"queued 2", 1],
        ],
    }
    part.close()  # as if the edge died: the messages never left
    mosquitto.start()
    resumed = sink(settings(mosquitto)).build_part("alarms", "p0", state)
    assert resumed.resumed == 2
    wait_for(lambda: len(watcher.messages) >= 2, "the messages published again on resume")
    wait_for(lambda: resumed.outstanding == 0, "the broker to acknowledge them")
    assert resumed.snapshot() is None
    resumed.close()
    assert [payload for _, payload in watcher.messages] == [b"queued 1", b"queued 2"]


def test_a_resume_from_another_snapshot_format_is_refused(mosquitto: Mosquitto) -> None:
    with pytest.raises(ValueError, match=r"mqtt publisher pub-p0: cannot resume from snapshot"):
        sink(settings(mosquitto)).build_part("alarms", "p0", {"version": 99})


def alarms() -> list[Alarm]:
    ts = datetime(2025, 11, 22, 8, 0, tzinfo=UTC)
    return [
        Alarm("pump-7", ts, "iso_zone_c", "raised", "warning", 3.1, "pump-7/x"),
        Alarm("pump-7", ts, "iso_zone_c", "raised", "warning", 3.3, "pump-7/y"),
        Alarm(
            "pump-7", ts + timedelta(seconds=5), "iso_zone_c", "cleared", "warning", 1.0, "pump-7/x"
        ),
    ]


def test_alarm_payloads_carry_an_id_that_is_the_same_in_every_run(
    mosquitto: Mosquitto, watch: Any, wait_for: Any
) -> None:
    watcher = watch(mosquitto)
    cfg = settings(mosquitto)
    for _ in range(2):
        flow = Dataflow("alarm_ids")
        stream = op.input("in", flow, TestingSource(alarms()))
        publish = MqttSink(
            cfg, topic=lambda a: f"v1/devices/{a.device}/alarms", payload=alarm_payload
        )
        op.output("alarms", op.key_on("by_device", stream, lambda a: a.device), publish)
        run_main(flow)
    wait_for(lambda: len(watcher.messages) >= 6, "both runs' alarms")
    payloads = [json.loads(payload) for _, payload in watcher.messages]
    # Messages queued before a client connects may arrive out of order: compare by key.
    first, second = (
        sorted(run, key=lambda p: (p["ts"], p["key"])) for run in (payloads[:3], payloads[3:])
    )
    assert first == second  # ids included: the same alarm gets the same id in every run
    assert [p["id"] for p in first] == [
        alarm_id(a.device, a.key, a.rule, a.ts, a.state) for a in alarms()
    ]
    assert len({p["id"] for p in first}) == 3  # two axes at the same ts are two alarms
    assert all(re.fullmatch(r"[0-9a-f]{32}", p["id"]) for p in first)
    assert first[0] == {
        "id": first[0]["id"],
        "ts": 1763798400000,
        "rule": "iso_zone_c",
        "state": "raised",
        "severity": "warning",
        "value": 3.1,
        "key": "pump-7/x",
    }


def test_alarm_id_is_a_digest_of_device_key_rule_ts_and_state() -> None:
    ts = datetime(2025, 11, 22, 8, 0, tzinfo=UTC)
    base = alarm_id("pump-7", "pump-7/x", "r", ts, "raised")
    assert base == alarm_id(
        "pump-7", "pump-7/x", "r", ts.astimezone(timezone(timedelta(hours=2))), "raised"
    )
    others = [
        alarm_id("pump-8", "pump-7/x", "r", ts, "raised"),
        alarm_id("pump-7", "pump-7/y", "r", ts, "raised"),
        alarm_id("pump-7", "pump-7/x", "s", ts, "raised"),
        alarm_id("pump-7", "pump-7/x", "r", ts + timedelta(microseconds=1), "raised"),
        alarm_id("pump-7", "pump-7/x", "r", ts, "cleared"),
        alarm_id("pump-7", "pump-7/xr", "", ts, "raised"),  # lengths keep fields apart
    ]
    assert len({base, *others}) == 7
    with pytest.raises(ValueError, match=r"alarm_id: ts must be a timezone-aware datetime"):
        alarm_id("pump-7", "k", "r", datetime(2025, 1, 1), "raised")  # noqa: DTZ001
