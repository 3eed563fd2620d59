from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.streams import STREAMS, UTC_US, StreamSpec, conform, to_table
from operators.records import DeadLetter, Reading

T0 = datetime(2025, 11, 22, 8, 30, tzinfo=UTC)


def test_stream_contract_columns_and_time_columns() -> None:
    expected = {
        "telemetry_points": (["device", "key", "ts", "value", "transport"], "ts"),
        "telemetry_text": (["device", "key", "ts", "value", "transport"], "ts"),
        "telemetry_summary": (
            [
                "device",
                "key",
                "window_start",
                "window_end",
                "count",
                "mean",
                "min",
                "max",
                "std",
                "first",
                "last",
            ],
            "window_start",
        ),
        "dead_letters": (
            ["device", "transport", "received_at", "reason", "payload"],
            "received_at",
        ),
        "vibration_features": (
            [
                "device",
                "axis",
                "ts",
                "window_s",
                "sample_rate_hz",
                "band_energy",
                "rms",
                "velocity_rms_mm_s",
                "peak",
                "crest_factor",
                "kurtosis",
                "dominant_hz",
                "dominant_amplitude",
                "iso_zone",
                "frames",
                "transport",
            ],
            "ts",
        ),
        "alarms": (["device", "ts", "rule", "state", "severity", "value", "key"], "ts"),
        "device_attributes": (["device", "key", "value", "updated_at", "source"], "updated_at"),
        "log_events": (["device", "ts", "level", "msg", "template", "transport", "fields"], "ts"),
        "log_summary": (
            [
                "device",
                "template",
                "level",
                "window_start",
                "window_end",
                "count",
                "first_ts",
                "last_ts",
                "example",
            ],
            "window_start",
        ),
    }
    assert set(STREAMS) == set(expected)
    for name, (columns, time_column) in expected.items():
        spec = STREAMS[name]
        assert spec.name == name
        assert spec.columns == columns
        assert spec.time_column == time_column
        assert spec.schema.field(time_column).type == pa.timestamp("us", tz="UTC")
    assert STREAMS["telemetry_points"].schema.field("value").type == pa.float64()
    assert STREAMS["telemetry_text"].schema.field("value").type == pa.string()
    assert STREAMS["telemetry_summary"].schema.field("count").type == pa.int64()
    assert STREAMS["telemetry_summary"].schema.field("window_end").type == UTC_US
    assert STREAMS["dead_letters"].schema.field("payload").type == pa.binary()
    assert STREAMS["device_attributes"].schema.field("value").type == pa.string()


def test_readings_to_table_keep_values_types_and_utc() -> None:
    readings = [
        Reading("pump-7", "temperature", T0, 21.5, "mqtt"),
        Reading("pump-7", "pressure", T0 + timedelta(microseconds=1), -0.25, "coap"),
        Reading("fan-1", "on", T0 + timedelta(days=1), 1.0, "http"),
    ]
    table = to_table(STREAMS["telemetry_points"], readings)
    assert table.schema == STREAMS["telemetry_points"].schema
    assert table.to_pylist() == [
        {"device": r.device, "key": r.key, "ts": r.ts, "value": r.value, "transport": r.transport}
        for r in readings
    ]
    assert all(row["ts"].tzinfo is not None for row in table.to_pylist())


