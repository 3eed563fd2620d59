"""Event-time window aggregates (count, mean, min, max, std, first, last).

Every series (key) has its own event time: the newest ``Reading.ts`` it has
delivered. With ``allowed_lateness`` ``L``:

- **Late** is decided per reading, in journal order, from event time only: a
  reading is late when it is older than its key's newest timestamp minus ``L``
  (``ts < newest - L``). So a device's backlog arriving in order after an
  outage, however long after its timestamps, is never late, and one device
  being ahead never makes another device's readings late. Late readings are
  reported once, and they do not move the key's event time.
- **Closing** is decided by event time only: a window closes when its end is at
  or before ``newest - L``. No reading that is not late can fall into a closed
  window, so what a window holds depends only on the readings of its key and
  their journal order, never on batching, wall-clock time or when a replay
  runs.
- **Quiet flush** is the only use of wall-clock time, and it only decides
  *when* a row appears. An open window is flushed (its summary emitted, the
  window kept open) once its key has been silent, on the wall clock, for
  ``(window end - newest) + L``: the moment the key's watermark would have
  passed the window's end had its event time kept pace with the wall clock. A
  device that keeps sending never gets a flush; one that stops still gets its
  last windows emitted. End of input flushes every open window the same way.
- **Superseding.** A flushed window still takes the readings that event time
  gives it (an in-order backlog after an outage, say). When it then closes by
  event time it is emitted again with its complete contents. For each
  ``(device, key, window_start)`` the row with the highest ``count`` is the
  final one, and it is the same whatever the flush timing: a replay from any
  recovery snapshot yields the same final rows. An unflushed window is
  emitted exactly once; a flushed one that receives nothing more is never
  emitted again.

A key's state (its newest timestamp and its open windows) is part of the
Bytewax recovery snapshot, together with which windows were flushed and at
what count, so a resumed flow makes the same decisions. A key is forgotten
only when an :class:`~operators.records.Evict` arrives on it (``Devices.series``
sends one, in order with the series' readings, when ``limits.series_idle_evict``
evicts the series): its open windows are emitted as a quiet flush would, then
its newest timestamp and windows are dropped, so its next reading starts the
series afresh (and cannot be late).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulBatchLogic
from bytewax.operators.windowing import WindowLogic

from operators.quiet_flush import QuietFlush, wall_clock
from operators.records import Evict, Reading
from operators.window_config import EPOCH as _EPOCH
from operators.window_config import WindowConfig

__all__ = ["Summary", "WindowAggOut", "WindowConfig", "window_aggregate"]

_NO_OUTPUT: tuple[()] = ()


@dataclass(frozen=True)
class Summary:
    """Aggregate of one series over one window (the ``telemetry_summary`` row).

    ``window_start`` is inclusive and ``window_end`` exclusive, both
    timezone-aware UTC. ``std`` is the population standard deviation
    (``ddof=0``), so it is ``0.0`` for a window with one reading. ``first`` and
    ``last`` are the values at the earliest and latest timestamp in the window
    (among equal timestamps, the one that arrived first / last).

    A window flushed while its key was quiet and then given more readings is
    emitted again when it closes; the row with the highest ``count`` for a
    ``(device, key, window_start)`` is the final one.
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
    """One :class:`Summary` per key and window when the window closes or is
    flushed; a flushed window that received more readings afterwards is
    emitted again, complete, when it closes."""

    late: KeyedStream[Reading]
    """Readings older than their key's newest timestamp minus ``allowed_lateness``.

    They are not aggregated. Each late reading appears once, even when it
    belongs to several sliding windows.
    """


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


_SeriesState = tuple[datetime | None, dict[int, tuple[_Acc | None, int]]]
"""Snapshot of one key: ``(newest ts, {window id: (aggregate, count when last
flushed, 0 if never)})``."""

_Event = tuple[int, _Acc] | tuple[None, Reading]
"""``(window id, aggregate)`` for a row, ``(None, reading)`` for a late reading."""


