import json
from datetime import UTC, datetime

import duckdb

from flows import edge
from flows.api import Edge
from flows.config import parse_config
from flows.machines import Machine, blocks
from operators.records import RawMessage
from tests.flows.conftest import run_recorded, running

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


def test_edge_flow_splits_channels_and_reports_per_flow(tmp_path, runner):
    config = parse_config({"data_dir": str(tmp_path)})
    recorded = messages()
    flow = run_recorded(edge.build, config, recorded, name="edge", runner=runner)
    result = flow.reports()
    assert set(result) == {"telemetry", "vibration"}
    assert result["telemetry"].messages_in == 5
    assert result["vibration"].messages_in == 12
    assert result["vibration"].raw_bytes == sum(len(m.payload) for m in recorded[5:])
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
    run_recorded(edge.build, config, bad, name="edge")
    assert count(tmp_path, "dead_letters") == 2


def test_bad_input_over_mqtt_becomes_dead_letters_and_loses_nothing_else(
    tmp_path, mosquitto, mosquitto_pub, wait_for
):
    from connectors.codecs.evb1 import encode_evb1

    config = parse_config(
        {
            "data_dir": str(tmp_path),
            "max_payload_bytes": 4096,
            "transports": {"mqtt": {"url": mosquitto.url, "client_id": "bad-input"}},
        }
    )
    flow = Edge(config, name="edge")
    edge.build(flow)
    meter = flow.meter

    import numpy as np

    good_block = encode_evb1(np.zeros((64, 3)), sample_rate_hz=1000, start_ts=T0)
    bad = {
        ("telemetry", b"{not json"): "telemetry: ",
        ("telemetry", b'{"t": [1, NaN]}'): "telemetry: ",
        ("attributes", b'{"fw": null}'): "attributes: value of 'fw' is null",
        ("telemetry", b'{"t": NaN}'): "NaN",
        ("telemetry", b""): "telemetry: ",
        ("telemetry", b'{"t": "' + b"x" * 5000 + b'"}'): "over the 4096-byte limit",
        ("vibration", good_block[:-5]): "vibration: ",
        ("vibration", b"XXXX" + good_block[4:]): "bad magic",
    }
    sent_good = 0
    with running(flow):
        for i, (channel, payload) in enumerate(bad):
            # an empty payload goes as -m "" (mosquitto_pub refuses empty stdin)
            mosquitto_pub(mosquitto, f"v1/devices/dev-{i}/{channel}", message=payload or "")
            body = json.dumps({"ts": 1763640000000 + i * 1000, "values": {"t": float(i * 10)}})
            mosquitto_pub(mosquitto, "v1/devices/good/telemetry", message=body)
            sent_good += 1
        total = len(bad) + sent_good
        wait_for(
            lambda: sum(m.totals["received"] for m in meter.family()) == total, "every message"
        )

    glob = str(tmp_path / "parquet" / "dead_letters" / "**" / "*.parquet")
    letters = duckdb.sql(f"select device, transport, reason from read_parquet('{glob}') order by device").fetchall()
    assert [d for d, _, _ in letters] == [f"dev-{i}" for i in range(len(bad))]
    assert all(t == "mqtt" for _, t, _ in letters)
    for (_, _, reason), expected in zip(letters, bad.values(), strict=True):
        assert expected in reason and "\n" not in reason
    points = duckdb.sql(
        f"select count(*) from read_parquet('{str(tmp_path / 'parquet' / 'telemetry_points' / '**' / '*.parquet')}') where device = 'good'"
    ).fetchall()[0][0]
    assert points == sent_good  # each good reading moved 10 units: all pass the deadband


def test_an_idle_run_is_one_report_that_says_so(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})
    flow = run_recorded(edge.build, config, [], name="edge")
    result = flow.reports()
    assert list(result) == ["edge"]
    assert result["edge"].idle
    assert result["edge"].render() == "flow edge: no device messages in this run, nothing written"
    assert json.loads((tmp_path / "report-edge.json").read_text())["messages_in"] == 0


def test_only_the_parts_that_did_something_are_reported(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})
    flow = run_recorded(edge.build, config, messages()[:5], name="edge")
    result = flow.reports()
    assert list(result) == ["telemetry"]
    assert result["telemetry"].render().startswith("flow telemetry: 5 messages, ")
