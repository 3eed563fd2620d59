"""Firmware written for ThingsBoard works unchanged: ThingsBoard's own Python SDK against the edge.

A real ``edgesieve run flows.edge`` (flow process and ingest child) listens on
loopback ports with its HTTP device API and its ThingsBoard-semantics MQTT
endpoint (``transports.mqtt_server``). ``TBHTTPDevice``, ``TBDeviceMqttClient``
and ``TBGatewayMqttClient`` from ``tb-mqtt-client`` (in their own virtualenv,
see tests/thingsboard.py) send to it; after a clean stop the rows are read back
from the Parquet outputs (and edge.duckdb). Then the bad-input and wrong-token
matrix: with the SDK where it shows the error, with curl and paho where it
does not.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import (
    ROOT,
    TOKEN_1,
    TOKEN_2,
    coap_client,
    curl,
    free_port,
    query_parquet,
    wait_for,
    write_devices,
)
from tests.thingsboard import TBSdk

pytestmark = pytest.mark.slow

EDGE = [sys.executable, "-m", "flows.cli", "run", "flows.edge"]
START_S = 60.0
STOP_S = 30.0
T0_MS = 1_763_800_000_000
"""A fixed event time (2025-11-22T08:26:40Z) for readings that carry their ``ts``."""

GATEWAY_TOKEN = "tok-gw-1-Pq7sV2nB"
REGISTRY = f"""\
devices:
  - {{id: pump-1, token: "{TOKEN_1}"}}
  - {{id: fan-2, token: "{TOKEN_2}"}}
  - {{id: gw-1, token: "{GATEWAY_TOKEN}", gateway: {{devices: ["line-1-*"]}}}}
