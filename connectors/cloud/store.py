"""The cloud receiver's DuckDB store: checking a batch, then one transaction per batch.

Tables (the DuckDB file given by ``--db``):

``uplink_batches``
    ``batch_id``, ``edge_id`` (together the primary key), ``stream``, ``rows``,
    ``raw_bytes`` (device payload bytes the batch stands for),
    ``wire_bytes`` (serialized size of the ``Batch`` message),
    ``received_at TIMESTAMPTZ`` (commit time, UTC), ``priority`` and
    ``created_at TIMESTAMPTZ`` (when the edge sealed the batch, NULL if unset),
    then ``duplicate_rows`` and ``sent_raw_bytes`` (below), ``arrow_bytes``
    (decompressed Arrow size, what the storage quota counts) and
    ``raw_bytes_implausible`` (the claim was over the cap and credited 0).
    ``rows`` counts the rows stored, ``duplicate_rows`` those of the batch
    that were skipped.

``uplink_refusals``
    ``edge_id``, ``reason``, ``count``, ``last_at``, ``last_detail``: every
    refusal counted per edge and reason.

one table per stream, named like the stream
    The stream's columns, in schema order and with the DuckDB types of their
    Arrow types (timestamps are ``TIMESTAMPTZ``), followed by ``edge_id`` and
    ``batch_id``. ``edge_id`` is kept on every row because device names are
    only unique within one edge, so almost every query filters or groups by
    it; ``batch_id`` ties each row to its ``uplink_batches`` row (accounting,
    audits, deleting one batch). A table is created with the first batch of
    its stream. Rows are inserted from the Arrow data in one statement.

Streams: a batch of a stream of :data:`~connectors.streams.STREAMS` is
conformed to that stream's schema (extra columns are not stored; the
``STORED`` ack's detail names them). Any other stream is a user's own output
stream: its name must be a safe identifier (:data:`STREAM_NAME`), its first
batch creates the table from the batch's Arrow schema, and every later batch
must have exactly the table's columns and types.

Row deduplication: a replay after an edge crash can seal rows that already
reached the cloud into a batch with a different ``batch_id``. Every stream
with a natural key (:data:`NATURAL_KEYS`, always together with ``edge_id``)
is therefore inserted with an anti-join: a row whose key is already stored,
or repeats an earlier row of the same batch, is skipped, in the same
transaction that records the batch. The anti-join probes only the stored
rows of the same edge whose time column lies within the batch's time range,
which DuckDB answers from its row-group min/max (zone maps) without an index
kept in memory, so the cost follows the batch and the rows of its time span,
not the table size. A user's stream whose columns and types are exactly those
of a standard stream (declared ``like=`` it) gets that stream's key; any
other user stream has no known key and is deduplicated by ``batch_id`` only.
``telemetry_summary`` rows may also come again more complete (a window the
edge flushed while its device was quiet, then added to): a row with a larger
``count`` replaces the stored one of its key (:data:`SUPERSEDED_BY`), in the
same transaction.

Accounting of skipped rows: ``rows`` is what was stored, ``duplicate_rows``
what was skipped, ``sent_raw_bytes`` the batch's own ``raw_bytes`` and
``raw_bytes`` the part of it credited to the stored rows,
``sent_raw_bytes * rows // (rows + duplicate_rows)``: a batch made only of
duplicates counts 0 raw bytes (its device bytes were counted with the first
copy) but its real ``wire_bytes``, so replays lower the reduction ratio
instead of inflating it.

:func:`~connectors.cloud.batches.check` reads only the IPC message headers
(sizes, rows) and hashes the batch, then :meth:`BatchStore.store` answers
``REJECTED`` (with a one-line detail) when the batch can never be stored,
``DUPLICATE`` when the edge's ``batch_id`` is already in ``uplink_batches``,
or ``STORED`` once the rows and their ``uplink_batches`` row are committed in
one DuckDB transaction. Writes
are serialised by one lock (one DuckDB writer at a time, which also makes the
duplicate check race-free); decoding and checking the Arrow data runs
concurrently on each caller's thread, with its own cursor.
"""

