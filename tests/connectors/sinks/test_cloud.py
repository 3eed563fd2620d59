from __future__ import annotations

import hashlib
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import bytewax.operators as op
import numpy as np
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.testing import TestingSource, cluster_main, run_main

from connectors.sinks.cloud import (
    CloudSink,
    CloudSinkPartition,
    CloudSinkSettings,
    CloudSinkState,
)
from connectors.streams import STREAMS, StreamSpec, conform, to_table
from connectors.uplink.batch import Sealed
from connectors.uplink.outbox import Outbox, OutboxSettings
from connectors.uplink.seal import DICTIONARY_MIN_ROWS, SMALL_BATCH_BYTES, encode_ipc, wire_table
from connectors.uplink.wire import PRIORITIES, batch_id_of
from operators.records import Reading
from protos import uplink_pb2

LOGGER = "edgesieve.cloud_sink"
POINTS = "telemetry_points"
T0 = datetime(2025, 11, 22, 8, 30, tzinfo=UTC)
HOUR = CloudSinkSettings(max_rows=10_000, max_age=timedelta(hours=1))


def readings(n: int, start: int = 0) -> list[Reading]:
    return [
        Reading(f"dev-{i % 3}", f"k{i % 2}", T0 + timedelta(seconds=i), i * 0.25 - 3.0, "mqtt")
        for i in range(start, start + n)
    ]


def same_key(item: Any) -> str:
    return "one"


def run(
    items: list[Any],
    sink: CloudSink,
    *,
    batch_size: int = 1000,
    workers: int = 1,
    key: Callable[[Any], str] = same_key,
) -> None:
    """Run ``items`` into ``sink``, keyed by ``key`` (by default all into one partition)."""
    flow = Dataflow("cloud_sink_test")
    stream = op.input("in", flow, TestingSource(items, batch_size=batch_size))
    if workers > 1:
        stream = op.redistribute("spread", stream)
    op.output("out", op.key_on("key", stream, key), sink)
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)


def batches(box: Outbox) -> list[Sealed]:
    return box.next(10_000)


def rows_of(sealed: Sealed) -> pa.Table:
    """The rows of a sealed batch as the receiver reads them (cast back to the stream's types)."""
    message = uplink_pb2.Batch.FromString(sealed.payload)
    table = pa.ipc.open_stream(message.arrow_ipc).read_all()
    return conform(STREAMS[message.stream], table) if message.stream in STREAMS else table


