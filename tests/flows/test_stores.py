"""Whole-edge runs over corrupt stores: the edge starts, reports once, and keeps its promises."""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import UTC, datetime

import duckdb
import pyarrow.dataset as ds
from prometheus_client import generate_latest

from connectors.cloud import CloudReceiver
from connectors.common.stores import recoveries
from flows import edge
from flows.config import parse_config
from operators.records import RawMessage
from tests.connectors.common.test_stores import scribble
from tests.flows.conftest import run_recorded
from tests.flows.test_cloud import SECRET, free_port

STORES = "edgesieve.stores"
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def readings(first: int, count: int) -> list[RawMessage]:
    return [
        RawMessage(
            f"s-{i % 4}",
            "telemetry",
            "mqtt",
            T0,
            json.dumps({"ts": 1763640000000 + i * 1000, "values": {"t": float(i % 11)}}).encode(),
        )
        for i in range(first, first + count)
    ]


def reports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STORES]


def test_random_bytes_in_the_outbox_the_edge_heals_and_the_cloud_gets_the_batches(tmp_path, caplog):
    port = free_port()
    config = parse_config(
        {
            "edge_id": "edge-01",
            "data_dir": str(tmp_path / "edge"),
            "recovery": {"enabled": False},  # each run reads its own recorded messages
            "cloud": {
                "target": f"127.0.0.1:{port}",
                "key": "edge-01",
                "secret": SECRET,
                "batch_rows": 5,
                "backoff_max": 1,
                "stop_timeout": 0.5,
            },
        }
    )
    run_recorded(edge.build, config, readings(0, 4000), name="edge")  # the cloud is down
    outbox = tmp_path / "edge" / "outbox.sqlite"
    assert outbox.stat().st_size > 200_000
    scribble(outbox)

    config = parse_config(
        {
            "edge_id": "edge-01",
            "data_dir": str(tmp_path / "edge"),
            "recovery": {"enabled": False},  # each run reads its own recorded messages
            "cloud": {
                "target": f"127.0.0.1:{port}",
                "key": "edge-01",
                "secret": SECRET,
                "batch_rows": 5,
                "backoff_max": 1,
                "stop_timeout": 30,
            },
        }
    )
    db = tmp_path / "cloud.duckdb"
    with CloudReceiver(f"127.0.0.1:{port}", db, {"edge-01": SECRET}):
        caplog.clear()
        flow = run_recorded(edge.build, config, readings(4000, 400), name="edge")
    (line,) = reports(caplog)
    assert re.match(r"outbox store .*outbox\.sqlite is corrupt \(quick_check: ", line)
    assert "NOT stored in the outbox" not in caplog.text
    assert "Traceback" not in caplog.text
    second = {s: n for r in flow.reports().values() for s, n in r.wire_rows.items()}
    with duckdb.connect(str(db), read_only=True) as con:
        stored = dict(
            con.sql("select stream, sum(rows) from uplink_batches group by stream").fetchall()
        )
    assert sum(second.values()) > 0
    for stream, rows in second.items():  # this run's rows and what was salvaged
        assert int(stored[stream]) > rows
    metrics = generate_latest(flow.meter.registry).decode()
    assert 'edgesieve_store_recoveries_total{store="outbox"} 1.0' in metrics
    assert 'edgesieve_store_recoveries_total{store="journal"} 0.0' in metrics


def test_a_corrupt_recovery_store_is_moved_aside_and_the_flow_runs(tmp_path, caplog):
    config = parse_config({"data_dir": str(tmp_path), "recovery": {"partitions": 2}})
    run_recorded(edge.build, config, readings(0, 200), name="edge")
    store = tmp_path / "recovery" / "edge"
    (store / "part-1.sqlite3").write_bytes(os.urandom(8192))
    caplog.clear()
    run_recorded(edge.build, config, readings(200, 200), name="edge")
    (line,) = reports(caplog)
    assert re.fullmatch(
        r"recovery store .*recovery/edge is corrupt \(part-1\.sqlite3: file is not a database\): "
        r"moved aside to edge\.corrupt-\d{8}T\d{6}Z and started a fresh one; the flow starts "
        r"from the journal's released offsets with empty operator state: nothing accepted is "
        r"lost, but rows already written from the replayed messages may be written again "
        r"\(Parquet, DuckDB, cloud\)\. Hint: the file was damaged outside edgesieve .*",
        line,
    )
    assert sorted(p.name for p in store.glob("part-*.sqlite3")) == [
        "part-0.sqlite3",
        "part-1.sqlite3",
    ]
    assert recoveries(tmp_path)["recovery"] == 1
    points = ds.dataset(tmp_path / "parquet" / "telemetry_points", partitioning="hive").to_table()
    assert points.num_rows > 0


