"""Exactly once across Bytewax recovery, for both local sinks (Parquet and DuckDB).

Crashes are real: an exception inside the dataflow (Bytewax then closes the
sink partitions, which flush, like a roll after the last snapshot), or a
``kill -9`` of a child process running the flow (buffered rows are lost and
files written after the snapshot stay behind). After the reruns the rows
read back from the files / the database equal the input exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import bytewax.operators as op
import duckdb
import pyarrow.dataset as ds
import pytest
from bytewax.dataflow import Dataflow
from bytewax.outputs import Sink
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, cluster_main, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.sinks import parquet as parquet_mod
from connectors.sinks.duckdb import DuckDBSettings, DuckDBSink
from connectors.sinks.parquet import ParquetSettings, ParquetSink
from operators.records import Reading
from tests.conftest import ROOT

T0 = datetime(2025, 11, 22, 23, 59, 30, tzinfo=UTC)
POINTS = "telemetry_points"
NEVER = timedelta(hours=1)


def readings(n: int) -> list[Reading]:
    """``n`` readings of 5 devices; ``value`` is the index; the series crosses midnight."""
    return [
        Reading(f"dev-{i % 5}", "k", T0 + timedelta(seconds=i * 0.25), float(i), "mqtt")
        for i in range(n)
    ]


@dataclass
class Target:
    """One sink kind: how to build it over a directory and read its rows back."""

    name: str
    build: Callable[..., Sink[Any]]
    values: Callable[[Path], list[float]]


def parquet_sink(out: Path, *, rows: int = 40, rec: Path | None = None) -> ParquetSink:
    # ~40 rows of telemetry_points per file: several rolls per run.
    settings = ParquetSettings(max_file_bytes=rows * 60, max_file_age=NEVER)
    return ParquetSink(out / "parquet", POINTS, settings=settings, recovery_dir=rec)


def parquet_values(out: Path) -> list[float]:
    root = out / "parquet" / POINTS
    if not list(root.rglob("part-*.parquet")):
        return []
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    return sorted(table["value"].to_pylist())


def duckdb_sink(out: Path, *, rows: int = 40, rec: Path | None = None) -> DuckDBSink:
    settings = DuckDBSettings(max_rows=rows, max_age=NEVER, flush_on_snapshot=False)
    return DuckDBSink(out / "edge.duckdb", POINTS, settings=settings, recovery_dir=rec)


def duckdb_values(out: Path) -> list[float]:
    path = out / "edge.duckdb"
    if not path.exists():
        return []
    con = duckdb.connect(str(path))
    try:
        return sorted(v for (v,) in con.execute(f"SELECT value FROM {POINTS}").fetchall())
    finally:
        con.close()


TARGETS = [
    Target("parquet", parquet_sink, parquet_values),
    Target("duckdb", duckdb_sink, duckdb_values),
]


@pytest.fixture(params=TARGETS, ids=lambda t: t.name)
def target(request: pytest.FixtureRequest) -> Target:
    return request.param  # type: ignore[no-any-return]


class Crasher:
    """A map function raising once at each of the given input values."""

    def __init__(self, at: set[int]) -> None:
        self.pending = set(at)

    def __call__(self, reading: Reading) -> Reading:
        index = int(reading.value)
        if index in self.pending:
            self.pending.discard(index)
            msg = f"simulated crash at input {index}"
            raise RuntimeError(msg)
        return reading


def make_flow(items: list[Any], sink: Sink[Any], crasher: Crasher, batch_size: int) -> Dataflow:
    flow = Dataflow("eo")
    stream = op.input("in", flow, TestingSource(items, batch_size=batch_size))
    stream = op.map("crash", stream, crasher)
    op.output("out", op.key_on("by_device", stream, lambda r: r.device), sink)
    return flow


def run_to_end(
    make: Callable[[], Dataflow],
    rec: Path,
    *,
    epoch: timedelta = timedelta(0),
    max_runs: int = 20,
    workers: int = 1,
) -> int:
    """Run with recovery until a run ends without a crash; return how many runs it took."""
    for run in range(1, max_runs + 1):
        try:
            if workers == 1:
                run_main(make(), epoch_interval=epoch, recovery_config=RecoveryConfig(str(rec)))
            else:
                cluster_main(
                    make(),
                    [],
                    0,
                    epoch_interval=epoch,
                    recovery_config=RecoveryConfig(str(rec)),
                    worker_count_per_proc=workers,
                )
        except Exception as exc:
            if ".crash." not in str(exc):  # the Crasher step raised: a simulated crash
                raise
            continue
        return run
    pytest.fail(f"the flow still crashed after {max_runs} runs")


def setup_dirs(tmp_path: Path, recovery_parts: int = 1) -> tuple[Path, Path]:
    out, rec = tmp_path / "out", tmp_path / "recovery"
    out.mkdir(parents=True)
    rec.mkdir()
    init_db_dir(rec, recovery_parts)
    return out, rec


# --- crash points -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("crash_at", "rows_per_flush", "epoch"),
    [
        pytest.param({7}, 10_000, timedelta(0), id="before-any-roll"),
        pytest.param({130}, 20, timedelta(0), id="after-rolls-snapshot-every-batch"),
        pytest.param({130, 260}, 20, timedelta(milliseconds=30), id="rolls-between-snapshots"),
        pytest.param({50, 51, 52, 300}, 7, timedelta(0), id="crash-during-replay"),
    ],
)
def test_crash_and_resume_writes_every_row_once(
    tmp_path: Path, target: Target, crash_at: set[int], rows_per_flush: int, epoch: timedelta
) -> None:
    out, rec = setup_dirs(tmp_path)
    data = readings(400)
    crasher = Crasher(crash_at)
    runs = run_to_end(
        lambda: make_flow(data, target.build(out, rows=rows_per_flush, rec=rec), crasher, 9),
        rec,
        epoch=epoch,
    )
    assert runs == len(crash_at) + 1
    assert target.values(out) == [float(i) for i in range(400)]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    crash_at=st.sets(st.integers(0, 299), max_size=3),
    rows_per_flush=st.integers(3, 120),
    batch_size=st.integers(1, 40),
    epoch_ms=st.sampled_from([0, 5, 50]),
)
def test_any_crash_points_give_exactly_once(
    tmp_path_factory: pytest.TempPathFactory,
    target: Target,
    crash_at: set[int],
    rows_per_flush: int,
    batch_size: int,
    epoch_ms: int,
) -> None:
    out, rec = setup_dirs(tmp_path_factory.mktemp("eo"))
    data = readings(300)
    crasher = Crasher(crash_at)
    run_to_end(
        lambda: make_flow(
            data, target.build(out, rows=rows_per_flush, rec=rec), crasher, batch_size
        ),
        rec,
        epoch=timedelta(milliseconds=epoch_ms),
    )
    assert target.values(out) == [float(i) for i in range(300)]


def test_crash_before_the_first_snapshot_commits(tmp_path: Path, target: Target) -> None:
    """No snapshot in the store yet: with recovery_dir the rows of that run are removed."""
    out, rec = setup_dirs(tmp_path)
    data = readings(200)
    crasher = Crasher({150})
    # One long epoch: the first run crashes before any snapshot is committed, after rolls.
    run_to_end(
        lambda: make_flow(data, target.build(out, rows=20, rec=rec), crasher, 10),
        rec,
        epoch=NEVER,
    )
    assert target.values(out) == [float(i) for i in range(200)]


def test_without_recovery_dir_an_earlier_run_is_never_deleted(
    tmp_path: Path, target: Target
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    data = readings(50)
    for _ in range(2):
        run_main(make_flow(data, target.build(out, rows=20), Crasher(set()), 10))
    assert target.values(out) == sorted(2 * [float(i) for i in range(50)])


def test_clean_stop_then_restart_replays_nothing(tmp_path: Path, target: Target) -> None:
    out, rec = setup_dirs(tmp_path)
    data = readings(120)
    items: list[Any] = [*data[:70], TestingSource.EOF(), *data[70:]]
    crasher = Crasher(set())
    make = lambda: make_flow(items, target.build(out, rows=25, rec=rec), crasher, 8)  # noqa: E731
    run_main(make(), epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(rec)))
    # A clean stop flushed everything: all rows before the EOF are readable.
    assert target.values(out) == [float(i) for i in range(70)]
    run_main(make(), epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(rec)))
    assert target.values(out) == [float(i) for i in range(120)]
    run_main(make(), epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(rec)))
    assert target.values(out) == [float(i) for i in range(120)]


def test_two_workers_with_crashes(tmp_path: Path, target: Target) -> None:
    out, rec = setup_dirs(tmp_path, recovery_parts=2)
    data = readings(300)
    crasher = Crasher({120})

    def make() -> Dataflow:
        flow = Dataflow("eo2")
        stream = op.input("in", flow, TestingSource(data, batch_size=10))
        stream = op.redistribute("spread", op.map("crash", stream, crasher))
        sink = target.build(out, rows=15, rec=rec)
        op.output("out", op.key_on("by_device", stream, lambda r: r.device), sink)
        return flow

    run_to_end(make, rec, workers=2)
    assert target.values(out) == [float(i) for i in range(300)]


# --- failing writes -----------------------------------------------------------------------


def test_parquet_disk_full_then_crash_keeps_rows_in_the_snapshot(tmp_path: Path) -> None:
    """Every write fails in the first run (even on close): the snapshots still hold the rows."""
    out, rec = setup_dirs(tmp_path)
    data = readings(200)
    crasher = Crasher({150})
    full = OSError(28, "No space left on device")
    with mock.patch.object(parquet_mod.pq, "write_table", side_effect=full):
        with pytest.raises(Exception, match=r"\.crash\."):
            run_main(
                make_flow(data, parquet_sink(out, rows=20, rec=rec), crasher, 10),
                epoch_interval=timedelta(0),
                recovery_config=RecoveryConfig(str(rec)),
            )
    assert parquet_values(out) == []
    assert [p for p in out.rglob("*") if p.is_file() and p.suffix == ".tmp"] == []
    run_to_end(lambda: make_flow(data, parquet_sink(out, rows=20, rec=rec), crasher, 10), rec)
    assert parquet_values(out) == [float(i) for i in range(200)]


def test_file_names_are_deterministic(tmp_path: Path) -> None:
    names = []
    for run in ("a", "b"):
        out, rec = setup_dirs(tmp_path / run)
        run_to_end(
            lambda out=out, rec=rec: make_flow(
                readings(300), parquet_sink(out, rows=20, rec=rec), Crasher(set()), 300
            ),
            rec,
            epoch=NEVER,
        )
        names.append(sorted(str(p.relative_to(out)) for p in out.rglob("part-*.parquet")))
    assert names[0] == names[1]
    assert names[0][0] == "parquet/telemetry_points/date=2025-11-22/part-eo.out-p0-00000000.parquet"
    assert any("date=2025-11-23" in name for name in names[0])


# --- kill -9 ------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from datetime import timedelta
    from pathlib import Path
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig
    from bytewax.testing import TestingSource, run_main
    from tests.connectors.sinks.test_parquet_exactly_once import TARGETS, readings

    kind, out, rec, kill_at = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    target = next(t for t in TARGETS if t.name == kind)

    def maybe_die(reading):
        if int(reading.value) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return reading

    flow = Dataflow("eo")
    stream = op.input("in", flow, TestingSource(readings(600), batch_size=15))
    stream = op.map("die", stream, maybe_die)
    op.output("out", op.key_on("by_device", stream, lambda r: r.device),
              target.build(out, rows=30, rec=rec))
    run_main(flow, epoch_interval=timedelta(milliseconds=20),
             recovery_config=RecoveryConfig(str(rec)))
    """
)


@pytest.mark.slow
def test_kill_9_at_several_points_gives_exactly_once(tmp_path: Path, target: Target) -> None:
    out, rec = setup_dirs(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kills = 0
    for kill_at in (100, 250, 251, 420, 599, -1):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, target.name, str(out), str(rec), str(kill_at)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr[-2000:]
    assert kills >= 3
    assert target.values(out) == [float(i) for i in range(600)]
