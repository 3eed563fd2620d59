"""The flow API: what a user writing a flow meets, errors included."""

import json
import time
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
import duckdb
import pyarrow as pa
import pytest
from bytewax.testing import TestingSource

from connectors.streams import UTC_US
from flows.api import Edge
from flows.config import ConfigError, parse_config
from flows.machines import Machine, blocks
from operators.deadband import deadband
from operators.records import RawMessage
from tests.flows.conftest import run_recorded

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MS = int(T0.timestamp() * 1000)


def telemetry(device: str, body: object, transport: str = "mqtt") -> RawMessage:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawMessage(device, "telemetry", transport, T0, payload)


def rows(tmp_path, stream: str, columns: str = "*") -> list[tuple]:
    glob = str(tmp_path / "parquet" / stream / "**" / "*.parquet")
    return duckdb.sql(f"select {columns} from read_parquet('{glob}') order by all").fetchall()


@pytest.fixture
def config(tmp_path):
    return parse_config({"data_dir": str(tmp_path)})


def test_a_ten_line_flow_with_a_stream_of_its_own(tmp_path, config):
    def build(edge: Edge) -> None:
        dev = edge.devices("in", channels=["telemetry"])
        pressure = op.filter("pressure", dev.readings, lambda kv: kv[1].key == "pressure")
        kept = deadband("deadband", pressure, absolute=0.2)
        edge.output("pressure_points", kept, like="telemetry_points")

    messages = [
        telemetry("p", {"ts": MS + i, "values": {"pressure": v, "other": 1.0}})
        for i, v in enumerate([1.0, 1.1, 1.5])
    ]
    messages.append(telemetry("p", b"{not json"))
    edge = run_recorded(build, config, messages, name="pressure")
    assert rows(tmp_path, "pressure_points", "device, key, value") == [
        ("p", "pressure", 1.0),
        ("p", "pressure", 1.5),
    ]
    # the filter saw only readings: the bad message still reached dead letters
    assert [r[0] for r in rows(tmp_path, "dead_letters", "reason")][0].startswith("telemetry: ")
    rep = edge.reports()["pressure"]
    assert rep.messages_in == 4 and rep.output_rows["pressure_points"] == 2
    assert (tmp_path / "report-pressure.json").exists()


def test_a_new_schema_and_dead_letters_with_a_reason(tmp_path, config):
    schema = pa.schema([("device", pa.string()), ("ts", UTC_US), ("doubled", pa.float64())])

    def build(edge: Edge) -> None:
        dev = edge.devices("in")
        doubled = op.map(
            "double", dev.readings, lambda kv: {"device": kv[1].device, "ts": kv[1].ts, "doubled": 2 * kv[1].value}
        )
        edge.output("doubled", doubled, schema=schema, time_column="ts")
        edge.dead_letters(dev.text, reason="text is not kept by this flow")

    run_recorded(build, config, [telemetry("d", {"ts": MS, "values": {"a": 2, "s": "hi"}})])
    assert rows(tmp_path, "doubled", "device, doubled") == [("d", 4.0)]
    letters = rows(tmp_path, "dead_letters", "reason, payload")
    assert letters == [("text is not kept by this flow", json.dumps({"ts": MS, "values": {"s": "hi"}}).encode())]


def test_kinds_no_step_takes_become_dead_letters(tmp_path, config):
    def build(edge: Edge) -> None:
        dev = edge.devices("in")  # both channels, but only readings are used
        edge.output("telemetry_points", dev.readings)

    block = blocks(Machine("healthy", seed=1), device="m", count=1, start_ts=T0)[0]
    messages = [
        telemetry("d", {"ts": MS, "values": {"a": 1, "s": "x"}}),
        RawMessage("m", "vibration", "http", T0, block),
    ]
    run_recorded(build, config, messages, name="only_points")
    reasons = [r for (r,) in rows(tmp_path, "dead_letters", "reason")]
    assert reasons == [
        "no step of flow 'only_points' takes device blocks",
        "no step of flow 'only_points' takes device text",
    ]
    payloads = [p for (p,) in rows(tmp_path, "dead_letters", "payload")]
    assert block[24:] in payloads[0] or block[24:] in payloads[1]  # the samples are kept


def test_messages_of_a_channel_the_flow_does_not_take_are_dead_letters(tmp_path, config):
    def build(edge: Edge) -> None:
        edge.output("telemetry_points", edge.devices("in", channels=["telemetry"]).readings)

    run_recorded(build, config, [RawMessage("m", "vibration", "http", T0, b"EVB1...")], name="t")
    assert rows(tmp_path, "dead_letters", "device, reason, payload") == [
        ("m", "vibration message sent to flow 't', which does not take the vibration channel", b"EVB1...")
    ]


