"""Encode and decode EVB1 vibration blocks.

An EVB1 block is a 24-byte little-endian header followed by samples
interleaved by axis (``x0 y0 z0 x1 y1 z1 ...``)::

    offset size field           meaning
    0      4    magic           b"EVB1"
    4      1    dtype           1 = int16, 2 = float32
    5      1    axes            1..3
    6      2    flags           0 (reserved)
    8      4    sample_rate_hz  uint32, > 0
    12     8    start_ts_us     int64, Unix microseconds, UTC
    20     4    scale           float32, multiply samples to get m/s²

:func:`decode_vibration` turns a block into one :class:`VibrationBlock` whose
``samples`` is a ``(frames, axes)`` float64 array in m/s², converted in one
vectorised step; a malformed block becomes a :class:`DeadLetter` with a
one-line reason starting with ``"vibration: "``. It never raises for device
input. :func:`encode_evb1` builds blocks, for devices, simulators and tests.
"""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np

from operators.records import DeadLetter, RawMessage, VibrationBlock

__all__ = [
    "DTYPE_FLOAT32",
    "DTYPE_INT16",
    "HEADER",
    "MAGIC",
    "MAX_START_TS_US",
    "MIN_START_TS_US",
    "decode_vibration",
    "encode_evb1",
]

HEADER = struct.Struct("<4sBBHIqf")
"""The 24-byte header: magic, dtype, axes, flags, sample_rate_hz, start_ts_us, scale."""

MAGIC = b"EVB1"
DTYPE_INT16 = 1
DTYPE_FLOAT32 = 2

MIN_START_TS_US = 946_684_800_000_000
"""Earliest accepted ``start_ts_us``: 2000-01-01T00:00:00Z (inclusive)."""

MAX_START_TS_US = 4_102_444_800_000_000
"""Latest accepted ``start_ts_us``: 2100-01-01T00:00:00Z (exclusive)."""

_DTYPES: dict[int, np.dtype] = {
    DTYPE_INT16: np.dtype("<i2"),
    DTYPE_FLOAT32: np.dtype("<f4"),
}
_DTYPE_NAMES = {DTYPE_INT16: "int16", DTYPE_FLOAT32: "float32"}
_CODES = {"int16": DTYPE_INT16, "float32": DTYPE_FLOAT32}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_MIN_START = _EPOCH + timedelta(microseconds=MIN_START_TS_US)
_MAX_START = _EPOCH + timedelta(microseconds=MAX_START_TS_US)
_MAX_UINT32 = 2**32 - 1
_INT16_FULL_SCALE = 32767
_PREFIX = "vibration: "
_MAX_REASON = 200


