"""The cloud receiver's DuckDB store: checking a batch, then one transaction per batch.

Tables (the DuckDB file given by ``--db``):

``uplink_batches``
    ``batch_id VARCHAR PRIMARY KEY``, ``edge_id``, ``stream``, ``rows``,
    ``raw_bytes`` (device payload bytes the batch stands for),
    ``wire_bytes`` (serialized size of the ``Batch`` message),
    ``received_at TIMESTAMPTZ`` (commit time, UTC), ``priority`` and
    ``created_at TIMESTAMPTZ`` (when the edge sealed the batch, NULL if unset),
    then ``duplicate_rows`` and ``sent_raw_bytes`` (below). ``rows`` counts the
    rows stored, ``duplicate_rows`` those of the batch that were skipped.

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

Per batch :meth:`BatchStore.store` answers ``REJECTED`` (with a one-line
detail) when the batch can never be stored, ``DUPLICATE`` when its
``batch_id`` is already in ``uplink_batches``, or ``STORED`` once the rows and
their ``uplink_batches`` row are committed in one DuckDB transaction. Writes
are serialised by one lock (one DuckDB writer at a time, which also makes the
duplicate check race-free); decoding and checking the Arrow data runs
concurrently on each caller's thread, with its own cursor.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from connectors.streams import STREAMS, StreamSpec, conform
from connectors.uplink.wire import DUPLICATE, MAX_BATCH_ID_LENGTH, REJECTED, STORED
from protos import uplink_pb2

__all__ = [
    "BATCHES_TABLE",
    "NATURAL_KEYS",
    "STREAM_NAME",
    "BatchStore",
    "Outcome",
    "ReceiverError",
    "StoreFailed",
    "natural_key",
]

BATCHES_TABLE = "uplink_batches"
"""The accounting table: one row per stored batch."""
STREAM_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
"""The name of a stream the receiver does not know: it becomes a table name."""

NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "telemetry_points": ("device", "key", "ts"),
    "telemetry_text": ("device", "key", "ts"),
    "telemetry_summary": ("device", "key", "window_start"),
    "vibration_features": ("device", "axis", "ts"),
    # ``key`` (device/axis the rule watched): one rule on several axes of a
    # device raises one alarm per axis at the same ``ts``.
    "alarms": ("device", "key", "rule", "ts", "state"),
    # The whole row: ``received_at`` is the journaled receive time (or the
    # record's own time), so a replay repeats it exactly.
    "dead_letters": ("device", "transport", "received_at", "reason", "payload"),
}
"""The columns identifying a row of each standard stream within one edge (``edge_id``)."""

SUPERSEDED_BY: dict[str, str] = {"telemetry_summary": "count"}
"""Streams whose row may be sent again, more complete, under the same key: the column that grows.

A window the edge flushed while its device was quiet is sent again when
event time adds readings to it; the row with the higher ``count`` replaces
the stored one (see :func:`_supersede`).
"""

_EDGE_COLUMNS = ("edge_id", "batch_id")
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


class _Rejected(Exception):
    """A batch that will never be stored; ``args[0]`` is the Ack detail."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace made one space (for Ack details and logs)."""
    return " ".join(str(text).split())


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _from_us(us: int) -> datetime | None:
    if us <= 0:
        return None
    try:
        return _EPOCH + timedelta(microseconds=us)
    except OverflowError:
        return None


@dataclass(frozen=True)
class _Decoded:
    """A checked batch: its rows, its known spec (None for a user's stream), dropped columns."""

    stream: str
    table: pa.Table
    spec: StreamSpec | None
    dropped: list[str]
    key: tuple[str, ...] | None
    time_column: str | None
    grows: str | None = None
    """The column whose larger value supersedes a stored row of the same key (``SUPERSEDED_BY``)."""


_CREATE_BATCHES = f"""
CREATE TABLE IF NOT EXISTS {BATCHES_TABLE} (
    batch_id VARCHAR PRIMARY KEY,
    edge_id VARCHAR NOT NULL,
    stream VARCHAR NOT NULL,
    rows UBIGINT NOT NULL,
    raw_bytes UBIGINT NOT NULL,
    wire_bytes UBIGINT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    priority UINTEGER,
    created_at TIMESTAMPTZ,
    duplicate_rows UBIGINT NOT NULL DEFAULT 0,
    sent_raw_bytes UBIGINT
)
"""
_MIGRATE_BATCHES = (
    # Databases created before row deduplication: every row was stored.
    f"ALTER TABLE {BATCHES_TABLE} ADD COLUMN IF NOT EXISTS duplicate_rows UBIGINT DEFAULT 0",
    f"ALTER TABLE {BATCHES_TABLE} ADD COLUMN IF NOT EXISTS sent_raw_bytes UBIGINT",
    f"UPDATE {BATCHES_TABLE} SET sent_raw_bytes = raw_bytes WHERE sent_raw_bytes IS NULL",
)


