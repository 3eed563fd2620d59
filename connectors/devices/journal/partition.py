"""One partition file as the writer holds it: schema, offsets, held bytes, dedup, inserts."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import NamedTuple

from connectors.common.stores import move_aside, report, salvage_rows, sqlite_problem, sync_dir
from connectors.devices.journal.format import (
    _COLUMNS,
    _INSERTS,
    _SCHEMA,
    DEDUP_WINDOW,
    INSERT_ROWS,
    NO_DIGEST,
    NOT_REDELIVERED,
    SCHEMA_VERSION,
    TRUNCATE_CHUNK,
    VACUUM_CHUNK,
    VACUUM_PAGES,
    WAL_LIMIT_BYTES,
    WAL_PREALLOC_BYTES,
    WAL_PREALLOC_SPARE_BYTES,
    _connect,
    digest_of,
    logger,
    part_path,
)


class Truncation(NamedTuple):
    """What the writer's next truncation of a partition deletes (:func:`plan_truncation`)."""

    after: int
    """The partition's last deleted offset when the plan was made."""
    upto: int
    """Delete up to this offset (the writer does it TRUNCATE_CHUNK rows at a time)."""
    digests: list[tuple[int, bytes]]
    """The digests of the unkeyed rows among them that a redelivery may still repeat."""


def release_floor(db: sqlite3.Connection) -> int | None:
    """The offset every registered reader released, None when no reader is registered."""
    count, low = db.execute("SELECT count(*), min(released) FROM readers").fetchone()
    return None if count == 0 else int(low)


def plan_truncation(db: sqlite3.Connection, truncated: int, last: int) -> Truncation | None:
    """The next chunk of released rows to delete, read on ``db`` (any connection to the file).

    ``truncated`` and ``last`` are the partition's last deleted and last
    written offsets. Unkeyed rows of transports that redeliver (MQTT) within
    the last DEDUP_WINDOW offsets are read one by one for their digests, so
    the writer's checkpointer does this, not the writer.
    """
    floor = release_floor(db)
    if floor is None or floor <= truncated:
        return None
    upto = floor
    rows = db.execute(
        "SELECT seq, device, channel, payload FROM messages WHERE seq > ? AND seq <= ?"
        f" AND digest = ? AND transport NOT IN {NOT_REDELIVERED!r}",
        (max(truncated, last - DEDUP_WINDOW), upto, NO_DIGEST),
    ).fetchall()
    return Truncation(truncated, upto, [(q, digest_of(d, c, p)) for q, d, c, p in rows])


def _insert_recent(db: sqlite3.Connection, digests: list[tuple[int, bytes]]) -> None:
    """Keep ``digests`` in ``recent``: one statement per DEDUP_WINDOW rows, not a step per row.

    A truncation keeps at most DEDUP_WINDOW digests (8192 parameters, within
    SQLite's 32766), so this is one statement.
    """
    for start in range(0, len(digests), DEDUP_WINDOW):
        chunk = digests[start : start + DEDUP_WINDOW]
        values = ", ".join(["(?, ?)"] * len(chunk))
        db.execute(
            f"INSERT OR REPLACE INTO recent (seq, digest) VALUES {values}",
            [value for pair in chunk for value in pair],
        )


