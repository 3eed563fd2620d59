"""MqttSource against a real mosquitto, fed by the real mosquitto_pub, inside real dataflows."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink

from connectors.devices.mosquitto import Mosquitto
from connectors.devices.mqtt import MqttSettings, MqttSource
from operators.records import RawMessage

FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "keepalive_s": 5}


def settings(broker: Mosquitto, **kwargs: Any) -> MqttSettings:
    return MqttSettings(url=broker.url, **{**FAST, **kwargs})


def build_flow(
    source: MqttSource, out: list[RawMessage], *, name: str = "mqtt", slow_s: float = 0.0
) -> Dataflow:
    flow = Dataflow(name)
    stream = op.input("in", flow, source)
    if slow_s:

        def slow(msg: RawMessage) -> RawMessage:
            time.sleep(slow_s)
            return msg

        stream = op.map("slow", stream, slow)
    op.output("out", stream, TestingSink(out))
    return flow


def payloads(out: list[RawMessage]) -> list[str]:
    return [m.payload.decode() for m in out]


@pytest.fixture
def edge(
    run_flow: Callable[..., Any], wait_for: Callable[..., Any]
) -> Callable[..., tuple[MqttSource, list[RawMessage], Any]]:
    """Start an MqttSource dataflow and wait until it is subscribed."""

    def start(
        cfg: MqttSettings, *, workers: int = 1, slow_s: float = 0.0, wait_ready: bool = True
    ) -> tuple[MqttSource, list[RawMessage], Any]:
        source = MqttSource(cfg)
        out: list[RawMessage] = []
        runner = run_flow(
            build_flow(source, out, slow_s=slow_s), workers=workers, stops=[source.stop]
        )
        if wait_ready:
            wait_for(
                lambda: len(source.partitions) == workers and source.ready,
                "the MQTT source to connect and subscribe",
            )
        return source, out, runner

    return start


# --- delivery through a real dataflow ------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("qos", [0, 1])
def test_messages_arrive_as_raw_messages(
    mosquitto: Mosquitto,
    mosquitto_pub: Any,
    edge: Any,
    wait_for: Any,
    tmp_path: Path,
    qos: int,
    protocol: str,
) -> None:
    cli_protocol = "mqttv5" if protocol == "5" else "mqttv311"
    source, out, runner = edge(
        settings(mosquitto, qos=qos, protocol=protocol, channels=("telemetry", "vibration"))
    )
    block = tmp_path / "block.bin"
    block.write_bytes(b"EVB1\x01\x01\x00\x00" + bytes(range(256)))
    before = datetime.now(UTC)

    mosquitto_pub(
        mosquitto,
        "v1/devices/pump-7/telemetry",
        message='{"temperature": 21.5}',
        qos=qos,
        protocol=cli_protocol,
    )
    mosquitto_pub(
        mosquitto,
        "v1/devices/fan-2/telemetry",
        message=b"\x00\xffraw",
        qos=qos,
        protocol=cli_protocol,
    )
    mosquitto_pub(
        mosquitto, "v1/devices/pump-7/vibration", file=block, qos=qos, protocol=cli_protocol
    )
    wait_for(lambda: len(out) >= 3, "3 messages in the sink")
    source.request_stop()
    runner.join()

    assert [(m.device, m.channel, m.transport, m.payload) for m in out] == [
        ("pump-7", "telemetry", "mqtt", b'{"temperature": 21.5}'),
        ("fan-2", "telemetry", "mqtt", b"\x00\xffraw"),
        ("pump-7", "vibration", "mqtt", block.read_bytes()),
    ]
    for msg in out:
        assert isinstance(msg, RawMessage)
        assert msg.received_at.tzinfo is UTC
        assert before <= msg.received_at <= datetime.now(UTC)
    assert source.received == 3


def test_other_topics_and_channels_are_ignored_not_fatal(
    mosquitto: Mosquitto, mosquitto_pub: Any, edge: Any, wait_for: Any
) -> None:
    # A persistent session from an earlier run subscribed "vibration" too; this run only
    # wants "telemetry", and "+" also matches an empty device id.
    first, _, runner = edge(settings(mosquitto, channels=("telemetry", "vibration")))
    first.request_stop()
    runner.join()

    source, out, runner = edge(settings(mosquitto, channels=("telemetry",)))
    mosquitto_pub(mosquitto, "v1/devices/pump-7/vibration", message="old channel")
    mosquitto_pub(mosquitto, "v1/devices//telemetry", message="no device")
    mosquitto_pub(mosquitto, "v1/devices/pump-7/telemetry", message="good")
    wait_for(lambda: len(out) >= 1 and source.ignored >= 2, "1 message and 2 ignored")
    source.request_stop()
    runner.join()
    assert payloads(out) == ["good"]
    assert source.ignored == 2


# --- stop, outage, restart, sessions -------------------------------------------------------


def test_stop_drains_buffer_and_ends_dataflow_without_loss(
    mosquitto: Mosquitto, mosquitto_pub: Any, edge: Any, wait_for: Any
) -> None:
    sent = [f"m-{i}" for i in range(400)]
    cfg = settings(mosquitto, buffer_messages=50, client_id="drain")
    source, out, runner = edge(cfg, slow_s=0.003)
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=sent)
    wait_for(lambda: len(out) >= 60, "the dataflow to get going")
    source.request_stop()
    runner.join()

    # Everything the source took from the broker reached the sink before EOF ...
    assert len(out) == source.received
    assert len(out) < len(sent), "stop came too late to test draining"
    first = payloads(out)
    # ... and what it did not take stayed in the persistent session.
    source2, out2, runner2 = edge(cfg)
    wait_for(lambda: len(out2) >= len(sent) - len(first), "the rest of the messages")
    source2.request_stop()
    runner2.join()
    assert first + payloads(out2) == sent


def test_broker_down_at_start_then_connects(
    mosquitto_factory: Callable[..., Mosquitto], mosquitto_pub: Any, edge: Any, wait_for: Any
) -> None:
    broker = mosquitto_factory()  # not started yet
    source, out, runner = edge(settings(broker), wait_ready=False)
    wait_for(lambda: source.connect_failures >= 2, "failed connection attempts")
    assert runner.alive
    broker.start()
    wait_for(lambda: source.ready, "the source to connect once the broker is up")
    mosquitto_pub(broker, "v1/devices/late/telemetry", message="hello")
    wait_for(lambda: out, "a message")
    source.request_stop()
    runner.join()
    assert payloads(out) == ["hello"]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_broker_restart_mid_stream_loses_nothing(
    mosquitto: Mosquitto, mosquitto_pub: Any, edge: Any, wait_for: Any, protocol: str
) -> None:
    batch_a = [f"a-{i}" for i in range(300)]
    batch_b = [f"b-{i}" for i in range(300)]
    source, out, runner = edge(
        settings(mosquitto, protocol=protocol, reconnect_min_s=0.5, reconnect_max_s=1.0),
        slow_s=0.0005,
    )
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=batch_a)
    mosquitto.restart()  # part of batch A is still queued in the broker or in flight
    connects_while_b_published = source.connects
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=batch_b)
    wait_for(lambda: set(payloads(out)) >= set(batch_a + batch_b), "all of A and B", 20)
    source.request_stop()
    runner.join()

    got = Counter(payloads(out))
    duplicates = sum(n - 1 for n in got.values())
    assert set(got) == set(batch_a + batch_b)
    assert connects_while_b_published == 1, "B was published after the source reconnected"
    assert source.connects == 2
    # QoS 1 may redeliver what was in flight at the restart, never more than that window.
    assert duplicates <= 20, f"{duplicates} duplicates"


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_persistent_session_receives_messages_published_while_down(
    mosquitto: Mosquitto, mosquitto_pub: Any, edge: Any, wait_for: Any, protocol: str
) -> None:
    cfg = settings(mosquitto, protocol=protocol, client_id=f"edge-{protocol}")
    source, _, runner = edge(cfg)
    source.request_stop()
    runner.join()

    sent = [f"offline-{i}" for i in range(50)]
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=sent)

    source, out, runner = edge(cfg)
    wait_for(lambda: len(out) >= len(sent), "the messages queued while the edge was down")
    source.request_stop()
    runner.join()
    assert payloads(out) == sent


def test_clean_session_does_not_receive_messages_published_while_down(
    mosquitto: Mosquitto, mosquitto_pub: Any, edge: Any, wait_for: Any
) -> None:
    cfg = settings(mosquitto, persistent=False, client_id="clean")
    source, _, runner = edge(cfg)
    source.request_stop()
    runner.join()
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", message="missed")

    source, out, runner = edge(cfg)
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", message="live")
    wait_for(lambda: out, "the live message")
    time.sleep(0.2)
    source.request_stop()
    runner.join()
    assert payloads(out) == ["live"]


# --- push-back and scale-out ---------------------------------------------------------------


def test_bounded_buffer_pushes_back_and_loses_nothing(
    mosquitto: Mosquitto, mosquitto_pub: Any, edge: Any, wait_for: Any
) -> None:
    sent = [f"s-{i}" for i in range(300)]
    source, out, runner = edge(settings(mosquitto, buffer_messages=10), slow_s=0.002)
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=sent)
    wait_for(lambda: len(out) >= len(sent), "all messages through the slow flow")
    source.request_stop()
    runner.join()
    assert payloads(out) == sent
    assert source.high_water == 10  # the bound was reached, so the paho thread waited
    assert max(p.buffered for p in source.partitions) == 0


def test_two_workers_share_the_subscription_exactly_once(
    mosquitto: Mosquitto, mosquitto_pub: Any, edge: Any, wait_for: Any
) -> None:
    sent = [f"w-{i}" for i in range(200)]
    source, out, runner = edge(settings(mosquitto, client_id="pool"), workers=2)
    assert sorted(p.client_id for p in source.partitions) == ["pool-0", "pool-1"]
    mosquitto_pub(mosquitto, "v1/devices/d/telemetry", lines=sent)
    wait_for(lambda: len(out) >= len(sent), "all messages over both workers")
    time.sleep(0.2)
    source.request_stop()
    runner.join()
    assert sorted(payloads(out)) == sorted(sent)
    assert Counter(payloads(out)).most_common(1)[0][1] == 1
    assert all(p.received > 0 for p in source.partitions), "one worker got nothing"


# --- authentication ------------------------------------------------------------------------


@pytest.fixture
def secured_broker(mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path) -> Mosquitto:
    passwd = tmp_path / "passwd"
    for user, password in (("edge", "edge-secret"), ("pump-7", "token-7")):
        cmd = ["mosquitto_passwd", "-b", str(passwd), user, password]
        if not passwd.exists():
            cmd.insert(1, "-c")
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)
    acl = tmp_path / "acl"
    acl.write_text(
        "user edge\ntopic read v1/devices/+/telemetry\ntopic read v1/devices/+/vibration\n"
        "pattern write v1/devices/%u/#\n"
    )
    return mosquitto_factory("secured", password_file=passwd, acl_file=acl).start()


def test_username_password_and_device_acl(
    secured_broker: Mosquitto,
    mosquitto_pub: Any,
    edge: Any,
    wait_for: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgesieve.mqtt")
    source, out, runner = edge(settings(secured_broker, username="edge", password="edge-secret"))
    creds = {"username": "pump-7", "password": "token-7"}
    mosquitto_pub(secured_broker, "v1/devices/pump-8/telemetry", message="spoofed", **creds)
    mosquitto_pub(secured_broker, "v1/devices/pump-7/telemetry", message="mine", **creds)
    with pytest.raises(RuntimeError, match="mosquitto_pub .* failed"):
        mosquitto_pub(
            secured_broker,
            "v1/devices/pump-7/telemetry",
            message="x",
            username="pump-7",
            password="wrong",
        )
    wait_for(lambda: out, "the device's own message")
    time.sleep(0.2)
    source.request_stop()
    runner.join()
    assert [(m.device, m.payload) for m in out] == [("pump-7", b"mine")]
    assert "edge-secret" not in caplog.text


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_wrong_password_keeps_retrying_without_crashing(
    secured_broker: Mosquitto,
    edge: Any,
    wait_for: Any,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgesieve.mqtt")
    cfg = settings(
        secured_broker,
        username="edge",
        password="not-the-secret",
        protocol=protocol,
        reconnect_min_s=0.02,
        reconnect_max_s=0.1,
    )
    source, out, runner = edge(cfg, wait_ready=False)
    wait_for(lambda: source.connect_failures >= 3, "several refused attempts")
    assert runner.alive and source.connects == 0
    source.request_stop()
    runner.join()
    assert out == []
    assert "refused the connection" in caplog.text
    assert "not-the-secret" not in caplog.text
    assert "not-the-secret" not in repr(cfg)


# --- settings ------------------------------------------------------------------------------


def test_settings_defaults_and_url_parts() -> None:
    cfg = MqttSettings()
    assert (cfg.host, cfg.port, cfg.qos, cfg.protocol) == ("127.0.0.1", 1883, 1, "3.1.1")
    assert MqttSettings(url="mqtt://broker.local").port == 1883
    assert MqttSettings(url="mqtt://[::1]:1999").host == "::1"
    assert MqttSettings(channels=["telemetry", "telemetry"]).channels == ("telemetry",)  # type: ignore[arg-type]
    assert cfg.topics(shared=False) == ["v1/devices/+/telemetry"]
    assert cfg.topics(shared=True) == ["$share/edgesieve/v1/devices/+/telemetry"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "http://127.0.0.1:1883"}, r"url scheme must be 'mqtt', got 'http://.*hint: write"),
        ({"url": "mqtts://127.0.0.1:8883"}, r"scheme must be 'mqtt'.*TLS \(mqtts://\) is not"),
        ({"url": "127.0.0.1:1883"}, r"url scheme must be 'mqtt'"),
        ({"url": 1883}, r"MqttSettings.url: url must be a string, got 1883"),
        ({"url": "mqtt://:1883"}, r"url has no host, got 'mqtt://:1883'"),
        ({"url": "mqtt://h:0"}, r"port must be a number in 1..65535, got 'mqtt://h:0'"),
        ({"url": "mqtt://h:70000"}, r"port must be a number in 1..65535"),
        ({"url": "mqtt://h:abc"}, r"port must be a number in 1..65535"),
        ({"url": "mqtt://u:pw@h:1883"}, r"credentials in the URL are not accepted.*username="),
        ({"url": "mqtt://h:1883/topic"}, r"must not have a path, query or fragment"),
        ({"qos": 2}, r"MqttSettings.qos: QoS must be 0 or 1, got 2; hint"),
        ({"qos": True}, r"QoS must be 0 or 1, got True"),
        ({"protocol": "3.1"}, r"protocol must be '3.1.1' or '5', got '3.1'; hint"),
        ({"protocol": 5}, r"protocol must be '3.1.1' or '5', got 5; hint: write the MQTT"),
        ({"channels": "telemetry"}, r"channels must be a tuple of channel names, got 'telem"),
        ({"channels": ()}, r"channels must not be empty"),
        ({"channels": ("v1/x",)}, r"channel 'v1/x' must be a non-empty name without '/'"),
        ({"channels": ("#",)}, r"channel '#' must be a non-empty name"),
        ({"client_id": ""}, r"client_id must be a non-empty string, got ''"),
        ({"share_group": "a/b"}, r"share_group must not contain '/', '\+' or '#'"),
        ({"share_group": ""}, r"share_group must be a non-empty string"),
        ({"username": ""}, r"username must not be empty.*None for anonymous"),
        ({"username": 7}, r"username must be a string, got 7"),
        ({"password": "pw"}, r"password was given without a username"),
        ({"session_expiry_s": -1}, r"session_expiry_s must be an integer in 0..4294967295"),
        ({"keepalive_s": 0}, r"keepalive_s must be an integer in 1..65535, got 0; hint: seconds"),
        ({"reconnect_min_s": 0}, r"reconnect_min_s must be a number in 0.001..3600, got 0"),
        ({"reconnect_max_s": 0.1}, r"reconnect_max_s must be a number in 0.2..86400, got 0.1"),
        ({"buffer_messages": 0}, r"buffer_messages must be an integer in 1..10000000, got 0; hint"),
        ({"max_batch": 1.5}, r"max_batch must be an integer"),
    ],
)
def test_settings_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MqttSettings(**kwargs)


def test_source_rejects_other_settings_objects() -> None:
    with pytest.raises(TypeError, match=r"settings must be MqttSettings, got dict; hint"):
        MqttSource({"url": "mqtt://127.0.0.1:1883"})  # type: ignore[arg-type]


def test_stop_before_connecting_ends_at_once(edge: Any, mosquitto_factory: Any) -> None:
    broker = mosquitto_factory()  # never started
    source, out, runner = edge(settings(broker), wait_ready=False)
    source.stop.set()
    started = time.monotonic()
    runner.join()
    assert time.monotonic() - started < 3
    assert out == []


def test_stop_event_passed_in_is_used(mosquitto: Mosquitto, run_flow: Any) -> None:
    stop = threading.Event()
    source = MqttSource(settings(mosquitto), stop=stop)
    runner = run_flow(build_flow(source, []), stops=[stop])
    stop.set()
    runner.join()
    assert source.stop is stop