def test_the_cloud_link_starts_when_the_flow_runs_not_when_it_is_built(tmp_path):
    config = parse_config(
        {"data_dir": str(tmp_path), "cloud": {"target": "127.0.0.1:9", "key": "edge-01", "secret": "s",
                                              "stop_timeout": 0.1}}
    )
    edge = Edge(config, name="t", source=TestingSource([telemetry("d", {"a": 1})]))
    edge.output("telemetry_points", edge.devices("in").readings, cloud=True)
    edge.dataflow()
    assert not (tmp_path / "outbox.sqlite").exists()
    edge.run()
    assert (tmp_path / "outbox.sqlite").exists()


ERRORS = [
    (lambda e, s: e.output("mine", s), r"^Edge.output\('mine'\): unknown stream; declare its columns with like='telemetry_points' or schema=pa.schema\(\[...\]\), time_column='ts' \(known: "),
    (lambda e, s: e.output("mine", s, like="nope"), r"^Edge.output\('mine'\): like='nope' is not a known stream; hint: one of alarms, "),
    (lambda e, s: e.output("mine", s, schema=pa.schema([("ts", UTC_US)])), r"^Edge.output\('mine'\): a new schema needs time_column=, the timestamp\[us, UTC\] column"),
    (lambda e, s: e.output("mine", s, like="alarms", schema=pa.schema([])), r"^Edge.output\('mine'\): give like= or schema=, not both$"),
    (lambda e, s: e.output("My-Stream", s, like="alarms"), r"^Edge.output\('My-Stream'\): a stream name is a lower-case identifier \(got 'My-Stream'\); hint: pressure_points$"),
    (lambda e, s: e.output("alarms", s, priority=-1), r"^Edge.output\('alarms'\): priority must be an int >= 0 \(got -1\); hint: alarms use 0$"),
    (lambda e, s: e.devices("again"), r"^Edge.devices\('again'\): the flow already has its device input; hint: call devices\(\) once"),
    (lambda e, s: e.part("p", channel="events"), r"^Edge.part\('p'\): channel 'events' is not a device channel; hint: one of telemetry, vibration, attributes, logs$"),
]


@pytest.mark.parametrize(("call", "message"), ERRORS)
def test_mistakes_fail_at_build_time_with_a_hint(config, call, message):
    edge = Edge(config, source=TestingSource([]))
    dev = edge.devices("in")
    with pytest.raises(ValueError, match=message):
        call(edge, dev.readings)


def test_one_stream_declared_twice_with_other_columns(config):
    edge = Edge(config, source=TestingSource([]))
    dev = edge.devices("in")
    edge.output("mine", dev.readings, like="telemetry_points")
    with pytest.raises(ValueError, match=r"^Edge.output\('mine'\): the stream was already declared with other columns"):
        edge.output("mine", dev.text, like="telemetry_text")


def test_devices_needs_known_channels(config):
    edge = Edge(config, source=TestingSource([]))
    with pytest.raises(ValueError, match=r"^Edge.devices\('in'\): unknown channel 'events'; hint: channels are telemetry, vibration, attributes, logs$"):
        edge.devices("in", channels=["events"])
    with pytest.raises(ValueError, match=r"^Edge.devices\('in'\): channels is empty; hint: channels=\['telemetry'\]$"):
        edge.devices("in", channels=[])


def test_nothing_can_be_added_once_the_flow_is_finished(config):
    edge = Edge(config, source=TestingSource([]))
    edge.output("telemetry_points", edge.devices("in").readings)
    edge.dataflow()
    with pytest.raises(RuntimeError, match=r"^Edge.output\(\): the flow 'flow' is already finished \(dataflow\(\) or run\(\) was called\); hint: declare everything inside build\(edge\)$"):
        edge.output("telemetry_points", edge.flow and edge.devices)  # type: ignore[arg-type]


def test_config_must_be_loaded(tmp_path):
    with pytest.raises(TypeError, match=r"^Edge: config must be an EdgeConfig \(got dict\); hint: load it with flows.config.load_config\('edge.yaml'\)$"):
        Edge({"data_dir": str(tmp_path)})  # type: ignore[arg-type]


def test_a_flow_name_has_no_period(config):
    with pytest.raises(ValueError, match=r"^Edge: name must be a non-empty string without '.' \(got 'flows.x'\); hint: the flow's module name, e.g. 'telemetry'$"):
        Edge(config, name="flows.x")


def test_a_new_stream_reaches_the_cloud_which_creates_its_table(tmp_path):
    from connectors.cloud import CloudReceiver

    secret = "cloud-secret-for-tests-0001"
    db = tmp_path / "cloud.duckdb"
    with CloudReceiver("127.0.0.1:0", db, {"edge-01": secret}) as receiver:
        config = parse_config(
            {
                "edge_id": "edge-01",
                "data_dir": str(tmp_path / "edge"),
                "cloud": {"target": f"127.0.0.1:{receiver.port}", "key": "edge-01", "secret": secret},
            }
        )

        def build(edge: Edge) -> None:
            dev = edge.devices("in", channels=["telemetry"])
            edge.output("pressure_points", deadband("db", dev.readings, absolute=0.2), like="telemetry_points", cloud=True)

        messages = [telemetry("p", {"ts": MS + i, "values": {"pressure": v}}) for i, v in enumerate([1.0, 1.1, 1.5])]
        edge = run_recorded(build, config, messages, name="pressure")
    rep = edge.reports()["pressure"]
    assert rep.wire_rows == {"pressure_points": 2}
    with duckdb.connect(str(db), read_only=True) as con:
        stored = con.sql("select device, key, value from pressure_points order by ts").fetchall()
        batches = con.sql("select stream, rows, raw_bytes from uplink_batches").fetchall()
    assert stored == [("p", "pressure", 1.0), ("p", "pressure", 1.5)]
    assert batches == [("pressure_points", 2, rep.raw_bytes)]


