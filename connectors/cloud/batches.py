"""What the cloud receiver checks in a batch before storing it, and its rows once decoded.

:func:`check` reads only the IPC message headers (sizes, rows) and hashes the
batch: a missing or foreign field, a payload over the receiver's limits, a
``rows`` count or a ``batch_id`` that disagrees with the content raise
:class:`Rejected` (the one-line Ack detail and the reason counted in
``uplink_refusals``). :func:`decode` then reads the rows: a standard stream's
are conformed to its schema (:data:`~connectors.streams.STREAMS`), a user's
stream gets the natural key of the standard stream it is exactly like, if
any (:data:`NATURAL_KEYS`). :mod:`connectors.cloud.store` writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from connectors.cloud.limits import ReceiverLimits, measure_ipc
from connectors.streams import STREAMS, StreamSpec, conform
from connectors.uplink.wire import MAX_BATCH_ID_LENGTH, batch_id_of
from protos import uplink_pb2

__all__ = [
    "BATCHES_TABLE",
    "EDGE_COLUMNS",
    "NATURAL_KEYS",
    "STREAM_NAME",
    "SUPERSEDED_BY",
    "Decoded",
    "Rejected",
    "check",
    "decode",
    "natural_key",
    "one_line",
]

BATCHES_TABLE = "uplink_batches"
"""The receiver's accounting table: one row per stored batch (no stream may take its name)."""
STREAM_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
"""The name of a stream the receiver does not know: it becomes a table name."""
EDGE_COLUMNS = ("edge_id", "batch_id")
"""The columns the receiver adds to every stored row (a batch's own are dropped)."""

NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "telemetry_points": ("device", "key", "ts"),
    "telemetry_text": ("device", "key", "ts"),
    # Every update is kept; the latest per device and key is arg_max(value, updated_at).
    "device_attributes": ("device", "key", "updated_at"),
    "telemetry_summary": ("device", "key", "window_start"),
    # Two lines of a device with the same time and message are one event.
    "log_events": ("device", "ts", "msg"),
    "log_summary": ("device", "template", "window_start"),
    "vibration_features": ("device", "axis", "ts"),
    # ``key`` (device/axis the rule watched): one rule on several axes of a
    # device raises one alarm per axis at the same ``ts``.
    "alarms": ("device", "key", "rule", "ts", "state"),
    # The whole row: ``received_at`` is the journaled receive time (or the
    # record's own time), so a replay repeats it exactly.
    "dead_letters": ("device", "transport", "received_at", "reason", "payload"),
}
"""The columns identifying a row of each standard stream within one edge (``edge_id``)."""

SUPERSEDED_BY: dict[str, str] = {"telemetry_summary": "count", "log_summary": "count"}
"""Streams whose row may be sent again, more complete, under the same key: the column that grows.

A window the edge flushed while its device was quiet is sent again when
event time adds readings to it; the row with the higher ``count`` replaces
the stored one (see :mod:`connectors.cloud.store`).
"""


class Rejected(Exception):
    """A batch that will never be stored: ``detail`` for the Ack, ``reason`` for the count."""

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


