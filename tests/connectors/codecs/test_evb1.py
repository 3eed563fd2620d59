"""Tests for the EVB1 vibration block codec (connectors.codecs.evb1)."""

from __future__ import annotations

import math
import re
import struct
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from connectors.codecs.evb1 import (
    HEADER,
    MAX_START_TS_US,
    MIN_START_TS_US,
    decode_vibration,
    encode_evb1,
)
from operators.records import DeadLetter, RawMessage, VibrationBlock
from tests.conftest import assert_reason_shape, raw_message

RECEIVED = datetime(2025, 11, 22, 9, 30, tzinfo=UTC)
START = datetime(2025, 11, 22, 8, 26, 40, 123_456, tzinfo=UTC)
START_US = 1_763_800_000_123_456
DEVICE = "pump-7"


def make_msg(payload: bytes, *, transport: str = "mqtt") -> RawMessage:
    return raw_message("vibration", payload, RECEIVED, device=DEVICE, transport=transport)


def header(
    *,
    magic: bytes = b"EVB1",
    dtype: int = 2,
    axes: int = 1,
    flags: int = 0,
    rate: int = 1000,
    start_us: int = START_US,
    scale: float = 1.0,
) -> bytes:
    return struct.pack("<4sBBHIqf", magic, dtype, axes, flags, rate, start_us, scale)


def f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


def i16(*values: int) -> bytes:
    return np.array(values, dtype="<i2").tobytes()


def block(payload: bytes, **kw: int) -> VibrationBlock:
    out = decode_vibration(make_msg(payload), **kw)
    assert isinstance(out, VibrationBlock), getattr(out, "reason", out)
    return out


def reason_of(payload: bytes, **kw: int) -> str:
    out = decode_vibration(make_msg(payload), **kw)
    assert isinstance(out, DeadLetter), out
    assert_reason_shape(out.reason, "vibration")
    assert (out.device, out.transport, out.received_at, out.payload) == (
        DEVICE,
        "mqtt",
        RECEIVED,
        payload,
    )
    return out.reason


# --- decoding hand-built blocks ----------------------------------------------------------------


def test_header_is_24_bytes() -> None:
    assert HEADER.size == 24
    assert HEADER.format == "<4sBBHIqf"


def test_decode_int16_interleaved_and_scaled() -> None:
    payload = header(dtype=1, axes=2, rate=25_600, scale=0.5) + i16(1, -2, 3, -4, 5, -6)
    got = block(payload)
    np.testing.assert_array_equal(got.samples, [[0.5, -1.0], [1.5, -2.0], [2.5, -3.0]])
    assert got.samples.dtype == np.float64
    assert got.samples.flags.c_contiguous
    assert (got.frames, got.axes) == (3, 2)
    assert got.sample_rate_hz == 25_600
    assert got.start_ts == START
    assert got.start_ts.tzinfo is not None and got.start_ts.utcoffset() == timedelta(0)
    assert got.raw_bytes == len(payload) == 36
    assert (got.device, got.transport) == (DEVICE, "mqtt")


def test_decode_float32_three_axes() -> None:
    payload = header(dtype=2, axes=3) + f32(0.25, -1.5, 9.81, 1.0, 2.0, 3.0)
    got = block(payload)
    np.testing.assert_array_equal(got.samples, [[0.25, -1.5, np.float32(9.81)], [1.0, 2.0, 3.0]])
    assert got.samples.shape == (2, 3)


def test_decode_float32_applies_scale() -> None:
    got = block(header(dtype=2, scale=2.0) + f32(1.5, -3.0))
    np.testing.assert_array_equal(got.samples, [[3.0], [-6.0]])


def test_samples_do_not_alias_the_payload() -> None:
    payload = header(dtype=2) + f32(1.0, 2.0)
    got = block(payload)
    assert not np.shares_memory(got.samples, np.frombuffer(payload, np.uint8))
    assert got.samples.flags.writeable


