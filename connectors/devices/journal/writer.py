"""Ingest journal: device messages committed to disk before devices are told "accepted".

The journal is ``partitions`` SQLite files ``part-<i>.sqlite`` (WAL) under
``data_dir/journal``; a device's messages always go to partition
:func:`partition_of` of its id, so their order is kept.

- **Append** (:class:`Journal`, one per process, guarded by an exclusive lock on
  ``writer.lock``): :meth:`Journal.submit` queues a message and returns a future
  at once; :meth:`Journal.append` does the same with a callback instead (no
  future per message). A writer thread takes up to ``max_batch`` queued
  messages (waiting up to ``linger`` for more), writes them in one transaction
  per partition (multi-row INSERTs; the partitions of a group are written and
  committed side by side), commits (``synchronous=FULL`` or ``NORMAL``), then
  resolves the futures and calls the callbacks in submission order, on the
  writer thread. A partition's part of a group is written whole or not at all.
- **Offsets** are the rows' ``INTEGER PRIMARY KEY AUTOINCREMENT`` values, from 0,
  assigned by the writer; ``sqlite_sequence`` keeps the highest one ever used,
  so offsets are never reused after truncation or a restart.
- **Bounds**: payload bytes held (committed and not released by every
  registered reader, plus those waiting to be committed) never exceed
  ``max_bytes``; at most ``4 * max_batch`` messages wait for the writer. Beyond
  either, and while the disk is full, futures fail with :class:`JournalFull`
  and :meth:`Journal.admit` gives the reason. A disk-full commit is rolled
  back; the writer keeps running and the next successful commit clears it.
- **Redelivery** (MQTT DUP): a ``blake2b``-128 digest of (device, channel,
  payload) is stored and indexed; a redelivered message whose digest is among
  the partition's last :data:`DEDUP_WINDOW` offsets is not written again.
- **Truncation**: a reader (:class:`JournalReader`, any process) registers by
  its first :meth:`JournalReader.release`; the writer deletes rows at or below
  the lowest offset released by every registered reader, in chunks of
  :data:`TRUNCATE_CHUNK` rows, and runs an incremental vacuum when idle so the
  files shrink. With no registered reader nothing is deleted; a reader that
  registers later starts from what is still held.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import hashlib
import logging
import sqlite3
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from operators.records import RawMessage

__all__ = [
    "DEDUP_WINDOW",
    "SYNC_MODES",
    "TRUNCATE_CHUNK",
    "Committed",
    "Journal",
    "JournalFull",
    "JournalReader",
    "JournalSettings",
    "JournalStats",
    "journal_partitions",
    "partition_of",
]

logger = logging.getLogger("edgesieve.journal")

SYNC_MODES = ("full", "normal")
SCHEMA_VERSION = 1
DEDUP_WINDOW = 4096
"""A redelivery is looked up among this many most recent offsets of its partition."""
TRUNCATE_CHUNK = 5000
"""Rows deleted per truncation transaction, so commits of new messages are not held up."""
QUEUE_FACTOR = 4
"""At most ``QUEUE_FACTOR * max_batch`` messages wait for the writer."""
VACUUM_PAGES = 256
"""Free pages above which the writer runs ``PRAGMA incremental_vacuum``."""
VACUUM_CHUNK = 4096
"""Pages one incremental vacuum gives back at most (16 MiB of 4 KiB pages)."""
READERS_POLL_S = 0.05
"""How often the writer looks at the readers' released offsets."""
PROBE_INTERVAL_S = 1.0
"""While the disk is full and nothing is submitted, the writer tries a write this often."""
PROBE_BYTES = 64 * 1024
LATENCY_SAMPLES = 4096
BUSY_TIMEOUT_MS = 10_000
CLOSE_TIMEOUT_S = 120.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    channel TEXT NOT NULL,
    transport TEXT NOT NULL,
    received_at_us INTEGER NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    digest BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_digest ON messages (digest);