from __future__ import annotations

import contextlib
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow.compute as pc

from connectors.cloud.batches import (
    BATCHES_TABLE,
    EDGE_COLUMNS,
    NATURAL_KEYS,
    STREAM_NAME,
    Decoded,
    Rejected,
    check,
    decode,
    natural_key,
    one_line,
)
from connectors.cloud.limits import ReceiverLimits
from connectors.uplink.wire import DUPLICATE, REJECTED, STORED
from protos import uplink_pb2

__all__ = [
    "BATCHES_TABLE",
    "NATURAL_KEYS",
    "REFUSALS_TABLE",
    "STREAM_NAME",
    "BatchStore",
    "Outcome",
    "QuotaExceeded",
    "ReceiverError",
    "StoreFailed",
    "natural_key",
]

_ROWS_VIEW = "_edgesieve_rows"
_EMPTY_VIEW = "_edgesieve_empty"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReceiverError(RuntimeError):
    """The receiver cannot start: its database cannot be opened or its address bound."""


class StoreFailed(Exception):
    """The database failed while storing a batch; the transaction was rolled back."""


class Outcome(NamedTuple):
    """What :meth:`BatchStore.store` did with a batch.

    ``rows`` and ``raw_bytes`` are what was stored and credited (0 unless
    ``STORED``); ``duplicates`` the rows skipped by their natural key.
    """

    status: int
    detail: str = ""
    rows: int = 0
    duplicates: int = 0
    raw_bytes: int = 0
    reason: str = ""
    """The refusal counted in ``uplink_refusals`` (a rejection, or ``raw_bytes`` not credited)."""


class QuotaExceeded(Exception):
    """An edge has its storage quota stored; ``args[0]`` is the one-line reason."""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _from_us(us: int) -> datetime | None:
    if us <= 0:
        return None
    try:
        return _EPOCH + timedelta(microseconds=us)
    except OverflowError:
        return None


_BATCHES_COLUMNS = """
    batch_id VARCHAR NOT NULL,
    edge_id VARCHAR NOT NULL,
    stream VARCHAR NOT NULL,
    rows UBIGINT NOT NULL,
    raw_bytes UBIGINT NOT NULL,
    wire_bytes UBIGINT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    priority UINTEGER,
    created_at TIMESTAMPTZ,
    duplicate_rows UBIGINT NOT NULL DEFAULT 0,
    sent_raw_bytes UBIGINT,
    arrow_bytes UBIGINT,
    raw_bytes_implausible BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (edge_id, batch_id)
"""
_CREATE_BATCHES = f"CREATE TABLE IF NOT EXISTS {BATCHES_TABLE} ({_BATCHES_COLUMNS})"
_MIGRATE_BATCHES = (
    # Databases created before row deduplication: every row was stored.
    f"ALTER TABLE {BATCHES_TABLE} ADD COLUMN IF NOT EXISTS duplicate_rows UBIGINT DEFAULT 0",
    f"ALTER TABLE {BATCHES_TABLE} ADD COLUMN IF NOT EXISTS sent_raw_bytes UBIGINT",
    f"UPDATE {BATCHES_TABLE} SET sent_raw_bytes = raw_bytes WHERE sent_raw_bytes IS NULL",
    # Databases created before the receiver's limits: sizes unknown, claims credited.
    f"ALTER TABLE {BATCHES_TABLE} ADD COLUMN IF NOT EXISTS arrow_bytes UBIGINT",
    f"ALTER TABLE {BATCHES_TABLE} ADD COLUMN IF NOT EXISTS raw_bytes_implausible BOOLEAN "
    "DEFAULT false",
)
# Databases whose batch_id alone was the key: rebuilt keyed by (edge_id, batch_id).
_OLD_KEY = (
    "SELECT 1 FROM duckdb_constraints() WHERE table_name = ? AND constraint_type = "
    "'PRIMARY KEY' AND constraint_column_names = ['batch_id']"
)
_REKEY_BATCHES = (
    f"CREATE TABLE {BATCHES_TABLE}_rekeyed ({_BATCHES_COLUMNS})",
    f"INSERT INTO {BATCHES_TABLE}_rekeyed BY NAME SELECT * FROM {BATCHES_TABLE}",
    f"DROP TABLE {BATCHES_TABLE}",
    f"ALTER TABLE {BATCHES_TABLE}_rekeyed RENAME TO {BATCHES_TABLE}",
)
REFUSALS_TABLE = "uplink_refusals"
"""Refusals counted per edge and reason."""
_CREATE_REFUSALS = f"""
CREATE TABLE IF NOT EXISTS {REFUSALS_TABLE} (
    edge_id VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    count UBIGINT NOT NULL,
    last_at TIMESTAMPTZ NOT NULL,
    last_detail VARCHAR NOT NULL,
    PRIMARY KEY (edge_id, reason)
)
"""
_STORED_BYTES = (
    f"SELECT edge_id, sum(coalesce(arrow_bytes, wire_bytes))::UBIGINT FROM {BATCHES_TABLE} "
    "GROUP BY edge_id"
)