def test_transport_is_copied() -> None:
    out = decode_vibration(make_msg(header() + f32(1.0), transport="coap"))
    assert isinstance(out, VibrationBlock)
    assert out.transport == "coap"


def test_sample_rate_at_the_limit_is_accepted() -> None:
    assert block(header(rate=1_000_000) + f32(1.0)).sample_rate_hz == 1_000_000
    assert block(header(rate=2000) + f32(1.0), max_sample_rate_hz=2000).sample_rate_hz == 2000


def test_start_ts_bounds() -> None:
    assert block(header(start_us=MIN_START_TS_US) + f32(1.0)).start_ts == datetime(
        2000, 1, 1, tzinfo=UTC
    )
    last = block(header(start_us=MAX_START_TS_US - 1) + f32(1.0)).start_ts
    assert last == datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bad_max_sample_rate_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"max_sample_rate_hz must be an int of at least 1"):
        decode_vibration(make_msg(header() + f32(1.0)), max_sample_rate_hz=bad)  # type: ignore[arg-type]


# --- dead letters ------------------------------------------------------------------------------

GOOD_BODY = f32(1.0, 2.0, 3.0)

ERRORS: list[tuple[str, bytes, str]] = [
    ("empty", b"", r"block is 0 bytes, shorter than the 24-byte EVB1 header; send the header"),
    ("short", header()[:23], r"block is 23 bytes, shorter than the 24-byte EVB1 header"),
    (
        "magic",
        header(magic=b"XXXX") + GOOD_BODY,
        r"bad magic b'XXXX', expected b'EVB1'; send an EVB1 block \(little-endian header",
    ),
    ("magic-binary", header(magic=b"\x00\n\xff\r") + GOOD_BODY, r"bad magic b'\\x00\\n\\xff\\r'"),
    (
        "magic-json",
        b'{"temperature": 21.5, "humidity": 40}',
        r"""bad magic b'\{"te'.*it looks like JSON; send telemetry to the telemetry channel""",
    ),
    (
        "dtype-0",
        header(dtype=0) + GOOD_BODY,
        r"unknown dtype code 0; use 1 \(int16\) or 2 \(float32\)",
    ),
    ("dtype-3", header(dtype=3) + GOOD_BODY, r"unknown dtype code 3;"),
    ("dtype-255", header(dtype=255) + GOOD_BODY, r"unknown dtype code 255;"),
    (
        "axes-0",
        header(axes=0) + GOOD_BODY,
        r"axes is 0; it must be 1, 2 or 3 \(x, y, z interleaved\)",
    ),
    ("axes-4", header(axes=4) + f32(1, 2, 3, 4), r"axes is 4; it must be 1, 2 or 3"),
    ("flags-1", header(flags=1) + GOOD_BODY, r"flags are 0x0001; reserved flags must be 0"),
    ("flags-high", header(flags=0x8000) + GOOD_BODY, r"flags are 0x8000; reserved flags must be 0"),
    ("rate-0", header(rate=0) + GOOD_BODY, r"sample rate is 0 Hz; it must be greater than 0"),
    (
        "rate-absurd",
        header(rate=2**32 - 1) + GOOD_BODY,
        r"absurd sample rate 4294967295 Hz \(limit 1000000 Hz\); check sample_rate_hz in the",
    ),
    ("rate-over-by-one", header(rate=1_000_001) + GOOD_BODY, r"absurd sample rate 1000001 Hz"),
    (
        "rate-big-endian",
        header(rate=int.from_bytes((25_600).to_bytes(4, "big"), "little")) + GOOD_BODY,
        r"absurd sample rate 6553600 Hz .*byte-swapped it is 25600 Hz: the header must be little",
    ),
    (
        "start-before-2000",
        header(start_us=MIN_START_TS_US - 1) + GOOD_BODY,
        r"start_ts_us 946684799999999 is outside 2000-01-01\.\.2100-01-01; send Unix micro",
    ),
    (
        "start-2100",
        header(start_us=MAX_START_TS_US) + GOOD_BODY,
        r"start_ts_us 4102444800000000 is outside 2000-01-01\.\.2100-01-01;",
    ),
    (
        "start-min-int64",
        header(start_us=-(2**63)) + GOOD_BODY,
        r"start_ts_us -9223372036854775808 is",
    ),
    (
        "start-seconds",
        header(start_us=1_763_800_000) + GOOD_BODY,
        r"outside 2000-01-01\.\.2100-01-01 \(it looks like seconds\)",
    ),
    (
        "start-millis",
        header(start_us=1_763_800_000_000) + GOOD_BODY,
        r"\(it looks like milliseconds\)",
    ),
    (
        "start-nanos",
        header(start_us=1_763_800_000_000_000_000) + GOOD_BODY,
        r"\(it looks like nanoseconds\)",
    ),
    (
        "scale-nan",
        header(scale=math.nan) + GOOD_BODY,
        r"scale is nan; it must be a finite number > 0 \(1\.0 for float32 samples\)",
    ),
    ("scale-inf", header(scale=math.inf) + GOOD_BODY, r"scale is inf; it must be a finite number"),
    ("scale--inf", header(scale=-math.inf) + GOOD_BODY, r"scale is -inf; it must be a finite"),
    ("scale-0", header(scale=0.0) + GOOD_BODY, r"scale is 0\.0; it must be a finite number > 0"),
    ("scale--0", header(scale=-0.0) + GOOD_BODY, r"scale is -0\.0; it must be a finite number"),
    ("scale-neg", header(scale=-1.0) + GOOD_BODY, r"scale is -1\.0; it must be a finite number"),
    (
        "truncated-f32",
        header(axes=3) + f32(1, 2, 3, 4, 5, 6, 7)[:-1],
        r"truncated block: 27 sample bytes is not a multiple of 12 \(3 axes x float32\); "
        r"2 whole frames and 3 bytes left over",
    ),
    (
        "truncated-i16",
        header(dtype=1, axes=2) + i16(1, 2, 3),
        r"truncated block: 6 sample bytes is not a multiple of 4 \(2 axes x int16\); "
        r"1 whole frames and 2 bytes left over",
    ),
    ("odd-byte", header(dtype=1) + b"\x01", r"truncated block: 1 sample bytes is not a multiple"),
    ("no-frames", header(), r"block has a header but no samples; send at least one frame"),
    (
        "f32-nan",
        header(axes=2) + f32(1.0, 2.0, 3.0, math.nan),
        r"1 of 4 float32 samples are not finite, the first is nan at frame 1 axis 1; send finite",
    ),
    (
        "f32-inf",
        header(axes=3) + f32(math.inf, 1.0, -math.inf, 2.0, 3.0, 4.0),
        r"2 of 6 float32 samples are not finite, the first is inf at frame 0 axis 0",
    ),
    ("f32-neg-inf", header() + f32(1.0, -math.inf), r"the first is -inf at frame 1 axis 0"),
]


