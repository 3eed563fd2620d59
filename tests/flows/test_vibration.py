import json
import subprocess
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from flows import vibration
from flows.accounting import Meter, report
from flows.api import Edge
from flows.config import parse_config
from flows.machines import Machine, blocks
from operators.records import RawMessage
from tests.flows.conftest import run_recorded, running

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
BLOCK_S = 4096 / 25_600


def recorded(kind: str, device: str, count: int, start: datetime = T0) -> list[RawMessage]:
    payloads = blocks(Machine(kind, seed=3), device=device, count=count, start_ts=start)
    return [RawMessage(device, "vibration", "mqtt", start, p) for p in payloads]


def query(tmp_path, stream: str, sql: str) -> list[tuple]:
    glob = str(tmp_path / "parquet" / stream / "**" / "*.parquet")
    return duckdb.sql(sql.format(src=f"read_parquet('{glob}', hive_partitioning=true)")).fetchall()


def run(tmp_path, messages: list[RawMessage], runner: str = "cluster_main-1", **vibration_section) -> Meter:
    config = parse_config({"data_dir": str(tmp_path), "vibration": vibration_section})
    edge = run_recorded(vibration.build, config, messages, name="vibration", batch_size=8, runner=runner)
    return edge.meter


def test_machines_reduce_to_features_and_alarm_as_expected(tmp_path, runner):
    n = 60  # ~9.8 s of signal per machine
    messages = [
        m
        for trio in zip(
            recorded("healthy", "fan-1", n),
            recorded("imbalance", "pump-2", n),
            recorded("bearing", "mill-3", n),
            strict=True,
        )
        for m in trio
    ]
    meter = run(tmp_path, messages, runner)

    rows = query(
        tmp_path,
        "vibration_features",
        "select device, axis, count(*), max(velocity_rms_mm_s), max(kurtosis) from {src} group by all order by all",
    )
    by = {(d, a): (c, v, k) for d, a, c, v, k in rows}
    assert set(by) == {(d, a) for d in ("fan-1", "pump-2", "mill-3") for a in "xyz"}
    # 60 blocks of 4096 samples, 6 frames per row: 10 rows per axis
    assert all(c == 10 for c, _, _ in by.values())
    assert max(v for (d, _), (_, v, _) in by.items() if d == "fan-1") < 1.4  # zone A
    assert by["pump-2", "x"][1] > 4.5  # zone D
    assert by["mill-3", "x"][2] > 8

    alarms = query(
        tmp_path,
        "alarms",
        "select device, key, rule, state, severity from {src} order by ts, key, rule",
    )
    raised = {(d, r) for d, _, r, s, _ in alarms if s == "raised"}
    assert ("pump-2", "iso_zone_d") in raised and ("pump-2", "iso_zone_c") in raised
    assert ("mill-3", "impacts_kurtosis") in raised
    assert not any(d == "fan-1" for d, *_ in alarms)
    assert {k for d, k, *_ in alarms if d == "pump-2"} <= {"pump-2/x", "pump-2/y", "pump-2/z"}
    assert ("pump-2", "pump-2/x", "iso_zone_d", "raised", "critical") in alarms

    rep = report(meter)
    raw = sum(len(m.payload) for m in messages)
    assert rep.raw_bytes == raw and rep.messages_in == len(messages)
    assert rep.stages["vibration_features"] == 90
    assert rep.ratio is not None and rep.ratio > 100


def test_bad_blocks_and_gaps_become_dead_letters(tmp_path):
    good = recorded("healthy", "fan-1", 12)
    late_start = T0 + timedelta(seconds=60)
    after_gap = recorded("healthy", "fan-1", 12, start=late_start)
    corrupt = RawMessage("fan-1", "vibration", "mqtt", T0, b"XXXX" + good[0].payload[4:])
    text = RawMessage("fan-1", "vibration", "mqtt", T0, b'{"temperature": 1}')
    meter = run(tmp_path, [*good, corrupt, text, *after_gap])

    reasons = [
        r for (r,) in query(tmp_path, "dead_letters", "select reason from {src} order by reason")
    ]
    assert any(r.startswith("vibration: bad magic") for r in reasons), reasons
    assert sum(r.startswith("vibration: ") for r in reasons) == 3  # magic, JSON body, the gap
    assert any("gap" in r for r in reasons), reasons
    # features continue after the gap
    after = query(
        tmp_path,
        "vibration_features",
        f"select count(*) from {{src}} where ts >= TIMESTAMPTZ '{late_start.isoformat()}'",
    )
    assert after[0][0] > 0
    assert report(meter).stages["dead_letters"] == 3


def test_alarm_rules_are_checked_at_load():
    from flows.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"^vibration\.alarms\.0\.clear_below: must be <= raise_above \(1\.0\)"
    ):
        parse_config({"vibration": {"alarms": [{"name": "x", "raise_above": 1, "clear_below": 2}]}})
    with pytest.raises(ConfigError, match=r"^vibration\.fft_size: must be a power of two"):
        parse_config({"vibration": {"fft_size": 1000}})


def test_end_to_end_through_mosquitto_publishes_alarms(
    tmp_path, mosquitto, mosquitto_pub, wait_for
):
    config = parse_config(
        {
            "data_dir": str(tmp_path / "edge"),
            "transports": {"mqtt": {"url": mosquitto.url, "client_id": "vib-test"}},
        }
    )
    alarms_seen = tmp_path / "alarms.txt"
    with alarms_seen.open("w") as out:
        watcher = subprocess.Popen(
            [
                "mosquitto_sub",
                "-p",
                str(mosquitto.port),
                "-t",
                "v1/devices/+/alarms",
                "-v",
                "-W",
                "60",
                "-C",
                "1",
            ],
            stdout=out,
        )
        edge = Edge(config, name="vibration")
        vibration.build(edge)
        meter = edge.meter
        with running(edge):
            payloads = blocks(
                Machine("imbalance", seed=1), device="pump-7", count=24, start_ts=datetime.now(UTC)
            )
            for i, payload in enumerate(payloads):
                path = tmp_path / f"block-{i}.bin"
                path.write_bytes(payload)
                mosquitto_pub(mosquitto, "v1/devices/pump-7/vibration", file=path)
            watcher.wait(timeout=60)
            # alarms land in Parquet promptly, while the flow is still running
            alarm_files = tmp_path / "edge" / "parquet" / "alarms"
            wait_for(lambda: list(alarm_files.rglob("*.parquet")), "alarms on disk", timeout=5)
            wait_for(lambda: meter.totals["received"] == len(payloads), "all blocks to arrive")
    topic, body = alarms_seen.read_text().strip().split(" ", 1)
    assert topic == "v1/devices/pump-7/alarms"
    alarm = json.loads(body)
    assert alarm["state"] == "raised" and alarm["rule"].startswith("iso_zone_")
    assert alarm["key"].startswith("pump-7/")
    features = query(
        tmp_path / "edge",
        "vibration_features",
        "select count(*), min(iso_zone) from {src} where axis = 'x'",
    )
    assert features == [(4, "D")]