def decode_vibration(
    msg: RawMessage, *, max_sample_rate_hz: int = 1_000_000
) -> VibrationBlock | DeadLetter:
    """Decode one EVB1 block into a ``(frames, axes)`` float64 array in m/s².

    Returns a :class:`DeadLetter` (never raises) when the block is malformed.
    ``max_sample_rate_hz`` bounds the accepted sample rate; a non-positive
    value is a programming error and raises :class:`ValueError`.
    """
    if (
        isinstance(max_sample_rate_hz, bool)
        or not isinstance(max_sample_rate_hz, int)
        or max_sample_rate_hz < 1
    ):
        err = f"max_sample_rate_hz must be an int of at least 1, got {max_sample_rate_hz!r}"
        raise ValueError(err)

    payload = msg.payload
    size = len(payload)
    if size < HEADER.size:
        return _dead(
            msg,
            f"block is {size} bytes, shorter than the {HEADER.size}-byte EVB1 header; "
            "send the header followed by the samples",
        )
    magic, code, axes, flags, rate, start_us, scale = HEADER.unpack_from(payload)
    if magic != MAGIC:
        hint = (
            "it looks like JSON; send telemetry to the telemetry channel"
            if payload[:1] in (b"{", b"[")
            else "send an EVB1 block (little-endian header, see the device API)"
        )
        return _dead(msg, f"bad magic {magic!r}, expected {MAGIC!r}; {hint}")
    dtype = _DTYPES.get(code)
    if dtype is None:
        return _dead(msg, f"unknown dtype code {code}; use 1 (int16) or 2 (float32)")
    if not 1 <= axes <= 3:
        return _dead(msg, f"axes is {axes}; it must be 1, 2 or 3 (x, y, z interleaved)")
    if flags:
        return _dead(msg, f"flags are 0x{flags:04x}; reserved flags must be 0")
    if rate == 0:
        return _dead(msg, "sample rate is 0 Hz; it must be greater than 0")
    if rate > max_sample_rate_hz:
        return _dead(
            msg,
            f"absurd sample rate {rate} Hz (limit {max_sample_rate_hz} Hz)"
            f"{_swap_hint(rate, max_sample_rate_hz)}; check sample_rate_hz in the header",
        )
    if not MIN_START_TS_US <= start_us < MAX_START_TS_US:
        return _dead(
            msg,
            f"start_ts_us {start_us} is outside 2000-01-01..2100-01-01{_unit_hint(start_us)}; "
            "send Unix microseconds (UTC)",
        )
    if not (math.isfinite(scale) and scale > 0.0):
        return _dead(
            msg,
            f"scale is {scale!r}; it must be a finite number > 0 (1.0 for float32 samples)",
        )

    body = size - HEADER.size
    if body == 0:
        return _dead(msg, "block has a header but no samples; send at least one frame")
    frame_bytes = axes * dtype.itemsize
    if body % frame_bytes:
        return _dead(
            msg,
            f"truncated block: {body} sample bytes is not a multiple of {frame_bytes} "
            f"({axes} axes x {_DTYPE_NAMES[code]}); {body // frame_bytes} whole frames and "
            f"{body % frame_bytes} bytes left over",
        )

    raw = np.frombuffer(payload, dtype=dtype, offset=HEADER.size)
    if code == DTYPE_FLOAT32:
        finite = np.isfinite(raw)
        if not finite.all():
            first = int(np.argmin(finite))
            return _dead(
                msg,
                f"{raw.size - int(np.count_nonzero(finite))} of {raw.size} float32 samples "
                f"are not finite, the first is {raw[first]!s} at frame {first // axes} "
                f"axis {first % axes}; send finite numbers",
            )
    samples = raw.reshape(-1, axes).astype(np.float64)
    if scale != 1.0:
        samples *= scale
    return VibrationBlock(
        device=msg.device,
        transport=msg.transport,
        start_ts=_EPOCH + timedelta(microseconds=start_us),
        sample_rate_hz=rate,
        samples=samples,
        raw_bytes=size,
    )


def encode_evb1(
    samples: np.ndarray,
    *,
    sample_rate_hz: int,
    start_ts: datetime,
    dtype: Literal["int16", "float32"] = "float32",
    scale: float | None = None,
) -> bytes:
    """Build one EVB1 block from samples in m/s².

    ``samples`` has shape ``(frames,)`` (one axis) or ``(frames, axes)`` with
    1..3 axes. For ``"int16"`` without ``scale`` the scale is chosen so the
    largest magnitude maps to 32767 (1.0 when all samples are zero) and values
    are rounded; with an explicit ``scale`` a sample that does not fit int16
    raises. For ``"float32"`` the scale defaults to 1.0 and samples are written
    as they are (divided by ``scale`` when one is given). The scale is stored
    as float32 and the samples are quantised against that stored value, so
    the decoder reproduces them as closely as the format allows.

    Raises :class:`ValueError` for arguments that cannot make a valid block.
    """
    code = _CODES.get(dtype)  # type: ignore[call-overload]
    if code is None:
        msg = f"dtype must be 'int16' or 'float32', got {dtype!r}"
        raise ValueError(msg)
    data = _check_samples(samples)
    frames, axes = data.shape
    rate = _check_rate(sample_rate_hz)
    start_us = _check_start(start_ts)

    if code == DTYPE_INT16:
        auto = scale is None
        if scale is None:
            peak = float(np.max(np.abs(data)))
            scale = peak / _INT16_FULL_SCALE if peak > 0.0 else 1.0
        scale32 = _check_scale(scale, auto=auto)
        quantised = np.rint(data / scale32)
        if auto:
            np.clip(quantised, -_INT16_FULL_SCALE, _INT16_FULL_SCALE, out=quantised)
        elif quantised.min() < -32768 or quantised.max() > 32767:
            peak = float(np.max(np.abs(data)))
            msg = (
                f"samples reach {peak:g} m/s², beyond int16 at scale {scale32:g} "
                f"(about ±{32767 * scale32:g}); pass a larger scale or scale=None"
            )
            raise ValueError(msg)
        body = quantised.astype("<i2").tobytes()
    else:
        scale32 = _check_scale(1.0 if scale is None else scale, auto=False)
        with np.errstate(over="ignore"):
            stored = (data if scale32 == 1.0 else data / scale32).astype("<f4")
        if not np.isfinite(stored).all():
            msg = (
                f"samples reach {float(np.max(np.abs(data))):g} m/s², beyond float32 at "
                f"scale {scale32:g}; pass a larger scale"
            )
            raise ValueError(msg)
        body = stored.tobytes()
    header = HEADER.pack(MAGIC, code, axes, 0, rate, start_us, scale32)
    return header + body