@pytest.mark.parametrize(
    ("payload", "pattern"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_error_reasons(payload: bytes, pattern: str) -> None:
    reason = reason_of(payload)
    assert re.search(pattern, reason), reason


def test_custom_max_sample_rate() -> None:
    payload = header(rate=48_000) + GOOD_BODY
    assert block(payload).sample_rate_hz == 48_000
    reason = reason_of(payload, max_sample_rate_hz=20_000)
    assert re.search(r"absurd sample rate 48000 Hz \(limit 20000 Hz\)", reason), reason


def test_int16_extremes_are_not_finite_checked() -> None:
    got = block(header(dtype=1, scale=1.0) + i16(-32768, 32767))
    np.testing.assert_array_equal(got.samples[:, 0], [-32768.0, 32767.0])


# --- encoding ----------------------------------------------------------------------------------


def test_encode_float32_layout() -> None:
    data = encode_evb1(
        np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), sample_rate_hz=3200, start_ts=START
    )
    assert data[:24] == header(dtype=2, axes=3, rate=3200, scale=1.0)
    assert data[24:] == f32(1, 2, 3, 4, 5, 6)


def test_encode_one_dimensional_is_one_axis() -> None:
    data = encode_evb1(np.array([1.0, -1.0]), sample_rate_hz=10, start_ts=START)
    got = block(data)
    assert got.samples.shape == (2, 1)


def test_encode_int16_auto_scale_uses_full_range() -> None:
    x = np.array([[0.5, -2.0], [1.0, 0.0]])
    data = encode_evb1(x, sample_rate_hz=1000, start_ts=START, dtype="int16")
    magic, dtype, axes, flags, rate, start_us, scale = HEADER.unpack_from(data)
    assert (magic, dtype, axes, flags, rate, start_us) == (b"EVB1", 1, 2, 0, 1000, START_US)
    assert scale == pytest.approx(2.0 / 32767, rel=1e-7)
    raw = np.frombuffer(data, "<i2", offset=24)
    assert raw.tolist() == [round(0.5 / scale), -32767, round(1.0 / scale), 0]


def test_encode_int16_all_zero_uses_scale_one() -> None:
    data = encode_evb1(np.zeros((4, 2)), sample_rate_hz=1, start_ts=START, dtype="int16")
    assert HEADER.unpack_from(data)[-1] == 1.0
    np.testing.assert_array_equal(block(data).samples, np.zeros((4, 2)))


def test_encode_int16_explicit_scale() -> None:
    x = np.array([0.001, -0.5, 32.0])
    data = encode_evb1(x, sample_rate_hz=1, start_ts=START, dtype="int16", scale=0.001)
    assert np.frombuffer(data, "<i2", offset=24).tolist() == [1, -500, 32000]
    np.testing.assert_allclose(block(data).samples[:, 0], x, rtol=1e-6)


def test_encode_float32_explicit_scale() -> None:
    x = np.array([9.81, -3.5])
    data = encode_evb1(x, sample_rate_hz=1, start_ts=START, scale=0.5)
    assert HEADER.unpack_from(data)[-1] == 0.5
    assert np.frombuffer(data, "<f4", offset=24).tolist() == [np.float32(19.62), -7.0]
    np.testing.assert_allclose(block(data).samples[:, 0], x, rtol=1e-7)


def test_encode_accepts_other_utc_offsets_as_the_same_instant() -> None:
    plus2 = START.astimezone(timezone(timedelta(hours=2)))
    data = encode_evb1(np.ones(1), sample_rate_hz=1, start_ts=plus2)
    assert block(data).start_ts == START


def test_encode_accepts_integer_samples() -> None:
    data = encode_evb1(np.array([1, -2, 3], dtype=np.int32), sample_rate_hz=1, start_ts=START)
    np.testing.assert_array_equal(block(data).samples[:, 0], [1.0, -2.0, 3.0])


ENCODE_ERRORS: list[tuple[str, dict[str, object], str]] = [
    ("dtype", {"dtype": "int8"}, r"dtype must be 'int16' or 'float32', got 'int8'"),
    (
        "3d",
        {"samples": np.zeros((2, 2, 2))},
        r"samples must have shape \(frames,\) or \(frames, axes\)",
    ),
    ("0d", {"samples": np.float64(1.0)}, r"got shape \(\)"),
    (
        "4-axes",
        {"samples": np.zeros((2, 4))},
        r"samples have 4 axes \(shape \(2, 4\)\); EVB1 carries 1",
    ),
    ("0-axes", {"samples": np.zeros((2, 0))}, r"samples have 0 axes"),
    ("empty", {"samples": np.zeros(0)}, r"samples are empty; a block needs at least one frame"),
    ("complex", {"samples": np.ones(2, complex)}, r"samples must be a real-valued numeric array"),
    ("strings", {"samples": np.array(["a"])}, r"real-valued numeric array, got dtype <U1"),
    ("bools", {"samples": np.array([True])}, r"real-valued numeric array, got dtype bool"),
    ("nan", {"samples": np.array([1.0, np.nan])}, r"samples contain NaN or infinity"),
    ("inf", {"samples": np.array([np.inf])}, r"samples contain NaN or infinity"),
    ("rate-0", {"sample_rate_hz": 0}, r"sample_rate_hz must be between 1 and 4294967295, got 0"),
    ("rate-big", {"sample_rate_hz": 2**32}, r"must be between 1 and 4294967295, got 4294967296"),
    ("rate-float", {"sample_rate_hz": 100.0}, r"sample_rate_hz must be an int, got float"),
    ("rate-bool", {"sample_rate_hz": True}, r"sample_rate_hz must be an int, got bool"),
    ("naive", {"start_ts": datetime(2025, 1, 1)}, r"start_ts 2025-01-01T00:00:00 is naive; pass a"),
    ("not-dt", {"start_ts": 1763800000}, r"start_ts must be a datetime, got int"),
    (
        "before-2000",
        {"start_ts": datetime(1999, 12, 31, tzinfo=UTC)},
        r"start_ts 1999-12-31T00:00:00\+00:00 is outside 2000-01-01\.\.2100-01-01 UTC",
    ),
    ("2100", {"start_ts": datetime(2100, 1, 1, tzinfo=UTC)}, r"is outside 2000-01-01\.\.2100"),
    ("scale-0", {"scale": 0.0}, r"scale must be a finite number > 0, got 0\.0"),
    ("scale-neg", {"scale": -1.0}, r"scale must be a finite number > 0, got -1\.0"),
    ("scale-nan", {"scale": math.nan}, r"scale must be a finite number > 0, got nan"),
    ("scale-bool", {"scale": True}, r"scale must be a number, got bool"),
    ("scale-str", {"scale": "1"}, r"scale must be a number, got str"),
    ("scale-f32-overflow", {"scale": 1e39}, r"scale 1e\+39 does not fit a float32; use dtype="),
    ("scale-f32-underflow", {"scale": 1e-50}, r"scale 1e-50 does not fit a float32"),
    (
        "int16-overflow",
        {"dtype": "int16", "scale": 0.001, "samples": np.array([1.0, -40.0])},
        r"samples reach 40 m/s², beyond int16 at scale 0\.001 \(about ±32\.767\); pass a larger",
    ),
    (
        "int16-auto-tiny",
        {"dtype": "int16", "samples": np.array([1e-300])},
        r"scale 3\.05185e-305 \(chosen from the samples' peak\) does not fit a float32",
    ),
    (
        "float32-overflow",
        {"samples": np.array([1e39])},
        r"samples reach 1e\+39 m/s², beyond float32 at scale 1; pass a larger scale",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "pattern"), [e[1:] for e in ENCODE_ERRORS], ids=[e[0] for e in ENCODE_ERRORS]
)
def test_encode_errors(overrides: dict[str, object], pattern: str) -> None:
    kwargs: dict[str, object] = {
        "samples": np.ones((4, 2)),
        "sample_rate_hz": 1000,
        "start_ts": START,
    }
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=pattern):
        encode_evb1(**kwargs)  # type: ignore[arg-type]


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_round_trip_float32_is_exact(axes: int) -> None:
    x = np.random.default_rng(axes).normal(0, 5, size=(257, axes)).astype(np.float32)
    got = block(encode_evb1(x, sample_rate_hz=25_600, start_ts=START))
    assert got.samples.shape == (257, axes)
    np.testing.assert_array_equal(got.samples, x.astype(np.float64))
    assert (got.sample_rate_hz, got.start_ts) == (25_600, START)


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_round_trip_int16_within_quantisation(axes: int) -> None:
    x = np.random.default_rng(axes).normal(0, 5, size=(257, axes))
    data = encode_evb1(x, sample_rate_hz=25_600, start_ts=START, dtype="int16")
    got = block(data)
    assert len(data) == 24 + 257 * axes * 2 == got.raw_bytes
    step = np.max(np.abs(x)) / 32767
    assert np.max(np.abs(got.samples - x)) <= step / 2 * (1 + 1e-6)
    assert (got.sample_rate_hz, got.start_ts) == (25_600, START)


