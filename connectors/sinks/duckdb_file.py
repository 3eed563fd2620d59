"""The edge DuckDB file: one shared connection per file and process, and copies for readers.

Every DuckDB sink partition of a process uses the same connection to a
database file (:func:`acquire`, :func:`release`; DuckDB lets one process
write a file at a time), with its bookkeeping tables under :data:`SCHEMA`.
A file found corrupt is moved aside and started afresh (:func:`heal`).
:func:`copy_database` and :class:`PeriodicCopy` give readers a consistent
copy while the edge runs. The sink itself is :mod:`connectors.sinks.duckdb`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import duckdb

from connectors.common.stores import corruption, move_aside, report

__all__ = [
    "DATABASES",
    "SCHEMA",
    "Database",
    "PeriodicCopy",
    "acquire",
    "copy_database",
    "heal",
    "quote",
    "release",
]

logger = logging.getLogger("edgesieve.duckdb")

SCHEMA = "edgesieve"
"""The schema of the sinks' bookkeeping tables and of the stored rows."""


@dataclass
class Database:
    """One open database file shared by every partition of the process."""

    path: Path
    con: duckdb.DuckDBPyConnection
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    streams: set[str] = field(default_factory=set)
    generation: int = 0
    """Bumped when a corrupt file is replaced: partitions take a new cursor on the new one."""


DATABASES: dict[Path, Database] = {}
DATABASES_LOCK = threading.Lock()


def acquire(path: Path, where: str) -> Database:
    """The process's shared handle on the database at ``path`` (opened, or fresh if corrupt)."""
    key = path.resolve()
    with DATABASES_LOCK:
        db = DATABASES.get(key)
        if db is None:
            try:
                con = _connect(key)
            except duckdb.Error as exc:
                problem = corruption(exc)
                if problem is None:
                    msg = (
                        f"{where}: could not open the DuckDB database {str(key)!r}: {exc}. "
                        "Hint: only one process may write it; stop the other process (another "
                        "edge, or a duckdb shell) holding it, and query the Parquet files "
                        "meanwhile"
                    )
                    raise RuntimeError(msg) from exc
                con = _fresh(key, problem)
            db = Database(key, con)
            DATABASES[key] = db
        db.users += 1
        return db


def _connect(path: Path) -> duckdb.DuckDBPyConnection:
    """Open the database and make the bookkeeping tables (reading the catalog checks it)."""
    con = duckdb.connect(str(path))
    try:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.flushes (sink VARCHAR NOT NULL, "
            "part VARCHAR NOT NULL, seq BIGINT NOT NULL, stream VARCHAR NOT NULL, "
            "flush BIGINT NOT NULL, rows BIGINT NOT NULL, "
            "committed_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (sink, part, seq))"
        )
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.sink_starts (sink VARCHAR NOT NULL, "
            "part VARCHAR NOT NULL, store VARCHAR NOT NULL, base BIGINT NOT NULL, "
            "PRIMARY KEY (sink, part))"
        )
        con.execute(f"CREATE SEQUENCE IF NOT EXISTS {SCHEMA}.flush_ids")
        con.execute(f"SELECT max(seq), max(flush), max(rows) FROM {SCHEMA}.flushes").fetchall()
        con.execute(f"SELECT max(base), max(store) FROM {SCHEMA}.sink_starts").fetchall()
    except BaseException:
        con.close()
        raise
    return con


def _fresh(path: Path, problem: str) -> duckdb.DuckDBPyConnection:
    """Move the corrupt database aside and start a fresh one (Parquet keeps every row)."""
    moved = move_aside(path)
    con = _connect(path)
    report(
        "duckdb",
        path,
        moved,
        problem,
        "the tables start empty and fill with new rows; every row written before is in the "
        "Parquet files (load them with read_parquet if needed)",
    )
    return con


def heal(db: Database, problem: str) -> None:
    """Replace the shared database of ``db`` by a fresh one (caller holds ``db.lock``)."""
    try:
        db.con.close()
    except duckdb.Error:
        pass
    db.con = _fresh(db.path, problem)
    db.streams.clear()
    db.generation += 1


def release(db: Database) -> None:
    """Give ``db`` back; the last user closes it."""
    with DATABASES_LOCK:
        db.users -= 1
        if db.users == 0 and DATABASES.get(db.path) is db:
            del DATABASES[db.path]
            db.con.close()


def quote(name: str) -> str:
    """``name`` as a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def copy_database(source: Path, target: Path) -> None:
    """Copy the edge database ``source`` to ``target`` from inside the writing process.

    Uses the process's shared connection when a sink has ``source`` open
    (DuckDB refuses a second process), so a flow may call it, e.g. from a
    periodic task, and readers open ``target`` with ``read_only=True``. The
    copy is written to a temporary name and renamed into place.
    """
    key = Path(source).resolve()
    target = Path(target)
    temp = target.with_name(f".{target.name}.tmp")
    temp.unlink(missing_ok=True)
    with DATABASES_LOCK:
        db = DATABASES.get(key)
        if db is not None:  # a user of the shared connection: a sink closing now leaves it open
            db.users += 1
    try:
        con = duckdb.connect(str(key)) if db is None else db.con.cursor()
        try:
            con.execute(f"ATTACH {_literal(str(temp))} AS edgesieve_copy")
            try:
                con.execute(f"COPY FROM DATABASE {quote(_current(con))} TO edgesieve_copy")
            finally:
                con.execute("DETACH edgesieve_copy")
        finally:
            con.close()
    finally:
        if db is not None:
            release(db)
    os.replace(temp, target)


class PeriodicCopy:
    """Copy the edge database to ``target`` every ``every`` (a thread), for readers while it runs.

    Each copy is :func:`copy_database` (complete, then renamed into place),
    so a reader opening ``target`` with ``read_only=True`` sees one
    consistent state at most ``every`` old. A copy before any sink created
    ``source`` is skipped; a failed copy is logged and tried again next time.
    """

    def __init__(self, source: Path, target: Path, every: timedelta) -> None:
        self.source, self.target, self.every = Path(source), Path(target), every
        self.copies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duckdb-copy", daemon=True)

    def start(self) -> PeriodicCopy:
        """Start copying (the first copy after ``every``)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop; a copy under way is finished first."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every.total_seconds()):
            if not self.source.exists():
                continue
            try:
                copy_database(self.source, self.target)
                self.copies += 1
            except (duckdb.Error, OSError) as exc:
                logger.warning(
                    "copying %s to %s failed (%s); readers keep the previous copy, next try in %gs",
                    self.source,
                    self.target,
                    exc,
                    self.every.total_seconds(),
                )


def _current(con: duckdb.DuckDBPyConnection) -> str:
    row = con.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
