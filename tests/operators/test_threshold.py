from __future__ import annotations

import math
import pickle
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone

import bytewax.operators as op
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.errors import BytewaxRuntimeError
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.records import Evict, Reading, series_key
from operators.threshold import (
    CLEARED,
    RAISED,
    Alarm,
    Rule,
    RuleState,
    _threshold_mapper,
    threshold,
)
from tests.conftest import note_workers, run_dataflow, run_with_recovery

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
NAN = math.nan


@dataclass(frozen=True)
class Features:
    """Duck-typed item: one axis of a vibration feature row plus a temperature."""

    device: str
    axis: str
    ts: datetime
    velocity_rms_mm_s: object = NAN
    temperature_c: object = None


@dataclass(frozen=True)
class Heartbeat:
    """An item without any watched field."""

    device: str
    axis: str
    ts: datetime


def key_of(item: Features | Heartbeat) -> str:
    return f"{item.device}/{item.axis}"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def series(
    values: Iterable[object],
    *,
    device: str = "pump-7",
    axis: str = "x",
    start: float = 0.0,
    step: float = 1.0,
    field: str = "velocity_rms_mm_s",
) -> list[Features]:
    return [
        Features(device, axis, at(start + i * step), **{field: v}) for i, v in enumerate(values)
    ]


def build_flow(
    items: Sequence[object],
    out: list,
    rules: Sequence[Rule],
    *,
    batch_size: int = 16,
    source: list | None = None,
    workers_seen: set[int] | None = None,
) -> Dataflow:
    flow = Dataflow("threshold_test")
    keyed = [(key_of(i), i) for i in items] if source is None else source
    s = op.input("in", flow, TestingSource(keyed, batch_size=batch_size))
    alarms = threshold("alarms", s, rules=rules)
    note_workers("where", alarms, workers_seen)
    op.output("out", alarms, TestingSink(out))
    return flow


def run_threshold(
    items: Sequence[object], rules: Sequence[Rule], *, batch_size: int = 16
) -> list[tuple[str, Alarm]]:
    out: list[tuple[str, Alarm]] = []
    run_main(build_flow(items, out, rules, batch_size=batch_size))
    for key, alarm in out:
        assert isinstance(alarm, Alarm)
        assert key.split("/")[0] == alarm.device
    return out


def per_key(out: Iterable[tuple[str, Alarm]]) -> dict[str, list[Alarm]]:
    grouped: dict[str, list[Alarm]] = defaultdict(list)
    for key, alarm in out:
        grouped[key].append(alarm)
    return dict(grouped)


def per_key_rule(out: Iterable[tuple[str, Alarm]]) -> dict[tuple[str, str], list[Alarm]]:
    grouped: dict[tuple[str, str], list[Alarm]] = defaultdict(list)
    for key, alarm in out:
        grouped[key, alarm.rule].append(alarm)
    return dict(grouped)


def brief(alarms: Iterable[Alarm]) -> list[tuple[float, str, float]]:
    """``(seconds since T0, state, value)`` of each alarm."""
    return [((a.ts - T0).total_seconds(), a.state, a.value) for a in alarms]


def reference(items: Sequence[object], rules: Sequence[Rule]) -> list[tuple[str, Alarm]]:
    """Plain statement of the alarm rules, keeping each run as a list of timestamps."""
    active: dict[tuple[str, str], bool] = defaultdict(bool)
    runs: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    out = []
    for item in items:
        key = key_of(item)
        for rule in rules:
            v = getattr(item, rule.field, None)
            if not isinstance(v, int | float | np.floating) or math.isnan(v):
                continue
            v = float(v)
            if rule.raise_above is not None:
                breach, recover = v > rule.raise_above, v < rule.clear_below
            else:
                breach, recover = v < rule.raise_below, v > rule.clear_above
            k = (key, rule.name)
            state = None
            if active[k]:
                if recover:
                    active[k] = False
                    state = CLEARED
            elif breach:
                runs[k].append(item.ts)
                run = runs[k]
                if len(run) >= rule.min_count and max(run) - run[0] >= rule.min_duration:
                    active[k] = True
                    runs[k] = []
                    state = RAISED
            else:
                runs[k] = []
            if state is not None:
                out.append((key, Alarm(item.device, item.ts, rule.name, state, rule.severity, v)))
    return out


