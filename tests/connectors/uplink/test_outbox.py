from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from connectors.uplink.batch import OutboxStats, Sealed
from connectors.uplink.outbox import Outbox, OutboxSettings

ROOT = Path(__file__).parents[3]
LOGGER = "edgesieve.outbox"
NOW = datetime.now(UTC).replace(microsecond=0)


def sealed(
    batch_id: str,
    *,
    stream: str = "telemetry_points",
    priority: int = 3,
    size: int = 100,
    at: datetime | None = None,
    rows: int = 1,
) -> Sealed:
    payload = (batch_id.encode() * (size // max(1, len(batch_id)) + 1))[:size]
    return Sealed(batch_id, stream, priority, rows, 10 * rows, at or NOW, payload)


def ids(box: Outbox, limit: int = 1000) -> list[str]:
    return [s.batch_id for s in box.next(limit)]


@pytest.fixture
def box(tmp_path: Path):
    with Outbox(tmp_path / "outbox.sqlite") as outbox:
        yield outbox


def test_file_uses_wal_and_synchronous_full(box: Outbox):
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with sqlite3.connect(box.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_next_orders_by_priority_then_age(box: Outbox):
    t = NOW
    box.put(sealed("p-old", at=t))
    box.put(sealed("s-new", stream="telemetry_summary", priority=2, at=t + timedelta(seconds=5)))
    box.put(sealed("a-new", stream="alarms", priority=0, at=t + timedelta(seconds=9)))
    box.put(sealed("p-new", at=t + timedelta(seconds=1)))
    box.put(sealed("a-old", stream="alarms", priority=0, at=t + timedelta(seconds=2)))
    box.put(sealed("s-old", stream="telemetry_summary", priority=2, at=t - timedelta(seconds=5)))
    assert ids(box) == ["a-old", "a-new", "s-old", "s-new", "p-old", "p-new"]
    assert ids(box, 2) == ["a-old", "a-new"]
    assert [s.batch_id for s in box.next(3, exclude={"a-old", "s-old"})] == [
        "a-new",
        "s-new",
        "p-old",
    ]
    assert box.next(0) == []


def test_same_created_at_keeps_insertion_order(box: Outbox):
    for name in ("c", "a", "b"):
        box.put(sealed(name))
    assert ids(box) == ["c", "a", "b"]


def test_next_returns_the_stored_batch(box: Outbox):
    original = sealed(
        "b1",
        stream="alarms",
        priority=0,
        size=777,
        rows=4,
        at=datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2))),
    )
    box.put(original)
    [got] = box.next(1)
    assert got == original
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)


def test_ack_deletes(box: Outbox):
    box.put(sealed("b1"))
    box.put(sealed("b2"))
    box.ack("b1")
    box.ack("unknown")
    assert ids(box) == ["b2"]
    assert box.stats().batches == 1


def test_same_batch_id_twice_is_stored_once(box: Outbox):
    assert box.put(sealed("b1", size=100)) is True
    assert box.put(sealed("b1", size=100)) is False
    assert ids(box) == ["b1"]
    assert box.stats().bytes == 100
    box.ack("b1")
    assert box.put(sealed("b1")) is True  # after the ack it is a new put (the cloud dedups)


def test_full_drops_oldest_of_lowest_priority(tmp_path: Path, caplog):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(max_bytes=1000))
    t = NOW
    box.put(sealed("alarm", stream="alarms", priority=0, size=200, at=t))
    box.put(sealed("sum-1", stream="telemetry_summary", priority=2, size=200, at=t))
    box.put(sealed("pt-2", size=200, at=t + timedelta(seconds=2)))
    box.put(sealed("pt-1", size=200, at=t + timedelta(seconds=1)))
    box.put(sealed("pt-3", size=200, at=t + timedelta(seconds=3)))
    assert box.stats().bytes == 1000
    with caplog.at_level(logging.WARNING, LOGGER):
        # an alarm needs 350 bytes: the two oldest points go (400 bytes), not the summary
        assert box.put(sealed("alarm-2", stream="alarms", priority=0, size=350, at=t)) is True
    assert sorted(ids(box)) == ["alarm", "alarm-2", "pt-3", "sum-1"]
    stats = box.stats()
    assert stats.dropped_full == 2
    assert stats.bytes == 950
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.WARNING
    assert (
        "is full (max_bytes=1000): dropped the 2 oldest batch(es) of the lowest priority "
        "(telemetry_points/p3; 400 bytes) to store batch alarm-2" in record.getMessage()
    )
    assert "dropped_full is now 2" in record.getMessage()
    # next: the last point and then the summary go, oldest first within the class
    assert box.put(sealed("alarm-3", stream="alarms", priority=0, size=400, at=t)) is True
    assert sorted(ids(box)) == ["alarm", "alarm-2", "alarm-3"]
    assert box.stats().dropped_full == 4
    box.close()