class BatchStore:
    """The DuckDB file at ``path`` (created with its directory), its tables ensured.

    ``limits`` bound what one batch may be and how much one edge may have
    stored. Raises :class:`ReceiverError` when the file cannot be opened.
    """

    def __init__(self, path: Path, limits: ReceiverLimits | None = None) -> None:
        self.path = Path(path)
        self.limits = limits if limits is not None else ReceiverLimits()
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(str(self.path))
        except (duckdb.Error, OSError) as exc:
            msg = (
                f"cloud receiver cannot open its database {str(self.path)!r}: "
                f"{one_line(exc)}. Hint: another `edgesieve cloud` may be using the file, or "
                "the directory is not writable"
            )
            raise ReceiverError(msg) from None
        try:
            con.execute(_CREATE_BATCHES)
            for statement in _MIGRATE_BATCHES:
                con.execute(statement)
            if con.execute(_OLD_KEY, [BATCHES_TABLE]).fetchall():
                con.execute("BEGIN TRANSACTION")
                for statement in _REKEY_BATCHES:
                    con.execute(statement)
                con.execute("COMMIT")
            con.execute(_CREATE_REFUSALS)
            stored = dict(con.execute(_STORED_BYTES).fetchall())
        except duckdb.Error as exc:
            con.close()
            msg = (
                f"cloud receiver cannot create {BATCHES_TABLE} in {str(self.path)!r}: "
                f"{one_line(exc)}"
            )
            raise ReceiverError(msg) from None
        self._stored: dict[str, int] = {edge: int(total) for edge, total in stored.items()}
        self._db: duckdb.DuckDBPyConnection | None = con

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for one caller thread; close it when done."""
        if self._db is None:
            msg = f"the store {str(self.path)!r} is closed"
            raise RuntimeError(msg)
        return self._db.cursor()

    def close(self) -> None:
        """Close the database once the running write is done (idempotent)."""
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                db.close()

    def stored_bytes(self, edge: str) -> int:
        """Decompressed Arrow bytes of the batches stored for ``edge`` (its storage quota use)."""
        with self._lock:
            return self._stored.get(edge, 0)

    def over_quota(self, edge: str, arrow_bytes: int = 0) -> str | None:
        """Why ``edge`` may not store ``arrow_bytes`` more, or None while it may."""
        quota = self.limits.edge_storage_bytes
        stored = self._stored.get(edge, 0)
        room = stored + arrow_bytes <= quota if arrow_bytes else stored < quota
        if not quota or room:
            return None
        return (
            f"edge {edge!r} has {stored} bytes stored and its storage quota is {quota} bytes "
            f"(--edge-storage-bytes); nothing more is stored for it until the quota is raised "
            "or its data is deleted; the edge keeps its batches and retries"
        )

    def check(self, edge: str, batch: uplink_pb2.Batch) -> Outcome | int:
        """The ``REJECTED`` outcome of a batch that fails :func:`check`, else its Arrow bytes."""
        try:
            return check(edge, batch, self.limits)
        except Rejected as exc:
            return Outcome(REJECTED, one_line(exc.detail), reason=exc.reason)

    def seen(self, cursor: duckdb.DuckDBPyConnection, edge: str, batch_id: str) -> bool:
        """Whether ``edge`` has a batch ``batch_id`` stored (its re-send needs no decoding)."""
        try:
            return bool(
                cursor.execute(
                    f"SELECT 1 FROM {BATCHES_TABLE} WHERE edge_id = ? AND batch_id = ?",
                    [edge, batch_id],
                ).fetchall()
            )
        except duckdb.Error as exc:
            msg = f"batch {batch_id!r}: {one_line(exc)}"
            raise StoreFailed(msg) from exc

    def count_refusal(
        self, cursor: duckdb.DuckDBPyConnection, edge: str, reason: str, detail: str, n: int = 1
    ) -> None:
        """Add ``n`` to the count of ``reason`` for ``edge`` in ``uplink_refusals``."""
        try:
            with self._lock:
                cursor.execute(
                    f"INSERT INTO {REFUSALS_TABLE} VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
                    "SET count = count + excluded.count, last_at = excluded.last_at, "
                    "last_detail = excluded.last_detail",
                    [edge, reason, n, datetime.now(UTC), detail[:1000]],
                )
        except duckdb.Error as exc:
            msg = f"the refusal count of edge {edge!r}: {one_line(exc)}"
            raise StoreFailed(msg) from exc

    def store(
        self,
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        arrow_bytes: int,
    ) -> Outcome:
        """Decode and store a batch :meth:`check` passed (``arrow_bytes`` is what it gave).

        Raises :class:`StoreFailed` when the database fails (nothing was
        stored), :class:`QuotaExceeded` when the edge's storage quota has no
        room for the batch.
        """
        try:
            decoded = decode(batch)
            status, duplicates = self._write(cursor, edge, batch, decoded, arrow_bytes)
        except Rejected as exc:
            return Outcome(REJECTED, one_line(exc.detail), reason=exc.reason)
        except duckdb.Error as exc:
            msg = f"batch {batch.batch_id!r} ({batch.stream}): {one_line(exc)}"
            raise StoreFailed(msg) from exc
        if status != STORED:
            return Outcome(status)
        notes = []
        reason = ""
        if decoded.dropped:
            notes.append(
                f"stored without column(s) {', '.join(decoded.dropped)}, which stream "
                f"{batch.stream!r} does not define"
            )
        if duplicates:
            key = ", ".join(("edge_id", *(decoded.key or ())))
            notes.append(
                f"{duplicates} of {decoded.table.num_rows} rows skipped: their natural key "
                f"({key}) is already stored"
            )
        if self._implausible(batch.raw_bytes):
            reason = "raw_bytes"
            notes.append(
                f"raw_bytes {batch.raw_bytes} is over the receiver's cap of "
                f"{self.limits.max_raw_bytes} per batch (--max-raw-bytes): kept as "
                "sent_raw_bytes, credited 0"
            )
        rows = decoded.table.num_rows - duplicates
        raw = self._credited(batch.raw_bytes, rows, duplicates)
        return Outcome(STORED, "; ".join(notes), rows, duplicates, raw, reason)

    def _implausible(self, raw_bytes: int) -> bool:
        cap = self.limits.max_raw_bytes
        return bool(cap) and raw_bytes > cap

    def _credited(self, raw_bytes: int, stored: int, duplicates: int) -> int:
        """The part of a batch's ``raw_bytes`` its stored (not duplicate) rows stand for."""
        if self._implausible(raw_bytes):
            return 0
        return _credited(raw_bytes, stored, duplicates)

    def _write(
        self,
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        decoded: Decoded,
        arrow_bytes: int,
    ) -> tuple[int, int]:
        """Write rows and the ``uplink_batches`` row in one transaction: (status, duplicates)."""
        with self._lock:
            cursor.execute("BEGIN TRANSACTION")
            committed = False
            try:
                seen = cursor.execute(
                    f"SELECT 1 FROM {BATCHES_TABLE} WHERE edge_id = ? AND batch_id = ?",
                    [edge, batch.batch_id],
                ).fetchall()
                duplicates = 0
                if not seen:
                    refusal = self.over_quota(edge, arrow_bytes)
                    if refusal is not None:
                        raise QuotaExceeded(refusal)
                    duplicates = self._insert(cursor, edge, batch, decoded, arrow_bytes)
                    cursor.execute("COMMIT")
                    committed = True
                    self._stored[edge] = self._stored.get(edge, 0) + arrow_bytes
            finally:
                if not committed:
                    with contextlib.suppress(duckdb.Error):
                        cursor.execute("ROLLBACK")
                for view in (_ROWS_VIEW, _EMPTY_VIEW):
                    with contextlib.suppress(duckdb.Error):
                        cursor.unregister(view)
        if seen:
            return DUPLICATE, 0
        return STORED, duplicates

    def _insert(
        self,
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        decoded: Decoded,
        arrow_bytes: int,
    ) -> int:
        """Insert the new rows (from Arrow, one statement) and the ``uplink_batches`` row.

        Returns how many rows were skipped as duplicates. The Arrow views are
        unregistered by :meth:`_write` once the transaction ends.
        """
        table = decoded.table
        cursor.register(_ROWS_VIEW, table)
        _ensure_table(cursor, decoded)
        columns = ", ".join(f"r.{_quote(name)}" for name in table.schema.names)
        select = (
            f"SELECT {columns}, ?::VARCHAR AS edge_id, ?::VARCHAR AS batch_id "
            f"FROM {_ROWS_VIEW} AS r"
        )
        params: list[object] = [edge, batch.batch_id]
        if decoded.key is not None and table.num_rows:
            if decoded.grows is not None:
                _supersede(cursor, decoded, edge)
            where, more = _anti_join(decoded, edge)
            select += where
            params += more
        inserted = cursor.execute(
            f"INSERT INTO {_quote(decoded.stream)} BY NAME {select}", params
        ).fetchone()
        stored = int(inserted[0]) if inserted else 0
        duplicates = table.num_rows - stored
        raw = batch.raw_bytes
        cursor.execute(
            f"INSERT INTO {BATCHES_TABLE} (batch_id, edge_id, stream, rows, raw_bytes, "
            "wire_bytes, received_at, priority, created_at, duplicate_rows, sent_raw_bytes, "
            "arrow_bytes, raw_bytes_implausible) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                batch.batch_id,
                edge,
                decoded.stream,
                stored,
                self._credited(raw, stored, duplicates),
                batch.ByteSize(),
                datetime.now(UTC),
                batch.priority,
                _from_us(batch.created_at_us),
                duplicates,
                raw,
                arrow_bytes,
                self._implausible(raw),
            ],
        )
        return duplicates