def test_aware_timestamps_in_other_zones_are_stored_as_utc() -> None:
    berlin = datetime(2025, 6, 1, 1, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    minus2 = datetime(2025, 6, 1, 23, 0, tzinfo=timezone(timedelta(hours=-2)))
    table = to_table(
        STREAMS["telemetry_points"],
        [Reading("d", "k", berlin, 1.0), Reading("d", "k", minus2, 2.0)],
    )
    got = table.column("ts").to_pylist()
    assert got == [
        datetime(2025, 5, 31, 23, 30, tzinfo=UTC),
        datetime(2025, 6, 2, 1, 0, tzinfo=UTC),
    ]
    assert [g.utcoffset() for g in got] == [timedelta(0), timedelta(0)]


def test_dicts_plain_objects_and_mixed_batches() -> None:
    spec = STREAMS["telemetry_text"]
    as_dict = {"device": "d", "key": "log", "ts": T0, "value": "boot ok", "transport": "http"}
    as_obj = SimpleNamespace(**as_dict, extra="ignored")
    assert to_table(spec, [as_dict]).to_pylist() == [as_dict]
    assert to_table(spec, [as_obj]).to_pylist() == [as_dict]
    assert to_table(spec, [as_obj, as_dict]).to_pylist() == [as_dict, as_dict]
    assert to_table(spec, [as_dict, as_obj]).to_pylist() == [as_dict, as_dict]
    assert to_table(spec, (r for r in [as_dict])).num_rows == 1


def test_summary_records_with_nullable_std() -> None:
    @dataclass(frozen=True)
    class Summary:
        device: str
        key: str
        window_start: datetime
        window_end: datetime
        count: int
        mean: float
        min: float
        max: float
        std: float | None
        first: float
        last: float

    rows = [
        Summary("d", "t", T0, T0 + timedelta(minutes=1), 3, 2.0, 1.0, 3.0, 1.0, 1.0, 3.0),
        Summary("d", "t", T0, T0 + timedelta(minutes=1), 1, 5.0, 5.0, 5.0, None, 5.0, 5.0),
    ]
    table = to_table(STREAMS["telemetry_summary"], rows)
    assert table.column("count").type == pa.int64()
    assert table.column("std").to_pylist() == [1.0, None]
    assert table.column("window_end").to_pylist()[0] == T0 + timedelta(minutes=1)


def test_dead_letters_keep_raw_bytes() -> None:
    payload = bytes(range(256))
    letters = [DeadLetter("pump-7", "coap", T0, "telemetry: not JSON", payload)]
    table = to_table(STREAMS["dead_letters"], letters)
    assert table.column("payload").to_pylist() == [payload]
    assert table.column("received_at").to_pylist() == [T0]


def test_empty_batch_gives_empty_table_with_schema() -> None:
    table = to_table(STREAMS["dead_letters"], [])
    assert table.num_rows == 0
    assert table.schema == STREAMS["dead_letters"].schema


@pytest.mark.parametrize(
    ("stream", "records", "error", "match"),
    [
        pytest.param(
            "telemetry_points",
            [Reading("d", "k", T0, 1.0), DeadLetter("d", "mqtt", T0, "bad", b"")],
            TypeError,
            r"stream 'telemetry_points': record #1 of type DeadLetter has no attribute 'key' "
            r"\(stream columns: device, key, ts, value, transport\)\. Hint: write only records",
            id="missing-attribute-names-stream-column-record-type",
        ),
        pytest.param(
            "telemetry_points",
            [{"device": "d", "key": "k", "ts": T0, "value": 1.0}],
            TypeError,
            r"stream 'telemetry_points': record #0 of type dict has no key 'transport'",
            id="missing-dict-key",
        ),
        pytest.param(
            "telemetry_points",
            [Reading("d", "k", T0, 1.0), Reading("d", "log", T0, "hello")],
            ValueError,
            r"stream 'telemetry_points': column 'value' expects double; record #1 \(Reading\) "
            r"has value='hello' of type str; Arrow said: .*Hint: text readings \(str values\) "
            r"belong in the 'telemetry_text' stream",
            id="text-value-in-points-stream-hints-at-telemetry-text",
        ),
        pytest.param(
            "telemetry_points",
            [Reading("d", "k", T0, 1.0), Reading("d", "k", datetime(2025, 1, 1, 12), 2.0)],
            ValueError,
            r"stream 'telemetry_points': column 'ts' of record #1 \(Reading\) is a naive "
            r"datetime 2025-01-01T12:00:00; timestamps must be timezone-aware\. "
            r"Hint: datetime\.now",
            id="naive-datetime",
        ),
        pytest.param(
            "telemetry_points",
            [Reading("d", "k", T0, 1.0), Reading("d", "k", None, 2.0)],
            ValueError,
            r"stream 'telemetry_points': time column 'ts' is None in record #1 \(Reading\); "
            r"every row needs a timestamp",
            id="null-time-column",
        ),
    ],
)
def test_to_table_refuses(
    stream: str, records: list[object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        to_table(STREAMS[stream], records)


def test_wrong_value_type_elsewhere_has_no_text_hint() -> None:
    letters = [DeadLetter("d", "mqtt", T0, "bad", 12)]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"column 'payload' expects binary; record #0") as info:
        to_table(STREAMS["dead_letters"], letters)
    assert "Hint" not in str(info.value)


FIELDS = pa.schema([("device", pa.string()), ("ts", UTC_US)])


def test_streamspec_columns() -> None:
    assert StreamSpec("s", FIELDS, "ts").columns == ["device", "ts"]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        pytest.param(
            ("", FIELDS, "ts"),
            ValueError,
            r"StreamSpec\.name must be a non-empty string; got ''",
            id="empty-name",
        ),
        pytest.param(
            ("s", {"ts": UTC_US}, "ts"),
            TypeError,
            r"StreamSpec 's': schema must be a pyarrow\.Schema; got dict",
            id="schema-not-arrow",
        ),
        pytest.param(
            ("s", FIELDS, "when"),
            ValueError,
            r"StreamSpec 's': time_column 'when' is not a column of the schema "
            r"\(columns: device, ts\)",
            id="time-column-missing",
        ),
        pytest.param(
            ("s", pa.schema([("ts", pa.timestamp("us"))]), "ts"),
            ValueError,
            r"StreamSpec 's': time_column 'ts' has type timestamp\[us\]; it must be "
            r"timestamp\[us, tz=UTC\]",
            id="time-column-naive",
        ),
    ],
)
def test_streamspec_validation_errors(
    args: tuple[object, ...], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        StreamSpec(*args)  # type: ignore[arg-type]


_aware = st.datetimes(
    min_value=datetime(1971, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone.min]),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.builds(
            Reading,
            device=st.text(max_size=12),
            key=st.text(min_size=1, max_size=12),
            ts=_aware,
            value=st.floats(allow_nan=True, allow_infinity=True),
            transport=st.sampled_from(["mqtt", "coap", "http"]),
        ),
        max_size=40,
    )
)
def test_round_trip_property(readings: list[Reading]) -> None:
    table = to_table(STREAMS["telemetry_points"], readings)
    assert table.num_rows == len(readings)
    for row, r in zip(table.to_pylist(), readings, strict=True):
        assert (row["device"], row["key"], row["transport"]) == (r.device, r.key, r.transport)
        assert row["ts"] == r.ts
        assert row["ts"].utcoffset() == timedelta(0)
        value = r.value
        assert isinstance(value, float)
        assert row["value"] == value or (math.isnan(value) and math.isnan(row["value"]))


