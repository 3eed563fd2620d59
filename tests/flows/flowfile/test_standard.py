"""The standard flows as flow files give the same rows, reports and dead letters as the Python flows."""

import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from connectors.streams import STREAMS
from flows import edge, logs, telemetry, vibration
from flows.config import parse_config
from flows.flowfile import load_flow_file
from flows.machines import Machine, blocks
from flows.standard import STANDARD_DIR
from operators.records import RawMessage
from tests.flows.conftest import run_recorded

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def at(seconds: float, **values: object) -> bytes:
    ms = int((T0 + timedelta(seconds=seconds)).timestamp() * 1000)
    return json.dumps({"ts": ms, "values": values}).encode()


def telemetry_messages() -> list[RawMessage]:
    def tel(device: str, payload: bytes) -> RawMessage:
        return RawMessage(device, "telemetry", "mqtt", T0, payload)

    return [
        tel("pump-1", at(0, temperature=20.0, status="ok")),
        tel("pump-1", at(1, temperature=20.2)),
        tel("pump-1", at(2, temperature=21.0)),
        tel("pump-1", b"{not json"),
        tel("pump-2", b"[" + at(0, humidity=40) + b"," + at(5, humidity=40.1) + b"]"),
        tel("pump-1", at(12, temperature=21.1, status="warm")),
        tel("pump-1", at(3, temperature=99.0)),  # late: a dead letter from the window
        tel("pump-2", at(6, humidity=45)),
        RawMessage("pump-1", "attributes", "http", T0, b'{"fw": "1.4.2"}'),
        RawMessage("pump-1", "vibration", "http", T0, b"EVB1 but short"),
    ]


def vibration_messages() -> list[RawMessage]:
    out = []
    for kind, device in (("imbalance", "pump-2"), ("bearing", "mill-3")):
        for payload in blocks(Machine(kind, seed=3), device=device, count=24, start_ts=T0):
            out.append(RawMessage(device, "vibration", "mqtt", T0, payload))
    for start in (T0, T0 + timedelta(hours=1)):  # a gap: spectral's errors, a dead letter
        fan = blocks(Machine("healthy", seed=3), device="fan-1", count=3, start_ts=start)
        out += [RawMessage("fan-1", "vibration", "mqtt", T0, p) for p in fan]
    return out


def logs_messages() -> list[RawMessage]:
    def lines(device: str, *entries: tuple[float, str, str]) -> RawMessage:
        body = "\n".join(
            json.dumps(
                {"ts": int((T0 + timedelta(seconds=s)).timestamp() * 1000), "level": lv, "msg": m}
            )
            for s, lv, m in entries
        )
        return RawMessage(device, "logs", "http", T0, body.encode())

    return [
        lines(
            "gw-1",
            (0, "info", "poll 12 ok"),
            (1, "info", "poll 13 ok"),
            (2, "error", "disk 91% full"),
        ),
        lines("gw-1", (61, "warning", "retry 3 of 5"), (62, "info", "poll 14 ok")),
        lines("gw-1", (5, "debug", "late chatter 7")),  # late: a dead letter
        RawMessage(
            "gw-1", "logs", "mqtt", T0, b"<11>Dec  3 07:00:00 gw-1 app[42]: ERROR pump 7 stalled"
        ),
        RawMessage("gw-2", "logs", "coap", T0, b"\xff\xfe not utf-8"),
        lines("gw-2", (130, "critical", "watchdog reset 2")),
    ]


def rows(data_dir, stream: str) -> list[tuple]:
    folder = data_dir / "parquet" / stream
    if not list(folder.glob("**/*.parquet")):
        return []
    src = f"read_parquet('{folder / '**' / '*.parquet'}', hive_partitioning=true)"
    return duckdb.sql(f"select * exclude (date) from {src} order by all").fetchall()


def config(data_dir):
    return parse_config(
        {
            "data_dir": str(data_dir),
            "telemetry": {
                "deadband": {"absolute": 0.5},
                "window": {"length": 10, "allowed_lateness": 1},
            },
            "vibration": {"frames_per_row": 3},
        }
    )