def _credited(raw_bytes: int, stored: int, duplicates: int) -> int:
    """The part of a batch's ``raw_bytes`` its stored (not duplicate) rows stand for."""
    if not duplicates:
        return raw_bytes
    return raw_bytes * stored // (stored + duplicates)


def _time_probe(decoded: Decoded, edge: str) -> tuple[str, list[object]]:
    """``t.edge_id = ?`` and, when the batch has times, ``t.<time> BETWEEN`` its range."""
    probe = "t.edge_id = ?"
    params: list[object] = [edge]
    time_column = decoded.time_column
    if time_column is not None:
        times = decoded.table.column(time_column)
        if times.null_count == 0:
            bounds = pc.min_max(times)
            probe += f" AND t.{_quote(time_column)} BETWEEN ? AND ?"
            params += [bounds["min"].as_py(), bounds["max"].as_py()]
    return probe, params


def _supersede(cursor: duckdb.DuckDBPyConnection, decoded: Decoded, edge: str) -> None:
    """Delete stored rows that a row of the batch with the same key and a larger value replaces."""
    key, grows = decoded.key or (), _quote(decoded.grows or "")
    same = " AND ".join(f"t.{_quote(c)} IS NOT DISTINCT FROM r.{_quote(c)}" for c in key)
    probe, params = _time_probe(decoded, edge)
    cursor.execute(
        f"DELETE FROM {_quote(decoded.stream)} AS t WHERE {probe} AND EXISTS "
        f"(SELECT 1 FROM {_ROWS_VIEW} AS r WHERE {same} AND r.{grows} > t.{grows})",
        params,
    )