def assert_alternates(out: Iterable[tuple[str, Alarm]]) -> None:
    for (key, rule), alarms in per_key_rule(out).items():
        states = [a.state for a in alarms]
        expected = [RAISED if i % 2 == 0 else CLEARED for i in range(len(states))]
        assert states == expected, f"{key} {rule}: {states}"


HIGH = Rule("velocity_high", "velocity_rms_mm_s", raise_above=10.0, clear_below=8.0)


# --- raise and clear -------------------------------------------------------------------


def test_raise_and_clear_with_hysteresis():
    values = [5, 9, 11, 9.5, 10.5, 8.5, 7.9, 9, 10, 10.1, 7]
    out = run_threshold(series(values), [replace(HIGH, severity="critical")])
    assert [k for k, _ in out] == ["pump-7/x"] * 4
    assert brief(a for _, a in out) == [
        (2.0, RAISED, 11.0),
        (6.0, CLEARED, 7.9),
        (9.0, RAISED, 10.1),
        (10.0, CLEARED, 7.0),
    ]
    first = out[0][1]
    assert first == Alarm("pump-7", at(2), "velocity_high", RAISED, "critical", 11.0)
    assert first.ts.tzinfo is UTC


def test_without_clear_level_the_raise_level_clears_and_equal_values_change_nothing():
    rule = Rule("v", "velocity_rms_mm_s", raise_above=10.0)
    assert rule.clear_below == 10.0
    values = [10, 11, 10, 10, 9.99, 10, 10.01]
    out = run_threshold(series(values), [rule])
    assert brief(a for _, a in out) == [
        (1.0, RAISED, 11.0),
        (4.0, CLEARED, 9.99),
        (6.0, RAISED, 10.01),
    ]


def test_low_alarm_raises_below_and_clears_above():
    rule = Rule("temp_low", "temperature_c", raise_below=2.0, clear_above=3.0, severity="info")
    values = [5, 2, 1.9, 2.5, 1, 3, 3.1, 2.9, 1.5]
    out = run_threshold(series(values, field="temperature_c"), [rule])
    assert brief(a for _, a in out) == [
        (2.0, RAISED, 1.9),
        (6.0, CLEARED, 3.1),
        (8.0, RAISED, 1.5),
    ]
    assert {a.severity for _, a in out} == {"info"}


# --- alarm sequences: min_count, min_duration, clearing, infinity, out-of-order items -------


def items_at(*points: tuple[float, object]) -> list[Features]:
    """One ``Features`` of device ``d``, axis ``x`` per ``(seconds, velocity)``."""
    return [Features("d", "x", at(t), v) for t, v in points]


