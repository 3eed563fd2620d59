"""Durable store-and-forward outbox for batches on their way to the cloud.

The outbox is one SQLite file in ``data_dir`` (WAL journal,
``synchronous=FULL``; its schema and healing in
:mod:`connectors.uplink.outbox_store`). A sealed batch is committed before :meth:`Outbox.put`
returns and deleted only by :meth:`Outbox.ack`, after the cloud acknowledged
it, so a batch survives a crash (``kill -9``) of the edge at any point between
the two.

Policies:

- **Order**: :meth:`Outbox.next` hands out batches by priority (0, alarms,
  first), then by age (``created_at``, then insertion order).
- **Idempotency**: a ``batch_id`` already waiting is not stored twice; a
  ``batch_id`` the cloud rejected is not queued again.
- **Byte cap** (``OutboxSettings.max_bytes``, counted on the serialized
  batches): when a new batch does not fit, batches are dropped *oldest first
  from the lowest priority class* (highest number) until it fits. Only
  classes of the new batch's priority or lower are candidates, and the new
  batch counts as the newest of its class: a batch never displaces a more
  urgent one, and when the candidates older than it cannot free enough room,
  the new batch itself is the one dropped (and nothing else is). Every drop is
  logged and counted in ``dropped_full``. A single batch larger than
  ``max_bytes`` is refused with ``ValueError``.
- **TTL**: :meth:`Outbox.expire` drops batches older than ``ttl``, counted
  in ``expired``.
- **Rejected batches** (the cloud answered ``REJECTED``) move to a
  ``rejected`` table with the cloud's reason, kept for inspection up to
  ``rejected_max_bytes`` (oldest forgotten first) and never sent again.

Counters live in a table of the same file, so they survive restarts.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from connectors.common.stores import corruption, sqlite_problem
from connectors.uplink.batch import OutboxStats, Rejected, Sealed, check_aware, from_us, to_us
from connectors.uplink.outbox_store import COLUMNS, heal, open_outbox, rollback

__all__ = ["Outbox", "OutboxSettings"]

logger = logging.getLogger("edgesieve.outbox")


@dataclass(frozen=True)
class OutboxSettings:
    """Size and age limits of the outbox.

    ``max_bytes`` caps the serialized batches waiting for the cloud (see the
    module docstring for what is dropped when it is reached); ``ttl`` is how
    long a batch may wait before :meth:`Outbox.expire` drops it;
    ``rejected_max_bytes`` caps the batches kept for inspection after the
    cloud rejected them.
    """

    max_bytes: int = 256 * 1024 * 1024
    ttl: timedelta = timedelta(days=7)
    rejected_max_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        size = self.max_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            msg = (
                f"OutboxSettings.max_bytes must be a positive int (bytes); got {size!r}. "
                "Hint: the default is 256 MiB, 256 * 1024 * 1024"
            )
            raise ValueError(msg)
        if not isinstance(self.ttl, timedelta) or self.ttl <= timedelta(0):
            msg = (
                f"OutboxSettings.ttl must be a positive datetime.timedelta; got {self.ttl!r}. "
                "Hint: timedelta(days=7)"
            )
            raise ValueError(msg)
        kept = self.rejected_max_bytes
        if isinstance(kept, bool) or not isinstance(kept, int) or kept < 0:
            msg = (
                f"OutboxSettings.rejected_max_bytes must be a non-negative int (bytes); got "
                f"{kept!r}. Hint: 0 keeps no rejected batches for inspection"
            )
            raise ValueError(msg)


_T = TypeVar("_T")


class Outbox:
    """The SQLite outbox at ``path`` (created with missing parent directories).

    Thread-safe: one connection guarded by a lock. Several processes may open
    the same file (SQLite locking keeps it consistent), but one sender per
    outbox is the intended use. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, path: Path, settings: OutboxSettings = OutboxSettings()) -> None:
        if not isinstance(settings, OutboxSettings):
            msg = f"Outbox: settings must be an OutboxSettings; got {type(settings).__name__}"
            raise TypeError(msg)
        path = Path(path)
        if path.is_dir():
            msg = (
                f"Outbox: {str(path)!r} is a directory; give the path of the outbox file, "
                "e.g. data_dir / 'outbox.sqlite'"
            )
            raise ValueError(msg)
        self.path = path
        self.settings = settings
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            problem = sqlite_problem(path)
            if problem is None:
                try:
                    self._db = open_outbox(self.path)
                except sqlite3.DatabaseError as exc:
                    problem = corruption(exc)
                    if problem is None:
                        raise
            if problem is not None:
                self._heal(problem)
        except (sqlite3.Error, OSError) as exc:
            self._drop_connection()
            msg = (
                f"Outbox: cannot open {str(path)!r}: {type(exc).__name__}: {exc}. Hint: the "
                "path must be a writable SQLite outbox file (or not exist yet) on a disk with "
                "free space"
            )
            raise RuntimeError(msg) from exc

    def _drop_connection(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def _heal(self, problem: str) -> None:
        """Replace the corrupt file by a fresh outbox holding its readable batches."""
        self._drop_connection()
        self._db = heal(self.path, problem)

    def _guarded(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work(db)`` (lock held); on corruption heal the outbox once and run it again."""
        db = self._conn()
        try:
            return work(db)
        except sqlite3.DatabaseError as exc:
            problem = corruption(exc)
            if problem is None:
                raise
        try:
            self._heal(problem)
        except (sqlite3.Error, OSError) as exc:
            self._drop_connection()
            msg = (
                f"Outbox {str(self.path)!r} is corrupt ({problem}) and could not be replaced by "
                f"a fresh one: {type(exc).__name__}: {exc}. Hint: check that data_dir is "
                "writable, then restart the edge"
            )
            raise RuntimeError(msg) from exc
        return work(self._conn())

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._db is None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            msg = f"Outbox {str(self.path)!r} is closed; open a new Outbox to use it again"
            raise RuntimeError(msg)
        return self._db

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each batch stored by :meth:`put` (from the putting thread)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def put(self, sealed: Sealed) -> bool:
        """Store ``sealed`` durably; return whether it was stored.

        Returns False, storing nothing, when the ``batch_id`` is already
        waiting or was rejected by the cloud, and when the outbox is full and
        the byte-cap policy drops the new batch itself. Raises ``ValueError``
        for a batch larger than ``max_bytes``.
        """
        if not isinstance(sealed, Sealed):
            msg = f"Outbox.put expects a Sealed batch; got {type(sealed).__name__}"
            raise TypeError(msg)
        payload = bytes(sealed.payload)
        size = len(payload)
        cap = self.settings.max_bytes
        if size > cap:
            msg = (
                f"Outbox {str(self.path)!r}: batch {sealed.batch_id!r} (stream "
                f"{sealed.stream!r}, {sealed.rows} rows) is {size} bytes, larger than the "
                f"whole outbox (max_bytes={cap}); it is not stored. Hint: raise "
                "OutboxSettings.max_bytes or seal smaller batches (CloudSinkSettings.max_rows)"
            )
            raise ValueError(msg)
        with self._lock:
            stored, evicted, dropped = self._guarded(
                lambda db: self._put_locked(db, sealed, payload, size, cap)
            )
            listeners = list(self._listeners)
        if not stored:
            return False
        if evicted:
            freed = sum(v[3] for v in evicted)
            streams = sorted({f"{v[1]}/p{v[2]}" for v in evicted})
            logger.warning(
                "outbox %s is full (max_bytes=%d): dropped the %d oldest batch(es) of the "
                "lowest priority (%s; %d bytes) to store batch %s (stream %r, priority %d, "
                "%d bytes); dropped_full is now %d. Hint: raise OutboxSettings.max_bytes or "
                "check why the cloud is not acknowledging",
                self.path,
                cap,
                len(evicted),
                ", ".join(streams),
                freed,
                sealed.batch_id,
                sealed.stream,
                sealed.priority,
                size,
                dropped,
            )
        for listener in listeners:
            try:
                listener()
            except Exception:
                logger.exception("outbox %s: a put listener raised; ignored", self.path)
        return True

    def _put_locked(
        self, db: sqlite3.Connection, sealed: Sealed, payload: bytes, size: int, cap: int
    ) -> tuple[bool, list[tuple[str, str, int, int]], int]:
        """:meth:`put`'s transaction: (stored, evicted batches, dropped_full)."""
        evicted: list[tuple[str, str, int, int]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute(
                "SELECT 1 FROM batches WHERE batch_id = ?", (sealed.batch_id,)
            ).fetchone():
                db.execute("ROLLBACK")
                logger.debug("outbox %s: batch %s already queued", self.path, sealed.batch_id)
                return False, [], 0
            if db.execute(
                "SELECT 1 FROM rejected WHERE batch_id = ?", (sealed.batch_id,)
            ).fetchone():
                db.execute("ROLLBACK")
                logger.warning(
                    "outbox %s: batch %s (stream %r) was rejected by the cloud before; it "
                    "is not queued again (see the rejected table for the reason)",
                    self.path,
                    sealed.batch_id,
                    sealed.stream,
                )
                return False, [], 0
            total = db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0]
            if total + size > cap:
                victims = self._victims(db, sealed.priority, total + size - cap)
                if victims is None:
                    db.execute("UPDATE counters SET value = value + 1 WHERE name = 'dropped_full'")
                    dropped = self._counter(db, "dropped_full")
                    db.execute("COMMIT")
                    logger.error(
                        "outbox %s is full (%d of %d bytes) with batches of priority %d or "
                        "more urgent: dropped the NEW batch %s (stream %r, priority %d, %d "
                        "rows, %d bytes); dropped_full is now %d. Hint: raise "
                        "OutboxSettings.max_bytes or check why the cloud is not "
                        "acknowledging",
                        self.path,
                        total,
                        cap,
                        sealed.priority,
                        sealed.batch_id,
                        sealed.stream,
                        sealed.priority,
                        sealed.rows,
                        size,
                        dropped,
                    )
                    return False, [], 0
                evicted = victims
                db.executemany("DELETE FROM batches WHERE batch_id = ?", [(v[0],) for v in evicted])
                db.execute(
                    "UPDATE counters SET value = value + ? WHERE name = 'dropped_full'",
                    (len(evicted),),
                )
            db.execute(
                "INSERT INTO batches (batch_id, stream, priority, rows, raw_bytes, "
                "created_at_us, size, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sealed.batch_id,
                    sealed.stream,
                    sealed.priority,
                    sealed.rows,
                    sealed.raw_bytes,
                    to_us(sealed.created_at),
                    size,
                    payload,
                ),
            )
            dropped = self._counter(db, "dropped_full")
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        return True, evicted, dropped

    @staticmethod
    def _victims(
        db: sqlite3.Connection, priority: int, need: int
    ) -> list[tuple[str, str, int, int]] | None:
        """Batches to evict to free ``need`` bytes, or None to drop the new batch instead."""
        victims: list[tuple[str, str, int, int]] = []
        freed = 0
        rows = db.execute(
            "SELECT batch_id, stream, priority, size FROM batches WHERE priority >= ? "
            "ORDER BY priority DESC, created_at_us ASC, seq ASC",
            (priority,),
        )
        for row in rows:
            victims.append(row)
            freed += row[3]
            if freed >= need:
                return victims
        return None

    @staticmethod
    def _counter(db: sqlite3.Connection, name: str) -> int:
        return int(db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])

    def next(self, limit: int, *, exclude: Iterable[str] = frozenset()) -> list[Sealed]:
        """Up to ``limit`` waiting batches, most urgent first, then oldest first.

        Batches whose id is in ``exclude`` (e.g. already in flight) are skipped.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            msg = f"Outbox.next: limit must be a non-negative int; got {limit!r}"
            raise ValueError(msg)
        skip = set(exclude)
        if limit == 0:
            return []
        with self._lock:
            return self._guarded(lambda db: self._next_locked(db, limit, skip))

    def _next_locked(self, db: sqlite3.Connection, limit: int, skip: set[str]) -> list[Sealed]:
        ids = [
            row[0]
            for row in db.execute(
                "SELECT batch_id FROM batches ORDER BY priority, created_at_us, seq LIMIT ?",
                (limit + len(skip),),
            )
            if row[0] not in skip
        ][:limit]
        out: list[Sealed] = []
        for batch_id in ids:
            row = db.execute(
                f"SELECT {COLUMNS}, payload FROM batches WHERE batch_id = ?", (batch_id,)
            ).fetchone()
            if row is not None:
                out.append(Sealed(row[0], row[1], row[2], row[3], row[4], from_us(row[5]), row[6]))
        return out

    def ack(self, batch_id: str) -> None:
        """Delete a batch the cloud acknowledged (unknown ids are ignored)."""
        with self._lock:
            self._guarded(
                lambda db: db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            )

    def reject(self, batch_id: str, detail: str, now: datetime | None = None) -> bool:
        """Move a batch the cloud rejected to the ``rejected`` table; False if unknown.

        The rejected table keeps the newest rejections within
        ``rejected_max_bytes``; a rejected ``batch_id`` is never queued again.
        """
        when = check_aware("Outbox.reject: now", now) if now is not None else datetime.now(UTC)
        with self._lock:
            return self._guarded(lambda db: self._reject_locked(db, batch_id, detail, when))

    def _reject_locked(
        self, db: sqlite3.Connection, batch_id: str, detail: str, when: datetime
    ) -> bool:
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                f"INSERT OR REPLACE INTO rejected ({COLUMNS}, rejected_at_us, detail, size, "
                f"payload) SELECT {COLUMNS}, ?, ?, size, payload FROM batches "
                "WHERE batch_id = ?",
                (to_us(when), str(detail), batch_id),
            )
            if cur.rowcount == 0:
                db.execute("ROLLBACK")
                return False
            db.execute("DELETE FROM batches WHERE batch_id = ?", (batch_id,))
            db.execute("UPDATE counters SET value = value + 1 WHERE name = 'rejected'")
            self._trim_rejected(db)
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        return True

    def _trim_rejected(self, db: sqlite3.Connection) -> None:
        cap = self.settings.rejected_max_bytes
        total = db.execute("SELECT COALESCE(SUM(size), 0) FROM rejected").fetchone()[0]
        if total <= cap:
            return
        doomed: list[tuple[str]] = []
        for batch_id, size in db.execute("SELECT batch_id, size FROM rejected ORDER BY seq"):
            if total <= cap:
                break
            doomed.append((batch_id,))
            total -= size
        db.executemany("DELETE FROM rejected WHERE batch_id = ?", doomed)

    def rejected(self) -> list[Rejected]:
        """The rejected batches still kept, oldest rejection first."""
        query = f"SELECT {COLUMNS}, rejected_at_us, detail, payload FROM rejected ORDER BY seq"
        with self._lock:
            rows = self._guarded(lambda db: db.execute(query).fetchall())
        return [
            Rejected(r[0], r[1], r[2], r[3], r[4], from_us(r[5]), from_us(r[6]), r[7], r[8])
            for r in rows
        ]

    def expire(self, now: datetime | None = None) -> int:
        """Drop batches created more than ``ttl`` before ``now``; return how many."""
        when = check_aware("Outbox.expire: now", now) if now is not None else datetime.now(UTC)
        cutoff = to_us(when - self.settings.ttl)
        with self._lock:
            per_stream = self._guarded(lambda db: self._expire_locked(db, cutoff))
        count = sum(row[1] for row in per_stream)
        if count:
            logger.warning(
                "outbox %s: %d batch(es) waited longer than the TTL (%s) for the cloud and "
                "were dropped (%s). Hint: check the uplink errors above, or raise "
                "OutboxSettings.ttl",
                self.path,
                count,
                self.settings.ttl,
                ", ".join(f"{s}: {n} batches, {b} bytes" for s, n, b in per_stream),
            )
        return count

    @staticmethod
    def _expire_locked(db: sqlite3.Connection, cutoff: int) -> list[tuple[str, int, int]]:
        db.execute("BEGIN IMMEDIATE")
        try:
            per_stream = db.execute(
                "SELECT stream, COUNT(*), SUM(size) FROM batches WHERE created_at_us < ? "
                "GROUP BY stream ORDER BY stream",
                (cutoff,),
            ).fetchall()
            count = sum(row[1] for row in per_stream)
            if count:
                db.execute("DELETE FROM batches WHERE created_at_us < ?", (cutoff,))
                db.execute("UPDATE counters SET value = value + ? WHERE name = 'expired'", (count,))
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        return per_stream

    def stats(self) -> OutboxStats:
        """Depth and drop counters (counters persist across restarts)."""
        with self._lock:
            (batches, size, oldest), counters = self._guarded(self._stats_locked)
        age = None
        if oldest is not None:
            age = max(0.0, (datetime.now(UTC) - from_us(oldest)).total_seconds())
        return OutboxStats(
            batches=batches,
            bytes=size,
            oldest_age_s=age,
            dropped_full=counters.get("dropped_full", 0),
            expired=counters.get("expired", 0),
            rejected=counters.get("rejected", 0),
        )

    @staticmethod
    def _stats_locked(db: sqlite3.Connection) -> tuple[tuple[int, int, int | None], dict[str, int]]:
        depth = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created_at_us) FROM batches"
        ).fetchone()
        return depth, dict(db.execute("SELECT name, value FROM counters").fetchall())

    def close(self) -> None:
        """Close the database (idempotent); later calls raise ``RuntimeError``."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
