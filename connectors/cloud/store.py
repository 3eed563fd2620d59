"""The cloud receiver's DuckDB store: checking a batch, then one transaction per batch.

Tables (the DuckDB file given by ``--db``):

``uplink_batches``
    ``batch_id VARCHAR PRIMARY KEY``, ``edge_id``, ``stream``, ``rows``,
    ``raw_bytes`` (device payload bytes the batch stands for),
    ``wire_bytes`` (serialized size of the ``Batch`` message),
    ``received_at TIMESTAMPTZ`` (commit time, UTC), ``priority`` and
    ``created_at TIMESTAMPTZ`` (when the edge sealed the batch, NULL if unset).

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

import duckdb
import pyarrow as pa

from connectors.streams import STREAMS, StreamSpec, conform
from connectors.uplink.wire import DUPLICATE, MAX_BATCH_ID_LENGTH, REJECTED, STORED
from protos import uplink_pb2

__all__ = ["BATCHES_TABLE", "STREAM_NAME", "BatchStore", "ReceiverError", "StoreFailed"]

BATCHES_TABLE = "uplink_batches"
"""The accounting table: one row per stored batch."""
STREAM_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
"""The name of a stream the receiver does not know: it becomes a table name."""

_EDGE_COLUMNS = ("edge_id", "batch_id")
_ROWS_VIEW = "_edgesieve_rows"
_EMPTY_VIEW = "_edgesieve_empty"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReceiverError(RuntimeError):
    """The receiver cannot start: its database cannot be opened or its address bound."""


class StoreFailed(Exception):
    """The database failed while storing a batch; the transaction was rolled back."""


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
    created_at TIMESTAMPTZ
)
"""


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
    ) -> tuple[int, str]:
        """Check and store one batch of the authenticated ``edge``: ``(Ack status, detail)``.

        Raises :class:`StoreFailed` when the database fails (nothing was stored).
        """
        try:
            decoded = _decode(edge, batch)
            status = self._write(cursor, edge, batch, decoded)
        except _Rejected as exc:
            return REJECTED, one_line(exc.args[0])
        except duckdb.Error as exc:
            msg = f"batch {batch.batch_id!r} ({batch.stream}): {one_line(exc)}"
            raise StoreFailed(msg) from exc
        if status == STORED and decoded.dropped:
            return STORED, (
                f"stored without column(s) {', '.join(decoded.dropped)}, which stream "
                f"{batch.stream!r} does not define"
            )
        return status, ""

    def _write(
        self,
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        decoded: _Decoded,
    ) -> int:
        """Write rows and the ``uplink_batches`` row in one transaction."""
        with self._lock:
            cursor.execute("BEGIN TRANSACTION")
            committed = False
            try:
                found = cursor.execute(
                    f"SELECT edge_id FROM {BATCHES_TABLE} WHERE batch_id = ?", [batch.batch_id]
                ).fetchall()
                seen = found[0] if found else None
                if seen is None:
                    self._insert(cursor, edge, batch, decoded)
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
            return STORED
        if seen[0] != edge:
            msg = (
                f"batch_id {batch.batch_id!r} is already stored for another edge; "
                "batch ids must be unique across edges (derive them from the edge id)"
            )
            raise _Rejected(msg)
        return DUPLICATE

    @staticmethod
    def _insert(
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        decoded: _Decoded,
    ) -> None:
        """Insert the rows (from Arrow, one statement) and the ``uplink_batches`` row.

        The Arrow views are unregistered by :meth:`_write` once the transaction ends.
        """
        table = decoded.table
        cursor.register(_ROWS_VIEW, table)
        _ensure_table(cursor, decoded)
        columns = ", ".join(_quote(name) for name in table.schema.names)
        cursor.execute(
            f"INSERT INTO {_quote(decoded.stream)} BY NAME "
            f"SELECT {columns}, ?::VARCHAR AS edge_id, ?::VARCHAR AS batch_id FROM {_ROWS_VIEW}",
            [edge, batch.batch_id],
        )
        cursor.execute(
            f"INSERT INTO {BATCHES_TABLE} (batch_id, edge_id, stream, rows, raw_bytes, "
            "wire_bytes, received_at, priority, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                batch.batch_id,
                edge,
                decoded.stream,
                table.num_rows,
                batch.raw_bytes,
                batch.ByteSize(),
                datetime.now(UTC),
                batch.priority,
                _from_us(batch.created_at_us),
            ],
        )


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
        return _Decoded(stream, table, None, dropped)
    dropped += [
        name
        for name in table.column_names
        if name not in spec.schema.names and name not in _EDGE_COLUMNS
    ]
    try:
        table = conform(spec, table)
    except (ValueError, TypeError) as exc:
        raise _Rejected(str(exc)) from None
    return _Decoded(stream, table, spec, dropped)


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
