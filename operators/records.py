"""Typed records that flow between transports, codecs, operators and sinks.

Transports hand :class:`RawMessage` to the dataflow; codecs turn it into
:class:`Reading` / :class:`VibrationBlock` records or a :class:`DeadLetter`.
All timestamps are timezone-aware UTC ``datetime`` objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

__all__ = [
    "UTC",
    "DeadLetter",
    "Evict",
    "LogLine",
    "RawMessage",
    "Reading",
    "VibrationBlock",
    "series_key",
]

TELEMETRY = "telemetry"
VIBRATION = "vibration"
LOGS = "logs"
LEVELS = ("trace", "debug", "info", "notice", "warning", "error", "critical")
"""Log levels, least severe first: :attr:`LogLine.level` is one of them."""


@dataclass(frozen=True, slots=True)
class RawMessage:
    """Bytes as a device sent them.

    ``channel`` is the device API channel (``"telemetry"``, ``"vibration"``,
    ``"attributes"`` or ``"logs"``),
    ``transport`` is ``"mqtt"``, ``"coap"`` or ``"http"``. Transports that must
    answer "malformed" at once (HTTP 400, CoAP 4.00) decode on receipt and
    carry the result in ``decoded``, so the flow does not decode twice.
    """

    device: str
    channel: str
    transport: str
    received_at: datetime
    payload: bytes
    decoded: list[Reading] | VibrationBlock | DeadLetter | list[LogLine | DeadLetter] | None = None


@dataclass(frozen=True, slots=True)
class Reading:
    """One telemetry value of one device at one instant.

    ``value`` is a ``float`` for numbers and booleans (``True`` is ``1.0``) and
    a ``str`` for text, which is kept but never fed to numeric operators.
    """

    device: str
    key: str
    ts: datetime
    value: float | str
    transport: str = "mqtt"


@dataclass(frozen=True, slots=True, eq=False)
class VibrationBlock:
    """One decoded EVB1 block: a ``(frames, axes)`` float64 array in m/s².

    The array is never split into Python floats; operators work on it whole.
    """

    device: str
    transport: str
    start_ts: datetime
    sample_rate_hz: int
    samples: np.ndarray
    raw_bytes: int

    @property
    def axes(self) -> int:
        """Number of axes (columns of ``samples``)."""
        return int(self.samples.shape[1])

    @property
    def frames(self) -> int:
        """Number of sample frames (rows of ``samples``)."""
        return int(self.samples.shape[0])


@dataclass(frozen=True, slots=True)
class LogLine:
    """One log line of one device (the ``logs`` channel).

    ``level`` is one of :data:`LEVELS`; ``fields`` holds a JSON line's other
    fields as a compact JSON object text (None when it had none, and for text lines).
    """

    device: str
    transport: str
    ts: datetime
    level: str
    msg: str
    fields: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Something that could not be processed, with a one-line reason.

    Written to the ``dead_letters`` stream; ``payload`` holds the original
    bytes (or the offending record, re-encoded) so nothing is lost.
    """

    device: str
    transport: str
    received_at: datetime
    reason: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Evict:
    """Tells a stateful operator to drop the state of the key it arrives on.

    Sent in a series' own stream, in order with its readings, when the series
    is evicted (idle too long). Operators that keep per-key state flush what
    they hold (a window operator emits its open windows) and forget the key;
    the series' next reading starts it afresh.
    """

    device: str
    key: str


def series_key(device: str, key: str) -> str:
    """Routing key of one telemetry series (a device's key)."""
    return f"{device}/{key}"
