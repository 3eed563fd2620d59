"""Threshold alarms with hysteresis, debounce count and minimum duration.

Each :class:`Rule` watches one numeric attribute of the items of a keyed
stream and turns it into ``raised`` / ``cleared`` :class:`Alarm` records (the
``alarms`` stream). Rules are evaluated independently per key (one monitored
entity, e.g. a device's axis) in event time, like the "on-delay" / deadband
pair of a process alarm: raise only after the condition has held long enough,
clear only once the value is back beyond a separate clear level, so a signal
dithering around the raise level does not flap.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream

from operators.records import Evict

__all__ = [
    "CLEARED",
    "RAISED",
    "SEVERITIES",
    "Alarm",
    "Rule",
    "RuleState",
    "ThresholdState",
    "threshold",
]

X = TypeVar("X")

RAISED: Final = "raised"
"""``Alarm.state`` of an alarm that starts."""

CLEARED: Final = "cleared"
"""``Alarm.state`` of an alarm that ends."""

SEVERITIES: Final = ("info", "warning", "critical")
"""Allowed values of ``Rule.severity``."""

_ZERO = timedelta(0)
_NAN = math.nan


def _short(value: object) -> str:
    text = repr(value)
    if len(text) > 120:
        text = f"{text[:117]}..."
    return text


def _describe(value: object) -> str:
    return f"{_short(value)} ({type(value).__name__})"


def _level(rule: str, attr: str, value: object) -> float | None:
    """Check one raise/clear level and return it as a float (``None`` stays)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = (
            f"threshold rule {rule!r}: `{attr}` must be a number; got {_describe(value)}. "
            f"Hint: give the level in the watched field's own units, e.g. {attr}=7.1."
        )
        raise TypeError(msg)
    try:
        level = float(value)
    except OverflowError:
        level = math.inf
    if not math.isfinite(level):
        msg = (
            f"threshold rule {rule!r}: `{attr}` must be a finite number; got {_short(value)}. "
            f"Hint: leave `{attr}` as None when there is no such level."
        )
        raise ValueError(msg)
    return level


