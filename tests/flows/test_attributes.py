"""Client attributes end to end: devices → journal → flow → Parquet, edge.duckdb and the cloud."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from connectors.cloud import CloudReceiver
from flows import edge, telemetry
from flows.api import Edge
from flows.config import parse_config
from operators.records import RawMessage
from tests.conftest import (
    DEVICES,
    TOKEN_1,
    TOKEN_2,
    coap_client,
    curl,
    free_port,
    query_parquet,
    write_devices,
)
from tests.flows.conftest import run_recorded, running

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 20, 12, 5, tzinfo=UTC)
SECRET = "cloud-secret-for-tests-0001"
EDGESIEVE = [sys.executable, "-m", "flows.cli"]


def attrs(device: str, at: datetime, doc: object, transport: str = "http") -> RawMessage:
    return RawMessage(device, "attributes", transport, at, json.dumps(doc).encode())


def recorded() -> list[RawMessage]:
    return [
        attrs("pump-1", T0, {"fw": "1.4.2", "interval_s": 30, "on": True}),
        attrs("pump-1", T1, {"fw": "1.5.0", "loc": {"lat": 52.1}}, "coap"),
        attrs("fan-2", T0, {}, "mqtt"),  # valid, nothing in it
        attrs("fan-2", T1, {"fw": None}, "mqtt"),  # a dead letter
        RawMessage("fan-2", "telemetry", "http", T0, b"{}"),  # a connection test: nothing
        RawMessage("fan-2", "telemetry", "http", T1, b'{"cfg": {"mode": "eco"}, "rpm": 1480}'),
    ]


def test_attributes_reach_parquet_duckdb_the_latest_view_and_the_cloud_once(tmp_path, runner):
    with CloudReceiver("127.0.0.1:0", tmp_path / "cloud.duckdb", {"edge-01": SECRET}) as rx:
        config = parse_config(
            {
                "edge_id": "edge-01",
                "data_dir": str(tmp_path / "edge"),
                "cloud": {"target": f"127.0.0.1:{rx.port}", "key": "edge-01", "secret": SECRET},
            }
        )
        flow = run_recorded(edge.build, config, recorded(), name="edge", runner=runner)
    data = tmp_path / "edge"
    # none of fan-2: {} holds none, and the message with a null is refused whole
    expected = [
        ("pump-1", "fw", '"1.4.2"', T0, "http"),
        ("pump-1", "interval_s", "30", T0, "http"),
        ("pump-1", "on", "true", T0, "http"),
        ("pump-1", "fw", '"1.5.0"', T1, "coap"),
        ("pump-1", "loc", '{"lat":52.1}', T1, "coap"),
    ]
    order = "order by updated_at, device, key"
    columns = "device, key, value, updated_at, source"
    assert sorted(
        query_parquet(data, "device_attributes", f"select {columns} from {{src}}")
    ) == sorted(expected)
    with duckdb.connect(str(data / "edge.duckdb"), read_only=True) as con:
        assert sorted(con.sql(f"select {columns} from device_attributes").fetchall()) == sorted(
            expected
        )
        latest = con.sql(
            f"select {columns} from device_attributes_latest order by device, key"
        ).fetchall()
    assert latest == [
        ("pump-1", "fw", '"1.5.0"', T1, "coap"),
        ("pump-1", "interval_s", "30", T0, "http"),
        ("pump-1", "loc", '{"lat":52.1}', T1, "coap"),
        ("pump-1", "on", "true", T0, "http"),
    ]
    with duckdb.connect(str(tmp_path / "cloud.duckdb"), read_only=True) as con:
        cloud = con.sql(f"select edge_id, {columns} from device_attributes {order}").fetchall()
    assert sorted(cloud) == sorted(("edge-01", *row) for row in expected)
    # the JSON object in telemetry went to telemetry_text as JSON text, the number to points
    text = query_parquet(data, "telemetry_text", "select device, key, value from {src}")
    assert text == [("fan-2", "cfg", '{"mode":"eco"}')]
    points = query_parquet(data, "telemetry_points", "select key, value from {src}")
    assert points == [("rpm", 1480.0)]
    letters = query_parquet(data, "dead_letters", "select device, transport, reason from {src}")
    assert letters == [
        (
            "fan-2",
            "mqtt",
            "attributes: value of 'fw' is null; send a string, number, boolean, object or array",
        )
    ]
    rep = flow.reports()["telemetry"]
    assert rep.messages_in == len(recorded())
    assert rep.wire_rows.get("device_attributes") == len(expected)


def test_a_flow_that_does_not_take_attributes_dead_letters_them(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})

    def build(e: Edge) -> None:
        e.output("telemetry_text", e.devices("in", channels=["telemetry", "attributes"]).text)

    run_recorded(build, config, [attrs("pump-1", T0, {"fw": "1"})], name="mine")
    letters = query_parquet(tmp_path, "dead_letters", "select reason, payload from {src}")
    assert letters == [("no step of flow 'mine' takes device attributes", b'{"fw":"1"}')]


def _config(tmp_path: Path, mosquitto) -> dict:
    return {
        "data_dir": str(tmp_path / "var"),
        "devices": str(write_devices(tmp_path, DEVICES)),
        "transports": {
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "coap": {"listen": f"127.0.0.1:{free_port()}"},
            "mqtt": {"url": mosquitto.url, "client_id": "attrs"},
        },
    }


def test_attributes_over_http_coap_and_mqtt_with_real_clients(
    tmp_path, mosquitto, mosquitto_pub, wait_for
):
    raw = _config(tmp_path, mosquitto)
    config = parse_config(raw)
    http = f"http://{raw['transports']['http']['listen']}/api/v1"
    coap = f"coap://{raw['transports']['coap']['listen']}/api/v1"
    flow = Edge(config, name="telemetry")
    telemetry.build(flow)
    with running(flow):
        json_type = ("Content-Type: application/json",)
        # ThingsBoard's HTTP client tests the connection with {} and needs 200
        assert curl(f"{http}/{TOKEN_1}/telemetry", b"{}", headers=json_type).status == 200
        reply = curl(
            f"{http}/{TOKEN_1}/attributes", b'{"fw": "1.4.2", "on": true}', headers=json_type
        )
        assert reply.status == 200, reply.body
        bad = curl(f"{http}/{TOKEN_1}/attributes", b'["fw"]', headers=json_type)
        assert bad.status == 400
        assert bad.error == (
            "attributes: top-level JSON is an array; send one JSON object of attributes "
            'like {"firmware": "1.4.2"}'
        )
        unknown = curl(f"{http}/not-a-token/attributes", b'{"fw": "1"}')
        assert unknown.status == 401
        mode = '{"mode": {"eco": 1}}'
        assert coap_client(
            f"{coap}/{TOKEN_2}/attributes", text=mode, content_format="json"
        ).code == ("2.04")
        assert coap_client(
            f"{coap}/{TOKEN_2}/telemetry", text="{}", content_format="json"
        ).code == ("2.04")
        bad_coap = coap_client(f"{coap}/{TOKEN_2}/attributes", text='{"x": null}')
        assert (bad_coap.code, bad_coap.diagnostic) == (
            "4.00",
            "attributes: value of 'x' is null; send a string, number, boolean, object or array",
        )
        mosquitto_pub(mosquitto, "v1/devices/mq-3/attributes", message='{"serial": "A-7"}')
        wait_for(lambda: flow.meter.totals["received"] == 7, "every journaled message")
    data = tmp_path / "var"
    rows = query_parquet(
        data,
        "device_attributes",
        "select device, key, value, source from {src} order by device, key",
    )
    assert rows == [
        ("fan-2", "mode", '{"eco":1}', "coap"),
        ("mq-3", "serial", '"A-7"', "mqtt"),
        ("pump-1", "fw", '"1.4.2"', "http"),
        ("pump-1", "on", "true", "http"),
    ]
    assert query_parquet(data, "telemetry_points", "select count(*) from {src}") == []
    reasons = query_parquet(data, "dead_letters", "select transport from {src} order by 1")
    assert reasons == [("coap",), ("http",)]


def test_edgesieve_run_flows_edge_stores_attributes_in_parquet_and_edge_duckdb(tmp_path, mosquitto):
    raw = _config(tmp_path, mosquitto)
    config = tmp_path / "edge.yaml"
    config.write_text(json.dumps(raw))  # JSON is YAML
    http = f"http://{raw['transports']['http']['listen']}/api/v1"
    proc = subprocess.Popen(
        [*EDGESIEVE, "run", "flows.edge", "--config", str(config)],
        env=os.environ,
        cwd=Path(__file__).parents[2],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = curl(f"{http}/{TOKEN_1}/telemetry", b"{}")
                if reply.status == 200:
                    break
            except RuntimeError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the edge did not start"
            time.sleep(0.2)
        for i in range(3):
            body = json.dumps({"count": i, "fw": f"1.{i}"}).encode()
            assert curl(f"{http}/{TOKEN_1}/attributes", body).status == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    data = tmp_path / "var"
    parquet = query_parquet(
        data, "device_attributes", "select key, value from {src} order by updated_at, key"
    )
    assert parquet == [(k, v) for i in range(3) for k, v in (("count", str(i)), ("fw", f'"1.{i}"'))]
    with duckdb.connect(str(data / "edge.duckdb"), read_only=True) as con:
        latest = con.sql("select key, value from device_attributes_latest order by key").fetchall()
        assert con.sql("select count(*) from device_attributes").fetchall() == [(6,)]
    assert latest == [("count", "2"), ("fw", '"1.2"')]


def test_an_attributes_message_over_keys_per_message_is_one_dead_letter(tmp_path):
    config = parse_config({"data_dir": str(tmp_path), "limits": {"keys_per_message": 2}})
    messages = [attrs("evil", T0, {"a": 1, "b": 2, "c": 3}), attrs("good", T0, {"a": 1, "b": 2})]
    flow = run_recorded(telemetry.build, config, messages, name="telemetry")
    stored = query_parquet(tmp_path, "device_attributes", "select device, key from {src}")
    assert sorted(stored) == [("good", "a"), ("good", "b")]
    letters = query_parquet(tmp_path, "dead_letters", "select device, reason, payload from {src}")
    assert letters == [
        (
            "evil",
            "limits.keys_per_message: an attributes message of device 'evil' has 3 distinct keys, "
            "more than the limit of 2; nothing of it was processed; hint: send fewer keys per "
            "message or raise limits.keys_per_message",
            b'{"a": 1, "b": 2, "c": 3}',
        )
    ]
    assert flow.meter.totals["refused_keys_per_message"] == 1


def test_the_edge_account_may_read_attributes_on_a_secured_mosquitto(
    tmp_path, mosquitto_factory, mosquitto_pub, wait_for
):
    from connectors.devices.broker_auth import EdgeAccount, write_mosquitto_config
    from tests.conftest import device_registry

    account = EdgeAccount("edge", "edge-secret-0123")
    passwd, acl = write_mosquitto_config(device_registry(), account, tmp_path / "auth")
    broker = mosquitto_factory(password_file=passwd, acl_file=acl).start()
    mqtt = {
        "url": broker.url,
        "client_id": "secured",
        "username": "edge",
        "password": account.password,
    }
    config = parse_config({"data_dir": str(tmp_path / "var"), "transports": {"mqtt": mqtt}})
    flow = Edge(config, name="telemetry")
    telemetry.build(flow)
    with running(flow):
        for device, token in DEVICES.items():
            mosquitto_pub(
                broker,
                f"v1/devices/{device}/attributes",
                message=json.dumps({"owner": device}),
                username=device,
                password=token,
            )
        wait_for(lambda: flow.meter.totals["received"] == 2, "both attributes messages")
    rows = query_parquet(
        tmp_path / "var", "device_attributes", "select device, value, source from {src} order by 1"
    )
    assert rows == [("fan-2", '"fan-2"', "mqtt"), ("pump-1", '"pump-1"', "mqtt")]
