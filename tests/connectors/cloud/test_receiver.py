"""The cloud receiver: a real gRPC server and client on loopback, the DuckDB file read back."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import grpc
import numpy as np
import pyarrow as pa
import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.cloud import (
    AuthError,
    CloudReceiver,
    EdgeAuth,
    EdgeCredentials,
    ReceiverError,
    ReceiverLimits,
    ReceiverTls,
    batches,
    load_auth,
    serve,
)
from connectors.cloud.limits import DecodeBudget, measure_ipc
from connectors.streams import STREAMS, UTC_US
from connectors.uplink.outbox import Outbox
from connectors.uplink.seal import seal
from connectors.uplink.sender import UplinkSender
from connectors.uplink.settings import UplinkSettings
from connectors.uplink.wire import (
    KEY_HEADER,
    SECRET_HEADER,
    UNAUTHENTICATED_DETAIL,
    batch_id_of,
)
from protos import uplink_pb2, uplink_pb2_grpc
from tests.conftest import wait_for

ROOT = Path(__file__).parents[3]
SECRET_01 = "s3cret-edge-01-Qx7vN2kLp9"
SECRET_02 = "s3cret-edge-02-Wm4hT8rZc1"
EDGES = {"edge-01": SECRET_01, "edge-02": SECRET_02}
AUTH_01 = ((KEY_HEADER, "edge-01"), (SECRET_HEADER, SECRET_01))
AUTH_02 = ((KEY_HEADER, "edge-02"), (SECRET_HEADER, SECRET_02))
T0 = datetime(2025, 11, 22, 8, 0, tzinfo=UTC)
CALL_TIMEOUT_S = 10.0
STORED = uplink_pb2.Ack.STORED
DUPLICATE = uplink_pb2.Ack.DUPLICATE
REJECTED = uplink_pb2.Ack.REJECTED
SECRET_HINT = "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
AUTH_YAML = f"""\
# edges allowed to push
edges:
  - {{key: edge-01, secret: "{SECRET_01}"}}
  - key: edge-02
    secret: {SECRET_02}
"""


# ---------------------------------------------------------------- helpers


def summary_table(n: int, device: str = "pump-7", start: int = 0) -> pa.Table:
    starts = [T0 + timedelta(minutes=start + i) for i in range(n)]
    return pa.table(
        {
            "device": [device] * n,
            "key": ["temperature"] * n,
            "window_start": pa.array(starts, type=UTC_US),
            "window_end": pa.array([s + timedelta(minutes=1) for s in starts], type=UTC_US),
            "count": pa.array(range(10, 10 + n), type=pa.int64()),
            "mean": [20.0 + i for i in range(n)],
            "min": [19.0 + i for i in range(n)],
            "max": [21.0 + i for i in range(n)],
            "std": [0.5] * n,
            "first": [19.5 + i for i in range(n)],
            "last": [20.5 + i for i in range(n)],
        },
        schema=STREAMS["telemetry_summary"].schema,
    )


def alarms_table(n: int, device: str = "pump-7") -> pa.Table:
    return pa.table(
        {
            "device": [device] * n,
            "ts": pa.array([T0 + timedelta(seconds=i) for i in range(n)], type=UTC_US),
            "rule": ["temp-high"] * n,
            "state": ["raised" if i % 2 == 0 else "cleared" for i in range(n)],
            "severity": ["critical"] * n,
            "value": [80.0 + i for i in range(n)],
            "key": ["temperature"] * n,
        },
        schema=STREAMS["alarms"].schema,
    )


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


LABELS: dict[str, str] = {}
"""Real batch id -> the short name a test gave it (acks and queries show the name)."""


def make_batch(
    label: str,
    stream: str,
    table: pa.Table,
    *,
    edge: str = "edge-01",
    raw_bytes: int | None = None,
    rows: int | None = None,
    priority: int = 1,
    batch_id: str | None = None,
) -> uplink_pb2.Batch:
    """A batch with the id its content gives (``batch_id`` forces another), named ``label``."""
    arrow_ipc = ipc(table)
    real = batch_id_of(edge, stream, arrow_ipc)
    LABELS[real] = label
    return uplink_pb2.Batch(
        edge_id=edge,
        batch_id=real if batch_id is None else batch_id,
        stream=stream,
        priority=priority,
        rows=table.num_rows if rows is None else rows,
        arrow_ipc=arrow_ipc,
        raw_bytes=100 * table.num_rows if raw_bytes is None else raw_bytes,
        created_at_us=int((T0 - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000),
    )


def channel(port: int, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(f"127.0.0.1:{port}")
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials)


def push(
    port: int,
    batches: Iterable[uplink_pb2.Batch],
    *,
    metadata: Iterable[tuple[str, str]] | None = AUTH_01,
    credentials: grpc.ChannelCredentials | None = None,
) -> list[uplink_pb2.Ack]:
    """One Push call; every Ack, or the RpcError the call ended with."""
    with channel(port, credentials) as chan:
        stub = uplink_pb2_grpc.UplinkStub(chan)
        call = stub.Push(
            iter(list(batches)),
            metadata=tuple(metadata) if metadata is not None else None,
            timeout=CALL_TIMEOUT_S,
        )
        return list(call)


def push_error(port: int, batches: Iterable[uplink_pb2.Batch], **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        push(port, batches, **kwargs)
    return info.value


def statuses(acks: list[uplink_pb2.Ack]) -> list[tuple[str, str]]:
    return [(label(ack.batch_id), uplink_pb2.Ack.Status.Name(ack.status)) for ack in acks]


@pytest.fixture(autouse=True)
def _fresh_labels() -> Iterator[None]:
    LABELS.clear()
    yield
    LABELS.clear()


def real_id(name: str) -> str:
    """The real batch id of the one batch of this test named ``name``."""
    (found,) = [real for real, given in LABELS.items() if given == name]
    return found


def label(value: Any) -> Any:
    """The test's name for a real batch id; any other value as it is."""
    return LABELS.get(value, value) if isinstance(value, str) else value