def test_full_never_displaces_more_urgent_batches(tmp_path: Path, caplog):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(max_bytes=600))
    box.put(sealed("alarm-1", stream="alarms", priority=0, size=300))
    box.put(sealed("alarm-2", stream="alarms", priority=0, size=250))
    with caplog.at_level(logging.WARNING, LOGGER):
        assert box.put(sealed("point", size=100)) is False
    assert ids(box) == ["alarm-1", "alarm-2"]
    assert box.stats().dropped_full == 1
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.ERROR
    assert (
        "is full (550 of 600 bytes) with batches of priority 3 or more urgent: dropped the "
        "NEW batch point (stream 'telemetry_points', priority 3, 1 rows, 100 bytes)"
        in record.getMessage()
    )
    box.close()


def test_full_same_class_drops_older_ones_not_the_new_one(tmp_path: Path):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(max_bytes=300))
    for i in range(3):
        box.put(sealed(f"pt-{i}", size=100, at=NOW + timedelta(seconds=i)))
    assert box.put(sealed("pt-new", size=150, at=NOW + timedelta(seconds=9))) is True
    assert ids(box) == ["pt-2", "pt-new"]
    assert box.stats().dropped_full == 2


def test_full_cannot_make_room_within_class_drops_new_only(tmp_path: Path):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(max_bytes=300))
    box.put(sealed("alarm", stream="alarms", priority=0, size=250))
    box.put(sealed("pt-0", size=50))
    assert box.put(sealed("pt-new", size=100)) is False
    assert ids(box) == ["alarm", "pt-0"]  # the older point was not evicted in vain
    assert box.stats().dropped_full == 1


def test_batch_bigger_than_max_bytes_is_refused(tmp_path: Path):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(max_bytes=100))
    box.put(sealed("small", size=50))
    with pytest.raises(
        ValueError,
        match=r"batch 'huge' \(stream 'telemetry_points', 1 rows\) is "
        r"101 bytes, larger than the whole outbox \(max_bytes=100\); it is not "
        r"stored. Hint: raise OutboxSettings.max_bytes or seal smaller batches",
    ):
        box.put(sealed("huge", size=101))
    assert ids(box) == ["small"]
    assert box.stats().dropped_full == 0


def test_expire_drops_batches_older_than_ttl(tmp_path: Path, caplog):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(ttl=timedelta(hours=1)))
    box.put(sealed("old-1", at=NOW - timedelta(hours=3)))
    box.put(sealed("old-2", stream="alarms", priority=0, at=NOW - timedelta(minutes=61)))
    box.put(sealed("fresh", at=NOW - timedelta(minutes=59)))
    with caplog.at_level(logging.WARNING, LOGGER):
        assert box.expire(NOW) == 2
    assert ids(box) == ["fresh"]
    assert box.stats().expired == 2
    assert box.expire(NOW) == 0
    assert box.expire(NOW + timedelta(minutes=2)) == 1
    assert box.stats().expired == 3
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2
    assert (
        "2 batch(es) waited longer than the TTL (1:00:00) for the cloud and were dropped "
        "(alarms: 1 batches, 100 bytes, telemetry_points: 1 batches, 100 bytes)" in messages[0]
    )


def test_expire_without_now_uses_the_clock(tmp_path: Path):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(ttl=timedelta(seconds=30)))
    box.put(sealed("old", at=datetime.now(UTC) - timedelta(seconds=31)))
    box.put(sealed("new", at=datetime.now(UTC)))
    assert box.expire() == 1
    assert ids(box) == ["new"]


def test_stats(box: Outbox):
    empty = box.stats()
    assert empty == OutboxStats(0, 0, None, 0, 0, 0)
    box.put(sealed("b1", size=300, at=datetime.now(UTC) - timedelta(seconds=100)))
    box.put(sealed("b2", size=200, at=datetime.now(UTC)))  # not NOW: taken when the module loaded
    stats = box.stats()
    assert (stats.batches, stats.bytes) == (2, 500)
    assert 99 <= stats.oldest_age_s <= 130


