from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest import mock
from zlib import adler32

import bytewax.operators as op
import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main, run_main

from connectors.sinks import parquet as parquet_mod
from connectors.sinks.parquet import ParquetSettings, ParquetSink, ParquetSinkPartition
from connectors.streams import STREAMS, to_table
from operators.records import DeadLetter, Reading

T0 = datetime(2025, 11, 22, 8, 30, tzinfo=UTC)
POINTS = "telemetry_points"
LOGGER = "edgesieve.parquet"
FILE_NAME = r"part-[A-Za-z0-9_.-]+-p\d+-\d{8}\.parquet"

_real_write_table = pq.write_table


def make_readings(
    n: int, start: datetime = T0, step: timedelta = timedelta(seconds=1)
) -> list[Reading]:
    return [
        Reading(f"dev-{i % 3}", f"k{i % 2}", start + i * step, i * 0.5 - 7.25, "mqtt")
        for i in range(n)
    ]


def row_tuples(readings: list[Reading]) -> list[tuple[Any, ...]]:
    return sorted((r.device, r.key, r.ts, r.value, r.transport) for r in readings)


def read_back(root: Path, stream: str = POINTS) -> pa.Table:
    return ds.dataset(root / stream, format="parquet", partitioning="hive").to_table()


def read_rows(root: Path, stream: str = POINTS) -> list[tuple[Any, ...]]:
    table = read_back(root, stream).select(STREAMS[stream].columns)
    return sorted(tuple(row.values()) for row in table.to_pylist())


def final_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))


def hidden_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if p.is_file())


def by_device(item: Any) -> str:
    return str(getattr(item, "device", None) or "arrow")