def test_a_recovery_part_replaced_by_a_directory_or_the_store_by_a_file(tmp_path, caplog):
    config = parse_config({"data_dir": str(tmp_path)})
    run_recorded(edge.build, config, readings(0, 50), name="edge")
    store = tmp_path / "recovery" / "edge"
    part = store / "part-0.sqlite3"
    part.unlink()
    part.mkdir()
    run_recorded(edge.build, config, readings(50, 50), name="edge")
    assert (
        "(part-0.sqlite3: a directory is where the database file should be)" in reports(caplog)[0]
    )
    caplog.clear()
    for p in store.iterdir():
        p.unlink()
    store.rmdir()
    store.write_text("not a directory")
    run_recorded(edge.build, config, readings(100, 50), name="edge")
    assert "(a file is where the recovery directory should be)" in reports(caplog)[0]
    assert store.is_dir() and recoveries(tmp_path)["recovery"] == 2


def test_a_garbage_duckdb_file_is_replaced_and_the_flow_loads_on(tmp_path, caplog):
    config = parse_config({"data_dir": str(tmp_path), "recovery": {"enabled": False}})
    run_recorded(edge.build, config, readings(0, 100), name="edge")
    path = tmp_path / "edge.duckdb"
    path.write_bytes(os.urandom(path.stat().st_size))
    caplog.set_level(logging.INFO)
    flow = run_recorded(edge.build, config, readings(100, 100), name="edge")
    (line,) = reports(caplog)
    assert line.startswith(f"duckdb store {path} is corrupt (IO Error: The file ")
    with duckdb.connect(str(path), read_only=True) as con:
        (loaded,) = con.execute("select count(*) from telemetry_points").fetchall()[0]
    assert loaded > 0
    assert [r.messages_in for r in flow.reports().values()] == [100]


def test_a_garbage_journal_partition_is_replaced_by_the_ingest_process_and_messages_flow(
    tmp_path, mosquitto, mosquitto_pub, wait_for
):
    from flows.api import Edge
    from tests.flows.conftest import running

    config = parse_config(
        {
            "data_dir": str(tmp_path),
            "transports": {"mqtt": {"url": mosquitto.url, "client_id": "stores"}},
        }
    )

    def publish(first: int, count: int) -> Edge:
        flow = Edge(config, name="edge")
        edge.build(flow)
        with running(flow):
            for i in range(first, first + count):
                body = json.dumps({"ts": 1763640000000 + i * 1000, "values": {"t": float(i)}})
                mosquitto_pub(mosquitto, "v1/devices/pump-1/telemetry", message=body)
            wait_for(
                lambda: sum(m.totals["received"] for m in flow.meter.family()) == count,
                f"{count} messages through the flow",
            )
        return flow

    publish(0, 5)
    partition = tmp_path / "journal" / "part-0.sqlite"
    partition.write_bytes(os.urandom(max(partition.stat().st_size, 8192)))
    for sidecar in ("-wal", "-shm"):
        partition.with_name(partition.name + sidecar).unlink(missing_ok=True)
    publish(5, 5)  # the ingest process replaced the partition; the flow reads the new one
    assert recoveries(tmp_path)["journal"] == 1
    points = ds.dataset(tmp_path / "parquet" / "telemetry_points", partitioning="hive").to_table()
    assert sorted(points.column("value").to_pylist()) == [float(i) for i in range(10)]


def test_salvaged_journal_messages_go_through_a_deployed_edge_once(
    tmp_path, mosquitto, mosquitto_pub, wait_for
):
    from connectors.common.stores import salvage_rows
    from connectors.devices.journal import Journal, JournalReader, JournalSettings
    from flows.api import Edge
    from tests.connectors.common.test_stores import scribble
    from tests.flows.conftest import running

    root = tmp_path / "journal"
    with Journal(JournalSettings(root=root, partitions=1, device_share=1.0)) as journal:
        futures = [
            journal.submit(
                RawMessage(
                    "pump-1",
                    "telemetry",
                    "mqtt",
                    T0,
                    json.dumps(
                        {"ts": 1763640000000 + i * 1000, "values": {"t": float(i * 10)}}
                    ).encode(),
                )
            )
            for i in range(3000)
        ]
        assert [f.result(10).offset for f in futures] == list(range(3000))
        with JournalReader(root, 0) as reader:
            reader.release("edge", 999)  # the flow processed the first 1000 in an earlier run
    partition = root / "part-0.sqlite"
    scribble(partition)
    config = parse_config(
        {
            "data_dir": str(tmp_path),
            "recovery": {"enabled": False},
            "transports": {"mqtt": {"url": mosquitto.url, "client_id": "salvage"}},
        }
    )
    flow = Edge(config, name="edge")
    edge.build(flow)
    with running(flow):
        wait_for(lambda: recoveries(tmp_path)["journal"] == 1, "the partition replaced")
        (moved,) = [p for p in root.glob("part-0.sqlite.corrupt-*") if "-" not in p.name[-4:]]
        rows, whole = salvage_rows(moved, "messages", ("payload",))
        expected = sorted(json.loads(payload)["values"]["t"] for seq, payload in rows if seq > 999)
        assert not whole and 1000 < len(expected) < 2000
        wait_for(
            lambda: sum(m.totals["received"] for m in flow.meter.family()) == len(expected),
            "the salvaged messages through the flow",
        )
    points = ds.dataset(tmp_path / "parquet" / "telemetry_points", partitioning="hive").to_table()
    assert sorted(points.column("value").to_pylist()) == expected  # each once, none before 1000
