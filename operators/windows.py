"""Event-time window aggregates (count, mean, min, max, std, first, last).

Built on Bytewax's windowing: an :class:`~bytewax.operators.windowing.EventClock`
per key and a tumbling or sliding windower, so every series has its own event
time and one device being ahead never makes another device's readings late.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from operator import attrgetter

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream
from bytewax.operators.windowing import (
    EventClock,
    SlidingWindower,
    TumblingWindower,
    WindowLogic,
    _EventClockLogic,
    _EventClockState,
    window,
)

from operators.records import Reading

__all__ = ["SeriesClock", "Summary", "WindowAggOut", "WindowConfig", "window_aggregate"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ZERO = timedelta(0)
_NO_OUTPUT: tuple[()] = ()


@dataclass(frozen=True)
class Summary:
    """Aggregate of one series over one window (the ``telemetry_summary`` row).

    ``window_start`` is inclusive and ``window_end`` exclusive, both
    timezone-aware UTC. ``std`` is the population standard deviation
    (``ddof=0``), so it is ``0.0`` for a window with one reading. ``first`` and
    ``last`` are the values at the earliest and latest timestamp in the window
    (among equal timestamps, the one that arrived first / last).
    """

    device: str
    key: str
    window_start: datetime
    window_end: datetime
    count: int
    mean: float
    min: float
    max: float
    std: float
    first: float
    last: float


@dataclass(frozen=True)
class WindowAggOut:
    """Streams returned from :func:`window_aggregate`."""

    down: KeyedStream[Summary]
    """One :class:`Summary` per key and window, when the window closes."""

    late: KeyedStream[Reading]
    """Readings older than their key's watermark when they arrived.

    They are not aggregated. Each late reading appears once, even when it
    belongs to several sliding windows.
    """


class _SeriesClockLogic(_EventClockLogic[Reading]):
    """Bytewax's event clock, waking up when this key's watermark is due.

    The stock clock asks to be woken at the window's close time read as a
    system time. A device whose clock lags the edge's (or replayed data) then
    asks for a wake-up in the past until its watermark catches up, and the
    worker spins. This maps the close time through the key's own watermark
    (``watermark_base`` at ``system_time_of_max_event``, advancing with system
    time) instead; the watermark itself is unchanged.
    """

    def to_system_utc(self, timestamp: datetime) -> datetime | None:
        state = self.state
        try:
            return state.system_time_of_max_event + (timestamp - state.watermark_base)
        except OverflowError:
            return None


@dataclass
class SeriesClock(EventClock[Reading]):
    """``EventClock`` on ``Reading.ts`` with wake-ups on the key's own watermark.

    Same timestamps and watermarks as :class:`~bytewax.operators.windowing.EventClock`
    (one clock per key); only the system time at which Bytewax wakes the
    operator to close windows differs, so devices with skewed clocks neither
    busy-wait nor have their windows closed late.
    """

    def build(self, resume_state: _EventClockState | None) -> _SeriesClockLogic:
        """Build the clock logic of one key."""
        if resume_state is None:
            return _SeriesClockLogic(
                self.now_getter,
                self.ts_getter,
                self.to_system_utc,
                self.wait_for_system_duration,
            )
        return _SeriesClockLogic(
            self.now_getter,
            self.ts_getter,
            self.to_system_utc,
            self.wait_for_system_duration,
            resume_state,
        )


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class WindowConfig:
    """Settings of :func:`window_aggregate`, checked when the flow is built.

    :arg length: Window length (``> 0``).
    :arg slide: Distance between the starts of adjacent windows, ``0 < slide
        <= length``; ``None`` means tumbling windows (``slide = length``).
    :arg allowed_lateness: How far behind a key's newest timestamp a reading
        may be and still be aggregated (``>= 0``). The watermark of a key is
        its newest timestamp minus this, and it also advances with system time
        elapsed since that newest reading arrived (Bytewax's ``EventClock``).
    :arg align_to: An instant that starts a window; timezone-aware UTC.
    """

    length: timedelta
    slide: timedelta | None = None
    allowed_lateness: timedelta = timedelta(seconds=5)
    align_to: datetime = _EPOCH

    def __post_init__(self) -> None:
        for name in ("length", "slide", "allowed_lateness"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) and not (name == "slide" and value is None):
                msg = (
                    f"window_aggregate `{name}` must be a datetime.timedelta; got "
                    f"{_describe(value)}. Hint: {name}=timedelta(seconds=10)."
                )
                raise TypeError(msg)
        if self.length <= _ZERO:
            msg = (
                f"window_aggregate `length` must be longer than zero; got {self.length!r}. "
                "Hint: length=timedelta(seconds=10)."
            )
            raise ValueError(msg)
        if self.slide is not None and not _ZERO < self.slide <= self.length:
            msg = (
                f"window_aggregate `slide` must be > 0 and <= `length` ({self.length!r}); "
                f"got {self.slide!r}. Hint: a slide longer than the window would leave "
                "gaps that no window covers; leave slide=None for tumbling windows."
            )
            raise ValueError(msg)
        if self.allowed_lateness < _ZERO:
            msg = (
                f"window_aggregate `allowed_lateness` must be >= 0; got "
                f"{self.allowed_lateness!r}. Hint: timedelta(0) treats any reading older "
                "than the newest one of its series as late."
            )
            raise ValueError(msg)
        if not isinstance(self.align_to, datetime):
            msg = (
                f"window_aggregate `align_to` must be a datetime; got "
                f"{_describe(self.align_to)}. Hint: datetime(1970, 1, 1, tzinfo=UTC)."
            )
            raise TypeError(msg)
        if self.align_to.utcoffset() != _ZERO:
            msg = (
                f"window_aggregate `align_to` must be timezone-aware UTC; got "
                f"{self.align_to.isoformat()} (tzinfo={self.align_to.tzinfo!r}). "
                "Hint: datetime(..., tzinfo=UTC), or .astimezone(UTC) for an aware time."
            )
            raise ValueError(msg)
        object.__setattr__(self, "align_to", self.align_to.astimezone(UTC))

    @property
    def step(self) -> timedelta:
        """Distance between window starts (``slide``, or ``length`` if tumbling)."""
        return self.length if self.slide is None else self.slide

    def windower(self) -> TumblingWindower | SlidingWindower:
        """Build the Bytewax windower for these settings."""
        if self.slide is None or self.slide == self.length:
            return TumblingWindower(length=self.length, align_to=self.align_to)
        return SlidingWindower(length=self.length, offset=self.slide, align_to=self.align_to)

    def clock(self) -> SeriesClock:
        """Build the event-time clock for these settings (one per key)."""
        return SeriesClock(
            ts_getter=attrgetter("ts"), wait_for_system_duration=self.allowed_lateness
        )

    def bounds(self, window_id: int) -> tuple[datetime, datetime]:
        """``(start, end)`` of a window, exactly as Bytewax's windower computes them."""
        start = self.align_to + self.step * window_id
        return start, start + self.length

    def first_window(self, ts: datetime) -> int:
        """ID of the earliest window that contains ``ts``."""
        return (ts - self.align_to - self.length) // self.step + 1


_Acc = tuple[str, str, int, float, float, float, float, datetime, float, datetime, float]
"""Snapshot of one window: ``(device, key, count, mean, m2, min, max,
first_ts, first, last_ts, last)``; ``m2`` is Welford's sum of squared
deviations."""


class _SummaryLogic(WindowLogic[Reading, _Acc, _Acc | None]):
    """Running aggregate of one window of one key (Welford's algorithm).

    Values are folded in arrival order; ``first``/``last`` follow timestamps.
    """

    __slots__ = (
        "device",
        "key",
        "count",
        "mean",
        "m2",
        "min",
        "max",
        "first_ts",
        "first",
        "last_ts",
        "last",
    )

    def __init__(self, resume_state: _Acc | None) -> None:
        self.count = 0
        if resume_state is not None:
            self._load(resume_state)

    def _load(self, state: _Acc) -> None:
        (
            self.device,
            self.key,
            self.count,
            self.mean,
            self.m2,
            self.min,
            self.max,
            self.first_ts,
            self.first,
            self.last_ts,
            self.last,
        ) = state

    def on_value(self, value: Reading) -> tuple[()]:
        x = value.value
        if x.__class__ is str:
            return _NO_OUTPUT
        n = self.count
        ts = value.ts
        if n:
            n += 1
            self.count = n
            delta = x - self.mean
            mean = self.mean + delta / n
            self.mean = mean
            self.m2 += delta * (x - mean)
            if x < self.min:
                self.min = x
            elif x > self.max:
                self.max = x
            if ts >= self.last_ts:
                self.last_ts = ts
                self.last = x
            elif ts < self.first_ts:
                self.first_ts = ts
                self.first = x
        else:
            self.device = value.device
            self.key = value.key
            self.count = 1
            self.mean = self.min = self.max = self.first = self.last = x
            self.m2 = 0.0
            self.first_ts = self.last_ts = ts
        return _NO_OUTPUT

    def on_merge(self, original: _SummaryLogic) -> tuple[()]:
        """Combine another window's aggregate (Chan et al.); windows here never merge."""
        if not original.count:
            return _NO_OUTPUT
        if not self.count:
            state = original.snapshot()
            if state is not None:
                self._load(state)
            return _NO_OUTPUT
        n_a, n_b = self.count, original.count
        n = n_a + n_b
        delta = original.mean - self.mean
        self.mean += delta * n_b / n
        self.m2 += original.m2 + delta * delta * n_a * n_b / n
        self.count = n
        self.min = min(self.min, original.min)
        self.max = max(self.max, original.max)
        if original.first_ts < self.first_ts:
            self.first_ts, self.first = original.first_ts, original.first
        if original.last_ts >= self.last_ts:
            self.last_ts, self.last = original.last_ts, original.last
        return _NO_OUTPUT

    def on_close(self) -> tuple[_Acc] | tuple[()]:
        state = self.snapshot()
        return _NO_OUTPUT if state is None else (state,)

    def snapshot(self) -> _Acc | None:
        if not self.count:
            return None
        return (
            self.device,
            self.key,
            self.count,
            self.mean,
            self.m2,
            self.min,
            self.max,
            self.first_ts,
            self.first,
            self.last_ts,
            self.last,
        )


@operator
def window_aggregate(
    step_id: str,
    up: KeyedStream[Reading],
    *,
    length: timedelta,
    slide: timedelta | None = WindowConfig.slide,
    allowed_lateness: timedelta = WindowConfig.allowed_lateness,
    align_to: datetime = WindowConfig.align_to,
) -> WindowAggOut:
    """Summarise each series over tumbling or sliding event-time windows.

    Per key (flows key by :func:`operators.records.series_key`) and window,
    emits a :class:`Summary` with count, mean, min, max, population standard
    deviation (``ddof=0``; ``0.0`` for a single reading), and the first and
    last values by timestamp. Window ``i`` spans ``[align_to + i * slide,
    align_to + i * slide + length)``.

    Event time is per key: each key has its own Bytewax ``EventClock`` (see
    :class:`SeriesClock`), whose watermark is the key's newest ``Reading.ts``
    minus ``allowed_lateness`` (plus system time elapsed since that reading
    arrived). A window is emitted once the watermark reaches its end, also
    when the key receives nothing more, and every open window is emitted at
    end of input. A reading older than the watermark goes to ``late`` (once,
    even if it falls in several sliding windows) and is not aggregated.

    Only numbers are aggregated: ``str`` readings are skipped (they still
    advance their key's event time). A window that saw no number emits
    nothing. A NaN reading makes the window's mean and std NaN.

    Every setting defaults to the :class:`WindowConfig` default.

    :arg step_id: Unique ID.
    :arg up: Readings keyed by series.
    :arg length: Window length (``> 0``).
    :arg slide: Distance between window starts; ``None`` for tumbling windows.
    :arg allowed_lateness: How long to wait for out-of-order readings.
    :arg align_to: An instant that starts a window, timezone-aware UTC.
    :returns: ``down`` (summaries) and ``late`` (late readings), both keyed
        like ``up``.
    :raises ValueError: When a setting is out of range (while the flow is
        built).
    :raises TypeError: When a setting has the wrong type.
    """
    config = WindowConfig(
        length=length, slide=slide, allowed_lateness=allowed_lateness, align_to=align_to
    )
    out = window(
        "window",
        up,
        config.clock(),
        config.windower(),
        _SummaryLogic,
        ordered=False,
    )

    bounds = config.bounds

    def to_summary(id_acc: tuple[int, _Acc]) -> Summary:
        window_id, (device, key, count, mean, m2, lo, hi, _, first, _, last) = id_acc
        start, end = bounds(window_id)
        return Summary(
            device=device,
            key=key,
            window_start=start,
            window_end=end,
            count=count,
            mean=float(mean),
            min=float(lo),
            max=float(hi),
            std=math.sqrt(m2 / count) if count > 1 else 0.0,
            first=float(first),
            last=float(last),
        )

    first_window = config.first_window

    def once(id_reading: tuple[int, Reading]) -> Reading | None:
        window_id, reading = id_reading
        return reading if window_id == first_window(reading.ts) else None

    return WindowAggOut(
        down=op.map_value("summary", out.down, to_summary),
        late=op.filter_map_value("late_once", out.late, once),
    )