class BatchStore:
    """The DuckDB file at ``path`` (created with its directory), ``uplink_batches`` ensured.

    Raises :class:`ReceiverError` when the file cannot be opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
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
        except duckdb.Error as exc:
            con.close()
            msg = (
                f"cloud receiver cannot create {BATCHES_TABLE} in {str(self.path)!r}: "
                f"{one_line(exc)}"
            )
            raise ReceiverError(msg) from None
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

    def store(
        self, cursor: duckdb.DuckDBPyConnection, edge: str, batch: uplink_pb2.Batch
    ) -> Outcome:
        """Check and store one batch of the authenticated ``edge``: its Ack status and detail.

        Raises :class:`StoreFailed` when the database fails (nothing was stored).
        """
        try:
            decoded = _decode(edge, batch)
            status, duplicates = self._write(cursor, edge, batch, decoded)
        except _Rejected as exc:
            return Outcome(REJECTED, one_line(exc.args[0]))
        except duckdb.Error as exc:
            msg = f"batch {batch.batch_id!r} ({batch.stream}): {one_line(exc)}"
            raise StoreFailed(msg) from exc
        if status != STORED:
            return Outcome(status)
        notes = []
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
        rows = decoded.table.num_rows - duplicates
        raw = _credited(batch.raw_bytes, rows, duplicates)
        return Outcome(STORED, "; ".join(notes), rows, duplicates, raw)

    def _write(
        self,
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        decoded: _Decoded,
    ) -> tuple[int, int]:
        """Write rows and the ``uplink_batches`` row in one transaction: (status, duplicates)."""
        with self._lock:
            cursor.execute("BEGIN TRANSACTION")
            committed = False
            try:
                found = cursor.execute(
                    f"SELECT edge_id FROM {BATCHES_TABLE} WHERE batch_id = ?", [batch.batch_id]
                ).fetchall()
                seen = found[0] if found else None
                duplicates = 0
                if seen is None:
                    duplicates = self._insert(cursor, edge, batch, decoded)
                    cursor.execute("COMMIT")
                    committed = True
            finally:
                if not committed:
                    with contextlib.suppress(duckdb.Error):
                        cursor.execute("ROLLBACK")
                for view in (_ROWS_VIEW, _EMPTY_VIEW):
                    with contextlib.suppress(duckdb.Error):
                        cursor.unregister(view)
        if seen is None:
            return STORED, duplicates
        if seen[0] != edge:
            msg = (
                f"batch_id {batch.batch_id!r} is already stored for another edge; "
                "batch ids must be unique across edges (derive them from the edge id)"
            )
            raise _Rejected(msg)
        return DUPLICATE, 0

    @staticmethod
    def _insert(
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        decoded: _Decoded,
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
        credited = _credited(raw, stored, duplicates)
        cursor.execute(
            f"INSERT INTO {BATCHES_TABLE} (batch_id, edge_id, stream, rows, raw_bytes, "
            "wire_bytes, received_at, priority, created_at, duplicate_rows, sent_raw_bytes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                batch.batch_id,
                edge,
                decoded.stream,
                stored,
                credited,
                batch.ByteSize(),
                datetime.now(UTC),
                batch.priority,
                _from_us(batch.created_at_us),
                duplicates,
                raw,
            ],
        )
        return duplicates


def _credited(raw_bytes: int, stored: int, duplicates: int) -> int:
    """The part of a batch's ``raw_bytes`` its stored (not duplicate) rows stand for."""
    if not duplicates:
        return raw_bytes
    return raw_bytes * stored // (stored + duplicates)


def _time_probe(decoded: _Decoded, edge: str) -> tuple[str, list[object]]:
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


def _supersede(cursor: duckdb.DuckDBPyConnection, decoded: _Decoded, edge: str) -> None:
    """Delete stored rows that a row of the batch with the same key and a larger value replaces."""
    key, grows = decoded.key or (), _quote(decoded.grows or "")
    same = " AND ".join(f"t.{_quote(c)} IS NOT DISTINCT FROM r.{_quote(c)}" for c in key)
    probe, params = _time_probe(decoded, edge)
    cursor.execute(
        f"DELETE FROM {_quote(decoded.stream)} AS t WHERE {probe} AND EXISTS "
        f"(SELECT 1 FROM {_ROWS_VIEW} AS r WHERE {same} AND r.{grows} > t.{grows})",
        params,
    )


def _anti_join(decoded: _Decoded, edge: str) -> tuple[str, list[object]]:
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


