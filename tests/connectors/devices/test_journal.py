"""The ingest journal on real SQLite files: order, durability, bounds, dedup, truncation."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.devices.journal import (
    DEDUP_WINDOW,
    Committed,
    Journal,
    JournalFull,
    JournalReader,
    JournalSettings,
    journal_partitions,
    partition_of,
)
from connectors.devices.journal import partition as partition_module
from connectors.devices.journal import writer as writer_module
from connectors.devices.journal.format import (
    WAL_PREALLOC_BYTES,
    WAL_PREALLOC_SPARE_BYTES,
    part_path,
)
from connectors.devices.journal.partition import preallocate_wal
from operators.records import RawMessage

REPO = Path(__file__).resolve().parents[3]


def message(device: str, payload: bytes, channel: str = "telemetry") -> RawMessage:
    return RawMessage(device, channel, "mqtt", datetime.now(UTC), payload)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def open_journal(root: Path) -> Iterator[Callable[..., Journal]]:
    opened: list[Journal] = []

    def make(**kwargs: object) -> Journal:
        kwargs.setdefault("sync", "normal")
        journal = Journal(JournalSettings(root=root, **kwargs))  # type: ignore[arg-type]
        opened.append(journal)
        return journal

    yield make
    for journal in opened:
        journal.close()


def read_all(root: Path, partition: int) -> list[tuple[int, RawMessage]]:
    with JournalReader(root, partition) as reader:
        return reader.read(-1, 1_000_000)


def test_order_and_offsets_across_partitions(root: Path, open_journal) -> None:
    journal = open_journal(partitions=3)
    sent = [message(f"dev-{i % 7}", f"m{i}".encode()) for i in range(600)]
    futures = [journal.submit(m) for m in sent]
    results = [f.result(10) for f in futures]
    for m, r in zip(sent, results, strict=True):
        assert r.partition == partition_of(m.device, 3)
        assert not r.duplicate
    for p in range(3):
        mine = [(r.offset, m) for m, r in zip(sent, results, strict=True) if r.partition == p]
        assert [o for o, _ in mine] == list(range(len(mine)))  # from 0, no gaps, in order
        rows = read_all(root, p)
        assert [(o, (m.device, m.payload)) for o, m in rows] == [
            (o, (m.device, m.payload)) for o, m in mine
        ]
        got = rows[0][1]
        assert got.transport == "mqtt" and got.channel == "telemetry"
        assert got.received_at == mine[0][1].received_at and got.received_at.tzinfo is not None
        with JournalReader(root, p) as reader:
            assert reader.last_offset() == len(mine) - 1
            assert [o for o, _ in reader.read(5, 3)] == [6, 7, 8]
    assert journal.stats().messages == 600
    assert journal.stats().bytes == sum(len(m.payload) for m in sent)


def test_futures_resolve_after_commit_and_callbacks_in_submission_order(
    root: Path, open_journal
) -> None:
    journal = open_journal(partitions=2, sync="full", max_batch=64)
    seen: list[tuple[int, bool, str]] = []
    readers = [JournalReader(root, 0), JournalReader(root, 1)]

    def check(n: int, future) -> None:
        committed: Committed = future.result()
        rows = readers[committed.partition].read(committed.offset - 1, 1)
        visible = bool(rows) and rows[0][0] == committed.offset  # another connection sees it
        seen.append((n, visible, threading.current_thread().name))

    futures = []
    for n in range(200):
        future = journal.submit(message(f"d{n % 5}", str(n).encode()))
        future.add_done_callback(lambda f, n=n: check(n, f))
        futures.append(future)
    for future in futures:
        future.result(10)
    wait_for(lambda: len(seen) == 200)
    assert [n for n, _, _ in seen] == list(range(200))
    assert all(visible for _, visible, _ in seen)
    assert all(name.startswith("journal-writer") for _, _, name in seen)
    assert journal.stats().commits >= 200 // 64
    for reader in readers:
        reader.close()


def test_devices_in_lockstep_wake_the_writer_once_per_group(
    open_journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "READERS_POLL_S", 5.0)  # an idle look must not be waited out
    journal = open_journal(partitions=1, linger=timedelta(milliseconds=200))
    wakes = []
    notify = journal._cond.notify  # noqa: SLF001 - counting the writer's wake-ups
    monkeypatch.setattr(journal._cond, "notify", lambda: (wakes.append(1), notify())[1])  # noqa: SLF001

    def burst(devices: int, gap: float = 0.002) -> float:
        """One message from each device, ``gap`` apart (the writer could wake in between)."""
        started = time.monotonic()
        futures = []
        for i in range(devices):
            futures.append(journal.submit(message(f"d{i}", b"1")))
            if gap:
                time.sleep(gap)
        for future in futures:
            future.result(10)
        return time.monotonic() - started

    burst(8, gap=0)  # one group of eight (queued before the writer gets the GIL)
    wakes.clear()
    commits = journal.stats().commits
    for _ in range(20):  # eight devices that each wait for their answer before sending again
        assert burst(8) < 0.15  # committed once all eight are queued, without lingering
    assert len(wakes) == 20  # once a group, not also by each group's first message
    assert journal.stats().commits - commits == 20
    # Fewer than expected: committed a linger after the first, not at the next idle look.
    elapsed = burst(3)
    assert 0.15 <= elapsed < 1.5
    # Nothing queued at the writer's next look: a single message is committed at once.
    time.sleep(0.5)
    assert burst(1) < 0.15
    assert journal.submit(message("d0", b"2")).result(10).offset == 8 * 21 + 3 + 1  # none lost


CHILD = r"""
import sys, time
from datetime import UTC, datetime
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from connectors.devices.journal import Journal, JournalSettings
from operators.records import RawMessage