@pytest.mark.parametrize(
    ("name", "python", "messages"),
    [
        ("telemetry", telemetry.build, telemetry_messages()),
        ("vibration", vibration.build, vibration_messages()),
        ("logs", logs.build, logs_messages()),
        ("edge", edge.build, telemetry_messages() + vibration_messages() + logs_messages()),
    ],
)
def test_the_flow_file_writes_the_rows_the_python_flow_writes(tmp_path, name, python, messages):
    flow = load_flow_file(STANDARD_DIR / f"{name}.flow.yaml")
    assert flow.name == name
    by_python = run_recorded(python, config(tmp_path / "py"), messages, name=name, batch_size=4)
    by_file = run_recorded(
        flow.builder(), config(tmp_path / "file"), messages, name=name, batch_size=4
    )
    written = 0
    for stream in STREAMS:
        expected = rows(tmp_path / "py", stream)
        assert rows(tmp_path / "file", stream) == expected, stream
        written += bool(expected)
    assert written >= 3

    def counts(edge_run):
        return {
            part: (r.messages_in, r.raw_bytes, r.stages, r.output_rows, r.devices)
            for part, r in edge_run.reports().items()
        }

    assert counts(by_file) == counts(by_python)


def test_the_alarms_show_the_zone_and_impact_rules_by_default(tmp_path):
    run_recorded(
        load_flow_file(STANDARD_DIR / "vibration.flow.yaml").builder(),
        config(tmp_path),
        vibration_messages(),
        name="vibration",
        batch_size=4,
    )
    raised = {(r[0], r[2]) for r in rows(tmp_path, "alarms") if r[3] == "raised"}
    assert ("pump-2", "iso_zone_d") in raised and ("mill-3", "impacts_kurtosis") in raised


def test_the_example_flow_file_writes_what_the_example_python_flow_writes(tmp_path):
    pytest.importorskip("operators.filter")
    from flows.runtime import load_flow_builder

    root = STANDARD_DIR.parents[1]
    messages = [
        RawMessage("pump-1", "telemetry", "mqtt", T0, at(s, pressure=p, temp=20 + s))
        for s, p in ((0, 1.0), (1, 1.1), (2, 1.5), (14, 1.4), (3, 9.0), (25, 2.0))
    ]
    python = load_flow_builder(str(root / "examples" / "custom_flow.py"))
    by_file = load_flow_file(root / "examples" / "pressure.flow.yaml").builder()
    for where, build in (("py", python), ("file", by_file)):
        run_recorded(
            build, parse_config({"data_dir": str(tmp_path / where)}), messages, name="pressure"
        )
    for stream in ("pressure_points", "pressure_summary", "dead_letters"):
        expected = rows(tmp_path / "py", stream)
        assert expected and rows(tmp_path / "file", stream) == expected, stream


@pytest.mark.parametrize("report", [True, False], ids=["report", "report-off"])
def test_the_vibration_flow_file_sends_the_cloud_the_rows_the_python_flow_sends(tmp_path, report):
    from connectors.cloud import CloudReceiver
    from tests.conftest import free_port

    secret = "cloud-secret-for-tests-0001"
    messages = vibration_messages()
    sent = {}
    for where, build in (
        ("py", vibration.build),
        ("file", load_flow_file(STANDARD_DIR / "vibration.flow.yaml").builder()),
    ):
        port, db = free_port(), tmp_path / f"{where}.duckdb"
        settings = {
            "data_dir": str(tmp_path / where),
            "vibration": {"frames_per_row": 3, "report": {"enabled": report}},
            "cloud": {"target": f"127.0.0.1:{port}", "key": "edge-01", "secret": secret},
        }
        with CloudReceiver(f"127.0.0.1:{port}", db, {"edge-01": secret}):
            run_recorded(build, parse_config(settings), messages, name="vibration", batch_size=4)
        with duckdb.connect(str(db), read_only=True) as con:
            sent[where] = {
                stream: con.sql(
                    f"select * exclude (batch_id) from {stream} order by all"
                ).fetchall()
                if stream in {r[0] for r in con.sql("show tables").fetchall()}
                else []
                for stream in ("vibration_features", "alarms")
            }
        local = len(rows(tmp_path / where, "vibration_features"))
        cloud = len(sent[where]["vibration_features"])
        assert cloud < local if report else cloud == local  # off: every row to the cloud
    assert sent["py"]["vibration_features"] and sent["file"] == sent["py"]