@pytest.mark.parametrize(
    ("rule", "items", "expected"),
    [
        pytest.param(
            HIGH, series([11, 12, 9, 10]), [(0.0, RAISED, 11.0)], id="stays-raised-at-end-of-input"
        ),
        pytest.param(
            replace(HIGH, min_count=3),
            # 11, 12 (spike of two), 11, 11 broken by 9 (between the levels), then a run of three.
            series([11, 12, 5, 11, 11, 9, 11, 11, 11, 11, 12, 7]),
            [(8.0, RAISED, 11.0), (11.0, CLEARED, 7.0)],
            id="min_count-delays-raising-and-a-short-spike-does-not-raise",
        ),
        pytest.param(
            replace(HIGH, min_duration=timedelta(seconds=5)),
            # A spike held for 4 s, with many items, then a condition held from t=10.
            series([11] * 5 + [5] * 5 + [11] * 8),
            [(15.0, RAISED, 11.0)],
            id="min_duration-delays-raising-and-a-short-spike-does-not-raise",
        ),
        pytest.param(
            replace(HIGH, min_duration=timedelta(seconds=30)),
            items_at((0, 11), (29, 12), (30, 13), (31, 14)),
            [(30.0, RAISED, 13.0)],
            id="min_duration-counts-event-time-not-items",
        ),
        pytest.param(
            replace(HIGH, min_count=3, min_duration=timedelta(seconds=10)),
            # Two items 20 s apart: long enough, but not enough items; the third completes it.
            items_at((0, 11.0), (20, 11.0), (21, 11.0)),
            [(21.0, RAISED, 11.0)],
            id="min_count-and-min_duration-must-both-hold-count",
        ),
        pytest.param(
            replace(HIGH, min_count=3, min_duration=timedelta(seconds=10)),
            # Four items within 3 s: enough items, not long enough; the item at 10 s completes it.
            items_at((0, 11.0), (1, 11.0), (2, 11.0), (3, 11.0), (10, 11.0)),
            [(10.0, RAISED, 11.0)],
            id="min_count-and-min_duration-must-both-hold-duration",
        ),
        pytest.param(
            replace(HIGH, min_count=2),
            series([11, 11, 7, 11, 7, 11, 11]),
            [(1.0, RAISED, 11.0), (2.0, CLEARED, 7.0), (6.0, RAISED, 11.0)],
            id="clearing-is-immediate-and-a-new-run-starts-after-it",
        ),
        pytest.param(
            HIGH,
            series([math.inf, -math.inf]),
            [(0.0, RAISED, math.inf), (1.0, CLEARED, -math.inf)],
            id="infinity-is-a-value-beyond-every-level",
        ),
        pytest.param(
            replace(HIGH, min_count=2, min_duration=timedelta(seconds=5)),
            # The run starts at t=10; a late item from t=0 is the second item but the span is 0.
            items_at((10, 11), (0, 12), (14, 13), (15, 14)),
            [(15.0, RAISED, 14.0)],
            id="out-of-order-item-counts-but-does-not-stretch-the-duration",
        ),
        pytest.param(
            replace(HIGH, min_count=3, min_duration=timedelta(seconds=5)),
            items_at((0, 11), (8, 12), (3, 13), (1, 7)),
            [(3.0, RAISED, 13.0), (1.0, CLEARED, 7.0)],
            id="out-of-order-item-can-complete-the-count-and-carries-its-own-ts",
        ),
    ],
)
def test_alarm_sequence(
    rule: Rule, items: list[Features], expected: list[tuple[float, str, float]]
) -> None:
    assert brief(a for _, a in run_threshold(items, [rule])) == expected


# --- skipped values ---------------------------------------------------------------------------


def test_nan_missing_and_non_numeric_values_are_skipped():
    rule = replace(HIGH, min_count=3)
    items: list[object] = series([11, NAN, "n/a", None, 11])
    items.insert(2, Heartbeat("pump-7", "x", at(1.5)))
    items += series([np.float32(11.5)], start=5)
    out = run_threshold(items, [rule])
    # Neither resets the run of 11s nor counts toward it: the third number raises.
    assert brief(a for _, a in out) == [(5.0, RAISED, 11.5)]
    assert type(out[0][1].value) is float
    # While raised, skipped values do not clear.
    items = series([11, NAN, "low", None, 9, True])
    out = run_threshold(items, [HIGH])
    assert brief(a for _, a in out) == [(0.0, RAISED, 11.0), (5.0, CLEARED, 1.0)]


def test_step_duration_is_never_negative():
    rule = replace(HIGH, min_count=2)
    state = RuleState()
    assert state.step(rule, 11.0, at(10)) is None
    assert state.step(rule, 11.0, at(0)) == RAISED
    state = RuleState()
    state.step(rule, 11.0, at(10))
    state.step(rule, 7.0, at(11))
    assert state == RuleState()


