import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from flows import telemetry
from flows.accounting import report
from flows.api import Edge
from flows.config import parse_config
from operators.records import RawMessage
from tests.flows.conftest import run_recorded

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def msg(device: str, body: object, *, raw: bytes | None = None) -> RawMessage:
    payload = raw if raw is not None else json.dumps(body).encode()
    return RawMessage(device, "telemetry", "mqtt", T0, payload)


def at(seconds: float, **values: object) -> dict:
    return {"ts": int((T0 + timedelta(seconds=seconds)).timestamp() * 1000), "values": values}


def config(tmp_path, **telemetry_section):
    return parse_config(
        {
            "data_dir": str(tmp_path),
            "telemetry": telemetry_section
            or {
                "deadband": {"absolute": 0.5, "max_silence": None},
                "window": {"length": 10, "allowed_lateness": 1},
            },
        }
    )


def rows(tmp_path, stream: str) -> list[tuple]:
    glob = str(tmp_path / "parquet" / stream / "**" / "*.parquet")
    return duckdb.sql(
        f"select * exclude (date) from read_parquet('{glob}', hive_partitioning=true)"
    ).fetchall()


def table(tmp_path, stream: str, columns: str, order: str) -> list[tuple]:
    glob = str(tmp_path / "parquet" / stream / "**" / "*.parquet")
    return duckdb.sql(
        f"select {columns} from read_parquet('{glob}', hive_partitioning=true) order by {order}"
    ).fetchall()


@pytest.fixture
def recorded():
    return [
        msg("pump-1", at(0, temperature=20.0, status="ok")),
        msg("pump-1", at(1, temperature=20.2)),  # inside the deadband
        msg("pump-1", at(2, temperature=21.0)),  # passes
        msg("pump-1", None, raw=b"{not json"),
        msg("pump-1", None, raw=b'{"temperature": NaN}'),
        msg("pump-2", [at(0, humidity=40), at(5, humidity=40.1)]),
        msg("pump-1", at(12, temperature=21.1)),  # next window
        msg("pump-1", at(3, temperature=99.0)),  # late: pump-1's watermark is at 11 s
        msg("pump-2", at(6, humidity=45)),  # not late: pump-2 has its own clock
    ]


def test_flow_writes_every_stream(tmp_path, recorded, runner):
    edge = run_recorded(telemetry.build, config(tmp_path), recorded, name="telemetry", runner=runner)

    points = table(
        tmp_path,
        "telemetry_points",
        "device, key, epoch(ts) - epoch(TIMESTAMP '2026-11-20 12:00:00'), value",
        "device, ts",
    )
    assert points == [
        ("pump-1", "temperature", 0, 20.0),
        ("pump-1", "temperature", 2, 21.0),
        ("pump-1", "temperature", 3, 99.0),  # out of order: passes the deadband untouched
        ("pump-2", "humidity", 0, 40.0),
        ("pump-2", "humidity", 6, 45.0),
    ]

    summary = table(
        tmp_path,
        "telemetry_summary",
        "device, key, window_start, count, mean, min, max, first, last",
        "device, window_start",
    )
    start = T0.replace(tzinfo=None)
    assert [(d, k, ws.replace(tzinfo=None), c) for d, k, ws, c, *_ in summary] == [
        ("pump-1", "temperature", start, 3),
        ("pump-1", "temperature", start + timedelta(seconds=10), 1),
        ("pump-2", "humidity", start, 3),
    ]
    first = summary[0]
    assert first[4] == pytest.approx((20.0 + 20.2 + 21.0) / 3)
    assert first[5:] == (20.0, 21.0, 20.0, 21.0)

    text = table(tmp_path, "telemetry_text", "device, key, value", "ts")
    assert text == [("pump-1", "status", "ok")]

    dead = table(tmp_path, "dead_letters", "device, transport, reason, payload", "reason")
    reasons = [r[2] for r in dead]
    assert len(dead) == 3
    assert any(r.startswith("late: reading 'temperature'") for r in reasons)
    assert any("NaN" in r for r in reasons)
    assert any(r.startswith("telemetry:") and "JSON" in r for r in reasons)
    assert b"{not json" in [r[3] for r in dead]

    rep = report(edge.meter)
    assert rep.messages_in == len(recorded)
    assert rep.raw_bytes == sum(len(m.payload) for m in recorded)
    assert rep.stages["telemetry_points"] == 5
    assert rep.stages["dead_letters"] == 3
    assert rep.output_rows["telemetry_points"] == 5
    assert rep.ratio is not None and rep.ratio > 0


def test_late_letter_reason_names_the_setting():
    from operators.records import Reading

    letter = telemetry.late_letter(Reading("d", "k", T0, 1.5), timedelta(seconds=5))
    assert letter.reason == (
        "late: reading 'k' at 2026-11-20T12:00:00+00:00 is older than the newest reading of "
        "its series by more than the allowed lateness (5s); raise "
        "telemetry.window.allowed_lateness or fix the device clock"
    )
    assert json.loads(letter.payload) == {"ts": int(T0.timestamp() * 1000), "values": {"k": 1.5}}


def test_flow_without_mqtt_config_fails_at_build(tmp_path):
    from flows.config import ConfigError

    with pytest.raises(ConfigError, match=r"^transports: none is configured, so the flow has no input; hint: add transports.mqtt"):
        telemetry.build(Edge(config(tmp_path)))