def test_counters_survive_reopen(tmp_path: Path):
    path = tmp_path / "o.sqlite"
    box = Outbox(path, OutboxSettings(max_bytes=350, ttl=timedelta(hours=1)))
    box.put(sealed("old", at=NOW - timedelta(hours=2)))
    box.put(sealed("a", size=100))
    box.put(sealed("b", size=100))
    box.put(sealed("c", size=100))  # evicts "old": dropped_full 1
    box.put(sealed("x", stream="telemetry_text", size=20))
    box.put(sealed("y", stream="telemetry_text", size=20, at=NOW - timedelta(hours=3)))
    box.reject("x", "unknown stream")
    assert box.expire(NOW) == 1
    before = box.stats()
    box.close()
    again = Outbox(path, OutboxSettings(max_bytes=350, ttl=timedelta(hours=1)))
    after = again.stats()
    assert (after.batches, after.bytes, after.dropped_full, after.expired, after.rejected) == (
        before.batches,
        before.bytes,
        1,
        1,
        1,
    )
    assert ids(again) == ["a", "b", "c"]
    assert [r.batch_id for r in again.rejected()] == ["x"]
    again.close()


def test_reject_moves_batch_to_rejected_table(box: Outbox, caplog):
    box.put(sealed("bad", stream="telemetry_text", size=123, rows=5))
    box.put(sealed("good"))
    when = datetime(2030, 5, 6, tzinfo=UTC)
    assert box.reject("bad", "unknown stream 'telemetry_text'", now=when) is True
    assert box.reject("never-seen", "x") is False
    assert ids(box) == ["good"]
    [rej] = box.rejected()
    assert (rej.batch_id, rej.stream, rej.rows, rej.detail, rej.rejected_at) == (
        "bad",
        "telemetry_text",
        5,
        "unknown stream 'telemetry_text'",
        when,
    )
    assert len(rej.payload) == 123
    assert box.stats().rejected == 1
    with caplog.at_level(logging.WARNING, LOGGER):
        assert box.put(sealed("bad", stream="telemetry_text")) is False
    assert ids(box) == ["good"]
    assert (
        "batch bad (stream 'telemetry_text') was rejected by the cloud before; it is not "
        "queued again" in caplog.text
    )


def test_rejected_table_is_capped(tmp_path: Path):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(rejected_max_bytes=250))
    for i in range(4):
        box.put(sealed(f"r{i}", size=100))
        box.reject(f"r{i}", "no")
    assert [r.batch_id for r in box.rejected()] == ["r2", "r3"]
    assert box.stats().rejected == 4
    box.close()


def test_put_notifies_listeners(box: Outbox):
    calls: list[int] = []

    def listener() -> None:
        calls.append(box.stats().batches)

    def broken() -> None:
        raise RuntimeError("boom")

    box.add_listener(broken)
    box.add_listener(listener)
    box.put(sealed("a"))
    box.put(sealed("a"))  # duplicate: no notification
    box.remove_listener(listener)
    box.remove_listener(listener)
    box.put(sealed("b"))
    assert calls == [1]


