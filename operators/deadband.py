"""Deadband (exception) filtering of telemetry series.

A deadband keeps a reading only when it differs enough from the last reading
that was kept for the same series, optionally with a heartbeat so a quiet
series still reports now and then. It is the "exception deviation" /
"ExcMax" pair of process historians, applied per key in event time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from operators.records import Evict, Reading

__all__ = ["DeadbandConfig", "DeadbandState", "deadband"]

_NAN = math.nan
_NEVER = datetime.max.replace(tzinfo=UTC)
_NO_OUTPUT: tuple[()] = ()

DeadbandState = tuple[float | str, datetime, float, datetime]
"""Per-key state: ``(last_value, last_ts, tolerance, heartbeat_due)``.

``last_value``/``last_ts`` are the value and timestamp of the last kept
reading, ``tolerance`` is the band around ``last_value`` (computed once when a
reading is kept) and ``heartbeat_due`` is ``last_ts + max_silence`` (the far
future without a heartbeat). A plain tuple, so it pickles into recovery snapshots.
"""


def _check_tolerance(name: str, value: object, hint: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = (
            f"deadband `{name}` must be a number; got {value!r} "
            f"({type(value).__name__}). Hint: {hint}"
        )
        raise TypeError(msg)
    if not math.isfinite(value) or value < 0:
        msg = f"deadband `{name}` must be a finite number >= 0; got {value!r}. Hint: {hint}"
        raise ValueError(msg)


@dataclass(frozen=True)
class DeadbandConfig:
    """Settings of :func:`deadband`, checked when the flow is built.

    :arg absolute: Keep a reading when it moves more than this many units away
        from the last kept value. ``0`` keeps every change.
    :arg percent: Keep a reading when it moves more than this percentage of
        ``|last kept value|`` away from it.
    :arg max_silence: Heartbeat: also keep a reading when at least this much
        event time has passed since the last kept reading of the key.

    At least one of ``absolute`` and ``percent`` must be set. When both are
    set, a reading must move beyond both bands (the wider one) to be kept.
    """

    absolute: float | None = None
    percent: float | None = None
    max_silence: timedelta | None = None

    def __post_init__(self) -> None:
        if self.absolute is None and self.percent is None:
            msg = (
                "deadband needs `absolute` or `percent` (or both); got neither. "
                "Hint: absolute=0.5 keeps a reading when it moves more than 0.5 units "
                "from the last kept value, percent=1.0 when it moves more than 1%."
            )
            raise ValueError(msg)
        _check_tolerance(
            "absolute", self.absolute, "give the band in the series' own units, e.g. 0.5."
        )
        _check_tolerance("percent", self.percent, "give a percentage, e.g. 1.0 for 1%.")
        if self.max_silence is not None:
            if not isinstance(self.max_silence, timedelta):
                msg = (
                    f"deadband `max_silence` must be a datetime.timedelta; got "
                    f"{self.max_silence!r} ({type(self.max_silence).__name__}). "
                    "Hint: max_silence=timedelta(minutes=5)."
                )
                raise TypeError(msg)
            if self.max_silence <= timedelta(0):
                msg = (
                    f"deadband `max_silence` must be longer than zero; got "
                    f"{self.max_silence!r}. Hint: leave it None to disable the heartbeat, "
                    "or give e.g. timedelta(minutes=5)."
                )
                raise ValueError(msg)

    def tolerance_for(self, last_value: float | str) -> float:
        """Band around ``last_value`` that a new reading must leave to be kept.

        ``max(absolute, percent / 100 * |last_value|)`` over the configured
        settings. It is NaN (no band: the next reading is always kept) when
        ``last_value`` is not a finite number, and ``0.0`` for strings, which
        are compared for exact change instead.
        """
        if isinstance(last_value, str):
            return 0.0
        if not math.isfinite(last_value):
            return _NAN
        tolerance = 0.0 if self.absolute is None else float(self.absolute)
        if self.percent is not None:
            relative = self.percent / 100 * abs(last_value)
            if relative > tolerance:
                tolerance = relative
        return tolerance


def _deadband_mapper(
    config: DeadbandConfig,
) -> Callable[[DeadbandState | None, Reading], tuple[DeadbandState, Iterable[Reading]]]:
    """The rules of the operator for one reading, as a ``stateful_flat_map`` mapper.

    The operator applies them a key's batch at a time (:class:`_DeadbandLogic`).
    """
    keep = _keeper(config)

    def mapper(
        state: DeadbandState | None, reading: Reading
    ) -> tuple[DeadbandState, Iterable[Reading]]:
        if state is None:
            return keep(reading.value, reading.ts), (reading,)
        ts = reading.ts
        last_value, last_ts, tolerance, due = state
        if ts < last_ts:
            return state, (reading,)
        if ts < due:
            value = reading.value
            try:
                if abs(value - last_value) <= tolerance:  # type: ignore[operator]
                    return state, _NO_OUTPUT
            except TypeError:
                if value == last_value:
                    return state, _NO_OUTPUT
        return keep(reading.value, ts), (reading,)

    return mapper


class _DeadbandLogic(StatefulBatchLogic[Reading | Evict, Reading, DeadbandState]):
    """One series' deadband: the rules of :func:`_deadband_mapper` over a whole batch.

    An :class:`~operators.records.Evict` forgets the series: the next reading
    is its first, and with none after it the key's state is discarded.
    """

    __slots__ = ("keep", "state")

    def __init__(
        self,
        keep: Callable[[float | str, datetime], DeadbandState],
        state: DeadbandState | None,
    ) -> None:
        self.keep = keep
        self.state = state

    def on_batch(self, values: list[Reading | Evict]) -> tuple[list[Reading], bool]:
        out: list[Reading] = []
        if Evict in set(map(type, values)):  # rare: run the readings between evictions
            start = 0
            for i, value in enumerate(values):
                if type(value) is Evict:
                    if i > start:
                        out += self.on_batch(values[start:i])[0]  # type: ignore[arg-type]
                    self.state = None
                    start = i + 1
            if start < len(values):
                out += self.on_batch(values[start:])[0]  # type: ignore[arg-type]
            return out, self.state is None
        keep = self.keep
        state = self.state
        readings = iter(values)
        if state is None:
            first: Reading = next(readings)  # type: ignore[assignment]
            state = keep(first.value, first.ts)
            out.append(first)
        last_value, last_ts, tolerance, due = state
        for reading in readings:
            ts = reading.ts  # type: ignore[union-attr]
            if ts < last_ts:
                out.append(reading)  # type: ignore[arg-type]  # out of order: passed through
                continue
            if ts < due:
                value = reading.value  # type: ignore[union-attr]
                try:
                    if abs(value - last_value) <= tolerance:  # type: ignore[operator]
                        continue
                except TypeError:
                    if value == last_value:
                        continue
            state = keep(reading.value, ts)  # type: ignore[union-attr]
            last_value, last_ts, tolerance, due = state
            out.append(reading)  # type: ignore[arg-type]
        self.state = state
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> DeadbandState:
        assert self.state is not None
        return self.state  # an immutable tuple


def _keeper(config: DeadbandConfig) -> Callable[[float | str, datetime], DeadbandState]:
    """The state after keeping ``(value, ts)``."""
    tolerance_for = config.tolerance_for
    max_silence = config.max_silence

    def keep(value: float | str, ts: datetime) -> DeadbandState:
        if max_silence is None:
            return (value, ts, tolerance_for(value), _NEVER)
        try:
            due = ts + max_silence
        except OverflowError:
            due = _NEVER
        return (value, ts, tolerance_for(value), due)

    return keep


# The step ids of ``op.stateful_flat_map("filter", ...)``, which this operator used before:
# recovery snapshots taken by it resume here (the state is the same tuple).
@operator
def _filter(
    step_id: str, up: KeyedStream[Reading | Evict], config: DeadbandConfig
) -> KeyedStream[Reading]:
    return _stateful("stateful", up, config)


@operator
def _stateful(
    step_id: str, up: KeyedStream[Reading | Evict], config: DeadbandConfig
) -> KeyedStream[Reading]:
    keep = _keeper(config)

    def build(resume_state: DeadbandState | None) -> _DeadbandLogic:
        return _DeadbandLogic(keep, resume_state)

    return op.stateful_batch("stateful_batch", up, build)


@operator
def deadband(
    step_id: str,
    up: KeyedStream[Reading | Evict],
    *,
    absolute: float | None = DeadbandConfig.absolute,
    percent: float | None = DeadbandConfig.percent,
    max_silence: timedelta | None = DeadbandConfig.max_silence,
) -> KeyedStream[Reading]:
    """Drop readings that stay within a band around the last kept value.

    State is per key (flows key by :func:`operators.records.series_key`, so
    one state per device and telemetry key) and time is event time
    (``Reading.ts``):

    - The first reading of a key is kept.
    - A later numeric reading is kept when ``|value - last_kept| > tolerance``
      with ``tolerance = max(absolute, percent / 100 * |last_kept|)`` over the
      configured settings, i.e. it must leave every configured band.
    - A ``str`` reading is kept when it differs from the last kept value of
      the key (exact change); a change of type (number to text or back) is a
      change.
    - Heartbeat: with ``max_silence``, a reading is also kept when
      ``ts - last_kept_ts >= max_silence``.
    - NaN and infinities are always kept, and so is the reading after one
      (a non-finite value has no band around it).
    - Out-of-order readings (``ts`` earlier than the last kept reading's) are
      passed through unchanged and do not change the state, like a process
      historian's exception test lets out-of-order events bypass it: nothing
      is lost silently, and the sink downstream sees them.
    - An :class:`~operators.records.Evict` on a key (``Devices.series``
      sends one when a series is evicted as idle) drops the key's state; its
      next reading is kept as a first one.

    Kept readings update the state. The state is a small tuple, so it goes
    into Bytewax recovery snapshots as is. Every setting defaults to the
    :class:`DeadbandConfig` default.

    :arg step_id: Unique ID.
    :arg up: Readings keyed by series.
    :arg absolute: Band half-width in the series' units (``>= 0``).
    :arg percent: Band half-width in percent of ``|last kept value|``
        (``>= 0``).
    :arg max_silence: Heartbeat interval in event time (``> 0``), or ``None``.
    :returns: The kept readings, with the same keys.
    :raises ValueError: When neither ``absolute`` nor ``percent`` is given, or
        a setting is out of range (raised while the flow is built).
    :raises TypeError: When a setting has the wrong type.
    """
    config = DeadbandConfig(absolute=absolute, percent=percent, max_silence=max_silence)
    return _filter("filter", up, config)