# --- properties (real dataflows) -------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gap=st.floats(0.05, 5.0),
    noise=st.lists(st.floats(-0.999, 0.999), min_size=1, max_size=200),
    min_count=st.integers(1, 3),
)
def test_dithering_around_the_raise_level_raises_at_most_once_and_never_flaps(
    gap, noise, min_count
):
    rule = Rule(
        "dither", "velocity_rms_mm_s", raise_above=10.0, clear_below=10.0 - gap, min_count=min_count
    )
    values = [10.0 + gap * n for n in noise]
    out = run_threshold(series(values, step=0.1), [rule], batch_size=7)
    states = [a.state for _, a in out]
    assert states in ([], [RAISED])
    above = [v > 10.0 for v in values]
    could_raise = any(all(above[i : i + min_count]) for i in range(len(values) - min_count + 1))
    assert states == ([RAISED] if could_raise else [])


@st.composite
def rules_strategy(draw: st.DrawFn) -> Rule:
    level = draw(st.integers(-2, 2)) * 1.0
    gap = draw(st.sampled_from([0.0, 0.5, 2.0]))
    common = {
        "name": "r",
        "field": "velocity_rms_mm_s",
        "min_count": draw(st.sampled_from([1, 1, 2, 3])),
        "min_duration": timedelta(seconds=draw(st.sampled_from([0, 0, 1, 3]))),
        "severity": draw(st.sampled_from(["info", "warning", "critical"])),
    }
    if draw(st.booleans()):
        return Rule(raise_above=level, clear_below=level - gap, **common)
    return Rule(raise_below=level, clear_above=level + gap, **common)


ITEMS = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 1, 2]),  # axis
        st.sampled_from([1, 1, 2, 0, -2]),  # seconds since the axis' previous item; < 0: late
        st.one_of(  # move of the axis' random walk; NaN: this item's value is NaN
            st.sampled_from([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]),
            st.floats(-3, 3),
            st.just(NAN),
        ),
    ),
    min_size=40,
    max_size=200,
)


def items_from(rows: Sequence[tuple[int, int, float]]) -> list[Features]:
    """Three axes, each a random walk between -5 and 5 with its own clock."""
    clocks = [0, 0, 0]
    walks = [0.0, 0.0, 0.0]
    items = []
    for axis, dt, move in rows:
        clocks[axis] += dt
        value = NAN
        if not math.isnan(move):
            walks[axis] = min(5.0, max(-5.0, walks[axis] + move))
            value = walks[axis]
        items.append(Features("pump-7", "xyz"[axis], at(clocks[axis]), value))
    return items


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=ITEMS, rules=st.lists(rules_strategy(), min_size=1, max_size=3))
def test_alarms_alternate_per_key_and_rule_and_match_reference(rows, rules):
    rules = [replace(rule, name=f"r{i}") for i, rule in enumerate(rules)]
    items = items_from(rows)
    out = run_threshold(items, rules, batch_size=5)
    assert_alternates(out)
    assert per_key(out) == per_key(reference(items, rules))
    for _, alarm in out:
        rule = next(r for r in rules if r.name == alarm.rule)
        assert alarm.severity == rule.severity
        if alarm.state == RAISED:
            assert rule.breaches(alarm.value)
        else:
            assert rule.recovers(alarm.value)


@settings(max_examples=300, deadline=None)
@given(rule=rules_strategy(), rows=ITEMS)
def test_step_function_matches_reference_and_its_state_stays_small(rule, rows):
    items = items_from(rows)
    states: dict[str, RuleState] = defaultdict(RuleState)
    events = []
    for item in items:
        state = states[key_of(item)]
        event = state.step(rule, item.velocity_rms_mm_s, item.ts)
        if event is not None:
            events.append((key_of(item), item.ts, event, item.velocity_rms_mm_s))
        assert state.count >= 0
        assert (state.since is None) == (state.count == 0) == (state.newest is None)
        if state.count:
            assert state.newest >= state.since
        assert pickle.loads(pickle.dumps(state)) == state
    expected = [(k, a.ts, a.state, a.value) for k, a in reference(items, [rule])]
    assert events == expected