@pytest.fixture
def box(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    yield outbox
    outbox.close()


class Recorder(CloudSink):
    """The sink, remembering its partitions to read their counters."""

    def build_part(
        self, step_id: str, for_part: str, resume_state: CloudSinkState | None
    ) -> CloudSinkPartition:
        part = super().build_part(step_id, for_part, resume_state)
        self.parts = [*getattr(self, "parts", []), part]
        return part

    def total(self, counter: str) -> int:
        return sum(getattr(part, counter) for part in self.parts)


# -- sealing ----------------------------------------------------------------------------------


def test_seals_by_rows_and_on_close(box: Outbox):
    data = readings(25)
    seen: list[Sealed] = []
    raw_calls: list[int] = []

    def raw(rows: list[object]) -> int:
        raw_calls.append(len(rows))
        return 100 * len(rows)

    before = datetime.now(UTC)
    sink = CloudSink(
        box,
        "edge-01",
        POINTS,
        settings=CloudSinkSettings(max_rows=10),
        raw_bytes=raw,
        on_seal=seen.append,
    )
    run(data, sink, batch_size=4)
    after = datetime.now(UTC)
    got = batches(box)
    assert [b.rows for b in got] == [10, 10, 5]
    assert raw_calls == [10, 10, 5]
    assert seen == got
    spec = STREAMS[POINTS]
    for sealed, chunk in zip(got, (data[0:10], data[10:20], data[20:25]), strict=True):
        assert rows_of(sealed).equals(to_table(spec, chunk))
        message = uplink_pb2.Batch.FromString(sealed.payload)
        assert message.edge_id == "edge-01"
        assert message.batch_id == sealed.batch_id
        assert message.stream == POINTS
        assert message.priority == sealed.priority == PRIORITIES[POINTS] == 3
        assert message.rows == sealed.rows
        assert message.raw_bytes == sealed.raw_bytes == 100 * sealed.rows
        assert before <= sealed.created_at <= after
        assert message.created_at_us == int(sealed.created_at.timestamp() * 1_000_000)
        expected_id = hashlib.sha256(
            (7).to_bytes(8, "big")
            + b"edge-01"
            + (16).to_bytes(8, "big")
            + POINTS.encode()
            + message.arrow_ipc
        ).hexdigest()
        assert sealed.batch_id == expected_id == batch_id_of("edge-01", POINTS, message.arrow_ipc)


def test_ipc_is_zstd_compressed():
    table = to_table(STREAMS[POINTS], [Reading("pump-7", "temperature", T0, 21.5)] * 2000)
    plain = pa.BufferOutputStream()
    with pa.ipc.new_stream(plain, table.schema) as writer:
        writer.write_table(table)
    packed = encode_ipc(table)
    assert len(packed) * 5 < plain.getvalue().size
    assert pa.ipc.open_stream(packed).read_all().equals(table)


def test_small_wire_batches_are_compressed_harder_and_read_back_the_same():
    small = to_table(STREAMS[POINTS], readings(400))
    assert small.nbytes <= SMALL_BATCH_BYTES
    wire = encode_ipc(small, wire=True)
    assert len(wire) < len(encode_ipc(small))  # level 19 beats the default on these rows
    assert pa.ipc.open_stream(wire).read_all().equals(small)
    large = to_table(STREAMS[POINTS], readings(4000))
    assert large.nbytes > SMALL_BATCH_BYTES
    assert encode_ipc(large, wire=True) == encode_ipc(large)  # a backlog keeps the fast level


class QueueSource(DynamicSource):
    """A live source: emits what the test puts in the queue, ends when `stop` is set."""

    def __init__(self, items: queue.Queue, stop: threading.Event) -> None:
        self.items = items
        self.stop = stop

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _QueuePartition:
        return _QueuePartition(self.items, self.stop)


class _QueuePartition(StatelessSourcePartition):
    def __init__(self, items: queue.Queue, stop: threading.Event) -> None:
        self.items = items
        self.stop = stop

    def next_batch(self) -> list[Any]:
        out = []
        while True:
            try:
                out.append(self.items.get_nowait())
            except queue.Empty:
                break
        if not out and self.stop.is_set():
            raise StopIteration
        return out

    def next_awake(self) -> datetime | None:
        return datetime.now(UTC) + timedelta(milliseconds=10)


def test_seals_by_age_while_the_flow_runs(box: Outbox, run_flow, wait_for):
    items: queue.Queue = queue.Queue()
    stop = threading.Event()
    flow = Dataflow("cloud_age")
    op.output(
        "out",
        op.key_on("key", op.input("in", flow, QueueSource(items, stop)), lambda a: a["device"]),
        CloudSink(
            box,
            "edge-01",
            "alarms",
            settings=CloudSinkSettings(max_rows=1000, max_age=timedelta(seconds=0.2)),
        ),
    )
    alarms = [
        {
            "device": "pump-7",
            "ts": T0 + timedelta(seconds=i),
            "rule": "vib",
            "state": "raised",
            "severity": "critical",
            "value": 11.5 + i,
            "key": "velocity_rms_mm_s",
        }
        for i in range(5)
    ]
    runner = run_flow(flow, stops=[stop])
    for a in alarms[:3]:
        items.put(a)
    wait_for(lambda: box.stats().batches == 1, "the first batch sealed by age", timeout=5)
    assert runner.alive
    first = batches(box)[0]
    assert first.rows == 3 and first.priority == 0 and first.stream == "alarms"
    assert rows_of(first).to_pylist() == to_table(STREAMS["alarms"], alarms[:3]).to_pylist()
    for a in alarms[3:]:
        items.put(a)
    wait_for(lambda: box.stats().batches == 2, "the second batch sealed by age", timeout=5)
    assert runner.alive
    stop.set()
    runner.join()
    assert [b.rows for b in batches(box)] == [3, 2]


def test_close_seals_what_is_left(box: Outbox):
    run(readings(7), CloudSink(box, "edge-01", POINTS, settings=HOUR))
    [only] = batches(box)
    assert only.rows == 7
    assert only.raw_bytes == 0


def test_batch_id_is_deterministic_across_runs(tmp_path: Path):
    data = readings(57)
    settings = CloudSinkSettings(max_rows=20)

    def ids(name: str, batch_size: int, edge: str = "edge-01") -> tuple[list[str], list[bytes]]:
        with Outbox(tmp_path / f"{name}.sqlite") as box:
            run(data, CloudSink(box, edge, POINTS, settings=settings), batch_size=batch_size)
            got = batches(box)
            return [b.batch_id for b in got], [
                uplink_pb2.Batch.FromString(b.payload).arrow_ipc for b in got
            ]

    first, ipc_first = ids("one", 1)
    time.sleep(0.01)
    second, ipc_second = ids("two", 7)
    assert len(first) == 3
    assert first == second
    assert ipc_first == ipc_second
    other, _ = ids("three", 7, edge="edge-02")
    assert set(other).isdisjoint(first)
    assert len(set(first)) == 3


def test_ipc_bytes_do_not_depend_on_chunking_or_slicing():
    spec = STREAMS["vibration_features"]
    rng = random.Random(3)
    rows = []
    for i in range(120):
        row = {name: None for name in spec.columns}
        row.update(
            device=rng.choice(["a", "bb", None]),
            axis="x",
            ts=T0 + timedelta(seconds=i),
            band_energy=rng.choice([None, [], [1.0, None, 2.0], [float(i)]]),
            rms=rng.choice([None, 1.5]),
            frames=rng.choice([None, 3]),
        )
        rows.append(row)
    whole = to_table(spec, rows)
    for _ in range(60):
        start, n = rng.randrange(0, 100), rng.randrange(1, 20)
        expected = encode_ipc(to_table(spec, rows[start : start + n]))
        cuts = sorted(rng.sample(range(1, 120), 4))
        bounds = [0, *cuts, 120]
        chunked = pa.concat_tables(
            [to_table(spec, rows[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
        )
        assert encode_ipc(chunked.slice(start, n)) == expected
        assert encode_ipc(whole.slice(start, n)) == expected


def test_replay_into_the_same_outbox_is_recognised(box: Outbox):
    seen: list[Sealed] = []
    sink = CloudSink(
        box, "edge-01", POINTS, settings=CloudSinkSettings(max_rows=10), on_seal=seen.append
    )
    run(readings(20), sink)
    assert box.stats().batches == 2
    run(readings(20), sink, batch_size=3)
    assert box.stats().batches == 2
    assert len(seen) == 2


def test_arrow_and_dict_input_and_list_columns(box: Outbox):
    spec = STREAMS["vibration_features"]
    rows = [
        {name: None for name in spec.columns}
        | {
            "device": "pump-7",
            "axis": axis,
            "ts": T0,
            "window_s": 1.0,
            "sample_rate_hz": 1000,
            "band_energy": [0.125, 0.25, float(i)],  # float32 carries them exactly
            "rms": 1.5,
            "velocity_rms_mm_s": 4.0 + i,
            "iso_zone": "B",
            "frames": 1024,
            "transport": "mqtt",
        }
        for i, axis in enumerate("xyz")
    ]
    table = to_table(spec, rows)
    sink = CloudSink(box, "edge-01", "vibration_features", settings=HOUR)
    run([table, table.slice(1)], sink)
    [sealed] = batches(box)
    assert sealed.priority == PRIORITIES["vibration_features"] == 1
    assert rows_of(sealed).equals(pa.concat_tables([table, table.slice(1)]).combine_chunks())


def test_two_workers_seal_every_row(box: Outbox):
    data = readings(300)
    sink = CloudSink(box, "edge-01", POINTS, settings=CloudSinkSettings(max_rows=40))
    run(data, sink, batch_size=10, workers=2, key=lambda r: r.device)
    got = batches(box)
    assert all(b.rows <= 40 for b in got)
    tables = pa.concat_tables([rows_of(b) for b in got])
    assert sorted(tables.column("ts").to_pylist()) == [r.ts for r in data]


def test_priority_override(box: Outbox):
    run(readings(2), CloudSink(box, "edge-01", POINTS, settings=HOUR, priority=0))
    assert batches(box)[0].priority == 0


# -- failures ---------------------------------------------------------------------------------


def test_outbox_failure_keeps_rows_and_retries(box: Outbox, caplog):
    real_put = box.put
    calls = {"n": 0}

    def flaky_put(sealed: Sealed) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real_put(sealed)

    raw_calls: list[int] = []

    def raw(rows: list[object]) -> int:
        raw_calls.append(len(rows))
        return 10 * len(rows)

    sink = Recorder(
        box,
        "edge-01",
        POINTS,
        raw_bytes=raw,
        settings=CloudSinkSettings(max_rows=5, retry_interval=timedelta(0)),
    )
    with (
        mock.patch.object(box, "put", side_effect=flaky_put),
        caplog.at_level(logging.ERROR, LOGGER),
    ):
        run(readings(12), sink, batch_size=5)
    got = batches(box)
    assert [b.rows for b in got] == [5, 5, 2]
    assert sum(b.raw_bytes for b in got) == 120  # every row counted once
    assert sum(raw_calls) == 12
    assert sink.total("put_failures") == 1
    assert sink.total("rows_sealed") == 12
    assert "could not store a batch of 5 rows in the outbox" in caplog.text
    assert (
        "OperationalError: database or disk is full. The rows stay buffered (5 rows) and "
        "the seal is retried in 0.0s. Hint: free disk space on the volume of data_dir"
        in caplog.text
    )


def test_outbox_failure_other_than_a_full_disk_does_not_blame_the_disk(box: Outbox, caplog):
    real_put = box.put
    calls = {"n": 0}

    def flaky_put(sealed: Sealed) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise PermissionError(13, "Permission denied")
        return real_put(sealed)

    sink = Recorder(
        box, "edge-01", POINTS, settings=CloudSinkSettings(max_rows=5, retry_interval=timedelta(0))
    )
    with (
        mock.patch.object(box, "put", side_effect=flaky_put),
        caplog.at_level(logging.ERROR, LOGGER),
    ):
        run(readings(5), sink, batch_size=5)
    assert sum(b.rows for b in batches(box)) == 5
    assert (
        "PermissionError: [Errno 13] Permission denied. The rows stay buffered (5 rows) and the "
        "seal is retried in 0.0s. Hint: see the error; check that data_dir is writable"
    ) in caplog.text
    assert "free disk space" not in caplog.text


def test_failure_at_close_is_logged_as_loss(box: Outbox, caplog):
    sink = Recorder(box, "edge-01", POINTS, settings=HOUR)
    with (
        mock.patch.object(box, "put", side_effect=sqlite3.OperationalError("disk I/O error")),
        caplog.at_level(logging.ERROR, LOGGER),
    ):
        run(readings(4), sink)
    assert box.stats().batches == 0
    assert sink.total("dropped_rows") == 4
    assert "the final seal on close failed; 4 rows were NOT stored in the outbox" in caplog.text


def test_batch_too_big_for_the_outbox_is_dropped_and_logged(tmp_path: Path, caplog):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(max_bytes=300))
    sink = Recorder(box, "edge-01", POINTS, settings=CloudSinkSettings(max_rows=500))
    with caplog.at_level(logging.ERROR, LOGGER):
        run(readings(1000), sink)
    assert sink.total("dropped_rows") == 1000
    assert box.stats().batches == 0
    assert "500 rows can never be stored and are dropped: Outbox" in caplog.text
    assert "larger than the whole outbox (max_bytes=300)" in caplog.text
    box.close()


def test_callback_failures_do_not_stop_the_flow(box: Outbox, caplog):
    def bad_raw(rows: list[object]) -> int:
        raise KeyError("meter")

    def bad_seal(sealed: Sealed) -> None:
        raise RuntimeError("report")

    with caplog.at_level(logging.ERROR, LOGGER):
        run(
            readings(3),
            CloudSink(box, "edge-01", POINTS, settings=HOUR, raw_bytes=bad_raw, on_seal=bad_seal),
        )
        run(
            readings(3, start=10),
            CloudSink(box, "edge-01", POINTS, settings=HOUR, raw_bytes=lambda rows: -5),
        )
    assert [b.raw_bytes for b in batches(box)] == [0, 0]
    assert (
        "the raw_bytes callback raised for a batch of 3 rows; the batch is sent with "
        "raw_bytes=0" in caplog.text
    )
    assert "the on_seal callback raised for batch" in caplog.text
    assert "the raw_bytes callback returned -5; it must return a non-negative int" in caplog.text


def test_bad_record_fails_the_flow_with_the_stream_error(box: Outbox):
    with pytest.raises(Exception) as info:
        run([{"device": "x"}], CloudSink(box, "edge-01", POINTS))
    chain = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(
        isinstance(e, TypeError) and "record #0 of type dict has no key 'key'" in str(e)
        for e in chain
    ), chain


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"stream": "nope"},
            ValueError,
            r"CloudSink: unknown stream 'nope'; known streams: alarms, dead_letters, .* Hint: pass a "
            r"StreamSpec\(name, schema, time_column\) for a stream of your own$",
        ),
        (
            {"outbox": "x"},
            TypeError,
            r"CloudSink\('telemetry_points'\): outbox must be an Outbox or a function opening one; "
            r"got str$",
        ),
        (
            {"edge_id": ""},
            ValueError,
            r"CloudSink\('telemetry_points'\): edge_id must be a non-empty string; got ''",
        ),
        (
            {"settings": {}},
            TypeError,
            r"CloudSink\('telemetry_points'\): settings must be a CloudSinkSettings; got dict",
        ),
        (
            {"raw_bytes": 5},
            TypeError,
            r"CloudSink\('telemetry_points'\): raw_bytes must be callable; got int",
        ),
        ({"on_seal": "x"}, TypeError, r"on_seal must be callable; got str"),
        (
            {"priority": -1},
            ValueError,
            r"CloudSink\('telemetry_points'\): priority must be an int >= 0; got -1",
        ),
    ],
)
def test_sink_errors(box: Outbox, kwargs, error, match):
    params = {"outbox": box, "edge_id": "edge-01", "stream": POINTS, **kwargs}
    with pytest.raises(error, match=match):
        CloudSink(params.pop("outbox"), params.pop("edge_id"), params.pop("stream"), **params)


