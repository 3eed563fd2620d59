from __future__ import annotations

import logging
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import duckdb
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main, run_main

from connectors.sinks import duckdb_file
from connectors.sinks.duckdb import DuckDBSettings, DuckDBSink, DuckDBSinkPartition, copy_database
from connectors.streams import STREAMS, to_table
from tests.connectors.sinks.test_parquet_exactly_once import readings

POINTS = "telemetry_points"
LOGGER = "edgesieve.duckdb"


def run_flow(items: list[Any], sink: DuckDBSink, *, workers: int = 1) -> None:
    flow = Dataflow("duck")
    stream = op.input("in", flow, TestingSource(items, batch_size=50))
    if workers > 1:
        stream = op.redistribute("spread", stream)
    keyed = op.key_on("key", stream, lambda r: str(getattr(r, "device", "arrow")))
    op.output("out", keyed, sink)
    if workers > 1:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    else:
        run_main(flow)


def reencoded(data: bytes, codec: str) -> bytes:
    """A snapshot buffer's Arrow IPC stream written again with ``codec``."""
    table = pa.ipc.open_stream(data).read_all()
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=codec)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(path))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_round_trip_and_view_has_exactly_the_stream_columns(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    data = readings(500)
    run_flow(data, DuckDBSink(db, POINTS))
    columns = query(db, f"DESCRIBE {POINTS}")
    assert [(c[0], c[1]) for c in columns] == [
        ("device", "VARCHAR"),
        ("key", "VARCHAR"),
        ("ts", "TIMESTAMP WITH TIME ZONE"),
        ("value", "DOUBLE"),
        ("transport", "VARCHAR"),
    ]
    rows = query(db, f"SELECT device, key, ts, value, transport FROM {POINTS} ORDER BY value")
    assert rows == [(r.device, r.key, r.ts, r.value, r.transport) for r in data]
    flushes = query(db, "SELECT sink, stream, sum(rows) FROM edgesieve.flushes GROUP BY ALL")
    assert flushes == [("duck.out", POINTS, 500)]


def test_every_standard_stream_gets_a_table_and_view(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    for name, spec in STREAMS.items():
        part = DuckDBSink(db, name).build_part("s", "p0", None)
        part.write_batch([spec.schema.empty_table()])
        part.close()
        view = query(db, f"DESCRIBE {name}")
        assert [c[0] for c in view] == spec.columns


def test_two_workers_share_one_database(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    data = readings(3000)
    settings = DuckDBSettings(max_rows=97)
    run_flow(data, DuckDBSink(db, POINTS, settings=settings, partitions=5), workers=2)
    values = [v for (v,) in query(db, f"SELECT value FROM {POINTS} ORDER BY value")]
    assert values == [float(i) for i in range(3000)]
    parts = query(db, "SELECT DISTINCT part FROM edgesieve.flushes ORDER BY part")
    assert len(parts) == 5


def test_arrow_items_are_loaded(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    table = to_table(STREAMS[POINTS], readings(100))
    part = DuckDBSink(db, POINTS).build_part("s", "p0", None)
    part.write_batch([table.slice(0, 60), table.slice(60).to_batches()[0]])
    part.close()
    assert query(db, f"SELECT count(*), sum(value) FROM {POINTS}") == [(100, sum(range(100)))]


def test_flush_by_rows_age_and_on_snapshot(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    sink = DuckDBSink(
        db, POINTS, settings=DuckDBSettings(max_rows=10, max_age=timedelta(milliseconds=100))
    )
    part = sink.build_part("s", "p0", None)
    part.write_batch(readings(12))
    assert part.rows_written == 12 and part.buffered_rows == 0
    part.write_batch(readings(3))
    state = part.snapshot()
    assert state == {"version": 1, "next_seq": 2, "buffer": []}
    part.write_batch(readings(2))
    deadline = 50
    while part.buffered_rows and deadline:
        deadline -= 1
        part._stop.wait(0.05)
    assert part.buffered_rows == 0
    part.close()
    assert part.flushes_written == 3


@pytest.mark.parametrize("codec", ["lz4", "zstd"])  # zstd: how snapshots were encoded before
def test_without_flush_on_snapshot_the_state_holds_the_rows(tmp_path: Path, codec: str) -> None:
    db = tmp_path / "edge.duckdb"
    settings = DuckDBSettings(max_age=timedelta(hours=1), flush_on_snapshot=False)
    part = DuckDBSink(db, POINTS, settings=settings).build_part("s", "p0", None)
    part.write_batch(readings(7))
    state = part.snapshot()
    assert state["next_seq"] == 0 and len(state["buffer"]) == 1
    part.close()
    state["buffer"] = [reencoded(data, codec) for data in state["buffer"]]
    # Resumed from that snapshot: the flush made on close is removed, the rows restored.
    again = DuckDBSink(db, POINTS, settings=settings).build_part("s", "p0", state)
    assert again.flushes_removed == 1
    again.close()
    values = query(db, f"SELECT value FROM {POINTS} ORDER BY value")
    assert values == [(float(i),) for i in range(7)]


class FailingCursor:
    """Injects a DuckDB I/O error into INSERTs; everything else goes to the real cursor."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, failures: int) -> None:
        self.cur = cur
        self.failures = failures

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith('INSERT INTO edgesieve."') and self.failures:
            self.failures -= 1
            msg = "could not write file: No space left on device"
            raise duckdb.IOException(msg)
        return self.cur.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cur, name)


def test_failing_flush_keeps_rows_and_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "edge.duckdb"
    settings = DuckDBSettings(max_rows=5, retry_interval=timedelta(0))
    part = DuckDBSink(db, POINTS, settings=settings).build_part("s", "p0", None)
    part._cur = FailingCursor(part._cur, failures=2)  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        part.write_batch(readings(6))
        part.write_batch(readings(6))
    assert part.write_failures == 2 and part.buffered_rows == 12
    state = part.snapshot()  # flush on snapshot: succeeds now
    assert state == {"version": 1, "next_seq": 1, "buffer": []}
    assert part.buffered_rows == 0
    part._cur = part._cur.cur  # type: ignore[attr-defined]
    part.close()
    assert query(db, f"SELECT count(*) FROM {POINTS}") == [(12,)]
    assert query(db, "SELECT count(*) FROM edgesieve.flushes") == [(1,)]
    assert (
        "DuckDBSink 's' (stream 'telemetry_points', partition p0): could not load 6 rows into "
        'edgesieve."telemetry_points"' in caplog.text
    )
    assert "Hint: free disk space on that volume" in caplog.text


def test_changed_stream_schema_is_refused_with_a_hint(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    query(db, "CREATE SCHEMA edgesieve")
    query(db, 'CREATE TABLE edgesieve."telemetry_points" (device VARCHAR, _flush BIGINT)')
    with pytest.raises(ValueError, match=r"has columns device VARCHAR, _flush BIGINT; the stream"):
        DuckDBSink(db, POINTS).build_part("s", "p0", None)
    assert duckdb_file.DATABASES == {}


def test_an_object_in_the_way_of_the_view_is_reported(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    query(db, "CREATE TABLE telemetry_points (x INT)")
    with pytest.raises(ValueError, match=r"cannot create the view main\.telemetry_points"):
        DuckDBSink(db, POINTS).build_part("s", "p0", None)


def test_bad_resume_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"is not a version-1 state \(got \{'seq': 3\}\)"):
        DuckDBSink(tmp_path / "e.duckdb", POINTS).build_part("s", "p0", {"seq": 3})


def test_another_process_cannot_open_it_while_the_edge_writes(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    part: DuckDBSinkPartition = DuckDBSink(db, POINTS).build_part("s", "p0", None)
    part.write_batch(readings(10))
    part.snapshot()
    code = (
        "import duckdb, sys\n"
        "try:\n    duckdb.connect(sys.argv[1], read_only=True)\n"
        "except duckdb.IOException as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(db)], capture_output=True, text=True, check=True
    )
    assert "Could not set lock on file" in out.stdout
    # The documented way out: a copy made by the writing process, opened read-only.
    copy = tmp_path / "edge-copy.duckdb"
    copy_database(db, copy)
    reader = duckdb.connect(str(copy), read_only=True)
    assert reader.execute(f"SELECT count(*) FROM {POINTS}").fetchall() == [(10,)]
    reader.close()
    part.close()


def test_a_copy_under_way_keeps_the_database_open_while_the_last_sink_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    db = tmp_path / "edge.duckdb"
    part: DuckDBSinkPartition = DuckDBSink(db, POINTS).build_part("s", "p0", None)
    part.write_batch(readings(10))
    part.snapshot()
    copying, closed = threading.Event(), threading.Event()
    current = duckdb_file._current

    def slow_current(con: duckdb.DuckDBPyConnection) -> str:
        copying.set()
        assert closed.wait(10)  # the sink closes while the copy is under way
        return current(con)

    monkeypatch.setattr(duckdb_file, "_current", slow_current)
    copy = tmp_path / "edge-copy.duckdb"
    copier = threading.Thread(target=copy_database, args=(db, copy))
    copier.start()
    assert copying.wait(10)
    part.close()  # the fault was "connection is busy with another call" here
    closed.set()
    copier.join(10)
    assert not copier.is_alive() and copy.exists()
    reader = duckdb.connect(str(copy), read_only=True)
    assert reader.execute(f"SELECT count(*) FROM {POINTS}").fetchall() == [(10,)]
    reader.close()
    assert str(db.resolve()) not in {str(k) for k in duckdb_file.DATABASES}  # closed by the copy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_rows": 0}, r"DuckDBSettings\.max_rows must be a positive int; got 0"),
        ({"max_age": timedelta(0)}, r"DuckDBSettings\.max_age must be a positive"),
        ({"retry_interval": -1}, r"DuckDBSettings\.retry_interval must be a non-negative"),
        ({"flush_on_snapshot": "yes"}, r"DuckDBSettings\.flush_on_snapshot must be a bool"),
    ],
)
def test_settings_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DuckDBSettings(**kwargs)


def test_sink_argument_errors(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    with pytest.raises(TypeError, match=r"DuckDBSink\('telemetry_points'\): settings must be"):
        DuckDBSink(db, POINTS, settings={})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"on_write must be callable as on_write\(stream, rows"):
        DuckDBSink(db, POINTS, on_write=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"path '.*' is a directory; it must name the database"):
        DuckDBSink(tmp_path, POINTS)
    with pytest.raises(ValueError, match=r"partitions must be an int from 1 to 1024; got 0"):
        DuckDBSink(db, POINTS, partitions=0)
    with pytest.raises(ValueError, match=r"recovery_dir '.*nowhere' is not a directory"):
        DuckDBSink(db, POINTS, recovery_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"DuckDBSink: unknown stream 'x'"):
        DuckDBSink(db, "x")


def test_on_write_reports_each_flush(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    sink = DuckDBSink(
        tmp_path / "e.duckdb",
        POINTS,
        settings=DuckDBSettings(max_rows=4),
        on_write=lambda s, r, b: calls.append((s, r, b)),
    )
    part = sink.build_part("s", "p0", None)
    part.write_batch(readings(5))
    part.close()
    assert [(s, r) for s, r, _ in calls] == [(POINTS, 5)]
    assert calls[0][2] > 0
