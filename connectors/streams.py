"""The output stream contract: one Arrow schema per stream, and records → Arrow.

Every local sink (Parquet, DuckDB) and the cloud uplink move Arrow tables
whose columns are fixed here. :func:`to_table` turns a batch of records
(frozen dataclasses such as :class:`~operators.records.Reading`, any object
with attributes named like the columns, or dicts keyed by column name) into
one such table, column by column, without building a dict per row;
:func:`conform` checks and casts data that is already Arrow.

All timestamp columns are ``timestamp[us, tz=UTC]``; timezone-aware
``datetime`` values in any zone are converted to UTC, naive ones are refused.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["STREAMS", "UTC_US", "VIEWS", "StreamSpec", "conform", "declare", "spec_of", "to_table"]

UTC_US = pa.timestamp("us", tz="UTC")
"""Arrow type of every timestamp column: microseconds, UTC."""

_MISSING = object()


@dataclass(frozen=True)
class StreamSpec:
    """Name, Arrow schema and partitioning time column of one output stream.

    ``time_column`` is the column whose UTC date picks the
    ``date=YYYY-MM-DD`` partition a row is written to; it must be a
    ``timestamp[us, tz=UTC]`` column and is never null.
    """

    name: str
    schema: pa.Schema
    time_column: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            msg = f"StreamSpec.name must be a non-empty string; got {self.name!r}"
            raise ValueError(msg)
        if not isinstance(self.schema, pa.Schema):
            msg = (
                f"StreamSpec {self.name!r}: schema must be a pyarrow.Schema; "
                f"got {type(self.schema).__name__}. Hint: build it with pa.schema([...])"
            )
            raise TypeError(msg)
        if self.time_column not in self.schema.names:
            msg = (
                f"StreamSpec {self.name!r}: time_column {self.time_column!r} is not a column "
                f"of the schema (columns: {', '.join(self.schema.names)})"
            )
            raise ValueError(msg)
        time_type = self.schema.field(self.time_column).type
        if time_type != UTC_US:
            msg = (
                f"StreamSpec {self.name!r}: time_column {self.time_column!r} has type "
                f"{time_type}; it must be {UTC_US} so rows can be partitioned by UTC date"
            )
            raise ValueError(msg)

    @property
    def columns(self) -> list[str]:
        """Column names, in schema order."""
        return list(self.schema.names)


def _spec(name: str, time_column: str, fields: list[tuple[str, pa.DataType]]) -> StreamSpec:
    return StreamSpec(name=name, schema=pa.schema(fields), time_column=time_column)


STREAMS: dict[str, StreamSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "telemetry_points",
            "ts",
            [
                ("device", pa.string()),
                ("key", pa.string()),
                ("ts", UTC_US),
                ("value", pa.float64()),
                ("transport", pa.string()),
            ],
        ),
        _spec(
            "telemetry_text",
            "ts",
            [
                ("device", pa.string()),
                ("key", pa.string()),
                ("ts", UTC_US),
                ("value", pa.string()),
                ("transport", pa.string()),
            ],
        ),
        _spec(
            "telemetry_summary",
            "window_start",
            [
                ("device", pa.string()),
                ("key", pa.string()),
                ("window_start", UTC_US),
                ("window_end", UTC_US),
                ("count", pa.int64()),
                ("mean", pa.float64()),
                ("min", pa.float64()),
                ("max", pa.float64()),
                ("std", pa.float64()),
                ("first", pa.float64()),
                ("last", pa.float64()),
            ],
        ),
        _spec(
            "vibration_features",
            "ts",
            [
                ("device", pa.string()),
                ("axis", pa.string()),
                ("ts", UTC_US),
                ("window_s", pa.float64()),
                ("sample_rate_hz", pa.int64()),
                ("band_energy", pa.list_(pa.float64())),
                ("rms", pa.float64()),
                ("velocity_rms_mm_s", pa.float64()),
                ("peak", pa.float64()),
                ("crest_factor", pa.float64()),
                ("kurtosis", pa.float64()),
                ("dominant_hz", pa.float64()),
                ("dominant_amplitude", pa.float64()),
                ("iso_zone", pa.string()),
                ("frames", pa.int64()),
                ("transport", pa.string()),
            ],
        ),
        _spec(
            "alarms",
            "ts",
            [
                ("device", pa.string()),
                ("ts", UTC_US),
                ("rule", pa.string()),
                ("state", pa.string()),
                ("severity", pa.string()),
                ("value", pa.float64()),
                ("key", pa.string()),
            ],
        ),
        _spec(
            "device_attributes",
            "updated_at",
            [
                ("device", pa.string()),
                ("key", pa.string()),
                ("value", pa.string()),  # the attribute's value as JSON text
                ("updated_at", UTC_US),
                ("source", pa.string()),  # the transport it came over
            ],
        ),
        _spec(
            "log_events",
            "ts",
            [
                ("device", pa.string()),
                ("ts", UTC_US),
                ("level", pa.string()),
                ("msg", pa.string()),
                ("template", pa.string()),  # msg with its variable parts as <*>
                ("transport", pa.string()),
                ("fields", pa.string()),  # a JSON line's other fields as JSON text, or null
            ],
        ),
        _spec(
            "log_summary",
            "window_start",
            [
                ("device", pa.string()),
                ("template", pa.string()),
                ("level", pa.string()),  # the most severe level among the lines
                ("window_start", UTC_US),
                ("window_end", UTC_US),
                ("count", pa.int64()),
                ("first_ts", UTC_US),
                ("last_ts", UTC_US),
                ("example", pa.string()),  # the first line's message
            ],
        ),
        _spec(
            "dead_letters",
            "received_at",
            [
                ("device", pa.string()),
                ("transport", pa.string()),
                ("received_at", UTC_US),
                ("reason", pa.string()),
                ("payload", pa.binary()),
            ],
        ),
    )
}
"""The streams written by the standard flows, by name."""


VIEWS: dict[str, dict[str, str]] = {
    "device_attributes": {
        "device_attributes_latest": (
            "SELECT device, key, arg_max(value, updated_at) AS value, "
            "max(updated_at) AS updated_at, arg_max(source, updated_at) AS source "
            "FROM device_attributes GROUP BY device, key"
        ),
    },
}
"""SQL views over a stream, by stream then view name: ``device_attributes_latest`` holds
the latest value of each device's attribute (every update stays in ``device_attributes``)."""