journal = Journal(JournalSettings(root=Path(sys.argv[1]), partitions=2, sync=sys.argv[2],
                                  max_batch=64))
start = int(sys.argv[3])

def printed(future, n):
    if future.exception() is None:
        c = future.result()
        sys.stdout.write(f"{c.partition} {c.offset} {n}\n")
        sys.stdout.flush()

print("ready", flush=True)
last = None
for n in range(start, start + 200_000):
    last = journal.submit(RawMessage(f"d{n % 5}", "telemetry", "mqtt", datetime.now(UTC),
                                     str(n).encode()))
    last.add_done_callback(lambda f, n=n: printed(f, n))
    if n % 100 == 99:
        last.result(10)
"""


def test_kill_9_loses_no_acknowledged_message_and_offsets_continue(root: Path) -> None:
    rng = random.Random(7)
    printed: list[list[tuple[int, int, int]]] = []
    for cycle in range(4):
        sync = ("full", "normal")[cycle % 2]
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), sync, str(cycle * 1_000_000), str(REPO)],
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        ready = threading.Event()

        def pump(child=child, lines=lines, ready=ready) -> None:
            for line in child.stdout:
                if line == "ready\n":
                    ready.set()
                elif line.endswith("\n"):
                    lines.append(line)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        try:
            assert ready.wait(30), "child did not start"
            time.sleep(rng.uniform(0.2, 0.8))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        thread.join(10)
        assert child.returncode == -signal.SIGKILL
        acked = [tuple(int(x) for x in line.split()) for line in lines]
        assert acked, f"cycle {cycle}: nothing committed before the kill"
        printed.append(acked)  # type: ignore[arg-type]

    rows = {p: read_all(root, p) for p in range(2)}
    for p in range(2):
        offsets = [o for o, _ in rows[p]]
        assert offsets == list(range(len(offsets)))  # whole groups, no holes, never reused
        numbers = [int(m.payload) for _, m in rows[p]]
        assert numbers == sorted(numbers)  # submission order across restarts
    stored = {(p, o): int(m.payload) for p in range(2) for o, m in rows[p]}
    for cycle, acked in enumerate(printed):
        for p, offset, n in acked:
            assert stored.get((p, offset)) == n, f"cycle {cycle}: acked {p}/{offset} lost"
        if cycle:
            for p in range(2):
                before = [o for q, o, _ in printed[cycle - 1] if q == p]
                now = [o for q, o, _ in acked if q == p]
                if before and now:
                    assert min(now) > max(before)


def test_redelivery_is_not_written_twice(root: Path, open_journal) -> None:
    journal = open_journal(partitions=2)
    first = journal.submit(message("dev-a", b"hello")).result(10)
    again = journal.submit(message("dev-a", b"hello"), redelivery=True).result(10)
    assert again == Committed(first.partition, first.offset, duplicate=True)
    # Not a redelivery: the same bytes are a new message.
    assert not journal.submit(message("dev-a", b"hello")).result(10).duplicate
    # Another device or channel is another message.
    assert not journal.submit(message("dev-b", b"hello"), redelivery=True).result(10).duplicate
    other = message("dev-a", b"hello", channel="vibration")
    assert not journal.submit(other, redelivery=True).result(10).duplicate
    # A redelivery of something never journaled is written.
    fresh = journal.submit(message("dev-a", b"fresh"), redelivery=True).result(10)
    assert not fresh.duplicate
    # Original and redelivery in the same group.
    a = journal.submit(message("dev-c", b"twice"))
    b = journal.submit(message("dev-c", b"twice"), redelivery=True)
    assert b.result(10) == Committed(a.result(10).partition, a.result(10).offset, True)
    assert journal.stats().duplicates == 2
    held = len(read_all(root, first.partition))
    journal.close()
    reopened = Journal(JournalSettings(root=root, partitions=2, sync="normal"))
    try:
        again = reopened.submit(message("dev-a", b"fresh"), redelivery=True).result(10)
        assert again == Committed(fresh.partition, fresh.offset, duplicate=True)
    finally:
        reopened.close()
    assert len(read_all(root, first.partition)) == held


def test_a_retransmission_key_matches_only_the_same_transmission(open_journal) -> None:
    journal = open_journal(partitions=1)
    first = journal.submit(message("dev", b"21.5"), dedup_key=b"ep|17|ab").result(10)
    # the device sends the same request again (its answer was lost): stored once
    again = journal.submit(message("dev", b"21.5"), dedup_key=b"ep|17|ab").result(10)
    assert again == Committed(first.partition, first.offset, duplicate=True)
    # a new request with the same content is a new message
    other = journal.submit(message("dev", b"21.5"), dedup_key=b"ep|18|cd").result(10)
    assert not other.duplicate and other.offset == first.offset + 1
    # a keyed message is not mistaken for a redelivery of an unkeyed one, nor the reverse
    plain = journal.submit(message("dev", b"x")).result(10)
    assert not journal.submit(message("dev", b"x"), dedup_key=b"k").result(10).duplicate
    assert journal.submit(message("dev", b"x"), redelivery=True).result(10) == Committed(
        plain.partition, plain.offset, duplicate=True
    )


def test_redelivery_window_is_the_last_offsets_of_the_partition(open_journal) -> None:
    # one device submits DEDUP_WINDOW messages at once: more than its share of the queue
    journal = open_journal(partitions=1, max_batch=2000, device_share=1.0)
    old = journal.submit(message("dev", b"old")).result(10)
    futures = [journal.submit(message("dev", str(i).encode())) for i in range(DEDUP_WINDOW)]
    for future in futures:
        future.result(30)
    recent = futures[-10].result()
    assert journal.submit(message("dev", str(DEDUP_WINDOW - 10).encode()), redelivery=True).result(
        10
    ) == Committed(0, recent.offset, duplicate=True)
    # Beyond the window a redelivery is written again (at least once, not exactly once).
    late = journal.submit(message("dev", b"old"), redelivery=True).result(10)
    assert not late.duplicate and late.offset > old.offset


def test_a_retransmission_after_its_first_copy_was_processed_and_deleted_is_stored_once(
    root: Path, open_journal
) -> None:
    # The edge crashed after committing, the device got no answer and sends again once the edge is
    # back; by then the flow has processed and released the first copy and the writer deleted it.
    journal = open_journal(partitions=1)
    keyed = journal.submit(message("dev", b"21.5"), dedup_key=b"ep|17|ab").result(10)
    plain = journal.submit(message("dev", b"hello")).result(10)
    with JournalReader(root, 0) as reader:
        reader.release("flow", plain.offset)
        wait_for(lambda: not read_all(root, 0))
    again = journal.submit(message("dev", b"21.5"), dedup_key=b"ep|17|ab").result(10)
    assert again == Committed(0, keyed.offset, duplicate=True)
    redelivered = journal.submit(message("dev", b"hello"), redelivery=True).result(10)
    assert redelivered == Committed(0, plain.offset, duplicate=True)
    assert not read_all(root, 0)
    # the same bytes as a new transmission are a new message
    assert not journal.submit(message("dev", b"21.5"), dedup_key=b"ep|18|cd").result(10).duplicate
    journal.close()
    reopened = Journal(JournalSettings(root=root, partitions=1, sync="normal"))
    try:  # the digests survive a restart
        assert reopened.submit(message("dev", b"hello"), redelivery=True).result(10).duplicate
    finally:
        reopened.close()


def test_a_redelivery_never_matches_a_message_of_a_transport_that_does_not_redeliver(
    root: Path, open_journal
) -> None:
    journal = open_journal(partitions=1)

    def sent(transport: str, payload: bytes) -> RawMessage:
        return RawMessage("dev", "telemetry", transport, datetime.now(UTC), payload)

    # An MQTT redelivery with the bytes of an HTTP or CoAP message is a message of its own:
    # neither transport redelivers, so the edge never saw it before.
    http = journal.submit(sent("http", b"same")).result(10)
    dup = journal.submit(message("dev", b"same"), redelivery=True).result(10)
    assert not dup.duplicate and dup.offset == http.offset + 1
    coap = journal.submit(sent("coap", b"group"))  # and in the same group
    grouped = journal.submit(message("dev", b"group"), redelivery=True)
    assert not grouped.result(10).duplicate
    # Deleted, the HTTP and CoAP rows keep no digest; the MQTT rows' are kept for redeliveries.
    with JournalReader(root, 0) as reader:
        reader.release("flow", grouped.result().offset)
        wait_for(lambda: not read_all(root, 0))
    db = sqlite3.connect(part_path(root, 0))
    try:
        kept = {seq for (seq,) in db.execute("SELECT seq FROM recent")}
    finally:
        db.close()
    assert kept == {dup.offset, grouped.result().offset}, (http, coap.result())
    again = journal.submit(message("dev", b"same"), redelivery=True).result(10)
    assert again == Committed(0, dup.offset, duplicate=True)
    assert journal.stats().duplicates == 1


def test_the_writer_deletes_released_rows_in_a_few_statements_whatever_their_number(
    root: Path, open_journal
) -> None:
    # Each statement step on the writer's thread gives the GIL up and waits to take it back
    # behind busy device servers; the rows are read one by one on the checkpointer's thread.
    journal = open_journal(partitions=1, max_batch=2000, device_share=1.0)
    futures = [journal.submit(message("dev", str(i).encode())) for i in range(3000)]
    last = [future.result(30) for future in futures][-1]
    statements: list[str] = []
    journal._parts[0].db.set_trace_callback(statements.append)  # noqa: SLF001 - the writer's
    with JournalReader(root, 0) as reader:
        reader.release("flow", last.offset)
        wait_for(lambda: not read_all(root, 0), 30)
    journal._parts[0].db.set_trace_callback(None)  # noqa: SLF001
    assert len(statements) <= 12, statements
    assert not [s for s in statements if s.startswith("SELECT seq, device, channel, payload")]
    db = sqlite3.connect(part_path(root, 0))
    try:  # every digest kept for redeliveries: one statement
        assert db.execute("SELECT count(*) FROM recent").fetchone()[0] == 3000
    finally:
        db.close()
    redelivered = journal.submit(message("dev", b"2999"), redelivery=True).result(10)
    assert redelivered == Committed(0, last.offset, duplicate=True)


def test_a_busy_writer_deletes_released_rows_faster_than_a_fast_stream_commits_them(
    root: Path, open_journal
) -> None:
    # A chunk of TRUNCATE_CHUNK rows per TRUNCATE_BUSY_S deleted 10,000 rows a second: a
    # faster stream filled the journal with rows the flow had processed long ago.
    journal = open_journal(partitions=1, max_batch=2000, device_share=1.0)
    released = 60_000
    committed: list[Committed | BaseException] = []
    for i in range(released):
        journal.append(message(f"dev-{i % 50}", b"x" * 20), lambda _t, out: committed.extend(out))
        if i % 4000 == 3999:  # within the writer's queue bound
            wait_for(lambda n=i + 1: len(committed) == n, 60)
    wait_for(lambda: len(committed) == released, 60)
    assert all(isinstance(c, Committed) for c in committed)
    stop = threading.Event()

    def stream() -> None:  # a message every 2 ms: the writer is never idle
        i = 0
        while not stop.wait(0.002):
            journal.append(message("live", str(i).encode()), lambda _t, _o: None)
            i += 1

    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        with JournalReader(root, 0) as reader:
            reader.release("flow", max(c.offset for c in committed))  # type: ignore[union-attr]
            started = time.monotonic()
            wait_for(lambda: journal.stats().messages < 1_000, 30)
            took = time.monotonic() - started
    finally:
        stop.set()
        streaming.join()
    assert took < 3.0, f"{released} released rows deleted in {took:.1f} s under a stream"


def test_digests_of_deleted_rows_are_kept_only_for_the_window(root: Path, open_journal) -> None:
    journal = open_journal(partitions=1, max_batch=2000, device_share=1.0)  # one device, a burst
    first = journal.submit(message("dev", b"first"), dedup_key=b"k0").result(10)
    futures = [journal.submit(message("dev", str(i).encode())) for i in range(DEDUP_WINDOW + 50)]
    last = futures[-1].result(30)
    with JournalReader(root, 0) as reader:
        reader.release("flow", last.offset)
        wait_for(lambda: not read_all(root, 0), 30)
    db = sqlite3.connect(part_path(root, 0))
    try:
        seqs = [s for (s,) in db.execute("SELECT seq FROM recent ORDER BY seq")]
    finally:
        db.close()
    assert len(seqs) <= DEDUP_WINDOW and min(seqs) > last.offset - DEDUP_WINDOW
    late = journal.submit(message("dev", b"first"), dedup_key=b"k0").result(10)
    assert not late.duplicate and late.offset > first.offset  # beyond the window: at least once


def test_max_bytes_refuses_then_resumes_after_release(root: Path, open_journal) -> None:
    journal = open_journal(partitions=1, max_bytes=1000, device_share=1.0)  # the whole journal
    for i in range(10):
        journal.submit(message("dev", bytes([i]) * 100)).result(10)
    assert journal.admit() == (
        f"journal full: 1000 payload bytes held of journal.max_bytes=1000 in {root} (got a "
        "0-byte message); hint: the readers have not released them yet, retry later or raise "
        "journal.max_bytes"
    )
    refused = journal.submit(message("dev", b"x"))
    with pytest.raises(JournalFull, match=r"^journal full: 1000 payload bytes held of "
                       r"journal.max_bytes=1000 .* \(got a 1-byte message\); hint: "):
        refused.result(1)
    assert journal.stats().refused == 1
    with JournalReader(root, 0) as reader:
        reader.release("flow", 4)
        wait_for(lambda: journal.admit() is None)
        assert journal.stats().bytes == 500 and journal.stats().messages == 5
        assert journal.submit(message("dev", b"y" * 500)).result(10).offset == 10
        assert journal.admit() is not None


def test_queue_bound_refuses_when_the_writer_is_behind(root: Path, open_journal) -> None:
    journal = open_journal(partitions=1, max_batch=1, linger=timedelta(0), device_share=1.0)
    gate = threading.Event()
    journal._fault_hook = lambda db: gate.wait(10)
    futures = [journal.submit(message("dev", b"a"))]
    wait_for(lambda: journal.stats().queued == 0)  # the writer holds the first
    futures += [journal.submit(message("dev", b"b")) for _ in range(4)]
    reason = (
        f"journal queue full: 4 messages wait to be committed to {root} (limit 4 x "
        "journal.max_batch = 4); hint: the disk commits slower than messages arrive, retry later"
    )
    assert journal.admit() == reason
    with pytest.raises(JournalFull, match=re.escape(reason)):
        journal.submit(message("dev", b"c")).result(1)
    gate.set()
    assert [f.result(10).offset for f in futures] == [0, 1, 2, 3, 4]
    assert journal.admit() is None


@pytest.mark.parametrize("fault", ["sqlite_full", "enospc"])
def test_disk_full_fails_the_group_and_recovers(root: Path, open_journal, fault: str) -> None:
    journal = open_journal(partitions=2, sync="full")
    before = journal.submit(message("d1", b"before")).result(10)
    full = threading.Event()
    full.set()

    def inject(db: sqlite3.Connection) -> None:
        if not full.is_set():
            db.execute("PRAGMA max_page_count = 1000000000")
        elif fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        else:  # the real SQLITE_FULL: the file may not grow
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")
            db.execute("INSERT INTO meta (key, value) VALUES ('fill', zeroblob(200000))")

    journal._fault_hook = inject
    futures = [journal.submit(message(f"d{i}", b"x" * 50)) for i in range(20)]
    for future in futures:
        with pytest.raises(JournalFull, match=r"^disk full: .*part-\d\.sqlite: .*(disk is full|No "
                           r"space left).*; hint: free space on the disk of .*, commits resume "):
            future.result(10)
    reason = journal.admit()
    assert reason is not None and reason.startswith("disk full: ")
    for p in range(2):  # rolled back: nothing of the group is there
        assert [o for o, _ in read_all(root, p)] == ([before.offset] if p == before.partition
                                                     else [])
    assert journal.stats().bytes == len(b"before")
    full.clear()
    wait_for(lambda: journal.admit() is None, timeout=5)  # the writer's probe
    after = journal.submit(message("d1", b"after")).result(10)
    assert after.offset == before.offset + 1  # rolled-back offsets are not skipped


def test_partition_count_is_fixed_when_created(root: Path, open_journal) -> None:
    assert journal_partitions(root) is None
    open_journal(partitions=3).close()
    assert journal_partitions(root) == 3
    with pytest.raises(ValueError, match=re.escape(
        f"journal.partitions: the journal at {root} was created with 3 partitions (got 4); hint: "
        "set journal.partitions: 3, or move the journal away once every message in it was "
        "processed"
    )):
        open_journal(partitions=4)
    open_journal(partitions=3)  # the lock was released by the failed open


def test_release_truncates_and_offsets_continue(root: Path, open_journal) -> None:
    journal = open_journal(partitions=1, device_share=1.0)  # one device, a burst
    for future in [journal.submit(message("d", bytes(2000))) for _ in range(6000)]:
        future.result(30)
    reader = JournalReader(root, 0)
    assert reader.released("flow") == -1
    reader.release("flow", 2999)
    reader.release("flow", 100)  # never goes back
    assert reader.released("flow") == 2999
    wait_for(lambda: journal.stats().messages == 3000)
    assert journal.stats().bytes == 3000 * 2000
    assert reader.read(-1, 1)[0][0] == 3000
    # A second registered reader holds the rows it has not released.
    reader.release("audit", 3500)
    reader.release("flow", 5999)
    wait_for(lambda: journal.stats().messages == 2499)
    reader.release("audit", 5999)
    wait_for(lambda: journal.stats().messages == 0)
    assert journal.stats().bytes == 0 and journal.stats().oldest_age_s == 0
    assert reader.last_offset() == 5999
    wait_for(lambda: free_pages(root) <= 256)
    db = sqlite3.connect(root / "part-0.sqlite")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.close()
    assert pages < 6000 * 2000 / 4096 / 2  # incremental vacuum shrank it
    journal.close()
    reopened = open_journal(partitions=1)
    assert reopened.submit(message("d", b"z")).result(10).offset == 6000
    assert reader.read(5999, 10)[0][0] == 6000
    reader.close()


def test_wal_stays_bounded_under_continuous_commits_with_a_reader(root: Path, open_journal) -> None:
    """Checkpoints run beside the commits, none inside one, and the WAL starts over."""
    journal = open_journal(partitions=1, sync="full")
    reader = JournalReader(root, 0)
    wal = root / "part-0.sqlite-wal"
    largest = 0
    deadline = time.monotonic() + 3.0
    last = -1
    while time.monotonic() < deadline:
        futures = [journal.submit(message(f"d{i % 20}", bytes(200))) for i in range(200)]
        last = futures[-1].result(30).offset
        assert reader.read(max(-1, last - 300), 100)  # a reader between the commits
        largest = max(largest, wal.stat().st_size)
    assert last > 8_000
    assert largest < 32 << 20  # 16 MiB, then the writer completes a checkpoint: it starts over
    db = journal._parts[0].db  # noqa: SLF001 - the writer's own connection
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    reader.close()


def needs_room_for_a_preallocated_wal(where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(where).free < WAL_PREALLOC_BYTES + WAL_PREALLOC_SPARE_BYTES:
        pytest.skip("the disk has too little room free for a preallocated WAL")


def test_commits_write_inside_the_preallocated_wal(root: Path, open_journal) -> None:
    """The WAL file is opened at its preallocated size, so commits do not grow the file."""
    needs_room_for_a_preallocated_wal(root)
    journal = open_journal(partitions=1, sync="full")
    wal = root / "part-0.sqlite-wal"
    assert wal.stat().st_size == WAL_PREALLOC_BYTES
    sent = [message(f"d{i % 7}", f"{i}".encode() * 50) for i in range(3000)]
    for start in range(0, len(sent), 100):
        futures = [journal.submit(m) for m in sent[start : start + 100]]
        futures[-1].result(30)
    assert wal.stat().st_size == WAL_PREALLOC_BYTES
    assert [m.payload for _, m in read_all(root, 0)] == [m.payload for m in sent]
    journal.close()
    reopened = open_journal(partitions=1, sync="full")
    assert reopened.submit(message("d", b"after")).result(10).offset == len(sent)
    assert [m.payload for _, m in read_all(root, 0)][-1] == b"after"


def test_preallocation_keeps_the_frames_sqlite_wrote(tmp_path: Path) -> None:
    """Zeros go after the WAL's frames: a crashed file's commits are all read back."""
    needs_room_for_a_preallocated_wal(tmp_path)
    db = sqlite3.connect(tmp_path / "live.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute("CREATE TABLE t (n INTEGER)")
    for n in range(100):
        db.execute("INSERT INTO t VALUES (?)", (n,))
    crashed = tmp_path / "crashed.sqlite"  # the files as a kill -9 leaves them
    for suffix in ("", "-wal"):
        shutil.copyfile(tmp_path / f"live.sqlite{suffix}", tmp_path / f"crashed.sqlite{suffix}")
    db.close()
    frames = (tmp_path / "crashed.sqlite-wal").stat().st_size
    assert 0 < frames < WAL_PREALLOC_BYTES

    assert preallocate_wal(crashed)
    assert (tmp_path / "crashed.sqlite-wal").stat().st_size == WAL_PREALLOC_BYTES
    db = sqlite3.connect(crashed, isolation_level=None)
    assert [n for (n,) in db.execute("SELECT n FROM t")] == list(range(100))
    db.execute("INSERT INTO t VALUES (100)")
    db.close()
    db = sqlite3.connect(crashed)
    assert db.execute("SELECT count(*), max(n) FROM t").fetchone() == (101, 100)
    db.close()


def test_preallocation_is_skipped_on_a_crowded_disk_and_undone_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "part-0.sqlite"
    wal = tmp_path / "part-0.sqlite-wal"
    wal.write_bytes(b"frames")
    usage = shutil.disk_usage(tmp_path)
    crowded = usage._replace(free=WAL_PREALLOC_BYTES + WAL_PREALLOC_SPARE_BYTES - 7)
    with monkeypatch.context() as patch:
        patch.setattr(partition_module.shutil, "disk_usage", lambda _: crowded)
        assert not preallocate_wal(path)
    assert wal.read_bytes() == b"frames"
    assert not caplog.records  # not an error: the disk is kept for messages

    needs_room_for_a_preallocated_wal(tmp_path)
    written: list[int] = []
    real_pwrite = os.pwrite

    def fill_up(fd: int, data: bytes, offset: int) -> int:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(offset)
        return real_pwrite(fd, data, offset)  # the first MiB lands, then the disk is full

    with monkeypatch.context() as patch, caplog.at_level("INFO", logger="edgesieve.journal"):
        patch.setattr(partition_module.os, "pwrite", fill_up)
        assert not preallocate_wal(path)
    assert written == [len(b"frames")]
    assert wal.read_bytes() == b"frames"  # cut back to its size
    assert [r.getMessage() for r in caplog.records] == [
        f"journal {wal}: WAL not preallocated (OSError: [Errno 28] No space left on device); "
        "SQLite grows it as it writes"
    ]

    caplog.clear()
    wal.unlink()
    with caplog.at_level("INFO", logger="edgesieve.journal"):
        assert not preallocate_wal(path)
    assert not wal.exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"journal {wal}: WAL not preallocated (FileNotFoundError: [Errno 2] No such file or "
        f"directory: '{wal}'); SQLite grows it as it writes"
    ]


def free_pages(root: Path) -> int:
    db = sqlite3.connect(root / "part-0.sqlite")
    try:
        return db.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        db.close()


def test_oldest_age_and_latency_stats(open_journal) -> None:
    journal = open_journal(partitions=1)
    old = RawMessage("d", "telemetry", "http", datetime.now(UTC) - timedelta(seconds=30), b"a")
    journal.submit(old).result(10)
    stats = journal.stats()
    assert 29 < stats.oldest_age_s < 60
    assert stats.commits == 1 and 0 < stats.write_p50_ms <= stats.commit_p99_ms


def test_error_messages(root: Path, open_journal, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(
        "journal.sync: must be one of full, normal (got 'off'); hint: full survives power loss, "
        "normal survives a crash of the process"
    )):
        Journal(JournalSettings(root=root, sync="off"))
    for name in ("partitions", "max_bytes", "max_batch"):
        with pytest.raises(ValueError, match=re.escape(
            f"journal.{name}: must be at least 1 (got 0); hint: leave it unset"
        )):
            Journal(JournalSettings(root=root, **{name: 0}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(
        "journal.linger: must not be negative (got -1 day, 23:59:59); hint: 2 ms"
    )):
        Journal(JournalSettings(root=root, linger=timedelta(seconds=-1)))
    with pytest.raises(FileNotFoundError, match=re.escape(
        f"journal: no partition file {root}/part-0.sqlite (got partition 0, journal partitions "
        "None); hint: open the Journal first, and read partitions 0 .. journal.partitions - 1"
    )):
        JournalReader(root, 0)
    journal = open_journal(partitions=1)
    with pytest.raises(RuntimeError, match=re.escape(
        f"journal {root} is already open for writing (lock {root}/writer.lock held, got "
        "EAGAIN); hint: one Journal per journal directory, close the other one or stop the "
        "process holding it"
    )):
        Journal(JournalSettings(root=root, partitions=1))
    with pytest.raises(ValueError, match=re.escape(
        "journal: received_at must be timezone-aware (got naive 2024-01-01T00:00:00); hint: use "
        "datetime.now(UTC)"
    )):
        journal.submit(RawMessage("d", "telemetry", "mqtt", datetime(2024, 1, 1), b""))
    with JournalReader(root, 0) as reader, pytest.raises(ValueError, match=re.escape(
        f"journal: reader 'flow' released offset 0 of {root}/part-0.sqlite, beyond the last "
        "committed offset (got 0, last -1); hint: release only offsets read()"
    )):
        reader.release("flow", 0)
    reader = JournalReader(root, 0)
    reader.close()
    with pytest.raises(RuntimeError, match=re.escape(
        f"JournalReader {root}/part-0.sqlite is closed; hint: open a new JournalReader"
    )):
        reader.read(-1, 1)
    journal.close()
    closed = f"journal {root} is closed (got a submission); hint: open a new Journal"
    assert journal.admit() == closed
    with pytest.raises(RuntimeError, match=re.escape(closed)):
        journal.submit(message("d", b"late")).result(1)
    db = sqlite3.connect(root / "part-0.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(ValueError, match=re.escape(
        f"journal: {root}/part-0.sqlite has schema version 99, newer than this edgesieve "
        "supports (got 99, know 1); hint: run the edgesieve version that wrote it"
    )):
        Journal(JournalSettings(root=root, partitions=1))


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 5), st.binary(max_size=12), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 1), st.sampled_from(["a", "b"]),
                  st.floats(0, 1)),
    ),
    max_size=40,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_read_is_what_was_committed_and_not_released(ops) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "journal"
        journal = Journal(JournalSettings(root=root, partitions=2, sync="normal",
                                          linger=timedelta(0)))
        readers = [JournalReader(root, p) for p in range(2)]
        for reader in readers:  # both registered from the start
            reader.release("a", -1)
            reader.release("b", -1)
        committed: list[dict[int, tuple[str, bytes]]] = [{}, {}]
        released: list[dict[str, int]] = [{"a": -1, "b": -1}, {"a": -1, "b": -1}]
        gone = [-1, -1]  # at or below: released by both readers, deleted sooner or later
        pending: list[tuple[RawMessage, object]] = []
        try:
            for op in ops + [("release", 0, "a", -1.0)]:
                if op[0] == "submit":
                    _, device, payload, redelivery = op
                    m = message(f"dev{device}", payload)
                    pending.append((m, journal.submit(m, redelivery=redelivery)))
                    continue
                for m, future in pending:  # a burst of submits, then a release
                    c = future.result(10)
                    key = (m.device, m.payload)
                    if c.duplicate:
                        assert committed[c.partition][c.offset] == key
                    else:
                        assert c.offset not in committed[c.partition]
                        committed[c.partition][c.offset] = key
                pending.clear()
                _, p, name, fraction = op
                last = readers[p].last_offset()
                if fraction >= 0 and last >= 0:
                    readers[p].release(name, int(fraction * last))
                    released[p][name] = max(released[p].get(name, -1), int(fraction * last))
                    gone[p] = max(gone[p], min(released[p].values()))
            for p in range(2):
                expected = [(o, k) for o, k in sorted(committed[p].items()) if o > gone[p]]
                got = [(o, (m.device, m.payload)) for o, m in readers[p].read(gone[p], 10_000)]
                assert got == expected
            held = [k[1] for p in range(2) for o, k in committed[p].items() if o > gone[p]]
            expected_stats = (len(held), sum(map(len, held)))
            wait_for(lambda: (journal.stats().messages, journal.stats().bytes) == expected_stats,
                     timeout=5)
            for p in range(2):
                got = [(o, (m.device, m.payload)) for o, m in readers[p].read(-1, 10_000)]
                assert got == [(o, k) for o, k in sorted(committed[p].items()) if o > gone[p]]
        finally:
            for reader in readers:
                reader.close()
            journal.close()


# --- one device's share -------------------------------------------------------------------------


def test_a_device_over_its_byte_share_is_refused_alone_until_its_messages_are_released(
    root: Path, open_journal
) -> None:
    journal = open_journal(partitions=1, max_bytes=1000, device_share=0.3)  # 300 bytes a device
    for i in range(3):
        journal.submit(message("flood", bytes([i]) * 100)).result(10)
    # repeats are not held twice: a duplicate gives its bytes back
    keyed = journal.submit(message("quiet", b"k" * 100), dedup_key=b"ep|1").result(10)
    for _ in range(3):
        assert journal.submit(message("quiet", b"k" * 100), dedup_key=b"ep|1").result(10) == (
            Committed(0, keyed.offset, duplicate=True)
        )
    reason = (
        f"journal share of device flood full: 300 payload bytes held of its 300 "
        f"(journal.device_share=0.3 x journal.max_bytes=1000) in {root} (got a 1-byte message); "
        "hint: this device sends faster than the flow takes its messages, other devices are "
        "still accepted; retry later or raise journal.device_share"
    )
    with pytest.raises(JournalFull, match=f"^{re.escape(reason)}$"):
        journal.submit(message("flood", b"x")).result(1)
    assert journal.admit("flood") == reason.replace("a 1-byte", "a 0-byte")
    assert journal.admit() is None and journal.admit("quiet") is None
    for _ in range(2):  # the other device still has its own 300 bytes
        assert not journal.submit(message("quiet", b"q" * 100)).result(10).duplicate
    stats = journal.stats()
    assert (stats.refused, stats.refused_share, stats.over_share) == (1, 1, 0)
    with JournalReader(root, 0) as reader:
        reader.release("flow", 1)  # the first two of "flood"
        wait_for(lambda: journal.admit("flood") is None)
    assert journal.submit(message("flood", b"y" * 200)).result(10).offset == 6
    with pytest.raises(JournalFull, match="^journal share of device flood full: 300 payload"):
        journal.submit(message("flood", b"z")).result(1)


def test_a_device_share_is_counted_again_after_a_restart(root: Path, open_journal) -> None:
    journal = open_journal(partitions=2, max_bytes=1000, device_share=0.2)
    for _ in range(2):
        journal.submit(message("flood", b"f" * 100)).result(10)
    journal.close()
    reopened = open_journal(partitions=2, max_bytes=1000, device_share=0.2)
    assert reopened.admit("flood") is not None and reopened.admit("other") is None
    with pytest.raises(JournalFull, match="^journal share of device flood full: 200 payload"):
        reopened.submit(message("flood", b"f")).result(1)
    reopened.submit(message("other", b"o" * 200)).result(10)


def test_a_device_over_its_queue_share_is_refused_while_others_still_queue(
    root: Path, open_journal
) -> None:
    journal = open_journal(partitions=1, max_batch=2, linger=timedelta(0), device_share=0.25)
    gate = threading.Event()
    journal._fault_hook = lambda db: gate.wait(10)
    futures = [journal.submit(message("flood", b"a"))]
    wait_for(lambda: journal.stats().queued == 0)  # the writer holds the first
    futures += [journal.submit(message("flood", b"b")) for _ in range(2)]  # 0.25 x 8 = 2 queued
    reason = (
        f"journal queue share of device flood full: 2 of its messages wait to be committed to "
        f"{root} (limit journal.device_share=0.25 x 8 = 2); hint: this device sends faster than "
        "the disk commits, other devices are still accepted; retry later"
    )
    assert journal.admit("flood") == reason and journal.admit("calm") is None
    with pytest.raises(JournalFull, match=f"^{re.escape(reason)}$"):
        journal.submit(message("flood", b"c")).result(1)
    futures += [journal.submit(message("calm", b"d")) for _ in range(2)]
    gate.set()
    assert [f.result(10).offset for f in futures] == [0, 1, 2, 3, 4]
    assert journal.admit("flood") is None


def test_over_share_messages_are_kept_while_one_share_stays_free_for_the_others(
    root: Path, open_journal
) -> None:
    # a transport that already told its device "accepted" (MQTT) keeps the message if it can
    journal = open_journal(partitions=1, max_bytes=1000, device_share=0.25)
    done: list[Committed | BaseException] = []

    def append(device: str, size: int) -> bool:
        return journal.append_received(
            device, "telemetry", "mqtt", 0, b"m" * size, lambda _, out: done.extend(out),
            over_share=True,
        )

    kept = [append("flood", 100) for _ in range(7)]  # 700 bytes, over its 250: within 750
    assert kept == [True] * 7
    wait_for(lambda: len(done) == 7)
    assert all(isinstance(outcome, Committed) for outcome in done)
    assert not append("flood", 100)  # 800 would leave less than one share (250) free
    reason = str(done[-1])
    assert reason == (
        f"journal nearly full: device flood is over its share (journal.device_share=0.25) and "
        f"the rest of journal.max_bytes=1000 and of the commit queue in {root} is kept for the "
        "other devices (got a 100-byte message); hint: retry later"
    )
    assert journal.admit("calm") is None  # the reserve: another device within its share
    journal.submit(message("calm", b"c" * 250)).result(10)
    assert journal.admit("flood", over_share=True) == reason.replace("a 100-byte", "a 0-byte")
    stats = journal.stats()
    assert (stats.over_share, stats.refused_share, stats.bytes) == (5, 1, 950)
    with JournalReader(root, 0) as reader:
        reader.release("flow", 4)
        wait_for(lambda: journal.admit("flood", over_share=True) is None)


def test_device_share_must_be_a_fraction(root: Path) -> None:
    for share in (0, 1.5):
        with pytest.raises(ValueError, match=re.escape(
            f"journal.device_share: must be above 0 and at most 1 (got {share}); hint: the "
            "fraction of journal.max_bytes one device may hold, e.g. 0.25 (1: no limit)"
        )):
            Journal(JournalSettings(root=root, device_share=share))


def test_a_read_is_bounded_by_bytes_as_well_as_by_count(root: Path, open_journal) -> None:
    journal = open_journal(device_share=1.0)
    sizes = [100, 5_000, 100, 70_000, 300, 10]
    for f in [journal.submit(message("dev", b"x" * n)) for n in sizes]:
        f.result(10)
    with JournalReader(root, 0) as reader:
        assert [o for o, _ in reader.read(-1, 10, 5_100)] == [0, 1]  # stops once 5,100 bytes held
        assert [o for o, _ in reader.read(1, 10, 50)] == [2]  # one over the cap: still one message
        assert [o for o, _ in reader.read(2, 10, 1_000_000)] == [3, 4, 5]
        assert [o for o, _ in reader.read(-1, 2, 1_000_000)] == [0, 1]  # the count still caps
        assert [o for o, _ in reader.read(-1, 10)] == list(range(6))