@dataclass(frozen=True)
class Rule:
    """One alarm rule of :func:`threshold`, checked when it is created.

    A rule is a *high* alarm (``raise_above``, cleared below ``clear_below``)
    or a *low* alarm (``raise_below``, cleared above ``clear_above``):

    - High: the condition holds when ``value > raise_above``; a raised alarm
      clears when ``value < clear_below``. ``clear_below`` defaults to
      ``raise_above`` (no hysteresis) and must not be above it.
    - Low: the condition holds when ``value < raise_below``; a raised alarm
      clears when ``value > clear_above``. ``clear_above`` defaults to
      ``raise_below`` and must not be below it.

    A value between the raise and the clear level changes nothing once the
    alarm is raised (hysteresis); before that, it breaks the run of items
    that the condition must hold for.

    :arg name: Rule name, unique within one :func:`threshold` step; it is the
        ``rule`` column of the alarms.
    :arg field: Attribute of the incoming items to watch, e.g.
        ``"velocity_rms_mm_s"``.
    :arg raise_above: High alarm level.
    :arg clear_below: Clear level of a high alarm (``<= raise_above``).
    :arg raise_below: Low alarm level.
    :arg clear_above: Clear level of a low alarm (``>= raise_below``).
    :arg min_duration: Event time the condition must hold, from the first
        item where it started to hold, before the alarm is raised (``>= 0``).
    :arg min_count: Consecutive items the condition must hold for before the
        alarm is raised (``>= 1``).
    :arg severity: ``"info"``, ``"warning"`` or ``"critical"``.

    Levels are stored as ``float``; after creation exactly one of
    ``clear_below`` / ``clear_above`` is set, matching the rule's side.
    """

    name: str
    field: str
    raise_above: float | None = None
    clear_below: float | None = None
    raise_below: float | None = None
    clear_above: float | None = None
    min_duration: timedelta = _ZERO
    min_count: int = 1
    severity: str = "warning"

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name:
            msg = (
                f"threshold rule `name` must be a non-empty string; got {_describe(name)}. "
                'Hint: name the rule after what it watches, e.g. name="velocity_zone_c"; '
                "alarms carry it in their `rule` column."
            )
            raise (ValueError if isinstance(name, str) else TypeError)(msg)
        if not isinstance(self.field, str) or not self.field.isidentifier():
            msg = (
                f"threshold rule {name!r}: `field` must be the name of an attribute of the "
                f"incoming items; got {_describe(self.field)}. "
                'Hint: e.g. field="velocity_rms_mm_s" or field="value".'
            )
            raise (ValueError if isinstance(self.field, str) else TypeError)(msg)
        raise_above = _level(name, "raise_above", self.raise_above)
        clear_below = _level(name, "clear_below", self.clear_below)
        raise_below = _level(name, "raise_below", self.raise_below)
        clear_above = _level(name, "clear_above", self.clear_above)
        if raise_above is None and raise_below is None:
            msg = (
                f"threshold rule {name!r} needs `raise_above` (high alarm) or `raise_below` "
                "(low alarm); got neither. Hint: raise_above=7.1, clear_below=6.5 raises "
                "above 7.1 and clears below 6.5."
            )
            raise ValueError(msg)
        if raise_above is not None and raise_below is not None:
            msg = (
                f"threshold rule {name!r} has both `raise_above` ({raise_above!r}) and "
                f"`raise_below` ({raise_below!r}); a rule watches one side. Hint: make two "
                f"rules, e.g. {name + '_high'!r} and {name + '_low'!r}."
            )
            raise ValueError(msg)
        if raise_above is not None:
            if clear_above is not None:
                msg = (
                    f"threshold rule {name!r}: `clear_above` goes with `raise_below` (low "
                    f"alarms), but this rule has `raise_above`; got clear_above={clear_above!r}. "
                    "Hint: a high alarm clears with `clear_below`."
                )
                raise ValueError(msg)
            if clear_below is None:
                clear_below = raise_above
            elif clear_below > raise_above:
                msg = (
                    f"threshold rule {name!r}: `clear_below` must be <= `raise_above` "
                    f"({raise_above!r}); got clear_below={clear_below!r}. Hint: the clear "
                    "level sits on the safe side of the raise level and the gap between "
                    "them is the hysteresis, e.g. raise_above=7.1, clear_below=6.5."
                )
                raise ValueError(msg)
        else:
            if clear_below is not None:
                msg = (
                    f"threshold rule {name!r}: `clear_below` goes with `raise_above` (high "
                    f"alarms), but this rule has `raise_below`; got clear_below={clear_below!r}. "
                    "Hint: a low alarm clears with `clear_above`."
                )
                raise ValueError(msg)
            if clear_above is None:
                clear_above = raise_below
            elif clear_above < raise_below:  # type: ignore[operator]
                msg = (
                    f"threshold rule {name!r}: `clear_above` must be >= `raise_below` "
                    f"({raise_below!r}); got clear_above={clear_above!r}. Hint: the clear "
                    "level sits on the safe side of the raise level and the gap between "
                    "them is the hysteresis, e.g. raise_below=1.0, clear_above=1.5."
                )
                raise ValueError(msg)
        min_count = self.min_count
        if isinstance(min_count, bool) or not isinstance(min_count, int):
            msg = (
                f"threshold rule {name!r}: `min_count` must be an int; got "
                f"{_describe(min_count)}. Hint: min_count=3 raises on the third consecutive "
                "item beyond the level."
            )
            raise TypeError(msg)
        if min_count < 1:
            msg = (
                f"threshold rule {name!r}: `min_count` must be >= 1; got {min_count!r}. "
                "Hint: min_count=1 (the default) raises on the first item beyond the level."
            )
            raise ValueError(msg)
        if not isinstance(self.min_duration, timedelta):
            msg = (
                f"threshold rule {name!r}: `min_duration` must be a datetime.timedelta; got "
                f"{_describe(self.min_duration)}. Hint: min_duration=timedelta(seconds=30)."
            )
            raise TypeError(msg)
        if self.min_duration < _ZERO:
            msg = (
                f"threshold rule {name!r}: `min_duration` must be >= 0; got "
                f"{self.min_duration!r}. Hint: timedelta(0) (the default) raises as soon as "
                "`min_count` items are beyond the level."
            )
            raise ValueError(msg)
        if not isinstance(self.severity, str) or self.severity not in SEVERITIES:
            msg = (
                f"threshold rule {name!r}: `severity` must be one of "
                f"{', '.join(map(repr, SEVERITIES))}; got {_describe(self.severity)}. "
                'Hint: severity="critical" for alarms that need action now.'
            )
            raise ValueError(msg)
        object.__setattr__(self, "raise_above", raise_above)
        object.__setattr__(self, "clear_below", clear_below)
        object.__setattr__(self, "raise_below", raise_below)
        object.__setattr__(self, "clear_above", clear_above)

    def breaches(self, value: float) -> bool:
        """Whether ``value`` is beyond the raise level (the condition holds)."""
        if self.raise_above is not None:
            return value > self.raise_above
        return value < self.raise_below  # type: ignore[operator]

    def recovers(self, value: float) -> bool:
        """Whether ``value`` is beyond the clear level (a raised alarm clears)."""
        if self.clear_below is not None:
            return value < self.clear_below
        return value > self.clear_above  # type: ignore[operator]


