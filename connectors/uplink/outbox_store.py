"""The outbox's SQLite file: its schema, opening it, and healing a corrupt one.

One file (WAL journal, ``synchronous=FULL``) with the tables ``batches``
(waiting for the cloud), ``rejected`` (kept for inspection) and
``counters``. ``PRAGMA user_version`` holds :data:`SCHEMA_VERSION`; a newer
one is refused. A corrupt file is moved aside and the readable rows of its
tables are copied into a fresh one (:func:`heal`).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from connectors.common.stores import move_aside, report, salvage_rows

__all__ = ["COLUMNS", "SCHEMA_VERSION", "heal", "open_outbox", "rollback"]

logger = logging.getLogger("edgesieve.outbox")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    priority INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL,
    created_at_us INTEGER NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_order ON batches (priority, created_at_us, seq, size);
CREATE INDEX IF NOT EXISTS batches_age ON batches (created_at_us);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    priority INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    raw_bytes INTEGER NOT NULL,
    created_at_us INTEGER NOT NULL,
    rejected_at_us INTEGER NOT NULL,
    detail TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value)
VALUES ('dropped_full', 0), ('expired', 0), ('rejected', 0);
"""


COLUMNS = "batch_id, stream, priority, rows, raw_bytes, created_at_us"
"""A batch's columns besides its size and payload."""
_SALVAGED = (*COLUMNS.split(", "), "size", "payload")
"""The columns copied from a corrupt outbox (after ``seq``), waiting and rejected batches."""


def rollback(db: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any; a failing rollback (a corrupt file) is ignored."""
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _intact(row: tuple[object, ...]) -> bool:
    """Whether a salvaged ``(seq, *_SALVAGED, ...)`` row has the types and size it must have."""
    seq, batch_id, stream, *numbers = row[:7]
    size, payload = row[7], row[8]
    return (
        isinstance(batch_id, str)
        and isinstance(stream, str)
        and all(isinstance(n, int) for n in (seq, *numbers, size))
        and isinstance(payload, bytes)
        and len(payload) == size
    )


def open_outbox(path: Path) -> sqlite3.Connection:
    """The outbox file at ``path``, created or brought to the current schema."""
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        _prepare(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        msg = (
            f"outbox schema version {version} is newer than this edgesieve supports "
            f"({SCHEMA_VERSION}). Hint: run the edgesieve version that wrote it"
        )
        raise sqlite3.DatabaseError(msg)
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        logger.warning(
            "outbox %s: SQLite refused WAL journaling (journal_mode=%s); commits are still "
            "durable but slower",
            path,
            mode,
        )
    db.execute("PRAGMA synchronous=FULL")
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def heal(path: Path, problem: str) -> sqlite3.Connection:
    """Move the corrupt file aside, open a fresh outbox, copy the readable batches into it."""
    moved = move_aside(path)
    db = open_outbox(path)
    try:
        _salvage(db, path, moved, problem)
    except BaseException:
        db.close()
        raise
    return db


def _salvage(db: sqlite3.Connection, path: Path, moved: Path, problem: str) -> None:
    waiting, whole = salvage_rows(moved, "batches", _SALVAGED)
    rejected, whole_rejected = salvage_rows(
        moved, "rejected", (*_SALVAGED, "rejected_at_us", "detail")
    )
    counters, _ = salvage_rows(moved, "counters", ("name", "value"))
    waiting = [r for r in waiting if _intact(r)]
    rejected = [
        r for r in rejected if _intact(r) and isinstance(r[9], int) and isinstance(r[10], str)
    ]
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany(
            f"INSERT OR IGNORE INTO batches (seq, {', '.join(_SALVAGED)}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            waiting,
        )
        db.executemany(
            f"INSERT OR IGNORE INTO rejected (seq, {', '.join(_SALVAGED)}, rejected_at_us, "
            "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rejected,
        )
        db.executemany(
            "UPDATE counters SET value = ? WHERE name = ?",
            [(v, n) for _, n, v in counters if isinstance(v, int) and isinstance(n, str)],
        )
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise
    rows = sum(int(r[4]) for r in waiting)
    lost = (
        "every row was readable"
        if whole and whole_rejected
        else (
            "the batches SQLite could not read are lost (their rows were sealed but are not sent)"
        )
    )
    report(
        "outbox",
        path,
        moved,
        problem,
        f"salvaged {len(waiting)} waiting batch(es) ({rows} rows) and {len(rejected)} "
        f"rejected one(s); {lost}",
    )