def _ensure_table(cursor: duckdb.DuckDBPyConnection, decoded: _Decoded) -> None:
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
    extra = ", ".join(f"NULL::VARCHAR AS {name}" for name in _EDGE_COLUMNS)
    cursor.execute(
        f"CREATE TABLE {_quote(decoded.stream)} AS SELECT *, {extra} FROM {source} WITH NO DATA"
    )


def _check_fits(cursor: duckdb.DuckDBPyConnection, stream: str) -> None:
    """Reject a batch of a user's stream whose columns differ from its table's."""
    stored = _columns(cursor, _quote(stream))
    for name in _EDGE_COLUMNS:
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
    raise _Rejected(msg)


def _check_stream_name(stream: str) -> None:
    if not STREAM_NAME.fullmatch(stream) or stream == BATCHES_TABLE:
        msg = (
            f"stream {stream!r} is not a name the receiver can store: a new stream becomes a "
            "table, so its name must be 1-63 lowercase letters, digits or '_', starting with "
            f"a letter, and not {BATCHES_TABLE!r} (known streams: {', '.join(sorted(STREAMS))})"
        )
        raise _Rejected(msg)


def _decode(edge: str, batch: uplink_pb2.Batch) -> _Decoded:
    """Check a batch and read its rows; raise :class:`_Rejected` with the Ack detail."""
    if not batch.batch_id:
        msg = "batch has no batch_id; the edge must set a deterministic batch_id"
        raise _Rejected(msg)
    if len(batch.batch_id) > MAX_BATCH_ID_LENGTH:
        msg = f"batch_id is {len(batch.batch_id)} characters long; at most {MAX_BATCH_ID_LENGTH}"
        raise _Rejected(msg)
    if batch.edge_id != edge:
        msg = (
            f"edge_id {batch.edge_id!r} does not match the authenticated edge key {edge!r}; an "
            "edge may push only its own batches (check edge_id and cloud.key in the edge config)"
        )
        raise _Rejected(msg)
    stream = batch.stream
    spec = STREAMS.get(stream)
    if spec is None:
        _check_stream_name(stream)
    if not batch.arrow_ipc:
        msg = f"stream {stream!r}: arrow_ipc is empty; it must hold an Arrow IPC stream"
        raise _Rejected(msg)
    try:
        table = pa.ipc.open_stream(batch.arrow_ipc).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        msg = (
            f"stream {stream!r}: arrow_ipc ({len(batch.arrow_ipc)} bytes) is not a readable "
            f"Arrow IPC stream: {one_line(exc)}"
        )
        raise _Rejected(msg) from None
    if table.num_rows != batch.rows:
        msg = (
            f"stream {stream!r}: the batch says rows={batch.rows} but its Arrow data holds "
            f"{table.num_rows} rows; the batch was built wrongly or corrupted"
        )
        raise _Rejected(msg)
    dropped = [name for name in _EDGE_COLUMNS if name in table.column_names]
    if spec is None:
        table = table.drop_columns(dropped)
        _check_column_names(stream, table.column_names)
        model = _model_of(table.schema)
        if model is None:
            return _Decoded(stream, table, None, dropped, None, None)
        return _Decoded(
            stream,
            table,
            None,
            dropped,
            NATURAL_KEYS[model.name],
            model.time_column,
            SUPERSEDED_BY.get(model.name),
        )
    dropped += [
        name
        for name in table.column_names
        if name not in spec.schema.names and name not in _EDGE_COLUMNS
    ]
    try:
        table = conform(spec, table)
    except (ValueError, TypeError) as exc:
        raise _Rejected(str(exc)) from None
    return _Decoded(
        stream,
        table,
        spec,
        dropped,
        natural_key(stream),
        spec.time_column,
        SUPERSEDED_BY.get(stream),
    )


def natural_key(stream: str) -> tuple[str, ...] | None:
    """The natural key of a standard stream (without ``edge_id``); None for others."""
    return NATURAL_KEYS.get(stream)


def _model_of(schema: pa.Schema) -> StreamSpec | None:
    """The standard stream whose columns and types ``schema`` has exactly, if any."""
    for name, spec in STREAMS.items():
        if name in NATURAL_KEYS and schema.equals(spec.schema, check_metadata=False):
            return spec
    return None


def _check_column_names(stream: str, names: list[str]) -> None:
    """A user's stream needs at least one column and names DuckDB tells apart."""
    if not names:
        msg = f"stream {stream!r}: the batch has no columns besides edge_id and batch_id"
        raise _Rejected(msg)
    seen: dict[str, str] = {}
    for name in names:
        if not name:
            msg = f"stream {stream!r}: a column has an empty name; name every column"
            raise _Rejected(msg)
        folded = name.lower()
        if folded in seen:
            msg = (
                f"stream {stream!r}: columns {seen[folded]!r} and {name!r} would be the same "
                "DuckDB column (names are case-insensitive); rename one"
            )
            raise _Rejected(msg)
        seen[folded] = name