def one_line(text: object) -> str:
    """``text`` with every run of whitespace made one space (for Ack details and logs)."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Decoded:
    """A checked batch: its rows, its known spec (None for a user's stream), dropped columns."""

    stream: str
    table: pa.Table
    spec: StreamSpec | None
    dropped: list[str]
    key: tuple[str, ...] | None
    time_column: str | None
    grows: str | None = None
    """The column whose larger value supersedes a stored row of the same key (``SUPERSEDED_BY``)."""


def _check_stream_name(stream: str) -> None:
    if not STREAM_NAME.fullmatch(stream) or stream == BATCHES_TABLE:
        msg = (
            f"stream {stream!r} is not a name the receiver can store: a new stream becomes a "
            "table, so its name must be 1-63 lowercase letters, digits or '_', starting with "
            f"a letter, and not {BATCHES_TABLE!r} (known streams: {', '.join(sorted(STREAMS))})"
        )
        raise Rejected(msg, "stream")


def check(edge: str, batch: uplink_pb2.Batch, limits: ReceiverLimits) -> int:
    """Check a batch without decompressing it: its decompressed Arrow bytes.

    Raises :class:`Rejected` with the Ack detail: a missing or foreign field,
    a payload over ``limits`` (read from the IPC message headers), a ``rows``
    count that disagrees with them, or a ``batch_id`` that is not the one its
    content gives (:func:`~connectors.uplink.wire.batch_id_of`).
    """
    if not batch.batch_id:
        msg = "batch has no batch_id; the edge must set a deterministic batch_id"
        raise Rejected(msg, "batch_id")
    if len(batch.batch_id) > MAX_BATCH_ID_LENGTH:
        msg = f"batch_id is {len(batch.batch_id)} characters long; at most {MAX_BATCH_ID_LENGTH}"
        raise Rejected(msg, "batch_id")
    if batch.edge_id != edge:
        msg = (
            f"edge_id {batch.edge_id!r} does not match the authenticated edge key {edge!r}; an "
            "edge may push only its own batches (check edge_id and cloud.key in the edge config)"
        )
        raise Rejected(msg, "edge_id")
    stream = batch.stream
    if stream not in STREAMS:
        _check_stream_name(stream)
    if not batch.arrow_ipc:
        msg = f"stream {stream!r}: arrow_ipc is empty; it must hold an Arrow IPC stream"
        raise Rejected(msg, "arrow")
    try:
        size = measure_ipc(batch.arrow_ipc, max_bytes=limits.max_batch_bytes)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _unreadable(batch, exc) from None
    if size.arrow_bytes > limits.max_batch_bytes:
        msg = (
            f"stream {stream!r}: arrow_ipc ({len(batch.arrow_ipc)} bytes) expands to at least "
            f"{size.arrow_bytes} bytes, over the receiver's cap of {limits.max_batch_bytes} "
            "bytes per batch (--max-batch-bytes); seal smaller batches (cloud.batch_rows)"
        )
        raise Rejected(msg, "too_large")
    if size.rows > limits.max_batch_rows:
        msg = (
            f"stream {stream!r}: the batch holds {size.rows} rows, over the receiver's cap of "
            f"{limits.max_batch_rows} rows per batch (--max-batch-rows); seal smaller batches "
            "(cloud.batch_rows)"
        )
        raise Rejected(msg, "too_many_rows")
    if size.rows != batch.rows:
        msg = (
            f"stream {stream!r}: the batch says rows={batch.rows} but its Arrow data holds "
            f"{size.rows} rows; the batch was built wrongly or corrupted"
        )
        raise Rejected(msg, "rows")
    expected = batch_id_of(edge, stream, batch.arrow_ipc)
    if batch.batch_id != expected:
        msg = (
            f"batch_id {batch.batch_id[:80]!r} is not the id of this batch's content "
            f"({expected}): the hex SHA-256 over edge id, stream and arrow_ipc (see "
            "docs/uplink.md); the batch was built wrongly or corrupted"
        )
        raise Rejected(msg, "batch_id_mismatch")
    return size.arrow_bytes


def _unreadable(batch: uplink_pb2.Batch, exc: Exception) -> Rejected:
    msg = (
        f"stream {batch.stream!r}: arrow_ipc ({len(batch.arrow_ipc)} bytes) is not a readable "
        f"Arrow IPC stream: {one_line(exc)}"
    )
    return Rejected(msg, "arrow")


def _check_names(schema: pa.Schema) -> None:
    """Read every field name, nested ones too: one that is not UTF-8 raises ``ValueError``."""
    types = []
    for field in schema:
        _ = field.name
        types.append(field.type)
    while types:
        kind = types.pop()
        if isinstance(kind, pa.DictionaryType):
            types.append(kind.value_type)
            continue
        for i in range(kind.num_fields):
            child = kind.field(i)
            _ = child.name
            types.append(child.type)


def decode(batch: uplink_pb2.Batch) -> Decoded:
    """Read the rows of a batch :func:`check` passed; :class:`Rejected` if they do not fit."""
    stream = batch.stream
    spec = STREAMS.get(stream)
    try:
        table = pa.ipc.open_stream(batch.arrow_ipc).read_all()
        _check_names(table.schema)
        table.validate(full=True)  # offsets and UTF-8 too, before DuckDB reads the buffers
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _unreadable(batch, exc) from None
    if table.num_rows != batch.rows:
        msg = (
            f"stream {stream!r}: the batch says rows={batch.rows} but its Arrow data holds "
            f"{table.num_rows} rows; the batch was built wrongly or corrupted"
        )
        raise Rejected(msg, "rows")
    dropped = [name for name in EDGE_COLUMNS if name in table.column_names]
    if spec is None:
        table = table.drop_columns(dropped)
        _check_column_names(stream, table.column_names)
        model = _model_of(table.schema)
        if model is None:
            return Decoded(stream, table, None, dropped, None, None)
        return Decoded(
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
        if name not in spec.schema.names and name not in EDGE_COLUMNS
    ]
    try:
        table = conform(spec, table)
    except (ValueError, TypeError) as exc:
        raise Rejected(str(exc), "columns") from None
    return Decoded(
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
        raise Rejected(msg, "columns")
    seen: dict[str, str] = {}
    for name in names:
        if not name:
            msg = f"stream {stream!r}: a column has an empty name; name every column"
            raise Rejected(msg, "columns")
        folded = name.lower()
        if folded in seen:
            msg = (
                f"stream {stream!r}: columns {seen[folded]!r} and {name!r} would be the same "
                "DuckDB column (names are case-insensitive); rename one"
            )
            raise Rejected(msg, "columns")
        seen[folded] = name
