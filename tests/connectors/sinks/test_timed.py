from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.sinks.timed import encode_buffer
from connectors.streams import STREAMS, to_table
from operators.records import Reading

POINTS = "telemetry_points"

finite = st.floats(allow_nan=False, allow_infinity=False)
reading = st.builds(
    Reading,
    device=st.text(min_size=1, max_size=12),
    key=st.text(min_size=1, max_size=12),
    ts=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    value=finite,
    transport=st.sampled_from(["mqtt", "http", "coap"]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(reading, max_size=40))
def test_encoded_buffers_read_back_as_the_same_rows(rows: list[Reading]) -> None:
    table = to_table(STREAMS[POINTS], rows)
    assert pa.ipc.open_stream(encode_buffer(table)).read_all().equals(table)