def query(db: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Read the receiver's DuckDB file (after the receiver is stopped); batch ids as labels."""
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(sql, params or []).fetchall()
    return [tuple(label(value) for value in row) for row in rows]


def tables(db: Path) -> set[str]:
    return {row[0] for row in query(db, "SELECT table_name FROM duckdb_tables()")}


def printed(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def write_auth(tmp_path: Path, text: str | bytes, name: str = "auth.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cloud.duckdb"


@pytest.fixture
def start_receiver(db: Path) -> Iterator[Callable[..., CloudReceiver]]:
    """Start receivers on an ephemeral loopback port; all are stopped at teardown."""
    started: list[CloudReceiver] = []

    def start(**kwargs: Any) -> CloudReceiver:
        kwargs.setdefault("db", db)
        kwargs.setdefault("edges", EDGES)
        receiver = CloudReceiver(kwargs.pop("listen", "127.0.0.1:0"), **kwargs).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop(grace=0.5)


@pytest.fixture
def receiver(start_receiver: Callable[..., CloudReceiver]) -> CloudReceiver:
    return start_receiver()


# ---------------------------------------------------------------- storing


def test_batches_of_two_streams_are_stored_with_their_accounting(receiver, db, caplog):
    caplog.set_level(logging.DEBUG, logger="edgesieve.cloud")
    s1, s2, a1 = summary_table(3), summary_table(2, device="fan-1", start=10), alarms_table(4)
    batches = [
        make_batch("b-sum-1", "telemetry_summary", s1, raw_bytes=12_345),
        make_batch("b-alarm-1", "alarms", a1, raw_bytes=999, priority=0),
        make_batch("b-sum-2", "telemetry_summary", s2, raw_bytes=7),
    ]
    before = datetime.now(UTC)
    acks = push(receiver.port, batches)
    after = datetime.now(UTC)
    assert statuses(acks) == [
        ("b-sum-1", "STORED"),
        ("b-alarm-1", "STORED"),
        ("b-sum-2", "STORED"),
    ]
    assert all(ack.detail == "" for ack in acks)
    receiver.stop()

    assert {"uplink_batches", "telemetry_summary", "alarms"} <= tables(db)
    rows = query(
        db,
        "SELECT batch_id, edge_id, stream, rows, raw_bytes, wire_bytes, priority, created_at, "
        "received_at FROM uplink_batches ORDER BY received_at",
    )
    expected = [
        (label(b.batch_id), "edge-01", b.stream, b.rows, b.raw_bytes, b.ByteSize(), b.priority, T0)
        for b in batches
    ]
    assert [row[:8] for row in rows] == expected
    assert all(before <= row[8] <= after and row[8].utcoffset() == timedelta(0) for row in rows)
    assert sum(row[5] for row in rows) == sum(len(b.SerializeToString()) for b in batches)

    with duckdb.connect(str(db), read_only=True) as con:
        got = con.sql(
            "SELECT * EXCLUDE (edge_id, batch_id) FROM telemetry_summary ORDER BY window_start"
        ).to_arrow_table()
        assert got.cast(STREAMS["telemetry_summary"].schema).equals(pa.concat_tables([s1, s2]))
        columns = dict(
            con.execute(
                "SELECT column_name, data_type FROM duckdb_columns() "
                "WHERE table_name = 'telemetry_summary'"
            ).fetchall()
        )
        assert list(columns)[-2:] == ["edge_id", "batch_id"]
        assert columns["window_start"] == "TIMESTAMP WITH TIME ZONE"
        assert columns["count"] == "BIGINT"
    per_batch = query(db, "SELECT batch_id, edge_id, count(*) FROM telemetry_summary GROUP BY ALL")
    assert sorted(per_batch) == [("b-sum-1", "edge-01", 3), ("b-sum-2", "edge-01", 2)]
    alarms = query(
        db,
        "SELECT device, ts, rule, state, severity, value, key, edge_id, batch_id "
        "FROM alarms ORDER BY ts",
    )
    assert [row[:7] for row in alarms] == [tuple(r.values()) for r in a1.to_pylist()]
    assert {row[7:] for row in alarms} == {("edge-01", "b-alarm-1")}

    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(
        f"batch {batches[1].batch_id!r} (alarms, 4 rows, 999 raw bytes" in line and "STORED" in line
        for line in debug
    )
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Push from")]
    assert len(summary) == 1
    assert re.search(
        r"Push from edge edge-01 \(.+\) ended after [\d.]+ s: 3 batch\(es\): 3 stored, "
        r"0 duplicate, 0 rejected; 9 rows, 13351 raw bytes stored",
        summary[0],
    )
    assert SECRET_01 not in caplog.text


def test_compact_wire_types_are_stored_with_the_streams_types(receiver, db):
    """float32 features and dictionary strings, as the cloud sink seals big batches."""
    spec = STREAMS["vibration_features"]
    rng = np.random.default_rng(3)
    n = 300
    table = pa.table(
        {
            "device": [f"pump-{i % 4}" for i in range(n)],
            "axis": ["xyz"[i % 3] for i in range(n)],
            "ts": pa.array([T0 + timedelta(seconds=i) for i in range(n)], UTC_US),
            "window_s": [0.96] * n,
            "sample_rate_hz": [25_600] * n,
            "band_energy": [rng.random(3).tolist() for _ in range(n)],
            **{
                name: rng.random(n)
                for name in (
                    "rms",
                    "velocity_rms_mm_s",
                    "peak",
                    "crest_factor",
                    "kurtosis",
                    "dominant_hz",
                    "dominant_amplitude",
                )
            },
            "iso_zone": ["A"] * n,
            "frames": [6] * n,
            "transport": ["mqtt"] * n,
        },
        schema=spec.schema,
    )
    sealed = seal("edge-01", "vibration_features", table, priority=1, raw_bytes=100)
    batch = uplink_pb2.Batch.FromString(sealed.payload)
    sent = pa.ipc.open_stream(batch.arrow_ipc).schema
    assert sent.field("rms").type == pa.float32()
    assert sent.field("device").type == pa.dictionary(pa.int32(), pa.string())
    assert statuses(push(receiver.port, [batch])) == [(batch.batch_id, "STORED")]
    receiver.stop()
    with duckdb.connect(str(db), read_only=True) as con:
        types = dict(
            con.execute(
                "SELECT column_name, data_type FROM duckdb_columns() "
                "WHERE table_name = 'vibration_features'"
            ).fetchall()
        )
        got = con.sql(
            "SELECT * EXCLUDE (edge_id, batch_id) FROM vibration_features ORDER BY ts"
        ).to_arrow_table()
    assert types["rms"] == "DOUBLE" and types["device"] == "VARCHAR"
    assert types["band_energy"] == "DOUBLE[]"
    assert got.column("device").to_pylist() == table.column("device").to_pylist()
    np.testing.assert_allclose(
        got.column("rms").to_numpy(), table.column("rms").to_numpy(), rtol=1e-7
    )


def test_a_repeated_batch_id_is_acknowledged_duplicate_and_not_stored_again(receiver, db):
    batch = make_batch("b-1", "alarms", alarms_table(3))
    assert statuses(push(receiver.port, [batch, batch])) == [
        ("b-1", "STORED"),
        ("b-1", "DUPLICATE"),
    ]
    assert statuses(push(receiver.port, [batch])) == [("b-1", "DUPLICATE")]
    receiver.stop()
    assert query(db, "SELECT count(*) FROM alarms") == [(3,)]
    assert query(db, "SELECT batch_id, rows FROM uplink_batches") == [("b-1", 3)]


def test_no_edge_can_squat_or_overwrite_another_edges_batch_id(receiver, db):
    real = make_batch("edge-01's", "alarms", alarms_table(2))
    squat = make_batch("squat", "alarms", alarms_table(5), edge="edge-02", batch_id=real.batch_id)
    copied = uplink_pb2.Batch()
    copied.CopyFrom(real)
    copied.edge_id = "edge-02"  # edge-01's very bytes and id, sent as edge-02's
    acks = push(receiver.port, [squat, copied], metadata=AUTH_02)
    assert statuses(acks) == [("edge-01's", "REJECTED"), ("edge-01's", "REJECTED")]
    for ack in acks:
        assert re.fullmatch(
            rf"batch_id '{real.batch_id}' is not the id of this batch's content \([0-9a-f]{{64}}\): "
            r"the hex SHA-256 over edge id, stream and arrow_ipc \(see docs/uplink.md\); the "
            r"batch was built wrongly or corrupted",
            ack.detail,
        ), ack.detail
    assert statuses(push(receiver.port, [real])) == [("edge-01's", "STORED")]
    receiver.stop()
    assert query(db, "SELECT edge_id, count(*) FROM alarms GROUP BY ALL") == [("edge-01", 2)]
    assert query(db, "SELECT edge_id, reason, count FROM uplink_refusals") == [
        ("edge-02", "batch_id_mismatch", 2)
    ]


def test_concurrent_edges_are_all_stored(receiver, db):
    per_edge = 8
    barrier = threading.Barrier(2, timeout=10)
    results: dict[str, list[tuple[str, str]]] = {}
    errors: list[BaseException] = []

    def run(edge: str, auth: tuple[tuple[str, str], ...]) -> None:
        try:
            barrier.wait()
            batches = [
                make_batch(
                    f"{edge}-{i}", "telemetry_summary", summary_table(5, start=5 * i), edge=edge
                )
                for i in range(per_edge)
            ]
            results[edge] = statuses(push(receiver.port, batches, metadata=auth))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=("edge-01", AUTH_01)),
        threading.Thread(target=run, args=("edge-02", AUTH_02)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not errors, errors
    for edge in ("edge-01", "edge-02"):
        assert results[edge] == [(f"{edge}-{i}", "STORED") for i in range(per_edge)]
    receiver.stop()
    assert query(db, "SELECT edge_id, count(*) FROM telemetry_summary GROUP BY ALL ORDER BY 1") == [
        ("edge-01", 5 * per_edge),
        ("edge-02", 5 * per_edge),
    ]
    assert query(db, "SELECT count(*) FROM uplink_batches") == [(2 * per_edge,)]


def test_extra_columns_are_not_stored_and_the_ack_says_so(receiver, db):
    table = alarms_table(2).append_column("humidity", pa.array([0.5, 0.6]))
    (ack,) = push(receiver.port, [make_batch("b-x", "alarms", table)])
    assert ack.status == STORED
    assert ack.detail == "stored without column(s) humidity, which stream 'alarms' does not define"
    receiver.stop()
    names = [
        row[0]
        for row in query(db, "SELECT column_name FROM duckdb_columns() WHERE table_name = 'alarms'")
    ]
    assert names == [*STREAMS["alarms"].schema.names, "edge_id", "batch_id"]


def test_an_empty_batch_is_recorded_without_rows(receiver, db):
    (ack,) = push(receiver.port, [make_batch("b-0", "alarms", alarms_table(0), raw_bytes=0)])
    assert ack.status == STORED
    receiver.stop()
    assert query(db, "SELECT count(*) FROM alarms") == [(0,)]
    assert query(db, "SELECT rows FROM uplink_batches") == [(0,)]


# ---------------------------------------------------------------- streams the receiver does not know


def pump_curves(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "pump": [f"pump-{i % 2}" for i in range(start, start + n)],
            "ts": pa.array([T0 + timedelta(seconds=i) for i in range(start, start + n)], UTC_US),
            "flow_m3_h": [float(i) for i in range(start, start + n)],
            "head_m": pa.array([[1.0, float(i)] for i in range(start, start + n)]),
        }
    )


def test_a_new_stream_creates_its_table_and_later_batches_append(receiver, db):
    assert "pump_curves" not in STREAMS
    acks = push(receiver.port, [make_batch("pc-1", "pump_curves", pump_curves(3))])
    assert statuses(acks) == [("pc-1", "STORED")]
    assert acks[0].detail == ""
    acks = push(
        receiver.port,
        [
            make_batch("pc-2", "pump_curves", pump_curves(2, start=3)),
            make_batch("pc-2", "pump_curves", pump_curves(2, start=3)),
        ],
    )
    assert statuses(acks) == [("pc-2", "STORED"), ("pc-2", "DUPLICATE")]
    receiver.stop()
    assert query(
        db,
        "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'pump_curves' "
        "ORDER BY column_index",
    ) == [
        ("pump", "VARCHAR"),
        ("ts", "TIMESTAMP WITH TIME ZONE"),
        ("flow_m3_h", "DOUBLE"),
        ("head_m", "DOUBLE[]"),
        ("edge_id", "VARCHAR"),
        ("batch_id", "VARCHAR"),
    ]
    rows = query(db, "SELECT flow_m3_h, head_m, edge_id, batch_id FROM pump_curves ORDER BY 1")
    assert rows == [
        (0.0, [1.0, 0.0], "edge-01", "pc-1"),
        (1.0, [1.0, 1.0], "edge-01", "pc-1"),
        (2.0, [1.0, 2.0], "edge-01", "pc-1"),
        (3.0, [1.0, 3.0], "edge-01", "pc-2"),
        (4.0, [1.0, 4.0], "edge-01", "pc-2"),
    ]
    assert sorted(query(db, "SELECT batch_id, stream, rows FROM uplink_batches ORDER BY 1")) == [
        ("pc-1", "pump_curves", 3),
        ("pc-2", "pump_curves", 2),
    ]


def test_a_batch_that_does_not_fit_its_new_streams_table_is_rejected(receiver, db, caplog):
    first = push(receiver.port, [make_batch("pc-1", "pump_curves", pump_curves(2))])
    assert statuses(first) == [("pc-1", "STORED")]
    changed = (
        pump_curves(2, start=2)
        .drop_columns(["head_m"])
        .set_column(2, "flow_m3_h", pa.array(["2", "3"]))
        .append_column("speed_rpm", pa.array([1450, 1460]))
    )
    reordered = pump_curves(1, start=4).select(["head_m", "flow_m3_h", "ts", "pump"])
    acks = push(
        receiver.port,
        [make_batch("pc-2", "pump_curves", changed), make_batch("pc-3", "pump_curves", reordered)],
    )
    assert statuses(acks) == [("pc-2", "REJECTED"), ("pc-3", "STORED")]
    assert acks[0].detail == (
        "stream 'pump_curves': the batch does not fit the table stored before: head_m (missing); "
        "flow_m3_h (VARCHAR, the table has DOUBLE); speed_rpm (not in the table); a stream's "
        "columns and types must not change (give a changed output a new stream name)"
    )
    assert f"rejected: {acks[0].detail}" in caplog.text
    receiver.stop()
    assert query(db, "SELECT count(*) FROM pump_curves") == [(3,)]
    assert sorted(query(db, "SELECT batch_id FROM uplink_batches ORDER BY 1")) == [
        ("pc-1",),
        ("pc-3",),
    ]


# ---------------------------------------------------------------- rows deduplicated by natural key


def one_row(stream: str, **values: Any) -> dict[str, Any]:
    """A row of a standard stream: every column filled with a plain value, then ``values``."""
    plain: dict[pa.DataType, Any] = {
        pa.string(): "x",
        UTC_US: T0,
        pa.float64(): 1.0,
        pa.int64(): 1,
        pa.binary(): b"{}",
        pa.list_(pa.float64()): [1.0, 2.0],
    }
    row = {field.name: plain[field.type] for field in STREAMS[stream].schema}
    return {**row, **values}


def rows_table(stream: str, rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=STREAMS[stream].schema)


DEDUP = (
    "SELECT rows, duplicate_rows, raw_bytes, sent_raw_bytes FROM uplink_batches WHERE batch_id = ?"
)


def test_the_same_rows_under_another_batch_id_are_stored_once(receiver, db, caplog):
    caplog.set_level(logging.INFO, logger="edgesieve.cloud")
    table = summary_table(5)
    first = make_batch("b-1", "telemetry_summary", table, raw_bytes=5_000)
    # Sealed again after an edge crash: the same rows, cut and ordered differently.
    replay = make_batch(
        "b-1-replayed", "telemetry_summary", table.take([4, 3, 2, 1, 0]), raw_bytes=4_000
    )
    acks = push(receiver.port, [first, replay])
    assert statuses(acks) == [("b-1", "STORED"), ("b-1-replayed", "STORED")]
    assert acks[0].detail == ""
    assert acks[1].detail == (
        "5 of 5 rows skipped: their natural key (edge_id, device, key, window_start) is "
        "already stored"
    )
    receiver.stop()
    assert query(db, "SELECT batch_id, count(*) FROM telemetry_summary GROUP BY 1") == [("b-1", 5)]
    # The replayed batch is recorded (its wire bytes were spent) but credits no raw bytes.
    assert query(db, DEDUP, [real_id("b-1")]) == [(5, 0, 5_000, 5_000)]
    assert query(db, DEDUP, [real_id("b-1-replayed")]) == [(0, 5, 0, 4_000)]
    assert re.search(
        r"2 stored, 0 duplicate, 0 rejected; 5 rows, 5000 raw bytes stored, "
        r"5 duplicate rows skipped",
        caplog.text,
    )


def test_a_window_sent_again_more_complete_replaces_the_stored_row(receiver, db):
    # A window flushed while its device was quiet comes again with more readings: the larger
    # count is final; a smaller one (a replay of the early row) is skipped.
    early = summary_table(3)  # counts 10, 11, 12
    complete = early.set_column(4, "count", pa.array([10, 15, 12], type=pa.int64()))
    stale = early.set_column(4, "count", pa.array([9, 14, 12], type=pa.int64()))
    acks = push(
        receiver.port,
        [
            make_batch("b-early", "telemetry_summary", early),
            make_batch("b-complete", "telemetry_summary", complete),
            make_batch("b-stale", "telemetry_summary", stale),
        ],
    )
    assert statuses(acks) == [
        ("b-early", "STORED"),
        ("b-complete", "STORED"),
        ("b-stale", "STORED"),
    ]
    receiver.stop()
    rows = query(db, "SELECT window_start, count, batch_id FROM telemetry_summary ORDER BY 1")
    assert [(c, b) for _, c, b in rows] == [(10, "b-early"), (15, "b-complete"), (12, "b-early")]
    assert query(db, DEDUP, [real_id("b-complete")])[0][:2] == (
        1,
        2,
    )  # one row replaced, two skipped
    assert query(db, DEDUP, [real_id("b-stale")])[0][:2] == (0, 3)


def test_a_log_summary_row_sent_again_with_a_larger_count_replaces_the_stored_one(receiver, db):
    row = one_row("log_summary", device="pump-7", template="disk <*> full", count=3)
    acks = push(
        receiver.port,
        [
            make_batch("l-early", "log_summary", rows_table("log_summary", [row])),
            make_batch("l-final", "log_summary", rows_table("log_summary", [{**row, "count": 7}])),
            make_batch("l-stale", "log_summary", rows_table("log_summary", [{**row, "count": 5}])),
        ],
    )
    assert [ack.status for ack in acks] == [STORED] * 3
    receiver.stop()
    assert query(db, "SELECT count, batch_id FROM log_summary") == [(7, "l-final")]


def test_repeats_of_a_window_within_one_batch_keep_the_largest_count(receiver, db):
    one = summary_table(1)
    twice = pa.concat_tables([one, one.set_column(4, "count", pa.array([30], type=pa.int64()))])
    push(receiver.port, [make_batch("b-1", "telemetry_summary", twice)])
    receiver.stop()
    assert query(db, "SELECT count FROM telemetry_summary") == [(30,)]


def test_a_partly_replayed_batch_stores_only_its_new_rows(receiver, db):
    old, new = summary_table(6), summary_table(6, start=3)  # minutes 0-5, then 3-8
    acks = push(
        receiver.port,
        [
            make_batch("b-old", "telemetry_summary", old, raw_bytes=600),
            make_batch("b-new", "telemetry_summary", new, raw_bytes=601),
        ],
    )
    assert statuses(acks) == [("b-old", "STORED"), ("b-new", "STORED")]
    assert acks[1].detail.startswith("3 of 6 rows skipped")
    receiver.stop()
    stored = query(
        db, "SELECT minute(window_start), batch_id FROM telemetry_summary ORDER BY window_start"
    )
    assert stored == [(m, "b-old") for m in range(6)] + [(m, "b-new") for m in range(6, 9)]
    # raw bytes credited in proportion to the stored rows: 601 * 3 // 6
    assert query(db, DEDUP, [real_id("b-new")]) == [(3, 3, 300, 601)]
    assert query(db, "SELECT sum(rows), sum(duplicate_rows) FROM uplink_batches") == [(9, 3)]


def test_a_key_repeated_within_one_batch_is_stored_once(receiver, db):
    row = one_row("telemetry_points", device="pump-7", key="t", value=1.0)
    table = rows_table("telemetry_points", [row, {**row, "value": 2.0}, {**row, "key": "h"}])
    (ack,) = push(receiver.port, [make_batch("b-1", "telemetry_points", table)])
    assert ack.status == STORED
    assert ack.detail.startswith("1 of 3 rows skipped")
    receiver.stop()
    assert query(db, "SELECT key FROM telemetry_points ORDER BY key") == [("h",), ("t",)]
    assert query(db, DEDUP, [real_id("b-1")]) == [(2, 1, 200, 300)]


# Per standard stream: rows differing in one key column are all kept; the same key
# with other values in the remaining columns is a duplicate.
KEY_CASES = [
    ("telemetry_points", {"device": "d2"}, {"value": 9.0}),
    ("telemetry_points", {"key": "k2"}, {"transport": "coap"}),
    ("telemetry_points", {"ts": T0 + timedelta(microseconds=1)}, {"value": 9.0}),
    ("telemetry_text", {"key": "k2"}, {"value": "other"}),
    ("telemetry_summary", {"window_start": T0 + timedelta(minutes=1)}, {"mean": 99.0}),
    ("telemetry_summary", {"key": "k2"}, {"window_end": T0 + timedelta(hours=1)}),
    ("vibration_features", {"axis": "y"}, {"rms": 9.0}),
    ("vibration_features", {"ts": T0 + timedelta(seconds=1)}, {"band_energy": [3.0]}),
    ("alarms", {"state": "cleared"}, {"value": 9.0}),
    ("alarms", {"rule": "r2"}, {"severity": "critical"}),
    ("alarms", {"key": "pump-7/y"}, {"value": 9.0}),  # one rule on two axes, same ts
    ("log_events", {"msg": "other"}, {"level": "error", "template": "t", "fields": "{}"}),
    ("log_events", {"ts": T0 + timedelta(microseconds=1)}, {"transport": "coap"}),
    ("log_summary", {"template": "t2"}, {"level": "error", "example": "e"}),
    ("log_summary", {"window_start": T0 + timedelta(minutes=1)}, {"last_ts": T0}),
    ("dead_letters", {"payload": b"other"}, {}),
    ("dead_letters", {"reason": "late"}, {}),
]


@pytest.mark.parametrize(("stream", "other_key", "same_key"), KEY_CASES)
def test_each_standard_stream_is_deduplicated_by_its_natural_key(
    receiver, db, stream, other_key, same_key
):
    base = one_row(stream)
    first = rows_table(stream, [base])
    second = rows_table(stream, [{**base, **other_key}, {**base, **same_key}])
    acks = push(
        receiver.port,
        [make_batch("b-1", stream, first), make_batch("b-2", stream, second)],
    )
    assert [ack.status for ack in acks] == [STORED, STORED]
    receiver.stop()
    assert sorted(query(db, f"SELECT batch_id, count(*) FROM {stream} GROUP BY 1 ORDER BY 1")) == [
        ("b-1", 1),
        ("b-2", 1),
    ]
    assert sorted(query(db, "SELECT batch_id, duplicate_rows FROM uplink_batches")) == [
        ("b-1", 0),
        ("b-2", 1),
    ]


def test_the_same_rows_from_two_edges_are_both_stored(receiver, db):
    table = alarms_table(3)
    push(receiver.port, [make_batch("b-01", "alarms", table)])
    push(receiver.port, [make_batch("b-02", "alarms", table, edge="edge-02")], metadata=AUTH_02)
    receiver.stop()
    assert query(db, "SELECT edge_id, count(*) FROM alarms GROUP BY 1 ORDER BY 1") == [
        ("edge-01", 3),
        ("edge-02", 3),
    ]


def test_a_user_stream_like_a_standard_one_uses_its_key_and_others_only_the_batch_id(receiver, db):
    like = summary_table(2)
    custom = pump_curves(2)
    acks = push(
        receiver.port,
        [
            make_batch("l-1", "pressure_summary", like),
            make_batch("l-2", "pressure_summary", like.take([1, 0])),
            make_batch("c-1", "pump_curves", custom),
            make_batch("c-2", "pump_curves", custom.take([1, 0])),
        ],
    )
    assert [ack.status for ack in acks] == [STORED] * 4
    receiver.stop()
    assert query(db, "SELECT count(*) FROM pressure_summary") == [(4 - 2,)]
    assert query(db, "SELECT count(*) FROM pump_curves") == [(4,)]


def test_a_database_from_before_deduplication_is_migrated_on_open(start_receiver, db):
    with duckdb.connect(str(db)) as con:
        con.execute(
            "CREATE TABLE uplink_batches (batch_id VARCHAR PRIMARY KEY, edge_id VARCHAR NOT NULL, "
            "stream VARCHAR NOT NULL, rows UBIGINT NOT NULL, raw_bytes UBIGINT NOT NULL, "
            "wire_bytes UBIGINT NOT NULL, received_at TIMESTAMPTZ NOT NULL, priority UINTEGER, "
            "created_at TIMESTAMPTZ)"
        )
        con.execute(
            "INSERT INTO uplink_batches VALUES ('old', 'edge-01', 'alarms', 2, 77, 500, now(), 0, "
            "NULL)"
        )
        con.register("old_rows", alarms_table(2))
        con.execute(
            "CREATE TABLE alarms AS SELECT *, 'edge-01' AS edge_id, 'old' AS batch_id FROM old_rows"
        )
    receiver = start_receiver()
    (ack,) = push(receiver.port, [make_batch("new", "alarms", alarms_table(3), raw_bytes=300)])
    assert (ack.status, ack.detail[:23]) == (STORED, "2 of 3 rows skipped: th")
    receiver.stop()
    assert query(
        db,
        "SELECT batch_id, rows, duplicate_rows, raw_bytes, sent_raw_bytes FROM uplink_batches "
        "ORDER BY batch_id",
    ) == [("new", 1, 2, 100, 300), ("old", 2, 0, 77, 77)]
    assert sorted(query(db, "SELECT batch_id, count(*) FROM alarms GROUP BY 1 ORDER BY 1")) == [
        ("new", 1),
        ("old", 2),
    ]


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("metadata", "logged"),
    [
        pytest.param(
            ((KEY_HEADER, "edge-01"), (SECRET_HEADER, SECRET_02)),
            "wrong secret for edge 'edge-01'",
            id="wrong-secret",
        ),
        pytest.param(
            ((KEY_HEADER, "edge-99"), (SECRET_HEADER, SECRET_01)),
            "unknown edge key 'edge-99'",
            id="unknown-key",
        ),
        pytest.param(None, "no x-edgesieve-key / x-edgesieve-secret metadata", id="no-metadata"),
        pytest.param(
            ((KEY_HEADER, "edge-01"),),
            "no x-edgesieve-key / x-edgesieve-secret metadata",
            id="no-secret",
        ),
    ],
)
def test_bad_credentials_are_refused_before_any_batch_is_read(
    receiver, db, caplog, metadata, logged
):
    caplog.set_level(logging.DEBUG, logger="edgesieve.cloud")
    release = threading.Event()

    def batches() -> Iterator[uplink_pb2.Batch]:
        yield make_batch("b-1", "alarms", alarms_table(2))
        release.wait(5.0)  # the stream stays open: the refusal must not wait for it

    started = time.monotonic()
    with channel(receiver.port) as chan:
        call = uplink_pb2_grpc.UplinkStub(chan).Push(
            batches(), metadata=metadata, timeout=CALL_TIMEOUT_S
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        release.set()
    assert time.monotonic() - started < 4.0
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details() == UNAUTHENTICATED_DETAIL == "unknown edge key or wrong secret"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.fullmatch(
        rf"refused Push from ipv4:127\.0\.0\.1:\d+: {re.escape(logged)}", warnings[0]
    )
    assert SECRET_01 not in caplog.text and SECRET_02 not in caplog.text
    receiver.stop()
    assert query(db, "SELECT count(*) FROM uplink_batches") == [(0,)]
    assert tables(db) == {"uplink_batches", "uplink_refusals"}


def test_an_unknown_key_is_logged_cut_to_64_characters(receiver, caplog):
    key = "k" * 100
    error = push_error(receiver.port, [], metadata=((KEY_HEADER, key), (SECRET_HEADER, "x" * 20)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"unknown edge key '{'k' * 64}'" in caplog.text
    assert "k" * 65 not in caplog.text


def test_authenticate_compares_every_secret():
    auth = EdgeAuth(EDGES)
    assert auth.authenticate(AUTH_01) == "edge-01"
    assert auth.authenticate(AUTH_02) == "edge-02"
    assert auth.authenticate(((KEY_HEADER, "edge-02"), (SECRET_HEADER, SECRET_01))) is None
    assert auth.authenticate(((KEY_HEADER, "edge-01"), (SECRET_HEADER, SECRET_01[:-1]))) is None
    assert auth.authenticate(((KEY_HEADER, "edge-01"), (SECRET_HEADER, b"bytes"))) is None
    assert auth.authenticate(((KEY_HEADER, "edge-01"), (SECRET_HEADER, "sëcret"))) is None
    assert auth.authenticate(()) is None


# ---------------------------------------------------------------- rejected batches


def _corrupt(batch: uplink_pb2.Batch) -> uplink_pb2.Batch:
    batch.arrow_ipc = b"\xff\xff\xff\xff" + batch.arrow_ipc[8:40]
    return batch


def _truncated(batch: uplink_pb2.Batch) -> uplink_pb2.Batch:
    batch.arrow_ipc = batch.arrow_ipc[: len(batch.arrow_ipc) // 2]
    return batch


def _naive_ts() -> pa.Table:
    table = alarms_table(2)
    return table.set_column(1, "ts", table.column("ts").cast(pa.timestamp("us")))


def _no_value() -> pa.Table:
    return alarms_table(2).drop_columns(["value"])


def _text_value() -> pa.Table:
    return alarms_table(2).set_column(5, "value", pa.array(["hot", "cold"]))


REJECTIONS = [
    pytest.param(
        lambda: make_batch("bad", "Telemetry-Raw", alarms_table(2)),
        r"stream 'Telemetry-Raw' is not a name the receiver can store: a new stream becomes a "
        r"table, so its name must be 1-63 lowercase letters, digits or '_', starting with a "
        r"letter, and not 'uplink_batches' \(known streams: alarms, dead_letters, "
        r"device_attributes, log_events, log_summary, "
        r"telemetry_points, telemetry_summary, telemetry_text, vibration_features\)",
        id="bad-stream-name",
    ),
    pytest.param(
        lambda: make_batch("bad", "uplink_batches", alarms_table(2)),
        r"stream 'uplink_batches' is not a name the receiver can store: .+",
        id="accounting-table-name",
    ),
    pytest.param(
        lambda: make_batch("bad", "pump_curves", pa.table({"Flow": [1.0], "flow": [2.0]})),
        r"stream 'pump_curves': columns 'Flow' and 'flow' would be the same DuckDB column "
        r"\(names are case-insensitive\); rename one",
        id="case-clash",
    ),
    pytest.param(
        lambda: make_batch("bad", "pump_curves", pa.table({"": [1.0]})),
        r"stream 'pump_curves': a column has an empty name; name every column",
        id="empty-column-name",
    ),
    pytest.param(
        lambda: make_batch("bad", "pump_curves", pa.table({"edge_id": ["x"]})),
        r"stream 'pump_curves': the batch has no columns besides edge_id and batch_id",
        id="no-columns",
    ),
    pytest.param(
        lambda: _corrupt(make_batch("bad", "alarms", alarms_table(2))),
        r"stream 'alarms': arrow_ipc \(36 bytes\) is not a readable Arrow IPC stream: .+",
        id="corrupt-ipc",
    ),
    pytest.param(
        lambda: _truncated(make_batch("bad", "alarms", alarms_table(2))),
        r"stream 'alarms': arrow_ipc \(\d+ bytes\) is not a readable Arrow IPC stream: .+",
        id="truncated-ipc",
    ),
    pytest.param(
        lambda: uplink_pb2.Batch(edge_id="edge-01", batch_id="bad", stream="alarms", rows=0),
        r"stream 'alarms': arrow_ipc is empty; it must hold an Arrow IPC stream",
        id="empty-ipc",
    ),
    pytest.param(
        lambda: make_batch("bad", "alarms", alarms_table(2), edge="edge-02"),
        r"edge_id 'edge-02' does not match the authenticated edge key 'edge-01'; an edge may "
        r"push only its own batches \(check edge_id and cloud.key in the edge config\)",
        id="edge-id-mismatch",
    ),
    pytest.param(
        lambda: make_batch("no id", "alarms", alarms_table(2), batch_id=""),
        r"batch has no batch_id; the edge must set a deterministic batch_id",
        id="no-batch-id",
    ),
    pytest.param(
        lambda: make_batch("long id", "alarms", alarms_table(2), batch_id="b" * 257),
        r"batch_id is 257 characters long; at most 256",
        id="long-batch-id",
    ),
    pytest.param(
        lambda: make_batch("bad", "alarms", alarms_table(2), rows=5),
        r"stream 'alarms': the batch says rows=5 but its Arrow data holds 2 rows; the batch was "
        r"built wrongly or corrupted",
        id="rows-mismatch",
    ),
    pytest.param(
        lambda: make_batch("bad", "alarms", _no_value()),
        r"stream 'alarms': Arrow data lacks column\(s\) value; it has device, ts, rule, state, "
        r"severity, key\. Hint: rename or add the columns so they match the stream",
        id="missing-column",
    ),
    pytest.param(
        lambda: make_batch("bad", "alarms", _naive_ts()),
        r"stream 'alarms': Arrow column 'ts' is timestamp\[us\] without a timezone; it must be "
        r"timezone-aware\. .+",
        id="naive-timestamp",
    ),
    pytest.param(
        lambda: make_batch("bad", "alarms", _text_value()),
        r"stream 'alarms': Arrow data does not cast to the stream schema \(.+\); Arrow said: .+",
        id="wrong-type",
    ),
]


@pytest.mark.parametrize(("make_bad", "detail"), REJECTIONS)
def test_a_bad_batch_is_rejected_and_the_stream_goes_on(receiver, db, caplog, make_bad, detail):
    bad = make_bad()
    good = make_batch("good", "alarms", alarms_table(3))
    acks = push(receiver.port, [bad, good, make_batch("good", "alarms", alarms_table(3))])
    assert statuses(acks) == [
        (label(bad.batch_id), "REJECTED"),
        ("good", "STORED"),
        ("good", "DUPLICATE"),
    ]
    assert re.fullmatch(detail, acks[0].detail), acks[0].detail
    assert "\n" not in acks[0].detail
    assert f"rejected: {acks[0].detail}" in caplog.text
    receiver.stop()
    assert query(db, "SELECT batch_id FROM uplink_batches") == [("good",)]
    assert query(db, "SELECT count(*) FROM alarms") == [(3,)]


def test_a_database_fault_ends_the_call_internal_and_stores_nothing(start_receiver, db):
    with duckdb.connect(str(db)) as con:  # a table changed by hand, missing most columns
        con.execute("CREATE TABLE alarms (device VARCHAR)")
    receiver = start_receiver()
    batch = make_batch("b-1", "alarms", alarms_table(2))
    error = push_error(receiver.port, [batch])
    assert error.code() == grpc.StatusCode.INTERNAL
    assert re.fullmatch(
        rf"the receiver could not store batch '{batch.batch_id}' \(alarms\): Binder Error: .+ "
        r"\(nothing was stored; retry later\)",
        error.details(),
    ), error.details()
    assert "\n" not in error.details()
    (ack,) = push(receiver.port, [make_batch("b-2", "telemetry_summary", summary_table(1))])
    assert ack.status == STORED
    receiver.stop()
    assert query(db, "SELECT batch_id FROM uplink_batches") == [("b-2",)]
    assert query(db, "SELECT count(*) FROM alarms") == [(0,)]


# ---------------------------------------------------------------- crash between commit and ack

CRASHING_RECEIVER = """
import os, sys
from pathlib import Path
from connectors.cloud import CloudReceiver, load_auth

def crash(batch_id):
    os._exit(1)

receiver = CloudReceiver("127.0.0.1:0", Path(sys.argv[1]), load_auth(sys.argv[2]), on_commit=crash)
print(receiver.start().port, flush=True)
sys.stdin.read()
"""


def run_serve(
    db: Path, auth: Path, caplog: pytest.LogCaptureFixture, tls: ReceiverTls | None = None
) -> tuple[threading.Thread, threading.Event, int]:
    """Run serve() in a thread; return it, its stop event and the port it logged."""
    caplog.set_level(logging.INFO, logger="edgesieve.cloud")
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve("127.0.0.1:0", db, auth, tls=tls, stop=stop)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not errors:
        found = re.search(r"cloud receiver listening on 127\.0\.0\.1:(\d+)", caplog.text)
        if found:
            return thread, stop, int(found.group(1))
        time.sleep(0.01)
    stop.set()
    pytest.fail(f"serve() did not log its port: {errors}")


def test_a_crash_between_commit_and_ack_is_answered_duplicate_after_restart(tmp_path, db, caplog):
    auth = write_auth(tmp_path, AUTH_YAML)
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RECEIVER, str(db), str(auth)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"receiver did not start: {line!r} {proc.stderr.read()}"
        port = int(line)
        batch = make_batch("b-crash", "alarms", alarms_table(4))
        acks: list[uplink_pb2.Ack] = []
        with channel(port) as chan:
            call = uplink_pb2_grpc.UplinkStub(chan).Push(
                iter([batch]), metadata=AUTH_01, timeout=CALL_TIMEOUT_S
            )
            with pytest.raises(grpc.RpcError) as info:
                for ack in call:
                    acks.append(ack)
        assert acks == []
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(10) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()

    assert query(db, "SELECT batch_id FROM uplink_batches") == [("b-crash",)]
    thread, stop, port = run_serve(db, auth, caplog)
    try:
        acks = push(port, [batch, make_batch("b-next", "alarms", alarms_table(1, device="fan-2"))])
        assert statuses(acks) == [("b-crash", "DUPLICATE"), ("b-next", "STORED")]
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert sorted(query(db, "SELECT batch_id, count(*) FROM alarms GROUP BY ALL ORDER BY 1")) == [
        ("b-crash", 4),
        ("b-next", 1),
    ]


# ---------------------------------------------------------------- TLS and mutual TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    with paths["cert"].open("wb") as f:
        for blob in server.cert_chain_pems:
            f.write(blob.bytes())
    return paths


def client_credentials(
    ca: trustme.CA, client: trustme.LeafCert | None = None
) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(),
        private_key=client.private_key_pem.bytes(),
        certificate_chain=b"".join(blob.bytes() for blob in client.cert_chain_pems),
    )


def test_tls_clients_are_served_and_plaintext_clients_are_not(start_receiver, tls_files, ca, db):
    receiver = start_receiver(tls=ReceiverTls(tls_files["cert"], tls_files["key"]))
    assert receiver.mode == "TLS"
    batch = make_batch("b-tls", "alarms", alarms_table(2))
    assert statuses(push(receiver.port, [batch], credentials=client_credentials(ca))) == [
        ("b-tls", "STORED")
    ]
    error = push_error(
        receiver.port, [make_batch("b-plain", "alarms", alarms_table(2, device="fan-3"))]
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = trustme.CA()
    error = push_error(
        receiver.port,
        [make_batch("b-other", "alarms", alarms_table(2, device="fan-2"))],
        credentials=client_credentials(other_ca),
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    receiver.stop()
    assert query(db, "SELECT batch_id FROM uplink_batches") == [("b-tls",)]


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    start_receiver, tls_files, ca, db
):
    receiver = start_receiver(
        tls=ReceiverTls(tls_files["cert"], tls_files["key"], client_ca=tls_files["ca"])
    )
    assert receiver.mode == "mutual TLS"
    error = push_error(
        receiver.port,
        [make_batch("b-nocert", "alarms", alarms_table(2))],
        credentials=client_credentials(ca),
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    stranger = trustme.CA().issue_cert("edge-01.example")
    error = push_error(
        receiver.port,
        [make_batch("b-stranger", "alarms", alarms_table(2))],
        credentials=client_credentials(ca, stranger),
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    client = ca.issue_cert("edge-01.example")
    acks = push(
        receiver.port,
        [make_batch("b-mtls", "alarms", alarms_table(2))],
        credentials=client_credentials(ca, client),
    )
    assert statuses(acks) == [("b-mtls", "STORED")]
    error = push_error(
        receiver.port,
        [make_batch("b-mtls-2", "alarms", alarms_table(2, device="fan-2"))],
        credentials=client_credentials(ca, client),
        metadata=((KEY_HEADER, "edge-01"), (SECRET_HEADER, SECRET_02)),
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    receiver.stop()
    assert query(db, "SELECT batch_id FROM uplink_batches") == [("b-mtls",)]


def test_serve_runs_with_tls_until_stop_is_set(tmp_path, db, tls_files, ca, caplog):
    auth = write_auth(tmp_path, AUTH_YAML)
    tls = ReceiverTls(str(tls_files["cert"]), str(tls_files["key"]), str(tls_files["ca"]))
    assert isinstance(tls.cert, Path) and isinstance(tls.client_ca, Path)
    thread, stop, port = run_serve(db, auth, caplog, tls=tls)
    try:
        acks = push(
            port,
            [make_batch("b-1", "alarms", alarms_table(1))],
            credentials=client_credentials(ca, ca.issue_cert("edge-01.example")),
        )
        assert statuses(acks) == [("b-1", "STORED")]
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert "(mutual TLS), storing to" in caplog.text
    assert "2 edge(s) authorised" in caplog.text


def test_tls_file_errors_name_the_file(tmp_path, tls_files):
    missing = tmp_path / "nope.pem"
    with pytest.raises(
        ValueError,
        match=re.escape(f"ReceiverTls.cert: the PEM file does not exist (got {str(missing)!r})"),
    ):
        CloudReceiver(
            "127.0.0.1:0", tmp_path / "c.duckdb", EDGES, tls=ReceiverTls(missing, tls_files["key"])
        )
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"ReceiverTls.client_ca: the file is not PEM, 4 bytes without a '-----BEGIN' line "
            f"(got {str(der)!r}); hint: convert DER"
        ),
    ):
        ReceiverTls(tls_files["cert"], tls_files["key"], client_ca=der).server_credentials()
    with pytest.raises(ValueError, match=r"ReceiverTls\.key: the PEM file cannot be read: "):
        ReceiverTls(tls_files["cert"], tmp_path).server_credentials()
    with pytest.raises(
        TypeError, match=re.escape("ReceiverTls.key must be a path to a PEM file; got bytes")
    ):
        ReceiverTls(tls_files["cert"], b"key.pem")  # type: ignore[arg-type]


# ---------------------------------------------------------------- lifecycle and arguments


def test_stop_ends_an_open_push_and_closes_the_database(receiver, db):
    release = threading.Event()
    got: list[Any] = []

    def batches() -> Iterator[uplink_pb2.Batch]:
        yield make_batch("b-1", "alarms", alarms_table(1))
        release.wait(5.0)

    def run() -> None:
        with channel(receiver.port) as chan:
            call = uplink_pb2_grpc.UplinkStub(chan).Push(
                batches(), metadata=AUTH_01, timeout=CALL_TIMEOUT_S
            )
            try:
                for ack in call:
                    got.append(ack)
            except grpc.RpcError as exc:
                got.append(exc.code())

    client = threading.Thread(target=run)
    client.start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    receiver.stop(grace=0.2)
    assert time.monotonic() - started < 3.0
    release.set()
    client.join(10)
    assert got[0].status == STORED
    assert got[1] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert query(db, "SELECT count(*) FROM alarms") == [(1,)]  # the file is no longer locked
    receiver.stop()  # idempotent


def test_receiver_argument_errors(tmp_path, receiver):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "CloudReceiver.listen: must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080 "
            "(got '127.0.0.1'); hint: give both a host and a port"
        ),
    ):
        CloudReceiver("127.0.0.1", tmp_path / "c.duckdb", EDGES)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "CloudReceiver edges must be a mapping of edge key to secret; got list. "
            "Hint: edges=load_auth(path)"
        ),
    ):
        CloudReceiver("127.0.0.1:0", tmp_path / "c.duckdb", [("edge-01", SECRET_01)])
    with pytest.raises(
        AuthError,
        match=re.escape(
            "CloudReceiver edges[0] (edge-01): secret must be 16-1024 characters (got 5); "
        ),
    ) as info:
        CloudReceiver("127.0.0.1:0", tmp_path / "c.duckdb", {"edge-01": "short"})
    assert "short" not in str(info.value)
    with pytest.raises(
        AuthError,
        match=re.escape("CloudReceiver edges: no edges are listed, so every Push would be refused"),
    ):
        CloudReceiver("127.0.0.1:0", tmp_path / "c.duckdb", {})
    with pytest.raises(
        ValueError, match=re.escape("CloudReceiver max_workers must be an int >= 1; got 0")
    ):
        CloudReceiver("127.0.0.1:0", tmp_path / "c.duckdb", EDGES, max_workers=0)
    with pytest.raises(
        ValueError,
        match=re.escape("CloudReceiver max_message_bytes must be an int >= 1024; got 10"),
    ):
        CloudReceiver("127.0.0.1:0", tmp_path / "c.duckdb", EDGES, max_message_bytes=10)
    with pytest.raises(
        RuntimeError,
        match=re.escape("CloudReceiver.port is known only after start(); call start() first"),
    ):
        _ = CloudReceiver("127.0.0.1:0", tmp_path / "c.duckdb", EDGES).port
    assert SECRET_01 not in repr(receiver)
    assert re.fullmatch(
        r"CloudReceiver\('127\.0\.0\.1:0', db='.+cloud\.duckdb', port \d+\)", repr(receiver)
    )


def test_an_ipv6_loopback_receiver_is_served(start_receiver, db):
    try:
        receiver = start_receiver(listen="[::1]:0")
    except ReceiverError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert re.fullmatch(r"CloudReceiver\('\[::1\]:0', .+, port \d+\)", repr(receiver))
    with grpc.insecure_channel(f"[::1]:{receiver.port}") as chan:
        acks = list(
            uplink_pb2_grpc.UplinkStub(chan).Push(
                iter([make_batch("b-v6", "alarms", alarms_table(1))]),
                metadata=AUTH_01,
                timeout=CALL_TIMEOUT_S,
            )
        )
    assert statuses(acks) == [("b-v6", "STORED")]


def test_start_errors_name_the_address_or_database(tmp_path, receiver):
    taken = CloudReceiver(f"127.0.0.1:{receiver.port}", tmp_path / "other.duckdb", EDGES)
    with pytest.raises(
        ReceiverError,
        match=re.escape(f"cloud receiver cannot listen on '127.0.0.1:{receiver.port}': "),
    ) as info:
        taken.start()
    assert str(info.value).endswith(
        "Hint: the port may be in use, or the host is not an address of this machine"
    )
    # the database of the failed receiver was closed again: it can be opened
    query(tmp_path / "other.duckdb", "SELECT 1")

    (tmp_path / "adir").mkdir()
    with pytest.raises(
        ReceiverError,
        match=re.escape(f"cloud receiver cannot open its database {str(tmp_path / 'adir')!r}: "),
    ) as info:
        CloudReceiver("127.0.0.1:0", tmp_path / "adir", EDGES).start()
    assert "Hint: another `edgesieve cloud` may be using the file" in str(info.value)


def test_a_message_over_the_size_limit_is_refused(start_receiver, db):
    receiver = start_receiver(max_message_bytes=4096)
    big = make_batch(
        "b-big",
        "dead_letters",
        pa.table(
            {
                "device": ["d"],
                "transport": ["http"],
                "received_at": pa.array([T0], type=UTC_US),
                "reason": ["x"],
                "payload": [os.urandom(10_000)],
            },
            schema=STREAMS["dead_letters"].schema,
        ),
    )
    error = push_error(receiver.port, [big])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    receiver.stop()
    assert query(db, "SELECT count(*) FROM uplink_batches") == [(0,)]


# ---------------------------------------------------------------- the auth file


def test_load_auth_reads_every_edge(tmp_path):
    assert load_auth(write_auth(tmp_path, AUTH_YAML)) == EDGES
    assert load_auth(str(write_auth(tmp_path, AUTH_YAML))) == EDGES


def test_edge_credentials_hide_the_secret():
    creds = EdgeCredentials("edge-01", SECRET_01)
    assert repr(creds) == "EdgeCredentials(key='edge-01')"
    assert SECRET_01 not in str(creds)


def _entry(key: str, secret: str) -> str:
    return f"edges:\n  - {{key: {key}, secret: {secret}}}\n"


AUTH_ERRORS = [
    pytest.param(
        "edges: [",
        r"{path}: not valid YAML at line 1; expected edges: \[\{{key: \.\.\., secret: \.\.\.\}}\]",
        id="yaml",
    ),
    pytest.param(
        "- {key: edge-01}",
        r"{path}: expected a mapping with an `edges:` list, e\.g\. "
        r'edges: \[\{{key: edge-01, secret: "\.\.\."\}}\]',
        id="not-a-mapping",
    ),
    pytest.param(
        "edges:\n",
        r"{path}: expected a mapping with an `edges:` list, .+",
        id="edges-null",
    ),
    pytest.param(
        "edges: []\n",
        r"{path}: edges: no edges are listed, so every Push would be refused; add one, e\.g\. "
        r'edges: \[\{{key: edge-01, secret: "\.\.\."\}}\]',
        id="empty",
    ),
    pytest.param(
        f"edges:\n  - {{key: edge-01, secret: {SECRET_01}, note: x}}\n",
        r"{path}: edges\[0\] must have exactly `key` and `secret` \(got \['key', 'note', "
        r"'secret'\]\)",
        id="extra-field",
    ),
    pytest.param(
        f"edges:\n  - {SECRET_01}\n",
        r"{path}: edges\[0\] must have exactly `key` and `secret` \(got str\)",
        id="not-an-entry",
    ),
    pytest.param(
        _entry("42", SECRET_01),
        r"{path}: edges\[0\]: key must be a string, but YAML read 42 \(int\); quote it, "
        r'e\.g\. key: "edge-01"',
        id="int-key",
    ),
    pytest.param(
        _entry('"edge 01"', SECRET_01),
        r"{path}: edges\[0\]: key 'edge 01' is not a valid edge key; use 1-128 letters, digits, "
        r"'\.', '_', ':' or '-', starting with a letter or digit \(it is the edge_id of its rows\)",
        id="bad-key",
    ),
    pytest.param(
        _entry("edge-01", "1234567890123456789"),
        r"{path}: edges\[0\] \(edge-01\): secret must be a string, but got int; quote it in "
        r'YAML, e\.g\. secret: "\.\.\."',
        id="int-secret",
    ),
    pytest.param(
        _entry("edge-01", "hunter2"),
        r"{path}: edges\[0\] \(edge-01\): secret must be 16-1024 characters \(got 7\); "
        + re.escape(SECRET_HINT),
        id="short-secret",
    ),
    pytest.param(
        _entry("edge-01", '"correct horse battery staple"'),
        r"{path}: edges\[0\] \(edge-01\): secret contains spaces or characters outside "
        r"printable ASCII, which gRPC metadata cannot carry; " + re.escape(SECRET_HINT),
        id="spaces-in-secret",
    ),
    pytest.param(
        _entry("edge-01", "sécret-päss-wörd-long"),
        r"{path}: edges\[0\] \(edge-01\): secret contains spaces or characters outside "
        r"printable ASCII, .+",
        id="non-ascii-secret",
    ),
    pytest.param(
        f"edges:\n  - {{key: edge-01, secret: {SECRET_01}}}\n  - {{key: edge-01, secret: {SECRET_02}}}\n",
        r"{path}: edges\[1\]: edge key 'edge-01' is listed twice; keys must be unique",
        id="duplicate-key",
    ),
    pytest.param(
        f"edges:\n  - {{key: edge-01, secret: {SECRET_01}}}\n  - {{key: edge-02, secret: {SECRET_01}}}\n",
        r"{path}: edges\[1\] \(edge-02\): secret is the same as edge 'edge-01''s; every edge "
        r"needs its own secret; " + re.escape(SECRET_HINT),
        id="shared-secret",
    ),
]


@pytest.mark.parametrize(("text", "pattern"), AUTH_ERRORS)
def test_load_auth_errors(tmp_path, text, pattern):
    path = write_auth(tmp_path, text)
    with pytest.raises(AuthError) as info:
        load_auth(path)
    assert re.fullmatch(pattern.format(path=re.escape(str(path))), str(info.value)), str(info.value)
    shown = printed(info.value)
    for secret in (
        SECRET_01,
        SECRET_02,
        "hunter2",
        "1234567890123456789",
        "correct horse",
        "sécret",
    ):
        assert secret not in shown


def test_load_auth_file_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(
        AuthError,
        match=re.escape(
            f"auth file {str(missing)!r} does not exist; pass `--auth FILE` with a YAML file like "
            'edges: [{key: edge-01, secret: "..."}]'
        ),
    ):
        load_auth(missing)
    latin = write_auth(tmp_path, "edges: [{key: édge, secret: x}]".encode("latin-1"))
    with pytest.raises(
        AuthError,
        match=re.escape(f"auth file {str(latin)!r} is not UTF-8 text; save it as UTF-8 YAML"),
    ):
        load_auth(latin)
    with pytest.raises(
        AuthError, match=re.escape(f"auth file {str(tmp_path)!r} cannot be read: Is a directory")
    ):
        load_auth(tmp_path)
    assert issubclass(AuthError, ValueError)


def test_serve_fails_fast_on_a_bad_auth_file(tmp_path, db):
    stop = threading.Event()
    with pytest.raises(AuthError, match="no edges are listed"):
        serve("127.0.0.1:0", db, write_auth(tmp_path, "edges: []\n"), tls=None, stop=stop)
    assert not db.exists()


# ---------------------------------------------------------------- limits and quotas


def refusals(db: Path) -> list[tuple[Any, ...]]:
    return query(db, "SELECT edge_id, reason, count FROM uplink_refusals ORDER BY ALL")


def zeros_table(nbytes: int) -> pa.Table:
    """A user stream whose one int64 column of zeros compresses about 1000:1."""
    return pa.table({"x": pa.array(np.zeros(nbytes // 8, dtype=np.int64))})


def test_measure_ipc_reads_sizes_and_rows_from_the_headers():
    table = pa.table(
        {
            "n": pa.array(range(1000), type=pa.int64()),
            "s": ["x" * 10] * 1000,
            "l": [[1.0, 2.0]] * 1000,
            "d": pa.array(["u", "v"] * 500).dictionary_encode(),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.slice(0, 400))
        writer.write_table(table.slice(400))
    plain = measure_ipc(sink.getvalue().to_pybytes(), max_bytes=1 << 30)
    compressed = measure_ipc(ipc(table), max_bytes=1 << 30)
    assert plain.rows == compressed.rows == 1000
    assert table.nbytes <= compressed.arrow_bytes <= table.nbytes + 1000
    assert plain.arrow_bytes >= table.nbytes
    assert measure_ipc(ipc(table.slice(0, 0)), max_bytes=1) == (0, 0)


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_measure_ipc_of_any_bytes_returns_or_raises_value_error(data):
    try:
        size = measure_ipc(data, max_bytes=1 << 20)
    except (ValueError, pa.ArrowException, OSError):
        return
    assert size.arrow_bytes >= 0 and size.rows >= 0


def test_a_batch_that_expands_past_the_cap_is_rejected_before_it_is_decompressed(tmp_path):
    """The probe: ~10 KB of zstd that would expand to 100 MB, against the real CLI process."""
    auth = write_auth(tmp_path, AUTH_YAML)
    db = tmp_path / "cloud.duckdb"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "cloud",
            "--listen",
            f"127.0.0.1:{port}",
            "--db",
            str(db),
            "--auth",
            str(auth),
        ],  # fmt: skip
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        good = make_batch("good", "alarms", alarms_table(3))
        with channel(port) as chan:
            grpc.channel_ready_future(chan).result(timeout=30)
        assert statuses(push(port, [good])) == [("good", "STORED")]
        before = peak_rss(proc.pid)
        bomb = make_batch("bomb", "bomb", zeros_table(100 * 1024 * 1024))
        assert len(bomb.arrow_ipc) < 100_000
        (ack,) = push(port, [bomb])
        grown = peak_rss(proc.pid) - before
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert (label(ack.batch_id), ack.status) == ("bomb", REJECTED)
    assert ack.detail == (
        f"stream 'bomb': arrow_ipc ({len(bomb.arrow_ipc)} bytes) expands to at least "
        f"{100 * 1024 * 1024} bytes, over the receiver's cap of 67108864 bytes per batch "
        "(--max-batch-bytes); seal smaller batches (cloud.batch_rows)"
    )
    assert grown < 20 * 1024 * 1024, f"receiver peak RSS grew {grown} bytes"
    assert proc.returncode == 0, err
    assert query(db, "SELECT batch_id FROM uplink_batches") == [("good",)]
    assert "bomb" not in tables(db)
    assert refusals(db) == [("edge-01", "too_large", 1)]


def peak_rss(pid: int) -> int:
    """The peak resident set size of process ``pid`` in bytes (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_a_batch_over_the_row_cap_is_rejected(start_receiver, db):
    receiver = start_receiver(limits=ReceiverLimits(max_batch_rows=3))
    acks = push(
        receiver.port,
        [
            make_batch("four", "alarms", alarms_table(4)),
            make_batch("three", "alarms", alarms_table(3)),
        ],
    )
    assert statuses(acks) == [("four", "REJECTED"), ("three", "STORED")]
    assert acks[0].detail == (
        "stream 'alarms': the batch holds 4 rows, over the receiver's cap of 3 rows per batch "
        "(--max-batch-rows); seal smaller batches (cloud.batch_rows)"
    )
    receiver.stop()
    assert refusals(db) == [("edge-01", "too_many_rows", 1)]


def test_a_forged_raw_bytes_claim_is_stored_flagged_and_not_credited(receiver, db, caplog):
    forged = make_batch("forged", "telemetry_summary", summary_table(3), raw_bytes=2**64 - 1)
    honest = make_batch("honest", "telemetry_summary", summary_table(2, start=3), raw_bytes=900)
    acks = push(receiver.port, [forged, honest])
    assert statuses(acks) == [("forged", "STORED"), ("honest", "STORED")]
    assert acks[0].detail == (
        f"raw_bytes {2**64 - 1} is over the receiver's cap of {2**40} per batch "
        "(--max-raw-bytes): kept as sent_raw_bytes, credited 0"
    )
    assert acks[1].detail == ""
    assert f"stored with a note: {acks[0].detail}" in caplog.text
    receiver.stop()
    assert sorted(
        query(
            db,
            "SELECT batch_id, rows, raw_bytes, sent_raw_bytes, raw_bytes_implausible "
            "FROM uplink_batches",
        )
    ) == [("forged", 3, 0, 2**64 - 1, True), ("honest", 2, 900, 900, False)]
    assert query(db, "SELECT sum(raw_bytes) FROM uplink_batches") == [(900,)]
    assert query(db, "SELECT count(*) FROM telemetry_summary") == [(5,)]
    assert refusals(db) == [("edge-01", "raw_bytes", 1)]


def test_the_storage_quota_makes_the_edge_retry_and_loses_nothing(start_receiver, db, tmp_path):
    first = seal("edge-01", "alarms", alarms_table(3), priority=0, raw_bytes=10)
    second = seal("edge-01", "alarms", alarms_table(2, device="fan-2"), priority=0, raw_bytes=20)
    size = measure_ipc(uplink_pb2.Batch.FromString(first.payload).arrow_ipc, max_bytes=1 << 20)
    receiver = start_receiver(limits=ReceiverLimits(edge_storage_bytes=size.arrow_bytes + 10))
    outbox = Outbox(tmp_path / "outbox.sqlite")
    assert outbox.put(first) and outbox.put(second)

    def sender_to(port: int) -> UplinkSender:
        settings = UplinkSettings(
            f"127.0.0.1:{port}", "edge-01", SECRET_01, backoff_min_s=0.05, backoff_max_s=0.2
        )
        return UplinkSender(outbox, settings)

    sender = sender_to(receiver.port)
    sender.start()
    try:
        wait_for(lambda: outbox.stats().batches == 1, "the first batch to be stored")
        wait_for(lambda: sender.stats.last_error, "the quota to end a call")
        time.sleep(0.5)  # several retries, each refused
        assert outbox.stats().batches == 1
        assert outbox.stats().rejected == 0
        assert "RESOURCE_EXHAUSTED: edge 'edge-01' has" in sender.stats.last_error
    finally:
        sender.stop()
    # edge-02 has its own quota
    assert statuses(push(receiver.port, [make_batch("b-02", "alarms", alarms_table(1), edge="edge-02")], metadata=AUTH_02)) == [("b-02", "STORED")]  # fmt: skip
    error = push_error(receiver.port, [make_batch("more", "alarms", alarms_table(1))])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (
        f"edge 'edge-01' has {size.arrow_bytes} bytes stored and its storage quota is "
        f"{size.arrow_bytes + 10} bytes (--edge-storage-bytes); nothing more is stored for it "
        "until the quota is raised or its data is deleted; the edge keeps its batches and retries"
    )
    receiver.stop()
    (quota,) = query(db, "SELECT count FROM uplink_refusals WHERE reason = 'storage_quota'")
    assert quota[0] >= 2

    raised = start_receiver(limits=ReceiverLimits(edge_storage_bytes=0))
    sender = sender_to(raised.port)
    sender.start()
    try:
        assert sender.flush(10.0)
    finally:
        sender.stop()
        outbox.close()
    raised.stop()
    assert query(db, "SELECT device, count(*) FROM alarms GROUP BY ALL ORDER BY ALL") == [
        ("fan-2", 2),
        ("pump-7", 4),
    ]


def test_the_rate_quota_paces_one_edge_and_not_the_others(start_receiver, db, caplog):
    caplog.set_level(logging.INFO, logger="edgesieve.cloud")
    receiver = start_receiver(limits=ReceiverLimits(edge_batches_per_s=4))
    many = [make_batch(f"b-{i}", "alarms", alarms_table(1, device=f"d-{i}")) for i in range(12)]
    other = [
        make_batch(f"o-{i}", "alarms", alarms_table(1, device=f"o-{i}"), edge="edge-02")
        for i in range(3)
    ]
    timings: dict[str, float] = {}

    def run(name: str, batches: list[uplink_pb2.Batch], metadata: Any) -> None:
        started = time.monotonic()
        assert [a.status for a in push(receiver.port, batches, metadata=metadata)] == [
            STORED
        ] * len(batches)
        timings[name] = time.monotonic() - started

    threads = [
        threading.Thread(target=run, args=("edge-01", many, AUTH_01)),
        threading.Thread(target=run, args=("edge-02", other, AUTH_02)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # 4 batches of burst, then 4 per second: 8 more take about 2 s
    assert timings["edge-01"] >= 1.5, timings
    assert timings["edge-02"] < timings["edge-01"] / 2, timings
    assert re.search(r"Push from edge edge-01 .+; [5-8] batch\(es\) paced [\d.]+ s", caplog.text)
    assert re.search(r"Push from edge edge-02 .+; 0 batch\(es\) paced 0.00 s", caplog.text)
    receiver.stop()
    assert query(db, "SELECT count(*) FROM alarms") == [(15,)]
    (paced,) = refusals(db)
    assert paced[:2] == ("edge-01", "rate_quota") and 5 <= paced[2] <= 8


def test_an_edge_may_hold_only_its_share_of_calls(start_receiver, db):
    receiver = start_receiver(limits=ReceiverLimits(edge_calls=1))
    release = threading.Event()

    def slow() -> Iterator[uplink_pb2.Batch]:
        yield make_batch("first", "alarms", alarms_table(1))
        release.wait(10)

    with channel(receiver.port) as chan:
        held = uplink_pb2_grpc.UplinkStub(chan).Push(slow(), metadata=AUTH_01, timeout=10)
        assert next(held).status == STORED
        error = push_error(receiver.port, [make_batch("second", "alarms", alarms_table(2))])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "edge 'edge-01' already has 1 Push calls open (--edge-calls); an edge needs one; "
            "retry once the others have ended"
        )
        other = make_batch("other", "alarms", alarms_table(1), edge="edge-02")
        assert statuses(push(receiver.port, [other], metadata=AUTH_02)) == [("other", "STORED")]
        release.set()
        assert list(held) == []
    again = make_batch("second", "alarms", alarms_table(2))
    assert statuses(push(receiver.port, [again])) == [("second", "STORED")]
    receiver.stop()
    assert refusals(db) == [("edge-01", "calls", 1)]


def test_a_database_keyed_by_batch_id_alone_is_rekeyed_and_a_squatted_id_freed(start_receiver, db):
    real = make_batch("edge-01's", "alarms", alarms_table(2))
    with duckdb.connect(str(db)) as con:  # an old receiver stored edge-02's squat
        con.execute(
            "CREATE TABLE uplink_batches (batch_id VARCHAR PRIMARY KEY, edge_id VARCHAR NOT NULL, "
            "stream VARCHAR NOT NULL, rows UBIGINT NOT NULL, raw_bytes UBIGINT NOT NULL, "
            "wire_bytes UBIGINT NOT NULL, received_at TIMESTAMPTZ NOT NULL, priority UINTEGER, "
            "created_at TIMESTAMPTZ)"
        )
        con.execute(
            "INSERT INTO uplink_batches VALUES (?, 'edge-02', 'alarms', 5, 77, 500, now(), 0, "
            "NULL)",
            [real.batch_id],
        )
    receiver = start_receiver()
    assert statuses(push(receiver.port, [real])) == [("edge-01's", "STORED")]
    receiver.stop()
    assert sorted(
        query(
            db,
            "SELECT edge_id, rows, arrow_bytes IS NULL, raw_bytes_implausible FROM uplink_batches",
        )
    ) == [("edge-01", 2, False, False), ("edge-02", 5, True, False)]
    assert query(
        db,
        "SELECT constraint_column_names FROM duckdb_constraints() "
        "WHERE table_name = 'uplink_batches' AND constraint_type = 'PRIMARY KEY'",
    ) == [(["edge_id", "batch_id"],)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"max_batch_bytes": 0},
            "ReceiverLimits.max_batch_bytes (--max-batch-bytes) must be an int >= 1; got 0",
        ),
        (
            {"edge_calls": True},
            "ReceiverLimits.edge_calls (--edge-calls) must be an int >= 1; got True",
        ),
        (
            {"edge_storage_bytes": -1},
            "ReceiverLimits.edge_storage_bytes (--edge-storage-bytes) must be an int >= 0 "
            "(0 = no limit); got -1",
        ),
        (
            {"max_raw_bytes": 1.5},
            "ReceiverLimits.max_raw_bytes (--max-raw-bytes) must be an int >= 0 (0 = no limit); "
            "got 1.5",
        ),
    ],
)
def test_receiver_limits_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        ReceiverLimits(**kwargs)
    assert str(info.value) == message


def test_receiver_limits_must_be_receiver_limits(db):
    with pytest.raises(TypeError, match="CloudReceiver limits must be a ReceiverLimits; got dict"):
        CloudReceiver("127.0.0.1:0", db, EDGES, limits={"edge_calls": 1})


# ---------------------------------------------------------------- fuzz


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            break
        at = position % len(out)
        if kind == 0:
            out[at] = value
        elif kind == 1:
            del out[at:]
        else:
            out[at:at] = bytes([value]) * (1 + value % 9)
    return bytes(out)


FUZZ_SEEDS = [
    ipc(alarms_table(3)),
    ipc(summary_table(4)),
    ipc(pa.table({"flow": [1.0, 2.0], "tags": [["a"], ["b", "c"]]})),
    ipc(pa.table({"d": pa.array(["u", "v", "u"]).dictionary_encode()})),
]


@st.composite
def fuzzed_batches(draw: st.DrawFn) -> uplink_pb2.Batch:
    stream = draw(
        st.sampled_from(["alarms", "telemetry_summary", "pump_curves", "fz"]) | st.text(max_size=8)
    )
    if draw(st.booleans()):
        seed = draw(st.sampled_from(FUZZ_SEEDS))
        edits = draw(
            st.lists(
                st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)),
                max_size=6,
            )
        )
        arrow_ipc = _mutate(seed, edits)
    else:
        arrow_ipc = draw(st.binary(max_size=600))
    right_id = batch_id_of("edge-01", stream, arrow_ipc)
    return uplink_pb2.Batch(
        edge_id="edge-01",
        batch_id=draw(st.just(right_id) | st.text(max_size=300)),
        stream=stream,
        rows=draw(st.integers(0, 6) | st.integers(0, 2**64 - 1)),
        arrow_ipc=arrow_ipc,
        raw_bytes=draw(st.integers(0, 2**64 - 1)),
        priority=draw(st.integers(0, 2**32 - 1)),
        created_at_us=draw(st.integers(-(2**63), 2**63 - 1)),
    )


@given(batch=fuzzed_batches())
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_any_batch_is_answered_with_one_line_and_the_stream_goes_on(receiver, batch):
    good = make_batch("good", "alarms", alarms_table(1, device="fuzz-canary"))
    fuzzed, after = push(receiver.port, [batch, good])
    assert fuzzed.status in (STORED, DUPLICATE, REJECTED)
    if fuzzed.status == REJECTED:
        assert fuzzed.detail and "\n" not in fuzzed.detail
        assert len(fuzzed.detail) < 2000
    assert after.status in (STORED, DUPLICATE)


def test_the_decode_budget_makes_batches_wait_for_room():
    stop = threading.Event()
    budget = DecodeBudget(100, stop)
    assert budget.reserve(60)
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(f"second {budget.reserve(60)}"))
    waiter.start()
    waiter.join(0.3)
    assert got == []  # 60 + 60 > 100: waits
    budget.release(60)
    waiter.join(5)
    assert got == ["second True"]
    budget.release(60)
    assert budget.reserve(500)  # larger than the budget: runs once nothing else does
    late = threading.Thread(target=lambda: got.append(f"late {budget.reserve(1)}"))
    late.start()
    stop.set()
    late.join(5)
    assert got[-1] == "late False"


@given(batch=fuzzed_batches())
@settings(max_examples=500, deadline=None)
def test_any_batch_is_checked_and_decoded_without_an_unexpected_error(batch):
    """What the gRPC fuzz does, in process and faster: only a rejection may come out."""
    try:
        batches.check("edge-01", batch, ReceiverLimits())
        batches.decode(batch)
    except batches.Rejected as exc:
        assert exc.detail and exc.reason
