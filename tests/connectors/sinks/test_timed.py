from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.sinks.duckdb import DuckDBSettings, DuckDBSink
from connectors.sinks.timed import encode_buffer
from connectors.streams import STREAMS, to_table
from operators.records import Reading
from tests.connectors.sinks.test_parquet_exactly_once import readings

POINTS = "telemetry_points"
ZSTD = pa.ipc.IpcWriteOptions(compression="zstd")
"""How snapshots encoded buffered rows before LZ4."""

finite = st.floats(allow_nan=False, allow_infinity=False)
reading = st.builds(
    Reading,
    device=st.text(min_size=1, max_size=12),
    key=st.text(min_size=1, max_size=12),
    ts=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    value=finite,
    transport=st.sampled_from(["mqtt", "http", "coap"]),
)


def zstd_encoded(data: bytes) -> bytes:
    table = pa.ipc.open_stream(data).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=ZSTD) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@settings(max_examples=60, deadline=None)
@given(st.lists(reading, max_size=40))
def test_encoded_buffers_read_back_as_the_same_rows(rows: list[Reading]) -> None:
    table = to_table(STREAMS[POINTS], rows)
    assert pa.ipc.open_stream(encode_buffer(table)).read_all().equals(table)


def test_a_snapshot_buffer_written_with_zstd_resumes_every_row(tmp_path: Path) -> None:
    db = tmp_path / "edge.duckdb"
    settings = DuckDBSettings(max_age=timedelta(hours=1), flush_on_snapshot=False)
    part = DuckDBSink(db, POINTS, settings=settings).build_part("s", "p0", None)
    part.write_batch(readings(9))
    state = part.snapshot()
    part.close()
    older = state | {"buffer": [zstd_encoded(b) for b in state["buffer"]]}
    assert older["buffer"] != state["buffer"]
    again = DuckDBSink(db, POINTS, settings=settings).build_part("s", "p0", older)
    assert again.flushes_removed == 1  # the close's flush, written after the snapshot
    again.close()
    con = duckdb.connect(str(db))
    try:
        values = con.execute(f"SELECT value FROM {POINTS} ORDER BY value").fetchall()
    finally:
        con.close()
    assert values == [(float(i),) for i in range(9)]
