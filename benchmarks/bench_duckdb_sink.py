"""DuckDB sink: rows/s loaded versus DuckDB's own Arrow ingest of the same table.

One ``telemetry_points`` Arrow table of ``--rows`` rows (``--devices``
devices), in fresh database files in one temporary directory:

1. baseline: ``CREATE TABLE`` with the stream's columns, then
   ``INSERT INTO t SELECT * FROM arrow_tbl`` of the whole table, one
   transaction. What DuckDB alone does with this data on this disk.
2. baseline, chunked: the same, one ``INSERT`` and commit per ``--max-rows``
   rows (the sink's flush size), so the commit count matches the sink's.
3. sink partition: ``DuckDBSink.build_part`` fed the table in ``--batch``-row
   slices through ``write_batch`` (flushes every ``--max-rows`` rows: one
   transaction with the rows, their flush id and the bookkeeping row), then
   ``close()``.
4. sink in a dataflow: ``TestingSource`` of ``(device, slice)`` Arrow items →
   ``DuckDBSink`` under ``run_main``, with ``--partitions`` partitions.

Prints rows/s of each and the ratios sink/baseline (target >= 0.5).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import duckdb
import numpy as np
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main

from connectors.sinks.duckdb import DuckDBSettings, DuckDBSink
from connectors.streams import STREAMS, UTC_US

POINTS = STREAMS["telemetry_points"]


def make_table(rows: int, devices: int) -> pa.Table:
    rng = np.random.default_rng(7)
    start = int(datetime(2025, 11, 22, tzinfo=UTC).timestamp() * 1_000_000)
    names = np.array([f"dev-{i}" for i in range(devices)], dtype=object)
    return pa.table(
        {
            "device": pa.array(names[np.arange(rows) % devices], pa.string()),
            "key": pa.array(np.where(np.arange(rows) % 2, "temp", "hum"), pa.string()),
            "ts": pa.array(start + np.arange(rows) * 1000, pa.int64()).cast(UTC_US),
            "value": pa.array(rng.normal(20, 3, rows), pa.float64()),
            "transport": pa.array(["mqtt"] * rows, pa.string()),
        },
        schema=POINTS.schema,
    )


def baseline(path: Path, table: pa.Table, chunk: int | None) -> float:
    con = duckdb.connect(str(path))
    con.register("empty_tbl", table.slice(0, 0))
    con.execute("CREATE TABLE t AS SELECT * FROM empty_tbl")
    start = time.perf_counter()
    step = chunk or table.num_rows
    for offset in range(0, table.num_rows, step):
        con.register("arrow_tbl", table.slice(offset, step))
        con.execute("BEGIN")
        con.execute("INSERT INTO t SELECT * FROM arrow_tbl")
        con.execute("COMMIT")
    elapsed = time.perf_counter() - start
    assert con.execute("SELECT count(*) FROM t").fetchone() == (table.num_rows,)
    con.close()
    return table.num_rows / elapsed


def sink_partition(path: Path, table: pa.Table, batch: int, max_rows: int) -> float:
    settings = DuckDBSettings(max_rows=max_rows, max_age=timedelta(hours=1))
    part = DuckDBSink(path, POINTS.name, settings=settings).build_part("bench", "p0", None)
    slices = [table.slice(o, batch) for o in range(0, table.num_rows, batch)]
    start = time.perf_counter()
    for piece in slices:
        part.write_batch([piece])
    part.close()
    elapsed = time.perf_counter() - start
    check(path, table.num_rows)
    return table.num_rows / elapsed


def sink_dataflow(path: Path, table: pa.Table, batch: int, max_rows: int, parts: int) -> float:
    settings = DuckDBSettings(max_rows=max_rows, max_age=timedelta(hours=1))
    items = [
        (f"dev-{i % 97}", table.slice(o, batch))
        for i, o in enumerate(range(0, table.num_rows, batch))
    ]
    flow = Dataflow("bench_duckdb")
    stream = op.input("in", flow, TestingSource(items, batch_size=16))
    op.output("out", stream, DuckDBSink(path, POINTS.name, settings=settings, partitions=parts))
    start = time.perf_counter()
    run_main(flow)
    elapsed = time.perf_counter() - start
    check(path, table.num_rows)
    return table.num_rows / elapsed


def check(path: Path, rows: int) -> None:
    con = duckdb.connect(str(path))
    got = con.execute(f"SELECT count(*) FROM {POINTS.name}").fetchone()
    con.close()
    assert got == (rows,), got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--batch", type=int, default=5_000, help="rows per write_batch item")
    parser.add_argument("--max-rows", type=int, default=500_000, help="DuckDBSettings.max_rows")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    table = make_table(args.rows, args.devices)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        base = baseline(tmp_path / "base.duckdb", table, None)
        base_chunked = baseline(tmp_path / "base-chunked.duckdb", table, args.max_rows)
        part = sink_partition(tmp_path / "part.duckdb", table, args.batch, args.max_rows)
        flow = sink_dataflow(
            tmp_path / "flow.duckdb", table, args.batch, args.max_rows, args.partitions
        )
    rows = [
        ("baseline: INSERT ... SELECT * FROM arrow_tbl, one commit", base),
        (f"baseline: same, one commit per {args.max_rows:,} rows", base_chunked),
        ("DuckDBSink partition: write_batch + close", part),
        (f"DuckDBSink in a dataflow: {args.partitions} partitions, run_main", flow),
    ]
    print(f"rows: {args.rows:,}  write_batch: {args.batch:,} rows  max_rows: {args.max_rows:,}")
    for label, rate in rows:
        print(f"{label:<60} {rate:14,.0f} rows/s")
    print(f"ratio partition / baseline         : {part / base:.2f}")
    print(f"ratio partition / chunked baseline : {part / base_chunked:.2f}")
    print(f"ratio dataflow / baseline          : {flow / base:.2f}  (target >= 0.5)")


if __name__ == "__main__":
    main()