def _anti_join(decoded: Decoded, edge: str) -> tuple[str, list[object]]:
    """The clause keeping only rows whose natural key is new, and its parameters.

    Stored rows are probed only within the batch's time range, which DuckDB
    prunes by row-group min/max; rows repeating a key within the batch keep
    the first (for a stream of :data:`SUPERSEDED_BY`, the largest).
    """
    key = decoded.key or ()
    same = " AND ".join(f"t.{_quote(c)} IS NOT DISTINCT FROM r.{_quote(c)}" for c in key)
    probe, params = _time_probe(decoded, edge)
    partition = ", ".join(f"r.{_quote(c)}" for c in key)
    order = f" ORDER BY r.{_quote(decoded.grows)} DESC" if decoded.grows else ""
    clause = (
        f" WHERE NOT EXISTS (SELECT 1 FROM {_quote(decoded.stream)} AS t "
        f"WHERE {probe} AND {same})"
        f" QUALIFY row_number() OVER (PARTITION BY {partition}{order}) = 1"
    )
    return clause, params


def _columns(cursor: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    """Column name → DuckDB type of a table or view, in order."""
    rows = cursor.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
    return {row[0]: row[1] for row in rows}


def _ensure_table(cursor: duckdb.DuckDBPyConnection, decoded: Decoded) -> None:
    """Create the stream's table if missing; check a user's stream fits the existing one.

    A known stream's table is made from its spec's schema, a user's stream's
    from the batch (registered as the rows view); both get ``edge_id`` and
    ``batch_id`` after the stream's columns.
    """
    exists = cursor.execute(
        "SELECT 1 FROM duckdb_tables() WHERE schema_name = current_schema() AND table_name = ?",
        [decoded.stream],
    ).fetchall()
    if exists:
        if decoded.spec is None:
            _check_fits(cursor, decoded.stream)
        return
    source = _ROWS_VIEW
    if decoded.spec is not None:
        cursor.register(_EMPTY_VIEW, decoded.spec.schema.empty_table())
        source = _EMPTY_VIEW
    extra = ", ".join(f"NULL::VARCHAR AS {name}" for name in EDGE_COLUMNS)
    cursor.execute(
        f"CREATE TABLE {_quote(decoded.stream)} AS SELECT *, {extra} FROM {source} WITH NO DATA"
    )


def _check_fits(cursor: duckdb.DuckDBPyConnection, stream: str) -> None:
    """Reject a batch of a user's stream whose columns differ from its table's."""
    stored = _columns(cursor, _quote(stream))
    for name in EDGE_COLUMNS:
        stored.pop(name, None)
    given = _columns(cursor, _ROWS_VIEW)
    if given == stored:
        return
    differences = [f"{name} (missing)" for name in stored if name not in given]
    for name, kind in given.items():
        if name not in stored:
            differences.append(f"{name} (not in the table)")
        elif stored[name] != kind:
            differences.append(f"{name} ({kind}, the table has {stored[name]})")
    msg = (
        f"stream {stream!r}: the batch does not fit the table stored before: "
        f"{'; '.join(differences)}; a stream's columns and types must not change "
        "(give a changed output a new stream name)"
    )
    raise Rejected(msg, "columns")