def test_conform_selects_and_casts_arrow_data() -> None:
    spec = STREAMS["telemetry_points"]
    batch = pa.record_batch(
        {
            "extra": pa.array([1, 2]),
            "value": pa.array([1.5, 2.5], pa.float32()),
            "transport": ["mqtt", "http"],
            "ts": pa.array([T0, T0 + timedelta(days=1)], pa.timestamp("ms", tz="Europe/Berlin")),
            "key": ["a", "b"],
            "device": ["d1", "d2"],
        }
    )
    table = conform(spec, batch)
    assert table.schema == spec.schema
    assert table.column("ts").to_pylist() == [T0, T0 + timedelta(days=1)]
    assert table.column("value").to_pylist() == [1.5, 2.5]
    assert conform(spec, pa.Table.from_batches([batch])).equals(table)


def _good() -> pa.Table:
    return to_table(STREAMS["telemetry_points"], [Reading("d", "k", T0, 1.0)])


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        pytest.param(
            lambda: [1],
            TypeError,
            r"stream 'telemetry_points': expected a pyarrow Table or RecordBatch, got list\. "
            r"Hint: use to_table\(\) for records",
            id="not-arrow",
        ),
        pytest.param(
            lambda: _good().select(["device", "ts", "value"]),
            ValueError,
            r"stream 'telemetry_points': Arrow data lacks column\(s\) key, transport; it has "
            r"device, ts, value\. Hint: rename or add",
            id="missing-columns",
        ),
        pytest.param(
            lambda: _good().set_column(2, "ts", _good().column("ts").cast(pa.timestamp("us"))),
            ValueError,
            r"stream 'telemetry_points': Arrow column 'ts' is timestamp\[us\] without a "
            r"timezone; it must be timezone-aware\. Hint: if it holds UTC, use "
            r"pyarrow\.compute\.assume_timezone",
            id="naive-time-column",
        ),
        pytest.param(
            lambda: _good().set_column(3, "value", pa.array(["high"])),
            ValueError,
            r"stream 'telemetry_points': Arrow data does not cast to the stream schema "
            r"\(device: string, .*value: double, transport: string\); Arrow said: .*high",
            id="does-not-cast",
        ),
        pytest.param(
            lambda: _good().set_column(2, "ts", pa.array([None], UTC_US)),
            ValueError,
            r"stream 'telemetry_points': time column 'ts' has 1 null value\(s\) in Arrow data",
            id="null-time-column",
        ),
    ],
)
def test_conform_errors(data: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        conform(STREAMS["telemetry_points"], data())  # type: ignore[arg-type]