@dataclass(frozen=True, slots=True)
class Alarm:
    """A rule's alarm starting or ending (a row of the ``alarms`` stream).

    ``ts`` and ``value`` are those of the item that raised or cleared it
    (``ts`` converted to UTC); ``state`` is :data:`RAISED` or :data:`CLEARED`.
    """

    device: str
    ts: datetime
    rule: str
    state: str
    severity: str
    value: float
    key: str = ""
    """The stream key the rule watched (e.g. ``pump-7/x``); flows fill it in."""


@dataclass(slots=True)
class RuleState:
    """State of one rule for one key, and the step function that updates it.

    :arg active: Whether the alarm is raised.
    :arg count: Consecutive items (in arrival order) the condition has held
        for while not raised; ``0`` when there is no run.
    :arg since: ``ts`` of the first item of the current run.
    :arg newest: Newest ``ts`` seen in the current run.
    :arg last_ts: While raised, the newest ``ts`` seen (the raising item's first).
    :arg last_value: The value of the item at ``last_ts``.

    A few small fields, so it goes into Bytewax recovery snapshots as is.
    """

    active: bool = False
    count: int = 0
    since: datetime | None = None
    newest: datetime | None = None
    last_ts: datetime | None = None
    last_value: float | None = None

    @property
    def idle(self) -> bool:
        """Whether the state is the initial one (not raised, no run)."""
        return not self.active and self.count == 0

    def step(self, rule: Rule, value: float, ts: datetime) -> str | None:
        """Feed one item's value and timestamp; return the alarm state it causes.

        Returns :data:`RAISED`, :data:`CLEARED` or ``None``, and updates the
        state in place:

        - NaN is skipped: nothing changes.
        - Raised: ``cleared`` when ``rule.recovers(value)``; anything else,
          including a value between the raise and clear levels, changes
          nothing.
        - Not raised: a value for which ``rule.breaches(value)`` extends the
          run (or starts one at ``ts``); ``raised`` when the run has at least
          ``rule.min_count`` items and ``newest - since >= rule.min_duration``.
          Any other value ends the run.

        Out of order ``ts``: the run's duration is measured from the ``ts`` of
        its first item (in arrival order) to the newest ``ts`` in the run, so
        an item older than those already seen counts toward ``min_count`` but
        neither lengthens nor shortens the duration, which is never negative.
        """
        if math.isnan(value):
            return None
        if self.active:
            if rule.recovers(value):
                self.active = False
                self.last_ts = self.last_value = None
                return CLEARED
            last = getattr(self, "last_ts", None)  # None in a state from an older snapshot
            if last is None or ts >= last:
                self.last_ts = ts
                self.last_value = value
            return None
        if not rule.breaches(value):
            if self.count:
                self.count = 0
                self.since = self.newest = None
            return None
        since = self.since
        newest = self.newest
        if since is None or newest is None:
            since = newest = ts
        elif ts > newest:
            newest = ts
        count = self.count + 1
        if count >= rule.min_count and newest - since >= rule.min_duration:
            self.active = True
            self.count = 0
            self.since = self.newest = None
            self.last_ts = ts
            self.last_value = value
            return RAISED
        self.count = count
        self.since = since
        self.newest = newest
        return None