def test_missing_zstd_is_a_build_time_error(box: Outbox):
    with (
        mock.patch("connectors.sinks.cloud._zstd_available", return_value=False),
        pytest.raises(
            RuntimeError,
            match=r"CloudSink: this pyarrow has no zstd codec, which "
            r"the uplink requires",
        ),
    ):
        CloudSink(box, "edge-01", POINTS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"max_rows": 0},
            r"CloudSinkSettings.max_rows must be a positive int; got 0. Hint: 10_000",
        ),
        ({"max_rows": 2.5}, r"max_rows must be a positive int; got 2.5"),
        (
            {"max_age": timedelta(0)},
            r"CloudSinkSettings.max_age must be a positive "
            r"datetime.timedelta; got datetime.timedelta\(0\)",
        ),
        ({"max_age": 10}, r"max_age must be a positive datetime.timedelta; got 10"),
        (
            {"retry_interval": timedelta(seconds=-1)},
            r"CloudSinkSettings.retry_interval must be a non-negative datetime.timedelta",
        ),
    ],
)
def test_settings_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CloudSinkSettings(**kwargs)


def test_an_outbox_given_as_a_function_is_opened_once_when_the_flow_starts(box: Outbox):
    opened: list[int] = []

    def open_outbox() -> Outbox:
        opened.append(1)
        return box

    sink = CloudSink(open_outbox, "edge-01", POINTS, settings=CloudSinkSettings(max_rows=10))
    assert opened == []  # building the flow opens nothing
    run(readings(25), sink, batch_size=4, workers=2)
    assert opened == [1]
    assert sum(b.rows for b in batches(box)) == 25


