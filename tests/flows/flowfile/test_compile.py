"""What a flow file builds: rejects kept as dead letters, reasons, thresholds, MQTT alarms."""

import json
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from flows.config import parse_config
from flows.flowfile import FlowFileError, check_flow_file, load_flow_file
from flows.flowfile.kinds import KINDS
from flows.machines import Machine, blocks
from flows.standard import STANDARD_DIR
from operators.records import RawMessage
from tests.conftest import query_parquet
from tests.flows.conftest import run_recorded

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def at(seconds: float, **values: object) -> RawMessage:
    ms = int((T0 + timedelta(seconds=seconds)).timestamp() * 1000)
    body = json.dumps({"ts": ms, "values": values}).encode()
    return RawMessage("pump-1", "telemetry", "mqtt", T0, body)


READINGS = [at(0, t=1.0), at(1, t=5.0), at(12, t=2.0), at(3, t=9.0), at(13, t=4.0)]  # at 3 s: late


def run(tmp_path, doc: dict, messages=READINGS, **config):
    path = tmp_path / "f.flow.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    flow = load_flow_file(path)
    data = tmp_path / "var"
    settings = {
        "data_dir": str(data),
        "telemetry": {"window": {"length": 10, "allowed_lateness": 1}},
    }
    run_recorded(flow.builder(), parse_config({**settings, **config}), messages, name=flow.name)
    return data


def flow(steps: dict, outputs: dict, channels=("telemetry",)) -> dict:
    return {
        "flow": "f",
        "inputs": {"in": {"channels": list(channels)}},
        "steps": steps,
        "outputs": outputs,
    }


def test_late_readings_no_output_takes_still_become_dead_letters(tmp_path):
    data = run(
        tmp_path, flow({"w": {"op": "window", "from": "in.series"}}, {"mine": {"from": "w"}})
    )
    assert query_parquet(data, "mine", "select count, mean from {src} order by window_start") == [
        (2, 3.0),
        (2, 3.0),
    ]
    reasons = query_parquet(data, "dead_letters", "select reason from {src}")
    assert len(reasons) == 1 and reasons[0][0].startswith(
        "late: reading 't' at 2026-11-20T12:00:03"
    )


def test_dead_letters_with_a_reason_of_your_own(tmp_path):
    doc = flow(
        {"w": {"op": "window", "from": "in.series"}},
        {
            "mine": {"from": "w"},
            "dead_letters": {"from": "w.late", "reason": "too late for us", "max_file_age": "1h"},
        },
    )
    data = run(tmp_path, doc)
    rows = query_parquet(data, "dead_letters", "select device, reason, payload from {src}")
    assert [(d, r, json.loads(p)["values"]) for d, r, p in rows] == [
        ("pump-1", "too late for us", {"t": 9.0})
    ]


def test_an_output_of_the_series_gets_the_readings(tmp_path):
    data = run(tmp_path, flow({}, {"raw_points": {"from": "in.series"}}))
    assert query_parquet(data, "raw_points", "select value from {src} order by ts") == [
        (1.0,),
        (5.0,),
        (9.0,),
        (2.0,),
        (4.0,),
    ]


def test_a_threshold_on_readings_and_an_output_merging_two_steps(tmp_path):
    rules = [
        {
            "name": "hot",
            "field": "value",
            "raise_above": 4.5,
            "clear_below": 3,
            "severity": "critical",
        }
    ]
    doc = flow(
        {
            "hot": {"op": "threshold", "from": "in.series", "rules": rules},
            "db": {"op": "deadband", "from": "in.readings", "absolute": 3.5},
            "db2": {"op": "deadband", "from": "in.readings", "absolute": 100},
        },
        {"alarms": {"from": "hot"}, "both": {"from": ["db", "db2"]}},
    )
    data = run(tmp_path, doc)
    alarms = query_parquet(
        data, "alarms", "select key, rule, state, severity, value from {src} order by ts"
    )
    assert alarms == [
        ("pump-1/t", "hot", "raised", "critical", 5.0),
        ("pump-1/t", "hot", "raised", "critical", 9.0),  # at 3 s, after the clear at 12 s
        ("pump-1/t", "hot", "cleared", "critical", 2.0),
    ]
    # db keeps 1, 5, 9, 4 (moves over 3.5 from the last kept), not 2; db2 only the first
    both = query_parquet(data, "both", "select value from {src} order by value")
    assert both == [(1.0,), (1.0,), (4.0,), (5.0,), (9.0,)]


