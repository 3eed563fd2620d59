"""The journal's on-disk format and what the writer and readers share: settings, schema, digests."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

logger = logging.getLogger("edgesieve.journal")


SYNC_MODES = ("full", "normal")
SCHEMA_VERSION = 1
DEDUP_WINDOW = 4096
"""A redelivery is looked up among this many most recent offsets of its partition."""
NO_DIGEST = b""
"""The digest column of a row without a dedup key (it is found by its content instead)."""
DEVICE_CACHE = 65_536
"""Devices whose partition the writer remembers (the memo is cleared beyond this)."""
TRUNCATE_CHUNK = 5000
"""Rows deleted per truncation transaction, so commits of new messages are not held up."""
QUEUE_FACTOR = 4
"""At most ``QUEUE_FACTOR * max_batch`` messages wait for the writer."""
VACUUM_PAGES = 256
"""Free pages above which the writer runs ``PRAGMA incremental_vacuum``."""
VACUUM_CHUNK = 4096
"""Pages one incremental vacuum gives back at most (16 MiB of 4 KiB pages)."""
READERS_POLL_S = 0.05
"""How often an idle writer looks at the readers' released offsets."""
TRUNCATE_BUSY_S = 0.5
"""How often a busy writer looks for released rows to delete (a transaction between groups)."""
TRUNCATE_BEHIND_S = 0.05
"""How often a busy writer deletes the next chunk while released rows are left to delete.

A chunk per TRUNCATE_BUSY_S would delete at most 10,000 rows a second: a
stream faster than that (MQTT drains at 25,000 and more) would fill the
journal with processed rows until devices were pushed back. A chunk every
TRUNCATE_BEHIND_S deletes up to 100,000 rows a second, in transactions of
TRUNCATE_CHUNK rows between the groups.
"""
CHECKPOINT_S = 0.25
"""How often the checkpointer copies a written partition's WAL into its file (not in commits)."""
WAL_CATCH_UP_FRAMES = 4096
"""WAL frames (16 MiB of 4 KiB pages) beyond which the writer finishes a checkpoint between groups.

Under continuous commits a checkpoint beside them never ends with the whole
WAL copied (commits come during the copy), and SQLite starts the WAL over
only after a complete one; the writer adds none while it checkpoints, so
its checkpoint, which copies only the frames since the last one, completes.
"""
WAL_LIMIT_BYTES = 64 << 20
"""A WAL file is cut back to this size when SQLite starts it over after a complete checkpoint."""
WAL_PREALLOC_BYTES = 24 << 20
"""Zeros a partition's WAL file is extended to when the writer opens it (WAL_LIMIT_BYTES or less).

A sync after writing past a file's end also commits the file's new size (a
file system journal commit); within the file it syncs the data alone. On the
test VM's ext4 disk an fdatasync of a commit's frames took 0.19-0.26 ms at the
end of the file and 0.13-0.14 ms inside it, whatever their size (4-64 KiB),
and the journal's transaction at 16 HTTP requests in flight went from
0.33-0.42 ms to 0.30-0.32 ms (p50). SQLite starts the WAL over from its
beginning after a complete checkpoint and keeps the file, so a long-running
writer overwrites it anyway; what is preallocated is the first cycle after
every start, up to the checkpoint the writer finishes at WAL_CATCH_UP_FRAMES
(16 MiB of frames, plus what one checkpointer pass adds). Writing zeros is
what it takes: space reserved with ``fallocate`` is marked unwritten, and
the first write into it changes the file's metadata like an append
(0.20 ms). Zeros past SQLite's last frame are not frames (a frame needs the
header's salt and a valid checksum), as after SQLite starts a WAL over.
"""
WAL_PREALLOC_SPARE_BYTES = 1 << 30
"""Disk space that must stay free beside WAL_PREALLOC_BYTES, or the WAL grows as it is written."""
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
CREATE TABLE IF NOT EXISTS readers (name TEXT PRIMARY KEY, released INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS recent (seq INTEGER PRIMARY KEY, digest BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS recent_digest ON recent (digest)
"""
"""``recent`` keeps the digests of truncated rows still among the last DEDUP_WINDOW offsets.

A retransmission can arrive after its first copy was processed, released
and deleted (a device that got no answer because the edge crashed after the
commit sends again once the edge is back, seconds later); its digest is
still found there.
"""

NOT_REDELIVERED = ("http", "coap")
"""Transports whose unkeyed messages are never sent again as a redelivery (only MQTT's DUP is).

A redelivery is compared with earlier messages of the other transports only,
and a deleted unkeyed row of these keeps no digest in ``recent``.
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
    device_share: float = 0.25
    """The most of ``max_bytes`` and of the writer queue one device's messages may hold."""


@dataclass(frozen=True, slots=True)
class Committed:
    """Where a message was journaled; ``duplicate`` when a redelivery was already there."""

    partition: int
    offset: int
    duplicate: bool = False


Done = Callable[[list[Any], list["Committed | BaseException"]], None]
"""What :meth:`Journal.append` calls: tokens of consecutive messages and their outcomes."""


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
    refused_share: int = 0
    """Of ``refused``: messages refused because their device held its ``device_share``."""
    over_share: int = 0
    """Messages kept although their device held its share (MQTT: already acknowledged)."""


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
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error:
        return _files(root)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'partitions'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        return _files(root)
    except sqlite3.DatabaseError:  # a corrupt part-0: the files say how many there are
        return _files(root)
    finally:
        db.close()
    return None if row is None else int(row[0])


def _files(root: Path) -> int:
    """The partition files present, counted from part-0 (the count when part-0 is unreadable)."""
    count = 1
    while part_path(root, count).exists():
        count += 1
    return count


def damage_flag(path: Path) -> Path:
    """The file a reader leaves next to partition ``path`` it found corrupt, for the writer."""
    return path.with_name(path.name + ".damaged")


def flag_damage(path: Path, problem: str, inode: int) -> None:
    """Ask the writer (any process) to replace partition ``path``: it looks for the flag.

    ``inode`` is the file the reader found corrupt: a writer that already
    replaced it ignores the flag.
    """
    flag = damage_flag(path)
    if not flag.exists():
        temp = flag.with_name(flag.name + ".tmp")
        temp.write_text(f"{inode} {problem}")
        os.replace(temp, flag)


def flagged(path: Path) -> str | None:
    """What a reader found wrong with partition ``path`` as it is now, None if nothing.

    A flag about a file already replaced is removed.
    """
    flag = damage_flag(path)
    try:
        inode, _, problem = flag.read_text().partition(" ")
        current = path.stat().st_ino
    except OSError:
        return None
    if inode.strip() == str(current):
        return problem.strip() or "a reader found it corrupt"
    flag.unlink(missing_ok=True)
    return None


def digest_of(device: str, channel: str, payload: bytes, key: bytes = b"") -> bytes:
    """The 16-byte digest retransmissions are recognised by (lengths keep the fields apart).

    ``key`` is a transport's identity of one transmission (CoAP: endpoint,
    message id and token), so a retransmission matches and a new message with
    the same content does not. Only keyed rows store it; rows without a key
    store :data:`NO_DIGEST` (journals written before stored ``digest_of``
    with an empty key for them too, which redeliveries still match).
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


def check_settings(settings: JournalSettings) -> None:
    """Refuse settings no journal can run with (the message names the config key)."""
    if settings.sync not in SYNC_MODES:
        msg = (
            f"journal.sync: must be one of {', '.join(SYNC_MODES)} (got {settings.sync!r}); "
            "hint: full survives power loss, normal survives a crash of the process"
        )
        raise ValueError(msg)
    if not 0 < settings.device_share <= 1:
        msg = (
            f"journal.device_share: must be above 0 and at most 1 (got {settings.device_share}); "
            "hint: the fraction of journal.max_bytes one device may hold, e.g. 0.25 (1: no limit)"
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


def lock_writer(root: Path):  # noqa: ANN202 - an open file
    """Hold ``root/writer.lock`` exclusively (one writing Journal per directory), or raise."""
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