CREATE TABLE IF NOT EXISTS readers (name TEXT PRIMARY KEY, released INTEGER NOT NULL)
"""

_INSERT = (
    "INSERT INTO messages (seq, device, channel, transport, received_at_us, payload, size, digest)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = 8
INSERT_ROWS = 256
"""Rows per multi-row INSERT statement at most (a power of two; 8 parameters a row)."""


def _insert_sql(rows: int) -> str:
    """One INSERT statement of ``rows`` rows."""
    values = "(" + ", ".join("?" * _COLUMNS) + ")"
    return _INSERT.rpartition(" VALUES ")[0] + " VALUES " + ", ".join([values] * rows)


_INSERTS = {1 << k: _insert_sql(1 << k) for k in range(INSERT_ROWS.bit_length())}
"""Multi-row INSERT statements of every power of two up to INSERT_ROWS (a few, so cached)."""

@dataclass(frozen=True)
class JournalSettings:
    """Where the journal lives and how it commits; see :mod:`flows.config` ``journal``."""

    root: Path
    partitions: int = 4
    sync: str = "full"
    max_bytes: int = 1 << 30
    max_batch: int = 2000
    linger: timedelta = timedelta(milliseconds=2)


@dataclass(frozen=True, slots=True)
class Committed:
    """Where a message was journaled; ``duplicate`` when a redelivery was already there."""

    partition: int
    offset: int
    duplicate: bool = False


Done = Callable[[Committed | BaseException], None]
"""What :meth:`Journal.append` calls with a message's outcome."""


@dataclass(frozen=True)
class JournalStats:
    """What the journal holds and how fast it commits.

    ``messages``/``bytes`` are held (committed, not yet released by every
    reader); ``oldest_age_s`` is the age of the oldest held message by its
    ``received_at`` (0 when none). ``commits`` counts group transactions.
    ``commit_p50_ms``/``commit_p99_ms`` is the time from submission to durable
    commit of each group's first message (the longest wait in the group), over
    the last groups; ``write_p50_ms``/``write_p99_ms`` the time of the group's
    transactions alone (write and sync).
    """

    messages: int
    bytes: int
    oldest_age_s: float
    commits: int
    commit_p50_ms: float
    commit_p99_ms: float
    write_p50_ms: float
    write_p99_ms: float
    queued: int
    duplicates: int
    refused: int


class JournalFull(Exception):
    """The journal cannot take a message now; the one-line reason says why."""


def partition_of(device: str, partitions: int) -> int:
    """The partition a device's messages go to."""
    return zlib.adler32(device.encode()) % partitions


def part_path(root: Path, partition: int) -> Path:
    """The SQLite file of one partition."""
    return Path(root) / f"part-{partition}.sqlite"


def journal_partitions(root: Path) -> int | None:
    """The partition count recorded in the journal at ``root``, None when there is none."""
    path = part_path(root, 0)
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'partitions'").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()
    return None if row is None else int(row[0])


def digest_of(device: str, channel: str, payload: bytes, key: bytes = b"") -> bytes:
    """The 16-byte digest redeliveries are recognised by (lengths keep the fields apart).

    ``key`` is a transport's identity of one transmission (CoAP: endpoint,
    message id and token), so a retransmission matches and a new message with
    the same content does not.
    """
    head = f"{len(device)}:{device}{len(channel)}:{channel}{len(key)}:".encode() + key
    return hashlib.blake2b(head + payload, digest_size=16).digest()


def to_us(ts: datetime) -> int:
    """Microseconds since the epoch of an aware datetime."""
    if ts.tzinfo is not UTC and (ts.tzinfo is None or ts.utcoffset() is None):
        msg = (
            f"journal: received_at must be timezone-aware (got naive {ts.isoformat()}); "
            "hint: use datetime.now(UTC)"
        )
        raise ValueError(msg)
    return (ts - _EPOCH) // _US


