"""The decode dispatcher under fuzzing: any channel, any bytes, any limit; never an exception.

The per-format fuzzers live in test_telemetry_json.py and test_evb1.py; this
one mixes valid, damaged and foreign payloads of both formats on every
channel, as a broker or a misconfigured device delivers them, with NumPy
warnings turned into errors.
"""

from __future__ import annotations

import json
import math
import warnings
from datetime import UTC, datetime

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.codecs.decode import decode, refused_channel
from connectors.codecs.evb1 import HEADER, MAGIC
from operators.records import DeadLetter, LogLine, Reading, VibrationBlock
from tests.conftest import assert_reason_shape, raw_message

RECEIVED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
START_US = 1_763_800_000_000_000


@st.composite
def evb1_like(draw: st.DrawFn) -> bytes:
    """A well-formed EVB1 header over arbitrary sample bytes (NaN and inf bit patterns too)."""
    code = draw(st.sampled_from([1, 2]))
    axes = draw(st.integers(1, 3))
    frames = draw(st.integers(0, 40))
    body = draw(st.binary(min_size=frames * axes * 2 * code, max_size=frames * axes * 2 * code))
    scale = draw(st.floats(width=32) | st.sampled_from([1.0, 3.4e38, 1e-45]))
    rate = draw(st.sampled_from([1, 25_600, 1_000_000, 2**32 - 1]))
    start = draw(st.sampled_from([START_US, 0, -1, 2**63 - 1]))
    return HEADER.pack(MAGIC, code, axes, 0, rate, start, scale) + body


telemetry_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
).map(lambda v: json.dumps(v).encode())
payloads = st.one_of(
    st.binary(max_size=300),
    evb1_like(),
    telemetry_docs,
    evb1_like().map(lambda b: b[: len(b) // 2]),  # truncated
    telemetry_docs.map(lambda b: b"\xef\xbb\xbf" + b),  # BOM
)
channels = (
    st.sampled_from(["telemetry", "vibration", "attributes", "logs"])
    | st.text(max_size=10)
    | st.text(max_size=20).map(refused_channel)
)


@given(channel=channels, payload=payloads, limit=st.integers(1, 400))
@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
def test_decode_never_raises_for_any_channel_payload_or_limit(
    channel: str, payload: bytes, limit: int
) -> None:
    msg = raw_message(channel, payload, RECEIVED, transport="coap")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode(msg, max_payload_bytes=limit)
    if isinstance(out, DeadLetter):
        assert (out.device, out.transport, out.received_at) == ("pump-7", "coap", RECEIVED)
        if len(payload) > limit:
            assert out.payload == payload[:limit]
            assert out.reason == (
                f"{channel}: payload of {len(payload)} bytes is over the {limit}-byte limit; "
                "split it or raise max_payload_bytes (first bytes kept)"
            )
        elif channel in ("telemetry", "vibration", "attributes", "logs"):
            assert out.payload == payload
            assert_reason_shape(out.reason, channel)
        elif channel.startswith("refused: "):
            assert (out.reason, out.payload) == (channel.removeprefix("refused: "), payload)
        else:
            assert out.reason == (
                f"unknown channel {channel!r}; expected 'telemetry', 'vibration', 'attributes' "
                "or 'logs'"
            )
        return
    assert len(payload) <= limit
    if channel == "vibration":
        assert isinstance(out, VibrationBlock)
        assert out.samples.dtype == np.float64 and np.isfinite(out.samples).all()
        assert out.raw_bytes == len(payload)
        return
    assert channel in ("telemetry", "attributes", "logs") and isinstance(out, list)
    if channel == "logs":
        assert any(isinstance(x, LogLine) for x in out)
        for x in out:
            if isinstance(x, DeadLetter):
                assert_reason_shape(x.reason, channel)
            else:
                assert x.device == "pump-7" and x.ts.utcoffset() is not None
        return
    if channel == "attributes":
        assert all(json.loads(a.value) is not None for a in out)
        return
    for reading in out:
        assert isinstance(reading, Reading) and reading.device == "pump-7"
        assert reading.ts.utcoffset() is not None
        assert isinstance(reading.value, str) or math.isfinite(reading.value)


def test_a_refused_channel_decodes_to_a_dead_letter_with_its_reason() -> None:
    reason = "gateway 'gw-1' may not speak for device 'pump-1'"
    msg = raw_message(refused_channel(reason), b'{"pump-1": {"t": 1}}', RECEIVED, device="gw-1")
    assert decode(msg) == DeadLetter("gw-1", "mqtt", RECEIVED, reason, b'{"pump-1": {"t": 1}}')