def test_vibration_flow_file_publishes_alarms_on_mqtt(tmp_path, mosquitto):
    alarms_seen = tmp_path / "alarms.txt"
    with alarms_seen.open("w") as out:
        watcher = subprocess.Popen(
            ["mosquitto_sub", "-p", str(mosquitto.port), "-t", "v1/devices/+/alarms", "-v"]
            + ["-W", "60", "-C", "1"],
            stdout=out,
        )
        payloads = blocks(Machine("imbalance", seed=1), device="pump-7", count=24, start_ts=T0)
        config = parse_config(
            {
                "data_dir": str(tmp_path / "var"),
                "transports": {"mqtt": {"url": mosquitto.url, "client_id": "ff-vib"}},
            }
        )
        messages = [RawMessage("pump-7", "vibration", "mqtt", T0, p) for p in payloads]
        build = load_flow_file(STANDARD_DIR / "vibration.flow.yaml").builder()
        run_recorded(build, config, messages, name="vibration", batch_size=8)
        watcher.wait(timeout=60)
    topic, body = alarms_seen.read_text().strip().split(" ", 1)
    assert topic == "v1/devices/pump-7/alarms"
    alarm = json.loads(body)
    assert alarm["state"] == "raised" and alarm["rule"].startswith("iso_zone_")
    assert alarm["key"].startswith("pump-7/")


# -- kinds whose operators arrive with other modules ------------------------------------------


def test_filter_keeps_what_its_expression_keeps(tmp_path):
    pytest.importorskip("operators.filter")
    doc = flow(
        {"hot": {"op": "filter", "from": "in.readings", "where": "value > 3"}},
        {"hot_points": {"from": "hot"}},
    )
    data = run(tmp_path, doc)
    assert query_parquet(data, "hot_points", "select value from {src} order by ts") == [
        (5.0,),
        (9.0,),
        (4.0,),
    ]


def test_logs_and_report_by_exception_steps_check(tmp_path):
    pytest.importorskip("operators.logs")
    pytest.importorskip("operators.exception")
    doc = {
        "flow": "f",
        "inputs": {"in": {"channels": ["vibration", "logs"]}},
        "steps": {
            "logs": {"op": "logs", "from": "in.logs", "level": "error"},
            "spectral": {"op": "spectral", "from": "in.blocks"},
            "alarms": {"op": "threshold", "from": "spectral"},
            "report": {"op": "report_by_exception", "from": "spectral", "alarms": "alarms"},
        },
        "outputs": {
            "log_events": {"from": "logs"},
            "log_summary": {"from": "logs.summary"},
            "vibration_features": {"from": "report"},
            "alarms": {"from": "alarms"},
        },
    }
    path = tmp_path / "f.flow.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert [s.name for s in check_flow_file(path).steps] == ["logs", "spectral", "alarms", "report"]


def test_the_kinds_of_other_modules_are_declared_even_before_they_exist():
    assert {"filter", "logs", "report_by_exception"} <= set(KINDS)


def test_what_a_filter_drops_is_counted_per_reason_in_the_report(tmp_path):
    pytest.importorskip("operators.filter")
    doc = flow(
        {"hot": {"op": "filter", "from": "in.readings", "min_value": 3}},
        {"hot_points": {"from": "hot"}},
    )
    path = tmp_path / "f.flow.yaml"
    path.write_text(yaml.safe_dump(doc))
    loaded = load_flow_file(path)
    assert "o_dead_letters" not in loaded.mermaid()  # dropped items are counted, not kept
    config = parse_config({"data_dir": str(tmp_path / "var")})
    edge = run_recorded(loaded.builder(), config, READINGS, name="f")
    stages = edge.reports()["f"].stages
    assert {k: v for k, v in stages.items() if k.startswith("dropped_")} == {"dropped_hot_range": 2}


def test_a_filter_expression_error_names_the_setting(tmp_path):
    pytest.importorskip("operators.filter")
    doc = flow(
        {"hot": {"op": "filter", "from": "in.readings", "where": "value > 3 or (lambda: 1)"}},
        {"hot_points": {"from": "hot"}},
    )
    path = tmp_path / "f.flow.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(FlowFileError) as err:
        check_flow_file(path)
    assert err.value.problems == [
        f"{path}: steps.hot.where: unsupported syntax 'lambda' at column 15 in \"value > 3 or (lambda: 1)\"; hint: use fields, numbers, strings, comparisons, in (...), and/or/not, + - * / % and the functions abs, isnan, matches, max, min, round, startswith"
    ]