"""
"""Two devices and a gateway that may speak for the devices named ``line-1-*``."""

INGEST_STARTED = re.compile(rb"ingest process started \(pid (\d+)\)")


class TBEdge:
    """``edgesieve run flows.edge`` with the HTTP API and the ThingsBoard MQTT endpoint."""

    def __init__(self, tmp_path: Path) -> None:
        self.http_port = free_port()
        self.mqtt_port = free_port()
        self.coap_port = free_port()
        self.data = tmp_path / "var"
        self.config = tmp_path / "edge.yaml"
        self.config.write_text(
            f"data_dir: {self.data}\n"
            f"devices: {write_devices(tmp_path, REGISTRY)}\n"
            "transports:\n"
            f'  http: {{listen: "127.0.0.1:{self.http_port}"}}\n'
            f'  coap: {{listen: "127.0.0.1:{self.coap_port}"}}\n'
            f'  mqtt_server: {{listen: "127.0.0.1:{self.mqtt_port}"}}\n'
        )
        self.log = tmp_path / "edge.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL of the HTTP device API (what ``TBHTTPDevice`` takes as host)."""
        return f"http://127.0.0.1:{self.http_port}"

    def _readies(self) -> int:
        return self.log.read_bytes().count(b"ingest: ready") if self.log.exists() else 0

    def _wait_ready(self, readies: int) -> None:
        assert self.proc is not None
        wait_for(
            lambda: self._readies() > readies or self.proc.poll() is not None,
            "the edge's ingest process to be ready",
            START_S,
        )
        assert self.proc.poll() is None, f"the edge exited at start:\n{self.tail()}"

    def start(self) -> TBEdge:
        readies = self._readies()
        self.proc = subprocess.Popen(
            [*EDGE, "--config", str(self.config)],
            cwd=ROOT,
            start_new_session=True,  # its own process group, stopped and killed whole
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        self._wait_ready(readies)
        return self

    def restart_ingest(self) -> None:
        """Kill the ingest child (``kill -9``); wait until the edge restarted it and it is ready."""
        started = INGEST_STARTED.findall(self.log.read_bytes())
        assert started, f"no ingest process in the log:\n{self.tail()}"
        readies = self._readies()
        os.kill(int(started[-1]), signal.SIGKILL)
        self._wait_ready(readies)

    def stop(self) -> None:
        """A clean stop (SIGTERM to the process group); it must exit 0."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the edge did not stop within {STOP_S:g}s:\n{self.tail()}")
        assert code == 0, f"the edge exited with {code}:\n{self.tail()}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    # --- the outputs, read back after the stop ----------------------------------------------

    def points(self, device: str) -> set[tuple[str, int, float]]:
        """(key, ts in Unix ms, value) of ``device``'s rows in ``telemetry_points``."""
        rows = query_parquet(
            self.data,
            "telemetry_points",
            f"select key, epoch_ms(ts), value from {{src}} where device = '{device}'",
        )
        return {(key, int(ts), float(value)) for key, ts, value in rows}

    def attributes(self) -> dict[tuple[str, str], tuple[Any, str]]:
        """The latest (value decoded from its JSON text, source) per (device, key) in Parquet."""
        rows = query_parquet(
            self.data,
            "device_attributes",
            "select device, key, arg_max(value, updated_at), arg_max(source, updated_at) "
            "from {src} group by device, key",
        )
        return {(device, key): (json.loads(value), source) for device, key, value, source in rows}

    def duckdb_attributes(self) -> dict[tuple[str, str], Any]:
        """The latest value per (device, key) in edge.duckdb's ``device_attributes`` table."""
        with duckdb.connect(str(self.data / "edge.duckdb"), read_only=True) as db:
            rows = db.sql(
                "select device, key, arg_max(value, updated_at) from device_attributes "
                "group by device, key"
            ).fetchall()
        return {(device, key): json.loads(value) for device, key, value in rows}

    def dead_letters(self) -> list[tuple[str, str, str]]:
        """(device, transport, reason) of every dead letter."""
        return [
            tuple(row)
            for row in query_parquet(
                self.data, "dead_letters", "select device, transport, reason from {src}"
            )
        ]


@pytest.fixture
def edge(tmp_path: Path) -> Any:
    edge = TBEdge(tmp_path).start()
    yield edge
    edge.kill()


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


# --- TBHTTPDevice ------------------------------------------------------------------------------

HTTP_DEVICE = """
from datetime import datetime, timezone
from tb_device_http import TBHTTPDevice
device = TBHTTPDevice(params["url"], params["token"])
connected = device.connect()  # posts {} to /api/v1/{token}/telemetry and needs a 200
if connected:
    at = lambda ms: datetime.fromtimestamp(ms / 1000, timezone.utc)
    device.send_telemetry({"temp": 20.0}, timestamp=at(params["ts"]), queued=False)
    device.send_telemetry({"temp": 31.0, "hum": 40.0}, timestamp=at(params["ts"] + 1000), queued=False)
    device.send_attributes({"fw_version": "1.2.3", "serial": 7, "config": {"rate": 5}})
    device.send_attributes({"fw_version": "1.2.4"})  # the latest value wins
    device.stop_publish_worker()
say({"connected": connected})
"""


def test_tb_http_device_connects_and_sends_telemetry_and_attributes(
    tb_sdk: TBSdk, edge: TBEdge
) -> None:
    result = tb_sdk.run(HTTP_DEVICE, url=edge.url, token=TOKEN_1, ts=T0_MS)
    edge.stop()
    assert result == {"connected": True}
    assert edge.points("pump-1") == {
        ("temp", T0_MS, 20.0),
        ("temp", T0_MS + 1000, 31.0),
        ("hum", T0_MS + 1000, 40.0),
    }  # the connection test's {} stored nothing
    attributes = edge.attributes()
    assert {k: v for k, (v, _source) in attributes.items()} == {
        ("pump-1", "fw_version"): "1.2.4",
        ("pump-1", "serial"): 7,
        ("pump-1", "config"): {"rate": 5},
    }
    assert all(source for _value, source in attributes.values()), attributes
    assert edge.duckdb_attributes() == {k: v for k, (v, _source) in attributes.items()}


# --- TBDeviceMqttClient ------------------------------------------------------------------------

MQTT_DEVICE = """
from tb_device_mqtt import TBDeviceMqttClient, TBPublishInfo
client = TBDeviceMqttClient(params["host"], port=params["port"], username=params["token"])
limits, connects = session_limits(client), connack_codes(client)
client.connect(min_reconnect_delay=1, timeout=10)
wait_until(client.is_connected, "the CONNACK")
wait_until(lambda: limits, "the answer to getSessionLimits")
pushed = []  # attribute updates the edge sends down: none (it has no shared attributes)
client.subscribe_to_all_attributes(lambda content, *_: pushed.append(content))
sent = [
    published(client.send_telemetry({"ts": params["ts"], "values": {"temp": 20.0}})),
    published(client.send_telemetry({"hum": 40.0})),  # a plain dict: the edge's receive time
    published(client.send_attributes({"fw_version": "1.2.3", "serial": 7})),
]
say({"limits": limits[0], "sent": sent, "connects": connects})
hear()  # the test restarts the edge's ingest process
wait_until(lambda: len([c for c in connects if c == 0]) >= 2 and client.is_connected(),
           "the reconnect", 30)
client.subscribe_to_all_attributes(lambda content, *_: pushed.append(content))  # lost on disconnect
qos0 = client.send_telemetry({"ts": params["ts"] + 1000, "values": {"temp": 30.0}},
                             quality_of_service=0).get()  # no PUBACK at QoS 0: sent is all
sent = [
    published(client.send_telemetry([{"ts": params["ts"] + 2000, "values": {"temp": 45.0}},
                                      {"ts": params["ts"] + 3000, "values": {"temp": 60.0}}])),
    published(client.send_attributes({"fw_version": "1.2.4"})),
]
client.disconnect()
client.stop()
say({"sent": sent, "qos0": qos0, "connects": connects, "pushed": pushed,
     "success": TBPublishInfo.TB_ERR_SUCCESS})
"""

OK = {"rc": 0, "acked": True}
"""What ``published()`` reports for a send the edge PUBACKed (``TB_ERR_SUCCESS`` is 0)."""


def test_tb_mqtt_device_sends_telemetry_and_attributes_and_reconnects_after_an_ingest_restart(
    tb_sdk: TBSdk, edge: TBEdge
) -> None:
    before = now_ms()
    script = tb_sdk.start(
        MQTT_DEVICE, host="127.0.0.1", port=edge.mqtt_port, token=TOKEN_1, ts=T0_MS
    )
    try:
        first = script.next()
        assert first["connects"] == [0]
        assert first["sent"] == [OK, OK, OK]
        # getSessionLimits is answered with the edge's limits, as ThingsBoard does
        assert isinstance(first["limits"].get("rateLimits"), dict), first["limits"]
        edge.restart_ingest()
        script.tell("go on")
        last = script.finish()
    finally:
        script.kill()
    after = now_ms()
    edge.stop()
    assert last["success"] == 0
    assert last["sent"] == [OK, OK]
    assert last["qos0"] == 0
    assert last["connects"][0] == 0 and last["connects"][-1] == 0
    # a device's own attributes are not echoed back on v1/devices/me/attributes (the SDK would
    # take an echoed fw_version for a firmware update and start downloading)
    assert last["pushed"] == []
    points = edge.points("pump-1")
    assert {p for p in points if p[0] == "temp"} == {
        ("temp", T0_MS, 20.0),
        ("temp", T0_MS + 1000, 30.0),  # QoS 0
        ("temp", T0_MS + 2000, 45.0),
        ("temp", T0_MS + 3000, 60.0),
    }
    (hum,) = [p for p in points if p[0] == "hum"]
    assert hum[2] == 40.0 and before <= hum[1] <= after  # stamped on receipt
    assert {k: v for k, (v, _source) in edge.attributes().items()} == {
        ("pump-1", "fw_version"): "1.2.4",
        ("pump-1", "serial"): 7,
    }


# --- TBGatewayMqttClient -----------------------------------------------------------------------

GATEWAY = """
from tb_gateway_mqtt import TBGatewayMqttClient
gateway = TBGatewayMqttClient(params["host"], port=params["port"], username=params["token"])
limits = session_limits(gateway)
gateway.connect(timeout=10)
wait_until(gateway.is_connected, "the CONNACK")
wait_until(lambda: limits, "the answer to getSessionLimits")
ts = params["ts"]
sent = [
    # the gateway is a device too: the IoT Gateway sends its own statistics this way
    published(gateway.send_telemetry({"ts": ts, "values": {"connected_devices": 2.0}})),
    published(gateway.gw_connect_device("line-1-press", "press")),
    published(gateway.gw_connect_device("line-1-oven", "oven")),
    published(gateway.gw_send_telemetry("line-1-press", [
        {"ts": ts, "values": {"pressure": 101.0}},
        {"ts": ts + 1000, "values": {"pressure": 180.0}},
    ])),
    published(gateway.gw_send_telemetry("line-1-oven", {"ts": ts, "values": {"heat": 200.0}})),
    published(gateway.gw_send_attributes("line-1-press", {"model": "P-400", "max_bar": 250})),
    published(gateway.gw_send_attributes("line-1-oven", {"model": "O-2"})),
    published(gateway.gw_disconnect_device("line-1-press")),
    published(gateway.gw_disconnect_device("line-1-oven")),
]
# a device name outside the gateway's patterns: refused to a dead letter
outside = [
    published(gateway.gw_connect_device("line-2-saw", "saw")),
    published(gateway.gw_send_telemetry("line-2-saw", {"ts": ts, "values": {"rpm": 3000.0}})),
]
gateway.disconnect()
gateway.stop()
say({"sent": sent, "outside": outside, "limits": limits[0]})
"""


def test_tb_gateway_connects_two_devices_sends_for_both_and_disconnects(
    tb_sdk: TBSdk, edge: TBEdge
) -> None:
    result = tb_sdk.run(
        GATEWAY, host="127.0.0.1", port=edge.mqtt_port, token=GATEWAY_TOKEN, ts=T0_MS
    )
    edge.stop()
    assert result["sent"] == [OK] * 9
    assert "rateLimits" in result["limits"], result["limits"]
    assert edge.points("line-1-press") == {
        ("pressure", T0_MS, 101.0),
        ("pressure", T0_MS + 1000, 180.0),
    }
    assert edge.points("line-1-oven") == {("heat", T0_MS, 200.0)}
    assert edge.points("line-2-saw") == set()
    assert edge.points("gw-1") == {("connected_devices", T0_MS, 2.0)}
    attributes = {k: v for k, (v, _source) in edge.attributes().items()}
    sent_attributes = {
        ("line-1-press", "model"): "P-400",
        ("line-1-press", "max_bar"): 250,
        ("line-1-oven", "model"): "O-2",
    }
    # the edge may add its own (which gateway a device came through), never for line-2-saw
    assert sent_attributes.items() <= attributes.items(), attributes
    assert not [k for k in attributes if k[0] == "line-2-saw"], attributes
    refused = [reason for _device, _transport, reason in edge.dead_letters()]
    assert refused, "no dead letter for the device outside the gateway's patterns"
    for reason in refused:
        assert "line-2-saw" in reason and len(reason.splitlines()) == 1, reason


# --- wrong tokens and bad input ----------------------------------------------------------------

HTTP_WRONG_TOKEN = """
import requests
from tb_device_http import TBHTTPDevice
device = TBHTTPDevice(params["url"], params["token"])
connected = device.connect()
try:
    device.send_attributes({"fw_version": "1.2.3"})
    status = 200
except requests.HTTPError as exc:
    status = exc.response.status_code
say({"connected": connected, "attributes": status})
"""


def test_http_with_a_wrong_token_is_401_and_the_sdk_says_unauthorized(
    tb_sdk: TBSdk, edge: TBEdge
) -> None:
    script = tb_sdk.start(HTTP_WRONG_TOKEN, url=edge.url, token="not-a-token")
    assert script.finish() == {"connected": False, "attributes": 401}
    assert "Error 401: Unauthorized" in script.log  # what the SDK tells its user
    for channel in ("telemetry", "attributes"):
        for token in ("not-a-token", TOKEN_1.upper()):
            reply = curl(
                f"{edge.url}/api/v1/{token}/{channel}",
                b'{"fw_version": "1.2.3"}',
                headers=("Content-Type: application/json",),
            )
            assert reply.status == 401, (channel, token, reply)
            assert reply.error


BAD_HTTP = [
    ("telemetry", b'{"temp": ', 400),
    ("telemetry", b"[1, 2]", 400),
    ("attributes", b'{"fw_version": ', 400),
    ("attributes", b"[1, 2]", 400),  # attributes are one JSON object
    ("attributes", b'"1.2.3"', 400),
    ("telemetry", b"{}", 200),  # ThingsBoard's connection test: accepted, stores nothing
]


def test_http_answers_bad_input_with_400_and_a_one_line_reason(edge: TBEdge) -> None:
    for channel, body, status in BAD_HTTP:
        reply = curl(
            f"{edge.url}/api/v1/{TOKEN_1}/{channel}",
            body,
            headers=("Content-Type: application/json",),
        )
        assert reply.status == status, (channel, body, reply)
        if status == 400:
            assert reply.error and len(reply.error.splitlines()) == 1, reply.error
    edge.stop()
    assert edge.points("pump-1") == set()
    assert edge.attributes() == {}
    # each refused body is kept as a dead letter; the accepted {} is not one
    letters = edge.dead_letters()
    assert [(d, t) for d, t, _ in letters] == [("pump-1", "http")] * (len(BAD_HTTP) - 1), letters


def test_coap_takes_attributes_and_empty_telemetry_like_thingsboard(edge: TBEdge) -> None:
    api = f"coap://127.0.0.1:{edge.coap_port}/api/v1"
    assert coap_client(f"{api}/{TOKEN_2}/telemetry", text="{}").code == "2.04"
    assert coap_client(f"{api}/{TOKEN_2}/attributes", text='{"fw_version": "2.0"}').code == "2.04"
    assert coap_client(f"{api}/not-a-token/attributes", text='{"fw_version": "x"}').code == "4.01"
    bad = coap_client(f"{api}/{TOKEN_2}/attributes", text="[1, 2]")
    assert bad.code == "4.00" and bad.diagnostic, bad
    edge.stop()
    assert {k: v for k, (v, _source) in edge.attributes().items()} == {
        ("fan-2", "fw_version"): "2.0"
    }
    assert edge.points("fan-2") == set()


MQTT_WRONG_TOKEN = """
from tb_device_mqtt import TBDeviceMqttClient
client = TBDeviceMqttClient(params["host"], port=params["port"], username=params["token"])
codes = connack_codes(client)
client.connect(timeout=10)
wait_until(lambda: codes, "the CONNACK")
connected = client.is_connected()
client.disconnect()
client.stop()
say({"codes": codes, "connected": connected})
"""

NOT_AUTHORIZED = {134, 135}
"""CONNACK reason codes: bad user name or password, not authorized (MQTT 5; paho reports
MQTT 3.1.1's return codes 4 and 5 as these too)."""


def test_tb_mqtt_device_with_a_wrong_token_is_refused_at_connack(
    tb_sdk: TBSdk, edge: TBEdge
) -> None:
    # the SDK (MQTT 5) logs in with the token as user name; "" sends no user name at all
    for token in ("not-a-token", TOKEN_1.upper(), ""):
        result = tb_sdk.run(MQTT_WRONG_TOKEN, host="127.0.0.1", port=edge.mqtt_port, token=token)
        assert result["connected"] is False, (token, result)
        assert result["codes"] and set(result["codes"]) <= NOT_AUTHORIZED, (token, result)
    client, codes = paho_client(edge, "not-a-token", "wrong-token-311")
    try:
        assert codes[0] in NOT_AUTHORIZED, codes
        assert not client.is_connected()
    finally:
        client.loop_stop()
        client.disconnect()


def paho_client(edge: TBEdge, username: str, client_id: str) -> tuple[paho.Client, list[int]]:
    """A paho client (MQTT 3.1.1, as most device firmware) connected to ``mqtt_server``.

    Returns it with the list its CONNACK return codes are appended to.
    """
    codes: list[int] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.username_pw_set(username)
    client.on_connect = lambda _c, _u, _f, code, _p: codes.append(int(code.value))
    client.reconnect_delay_set(1, 2)
    client.connect("127.0.0.1", edge.mqtt_port)
    client.loop_start()
    wait_for(lambda: codes, f"the CONNACK for {client_id}")
    return client, codes


def publish(client: paho.Client, topic: str, payload: bytes) -> bool:
    """Publish at QoS 1; whether the edge PUBACKed within 10 s."""
    info = client.publish(topic, payload, qos=1)
    deadline = time.monotonic() + 10
    while not info.is_published() and time.monotonic() < deadline:
        time.sleep(0.01)
    return info.is_published()


def test_malformed_mqtt_payloads_go_to_dead_letters_and_lose_nothing_else(edge: TBEdge) -> None:
    device, codes = paho_client(edge, TOKEN_2, "fan-2-firmware")
    gateway, gw_codes = paho_client(edge, GATEWAY_TOKEN, "gw-1-firmware")
    good = {"ts": T0_MS, "values": {"temp": 5.0}}
    good_gw = {"line-1-oven": [{"ts": T0_MS, "values": {"heat": 150.0}}]}
    try:
        assert codes == [0] and gw_codes == [0]
        publish(device, "v1/devices/me/telemetry", b'{"temp": ')
        publish(device, "v1/devices/me/attributes", b"[1, 2]")  # attributes are a JSON object
        publish(gateway, "v1/gateway/telemetry", b'{"line-1-press": 5}')  # not [{ts, values}]
        assert publish(device, "v1/devices/me/telemetry", json.dumps(good).encode())
        assert publish(gateway, "v1/gateway/telemetry", json.dumps(good_gw).encode())
    finally:
        for client in (device, gateway):
            client.loop_stop()
            client.disconnect()
    edge.stop()
    assert edge.points("fan-2") == {("temp", T0_MS, 5.0)}
    assert edge.points("line-1-oven") == {("heat", T0_MS, 150.0)}
    letters = edge.dead_letters()
    devices = sorted(device for device, _transport, _reason in letters)
    # the gateway's bad message is the gateway's, or the device's it names
    assert devices in (["fan-2", "fan-2", "gw-1"], ["fan-2", "fan-2", "line-1-press"]), letters
    for _device, _transport, reason in letters:
        assert reason and len(reason.splitlines()) == 1 and len(reason) <= 200, reason