def test_step_skips_nan_without_breaking_the_run():
    rule = replace(HIGH, min_count=2)
    state = RuleState()
    assert state.step(rule, 11.0, at(0)) is None
    assert state.step(rule, NAN, at(1)) is None
    assert state == RuleState(False, 1, at(0), at(0))
    assert state.step(rule, 11.0, at(2)) == RAISED
    assert state.step(rule, NAN, at(3)) is None
    assert state.step(rule, 9.0, at(4)) is None
    assert state.step(rule, 7.0, at(5)) == CLEARED
    assert state.idle


# --- several rules, keys and workers ----------------------------------------------------------

ZONE_C = Rule("velocity_zone_c", "velocity_rms_mm_s", raise_above=4.5, clear_below=4.0)
ZONE_D = Rule(
    "velocity_zone_d",
    "velocity_rms_mm_s",
    raise_above=7.1,
    clear_below=6.5,
    min_count=2,
    severity="critical",
)
FREEZE = Rule(
    "freezing",
    "temperature_c",
    raise_below=0.0,
    clear_above=2.0,
    min_duration=timedelta(seconds=3),
    severity="info",
)
RULES = [ZONE_C, ZONE_D, FREEZE]


def random_items(seed: int, n: int, devices: int = 4) -> list[Features]:
    rng = random.Random(seed)
    velocity: dict[str, float] = defaultdict(lambda: 3.0)
    temperature: dict[str, float] = defaultdict(lambda: 5.0)
    clocks: dict[str, float] = defaultdict(float)
    items = []
    for _ in range(n):
        device, axis = f"d{rng.randrange(devices)}", rng.choice("xyz")
        k = f"{device}/{axis}"
        velocity[k] = max(0.0, velocity[k] + rng.gauss(0, 0.8))
        temperature[k] += rng.gauss(0, 0.7)
        clocks[k] += rng.choice([0.5, 1.0, 1.0, 2.0, -1.5])
        temp = temperature[k] if rng.random() > 0.05 else "sensor fault"
        items.append(Features(device, axis, at(clocks[k]), velocity[k], temp))
    return items


def test_rules_and_keys_are_independent():
    items = random_items(3, n=3_000)
    out = run_threshold(items, RULES, batch_size=64)
    got = per_key_rule(out)
    assert {rule for _, rule in got} == {r.name for r in RULES}
    assert len({key for key, _ in got}) > 6
    keys = sorted({key_of(i) for i in items})
    for rule in RULES:
        for key in keys:
            alone = run_threshold([i for i in items if key_of(i) == key], [rule], batch_size=64)
            assert [a for _, a in alone] == got.get((key, rule.name), []), (key, rule.name)
    assert per_key(out) == per_key(reference(items, RULES))
    assert_alternates(out)


def test_alarms_of_one_item_come_in_rule_order():
    item = Features("d", "x", at(0), 8.0)
    rules = [replace(ZONE_D, min_count=1), ZONE_C]
    out = run_threshold([item], rules)
    assert [a.rule for _, a in out] == ["velocity_zone_d", "velocity_zone_c"]


def test_two_workers_give_the_same_alarms_as_one():
    items = random_items(5, n=6_000, devices=8)
    single = run_threshold(items, RULES, batch_size=50)
    out: list[tuple[str, Alarm]] = []
    workers: set[int] = set()
    run_dataflow(build_flow(items, out, RULES, batch_size=50, workers_seen=workers), workers=2)
    assert workers == {0, 1}
    assert len(single) > 100
    assert per_key(out) == per_key(single) == per_key(reference(items, RULES))


def test_works_on_telemetry_readings_keyed_by_series():
    rule = Rule("hot", "value", raise_above=80.0, clear_below=75.0)
    readings = [Reading("boiler", "temp", at(i), v) for i, v in enumerate([70, 81, 79, "x", 74])]
    flow = Dataflow("readings")
    s = op.input("in", flow, TestingSource([(series_key(r.device, r.key), r) for r in readings]))
    out: list[tuple[str, Alarm]] = []
    op.output("out", threshold("alarms", s, rules=[rule]), TestingSink(out))
    run_main(flow)
    assert [(k, a.state, a.value) for k, a in out] == [
        ("boiler/temp", RAISED, 81.0),
        ("boiler/temp", CLEARED, 74.0),
    ]