def spec_of(stream: str | StreamSpec, where: str) -> StreamSpec:
    """``stream`` itself, or the standard stream of that name; ``where`` names the caller."""
    if isinstance(stream, StreamSpec):
        return stream
    spec = STREAMS.get(stream)
    if spec is None:
        msg = (
            f"{where}: unknown stream {stream!r}; known streams: {', '.join(sorted(STREAMS))}. "
            "Hint: pass a StreamSpec(name, schema, time_column) for a stream of your own"
        )
        raise ValueError(msg)
    return spec


def declare(
    where: str,
    stream: str,
    *,
    like: str | None = None,
    schema: pa.Schema | None = None,
    time_column: str | None = None,
) -> tuple[StreamSpec, str]:
    """A flow's output stream: its spec, and the standard stream whose defaults it takes.

    A standard stream by name; a new one ``like=`` a standard one, or from
    ``schema`` and ``time_column``. ``where`` names the caller in errors.
    """
    if not isinstance(stream, str) or not stream.isidentifier() or not stream.islower():
        msg = (
            f"{where}: a stream name is a lower-case identifier (got {stream!r}); "
            "hint: pressure_points"
        )
        raise ValueError(msg)
    if like is not None and schema is not None:
        msg = f"{where}: give like= or schema=, not both"
        raise ValueError(msg)
    if like is not None:
        model = STREAMS.get(like)
        if model is None:
            msg = (
                f"{where}: like={like!r} is not a known stream; "
                f"hint: one of {', '.join(sorted(STREAMS))}"
            )
            raise ValueError(msg)
        return StreamSpec(stream, model.schema, model.time_column), like
    if schema is not None:
        if time_column is None:
            msg = (
                f"{where}: a new schema needs time_column=, the timestamp[us, UTC] column "
                "that picks the date= partition"
            )
            raise ValueError(msg)
        return StreamSpec(stream, schema, time_column), stream
    known = STREAMS.get(stream)
    if known is None:
        msg = (
            f"{where}: unknown stream; declare its columns with like='telemetry_points' "
            f"or schema=pa.schema([...]), time_column='ts' (known: {', '.join(sorted(STREAMS))})"
        )
        raise ValueError(msg)
    return known, stream


def to_table(spec: StreamSpec, items: Sequence[object]) -> pa.Table:
    """Build one Arrow table of ``spec``'s schema from a batch of records.

    Each record supplies every column of the stream, as an attribute (frozen
    dataclasses, any object) or as a key (dicts and other mappings); extra
    attributes are ignored. Values are gathered one Python list per column
    and converted by Arrow in one call per column.

    Raises ``TypeError`` when a record lacks a column and ``ValueError`` when
    a value does not fit its column, is a naive ``datetime``, or the time
    column is null; the message names the stream, the column, the record
    type and its position in ``items``.
    """
    if not isinstance(items, list | tuple):
        items = list(items)
    if not items:
        return spec.schema.empty_table()
    by_key = isinstance(items[0], Mapping)
    arrays: list[pa.Array] = []
    for field in spec.schema:
        values = _column(spec, items, field.name, by_key)
        if pa.types.is_timestamp(field.type):
            _check_aware(spec, items, field.name, values)
        try:
            array = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise _bad_value(spec, items, field, values, exc) from exc
        if field.name == spec.time_column and array.null_count:
            index = pc.index(array.is_null(), True).as_py()
            msg = (
                f"stream {spec.name!r}: time column {field.name!r} is None in record "
                f"#{index} ({type(items[index]).__name__}); every row needs a timestamp "
                "because it picks the date= partition"
            )
            raise ValueError(msg)
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=spec.schema)


