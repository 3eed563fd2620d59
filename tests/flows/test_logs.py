"""Device logs end to end: devices → journal → the logs flow → Parquet, edge.duckdb and the cloud."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb

from connectors.cloud import CloudReceiver
from flows import edge, logs
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
SECRET = "cloud-secret-for-tests-0001"
LATE_REASON = (
    "late: info log line at 2026-11-20T12:00:01+00:00 is older than the newest line of its "
    "device by more than the allowed lateness (10s), so log_summary does not count it; raise "
    "logs.allowed_lateness or fix the device clock"
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ms(seconds: float) -> int:
    return int(at(seconds).timestamp() * 1000)


def message(
    device: str, seconds: float, payload: str | bytes, transport: str = "http"
) -> RawMessage:
    body = payload.encode() if isinstance(payload, str) else payload
    return RawMessage(device, "logs", transport, at(seconds), body)


def recorded() -> list[RawMessage]:
    return [
        message(
            "pump-1",
            5,
            "\n".join(
                [
                    "2026-11-20T12:00:01Z INFO disk sda1 at 91%",
                    "2026-11-20T12:00:02Z INFO disk sdb2 at 97%",
                    "<11>2026-11-20T12:00:03Z valve 7 stuck",
                    '{"msg": 3}',  # a bad line: a dead letter of its own
                ]
            ),
        ),
        message(
            "pump-1",
            70,
            json.dumps(
                [
                    {"ts": ms(65), "level": "warn", "msg": "retry 3 of 5", "attempt": 3},
                    {"ts": ms(66), "level": "debug", "msg": "tick"},
                ]
            ),
            "coap",
        ),
        message("pump-1", 71, "2026-11-20T12:00:01Z INFO disk sdc3 at 12%"),  # late: 60 s behind
        message("fan-2", 2, b"\xff not text"),  # nothing good in it: one dead letter, whole
        message("fan-2", 3, "Feb 30 00:00:00 x"),
    ]


def test_logs_reach_parquet_duckdb_and_the_cloud(tmp_path, runner):
    with CloudReceiver("127.0.0.1:0", tmp_path / "cloud.duckdb", {"edge-01": SECRET}) as rx:
        config = parse_config(
            {
                "edge_id": "edge-01",
                "data_dir": str(tmp_path / "edge"),
                "logs": {"level": "warning", "window": 60, "allowed_lateness": 10},
                "cloud": {"target": f"127.0.0.1:{rx.port}", "key": "edge-01", "secret": SECRET},
            }
        )
        flow = run_recorded(logs.build, config, recorded(), name="logs", runner=runner)
    data = tmp_path / "edge"
    events = [
        ("pump-1", at(3), "error", "valve 7 stuck", "valve <*> stuck", "http", None),
        ("pump-1", at(65), "warning", "retry 3 of 5", "retry <*> of <*>", "coap", '{"attempt":3}'),
    ]
    columns = "device, ts, level, msg, template, transport, fields"
    assert query_parquet(data, "log_events", f"select {columns} from {{src}} order by ts") == events
    summary = [
        ("pump-1", "disk <*> at <*>", "info", at(0), at(60), 2, at(1), at(2), "disk sda1 at 91%"),
        ("pump-1", "valve <*> stuck", "error", at(0), at(60), 1, at(3), at(3), "valve 7 stuck"),
        (
            "pump-1",
            "retry <*> of <*>",
            "warning",
            at(60),
            at(120),
            1,
            at(65),
            at(65),
            "retry 3 of 5",
        ),
        ("pump-1", "tick", "debug", at(60), at(120), 1, at(66), at(66), "tick"),
    ]
    row = "device, template, level, window_start, window_end, count, first_ts, last_ts, example"
    final = (
        f"select {row} from {{src}} qualify row_number() over "
        "(partition by device, template, window_start order by count desc) = 1 "
        "order by window_start, template"
    )
    assert query_parquet(data, "log_summary", final) == summary
    letters = query_parquet(
        data, "dead_letters", "select device, transport, reason from {src} order by device, reason"
    )
    assert letters == [
        (
            "fan-2",
            "http",
            "logs: line 1: not UTF-8 (byte 0xff at offset 0); send text encoded as UTF-8",
        ),
        (
            "fan-2",
            "http",
            "logs: line 1: timestamp 'Feb 30 00:00:00' is not a valid date and time; fix the clock",
        ),
        ("pump-1", "http", LATE_REASON),
        ("pump-1", "http", 'logs: line 4: "msg" is a number; send the message as a string'),
    ]
    with duckdb.connect(str(data / "edge.duckdb"), read_only=True) as con:
        assert con.sql("select count(*) from log_events").fetchall() == [(2,)]
    with duckdb.connect(str(tmp_path / "cloud.duckdb"), read_only=True) as con:
        cloud_events = con.sql(f"select {columns} from log_events order by ts").fetchall()
        cloud_summary = con.sql(f"select {row} from log_summary order by window_start, template")
        cloud_rows = cloud_summary.fetchall()
    assert cloud_events == events
    assert cloud_rows == summary  # a larger count replaced any row sent earlier
    report = flow.reports()["logs"]
    assert report.messages_in == len(recorded())
    assert report.wire_rows.get("log_events") == 2


def test_the_edge_flow_takes_logs_in_a_part_of_its_own(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})
    messages = [
        message("pump-1", 1, "ERROR disk full"),
        RawMessage("pump-1", "telemetry", "http", at(1), b'{"t": 1}'),
    ]
    flow = run_recorded(edge.build, config, messages, name="edge")
    assert query_parquet(tmp_path, "log_events", "select msg from {src}") == [("disk full",)]
    assert query_parquet(tmp_path, "log_summary", "select template, count from {src}") == [
        ("disk full", 1)
    ]
    reports = flow.reports()
    assert reports["logs"].messages_in == 1 and reports["telemetry"].messages_in == 1


def test_a_flow_that_takes_the_logs_channel_but_no_logs_dead_letters_them(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})

    def build(e: Edge) -> None:
        e.output("telemetry_text", e.devices("in", channels=["telemetry", "logs"]).text)

    run_recorded(build, config, [message("pump-1", 1, "ERROR disk full")], name="mine")
    letters = query_parquet(tmp_path, "dead_letters", "select reason, payload from {src}")
    payload = json.dumps({"ts": ms(1), "level": "error", "msg": "disk full"}).encode()
    assert letters == [("no step of flow 'mine' takes device logs", payload)]


def test_logs_over_http_coap_and_mqtt_with_real_clients(
    tmp_path, mosquitto, mosquitto_pub, wait_for
):
    http_at, coap_at = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = parse_config(
        {
            "data_dir": str(tmp_path / "var"),
            "devices": str(write_devices(tmp_path, DEVICES)),
            "transports": {
                "http": {"listen": http_at},
                "coap": {"listen": coap_at},
                "mqtt": {"url": mosquitto.url, "client_id": "logs"},
            },
            "logs": {"level": "error"},
        }
    )
    http, coap = f"http://{http_at}/api/v1", f"coap://{coap_at}/api/v1"
    flow = Edge(config, name="logs")
    logs.build(flow)
    with running(flow):
        # a bad line is a dead letter of its own; the good lines of the message are kept
        body = b'ERROR pump 7 overheated\n{"msg": 1}\nINFO pump 7 ok\n'
        reply = curl(f"{http}/{TOKEN_1}/logs", body)
        assert reply.status == 200, reply.body
        bad = curl(f"{http}/{TOKEN_1}/logs", b'{"level": "error"}')
        assert (bad.status, bad.error) == (
            400,
            'logs: the JSON object has no "msg"; send text lines or JSON like '
            '{"level": "error", "msg": "disk full"}',
        )
        empty = curl(f"{http}/{TOKEN_1}/logs", b"")
        assert (empty.status, empty.error) == (
            400,
            'empty body; POST log lines as text, or JSON like {"level": "error", "msg": "disk full"}',
        )
        body = json.dumps({"level": "critical", "msg": "fan 2 stalled", "rpm": 0})
        assert coap_client(f"{coap}/{TOKEN_2}/logs", text=body, content_format="json").code == (
            "2.04"
        )
        bad_coap = coap_client(f"{coap}/{TOKEN_2}/logs", text='[{"msg": "x", "level": "loud"}]')
        assert (bad_coap.code, bad_coap.diagnostic) == (
            "4.00",
            "logs: list index 0: \"level\" 'loud' is not a log level; use one of trace, debug, "
            "info, notice, warning, error, critical",
        )
        empty_coap = coap_client(f"{coap}/{TOKEN_2}/logs")
        assert (empty_coap.code, empty_coap.diagnostic) == (
            "4.00",
            "logs: payload is empty; POST a JSON document, log lines or an EVB1 block",
        )
        mosquitto_pub(mosquitto, "v1/devices/mq-3/logs", message="<10>app: crit happened 42")
        wait_for(lambda: flow.meter.totals["received"] == 5, "every journaled message")
    data = tmp_path / "var"
    events = query_parquet(
        data, "log_events", "select device, level, msg, transport from {src} order by device"
    )
    assert events == [
        ("fan-2", "critical", "fan 2 stalled", "coap"),
        ("mq-3", "critical", "app: crit happened 42", "mqtt"),
        ("pump-1", "error", "pump 7 overheated", "http"),
    ]
    summary = query_parquet(
        data, "log_summary", "select device, template, count from {src} order by device, template"
    )
    assert summary == [
        ("fan-2", "fan <*> stalled", 1),
        ("mq-3", "app: crit happened <*>", 1),
        ("pump-1", "pump <*> ok", 1),
        ("pump-1", "pump <*> overheated", 1),
    ]
    letters = query_parquet(
        data, "dead_letters", "select transport, reason, payload from {src} order by 1, 2"
    )
    assert letters == [  # the empty bodies were refused, not kept
        ("coap", bad_coap.diagnostic, b'[{"msg": "x", "level": "loud"}]'),
        ("http", 'logs: line 2: "msg" is a number; send the message as a string', b'{"msg": 1}'),
        ("http", bad.error, b'{"level": "error"}'),
    ]


def test_the_edge_account_may_read_logs_on_a_secured_mosquitto(
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
    flow = Edge(config, name="logs")
    logs.build(flow)
    with running(flow):
        for device, token in DEVICES.items():
            mosquitto_pub(
                broker,
                f"v1/devices/{device}/logs",
                message=f"ERROR {device} down",
                username=device,
                password=token,
            )
        wait_for(lambda: flow.meter.totals["received"] == 2, "both logs messages")
    rows = query_parquet(
        tmp_path / "var", "log_events", "select device, msg, transport from {src} order by 1"
    )
    assert rows == [("fan-2", "fan-2 down", "mqtt"), ("pump-1", "pump-1 down", "mqtt")]