def test_threads_share_one_outbox(box: Outbox):
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for i in range(50):
                box.put(sealed(f"w{w}-{i}", priority=w % 4, stream="telemetry_points"))
        except BaseException as exc:
            errors.append(exc)

    def acker() -> None:
        try:
            for _ in range(100):
                for s in box.next(5):
                    box.ack(s.batch_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads.append(threading.Thread(target=acker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    left = box.stats().batches
    assert left == len(ids(box)) and 0 <= left <= 200
    for s in box.next(1000):
        box.ack(s.batch_id)
    assert box.stats().batches == 0


_PUTTER = """
import os, sys, time
from datetime import UTC, datetime
from pathlib import Path
from connectors.uplink.batch import Sealed
from connectors.uplink.outbox import Outbox
box = Outbox(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    box.put(Sealed(f"b{i:05d}", "telemetry_points", 3, 1, 0, datetime.now(UTC), os.urandom(3000)))
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
sys.stdout.write("done\\n")
sys.stdout.flush()
time.sleep(60)
"""


def _putter(path: Path, n: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _PUTTER, str(path), str(n)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _read_until(proc: subprocess.Popen[str], stop: str, limit: int) -> list[str]:
    lines: list[str] = []
    for _ in range(limit + 2):
        line = proc.stdout.readline().strip()
        if not line:
            break
        lines.append(line)
        if line == stop:
            break
    return lines


def test_kill_9_after_puts_keeps_every_batch(tmp_path: Path):
    path = tmp_path / "outbox.sqlite"
    proc = _putter(path, 120)
    try:
        lines = _read_until(proc, "done", 120)
        assert lines[-1] == "done", lines[-3:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    with Outbox(path) as box:
        assert ids(box) == [f"b{i:05d}" for i in range(120)]
        assert box.stats().bytes == 120 * 3000


def test_kill_9_midway_keeps_every_acknowledged_put(tmp_path: Path):
    path = tmp_path / "outbox.sqlite"
    proc = _putter(path, 5000)
    try:
        lines = _read_until(proc, "40", 5000)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert lines[-1] == "40"
    with Outbox(path) as box:
        stored = ids(box, 10_000)
    returned = {f"b{int(i):05d}" for i in lines}
    assert returned <= set(stored)
    assert len(stored) < 5000  # really killed mid-way
    assert stored == sorted(stored) and stored == [f"b{i:05d}" for i in range(len(stored))]


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"max_bytes": 0},
            r"OutboxSettings.max_bytes must be a positive int \(bytes\); got 0. "
            r"Hint: the default is 256 MiB",
        ),
        ({"max_bytes": True}, r"max_bytes must be a positive int"),
        (
            {"ttl": timedelta(0)},
            r"OutboxSettings.ttl must be a positive datetime.timedelta; got "
            r"datetime.timedelta\(0\). Hint: timedelta\(days=7\)",
        ),
        ({"ttl": 3600}, r"OutboxSettings.ttl must be a positive datetime.timedelta; got 3600"),
        (
            {"rejected_max_bytes": -1},
            r"OutboxSettings.rejected_max_bytes must be a non-negative "
            r"int \(bytes\); got -1. Hint: 0 keeps no rejected",
        ),
    ],
)
def test_settings_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OutboxSettings(**kwargs)


def test_sealed_errors():
    with pytest.raises(ValueError, match=r"Sealed.batch_id must be a non-empty string; got ''"):
        Sealed("", "alarms", 0, 1, 0, NOW, b"x")
    with pytest.raises(ValueError, match=r"Sealed.stream must be a non-empty string; got None"):
        Sealed("b", None, 0, 1, 0, NOW, b"x")
    with pytest.raises(
        ValueError,
        match=r"Sealed.priority of batch 'b' must be a non-negative "
        r"int; got -1",
    ):
        Sealed("b", "alarms", -1, 1, 0, NOW, b"x")
    with pytest.raises(
        ValueError,
        match=r"Sealed.rows of batch 'b' must be a non-negative int; "
        r"got 1.5",
    ):
        Sealed("b", "alarms", 0, 1.5, 0, NOW, b"x")
    with pytest.raises(
        ValueError,
        match=r"Sealed.created_at of batch 'b' must be a "
        r"timezone-aware datetime; got datetime.datetime\(2025",
    ):
        Sealed("b", "alarms", 0, 1, 0, datetime(2025, 1, 1), b"x")
    with pytest.raises(
        TypeError,
        match=r"Sealed.payload of batch 'b' must be bytes \(a "
        r"serialized uplink_pb2.Batch\); got str",
    ):
        Sealed("b", "alarms", 0, 1, 0, NOW, "x")


def test_put_requires_sealed(box: Outbox):
    with pytest.raises(TypeError, match=r"Outbox.put expects a Sealed batch; got dict"):
        box.put({"batch_id": "x"})


def test_next_limit_error(box: Outbox):
    with pytest.raises(ValueError, match=r"Outbox.next: limit must be a non-negative int; got -1"):
        box.next(-1)


def test_naive_now_is_refused(box: Outbox):
    with pytest.raises(ValueError, match=r"Outbox.expire: now must be a timezone-aware datetime"):
        box.expire(datetime(2025, 1, 1))
    with pytest.raises(ValueError, match=r"Outbox.reject: now must be a timezone-aware datetime"):
        box.reject("x", "y", now=datetime(2025, 1, 1))


def test_settings_type_error(tmp_path: Path):
    with pytest.raises(TypeError, match=r"Outbox: settings must be an OutboxSettings; got dict"):
        Outbox(tmp_path / "o.sqlite", {"max_bytes": 1})


def test_directory_path_is_refused(tmp_path: Path):
    with pytest.raises(
        ValueError,
        match=r"Outbox: '.*' is a directory; give the path of the "
        r"outbox file, e.g. data_dir / 'outbox.sqlite'",
    ):
        Outbox(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path):
    path = tmp_path / "outbox.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(
        RuntimeError,
        match=r"outbox schema version 99 is newer than this "
        r"edgesieve supports \(1\). Hint: run the edgesieve "
        r"version that wrote it",
    ):
        Outbox(path)


def test_parent_directories_are_created(tmp_path: Path):
    with Outbox(tmp_path / "a" / "b" / "outbox.sqlite") as box:
        assert box.put(sealed("x"))
    assert (tmp_path / "a" / "b" / "outbox.sqlite").is_file()


def test_closed_outbox_refuses_use(tmp_path: Path):
    box = Outbox(tmp_path / "o.sqlite")
    box.close()
    box.close()
    assert box.closed
    with pytest.raises(
        RuntimeError,
        match=r"Outbox '.*o.sqlite' is closed; open a new Outbox to "
        r"use it again",
    ):
        box.put(sealed("x"))
    with pytest.raises(RuntimeError, match=r"is closed"):
        box.stats()