ThresholdState = dict[str, RuleState]
"""Per-key state of :func:`threshold`: rule name to :class:`RuleState`.

Only rules with a non-idle state are stored; a key whose rules are all idle
has no state at all. Keyed by name, so a flow restarted from a recovery
snapshot with rules added, removed or reordered keeps the state of the rules
it still has.
"""


def _value_of(item: object, field: str) -> float:
    """Return the watched value of ``item`` as a float; NaN when missing or not a number."""
    value = getattr(item, field, None)
    if type(value) is float:
        return value
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except (OverflowError, TypeError, ValueError):
            return _NAN
    return _NAN


def _threshold_mapper(
    step_id: str, rules: tuple[Rule, ...]
) -> Callable[[ThresholdState | None, Any], tuple[ThresholdState | None, Iterable[Alarm]]]:
    """Build the per-item function for ``stateful_flat_map``."""

    def mapper(
        state: ThresholdState | None, item: Any
    ) -> tuple[ThresholdState | None, Iterable[Alarm]]:
        if type(item) is Evict:
            return None, _evicted(item.device, state, rules)
        try:
            device = item.device
            ts = item.ts
        except AttributeError:
            msg = (
                f"threshold {step_id!r}: items need `device` and `ts` attributes; got "
                f"{_describe(item)}. Hint: key a stream of records such as "
                "operators.records.Reading or vibration features, e.g. "
                "op.key_on('key', s, lambda r: f'{r.device}/{r.axis}')."
            )
            raise TypeError(msg) from None
        if not isinstance(ts, datetime) or ts.tzinfo is None:
            msg = (
                f"threshold {step_id!r}: item `ts` must be a timezone-aware UTC datetime; got "
                f"{_describe(ts)} from device {device!r}. "
                "Hint: datetime.fromtimestamp(seconds, tz=UTC)."
            )
            raise TypeError(msg)
        if state is None:
            state = {}
        alarms: list[Alarm] = []
        for rule in rules:
            value = _value_of(item, rule.field)
            if value != value:
                continue
            name = rule.name
            rule_state = state.get(name)
            if rule_state is None:
                rule_state = RuleState()
            event = rule_state.step(rule, value, ts)
            if rule_state.idle:
                state.pop(name, None)
            else:
                state[name] = rule_state
            if event is not None:
                when = ts if ts.tzinfo is UTC else ts.astimezone(UTC)
                alarms.append(Alarm(device, when, name, event, rule.severity, value))
        return (state or None), alarms

    return mapper


def _evicted(
    device: str, state: ThresholdState | None, rules: tuple[Rule, ...]
) -> list[Alarm]:
    """The ``cleared`` alarms of a key's raised rules, in rule order, as the key is forgotten.

    Each carries the ``ts`` and value of the newest item seen while raised, so a
    replay gives the same rows. A state from a snapshot of an older version,
    which did not keep them, clears nothing.
    """
    if not state:
        return []
    out = []
    for rule in rules:
        rule_state = state.get(rule.name)
        if rule_state is None or not rule_state.active:
            continue
        ts = getattr(rule_state, "last_ts", None)
        value = getattr(rule_state, "last_value", None)
        if ts is None or value is None:
            continue
        when = ts if ts.tzinfo is UTC else ts.astimezone(UTC)
        out.append(Alarm(device, when, rule.name, CLEARED, rule.severity, value))
    return out