start_times = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2099, 12, 31, 23, 59, 59, 999_999),
    timezones=st.just(UTC),
)
shapes = st.tuples(st.integers(1, 64), st.integers(1, 3))
rates = st.integers(1, 1_000_000)


@given(
    hnp.arrays(
        np.float32, shapes, elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
    ),
    rates,
    start_times,
)
@settings(max_examples=200)
def test_property_float32_round_trip(x: np.ndarray, rate: int, start: datetime) -> None:
    got = block(encode_evb1(x, sample_rate_hz=rate, start_ts=start))
    np.testing.assert_array_equal(got.samples, x.astype(np.float64))
    assert (got.sample_rate_hz, got.start_ts, got.frames, got.axes) == (rate, start, *x.shape)


@given(
    hnp.arrays(np.float64, shapes, elements=st.floats(-1e6, 1e6, allow_subnormal=False)),
    rates,
    start_times,
)
@settings(max_examples=200)
def test_property_int16_round_trip(x: np.ndarray, rate: int, start: datetime) -> None:
    peak = float(np.max(np.abs(x)))
    assume(peak == 0.0 or peak > 1e-30)
    got = block(encode_evb1(x, sample_rate_hz=rate, start_ts=start, dtype="int16"))
    assert got.samples.shape == x.shape
    assert np.max(np.abs(got.samples - x)) <= peak / 32767 / 2 * (1 + 1e-6)
    assert (got.sample_rate_hz, got.start_ts) == (rate, start)


