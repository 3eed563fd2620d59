"""The journal's read side: one partition, any process (SQLite WAL readers never block)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from connectors.common.stores import corruption
from connectors.devices.journal.format import (
    _connect,
    flag_damage,
    from_us,
    journal_partitions,
    part_path,
)
from operators.records import RawMessage


class _Damaged(sqlite3.DatabaseError):
    """The partition file is corrupt (the message says how); the writer was asked to replace it."""


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
        self._inode = self.path.stat().st_ino
        self._db: sqlite3.Connection | None = _connect(self.path, create=False)

    def _replaced(self) -> bool:
        """Whether the writer replaced the partition file (a corrupt one, moved aside)."""
        try:
            inode = self.path.stat().st_ino
        except OSError:
            return False  # between the move and the fresh file
        return inode != self._inode

    def _reopen(self) -> None:
        """Read the file now at the path (the writer's fresh copy) from here on."""
        if self._db is not None:
            self._db.close()
        self._inode = self.path.stat().st_ino
        self._db = _connect(self.path, create=False)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            msg = f"JournalReader {self.path} is closed; hint: open a new JournalReader"
            raise RuntimeError(msg)
        return self._db

    def read(
        self, after: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, RawMessage]]:
        """Up to ``limit`` messages with offsets > ``after``, ascending.

        With ``max_bytes`` the read also stops once the payloads read add up
        to it (at least one message is returned), so what a read holds in
        memory is bounded by bytes as well as by count.

        When the partition file is found corrupt, the writer is asked to
        replace it (:func:`flag_damage`) and nothing is returned until it has;
        then reading goes on from the fresh file, after ``after``.
        """
        with self._lock:
            if self._db is not None and self._replaced():  # or it goes on reading the moved file
                self._reopen()
            db = self._conn()
            try:
                cursor = db.execute(
                    "SELECT seq, device, channel, transport, received_at_us, payload FROM messages"
                    " WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit),
                )
                if max_bytes is None:
                    rows = cursor.fetchall()
                else:
                    rows = []
                    held = 0
                    for row in cursor:
                        rows.append(row)
                        held += len(row[5])
                        if held >= max_bytes:
                            break
                    cursor.close()
            except sqlite3.DatabaseError as exc:
                problem = corruption(exc)
                if problem is None:
                    raise
                if self._replaced():
                    self._reopen()
                else:
                    self.report_damage(problem)
                return []
        return [
            (int(seq), RawMessage(device, channel, transport, from_us(us), bytes(payload)))
            for seq, device, channel, transport, us, payload in rows
        ]

    def report_damage(self, problem: str) -> None:
        """Ask the journal's writer to replace this partition, found corrupt (``problem``)."""
        flag_damage(self.path, problem, self._inode)

    def _fetch(self, sql: str, params: tuple[object, ...] = ()) -> tuple[object, ...] | None:
        """One row, None if none; corruption reported to the writer raises :class:`_Damaged`."""
        with self._lock:
            try:
                return self._conn().execute(sql, params).fetchone()
            except sqlite3.DatabaseError as exc:
                problem = corruption(exc)
                if problem is None:
                    raise
                if self._replaced():
                    self._reopen()
                else:
                    self.report_damage(problem)
                raise _Damaged(problem) from exc

    def last_offset(self) -> int:
        """Highest committed offset, -1 when none yet (or while a corrupt file is replaced)."""
        try:
            row = self._fetch("SELECT seq FROM sqlite_sequence WHERE name = 'messages'")
        except _Damaged:
            return -1
        return -1 if row is None else int(row[0])  # type: ignore[call-overload]

    def released(self, reader: str) -> int:
        """What ``reader`` released last, -1 if never.

        Raises ``sqlite3.DatabaseError`` while the file is corrupt (the writer
        was asked to replace it): a reader must not start from a guess.
        """
        row = self._fetch("SELECT released FROM readers WHERE name = ?", (reader,))
        return -1 if row is None else int(row[0])  # type: ignore[call-overload]

    def release(self, reader: str, offset: int) -> None:
        """``reader`` is done with offsets <= ``offset`` (registers it; never goes back).

        Nothing is released while the file is corrupt (the next release, on
        the replaced file, catches up).
        """
        try:
            row = self._fetch("SELECT seq FROM sqlite_sequence WHERE name = 'messages'")
        except _Damaged:
            return
        last = -1 if row is None else int(row[0])  # type: ignore[call-overload]
        if offset > last:
            msg = (
                f"journal: reader {reader!r} released offset {offset} of {self.path}, beyond "
                f"the last committed offset (got {offset}, last {last}); hint: release only "
                "offsets read()"
            )
            raise ValueError(msg)
        try:
            self._fetch(
                "INSERT INTO readers (name, released) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET released = max(released, excluded.released)",
                (reader, offset),
            )
        except _Damaged:
            return

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