def _check_rules(step_id: str, rules: object) -> tuple[Rule, ...]:
    """Check the ``rules`` argument of :func:`threshold` and freeze it."""
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        msg = (
            f"threshold {step_id!r}: `rules` must be a sequence of Rule; got "
            f'{_describe(rules)}. Hint: pass a list, e.g. rules=[Rule(name="temp_high", '
            'field="value", raise_above=80.0)].'
        )
        raise TypeError(msg)
    checked = tuple(rules)
    if not checked:
        msg = (
            f"threshold {step_id!r}: `rules` is empty; got {rules!r}. Hint: give at least "
            'one Rule, e.g. rules=[Rule(name="temp_high", field="value", raise_above=80.0)].'
        )
        raise ValueError(msg)
    seen: dict[str, int] = {}
    for i, rule in enumerate(checked):
        if not isinstance(rule, Rule):
            msg = (
                f"threshold {step_id!r}: `rules[{i}]` must be a Rule; got {_describe(rule)}. "
                "Hint: build rules with operators.threshold.Rule(name=..., field=..., "
                "raise_above=...)."
            )
            raise TypeError(msg)
        first = seen.setdefault(rule.name, i)
        if first != i:
            msg = (
                f"threshold {step_id!r}: rule name {rule.name!r} is used by rules[{first}] "
                f"and rules[{i}]. Hint: names label the alarms and the per-key rule state, so "
                "each rule needs its own, e.g. 'velocity_zone_c' and 'velocity_zone_d'."
            )
            raise ValueError(msg)
    return checked


@operator
def threshold(
    step_id: str,
    up: KeyedStream[X],
    *,
    rules: Sequence[Rule],
) -> KeyedStream[Alarm]:
    """Raise and clear alarms when a watched field crosses rule levels.

    Items are any objects with a ``device``, a timezone-aware UTC ``ts`` and
    the attributes the rules watch (duck typed). Key the stream so that each
    key is one monitored entity (e.g. ``"pump-7/x"``): every rule keeps its
    own state per key, and time is event time (``ts``) per key.

    Per key and rule (see :meth:`RuleState.step` for the exact rules):

    - ``raised`` when the condition (``value > raise_above`` or
      ``value < raise_below``) has held for at least ``min_count``
      consecutive items *and* for at least ``min_duration`` of event time
      since the first of them. The alarm carries the ``ts`` and ``value`` of
      the item that completed the condition. A shorter spike raises nothing.
    - ``cleared`` when, after ``raised``, a value is beyond the clear level
      (``value < clear_below`` or ``value > clear_above``), at once. Values
      between the raise and clear levels change nothing, so a signal dithering
      around the raise level raises at most once and never flaps. Alarms of a
      key and rule therefore alternate ``raised``, ``cleared``, ``raised``...
    - A missing attribute, a value that is not a real number (text,
      ``None``) or NaN is skipped for that rule: it neither breaks a run nor
      counts toward it. ``bool`` counts as ``0``/``1``; infinities are ordinary
      values beyond every level.
    - Out-of-order items (``ts`` older than one already seen) are evaluated
      like the others and count toward ``min_count``, but the run's duration
      is the span from its first item to its newest ``ts``: a late item can
      neither make it negative nor stretch it backwards.
    - Nothing is cleared when the input ends: a raised alarm stays raised in
      the state (and in recovery snapshots) until a value clears it.
    - An :class:`~operators.records.Evict` on a key (``Devices.series`` sends
      one when a series is evicted as idle) drops the key's state; each alarm
      still raised on it is ``cleared`` first, with the ``ts`` and value of the
      newest item seen while raised, so no alarm of a forgotten series stays
      raised downstream and alarms keep alternating when the series returns.

    When an item fires several rules, their alarms come out in the order of
    ``rules``. The state is a small dict of small dataclasses per key, kept
    only while some rule of the key is raised or has a run in progress, so it
    goes into Bytewax recovery snapshots as is.

    :arg step_id: Unique ID.
    :arg up: Items keyed by monitored entity.
    :arg rules: The rules to evaluate on every item; names must be unique.
    :returns: The alarms, keyed like ``up``.
    :raises TypeError: When ``rules`` is not a sequence of :class:`Rule`
        (while the flow is built), or an item has no ``device`` / ``ts`` or a
        naive ``ts`` (while the flow runs).
    :raises ValueError: When ``rules`` is empty or two rules share a name
        (while the flow is built).
    """
    checked = _check_rules(step_id, rules)
    return op.stateful_flat_map("evaluate", up, _threshold_mapper(step_id, checked))
