"""``sinks.raw_readings``: every numeric reading kept locally, in the Python and file forms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from flows import telemetry
from flows.config import parse_config
from flows.runtime import load_flow_builder
from flows.simulator import telemetry_payloads
from operators.records import RawMessage
from tests.flows.conftest import run_recorded

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def _messages() -> list[RawMessage]:
    pairs = telemetry_payloads(3, 120, start=T0)
    return [
        RawMessage(device, "telemetry", "mqtt", T0 + timedelta(seconds=i // 3), body)
        for i, (device, body) in enumerate(pairs)
    ]


def _rows(data_dir, stream: str) -> list[tuple]:
    glob = str(data_dir / "parquet" / stream / "**" / "*.parquet")
    return duckdb.sql(
        f"select device, key, ts, value from read_parquet('{glob}') order by all"
    ).fetchall()


@pytest.mark.parametrize("form", ["python", "file"])
def test_raw_readings_hold_every_reading(form, tmp_path):
    config = parse_config(
        {"data_dir": str(tmp_path), "sinks": {"raw_readings": True}}, source="test"
    )
    build = telemetry.build if form == "python" else load_flow_builder("telemetry.flow.yaml")
    edge = run_recorded(build, config, _messages(), name="telemetry", batch_size=16)
    rep = edge.reports()["telemetry"]
    raw = _rows(tmp_path, "raw_readings")
    assert len(raw) == 3 * 120 * 2 == rep.output_rows["raw_readings"] == rep.stages["readings"]
    kept = _rows(tmp_path, "telemetry_points")
    assert set(kept) < set(raw)  # the deadband keeps a subset of the same readings
    assert rep.ratio == rep.raw_bytes / rep.reduced_bytes()
    assert "raw_readings" not in [s for s in rep.wire_rows]


def test_raw_readings_are_off_by_default(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)}, source="test")
    edge = run_recorded(telemetry.build, config, _messages(), name="telemetry", batch_size=16)
    assert not (tmp_path / "parquet" / "raw_readings").exists()
    assert "raw_readings" not in edge.reports()["telemetry"].output_rows