def from_us(us: int) -> datetime:
    """The aware UTC datetime of microseconds since the epoch."""
    return _EPOCH + timedelta(microseconds=us)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's or the OS's "no space left"."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    mode = "rwc" if create else "rw"
    db = sqlite3.connect(
        f"file:{path}?mode={mode}",
        uri=True,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    return db


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(slots=True)
class _Item:
    msg: RawMessage
    received_us: int
    partition: int
    size: int
    redelivery: bool
    key: bytes | None
    done: Done
    submitted: float


def _resolver(future: concurrent.futures.Future[Committed]) -> Done:
    """The completion of ``future`` as an :meth:`Journal.append` callback."""

    def done(outcome: Committed | BaseException) -> None:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    return done


class _Partition:
    """The writer's connection to one partition file and what it knows about it."""

    def __init__(
        self, root: Path, index: int, partitions: int, sync: str, lock: threading.Condition
    ) -> None:
        self.index = index
        self.lock = lock
        self.path = part_path(root, index)
        new = not self.path.exists()
        self.db = _connect(self.path, create=True)
        try:
            self._init(new, partitions, sync)
        except BaseException:
            self.db.close()
            raise
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        self.last = -1 if row is None else int(row[0])
        count, size = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM messages"
        ).fetchone()
        self.count = int(count)
        self.bytes = int(size)
        first = self.db.execute("SELECT min(seq) FROM messages").fetchone()[0]
        self.truncated = (self.last if first is None else int(first) - 1)
        self.oldest_us: int | None = None
        self.load_oldest()

    def _init(self, new: bool, partitions: int, sync: str) -> None:
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            msg = (
                f"journal: {self.path} has schema version {version}, newer than this edgesieve "
                f"supports (got {version}, know {SCHEMA_VERSION}); hint: run the edgesieve "
                "version that wrote it"
            )
            raise ValueError(msg)
        if new:
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("journal %s: SQLite refused WAL (journal_mode=%s)", self.path, mode)
        db.execute(f"PRAGMA synchronous = {sync.upper()}")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('partitions', ?)",
                (str(partitions),),
            )
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def load_oldest(self) -> None:
        row = self.db.execute(
            "SELECT received_at_us FROM messages ORDER BY seq LIMIT 1"
        ).fetchone()
        self.oldest_us = None if row is None else int(row[0])

    def release_floor(self) -> int | None:
        """The offset every registered reader released, None when no reader is registered."""
        count, low = self.db.execute("SELECT count(*), min(released) FROM readers").fetchone()
        return None if count == 0 else int(low)

    def truncate_chunk(self) -> tuple[int, int]:
        """Delete up to TRUNCATE_CHUNK released rows in one transaction; the rows and bytes."""
        floor = self.release_floor()
        if floor is None or floor <= self.truncated:
            return 0, 0
        upto = min(floor, self.truncated + TRUNCATE_CHUNK)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE seq > ? AND seq <= ?",
                (self.truncated, upto),
            ).fetchone()
            db.execute("DELETE FROM messages WHERE seq > ? AND seq <= ?", (self.truncated, upto))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        row = db.execute("SELECT received_at_us FROM messages ORDER BY seq LIMIT 1").fetchone()
        with self.lock:
            self.truncated = upto
            self.count -= int(count)
            self.bytes -= int(size)
            self.oldest_us = None if row is None else int(row[0])
        return int(count), int(size)

    def vacuum_chunk(self) -> None:
        """Give up to VACUUM_CHUNK free pages back to the file system when many are free."""
        if self.db.execute("PRAGMA freelist_count").fetchone()[0] > VACUUM_PAGES:
            # execute() steps a statement without result columns once (one page);
            # executescript() runs it to completion.
            self.db.executescript(f"PRAGMA incremental_vacuum({VACUUM_CHUNK});")

    def find(self, digest: bytes) -> int | None:
        """The offset of a recent message with this digest."""
        row = self.db.execute(
            "SELECT seq FROM messages WHERE digest = ? AND seq > ? ORDER BY seq DESC LIMIT 1",
            (digest, self.last - DEDUP_WINDOW),
        ).fetchone()
        return None if row is None else int(row[0])