class _SeriesWindows(QuietFlush[Reading | Evict, _Event, _SeriesState]):
    """The open windows and the event time of one key (see the module docstring).

    Lateness and closing read only ``newest`` (event time, in arrival order);
    the wall clock (``quiet_since``, not snapshotted) only schedules flushes.
    """

    __slots__ = (
        "config",
        "flushed",
        "newest",
        "now",
        "quiet_since",
        "span_hi",
        "span_ids",
        "span_lo",
        "step",
        "windows",
    )

    def __init__(
        self,
        config: WindowConfig,
        resume_state: _SeriesState | None,
        now: Callable[[], datetime] = wall_clock,
    ) -> None:
        self.config = config
        self.step = config.step
        self.now = now
        self.newest: datetime | None = None
        self.windows: dict[int, _SummaryLogic] = {}
        self.flushed: dict[int, int] = {}
        # Window ids shared by every instant in [span_lo, span_hi) (see _span); empty at first.
        self.span_ids = (0, -1)
        self.span_lo = self.span_hi = _EPOCH
        if resume_state is not None:
            self.newest, windows = resume_state
            for window_id, (acc, flushed) in windows.items():
                self.windows[window_id] = _SummaryLogic(acc)
                if flushed:
                    self.flushed[window_id] = flushed
        # A resumed key counts as having just spoken: its quiet time starts now.
        self.quiet_since = now()

    def _end(self, window_id: int) -> datetime:
        config = self.config
        return config.align_to + self.step * window_id + config.length

    def _emit(self, window_id: int, out: list[_Event]) -> None:
        """Emit ``window_id`` if it holds numbers not emitted yet."""
        logic = self.windows[window_id]
        if logic.count > self.flushed.get(window_id, 0):
            state = logic.snapshot()
            if state is not None:
                out.append((window_id, state))
            self.flushed[window_id] = logic.count

    def _span(self, ts: datetime) -> None:
        """Cache the window ids of ``ts`` and the interval of instants that share them."""
        config = self.config
        first, last = config.first_window(ts), config.last_window(ts)
        self.span_ids = (first, last)
        try:
            align, step, length = config.align_to, config.step, config.length
            self.span_lo = max(align + step * last, align + length + step * (first - 1))
            self.span_hi = min(align + step * (last + 1), align + length + step * first)
        except OverflowError:  # at the ends of datetime's range: no cache
            self.span_lo = self.span_hi = ts

    def on_batch(self, values: list[Reading | Evict]) -> tuple[list[_Event], bool]:
        """Aggregate the readings that are not late; close what event time closes.

        An :class:`Evict` emits every open window holding numbers not emitted
        yet and forgets the key; with no reading after it the state is discarded.

        Runs of readings that fall in one and the same window are folded in
        local variables and stored once (the same arithmetic, in the same order,
        as :meth:`_SummaryLogic.on_value`).
        """
        out: list[_Event] = []
        if Evict in set(map(type, values)):  # rare: run the readings between evictions
            start = 0
            for i, value in enumerate(values):
                if type(value) is Evict:
                    if i > start:
                        out += self.on_batch(values[start:i])[0]
                    for window_id in self._due():
                        self._emit(window_id, out)
                    self._forget()
                    start = i + 1
            if start < len(values):
                out += self.on_batch(values[start:])[0]
            return out, self.newest is None
        config = self.config
        lateness = config.allowed_lateness
        windows = self.windows
        newest = self.newest
        cutoff = None if newest is None else _minus(newest, lateness)
        span_lo, span_hi = self.span_lo, self.span_hi
        first, last = self.span_ids
        logic: _SummaryLogic | None = None  # the window being folded in locals
        logic_id = None
        n = 0
        device = key = ""
        mean = m2 = lo = hi = first_x = last_x = 0.0
        first_ts = last_ts = _EPOCH
        for reading in values:
            ts = reading.ts
            if newest is None or ts > newest:
                newest = ts
                try:
                    cutoff = ts - lateness
                except OverflowError:
                    cutoff = None
            elif cutoff is not None and ts < cutoff:
                out.append((None, reading))
                continue
            if not span_lo <= ts < span_hi:
                self._span(ts)
                span_lo, span_hi = self.span_lo, self.span_hi
                first, last = self.span_ids
            if first != last:  # sliding windows that overlap: fold into each
                if n:
                    logic._load(  # type: ignore[union-attr]
                        (device, key, n, mean, m2, lo, hi, first_ts, first_x, last_ts, last_x)
                    )
                logic, logic_id, n = None, None, 0
                for window_id in range(first, last + 1):
                    target = windows.get(window_id)
                    if target is None:
                        target = windows[window_id] = _SummaryLogic(None)
                    target.on_value(reading)
                continue
            x = reading.value
            if x.__class__ is str:
                if first not in windows:
                    windows[first] = _SummaryLogic(None)
                continue
            if first != logic_id:
                target = windows.get(first)
                if target is None:
                    target = windows[first] = _SummaryLogic(None)
                if n:
                    logic._load(  # type: ignore[union-attr]
                        (device, key, n, mean, m2, lo, hi, first_ts, first_x, last_ts, last_x)
                    )
                logic, logic_id = target, first
                n = target.count
                if n:
                    (device, key, _, mean, m2, lo, hi, first_ts, first_x, last_ts, last_x) = (
                        target.snapshot()  # type: ignore[misc]
                    )
            if n:
                n += 1
                delta = x - mean
                mean = mean + delta / n
                m2 += delta * (x - mean)
                if x < lo:
                    lo = x
                elif x > hi:
                    hi = x
                if ts >= last_ts:
                    last_ts = ts
                    last_x = x
                elif ts < first_ts:
                    first_ts = ts
                    first_x = x
            else:
                device = reading.device
                key = reading.key
                n = 1
                mean = lo = hi = first_x = last_x = x
                m2 = 0.0
                first_ts = last_ts = ts
        if n:
            logic._load(  # type: ignore[union-attr]
                (device, key, n, mean, m2, lo, hi, first_ts, first_x, last_ts, last_x)
            )
        self.newest = newest
        self.quiet_since = self.now()
        if cutoff is not None:
            # end(w) <= cutoff, in whole microseconds: w <= (cutoff - align - length) // step
            limit = (cutoff - config.align_to - config.length) // self.step
            closing = [w for w in windows if w <= limit]
            if len(closing) > 1:
                closing.sort()
            for window_id in closing:
                self._emit(window_id, out)
                del windows[window_id]
                self.flushed.pop(window_id, None)
        return out, StatefulBatchLogic.RETAIN

    def _forget(self) -> None:
        """Back to the state of a key never seen."""
        self.newest = None
        self.windows = {}
        self.flushed = {}
        self.span_ids = (0, -1)
        self.span_lo = self.span_hi = _EPOCH

    def _due(self) -> list[int]:
        """Open windows holding numbers that were never emitted, oldest first."""
        flushed = self.flushed
        return sorted(w for w, logic in self.windows.items() if logic.count > flushed.get(w, 0))

    def snapshot(self) -> _SeriesState:
        """The key's event time and windows (with their flushed counts)."""
        flushed = self.flushed
        return (
            self.newest,
            {w: (logic.snapshot(), flushed.get(w, 0)) for w, logic in self.windows.items()},
        )


