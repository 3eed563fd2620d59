"""The vibration flow keeps every feature row locally and sends the cloud only the reported ones."""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pytest
from bytewax.testing import TestingSource

from connectors.cloud import CloudReceiver
from flows import vibration
from flows.api import Edge
from flows.config import ConfigError, parse_config
from flows.machines import Machine, blocks
from operators.records import RawMessage
from tests.conftest import free_port
from tests.flows.conftest import run_recorded

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SECRET = "cloud-secret-for-tests-0001"


def recorded(kind: str, device: str, count: int) -> list[RawMessage]:
    payloads = blocks(Machine(kind, seed=3), device=device, count=count, start_ts=T0)
    return [RawMessage(device, "vibration", "mqtt", T0, p) for p in payloads]


def local_rows(data_dir, sql: str) -> list[tuple]:
    glob = str(data_dir / "parquet" / "vibration_features" / "**" / "*.parquet")
    return duckdb.sql(sql.format(src=f"read_parquet('{glob}', hive_partitioning=true)")).fetchall()


def test_every_row_local_reported_rows_and_alarm_rows_in_the_cloud(tmp_path, runner):
    n = 120  # 20 rows per axis
    messages = [
        m
        for pair in zip(
            recorded("healthy", "fan-1", n), recorded("imbalance", "pump-2", n), strict=True
        )
        for m in pair
    ]
    port = free_port()
    db = tmp_path / "cloud.duckdb"
    config = parse_config(
        {
            "edge_id": "edge-01",
            "data_dir": str(tmp_path / "edge"),
            "cloud": {"target": f"127.0.0.1:{port}", "key": "edge-01", "secret": SECRET},
            "vibration": {"report": {"tolerance": 0.1, "heartbeat": 3600}},
        }
    )
    with CloudReceiver(f"127.0.0.1:{port}", db, {"edge-01": SECRET}):
        run_recorded(
            vibration.build, config, messages, name="vibration", batch_size=8, runner=runner
        )
    local = local_rows(tmp_path / "edge", "select device, axis, ts from {src}")
    assert len(local) == 2 * 3 * 20
    with duckdb.connect(str(db), read_only=True) as con:
        cloud = con.sql("select device, axis, ts from vibration_features").fetchall()
        types = dict(
            con.sql("select column_name, column_type from (describe vibration_features)").fetchall()
        )
        alarm_ts = con.sql(
            "select distinct device, split_part(key, '/', 2), ts from alarms"
        ).fetchall()
        wire = con.sql(
            "select sum(wire_bytes) from uplink_batches where stream = 'vibration_features'"
        ).fetchall()[0]
    assert set(cloud) <= set(local) and len(cloud) == len(set(cloud))
    assert len(cloud) < len(local) / 3, f"{len(cloud)} of {len(local)} rows sent"
    # the first row of each axis, and the row of every alarm, reached the cloud
    assert {(d, a) for d, a, _ in cloud} == {(d, a) for d in ("fan-1", "pump-2") for a in "xyz"}
    assert alarm_ts and set(alarm_ts) <= set(cloud)
    # sent as float32 / plain strings, stored with the stream's own types
    assert types["rms"] == "DOUBLE" and types["band_energy"] == "DOUBLE[]"
    assert types["device"] == types["iso_zone"] == "VARCHAR"
    assert wire[0] > 0


def test_disabled_report_sends_every_row(tmp_path):
    port = free_port()
    db = tmp_path / "cloud.duckdb"
    config = parse_config(
        {
            "edge_id": "edge-01",
            "data_dir": str(tmp_path / "edge"),
            "cloud": {"target": f"127.0.0.1:{port}", "key": "edge-01", "secret": SECRET},
            "vibration": {"report": {"enabled": False}},
        }
    )
    with CloudReceiver(f"127.0.0.1:{port}", db, {"edge-01": SECRET}):
        run_recorded(vibration.build, config, recorded("healthy", "fan-1", 60), name="vibration")
    with duckdb.connect(str(db), read_only=True) as con:
        rms = con.sql("select rms from vibration_features order by ts, axis").fetchall()
    local = local_rows(tmp_path / "edge", "select rms from {src} order by ts, axis")
    assert len(rms) == len(local) == 30
    assert [r for (r,) in rms] == pytest.approx(
        [r for (r,) in local], rel=1e-6
    )  # float32 on the wire


@pytest.mark.parametrize(
    ("report", "message"),
    [
        (
            {"tolerance": -0.1},
            "vibration.report.tolerance: must be greater than or equal to 0 (got -0.1)",
        ),
        (
            {"tolerance": float("inf")},
            "vibration.report.tolerance: must be a finite number (got inf)",
        ),
        (
            {"heartbeat": 0},
            "vibration.report.heartbeat: must be longer than zero (got 0); hint: 600 sends a row of "
            "a steady machine every 10 minutes, null never",
        ),
        (
            {"every": 5},
            "vibration.report.every: unknown key; hint: the keys of vibration.report are enabled, "
            "heartbeat, tolerance",
        ),
    ],
)
def test_report_settings_errors(report: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"vibration": {"report": report}})
    assert str(caught.value).endswith(message)


def test_report_settings_load():
    section = parse_config(
        {"vibration": {"report": {"tolerance": 0.2, "heartbeat": "PT5M"}}}
    ).vibration.report
    assert section.enabled and section.report().tolerance == 0.2
    assert section.report().heartbeat.total_seconds() == 300
    assert (
        parse_config({"vibration": {"report": {"heartbeat": None}}}).vibration.report.heartbeat
        is None
    )


def test_output_that_goes_nowhere_is_refused(tmp_path):
    edge = Edge(parse_config({"data_dir": str(tmp_path)}), source=TestingSource([]))
    dev = edge.devices("in", channels=["vibration"])
    with pytest.raises(
        ValueError,
        match=r"^Edge.output\('vibration_features'\): local=False and cloud=False send the stream "
        r"nowhere; hint: drop local=False to keep it on the edge$",
    ):
        edge.output("vibration_features", dev.blocks, local=False, cloud=False)
