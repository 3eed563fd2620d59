import json
from datetime import UTC, datetime

import duckdb
from bytewax.testing import TestingSource, run_main

from connectors.records import RawMessage
from flows import edge
from flows.accounting import Meter
from flows.config import parse_config
from flows.machines import Machine, blocks
from flows.runtime import run_flow

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def messages() -> list[RawMessage]:
    out = [
        RawMessage(
            "pump-1",
            "telemetry",
            "http",
            T0,
            json.dumps({"ts": 1763640000000 + i * 1000, "values": {"t": float(i)}}).encode(),
        )
        for i in range(5)
    ]
    out += [
        RawMessage("pump-1", "vibration", "coap", T0, p)
        for p in blocks(Machine("imbalance", seed=2), device="pump-1", count=12, start_ts=T0)
    ]
    return out


def count(tmp_path, stream: str) -> int:
    glob = str(tmp_path / "parquet" / stream / "**" / "*.parquet")
    return duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0]


def test_edge_flow_splits_channels_and_reports_per_flow(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})
    recorded = messages()
    result = run_flow(
        lambda c, *, stop=None, meter=None: edge.build(
            c, stop=stop, meter=meter, source=TestingSource(recorded)
        ),
        config,
        meter=Meter("edge"),
        handle_signals=False,
    )
    assert set(result.reports) == {"edge", "telemetry", "vibration"}
    assert result.reports["telemetry"].messages_in == 5
    assert result.reports["vibration"].messages_in == 12
    assert result.reports["vibration"].raw_bytes == sum(len(m.payload) for m in recorded[5:])
    assert count(tmp_path, "telemetry_points") == 5
    assert count(tmp_path, "vibration_features") == 3 * 2  # 12 blocks, 6 frames a row, 3 axes
    assert (tmp_path / "report-telemetry.json").exists() and (
        tmp_path / "report-vibration.json"
    ).exists()
    assert not list((tmp_path / "parquet").glob("dead_letters/**/*.parquet"))


def test_pipeline_step_ids_do_not_clash(tmp_path):
    # both pipelines write dead letters and decode; namespaced step ids let them share a dataflow
    config = parse_config({"data_dir": str(tmp_path)})
    bad = [
        RawMessage("a", "telemetry", "http", T0, b"nope"),
        RawMessage("b", "vibration", "http", T0, b"nope"),
    ]
    run_main(edge.build(config, source=TestingSource(bad)))
    assert count(tmp_path, "dead_letters") == 2