def _check_samples(samples: np.ndarray) -> np.ndarray:
    """Return ``samples`` as a finite ``(frames, axes)`` float64 array or raise."""
    data = np.asarray(samples)
    if data.dtype.kind not in "iuf":
        msg = f"samples must be a real-valued numeric array, got dtype {data.dtype}"
        raise ValueError(msg)
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    elif data.ndim != 2:
        msg = f"samples must have shape (frames,) or (frames, axes), got shape {data.shape}"
        raise ValueError(msg)
    frames, axes = data.shape
    if not 1 <= axes <= 3:
        msg = f"samples have {axes} axes (shape {data.shape}); EVB1 carries 1 to 3 axes"
        raise ValueError(msg)
    if frames == 0:
        msg = "samples are empty; a block needs at least one frame"
        raise ValueError(msg)
    data = data.astype(np.float64, copy=False)
    if not np.isfinite(data).all():
        msg = "samples contain NaN or infinity; EVB1 carries finite values only"
        raise ValueError(msg)
    return data


def _check_rate(sample_rate_hz: int) -> int:
    if isinstance(sample_rate_hz, bool) or not isinstance(sample_rate_hz, int | np.integer):
        msg = f"sample_rate_hz must be an int, got {type(sample_rate_hz).__name__}"
        raise ValueError(msg)
    rate = int(sample_rate_hz)
    if not 1 <= rate <= _MAX_UINT32:
        msg = f"sample_rate_hz must be between 1 and {_MAX_UINT32}, got {rate}"
        raise ValueError(msg)
    return rate


def _check_start(start_ts: datetime) -> int:
    """Return ``start_ts`` as exact Unix microseconds or raise."""
    if not isinstance(start_ts, datetime):
        msg = f"start_ts must be a datetime, got {type(start_ts).__name__}"
        raise ValueError(msg)
    if start_ts.tzinfo is None or start_ts.utcoffset() is None:
        msg = f"start_ts {start_ts.isoformat()} is naive; pass a timezone-aware UTC datetime"
        raise ValueError(msg)
    if not _MIN_START <= start_ts < _MAX_START:
        msg = f"start_ts {start_ts.isoformat()} is outside 2000-01-01..2100-01-01 UTC"
        raise ValueError(msg)
    return (start_ts - _EPOCH) // _ONE_US


def _check_scale(scale: float, *, auto: bool) -> float:
    """Return ``scale`` rounded to float32 (as stored in the header) or raise."""
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.integer | np.floating):
        msg = f"scale must be a number, got {type(scale).__name__}"
        raise ValueError(msg)
    value = float(scale)
    if not (math.isfinite(value) and value > 0.0):
        msg = f"scale must be a finite number > 0, got {value!r}"
        raise ValueError(msg)
    try:
        (stored,) = struct.unpack("<f", struct.pack("<f", value))
    except OverflowError:
        stored = math.inf
    if not (math.isfinite(stored) and stored > 0.0):
        origin = " (chosen from the samples' peak)" if auto else ""
        msg = (
            f"scale {value:g}{origin} does not fit a float32; "
            "use dtype='float32' or rescale the samples"
        )
        raise ValueError(msg)
    return stored


def _swap_hint(rate: int, limit: int) -> str:
    """Point out a byte-swapped (big-endian) sample rate."""
    swapped = int.from_bytes(rate.to_bytes(4, "little"), "big")
    if 0 < swapped <= limit:
        return f", byte-swapped it is {swapped} Hz: the header must be little-endian"
    return ""


def _unit_hint(start_us: int) -> str:
    """Guess the unit of an out-of-range start timestamp, for the error message."""
    for factor, unit in ((1e-6, "seconds"), (1e-3, "milliseconds"), (1e3, "nanoseconds")):
        if MIN_START_TS_US * factor <= start_us < MAX_START_TS_US * factor:
            return f" (it looks like {unit})"
    return ""


def _dead(msg: RawMessage, reason: str) -> DeadLetter:
    reason = _PREFIX + " ".join(reason.splitlines())
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 1] + "…"
    return DeadLetter(msg.device, msg.transport, msg.received_at, reason, msg.payload)
