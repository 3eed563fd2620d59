"""The cloud sink under Bytewax recovery: crash, resume from the snapshot, every row once in the cloud.

Real pieces throughout: a Bytewax dataflow run with a ``RecoveryConfig``, the
SQLite outbox, the ``UplinkSender`` and the reference ``CloudReceiver`` (gRPC
on loopback), its DuckDB file read back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import duckdb
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main

from connectors.cloud import CloudReceiver
from connectors.sinks.cloud import CloudSink, CloudSinkPartition, CloudSinkSettings, CloudSinkState
from connectors.uplink.outbox import Outbox
from connectors.uplink.sender import UplinkSender
from connectors.uplink.settings import UplinkSettings
from operators.records import Reading

ROOT = Path(__file__).parents[3]
EDGE = "edge-01"
SECRET = "recovery-test-secret-0123456789"
POINTS = "telemetry_points"
T0 = datetime(2025, 11, 22, 8, 30, tzinfo=UTC)
EPOCH = timedelta(milliseconds=100)
PAUSE = TestingSource.PAUSE(timedelta(milliseconds=400))  # lets at least one epoch close


def readings(start: int, stop: int) -> list[Reading]:
    return [
        Reading(f"dev-{i % 3}", "k", T0 + timedelta(seconds=i), float(i), "mqtt")
        for i in range(start, stop)
    ]


class Recorder(CloudSink):
    """The sink, remembering the partitions it built and the states they resumed from."""

    def build_part(
        self, step_id: str, for_part: str, resume_state: CloudSinkState | None
    ) -> CloudSinkPartition:
        part = super().build_part(step_id, for_part, resume_state)
        self.parts = [*getattr(self, "parts", []), part]
        return part

    def total(self, counter: str) -> int:
        return sum(getattr(part, counter) for part in getattr(self, "parts", []))


def run(items: list[Any], sink: CloudSink, recovery: Path, *, kill_at: float | None = None) -> None:
    """Run ``items`` into ``sink`` with recovery; SIGKILL this process at value ``kill_at``.

    (An exception in a step, or ``TestingSource.ABORT``, would still close the sink.)
    """

    def check(reading: Reading) -> Reading:
        if reading.value == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return reading

    flow = Dataflow("cloud_recovery")
    stream = op.map("crash", op.input("in", flow, TestingSource(items, batch_size=5)), check)
    keyed = op.key_on("by_device", stream, lambda r: r.device)
    op.output("cloud", keyed, sink)
    run_main(flow, epoch_interval=EPOCH, recovery_config=RecoveryConfig(str(recovery)))


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[CloudReceiver, Path]]:
    db = tmp_path / "cloud.duckdb"
    receiver = CloudReceiver("127.0.0.1:0", db, {EDGE: SECRET}).start()
    yield receiver, db
    receiver.stop(grace=0.5)


@pytest.fixture
def outbox(
    tmp_path: Path, cloud: tuple[CloudReceiver, Path]
) -> Iterator[tuple[Outbox, UplinkSender]]:
    box = Outbox(tmp_path / "outbox.sqlite")
    settings = UplinkSettings(
        target=f"127.0.0.1:{cloud[0].port}",
        key=EDGE,
        secret=SECRET,
        backoff_min_s=0.05,
        backoff_max_s=0.5,
    )
    sender = UplinkSender(box, settings)
    sender.start()
    yield box, sender
    sender.stop()
    box.close()


# The first run, in its own process, killed with SIGKILL at reading 45 (after some rows
# were sealed past the last snapshot, with others only in memory).
CHILD = """
import os, signal, sys
from datetime import timedelta
from pathlib import Path
from connectors.sinks.cloud import CloudSink, CloudSinkSettings
from connectors.uplink.outbox import Outbox
from tests.connectors.sinks.test_cloud_recovery import EDGE, POINTS, items, run

tmp = Path(sys.argv[1])
box = Outbox(tmp / "outbox.sqlite")
sink = CloudSink(box, EDGE, POINTS, settings=CloudSinkSettings(max_rows=4), partitions=2)
run(items(), sink, tmp / "recovery", kill_at=45.0)
"""


def items() -> list[Any]:
    """60 readings; an epoch closes (a snapshot is taken) after the first 30."""
    return [*readings(0, 30), PAUSE, *readings(30, 60)]


def test_a_kill_after_sealing_past_the_snapshot_still_delivers_every_row_once(
    tmp_path: Path,
    cloud: tuple[CloudReceiver, Path],
    outbox: tuple[Outbox, UplinkSender],
) -> None:
    receiver, db = cloud
    box, sender = outbox
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert sender.flush(10), "run 1's batches reach the cloud"
    sealed_first = rows_in(db, receiver)
    assert 30 < sealed_first < 45  # sealed past the snapshot; the rest died in memory

    # Other batch boundaries on resume (as age-based sealing gives): other batch ids.
    second = Recorder(box, EDGE, POINTS, settings=CloudSinkSettings(max_rows=5), partitions=2)
    run(items(), second, recovery)
    assert 0 < second.total("resumed_rows") < 30  # the snapshot held the rows not sealed by then
    assert sealed_first + second.total("rows_sealed") > 60  # some rows were sealed twice
    assert sender.flush(10), "run 2's batches reach the cloud"
    receiver.stop()

    with duckdb.connect(str(db), read_only=True) as con:
        values = [row[0] for row in con.sql("select value from telemetry_points").fetchall()]
        batches = con.execute(
            "select sum(rows), sum(duplicate_rows) from uplink_batches"
        ).fetchone()
    assert sorted(values) == [float(i) for i in range(60)]
    assert batches == (60, sealed_first + second.total("rows_sealed") - 60)


def rows_in(db: Path, receiver: CloudReceiver) -> int:
    """Rows stored so far (reads through the receiver's own connection)."""
    store = receiver._store
    assert store is not None
    cursor = store.cursor()
    try:
        found = cursor.execute("select count(*) from telemetry_points").fetchone()
    finally:
        cursor.close()
    assert found is not None
    return int(found[0])


def test_a_clean_run_resumed_again_sends_nothing_new(
    tmp_path: Path,
    cloud: tuple[CloudReceiver, Path],
    outbox: tuple[Outbox, UplinkSender],
) -> None:
    receiver, db = cloud
    box, sender = outbox
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    items: list[Any] = [*readings(0, 12), PAUSE, *readings(12, 20)]
    settings = CloudSinkSettings(max_rows=7)
    run(items, CloudSink(box, EDGE, POINTS, settings=settings), recovery)
    again = Recorder(box, EDGE, POINTS, settings=settings)
    run(items, again, recovery)
    assert sender.flush(10)
    receiver.stop()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute(
            "select count(*), count(distinct ts) from telemetry_points"
        ).fetchone() == (
            20,
            20,
        )
