"""Bytewax sink loading one stream into the local DuckDB database, exactly once.

Database: ``data_dir/edge.duckdb`` (the path is given to :class:`DuckDBSink`).
For each stream it holds

- ``main.<stream>``: a VIEW with exactly the stream's columns
  (:data:`connectors.streams.STREAMS`) — what users query — and the stream's
  derived views (:data:`connectors.streams.VIEWS`, e.g. ``device_attributes_latest``);
- ``edgesieve.<stream>``: the rows, plus ``_flush BIGINT``, the id of the
  flush that loaded them;
- ``edgesieve.flushes``: one row per committed flush: ``sink`` (the output
  step id), ``part``, ``seq``, ``stream``, ``flush``, ``rows``,
  ``committed_at``;
- ``edgesieve.sink_starts``: where a recovery store started a partition
  (see "Exactly once" below).

Rows are loaded from Arrow (``INSERT INTO ... SELECT ... FROM`` a registered
Arrow table), never row by row. A flush is one transaction: the rows and
their ``edgesieve.flushes`` row commit together or not at all.

Items are ``(key, record)`` pairs, like :class:`connectors.sinks.parquet.ParquetSink`;
Bytewax routes each key (device id) to one of ``partitions`` fixed
partitions (keep the count while a recovery store is in use). A partition
flushes when it holds ``max_rows`` rows, when its oldest row has waited
``max_age`` (checked by a timer thread too), when Bytewax takes a recovery
snapshot (``flush_on_snapshot``, on by default: a DuckDB commit is cheap and
creates no file, so rows become queryable every epoch and snapshots stay
small), and on close. A failing flush (disk full, ...) is logged, its rows
stay buffered (and in the snapshot) and it is retried.

Exactly once across Bytewax recovery (see :mod:`connectors.sinks.timed`):
a partition's snapshot is the sequence number of its next flush and the rows
not flushed yet. Resumed from a snapshot, it deletes the flushes of its step
and partition numbered from there on (rows and bookkeeping, one
transaction) and restores the rows. Without resume state it numbers on after
its last flush and deletes nothing, except when ``recovery_dir`` is given
and that recovery store already started the partition without committing a
snapshot of it: then the flushes of those runs are deleted, because the
input replays them.

One process, one writer: all partitions of all DuckDB sinks of a process
share one database connection per file (:mod:`connectors.sinks.duckdb_file`;
each partition uses its own cursor, as DuckDB requires for use from several
threads). DuckDB locks the file: while the edge runs, another process can
open it neither read-write nor ``read_only=True`` nor ``ATTACH ...
(READ_ONLY)`` ("IO Error: Could not set lock on file ... Conflicting lock is
held"). To query while the edge
runs, read the same rows from the Parquet files
(``read_parquet('data_dir/parquet/<stream>/**/*.parquet', hive_partitioning=true)``),
or call :func:`copy_database` (or stop the flow) and open the copy.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
from bytewax.outputs import FixedPartitionedSink

from connectors.common.stores import corruption
from connectors.sinks.duckdb_file import (
    SCHEMA,
    PeriodicCopy,
    acquire,
    copy_database,
    heal,
    quote,
    release,
)
from connectors.sinks.timed import (
    ReplaySafePartition,
    SinkState,
    check_partitions,
    check_recovery_dir,
    recovery_store_id,
)
from connectors.streams import VIEWS, StreamSpec, spec_of

__all__ = [
    "DuckDBSettings",
    "DuckDBSink",
    "DuckDBSinkPartition",
    "OnLoad",
    "PeriodicCopy",
    "copy_database",
]

logger = logging.getLogger("edgesieve.duckdb")

OnLoad = Callable[[str, int, int], None]
"""``on_write(stream, rows, arrow_bytes)``, called after each committed flush."""

_BATCH_VIEW = "_edgesieve_batch"


@dataclass(frozen=True)
class DuckDBSettings:
    """When to flush.

    ``max_rows`` buffered rows trigger a flush; ``max_age`` is how long the
    oldest buffered row may wait; ``flush_on_snapshot`` also flushes when
    Bytewax snapshots the partition (every recovery epoch);
    ``retry_interval`` is the least time between a failed flush and its retry.
    """

    max_rows: int = 500_000
    max_age: timedelta = timedelta(seconds=10)
    flush_on_snapshot: bool = True
    retry_interval: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        rows = self.max_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
            msg = f"DuckDBSettings.max_rows must be a positive int; got {rows!r}. Hint: 500_000"
            raise ValueError(msg)
        if not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0):
            msg = (
                f"DuckDBSettings.max_age must be a positive datetime.timedelta; got "
                f"{self.max_age!r}. Hint: timedelta(seconds=10)"
            )
            raise ValueError(msg)
        if not isinstance(self.retry_interval, timedelta) or self.retry_interval < timedelta(0):
            msg = (
                f"DuckDBSettings.retry_interval must be a non-negative datetime.timedelta; "
                f"got {self.retry_interval!r}. Hint: timedelta(seconds=5)"
            )
            raise ValueError(msg)
        if not isinstance(self.flush_on_snapshot, bool):
            msg = f"DuckDBSettings.flush_on_snapshot must be a bool; got {self.flush_on_snapshot!r}"
            raise ValueError(msg)


class DuckDBSink(FixedPartitionedSink[object, SinkState]):
    """Load the records of one stream into ``path`` (``data_dir/edge.duckdb``), exactly once.

    Items are ``(key, record)`` pairs, the key a string (the device id) that
    picks the partition; a record has attributes (or dict keys) named like
    the stream's columns, or is a pyarrow table / record batch with those
    columns. ``partitions`` is fixed: keep it while a recovery store is in
    use. ``recovery_dir`` is the Bytewax recovery directory the flow runs
    with (``None`` without recovery). ``on_write(stream, rows, arrow_bytes)``
    is called after each committed flush, from the worker or the timer
    thread, so it must be thread-safe.
    """

    def __init__(
        self,
        path: Path,
        stream: str | StreamSpec,
        *,
        partitions: int = 4,
        settings: DuckDBSettings = DuckDBSettings(),
        on_write: OnLoad | None = None,
        recovery_dir: Path | None = None,
    ) -> None:
        spec = spec_of(stream, "DuckDBSink")
        where = f"DuckDBSink({spec.name!r})"
        if not isinstance(settings, DuckDBSettings):
            msg = f"{where}: settings must be a DuckDBSettings; got {type(settings).__name__}"
            raise TypeError(msg)
        if on_write is not None and not callable(on_write):
            msg = (
                f"{where}: on_write must be callable as on_write(stream, rows, arrow_bytes); "
                f"got {type(on_write).__name__}"
            )
            raise TypeError(msg)
        path = Path(path)
        if path.is_dir():
            msg = (
                f"{where}: path {str(path)!r} is a directory; it must name the database file. "
                "Hint: data_dir / 'edge.duckdb'"
            )
            raise ValueError(msg)
        if path.parent.exists() and not path.parent.is_dir():
            msg = f"{where}: the parent of {str(path)!r} is not a directory"
            raise ValueError(msg)
        if not spec.name.isidentifier():
            msg = f"{where}: a stream loaded into DuckDB needs an identifier as its name"
            raise ValueError(msg)
        self.path = path
        self.spec: StreamSpec = spec
        self.settings = settings
        self.on_write = on_write
        self.partitions = check_partitions(where, partitions)
        self.recovery_dir = check_recovery_dir(where, recovery_dir)

    def list_parts(self) -> list[str]:
        """All partitions: every worker of this process can write the database."""
        return [f"p{i}" for i in range(self.partitions)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: SinkState | None
    ) -> DuckDBSinkPartition:
        """Build or resume one partition (opens the shared database, starts its timer)."""
        return DuckDBSinkPartition(self, step_id=step_id, part=for_part, state=resume_state)


class DuckDBSinkPartition(ReplaySafePartition):
    """One partition's buffer and flushes; see :class:`DuckDBSink`.

    Counters: ``flushes_written``, ``rows_written``, ``write_failures``,
    ``flushes_removed`` (flushes of a replayed epoch deleted on resume), and
    the ``buffered_rows``/``buffered_bytes`` properties.
    """

    def __init__(
        self, sink: DuckDBSink, *, step_id: str, part: str, state: SinkState | None
    ) -> None:
        spec = sink.spec
        settings = sink.settings
        self._settings = settings
        self._on_write = sink.on_write
        self._recovery_dir = sink.recovery_dir
        self._step = step_id
        self._part = part
        self._table = f"{SCHEMA}.{quote(spec.name)}"
        self._columns = ", ".join(quote(c) for c in spec.columns)
        self._init_timer(
            where=f"DuckDBSink {step_id!r} (stream {spec.name!r}, partition {part})",
            thread=f"duckdb-{spec.name}-{part}",
            max_age_s=settings.max_age.total_seconds(),
            retry_s=settings.retry_interval.total_seconds(),
        )
        self._init_buffer(spec, max_bytes=None, max_rows=settings.max_rows, size_setting="max_rows")
        self.flushes_written = 0
        self.flushes_removed = 0
        self._db = acquire(sink.path, self._where)
        self._cur = self._db.con.cursor()
        self._generation = self._db.generation
        try:
            try:
                self._ensure_stream()
                self._resume(state)
            except duckdb.Error as exc:
                problem = corruption(exc)
                if problem is None:
                    raise
                with self._db.lock:
                    if self._generation == self._db.generation:
                        heal(self._db, problem)
                self._cur = self._db.con.cursor()
                self._generation = self._db.generation
                self._ensure_stream()
                self._resume(state)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        cur, self._cur = self._cur, None
        if cur is not None:
            cur.close()
            release(self._db)

    def close(self) -> None:
        """Flush everything still buffered and give the database connection back."""
        try:
            super().close()
        finally:
            self._release()

    # --- schema ----------------------------------------------------------------------

    def _ensure_stream(self) -> None:
        """Create the stream's table and view, or check the existing table's columns."""
        db, spec, cur = self._db, self._spec, self._cur
        assert cur is not None
        with db.lock:
            if spec.name in db.streams:
                return
            cur.register(_BATCH_VIEW, spec.schema.empty_table())
            try:
                wanted = cur.execute(
                    f"DESCRIBE SELECT {self._columns}, NULL::BIGINT AS _flush FROM {_BATCH_VIEW}"
                ).fetchall()
                exists = cur.execute(
                    "SELECT count(*) FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?",
                    [SCHEMA, spec.name],
                ).fetchone()
                if exists and exists[0]:
                    have = cur.execute(f"DESCRIBE {self._table}").fetchall()
                    self._check_columns(wanted, have)
                else:
                    cur.execute(
                        f"CREATE TABLE {self._table} AS SELECT {self._columns}, "
                        f"NULL::BIGINT AS _flush FROM {_BATCH_VIEW} LIMIT 0"
                    )
                try:
                    cur.execute(
                        f"CREATE OR REPLACE VIEW main.{quote(spec.name)} AS "
                        f"SELECT {self._columns} FROM {self._table}"
                    )
                    for view, query in VIEWS.get(spec.name, {}).items():
                        cur.execute(f"CREATE OR REPLACE VIEW main.{quote(view)} AS {query}")
                except duckdb.CatalogException as exc:
                    msg = (
                        f"{self._where}: cannot create the view main.{spec.name} in "
                        f"{str(db.path)!r}: {exc}. Hint: rename or drop that object; the "
                        "stream's rows are queried through this view"
                    )
                    raise ValueError(msg) from exc
            finally:
                cur.unregister(_BATCH_VIEW)
            db.streams.add(spec.name)

    def _check_columns(
        self, wanted: list[tuple[object, ...]], have: list[tuple[object, ...]]
    ) -> None:
        want = [(row[0], row[1]) for row in wanted]
        got = [(row[0], row[1]) for row in have]
        if want != got:
            msg = (
                f"{self._where}: table {SCHEMA}.{self._spec.name} in {str(self._db.path)!r} "
                f"has columns {', '.join(f'{n} {t}' for n, t in got)}; the stream needs "
                f"{', '.join(f'{n} {t}' for n, t in want)}. Hint: the stream's schema changed; "
                f"rename the old table (ALTER TABLE {SCHEMA}.{self._spec.name} RENAME TO ...) "
                "or move edge.duckdb aside"
            )
            raise ValueError(msg)

    # --- resume ----------------------------------------------------------------------

    def _open(self, next_seq: int | None) -> int:
        cur = self._cur
        assert cur is not None
        key = [self._step, self._part]
        if next_seq is None:
            next_seq = self._fresh_start()
        cur.begin()
        try:
            stale = cur.execute(
                f"SELECT count(*) FROM {SCHEMA}.flushes WHERE sink = ? AND part = ? AND seq >= ?",
                [*key, next_seq],
            ).fetchone()
            removed = int(stale[0]) if stale else 0
            if removed:
                cur.execute(
                    f"DELETE FROM {self._table} WHERE _flush IN (SELECT flush FROM "
                    f"{SCHEMA}.flushes WHERE sink = ? AND part = ? AND seq >= ?)",
                    [*key, next_seq],
                )
                cur.execute(
                    f"DELETE FROM {SCHEMA}.flushes WHERE sink = ? AND part = ? AND seq >= ?",
                    [*key, next_seq],
                )
            cur.commit()
        except BaseException:
            cur.rollback()
            raise
        if removed:
            self.flushes_removed += removed
            logger.info(
                "%s: resumed at flush %d; removed %d flush(es) committed after the recovery "
                "snapshot, the replay loads their rows again",
                self._where,
                next_seq,
                removed,
            )
        return next_seq

    def _fresh_start(self) -> int:
        """The first sequence number without resume state (see the module docs)."""
        cur = self._cur
        assert cur is not None
        key = [self._step, self._part]
        row = cur.execute(
            f"SELECT coalesce(max(seq) + 1, 0) FROM {SCHEMA}.flushes WHERE sink = ? AND part = ?",
            key,
        ).fetchone()
        after = int(row[0]) if row else 0
        if self._recovery_dir is None:
            return after
        store = recovery_store_id(self._recovery_dir)
        row = cur.execute(
            f"SELECT store, base FROM {SCHEMA}.sink_starts WHERE sink = ? AND part = ?", key
        ).fetchone()
        if row is not None and row[0] == store:
            return int(row[1])
        cur.execute(
            f"INSERT OR REPLACE INTO {SCHEMA}.sink_starts VALUES (?, ?, ?, ?)",
            [*key, store, after],
        )
        return after

    def _lost_hint(self) -> str:
        return f"{self._table} in {self._db.path}"

    # --- writing ---------------------------------------------------------------------

    def _snapshot_flush_locked(self) -> None:
        if self._settings.flush_on_snapshot and self._rows and time.monotonic() >= self._retry_at:
            self._flush_locked()

    def _write_locked(self, table: pa.Table, *, healed: bool = False) -> pa.Table | None:
        """Load ``table`` and record the flush in one transaction; all or nothing.

        A corrupt database file is replaced by a fresh one and the load
        retried there once (``healed``).
        """
        cur = self._cur
        if cur is None:
            msg = f"{self._where}: the partition is closed"
            raise RuntimeError(msg)
        if self._generation != self._db.generation:  # the file was replaced: use the new one
            cur = self._cur = self._db.con.cursor()
            self._generation = self._db.generation
            self._ensure_stream()
        seq = self._next_seq
        cur.register(_BATCH_VIEW, table.combine_chunks())
        try:
            cur.begin()
            try:
                row = cur.execute(f"SELECT nextval('{SCHEMA}.flush_ids')").fetchone()
                assert row is not None
                flush = int(row[0])
                cur.execute(
                    f"INSERT INTO {self._table} SELECT {self._columns}, ? FROM {_BATCH_VIEW}",
                    [flush],
                )
                cur.execute(
                    f"INSERT INTO {SCHEMA}.flushes VALUES (?, ?, ?, ?, ?, ?, now())",
                    [self._step, self._part, seq, self._spec.name, flush, table.num_rows],
                )
                cur.commit()
            except BaseException:
                try:
                    cur.rollback()
                except duckdb.Error:
                    pass
                raise
        except (duckdb.Error, OSError) as exc:
            self.write_failures += 1
            problem = corruption(exc)
            if problem is None or healed:
                self._log_failure(table.num_rows, exc)
                return table
            with self._db.lock:
                if self._generation == self._db.generation:
                    heal(self._db, problem)
            return self._write_locked(table, healed=True)  # into the fresh file, once
        finally:
            try:
                cur.unregister(_BATCH_VIEW)
            except duckdb.Error:
                pass
        self._next_seq = seq + 1
        self.flushes_written += 1
        self.rows_written += table.num_rows
        if self._on_write is not None:
            try:
                self._on_write(self._spec.name, table.num_rows, table.nbytes)
            except Exception:
                logger.exception(
                    "%s: the on_write callback raised for flush %d (%d rows); the rows are "
                    "committed and loading continues",
                    self._where,
                    seq,
                    table.num_rows,
                )
        return None

    def _log_failure(self, rows: int, exc: Exception) -> None:
        text = str(exc)
        hint = "check the database file, its disk and the error above"
        if "No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC:
            hint = "free disk space on that volume or point data_dir at a larger one"
        elif "Conflict" in text or "conflict" in text:
            hint = "another writer changed the same rows; the flush is retried"
        logger.error(
            "%s: could not load %d rows into %s of %s: %s: %s. The rows stay buffered "
            "(%d rows in memory) and the load is retried (at the earliest in %.1fs). Hint: %s",
            self._where,
            rows,
            self._table,
            self._db.path,
            type(exc).__name__,
            exc,
            self._rows,
            self._retry_s,
            hint,
        )
