"""Report-by-exception of vibration feature rows: send a row only when it says something new.

A machine that runs steadily produces the same feature row every second.
:func:`report_by_exception` passes a row of a key (``device/axis``) when a
watched feature moved by more than a tolerance since the last row it passed,
the ISO zone changed, an alarm fired on that row, or a heartbeat period of
event time went by; everything else is dropped. Flows send what passes to the
cloud and keep every row locally.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, TypeVar

import bytewax.operators as op
from bytewax.dataflow import Stream, operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from operators.records import Evict
from operators.threshold import Alarm

__all__ = [
    "DEFAULT_FLOORS",
    "HOLD_ROWS",
    "ReportConfig",
    "ReportState",
    "moved",
    "report_by_exception",
]

X = TypeVar("X")

DEFAULT_FLOORS: Final[Mapping[str, float]] = MappingProxyType(
    {
        "rms": 0.01,
        "velocity_rms_mm_s": 0.05,
        "peak": 0.1,
        "crest_factor": 1.0,
        "kurtosis": 0.1,
        "dominant_hz": 1.0,
        "band_energy": 1e-4,
    }
)
"""The watched features and their absolute floors, in the feature's own units.

m/s² for ``rms`` and ``peak``, mm/s for velocity, Hz for ``dominant_hz`` and
(m/s²)² for each band of ``band_energy``; ``crest_factor`` and ``kurtosis``
have no unit. A change smaller than the floor never counts, so a feature
near zero (a quiet band) does not report its noise. ``peak`` and
``crest_factor`` are extremes of a second of samples and scatter by about
5 % from row to row on a steady machine (RMS, velocity and kurtosis by under
1 %), so their floors are wider: 0.1 m/s² and 1.0 (a crest factor of 3.4 on a
healthy machine, 6 and more with impacts).
"""

HOLD_ROWS: Final = 64
"""Rows (and pending alarms) per key kept for alarms that arrive after their row."""

_ZERO = timedelta(0)


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 120:
        text = f"{text[:117]}..."
    return f"{text} ({type(value).__name__})"


@dataclass(frozen=True)
class ReportConfig:
    """Settings of :func:`report_by_exception`, checked when the flow is built.

    :arg tolerance: Relative change that counts, ``0.1`` is 10 % of the last
        passed value.
    :arg heartbeat: Pass a row when this much event time went by since the
        last row passed for a change (``None``: no heartbeat).
    :arg floors: Watched features and their absolute floors; a feature moved
        when ``|new - last| > max(tolerance * |last|, floor)``. ``None`` is
        :data:`DEFAULT_FLOORS`; a mapping replaces it (watch fewer features,
        or others of the row's numeric attributes).
    """

    tolerance: float = 0.1
    heartbeat: timedelta | None = timedelta(minutes=10)
    floors: Mapping[str, float] | None = None
    watched: tuple[tuple[str, float], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tolerance = self.tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real):
            msg = (
                f"report_by_exception `tolerance` must be a number; got {_describe(tolerance)}. "
                "Hint: tolerance=0.1 passes a row when a feature moves more than 10 %."
            )
            raise TypeError(msg)
        if not math.isfinite(tolerance) or tolerance < 0:
            msg = (
                f"report_by_exception `tolerance` must be a finite number >= 0; got "
                f"{tolerance!r}. Hint: 0.1 is 10 % of the last value passed; 0 passes every "
                "change beyond the floors."
            )
            raise ValueError(msg)
        heartbeat = self.heartbeat
        if heartbeat is not None:
            if not isinstance(heartbeat, timedelta):
                msg = (
                    f"report_by_exception `heartbeat` must be a datetime.timedelta or None; "
                    f"got {_describe(heartbeat)}. Hint: heartbeat=timedelta(minutes=10)."
                )
                raise TypeError(msg)
            if heartbeat <= _ZERO:
                msg = (
                    f"report_by_exception `heartbeat` must be longer than zero; got "
                    f"{heartbeat!r}. Hint: None disables it, timedelta(minutes=10) is the default."
                )
                raise ValueError(msg)
        floors = DEFAULT_FLOORS if self.floors is None else self.floors
        if not isinstance(floors, Mapping):
            msg = (
                f"report_by_exception `floors` must be a mapping of feature name to absolute "
                f"floor; got {_describe(floors)}. Hint: floors={{'rms': 0.01, "
                "'velocity_rms_mm_s': 0.05}}."
            )
            raise TypeError(msg)
        if not floors:
            msg = (
                "report_by_exception `floors` is empty, so no feature is watched; got {}. "
                "Hint: leave it None for the default features."
            )
            raise ValueError(msg)
        watched = []
        for name, floor in floors.items():
            if not isinstance(name, str) or not name.isidentifier():
                msg = (
                    f"report_by_exception `floors`: {_describe(name)} is not a feature name. "
                    f"Hint: one of {', '.join(DEFAULT_FLOORS)}."
                )
                raise ValueError(msg)
            if isinstance(floor, bool) or not isinstance(floor, numbers.Real):
                msg = (
                    f"report_by_exception `floors[{name!r}]` must be a number; got "
                    f"{_describe(floor)}. Hint: the smallest change that counts, in the "
                    "feature's units, e.g. 0.05."
                )
                raise TypeError(msg)
            if not math.isfinite(floor) or floor < 0:
                msg = (
                    f"report_by_exception `floors[{name!r}]` must be a finite number >= 0; got "
                    f"{floor!r}. Hint: 0 lets the relative tolerance alone decide."
                )
                raise ValueError(msg)
            watched.append((name, float(floor)))
        object.__setattr__(self, "tolerance", float(tolerance))
        object.__setattr__(self, "watched", tuple(watched))


def _scalar_moved(old: object, new: object, tolerance: float, floor: float) -> bool:
    if old is None or new is None:
        return old is not new
    try:
        a = float(old)  # type: ignore[arg-type]
        b = float(new)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return old != new
    if not (math.isfinite(a) and math.isfinite(b)):
        return not (a == b or (a != a and b != b))
    return abs(b - a) > max(tolerance * abs(a), floor)


def moved(config: ReportConfig, last: object, row: object) -> str | None:
    """The first watched feature of ``row`` that moved beyond tolerance since ``last``, or None.

    Sequences (``band_energy``) move when their length changes or any element
    moves; ``None`` to a number and back is a move.
    """
    tolerance = config.tolerance
    for name, floor in config.watched:
        old = getattr(last, name, None)
        new = getattr(row, name, None)
        if isinstance(old, tuple | list) or isinstance(new, tuple | list):
            if not isinstance(old, tuple | list) or not isinstance(new, tuple | list):
                return name
            if len(old) != len(new):
                return name
            if any(_scalar_moved(a, b, tolerance, floor) for a, b in zip(old, new, strict=True)):
                return name
        elif _scalar_moved(old, new, tolerance, floor):
            return name
    return None


@dataclass(slots=True)
class ReportState:
    """State of one key, small enough for Bytewax recovery snapshots.

    :arg last: The last row passed for a change, a zone change or the
        heartbeat: what the next rows are compared with.
    :arg recent: The newest rows seen (at most :data:`HOLD_ROWS`) as
        ``(ts, row)``; ``row`` is None once passed. Only kept when the step
        has an alarm stream: an alarm that arrives after its row finds it here.
    :arg pending: Alarm times (at most :data:`HOLD_ROWS`) newer than every row
        seen: the first row at or after such a time is passed.
    :arg newest: Newest row ``ts`` seen.
    """

    last: Any = None
    recent: list[tuple[datetime, Any]] = field(default_factory=list)
    pending: list[datetime] = field(default_factory=list)
    newest: datetime | None = None


class _ReportLogic(StatefulBatchLogic[Any, Any, ReportState]):
    def __init__(self, config: ReportConfig, hold: bool, state: ReportState | None) -> None:
        self.config = config
        self.hold = hold
        self.state = state if state is not None else ReportState()

    def on_batch(self, values: list[Any]) -> tuple[list[Any], bool]:
        out: list[Any] = []
        for item in values:
            kind = type(item)
            if kind is Evict:
                self.state = ReportState()
            elif kind is Alarm:
                self._alarm(item, out)
            else:
                self._row(item, out)
        state = self.state
        empty = state.last is None and not state.pending and not state.recent
        return out, empty

    def _alarm(self, alarm: Alarm, out: list[Any]) -> None:
        state = self.state
        ts = alarm.ts
        if state.newest is None or ts > state.newest:
            if ts not in state.pending:
                state.pending.append(ts)
                del state.pending[:-HOLD_ROWS]
            return
        for i in range(len(state.recent) - 1, -1, -1):  # the row at or just before the alarm
            row_ts, row = state.recent[i]
            if row_ts <= ts:
                if row is not None:
                    out.append(row)
                    state.recent[i] = (row_ts, None)
                return

    def _row(self, row: Any, out: list[Any]) -> None:
        state = self.state
        config = self.config
        ts = row.ts
        last = state.last
        if last is None:
            send = True
        elif ts < last.ts:
            send = True  # out of order: passed through, the reference stays
        else:
            heartbeat = config.heartbeat
            send = (
                getattr(row, "iso_zone", None) != getattr(last, "iso_zone", None)
                or (heartbeat is not None and ts - last.ts >= heartbeat)
                or moved(config, last, row) is not None
            )
            if send:
                state.last = row
        if last is None:
            state.last = row
        if state.pending:
            due = [t for t in state.pending if t <= ts]
            if due:
                state.pending = [t for t in state.pending if t > ts]
                send = True
        if send:
            out.append(row)
        if self.hold:
            state.recent.append((ts, None if send else row))
            del state.recent[:-HOLD_ROWS]
        if state.newest is None or ts > state.newest:
            state.newest = ts

    def snapshot(self) -> ReportState:
        state = self.state
        return ReportState(state.last, list(state.recent), list(state.pending), state.newest)


@operator
def report_by_exception(
    step_id: str,
    up: KeyedStream[X],
    *,
    tolerance: float = ReportConfig.tolerance,
    heartbeat: timedelta | None = ReportConfig.heartbeat,
    floors: Mapping[str, float] | None = None,
    alarms: KeyedStream[Alarm] | None = None,
) -> KeyedStream[X]:
    """Pass a feature row only when something changed; drop the rows that repeat the last one.

    Rows are any records with a timezone-aware ``ts``, an ``iso_zone`` and the
    watched features as attributes (the spectral operator's
    :class:`~operators.spectral.Features`), keyed by monitored entity
    (``device/axis``). Per key, in event time, a row passes when:

    - it is the key's first row (or the first after an
      :class:`~operators.records.Evict`, which drops the key's state);
    - its ``iso_zone`` differs from the reference row's;
    - a watched feature moved: ``|new - ref| > max(tolerance * |ref|, floor)``
      (see :func:`moved`), each band of ``band_energy`` on its own;
    - ``heartbeat`` of event time went by since the reference row;
    - an alarm of ``alarms`` (keyed the same, e.g. the
      :func:`~operators.threshold.threshold` step on the same rows) has its
      ``ts`` at this row: the row at or just before the alarm's ``ts`` passes,
      whether the alarm arrives before or after it;
    - its ``ts`` is older than the reference row's (out of order: passed
      through, nothing else changes).

    The reference row is the last row passed for the first three reasons or
    the heartbeat; a row passed only for an alarm is sent in addition and
    does not become the reference. So which rows pass depends only on the
    rows and the alarms, not on how their two streams interleave, and a
    replay after a crash passes the same rows. Every dropped row is within
    tolerance of its reference row, in its zone and less than ``heartbeat``
    after it.

    State per key is the reference row and, with ``alarms``, the last
    :data:`HOLD_ROWS` rows seen and at most as many pending alarm times: an
    alarm more than that many rows late passes nothing (it reaches the
    ``alarms`` stream all the same).

    :arg step_id: Unique ID.
    :arg up: Feature rows keyed by monitored entity.
    :arg tolerance: Relative change that counts (``0.1`` = 10 %).
    :arg heartbeat: Event time after which a row passes anyway, or ``None``.
    :arg floors: Watched features and absolute floors (``None``:
        :data:`DEFAULT_FLOORS`).
    :arg alarms: Alarms keyed like ``up`` whose rows always pass, or ``None``.
    :returns: The rows that pass, keyed like ``up``.
    :raises TypeError: When a setting has the wrong type (while the flow is built).
    :raises ValueError: When a setting is out of range (while the flow is built).
    """
    config = ReportConfig(tolerance=tolerance, heartbeat=heartbeat, floors=floors)
    if alarms is not None and not isinstance(alarms, Stream):
        msg = (
            f"report_by_exception {step_id!r}: `alarms` must be a keyed stream of alarms or "
            f"None; got {_describe(alarms)}. Hint: pass the output of the threshold step on "
            "the same rows, e.g. alarms=threshold('alarms', rows, rules=...)."
        )
        raise TypeError(msg)
    items: Stream[Any] = up if alarms is None else op.merge("with_alarms", up, alarms)
    hold = alarms is not None

    def build(resume: ReportState | None) -> _ReportLogic:
        return _ReportLogic(config, hold, resume)

    return op.stateful_batch("report", items, build)