def test_an_evicted_series_clears_its_raised_alarms_with_the_last_item_seen():
    hot = Rule("hot", "value", raise_above=80.0, clear_below=75.0)
    cold = Rule("cold", "value", raise_below=0.0, clear_above=5.0, severity="warning")
    key = series_key("boiler", "temp")
    items = [Reading("boiler", "temp", at(i), v) for i, v in enumerate([70, 81, 90, 85])]
    items.insert(3, Reading("boiler", "temp", at(1.5), 99.0))  # late: not the newest
    after = [Reading("boiler", "temp", at(100 + i), v) for i, v in enumerate([82, 70])]
    flow = Dataflow("evict")
    source = [(key, r) for r in items] + [(key, Evict("boiler", "temp"))] + [(key, r) for r in after]
    s = op.input("in", flow, TestingSource(source))
    out: list[tuple[str, Alarm]] = []
    op.output("out", threshold("alarms", s, rules=[hot, cold]), TestingSink(out))
    run_main(flow)
    assert brief(a for _, a in out) == [
        (1.0, RAISED, 81.0),
        (3.0, CLEARED, 85.0),  # the eviction: ts and value of the newest item while raised
        (100.0, RAISED, 82.0),  # the series afresh: alarms still alternate
        (101.0, CLEARED, 70.0),
    ]
    assert {a.rule for _, a in out} == {"hot"}  # the rule not raised clears nothing


def test_an_evicted_key_without_raised_alarms_or_from_an_older_snapshot_clears_nothing():
    mapper = _threshold_mapper("t", (HIGH,))
    evict = Evict("d", "x")
    assert mapper(None, evict) == (None, [])
    running = {"velocity_high": RuleState(False, 1, at(1), at(1))}
    assert mapper(running, evict) == (None, [])
    older = RuleState(active=True)
    del older.last_ts  # as unpickled from a snapshot taken before the field existed
    assert mapper({"velocity_high": older}, evict) == (None, [])
    state, out = mapper({"velocity_high": older}, Features("d", "x", at(5), 11.0, 10.0))
    assert list(out) == [] and state == {
        "velocity_high": RuleState(active=True, last_ts=at(5), last_value=11.0)
    }


# --- state and recovery -------------------------------------------------------------------


def test_state_is_kept_only_while_needed_and_is_small_and_picklable():
    mapper = _threshold_mapper("t", (replace(HIGH, min_count=2), FREEZE))
    state, out = mapper(None, Features("d", "x", at(0), 5.0, 10.0))
    assert (state, list(out)) == (None, [])
    state, out = mapper(None, Features("d", "x", at(1), 11.0, 10.0))
    assert list(out) == []
    assert state == {"velocity_high": RuleState(False, 1, at(1), at(1))}
    state, out = mapper(state, Features("d", "x", at(2), 12.0, 10.0))
    assert [a.state for a in out] == [RAISED]
    assert state == {"velocity_high": RuleState(active=True, last_ts=at(2), last_value=12.0)}
    blob = pickle.dumps(state)
    assert pickle.loads(blob) == state
    assert len(blob) < 300
    state, out = mapper(state, Features("d", "x", at(3), 1.0, 10.0))
    assert [a.state for a in out] == [CLEARED]
    assert state is None


def test_resume_from_recovery_snapshot_gives_the_same_alarms(tmp_path):
    items = random_items(11, n=3_000)
    source: list = [(key_of(i), i) for i in items]
    source.insert(1_700, TestingSource.ABORT())
    out: list[tuple[str, Alarm]] = []
    run_with_recovery(lambda: build_flow(items, out, RULES, source=source, batch_size=50), tmp_path)
    expected = reference(items, RULES)
    assert len(expected) > 50
    # At-least-once: a resumed run may re-emit what followed the last snapshot.
    assert {a for _, a in out} == {a for _, a in expected}
    assert len(out) < 2 * len(expected)