def conform(spec: StreamSpec, data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Select and cast Arrow data (a table or record batch) to ``spec``'s schema.

    Extra columns are dropped and compatible types cast (e.g. ``float32`` to
    ``float64``). Raises ``TypeError`` for non-Arrow data and ``ValueError``
    for missing columns, timestamps without a timezone, values that do not
    cast, or a null time column.
    """
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    elif not isinstance(data, pa.Table):
        msg = (
            f"stream {spec.name!r}: expected a pyarrow Table or RecordBatch, got "
            f"{type(data).__name__}. Hint: use to_table() for records"
        )
        raise TypeError(msg)
    missing = [name for name in spec.schema.names if name not in data.column_names]
    if missing:
        msg = (
            f"stream {spec.name!r}: Arrow data lacks column(s) {', '.join(missing)}; it has "
            f"{', '.join(data.column_names) or 'no columns'}. Hint: rename or add the columns "
            "so they match the stream"
        )
        raise ValueError(msg)
    data = data.select(spec.schema.names)
    for field in spec.schema:
        got = data.schema.field(field.name).type
        if pa.types.is_timestamp(field.type) and pa.types.is_timestamp(got) and got.tz is None:
            msg = (
                f"stream {spec.name!r}: Arrow column {field.name!r} is {got} without a "
                f"timezone; it must be timezone-aware. Hint: if it holds UTC, use "
                f"pyarrow.compute.assume_timezone(col, 'UTC') or cast to {field.type}"
            )
            raise ValueError(msg)
    try:
        table = data.cast(spec.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        msg = (
            f"stream {spec.name!r}: Arrow data does not cast to the stream schema "
            f"({', '.join(f'{f.name}: {f.type}' for f in spec.schema)}); Arrow said: {exc}"
        )
        raise ValueError(msg) from exc
    nulls = table.column(spec.time_column).null_count
    if nulls:
        msg = (
            f"stream {spec.name!r}: time column {spec.time_column!r} has {nulls} null "
            "value(s) in Arrow data; every row needs a timestamp because it picks the "
            "date= partition"
        )
        raise ValueError(msg)
    return table


def _column(spec: StreamSpec, items: Sequence[object], name: str, by_key: bool) -> list[Any]:
    """Gather one column from all records; fast path first, precise errors after."""
    getter: Callable[[Any], Any] = (
        operator.itemgetter(name) if by_key else operator.attrgetter(name)
    )
    try:
        return list(map(getter, items))
    except (AttributeError, KeyError, TypeError):
        pass
    values: list[Any] = []
    for index, item in enumerate(items):
        if isinstance(item, Mapping):
            value = item.get(name, _MISSING)
        else:
            value = getattr(item, name, _MISSING)
        if value is _MISSING:
            kind = "key" if isinstance(item, Mapping) else "attribute"
            msg = (
                f"stream {spec.name!r}: record #{index} of type {type(item).__name__} has no "
                f"{kind} {name!r} (stream columns: {', '.join(spec.schema.names)}). "
                f"Hint: write only records with these fields to the {spec.name!r} stream"
            )
            raise TypeError(msg)
        values.append(value)
    return values


def _check_aware(spec: StreamSpec, items: Sequence[object], name: str, values: list[Any]) -> None:
    """Refuse naive datetimes: Arrow would silently read them as UTC."""
    try:
        if all(map(operator.attrgetter("tzinfo"), values)):
            return
    except AttributeError:
        pass
    for index, value in enumerate(values):
        if isinstance(value, datetime) and value.utcoffset() is None:
            msg = (
                f"stream {spec.name!r}: column {name!r} of record #{index} "
                f"({type(items[index]).__name__}) is a naive datetime {value.isoformat()}; "
                "timestamps must be timezone-aware. Hint: datetime.now(UTC) or "
                "dt.replace(tzinfo=UTC) if the value is already UTC"
            )
            raise ValueError(msg)


def _bad_value(
    spec: StreamSpec,
    items: Sequence[object],
    field: pa.Field,
    values: list[Any],
    exc: Exception,
) -> ValueError:
    """Describe the first value Arrow could not convert (error path only)."""
    where = ""
    for index, value in enumerate(values):
        try:
            pa.scalar(value, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            where = (
                f" record #{index} ({type(items[index]).__name__}) has {field.name}={value!r} "
                f"of type {type(value).__name__};"
            )
            break
    hint = ""
    if spec.name == "telemetry_points" and field.name == "value":
        hint = " Hint: text readings (str values) belong in the 'telemetry_text' stream."
    msg = (
        f"stream {spec.name!r}: column {field.name!r} expects {field.type};{where} "
        f"Arrow said: {exc}.{hint}"
    )
    return ValueError(msg)