def run_flow(
    items: list[Any],
    sink: ParquetSink,
    *,
    batch_size: int = 1000,
    workers: int = 1,
    key: Callable[[Any], str] = lambda _item: "one",
) -> None:
    """Run ``items`` into ``sink``; by default all under one key, so into one partition."""
    flow = Dataflow("parquet_test")
    stream = op.input("in", flow, TestingSource(items, batch_size=batch_size))
    if workers > 1:
        stream = op.redistribute("spread", stream)
    op.output("out", op.key_on("key", stream, key), sink)
    if workers > 1:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    else:
        run_main(flow)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Writes:
    """Thread-safe record of on_write calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, stream: str, rows: int, nbytes: int) -> None:
        with self.lock:
            self.calls.append((stream, rows, nbytes))

    @property
    def rows(self) -> int:
        with self.lock:
            return sum(c[1] for c in self.calls)


@pytest.fixture
def part_factory(tmp_path: Path) -> Iterator[Callable[..., ParquetSinkPartition]]:
    built: list[ParquetSinkPartition] = []

    def build(
        stream: str = POINTS, worker: int = 0, *, timer: bool = True, **kwargs: Any
    ) -> ParquetSinkPartition:
        part = ParquetSink(tmp_path, stream, **kwargs).build_part("out", f"p{worker}", None)
        built.append(part)
        if not timer:
            # Only write_batch/close trigger flushes, so attempts are counted exactly.
            part._stop.set()
            part._timer.join()
        return part

    yield build
    for part in built:
        part._stop.set()


# --- round trip through a real dataflow -------------------------------------------------


def test_dataflow_round_trip_values_types_and_utc(tmp_path: Path) -> None:
    readings = make_readings(2500)
    writes = Writes()
    run_flow(readings, ParquetSink(tmp_path, POINTS, on_write=writes), batch_size=300)

    table = read_back(tmp_path)
    spec = STREAMS[POINTS]
    for field in spec.schema:
        assert table.schema.field(field.name).type == field.type
    assert read_rows(tmp_path) == row_tuples(readings)
    assert all(ts.tzinfo is not None for ts in table.column("ts").to_pylist())
    files = final_files(tmp_path)
    assert [f.parent.name for f in files] == ["date=2025-11-22"] * len(files)
    assert all(f.parent.parent == tmp_path / POINTS for f in files)
    assert writes.calls and all(c[0] == POINTS for c in writes.calls)
    assert writes.rows == len(readings)
    assert sum(c[2] for c in writes.calls) == sum(f.stat().st_size for f in files)
    assert hidden_files(tmp_path) == []


def test_duckdb_reads_hive_partitions(tmp_path: Path) -> None:
    readings = make_readings(100, start=datetime(2025, 3, 1, 23, 59, 10, tzinfo=UTC))
    run_flow(readings, ParquetSink(tmp_path, POINTS))
    glob = str(tmp_path / POINTS / "**" / "*.parquet")
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    got = con.execute(
        "SELECT CAST(date AS VARCHAR), count(*), epoch_us(min(ts)), epoch_us(max(ts)), "
        "any_value(typeof(ts)), any_value(typeof(value)) "
        "FROM read_parquet(?, hive_partitioning=true) GROUP BY 1 ORDER BY 1",
        [glob],
    ).fetchall()
    assert [(d, n) for d, n, *_ in got] == [("2025-03-01", 50), ("2025-03-02", 50)]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert got[0][2] == (readings[0].ts - epoch) // timedelta(microseconds=1)
    assert got[1][3] == (readings[-1].ts - epoch) // timedelta(microseconds=1)
    assert got[0][4:] == ("TIMESTAMP WITH TIME ZONE", "DOUBLE")
    total = con.execute(
        "SELECT sum(value), count(DISTINCT device) FROM read_parquet(?, hive_partitioning=true)",
        [glob],
    ).fetchone()
    assert total == (pytest.approx(sum(r.value for r in readings)), 3)


def test_midnight_splits_into_two_date_partitions_by_utc(tmp_path: Path) -> None:
    before = Reading("d", "k", datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), 1.0)
    after = Reading("d", "k", datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC), 2.0)
    # 01:30 at UTC+2 is 23:30 UTC of the previous day.
    east = Reading("d", "k", datetime(2026, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2))), 3.0)
    run_flow([before, after, east], ParquetSink(tmp_path, POINTS))

    dirs = sorted(p.name for p in (tmp_path / POINTS).iterdir())
    assert dirs == ["date=2025-12-31", "date=2026-01-01"]
    old = pq.read_table(tmp_path / POINTS / "date=2025-12-31")
    new = pq.read_table(tmp_path / POINTS / "date=2026-01-01")
    assert sorted(old.column("value").to_pylist()) == [1.0, 3.0]
    assert new.column("value").to_pylist() == [2.0]
    assert read_rows(tmp_path) == row_tuples([before, after, east])


def test_files_are_zstd_compressed(tmp_path: Path) -> None:
    run_flow(make_readings(50), ParquetSink(tmp_path, POINTS))
    (path,) = final_files(tmp_path)
    meta = pq.ParquetFile(path).metadata
    codecs = {
        meta.row_group(g).column(c).compression
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    }
    assert codecs == {"ZSTD"}


def test_compression_setting_is_used(tmp_path: Path) -> None:
    settings = ParquetSettings(compression="SNAPPY")
    assert settings.compression == "snappy"
    run_flow(make_readings(5), ParquetSink(tmp_path, POINTS, settings=settings))
    (path,) = final_files(tmp_path)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "SNAPPY"


def test_file_names_follow_layout(tmp_path: Path) -> None:
    run_flow(make_readings(5), ParquetSink(tmp_path, POINTS))
    (path,) = final_files(tmp_path)
    assert path.relative_to(tmp_path).parts[:2] == (POINTS, "date=2025-11-22")
    part = adler32(b"one") % 4
    assert path.name == f"part-parquet_test.out-p{part}-00000000.parquet"
    assert re.fullmatch(FILE_NAME, path.name)


def test_other_streams_round_trip(tmp_path: Path) -> None:
    letters = [
        DeadLetter("pump-7", "coap", T0 + timedelta(seconds=i), f"bad #{i}", bytes([i, 0, 255]))
        for i in range(20)
    ]
    texts = [Reading("pump-7", "log", T0, f"line {i}", "http") for i in range(10)]
    run_flow(letters, ParquetSink(tmp_path, "dead_letters"))
    run_flow(texts, ParquetSink(tmp_path, "telemetry_text"))
    assert read_rows(tmp_path, "dead_letters") == sorted(
        (d.device, d.transport, d.received_at, d.reason, d.payload) for d in letters
    )
    assert read_back(tmp_path, "dead_letters").schema.field("payload").type == pa.binary()
    assert read_rows(tmp_path, "telemetry_text") == row_tuples(texts)


def test_summary_partitions_by_window_start(tmp_path: Path) -> None:
    start = datetime(2025, 5, 1, 23, 59, 30, tzinfo=UTC)
    row = {
        "device": "d",
        "key": "t",
        "window_start": start,
        "window_end": start + timedelta(minutes=1),
        "count": 4,
        "mean": 1.0,
        "min": 0.0,
        "max": 2.0,
        "std": 0.5,
        "first": 0.0,
        "last": 2.0,
    }
    run_flow([row], ParquetSink(tmp_path, "telemetry_summary"))
    (path,) = final_files(tmp_path)
    assert path.parent.name == "date=2025-05-01"
    assert pq.read_table(path).to_pylist() == [row]


# --- rolling ---------------------------------------------------------------------------


def test_roll_by_size_makes_several_files(tmp_path: Path) -> None:
    readings = make_readings(5000)
    settings = ParquetSettings(max_file_bytes=20_000)
    writes = Writes()
    run_flow(
        readings,
        ParquetSink(tmp_path, POINTS, settings=settings, on_write=writes),
        batch_size=250,
    )
    files = final_files(tmp_path)
    assert len(files) >= 5
    assert len(writes.calls) == len(files)
    assert read_rows(tmp_path) == row_tuples(readings)
    assert len({f.name for f in files}) == len(files)
    assert hidden_files(tmp_path) == []


def test_size_roll_happens_on_write_batch(
    part_factory: Callable[..., ParquetSinkPartition],
) -> None:
    part = part_factory(settings=ParquetSettings(max_file_bytes=1000))
    part.write_batch(make_readings(10))
    assert part.buffered_rows == 10
    part.write_batch(make_readings(100))
    assert part.files_written == 1
    assert part.rows_written == 110
    assert part.buffered_rows == 0
    assert part.buffered_bytes == 0
    part.close()


def test_roll_by_age_from_timer_thread_without_new_writes(
    tmp_path: Path, part_factory: Callable[..., ParquetSinkPartition]
) -> None:
    writes = Writes()
    settings = ParquetSettings(max_file_age=timedelta(milliseconds=200))
    part = part_factory(settings=settings, on_write=writes)
    readings = make_readings(42)
    part.write_batch(readings)
    assert final_files(tmp_path) == []
    assert wait_for(lambda: writes.rows == 42, timeout=5)
    assert part.buffered_rows == 0
    assert read_rows(tmp_path) == row_tuples(readings)
    part.close()
    assert not part._timer.is_alive()
    assert len(final_files(tmp_path)) == 1


def test_roll_by_age_checked_on_write_batch(
    part_factory: Callable[..., ParquetSinkPartition],
) -> None:
    part = part_factory(
        settings=ParquetSettings(max_file_age=timedelta(milliseconds=50)), timer=False
    )
    part.write_batch(make_readings(3))
    assert part.files_written == 0
    time.sleep(0.1)
    part.write_batch(make_readings(2))
    assert part.files_written == 1
    assert part.rows_written == 5
    part.close()


def test_idle_stream_rolls_inside_a_running_dataflow(tmp_path: Path) -> None:
    writes = Writes()
    seen_during_pause: list[int] = []
    settings = ParquetSettings(max_file_age=timedelta(milliseconds=100))
    first, second = make_readings(10), make_readings(5, start=T0 + timedelta(hours=1))

    flow = Dataflow("idle")
    stream = op.input(
        "in",
        flow,
        TestingSource([*first, TestingSource.PAUSE(timedelta(seconds=1.5)), *second]),
    )
    stream = op.map("probe", stream, lambda r: (seen_during_pause.append(writes.rows), r)[1])
    stream = op.key_on("key", stream, lambda _r: "one")
    op.output("out", stream, ParquetSink(tmp_path, POINTS, settings=settings, on_write=writes))
    run_main(flow)
    # The first probe after the pause already sees the first file published.
    assert seen_during_pause[len(first)] == len(first)
    assert writes.rows == 15
    assert len(final_files(tmp_path)) == 2
    assert read_rows(tmp_path) == row_tuples(first + second)


def test_flush_on_close(tmp_path: Path, part_factory: Callable[..., ParquetSinkPartition]) -> None:
    part = part_factory(settings=ParquetSettings(max_file_age=timedelta(hours=1)))
    readings = make_readings(300)
    part.write_batch(readings[:100])
    part.write_batch(readings[100:])
    assert final_files(tmp_path) == []
    part.close()
    assert read_rows(tmp_path) == row_tuples(readings)
    assert len(final_files(tmp_path)) == 1
    assert not part._timer.is_alive()


def test_removed_directories_are_created_again(
    tmp_path: Path, part_factory: Callable[..., ParquetSinkPartition]
) -> None:
    part = part_factory(settings=ParquetSettings(max_file_bytes=1), timer=False)
    part.write_batch(make_readings(3))
    shutil.rmtree(tmp_path / POINTS)
    later = make_readings(4, start=T0 + timedelta(minutes=1))
    part.write_batch(later)
    assert part.write_failures == 0
    assert read_rows(tmp_path) == row_tuples(later)
    part.close()


def test_close_with_nothing_buffered_writes_nothing(
    tmp_path: Path, part_factory: Callable[..., ParquetSinkPartition]
) -> None:
    part = part_factory()
    part.write_batch([])
    part.close()
    assert not (tmp_path / POINTS).exists()


# --- atomic publish and failures ----------------------------------------------------------


def test_failure_between_write_and_rename_leaves_no_final_file(
    tmp_path: Path,
    part_factory: Callable[..., ParquetSinkPartition],
    caplog: pytest.LogCaptureFixture,
) -> None:
    part = part_factory(settings=ParquetSettings(retry_interval=timedelta(0)))
    readings = make_readings(30)
    part.write_batch(readings)
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        mock.patch.object(os, "replace", side_effect=OSError(errno.EIO, "Input/output error")),
    ):
        assert part._flush_locked() is False
    assert final_files(tmp_path) == []
    assert hidden_files(tmp_path) == []
    assert part.write_failures == 1
    assert part.buffered_rows == 30
    assert "the device reported an I/O error" in caplog.text
    part.close()
    assert read_rows(tmp_path) == row_tuples(readings)
    assert hidden_files(tmp_path) == []


def test_failure_in_fsync_leaves_no_final_file_and_rows_are_retried(
    tmp_path: Path,
    part_factory: Callable[..., ParquetSinkPartition],
    caplog: pytest.LogCaptureFixture,
) -> None:
    part = part_factory(
        settings=ParquetSettings(max_file_bytes=1, retry_interval=timedelta(0)), timer=False
    )
    first = make_readings(10)
    real_fsync = os.fsync
    at_fault: list[tuple[list[Path], list[Path]]] = []

    def fail_on_files(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            at_fault.append((final_files(tmp_path), hidden_files(tmp_path)))
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        mock.patch.object(os, "fsync", side_effect=fail_on_files),
    ):
        part.write_batch(first)
    # While the data was being written it existed only under a hidden temporary name.
    ((finals, temps),) = at_fault
    assert finals == []
    assert len(temps) == 1
    assert re.fullmatch(r"\." + FILE_NAME + r"\.tmp", temps[0].name)
    assert final_files(tmp_path) == []
    assert hidden_files(tmp_path) == []
    assert part.write_failures == 1
    assert "could not write 10 rows" in caplog.text
    second = make_readings(5, start=T0 + timedelta(minutes=5))
    part.write_batch(second)
    assert part.buffered_rows == 0
    assert read_rows(tmp_path) == row_tuples(first + second)
    (path,) = final_files(tmp_path)
    assert pq.ParquetFile(path).metadata.num_rows == 15
    part.close()


def test_concurrent_reader_never_sees_incomplete_files(tmp_path: Path) -> None:
    stop = threading.Event()
    problems: list[str] = []
    reads = {"files": 0}

    def reader() -> None:
        while not stop.is_set():
            for path in final_files(tmp_path):
                try:
                    pq.read_metadata(path)
                    reads["files"] += 1
                except FileNotFoundError:
                    continue
                except Exception as exc:  # a torn file is the failure we look for
                    problems.append(f"{path.name}: {exc}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    readings = make_readings(20_000)
    try:
        run_flow(
            readings,
            ParquetSink(tmp_path, POINTS, settings=ParquetSettings(max_file_bytes=20_000)),
            batch_size=100,
        )
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert reads["files"] > 0
    assert read_rows(tmp_path) == row_tuples(readings)


def test_full_disk_keeps_flow_running_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = {"n": 0}

    def disk_fills_once(table: pa.Table, where: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            where.write(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        _real_write_table(table, where, **kwargs)

    readings = make_readings(3000)
    writes = Writes()
    settings = ParquetSettings(max_file_bytes=30_000, retry_interval=timedelta(0))
    sink = ParquetSink(tmp_path, POINTS, settings=settings, on_write=writes)
    with (
        caplog.at_level(logging.INFO, logger=LOGGER),
        mock.patch.object(parquet_mod.pq, "write_table", side_effect=disk_fills_once),
    ):
        run_flow(readings, sink, batch_size=200)
    assert calls["n"] >= 3
    assert re.search(
        r"ParquetSink 'parquet_test\.out' \(stream 'telemetry_points', partition p\d\): could not "
        r"write \d+ rows to .*/telemetry_points/date=2025-11-22/" + FILE_NAME + r": OSError: "
        r"\[Errno 28\] No space left on device \(errno ENOSPC\)\. The rows stay buffered .* "
        r"retried at the next flush .*Hint: free disk space on that volume",
        caplog.text,
    )
    assert "writes succeed again after 1 failed attempts; nothing was lost" in caplog.text
    assert writes.rows == len(readings)
    assert read_rows(tmp_path) == row_tuples(readings)
    assert hidden_files(tmp_path) == []


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.ENOSPC, "free disk space on that volume or point data_dir at a larger one"),
        (errno.EDQUOT, "the disk quota of the user running the flow is used up"),
        (errno.EPERM, "check that the user running the flow may create and write files there"),
        (errno.EROFS, "the filesystem is mounted read-only; remount it read-write"),
        (errno.ENOTDIR, "a path component is a file, not a directory; move it out of the way"),
        (errno.EIO, "the device reported an I/O error; check the disk and the kernel log"),
        (errno.EMFILE, "check the path, the filesystem and the error above"),
    ],
)
def test_every_errno_hint(
    code: int,
    hint: str,
    part_factory: Callable[..., ParquetSinkPartition],
    caplog: pytest.LogCaptureFixture,
) -> None:
    part = part_factory(settings=ParquetSettings(retry_interval=timedelta(0)))
    part.write_batch(make_readings(2))
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        mock.patch.object(os, "mkdir", side_effect=OSError(code, os.strerror(code))),
    ):
        assert part._flush_locked() is False
    assert f"(errno {errno.errorcode[code]}). The rows stay buffered" in caplog.text
    assert f"Hint: {hint}" in caplog.text
    part.close()
    assert part.rows_written == 2


def test_permission_denied_is_logged_with_hint(
    part_factory: Callable[..., ParquetSinkPartition], caplog: pytest.LogCaptureFixture
) -> None:
    part = part_factory(settings=ParquetSettings(retry_interval=timedelta(0)))
    part.write_batch(make_readings(4))
    denied = PermissionError(errno.EACCES, "Permission denied")
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        mock.patch.object(os, "mkdir", side_effect=denied),
    ):
        assert part._flush_locked() is False
    assert re.search(
        r"could not write 4 rows to .*: PermissionError: \[Errno 13\] Permission denied "
        r"\(errno EACCES\).*Hint: check that the user running the flow may create and write",
        caplog.text,
    )
    part.close()
    assert part.rows_written == 4


def test_unknown_errno_and_non_os_errors_get_generic_hint(
    part_factory: Callable[..., ParquetSinkPartition], caplog: pytest.LogCaptureFixture
) -> None:
    part = part_factory(settings=ParquetSettings(retry_interval=timedelta(0)))
    part.write_batch(make_readings(4))
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        mock.patch.object(parquet_mod.pq, "write_table", side_effect=pa.ArrowInvalid("odd")),
    ):
        assert part._flush_locked() is False
    assert "ArrowInvalid: odd (errno none)" in caplog.text
    assert "Hint: check the path, the filesystem and the error above" in caplog.text
    part.close()
    assert part.rows_written == 4


def test_retry_interval_defers_the_next_attempt(
    part_factory: Callable[..., ParquetSinkPartition],
) -> None:
    part = part_factory(
        settings=ParquetSettings(max_file_bytes=1, retry_interval=timedelta(seconds=1))
    )
    with mock.patch.object(
        parquet_mod.pq, "write_table", side_effect=OSError(errno.ENOSPC, "No space left")
    ) as failing:
        part.write_batch(make_readings(2))
        part.write_batch(make_readings(2))
        assert failing.call_count == 1
    assert part.buffered_rows == 4
    # The timer thread retries once the interval has passed, without new writes.
    assert wait_for(lambda: part.buffered_rows == 0, timeout=5)
    assert part.rows_written == 4
    part.close()


def test_growing_buffer_is_kept_and_logged_once_per_interval(
    part_factory: Callable[..., ParquetSinkPartition], caplog: pytest.LogCaptureFixture
) -> None:
    part = part_factory(
        settings=ParquetSettings(max_file_bytes=500, retry_interval=timedelta(0)), timer=False
    )
    growth = "the write buffer keeps growing"
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        mock.patch.object(
            parquet_mod.pq, "write_table", side_effect=OSError(errno.ENOSPC, "No space left")
        ),
    ):
        for i in range(10):
            part.write_batch(make_readings(20, start=T0 + timedelta(minutes=i)))
        assert caplog.text.count(growth) == 1
        assert part.buffered_bytes > 4 * 500
        assert part.buffered_rows == 200
        part._growth_log_interval_s = 0.0
        part.write_batch(make_readings(1))
        assert caplog.text.count(growth) == 2
    assert re.search(
        r"the write buffer keeps growing: 201 rows, \d+ bytes held in memory, over 4x "
        r"max_file_bytes \(500\), because 11 writes failed so far\. Nothing is dropped",
        caplog.text,
    )
    part.close()
    assert part.rows_written == 201


def test_failed_final_flush_logs_the_loss(
    tmp_path: Path,
    part_factory: Callable[..., ParquetSinkPartition],
    caplog: pytest.LogCaptureFixture,
) -> None:
    part = part_factory(settings=ParquetSettings(max_file_age=timedelta(hours=1)))
    part.write_batch(make_readings(7))
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        mock.patch.object(
            parquet_mod.pq, "write_table", side_effect=OSError(errno.EROFS, "Read-only")
        ),
    ):
        part.close()
    assert "Hint: the filesystem is mounted read-only" in caplog.text
    assert re.search(
        r"the final flush on close failed; 7 rows \(\d+ bytes\) were NOT written to "
        r".*telemetry_points. They are in the last recovery snapshot",
        caplog.text,
    )
    assert final_files(tmp_path) == []
    assert hidden_files(tmp_path) == []


def test_partial_date_failure_keeps_only_failed_date(
    tmp_path: Path, part_factory: Callable[..., ParquetSinkPartition]
) -> None:
    part = part_factory(settings=ParquetSettings(retry_interval=timedelta(0)))
    day1 = make_readings(5, start=datetime(2025, 1, 1, 12, tzinfo=UTC))
    day2 = make_readings(6, start=datetime(2025, 1, 2, 12, tzinfo=UTC))
    part.write_batch(day1 + day2)

    def fail_second_day(table: pa.Table, where: Any, **kwargs: Any) -> None:
        if table.num_rows == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        _real_write_table(table, where, **kwargs)

    with mock.patch.object(parquet_mod.pq, "write_table", side_effect=fail_second_day):
        assert part._flush_locked() is False
    assert part.buffered_rows == 6
    assert [f.parent.name for f in final_files(tmp_path)] == ["date=2025-01-01"]
    part.close()
    assert read_rows(tmp_path) == row_tuples(day1 + day2)
    assert len(final_files(tmp_path)) == 2


def test_unremovable_temp_file_is_reported(
    part_factory: Callable[..., ParquetSinkPartition], caplog: pytest.LogCaptureFixture
) -> None:
    part = part_factory(settings=ParquetSettings(retry_interval=timedelta(0)))
    part.write_batch(make_readings(3))
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        mock.patch.object(os, "replace", side_effect=OSError(errno.EIO, "Input/output error")),
        mock.patch.object(os, "unlink", side_effect=PermissionError(errno.EACCES, "denied")),
    ):
        part._flush_locked()
    assert re.search(
        r"could not remove the incomplete temporary file .*/\." + FILE_NAME + r"\.tmp: "
        r"\[Errno 13\] denied\. It is hidden from dataset readers; delete it by hand",
        caplog.text,
    )
    part.close()


def test_directory_fsync_failure_is_a_warning(
    tmp_path: Path,
    part_factory: Callable[..., ParquetSinkPartition],
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_fsync = os.fsync

    def fail_on_dirs(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    part = part_factory()
    part.write_batch(make_readings(3))
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        mock.patch.object(os, "fsync", side_effect=fail_on_dirs),
    ):
        assert part._flush_locked() is True
    assert re.search(
        r"could not fsync directory .*date=2025-11-22: \[Errno 5\] Input/output error; the "
        r"files in it are complete but may not survive a power loss",
        caplog.text,
    )
    assert part.write_failures == 0
    assert len(final_files(tmp_path)) == 1
    part.close()


def test_on_write_errors_do_not_stop_writing(
    tmp_path: Path,
    part_factory: Callable[..., ParquetSinkPartition],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(stream: str, rows: int, nbytes: int) -> None:
        raise RuntimeError("meter down")

    part = part_factory(on_write=broken)
    part.write_batch(make_readings(3))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        part.close()
    assert re.search(
        r"the on_write callback raised for .*\.parquet \(3 rows\); the file is published",
        caplog.text,
    )
    assert "meter down" in caplog.text
    assert read_rows(tmp_path) == row_tuples(make_readings(3))


def test_timer_thread_survives_unexpected_errors(
    part_factory: Callable[..., ParquetSinkPartition], caplog: pytest.LogCaptureFixture
) -> None:
    settings = ParquetSettings(
        max_file_age=timedelta(milliseconds=50), retry_interval=timedelta(milliseconds=200)
    )
    part = part_factory(settings=settings)
    with (
        caplog.at_level(logging.ERROR, logger=LOGGER),
        mock.patch.object(part, "_flush_locked", side_effect=RuntimeError("boom")) as broken,
    ):
        part.write_batch(make_readings(3))  # inside: the timer may flush 50 ms after it
        assert wait_for(
            lambda: (
                "a flush started by the timer thread failed unexpectedly; rows stay buffered"
                in caplog.text
            )
        )
        time.sleep(0.5)
    # Retries are spaced by retry_interval, not repeated on every timer tick.
    assert 1 <= broken.call_count <= 4
    assert part._timer.is_alive()
    assert wait_for(lambda: part.buffered_rows == 0)
    part.close()
    assert part.rows_written == 3


def test_arrow_tables_and_batches_are_accepted(tmp_path: Path) -> None:
    readings = make_readings(30)
    spec = STREAMS[POINTS]
    table = to_table(spec, readings)
    items: list[Any] = [
        table.slice(0, 10),
        table.slice(10, 10).to_batches()[0],
        table.slice(20).select(list(reversed(spec.columns))),
        table.slice(0, 0),
    ]
    run_flow(items, ParquetSink(tmp_path, POINTS))
    assert read_rows(tmp_path) == row_tuples(readings)
    (path,) = final_files(tmp_path)
    assert pq.read_schema(path).names == spec.columns


# --- several workers ----------------------------------------------------------------------


def test_two_workers_write_distinct_files_and_all_rows(tmp_path: Path) -> None:
    readings = make_readings(4000)
    settings = ParquetSettings(max_file_bytes=40_000)
    run_flow(readings, ParquetSink(tmp_path, POINTS, settings=settings), workers=2, key=by_device)
    files = final_files(tmp_path)
    names = [f.name for f in files]
    assert len(set(names)) == len(names)
    parts = {f"p{adler32(f'dev-{i}'.encode()) % 4}" for i in range(3)}
    assert {n.split("-")[2] for n in names} == parts
    assert read_rows(tmp_path) == row_tuples(readings)
    assert hidden_files(tmp_path) == []


# --- configuration errors -----------------------------------------------------------------


def test_unknown_stream_lists_known_streams(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"ParquetSink: unknown stream 'telemetry'; known streams: alarms, dead_letters, "
        r"device_attributes, log_events, log_summary, "
        r"telemetry_points, telemetry_summary, telemetry_text, vibration_features\. "
        r"Hint: pass a StreamSpec\(name, schema, time_column\) for a stream of your own$",
    ):
        ParquetSink(tmp_path, "telemetry")


def test_sink_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(
        TypeError,
        match=r"ParquetSink\('telemetry_points'\): settings must be a ParquetSettings; got dict",
    ):
        ParquetSink(tmp_path, POINTS, settings={"max_file_bytes": 1})  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"ParquetSink\('telemetry_points'\): on_write must be callable as "
        r"on_write\(stream, rows, file_bytes\); got int",
    ):
        ParquetSink(tmp_path, POINTS, on_write=3)  # type: ignore[arg-type]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(
        ValueError,
        match=r"ParquetSink\('telemetry_points'\): root '.*file' exists and is not a directory",
    ):
        ParquetSink(a_file, POINTS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_file_bytes": 0}, r"max_file_bytes must be a positive int \(bytes\); got 0\. Hint"),
        ({"max_file_bytes": True}, r"max_file_bytes must be a positive int \(bytes\); got True"),
        ({"max_file_bytes": 1.5}, r"max_file_bytes must be a positive int \(bytes\); got 1\.5"),
        (
            {"max_file_age": 60},
            r"max_file_age must be a non-negative datetime\.timedelta; got 60\. Hint",
        ),
        (
            {"retry_interval": timedelta(seconds=-1)},
            r"retry_interval must be a non-negative datetime\.timedelta; got "
            r"datetime\.timedelta\(days=-1, seconds=86399\)",
        ),
        (
            {"max_file_age": timedelta(0)},
            r"max_file_age must be greater than zero; got datetime\.timedelta\(0\)",
        ),
        (
            {"compression": "lzma"},
            r"compression 'lzma' is not a Parquet codec available in this pyarrow; use one of: "
            r"zstd, snappy, gzip, brotli, lz4, none",
        ),
        ({"compression": None}, r"compression None is not a Parquet codec"),
    ],
)
def test_settings_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r"ParquetSettings\." + message):
        ParquetSettings(**kwargs)


def test_settings_are_frozen() -> None:
    settings = ParquetSettings()
    assert settings.max_file_bytes == 64 * 1024 * 1024
    assert settings.max_file_age == timedelta(seconds=60)
    assert settings.compression == "zstd"
    with pytest.raises(AttributeError):
        settings.compression = "gzip"  # type: ignore[misc]


def test_bad_record_fails_loudly_at_the_sink(
    part_factory: Callable[..., ParquetSinkPartition],
) -> None:
    part = part_factory()
    with pytest.raises(TypeError, match=r"record #0 of type DeadLetter has no attribute 'key'"):
        part.write_batch([DeadLetter("d", "mqtt", T0, "x", b"")])
    part.close()