# --- rules given to the operator -------------------------------------------------------------


def source_stream(flow: Dataflow) -> op.KeyedStream:
    return op.input("in", flow, TestingSource([("pump-7/x", series([1.0])[0])]))


@pytest.mark.parametrize(
    ("rules", "error", "pattern"),
    [
        (
            HIGH,
            TypeError,
            r"threshold 'bad\.alarms': `rules` must be a sequence of Rule; got "
            r"Rule\(name='velocity_high'.*\(Rule\)\. Hint: pass a list, e\.g\. "
            r"rules=\[Rule\(name=\"temp_high\"",
        ),
        (
            (r for r in [HIGH]),
            TypeError,
            r"threshold 'bad\.alarms': `rules` must be a sequence of Rule; got <generator",
        ),
        (
            "velocity_high",
            TypeError,
            r"threshold 'bad\.alarms': `rules` must be a sequence of Rule; got 'velocity_high'",
        ),
        (
            [],
            ValueError,
            r"threshold 'bad\.alarms': `rules` is empty; got \[\]\. Hint: give at least one Rule",
        ),
        (
            [HIGH, {"name": "x"}],
            TypeError,
            r"threshold 'bad\.alarms': `rules\[1\]` must be a Rule; got \{'name': 'x'\} \(dict\)\. "
            r"Hint: build rules with operators\.threshold\.Rule",
        ),
        (
            [HIGH, ZONE_C, replace(ZONE_C, raise_above=9.0)],
            ValueError,
            r"threshold 'bad\.alarms': rule name 'velocity_zone_c' is used by rules\[1\] and "
            r"rules\[2\]\. Hint: names label the alarms and the per-key rule state",
        ),
    ],
)
def test_rules_errors_fail_at_build_time(rules, error, pattern):
    flow = Dataflow("bad")
    with pytest.raises(error, match=pattern):
        threshold("alarms", source_stream(flow), rules=rules)


def run_to_error(items: list) -> BaseException:
    flow = Dataflow("bad")
    s = op.input("in", flow, TestingSource(items))
    op.output("out", threshold("alarms", s, rules=[HIGH]), TestingSink([]))
    with pytest.raises(BytewaxRuntimeError) as info:
        run_main(flow)
    assert info.value.__cause__ is not None
    return info.value.__cause__


def test_item_without_device_or_ts_fails_with_a_clear_error():
    cause = run_to_error([("k", {"device": "d", "ts": T0, "velocity_rms_mm_s": 11.0})])
    with pytest.raises(
        TypeError,
        match=r"threshold 'bad\.alarms': items need `device` and `ts` attributes; got "
        r"\{'device': 'd'.*\(dict\)\. Hint: key a stream of records such as "
        r"operators\.records\.Reading",
    ):
        raise cause


@pytest.mark.parametrize(
    ("ts", "got"),
    [
        (datetime(2025, 3, 1, 12), r"datetime\.datetime\(2025, 3, 1, 12, 0\) \(datetime\)"),
        (1740830400.0, r"1740830400\.0 \(float\)"),
    ],
)
def test_naive_or_non_datetime_ts_fails_with_a_clear_error(ts, got):
    cause = run_to_error([("k", Features("pump-7", "x", ts, 11.0))])
    with pytest.raises(
        TypeError,
        match=r"threshold 'bad\.alarms': item `ts` must be a timezone-aware UTC datetime; got "
        + got
        + r" from device 'pump-7'\. Hint: datetime\.fromtimestamp\(seconds, tz=UTC\)\.",
    ):
        raise cause


def test_aware_non_utc_ts_is_accepted():
    cet = timezone(timedelta(hours=1))
    items = [Features("d", "x", datetime(2025, 3, 1, 13, tzinfo=cet), 11.0)]
    [(_, alarm)] = run_threshold(items, [HIGH])
    assert alarm.ts == T0
    assert alarm.ts.tzinfo is UTC