class Journal:
    """The append side: one per process, thread-safe, group commit in a writer thread."""

    def __init__(self, settings: JournalSettings) -> None:
        _check_settings(settings)
        self.settings = settings
        self.root = Path(settings.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._max_queue = QUEUE_FACTOR * settings.max_batch
        self._linger_s = settings.linger.total_seconds()
        self._lock_file = _lock_writer(self.root)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._parts: list[_Partition] = []
        try:
            recorded = journal_partitions(self.root)
            if recorded is not None and recorded != settings.partitions:
                msg = (
                    f"journal.partitions: the journal at {self.root} was created with "
                    f"{recorded} partitions (got {settings.partitions}); hint: set "
                    f"journal.partitions: {recorded}, or move the journal away once every "
                    "message in it was processed"
                )
                raise ValueError(msg)
            for i in range(settings.partitions):
                self._parts.append(
                    _Partition(self.root, i, settings.partitions, settings.sync, self._cond)
                )
            for part in self._parts:
                while part.truncate_chunk()[0]:
                    pass
        except BaseException:
            for part in self._parts:
                part.db.close()
            self._lock_file.close()
            raise
        self._queue: deque[_Item] = deque()
        self._pending_bytes = 0
        self._held_bytes = sum(p.bytes for p in self._parts)
        """Committed payload bytes not yet released by every reader (all partitions)."""
        self._fault_hook: Callable[[sqlite3.Connection], None] | None = None
        """Called at the start of each write transaction (tests inject disk faults with it)."""
        self._disk_full: str | None = None
        self._closing = False
        self._closed = False
        self._commits = 0
        self._duplicates = 0
        self._refused = 0
        self._waits: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._writes: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.partitions, thread_name_prefix="journal-partition"
        )
        self._thread = threading.Thread(
            target=self._run, name=f"journal-writer {self.root}", daemon=True
        )
        self._thread.start()

    # -- append side ---------------------------------------------------------------------

    def submit(
        self, msg: RawMessage, *, redelivery: bool = False, dedup_key: bytes | None = None
    ) -> concurrent.futures.Future[Committed]:
        """Queue ``msg``; the future resolves after its durable commit (see the module doc).

        ``redelivery`` (the MQTT DUP flag): an identical recent message is not
        written again. ``dedup_key`` (a transport's identity of the
        transmission, e.g. CoAP's endpoint, message id and token): always
        looked up, so a retransmission after a crash between commit and answer
        is stored once, while a new message with the same content is not
        mistaken for it.

        Never blocks. A refused message (journal over ``max_bytes``, queue full)
        gets a future already failed with :class:`JournalFull`, and a submission
        after :meth:`close` one failed with ``RuntimeError``; their callbacks run
        in the caller's thread. While the disk is full, messages are still
        queued (their group fails with ``JournalFull("disk full: ...")`` if it
        still is); :meth:`admit` is what pushes devices back meanwhile.
        """
        future: concurrent.futures.Future[Committed] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # a queued message cannot be cancelled
        self.append(msg, _resolver(future), redelivery=redelivery, dedup_key=dedup_key)
        return future

    def append(
        self,
        msg: RawMessage,
        done: Done,
        *,
        redelivery: bool = False,
        dedup_key: bytes | None = None,
    ) -> bool:
        """:meth:`submit` without a future: ``done(outcome)`` is called instead.

        ``outcome`` is the :class:`Committed` place of the message, or the
        exception its future would fail with. As with :meth:`submit`, ``done``
        runs on the writer thread in submission order after the durable commit,
        or at once in the caller's thread when the message is refused; True when
        the message was queued, False when it was refused (``done`` was called).
        Cheaper than a future per message (no lock, no condition).
        """
        received_us = to_us(msg.received_at)  # a naive timestamp is the caller's bug: raise here
        size = len(msg.payload)
        with self._lock:
            if self._closing:
                refused: BaseException = RuntimeError(self._closed_message())
            else:
                reason = self._refusal(size)
                if reason is None:
                    self._queue.append(
                        _Item(
                            msg,
                            received_us,
                            partition_of(msg.device, self.settings.partitions),
                            size,
                            redelivery,
                            dedup_key,
                            done,
                            time.monotonic(),
                        )
                    )
                    self._pending_bytes += size
                    waiting = len(self._queue)
                    if waiting == 1 or waiting == self.settings.max_batch:
                        self._cond.notify()  # the writer waits for the first, or a full group
                    return True
                self._refused += 1
                refused = JournalFull(reason)
        done(refused)
        return False

    def admit(self) -> str | None:
        """None when there is room; otherwise the one-line reason devices are pushed back for."""
        with self._cond:
            if self._closing:
                return self._closed_message()
            if self._disk_full is not None:
                return self._disk_full
            return self._refusal(0)

    def _refusal(self, size: int) -> str | None:
        waiting = len(self._queue)
        if waiting >= self._max_queue:
            return (
                f"journal queue full: {waiting} messages wait to be committed to {self.root} "
                f"(limit {QUEUE_FACTOR} x journal.max_batch = {self._max_queue}); hint: the "
                "disk commits slower than messages arrive, retry later"
            )
        held = self._held_bytes + self._pending_bytes
        if held + size > self.settings.max_bytes or (size == 0 and held >= self.settings.max_bytes):
            return (
                f"journal full: {held} payload bytes held of journal.max_bytes="
                f"{self.settings.max_bytes} in {self.root} (got a {size}-byte message); hint: "
                "the readers have not released them yet, retry later or raise journal.max_bytes"
            )
        return None

    def _closed_message(self) -> str:
        return f"journal {self.root} is closed (got a submission); hint: open a new Journal"

    def stats(self) -> JournalStats:
        """Held messages and bytes, oldest held age, commits and commit latency."""
        with self._cond:
            waits = list(self._waits)
            writes = list(self._writes)
            oldest = [p.oldest_us for p in self._parts if p.oldest_us is not None]
            now_us = to_us(datetime.now(UTC))
            return JournalStats(
                messages=sum(p.count for p in self._parts),
                bytes=sum(p.bytes for p in self._parts),
                oldest_age_s=max(0.0, (now_us - min(oldest)) / 1e6) if oldest else 0.0,
                commits=self._commits,
                commit_p50_ms=_percentile(waits, 0.50) * 1000,
                commit_p99_ms=_percentile(waits, 0.99) * 1000,
                write_p50_ms=_percentile(writes, 0.50) * 1000,
                write_p99_ms=_percentile(writes, 0.99) * 1000,
                queued=len(self._queue),
                duplicates=self._duplicates,
                refused=self._refused,
            )

    def close(self) -> None:
        """Commit what was submitted, stop the writer, close the files."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            logger.error("journal %s: writer did not stop in %.0f s", self.root, CLOSE_TIMEOUT_S)
            return
        self._pool.shutdown()
        with self._cond:
            self._closed = True
            for part in self._parts:
                part.db.close()
            self._lock_file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = 0.0
        next_probe = 0.0
        while True:
            group = self._take()
            if group:
                self._commit_group(group)
            now = time.monotonic()
            if now >= next_poll or not group:
                next_poll = now + READERS_POLL_S
                self._truncate()
            if not group and self._disk_full is not None and now >= next_probe:
                next_probe = now + PROBE_INTERVAL_S
                self._probe()
            with self._cond:
                if self._closing and not self._queue:
                    return

    def _take(self) -> list[_Item]:
        """Up to max_batch queued items, waiting up to linger for more once one is there."""
        max_batch = self.settings.max_batch
        with self._cond:
            if not self._queue and not self._closing:
                self._cond.wait(READERS_POLL_S)
            if not self._queue:
                return []
            if self._linger_s > 0 and len(self._queue) < max_batch and not self._closing:
                deadline = time.monotonic() + self._linger_s
                while len(self._queue) < max_batch and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            n = min(max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _commit_group(self, group: list[_Item]) -> None:
        started = time.monotonic()
        by_part: dict[int, list[_Item]] = {}
        for item in group:
            by_part.setdefault(item.partition, []).append(item)
        results: dict[int, Committed | BaseException] = {}
        disk_full: str | None = None
        wrote = False
        writes = self._write_partitions(by_part)
        for index, items in by_part.items():
            part = self._parts[index]
            try:
                outcome = writes[index].result()
            except Exception as exc:  # noqa: BLE001 - every failure goes to the futures
                if is_disk_full(exc):
                    disk_full = (
                        f"disk full: {part.path}: {type(exc).__name__}: {exc}; hint: free space "
                        f"on the disk of {self.root}, commits resume by themselves"
                    )
                    error: BaseException = JournalFull(disk_full)
                else:
                    logger.exception("journal %s: commit failed", part.path)
                    error = exc
                for item in items:
                    results[id(item)] = error
                continue
            wrote = True
            for item, committed in zip(items, outcome, strict=True):
                results[id(item)] = committed
        done = time.monotonic()
        with self._cond:
            self._pending_bytes -= sum(item.size for item in group)
            if wrote:
                self._commits += 1
                self._writes.append(done - started)
                self._waits.append(done - group[0].submitted)
            if disk_full is not None:
                self._disk_full = disk_full
            elif wrote:
                self._disk_full = None
        for item in group:
            item.done(results[id(item)])

    def _write_partitions(
        self, by_part: dict[int, list[_Item]]
    ) -> dict[int, concurrent.futures.Future[list[Committed]]]:
        """Write each partition's items in its own transaction, the partitions side by side.

        Each partition is its own file with its own commit (and fsync with
        ``sync=full``): committed in parallel, a group waits for the slowest
        sync rather than for their sum, and the devices' acknowledgements with it.
        """
        if len(by_part) == 1:
            [(index, items)] = by_part.items()
            future: concurrent.futures.Future[list[Committed]] = concurrent.futures.Future()
            try:
                future.set_result(self._write(self._parts[index], items))
            except Exception as exc:  # noqa: BLE001 - the caller handles it
                future.set_exception(exc)
            return {index: future}
        return {
            index: self._pool.submit(self._write, self._parts[index], items)
            for index, items in by_part.items()
        }

    def _write(self, part: _Partition, items: list[_Item]) -> list[Committed]:
        """Write ``items`` to ``part`` in one transaction; their results in order."""
        db = part.db
        rows: list[object] = []  # the rows' values one after the other (multi-row INSERT)
        outcome: list[Committed] = []
        in_group: dict[bytes, int] = {}
        last = part.last
        size = 0
        duplicates = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            self._fault(db)
            for item in items:
                msg = item.msg
                digest = digest_of(msg.device, msg.channel, msg.payload, item.key or b"")
                if item.redelivery or item.key is not None:
                    earlier = in_group.get(digest)
                    if earlier is None:
                        earlier = part.find(digest)
                    if earlier is not None:
                        outcome.append(Committed(part.index, earlier, duplicate=True))
                        duplicates += 1
                        continue
                last += 1
                in_group[digest] = last
                rows += (
                    last,
                    msg.device,
                    msg.channel,
                    msg.transport,
                    item.received_us,
                    msg.payload,
                    item.size,
                    digest,
                )
                size += item.size
                outcome.append(Committed(part.index, last))
            _insert(db, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        written = len(rows) // _COLUMNS
        with self._lock:
            if part.count == 0 and written:
                part.oldest_us = int(rows[4])  # type: ignore[call-overload]
            part.last = last
            part.count += written
            part.bytes += size
            self._held_bytes += size
            self._duplicates += duplicates
        return outcome

    def _fault(self, db: sqlite3.Connection) -> None:
        hook = self._fault_hook
        if hook is not None:
            hook(db)

    def _probe(self) -> None:
        """Write and delete PROBE_BYTES in each partition; clear the disk-full state if it works."""
        for part in self._parts:
            db = part.db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._fault(db)
                    db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', zeroblob(?))",
                        (PROBE_BYTES,),
                    )
                    db.execute("DELETE FROM meta WHERE key = 'probe'")
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except Exception as exc:  # noqa: BLE001 - still full (or worse): try again later
                logger.info("journal %s: write probe failed: %s", part.path, exc)
                return
        with self._cond:
            self._disk_full = None

    def _truncate(self) -> None:
        for part in self._parts:
            try:
                count, size = part.truncate_chunk()
                if count:
                    with self._lock:
                        self._held_bytes -= size
                else:
                    part.vacuum_chunk()
            except sqlite3.Error:
                logger.exception("journal %s: truncation failed", part.path)


def _insert(db: sqlite3.Connection, values: list[object]) -> None:
    """Insert the rows whose values follow one another in ``values``.

    In multi-row statements of INSERT_ROWS rows, the rest in power-of-two
    statements: few statements (each releases the GIL once while SQLite
    works, where ``executemany`` would release it for every row), all cached.
    """
    rows = len(values) // _COLUMNS
    start = 0
    chunk = INSERT_ROWS
    while rows:
        while chunk > rows:
            chunk >>= 1
        end = start + chunk * _COLUMNS
        db.execute(_INSERTS[chunk], values[start:end])
        start, rows = end, rows - chunk


def _check_settings(settings: JournalSettings) -> None:
    if settings.sync not in SYNC_MODES:
        msg = (
            f"journal.sync: must be one of {', '.join(SYNC_MODES)} (got {settings.sync!r}); "
            "hint: full survives power loss, normal survives a crash of the process"
        )
        raise ValueError(msg)
    for name in ("partitions", "max_bytes", "max_batch"):
        value = getattr(settings, name)
        if value < 1:
            msg = f"journal.{name}: must be at least 1 (got {value}); hint: leave it unset"
            raise ValueError(msg)
    if settings.linger < timedelta(0):
        msg = f"journal.linger: must not be negative (got {settings.linger}); hint: 2 ms"
        raise ValueError(msg)


def _lock_writer(root: Path):  # noqa: ANN202 - an open file
    path = root / "writer.lock"
    handle = open(path, "a+b")  # noqa: SIM115 - held open while the journal is
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        msg = (
            f"journal {root} is already open for writing (lock {path} held, got "
            f"{errno.errorcode.get(exc.errno or 0, exc)}); hint: one Journal per journal "
            "directory, close the other one or stop the process holding it"
        )
        raise RuntimeError(msg) from exc
    return handle


class JournalReader:
    """The read side of one partition (any process; SQLite WAL readers never block the writer)."""

    def __init__(self, root: Path, partition: int) -> None:
        self.root = Path(root)
        self.partition = partition
        self.path = part_path(self.root, partition)
        if not self.path.exists():
            msg = (
                f"journal: no partition file {self.path} (got partition {partition}, "
                f"journal partitions {journal_partitions(self.root)}); hint: open the Journal "
                "first, and read partitions 0 .. journal.partitions - 1"
            )
            raise FileNotFoundError(msg)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = _connect(self.path, create=False)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            msg = f"JournalReader {self.path} is closed; hint: open a new JournalReader"
            raise RuntimeError(msg)
        return self._db

    def read(self, after: int, limit: int) -> list[tuple[int, RawMessage]]:
        """Up to ``limit`` messages with offsets > ``after``, ascending."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT seq, device, channel, transport, received_at_us, payload FROM messages"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            (int(seq), RawMessage(device, channel, transport, from_us(us), bytes(payload)))
            for seq, device, channel, transport, us, payload in rows
        ]

    def last_offset(self) -> int:
        """Highest committed offset, -1 when none yet."""
        with self._lock:
            row = self._conn().execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
            ).fetchone()
        return -1 if row is None else int(row[0])

    def released(self, reader: str) -> int:
        """What ``reader`` released last, -1 if never."""
        with self._lock:
            row = self._conn().execute(
                "SELECT released FROM readers WHERE name = ?", (reader,)
            ).fetchone()
        return -1 if row is None else int(row[0])

    def release(self, reader: str, offset: int) -> None:
        """``reader`` is done with offsets <= ``offset`` (registers it; never goes back)."""
        last = self.last_offset()
        if offset > last:
            msg = (
                f"journal: reader {reader!r} released offset {offset} of {self.path}, beyond "
                f"the last committed offset (got {offset}, last {last}); hint: release only "
                "offsets read()"
            )
            raise ValueError(msg)
        with self._lock:
            self._conn().execute(
                "INSERT INTO readers (name, released) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET released = max(released, excluded.released)",
                (reader, offset),
            )

    def close(self) -> None:
        """Close the file; further calls raise RuntimeError."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