class _Partition:
    """The writer's connection to one partition file and what it knows about it."""

    def __init__(
        self,
        root: Path,
        index: int,
        partitions: int,
        sync: str,
        lock: threading.Condition,
        *,
        damage: str | None = None,
        last: int | None = None,
    ) -> None:
        """Open (or create) the partition file; a corrupt one is replaced (see :func:`_heal`).

        ``damage`` says the file is corrupt (found at run time) and ``last``
        is the highest offset the writer used; without ``damage`` the file
        is checked with ``PRAGMA quick_check`` first.
        """
        self.index = index
        self.lock = lock
        self.sync = sync
        self.path = part_path(root, index)
        problem = damage if damage is not None else sqlite_problem(self.path)
        if problem is not None:
            _rebuild(self.path, move_aside(self.path), problem, last, partitions, sync)
        new = not self.path.exists()
        self.db = _connect(self.path, create=True)
        try:
            _prepare(self.db, self.path, new, partitions, sync)
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
        self.truncated = self.last if first is None else int(first) - 1
        self.oldest_us: int | None = None
        self.load_oldest()
        preallocate_wal(self.path)

    def load_oldest(self) -> None:
        row = self.db.execute("SELECT received_at_us FROM messages ORDER BY seq LIMIT 1").fetchone()
        self.oldest_us = None if row is None else int(row[0])

    def truncate_chunk(
        self, plan: Truncation | None
    ) -> tuple[int, int, dict[str, int], Truncation | None]:
        """Delete the next TRUNCATE_CHUNK released rows ``plan`` names, in one transaction.

        Nothing when there is no plan or what it names is deleted already. A
        plan made before earlier chunks were deleted still holds for the rest:
        the rows it read digests of include every unkeyed MQTT row of the dedup
        window from its ``after`` on, and the window only moves forward. The
        readers' floor is read again in the transaction, so a reader
        registered since the plan keeps what it has not released. Returns the
        rows and bytes deleted, the bytes per device, and what is left of the
        plan (None once it is done).

        Each statement step gives the GIL up and waits to take it back, behind
        the device servers' thread under load: this takes a few steps whatever
        the row count (the rows read one by one were read for the plan).
        """
        if plan is None or plan.upto <= self.truncated or plan.after > self.truncated:
            return 0, 0, {}, None
        db = self.db
        window = self.last - DEDUP_WINDOW
        # Deleting released rows needs no sync of its own: after a power loss the rows are
        # back (and deleted again), and the next message commit syncs the WAL up to here.
        relaxed = self.sync != "normal"
        if relaxed:
            db.execute("PRAGMA synchronous = NORMAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            floor = release_floor(db)
            if floor is None or floor <= self.truncated:
                db.execute("ROLLBACK")
                return 0, 0, {}, None
            upto = min(plan.upto, floor, self.truncated + TRUNCATE_CHUNK)
            count, by_device = db.execute(
                "SELECT coalesce(sum(n), 0), json_group_object(device, bytes) FROM (SELECT"
                " device, count(*) AS n, sum(size) AS bytes FROM messages"
                " WHERE seq > ? AND seq <= ? GROUP BY device)",
                (self.truncated, upto),
            ).fetchone()
            db.execute(  # keyed rows carry their digest
                "INSERT OR REPLACE INTO recent (seq, digest) SELECT seq, digest FROM messages"
                " WHERE seq > ? AND seq <= ? AND digest != ?",
                (max(self.truncated, window), upto, NO_DIGEST),
            )
            _insert_recent(db, [(q, d) for q, d in plan.digests if window < q <= upto])
            db.execute("DELETE FROM messages WHERE seq > ? AND seq <= ?", (self.truncated, upto))
            db.execute("DELETE FROM recent WHERE seq <= ?", (window,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            if relaxed:
                db.execute(f"PRAGMA synchronous = {self.sync.upper()}")
        row = db.execute("SELECT received_at_us FROM messages ORDER BY seq LIMIT 1").fetchone()
        count = int(count)
        sizes: dict[str, int] = json.loads(by_device)
        size = sum(sizes.values())
        with self.lock:
            self.truncated = upto
            self.count -= count
            self.bytes -= size
            self.oldest_us = None if row is None else int(row[0])
        return count, size, sizes, (plan if upto < min(plan.upto, floor) else None)

    def device_bytes(self) -> dict[str, int]:
        """Payload bytes held per device (a scan: at open only)."""
        rows = self.db.execute("SELECT device, sum(size) FROM messages GROUP BY device")
        return {device: int(size) for device, size in rows}

    def vacuum_chunk(self) -> None:
        """Give up to VACUUM_CHUNK free pages back to the file system when many are free."""
        if self.db.execute("PRAGMA freelist_count").fetchone()[0] > VACUUM_PAGES:
            # execute() steps a statement without result columns once (one page);
            # executescript() runs it to completion.
            self.db.executescript(f"PRAGMA incremental_vacuum({VACUUM_CHUNK});")

    def find(self, digest: bytes) -> int | None:
        """The offset of a recent message with this digest, held or already truncated."""
        row = self.db.execute(
            "SELECT max(seq) FROM (SELECT seq FROM messages WHERE digest = ? AND seq > ?"
            " UNION ALL SELECT seq FROM recent WHERE digest = ? AND seq > ?)",
            (digest, self.last - DEDUP_WINDOW, digest, self.last - DEDUP_WINDOW),
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def find_redelivery(self, device: str, channel: str, payload: bytes) -> int | None:
        """The offset of a recent unkeyed message with this device, channel and payload.

        Only messages of transports that redeliver count (not ``NOT_REDELIVERED``'s).
        Rows written without a digest are compared by content over the last
        DEDUP_WINDOW offsets (a scan, only for redeliveries); rows of older
        journals, which carry the unkeyed digest, are found by it.
        """
        row = self.db.execute(
            "SELECT seq FROM messages WHERE seq > ? AND +digest = ? AND device = ?"
            " AND channel = ? AND payload = ?"
            f" AND transport NOT IN {NOT_REDELIVERED!r} ORDER BY seq DESC LIMIT 1",
            (self.last - DEDUP_WINDOW, NO_DIGEST, device, channel, payload),
        ).fetchone()
        if row is not None:
            return int(row[0])
        return self.find(digest_of(device, channel, payload))


def preallocate_wal(path: Path) -> bool:
    """Extend the WAL file of ``path`` with zeros to WAL_PREALLOC_BYTES (see there); True if done.

    For the writer, before it commits: SQLite's frames in the file are left
    as they are (only zeros are added past its end). Not done when less than
    WAL_PREALLOC_SPARE_BYTES would stay free on the disk; a write that fails
    (the disk filled meanwhile) cuts the file back to its size and logs why.
    """
    wal = path.with_name(path.name + "-wal")
    fd = None
    try:
        size = wal.stat().st_size
        if size >= WAL_PREALLOC_BYTES:
            return True
        needed = WAL_PREALLOC_BYTES - size + WAL_PREALLOC_SPARE_BYTES
        if shutil.disk_usage(path.parent).free < needed:
            return False
        fd = os.open(wal, os.O_WRONLY)
        try:
            zeros = bytes(1 << 20)
            end = size
            while end < WAL_PREALLOC_BYTES:
                end += os.pwrite(fd, zeros[: WAL_PREALLOC_BYTES - end], end)
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    except OSError as exc:
        logger.info(
            "journal %s: WAL not preallocated (%s: %s); SQLite grows it as it writes",
            wal,
            type(exc).__name__,
            exc,
        )
        return False
    finally:
        if fd is not None:
            os.close(fd)
    return True


def _prepare(db: sqlite3.Connection, path: Path, new: bool, partitions: int, sync: str) -> None:
    """Check the schema version, set the pragmas, create the tables (a new file: auto-vacuum)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        msg = (
            f"journal: {path} has schema version {version}, newer than this edgesieve "
            f"supports (got {version}, know {SCHEMA_VERSION}); hint: run the edgesieve "
            "version that wrote it"
        )
        raise ValueError(msg)
    if new:
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        logger.warning("journal %s: SQLite refused WAL (journal_mode=%s)", path, mode)
    db.execute(f"PRAGMA synchronous = {sync.upper()}")
    # No checkpoint inside a commit (SQLite's default runs one every 1000 WAL pages, in
    # the COMMIT that crosses it, with a sync of the file): the journal's checkpointer
    # runs them from a thread of its own (see writer.py).
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
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


def _rebuild(
    path: Path, moved: Path, problem: str, last: int | None, partitions: int, sync: str
) -> None:
    """Build the fresh partition, with what is readable of ``moved``, and put it at ``path``.

    Built under a temporary name and renamed into place whole, so a reader
    never opens a fresh file before its salvaged rows and released offsets
    are in it (it would start from a guess).
    """
    temp = path.with_name(path.name + ".fresh")
    for suffix in ("", "-wal", "-shm"):
        temp.with_name(temp.name + suffix).unlink(missing_ok=True)
    db = _connect(temp, create=True)
    try:
        _prepare(db, temp, True, partitions, sync)
        _heal(db, path, moved, problem, last)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    for suffix in ("-wal", "-shm"):
        temp.with_name(temp.name + suffix).unlink(missing_ok=True)
    os.replace(temp, path)
    sync_dir(path.parent)


SEQUENCE_GAP = 1 << 32
"""How far past the highest known offset a salvaged partition numbers on when its old
sequence (the last offset used) is unreadable, so no offset a reader may hold is reused."""


def _heal(db: sqlite3.Connection, path: Path, moved: Path, problem: str, last: int | None) -> None:
    """Copy what is readable of the moved-aside ``moved`` into the fresh partition ``db``.

    Messages keep their offsets, so a reader goes on after the offset it
    holds and gets each salvaged message once; readers' released offsets,
    the dedup digests and the sequence come along. The next offset is above
    every offset the old file used (``last``, its sequence, or, when neither
    is known, the highest one found plus :data:`SEQUENCE_GAP`).
    """
    messages, whole = salvage_rows(
        moved,
        "messages",
        ("device", "channel", "transport", "received_at_us", "payload", "size", "digest"),
    )
    messages = [m for m in messages if _intact(m)]
    readers, _ = salvage_rows(moved, "readers", ("name", "released"))
    readers = [(n, r) for _, n, r in readers if isinstance(n, str) and isinstance(r, int)]
    recent, _ = salvage_rows(moved, "recent", ("digest",))
    recent = [(q, d) for q, d in recent if isinstance(d, bytes)]
    sequence, _ = salvage_rows(moved, "sqlite_sequence", ("name", "seq"))
    known = [int(q) for _, n, q in sequence if n == "messages" and isinstance(q, int)]
    if last is None and known:
        last = known[0]
    highest = max(
        [m[0] for m in messages] + [r for _, r in readers] + [q for q, _ in recent] + [-1]
    )
    top = max(last, highest) if last is not None else highest + SEQUENCE_GAP
    db.execute("BEGIN IMMEDIATE")
    try:
        for start in range(0, len(messages), INSERT_ROWS):
            rows = messages[start : start + INSERT_ROWS]
            _insert(db, [v for m in rows for v in m])
        db.executemany("INSERT OR REPLACE INTO readers (name, released) VALUES (?, ?)", readers)
        db.executemany("INSERT OR REPLACE INTO recent (seq, digest) VALUES (?, ?)", recent)
        if top >= 0:
            db.execute("DELETE FROM sqlite_sequence WHERE name = 'messages'")
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)", (top,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    floor = min((r for _, r in readers), default=None)
    if messages:
        first = messages[0][0] if floor is None else floor + 1
        held = sum(1 for m in messages if m[0] >= first)
        span = f"offsets {messages[0][0]}..{messages[-1][0]}"
    else:
        first, held, span = (None if floor is None else floor + 1), 0, "none"
    if whole:
        lost = "every message was readable"
    elif first is None or last is None:
        lost = "an unknown number of accepted messages could not be read and are lost"
    else:
        lost = (
            f"{max(0, last - first + 1 - held)} accepted message(s) up to offset {last} could "
            "not be read and are lost"
        )
    report(
        "journal",
        path,
        moved,
        problem,
        f"salvaged {len(messages)} message(s) ({span}) under their offsets, so the flow reads "
        f"each once; {lost}; new messages are numbered from {top + 1}",
    )


def _intact(row: tuple[object, ...]) -> bool:
    """Whether a salvaged message row has the types and size it must have."""
    seq, device, channel, transport, received_us, payload, size, digest = row
    return (
        isinstance(seq, int)
        and isinstance(device, str)
        and isinstance(channel, str)
        and isinstance(transport, str)
        and isinstance(received_us, int)
        and isinstance(payload, bytes)
        and size == len(payload)
        and isinstance(digest, bytes)
    )


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