def _minus(ts: datetime, delta: timedelta) -> datetime | None:
    """``ts - delta``, or ``None`` (nothing is late) below ``datetime.min``."""
    try:
        return ts - delta
    except OverflowError:
        return None


@operator
def window_aggregate(
    step_id: str,
    up: KeyedStream[Reading | Evict],
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

    Event time is per key and decides everything but timing (see the module
    docstring for the full rule): a reading older than its key's newest
    timestamp minus ``allowed_lateness`` goes to ``late`` (once, even if it
    falls in several sliding windows) and is not aggregated; a window closes
    and is emitted once its end is at or before that point. A key that goes
    quiet has its open windows flushed after ``end - newest +
    allowed_lateness`` of wall-clock silence, and every open window is flushed
    at end of input; a flushed window that later receives readings is emitted
    again, complete, when it closes (the highest ``count`` wins).

    Only numbers are aggregated: ``str`` readings are skipped (they still
    advance their key's event time). A window that saw no number emits
    nothing. A NaN reading makes the window's mean and std NaN.

    Every setting defaults to the :class:`WindowConfig` default.

    :arg step_id: Unique ID.
    :arg up: Readings keyed by series.
    :arg length: Window length (``> 0``).
    :arg slide: Distance between window starts; ``None`` for tumbling windows.
    :arg allowed_lateness: How far out of order (in the key's event time) a
        reading may be and still be aggregated.
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

    def build(resume_state: _SeriesState | None) -> _SeriesWindows:
        return _SeriesWindows(config, resume_state)

    events = op.stateful_batch("windows", up, build)
    bounds = config.bounds

    def to_summary(event: _Event) -> Summary | None:
        window_id, acc = event
        if window_id is None:
            return None
        device, key, count, mean, m2, lo, hi, _, first, _, last = acc
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

    def late(event: _Event) -> Reading | None:
        window_id, reading = event
        return reading if window_id is None else None

    return WindowAggOut(
        down=op.filter_map_value("summary", events, to_summary),
        late=op.filter_map_value("late", events, late),
    )