def test_a_stream_of_ones_own_by_spec(box: Outbox):
    spec = StreamSpec("pressure_points", STREAMS[POINTS].schema, "ts")
    run(readings(3), CloudSink(box, "edge-01", spec))
    (sealed,) = batches(box)
    assert sealed.stream == "pressure_points" and sealed.priority == 2


def feature_rows(n: int, *, rms: float = 1.5) -> pa.Table:
    spec = STREAMS["vibration_features"]
    return to_table(
        spec,
        [
            {name: None for name in spec.columns}
            | {
                "device": f"pump-{i % 3}",
                "axis": "xyz"[i % 3],
                "ts": T0 + timedelta(seconds=i),
                "window_s": 0.96,
                "sample_rate_hz": 25_600,
                "band_energy": [0.1 * i, 1e-4],
                "rms": rms + i / 7,
                "velocity_rms_mm_s": 0.49,
                "iso_zone": "A",
                "frames": 6,
                "transport": "mqtt",
            }
            for i in range(n)
        ],
    )


def test_wire_table_sends_features_as_float32_and_big_batches_dictionary_encoded():
    small = wire_table("vibration_features", feature_rows(10))
    assert small.schema.field("rms").type == pa.float32()
    assert small.schema.field("band_energy").type == pa.list_(pa.float32())
    assert small.schema.field("device").type == pa.string()  # a dictionary costs more here
    assert small.schema.field("ts").type == STREAMS["vibration_features"].schema.field("ts").type
    big = wire_table("vibration_features", feature_rows(DICTIONARY_MIN_ROWS))
    assert big.schema.field("device").type == pa.dictionary(pa.int32(), pa.string())
    assert big.schema.field("iso_zone").type == pa.dictionary(pa.int32(), pa.string())
    back = conform(STREAMS["vibration_features"], big)
    assert (
        back.column("device").to_pylist()
        == feature_rows(DICTIONARY_MIN_ROWS).column("device").to_pylist()
    )
    np.testing.assert_allclose(
        back.column("rms").to_numpy(),
        feature_rows(DICTIONARY_MIN_ROWS).column("rms").to_numpy(),
        rtol=1e-7,
    )
    # the same rows give the same bytes (the batch id is their hash)
    assert encode_ipc(wire_table("vibration_features", feature_rows(300))) == encode_ipc(
        wire_table("vibration_features", feature_rows(300))
    )