def test_ready_once_ingest_listens_and_a_clean_stop_drains_the_journal(tmp_path):
    import threading

    from tests.conftest import DEVICES, curl, free_port, write_devices

    port = free_port()
    config = parse_config(
        {
            "data_dir": str(tmp_path),
            "devices": str(write_devices(tmp_path, DEVICES)),
            "transports": {"http": {"listen": f"127.0.0.1:{port}"}},
            "journal": {"partitions": 2},
        }
    )
    edge = Edge(config, name="t")
    edge.output("telemetry_points", edge.devices("in").readings)
    assert not edge.ready
    result = {}
    runner = threading.Thread(target=lambda: result.update(run=edge.run()), daemon=True)
    runner.start()
    try:
        assert edge.wait_ready(timeout=30)
        url = f"http://127.0.0.1:{port}/api/v1/{DEVICES['pump-1']}/telemetry"
        for i in range(20):
            assert curl(url, json.dumps({"ts": MS + i, "values": {"t": i}}).encode()).status == 200
    finally:
        edge.stop.set()
        runner.join(60)
    assert not runner.is_alive()
    # every accepted message went through the flow before it ended
    values = [v for (v,) in rows(tmp_path, "telemetry_points", "value")]
    assert values == [float(i) for i in range(20)]
    rep = result["run"].reports["t"]
    assert rep.messages_in == 20 and rep.journal_lag == 0
    assert rep.journal_messages == 0  # released at the end of a completed run and truncated


def test_the_recovery_store_is_made_once_and_bounds_the_workers(tmp_path):
    config = parse_config({"data_dir": str(tmp_path), "recovery": {"partitions": 2}})
    edge = Edge(config, name="mine", source=TestingSource([]))
    assert edge.recovery_dir == tmp_path / "recovery" / "mine"
    assert edge.recovery_config(1) is not None
    assert sorted(p.name for p in edge.recovery_dir.glob("part-*.sqlite3")) == [
        "part-0.sqlite3",
        "part-1.sqlite3",
    ]
    assert edge.recovery_config(2) is not None
    with pytest.raises(ConfigError) as err:
        edge.recovery_config(3)
    assert str(err.value) == (
        f"recovery.partitions: {edge.recovery_dir} was created with 2 partitions, fewer than the "
        "3 workers asked for; hint: run with at most 2 workers, or stop the flow cleanly and move "
        "that directory away to start from the journal's released offsets"
    )
    off = Edge(parse_config({"data_dir": str(tmp_path / "off"), "recovery": {"enabled": False}}),
               name="mine", source=TestingSource([]))
    assert off.recovery_config(8) is None and not (tmp_path / "off" / "recovery").exists()


def test_a_periodic_copy_of_edge_duckdb_can_be_read_by_another_process_while_the_flow_runs(
    tmp_path,
):
    import subprocess
    import sys
    import threading

    config = parse_config(
        {"data_dir": str(tmp_path), "sinks": {"duckdb_copy_every": 1},
         "recovery": {"snapshot_interval": 0.2}}
    )
    messages = [telemetry(f"d-{i % 3}", {"ts": 1763640000000 + i, "values": {"t": float(i)}})
                for i in range(30)]
    # the messages, then 10 s of idling before the input ends
    items = [*messages, *[TestingSource.PAUSE(timedelta(seconds=0.2))] * 50]
    edge = Edge(config, name="copying", source=TestingSource(items))
    edge.output("telemetry_points", edge.devices("in").readings)
    runner = threading.Thread(target=edge.run)
    runner.start()
    copy = tmp_path / "edge-copy.duckdb"
    try:
        deadline = time.monotonic() + 30
        count = 0
        while count < 30 and time.monotonic() < deadline:
            time.sleep(0.5)
            if copy.exists():
                out = subprocess.run(
                    [sys.executable, "-c", "import duckdb,sys; print(duckdb.connect(sys.argv[1], "
                     "read_only=True).sql('select count(*) from telemetry_points').fetchall()[0][0])",
                     str(copy)],
                    capture_output=True, text=True, check=True,
                )
                count = int(out.stdout)
        assert count == 30
        assert runner.is_alive(), "the copy was read while the flow still ran"
    finally:
        runner.join(60)


def test_duckdb_copy_interval_below_a_second_is_explained(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config({"sinks": {"duckdb_copy_every": 0.5}})
    assert str(err.value) == (
        "sinks.duckdb_copy_every: must be at least 1 second (got 0.5 s); hint: each copy writes "
        "the whole database, e.g. 60"
    )