def check_result(payload: bytes, out: VibrationBlock | DeadLetter) -> None:
    if isinstance(out, DeadLetter):
        assert_reason_shape(out.reason, "vibration")
        assert out.payload == payload
        return
    assert isinstance(out, VibrationBlock)
    _, dtype, axes, flags, rate, _, scale = HEADER.unpack_from(payload)
    itemsize = {1: 2, 2: 4}[dtype]
    assert flags == 0 and 1 <= axes <= 3 and 0 < rate <= 1_000_000
    assert math.isfinite(scale) and scale > 0
    assert out.samples.dtype == np.float64
    assert out.samples.shape == (out.frames, axes)
    assert out.frames >= 1
    assert out.frames * axes * itemsize + 24 == len(payload) == out.raw_bytes
    assert np.isfinite(out.samples).all()
    assert datetime(2000, 1, 1, tzinfo=UTC) <= out.start_ts < datetime(2100, 1, 1, tzinfo=UTC)


@given(st.binary(max_size=256))
@settings(max_examples=400)
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    check_result(payload, decode_vibration(make_msg(payload)))


@given(st.binary(min_size=20, max_size=20), st.binary(max_size=64))
@settings(max_examples=400)
def test_arbitrary_bytes_after_magic_never_raise(rest: bytes, body: bytes) -> None:
    payload = b"EVB1" + rest + body
    check_result(payload, decode_vibration(make_msg(payload)))


@given(
    st.sampled_from(["int16", "float32"]),
    st.integers(1, 3),
    st.lists(st.tuples(st.integers(0, 23), st.integers(1, 255)), min_size=1, max_size=6),
    st.integers(0, 4),
)
@settings(max_examples=500)
def test_mutated_headers_never_raise(
    dtype: str, axes: int, flips: list[tuple[int, int]], chop: int
) -> None:
    x = np.linspace(-3.0, 3.0, 8 * axes).reshape(8, axes)
    good = bytearray(encode_evb1(x, sample_rate_hz=4096, start_ts=START, dtype=dtype))  # type: ignore[arg-type]
    for offset, mask in flips:
        good[offset] ^= mask
    payload = bytes(good[: len(good) - chop])
    check_result(payload, decode_vibration(make_msg(payload)))