def test_wire_table_keeps_float64_beyond_float32_range_and_leaves_other_streams_alone():
    huge = wire_table("vibration_features", feature_rows(3, rms=1e200))
    assert huge.schema.field("rms").type == pa.float64()
    assert huge.column("rms").to_pylist()[0] == 1e200
    assert huge.schema.field("peak").type == pa.float32()  # all null: fits
    points = to_table(
        STREAMS["telemetry_points"],
        [{"device": "d", "key": "t", "ts": T0, "value": 0.1, "transport": "mqtt"}] * 300,
    )
    sent = wire_table("telemetry_points", points)
    assert sent.schema.field("value").type == pa.float64()  # readings stay exact
    assert sent.schema.field("key").type == pa.dictionary(pa.int32(), pa.string())
    mine = pa.table({"ts": points.column("ts"), "note": points.column("key")})
    assert wire_table("my_notes", mine) is mine  # the receiver stores a user's types as sent


def test_compact_features_are_smaller_on_the_wire():
    spec = STREAMS["vibration_features"]
    rng = np.random.default_rng(7)
    measured = {  # features of a running machine: every value carries noise
        name: rng.normal(1.0, 0.05, 100).tolist()
        for name in ("rms", "velocity_rms_mm_s", "peak", "crest_factor", "kurtosis")
    }
    rows = [
        {name: values[i] for name, values in measured.items()}
        | {
            "device": "pump-1",
            "axis": "xyz"[i % 3],
            "ts": T0 + timedelta(seconds=i),
            "window_s": 0.96,
            "sample_rate_hz": 25_600,
            "band_energy": rng.exponential(0.1, 3).tolist(),
            "dominant_hz": 24.75 + rng.normal(0, 0.01),
            "dominant_amplitude": rng.normal(0.1, 0.005),
            "iso_zone": "A",
            "frames": 6,
            "transport": "mqtt",
        }
        for i in range(100)
    ]
    table = to_table(spec, rows)
    assert len(encode_ipc(wire_table("vibration_features", table))) < 0.8 * len(encode_ipc(table))
