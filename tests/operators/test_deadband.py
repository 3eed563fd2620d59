from __future__ import annotations

import math
import pickle
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import bytewax.operators as op
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.deadband import DeadbandConfig, _deadband_mapper, deadband
from operators.records import Reading, series_key
from tests.conftest import READING_T0, keyed, note_workers, reading, run_dataflow, run_with_recovery

T0 = READING_T0


def build_flow(
    readings: Sequence[Reading],
    out: list,
    *,
    batch_size: int = 64,
    source: list | None = None,
    workers_seen: set[int] | None = None,
    **settings_: object,
) -> Dataflow:
    flow = Dataflow("deadband_test")
    items = keyed(readings) if source is None else source
    s = op.input("in", flow, TestingSource(items, batch_size=batch_size))
    kept = deadband("deadband", s, **settings_)
    note_workers("where", kept, workers_seen)
    op.output("out", kept, TestingSink(out))
    return flow


def run_deadband(readings: Sequence[Reading], **settings_: object) -> list[Reading]:
    out: list[tuple[str, Reading]] = []
    run_main(build_flow(readings, out, **settings_))
    for key, r in out:
        assert key == series_key(r.device, r.key)
    return [r for _, r in out]


def by_key(readings: Iterable[Reading]) -> dict[str, list[Reading]]:
    grouped: dict[str, list[Reading]] = defaultdict(list)
    for r in readings:
        grouped[series_key(r.device, r.key)].append(r)
    return dict(grouped)


def reference(
    readings: Iterable[Reading],
    *,
    absolute: float | None = None,
    percent: float | None = None,
    max_silence: timedelta | None = None,
) -> list[Reading]:
    """Plain-Python statement of the deadband rules, one reading at a time."""
    last: dict[str, tuple[float | str, datetime]] = {}
    kept = []
    for r in readings:
        k = series_key(r.device, r.key)
        if k not in last:
            kept.append(r)
            last[k] = (r.value, r.ts)
            continue
        last_value, last_ts = last[k]
        if r.ts < last_ts:
            kept.append(r)  # out of order: passes, state untouched
            continue
        if max_silence is not None and r.ts - last_ts >= max_silence:
            keep = True
        elif isinstance(r.value, str) or isinstance(last_value, str):
            keep = r.value != last_value
        elif not (math.isfinite(r.value) and math.isfinite(last_value)):
            keep = True
        else:
            bands = []
            if absolute is not None:
                bands.append(absolute)
            if percent is not None:
                bands.append(percent / 100 * abs(last_value))
            keep = abs(r.value - last_value) > max(bands)
        if keep:
            kept.append(r)
            last[k] = (r.value, r.ts)
    return kept


# --- behaviour on hand-made series -------------------------------------------------


@pytest.mark.parametrize(
    ("values", "settings_", "kept_at"),
    [
        pytest.param(
            [20.0, 20.4, 20.5, 20.51, 21.0, 21.02, 19.9, 20.3, 20.45],
            {"absolute": 0.5},
            # 20.5 is exactly on the band edge (|20.5 - 20.0| == 0.5): not kept.
            [0, 3, 5, 6, 8],
            id="absolute-band-keeps-first-and-moves-beyond-band-only",
        ),
        pytest.param(
            [100.0, 109.0, 110.0, 110.5, 121.0, 122.0, 133.2],
            {"percent": 10.0},
            # 10% of 100 -> 110 stays; 110.5 leaves; 10% of 110.5 = 11.05 -> 121 stays, 122 leaves.
            [0, 3, 5],
            id="percent-band-is-relative-to-last-kept-value",
        ),
        pytest.param(
            [100.0, 101.5, 102.5, 104.0, 1000.0, 1040.0, 1060.0],
            {"absolute": 2.0, "percent": 5.0},
            # At 100 the wider band is 5% (5.0 > 2.0): 101.5, 102.5, 104 stay, 1000 leaves.
            # At 1000 the band is 50: 1040 stays, 1060 leaves.
            [0, 4, 6],
            id="both-bands-must-be-left-percent-wider",
        ),
        pytest.param(
            [1.0, 2.5, 3.5, 3.6],
            {"absolute": 2.0, "percent": 5.0},
            # At 1.0 the percent band is 0.05 but absolute 2.0 is wider: 2.5 stays, 3.5 leaves.
            [0, 2],
            id="both-bands-must-be-left-absolute-wider",
        ),
        pytest.param(
            [1.0, 1.0, 1.0, 2.0, 2.0, 1.0],
            {"absolute": 0.0},
            [0, 3, 5],
            id="zero-band-keeps-every-change-only",
        ),
    ],
)
def test_bands(values: list[float], settings_: dict[str, float], kept_at: list[int]) -> None:
    readings = [reading("pump-7", i, v) for i, v in enumerate(values)]
    assert run_deadband(readings, **settings_) == [readings[i] for i in kept_at]


def test_heartbeat_keeps_a_reading_after_max_silence():
    readings = [reading("d", s, 5.0) for s in (0, 10, 29, 30, 31, 59, 60.5, 61)]
    kept = run_deadband(readings, absolute=1.0, max_silence=timedelta(seconds=30))
    # Kept at 0, then at 30 (>= 30 s after 0), then at 60.5 (>= 30 s after 30).
    assert [r.ts for r in kept] == [T0 + timedelta(seconds=s) for s in (0, 30, 60.5)]


def test_heartbeat_counts_from_last_kept_not_last_seen():
    readings = [reading("d", s, v) for s, v in ((0, 0.0), (20, 5.0), (45, 5.0), (51, 5.0))]
    kept = run_deadband(readings, absolute=1.0, max_silence=timedelta(seconds=30))
    assert [r.ts for r in kept] == [T0, T0 + timedelta(seconds=20), T0 + timedelta(seconds=51)]


def test_out_of_order_passes_through_and_leaves_state_alone():
    readings = [
        reading("d", 10, 1.0),
        reading("d", 5, 1.0),  # older than last kept: passes even though unchanged
        reading("d", 3, 99.0),  # passes, and must not become the reference value
        reading("d", 11, 1.2),  # compared with 1.0 (not 99.0): within band
        reading("d", 12, 98.5),  # compared with 1.0: kept
    ]
    kept = run_deadband(readings, absolute=0.5)
    assert kept == [readings[0], readings[1], readings[2], readings[4]]


def test_equal_timestamp_is_not_out_of_order():
    readings = [reading("d", 1, 1.0), reading("d", 1, 1.1), reading("d", 1, 3.0)]
    assert run_deadband(readings, absolute=0.5) == [readings[0], readings[2]]


def test_strings_are_kept_on_exact_change_and_heartbeat():
    values = ["ok", "ok", "warn", "warn", "ok", 1.0, 1.0, "ok"]
    readings = [reading("d", i, v, key="state") for i, v in enumerate(values)]
    kept = run_deadband(readings, absolute=100.0)
    assert [r.value for r in kept] == ["ok", "warn", "ok", 1.0, "ok"]
    quiet = [reading("d", s, "ok", key="state") for s in (0, 5, 10, 15)]
    kept = run_deadband(quiet, absolute=1.0, max_silence=timedelta(seconds=10))
    assert [r.ts for r in kept] == [quiet[0].ts, quiet[2].ts]


@pytest.mark.parametrize(
    "settings_",
    [{"absolute": 0.5}, {"percent": 10.0}, {"absolute": 0.5, "percent": 10.0}],
    ids=["absolute", "percent", "both"],
)
def test_non_finite_values_are_kept_and_so_is_the_next_reading(settings_):
    nan, inf = math.nan, math.inf
    values = [1.0, 1.02, nan, 1.02, 1.03, inf, inf, 1.03, 1.04, -inf, 1.04]
    readings = [reading("d", i, v) for i, v in enumerate(values)]
    kept = run_deadband(readings, **settings_)
    assert [r.ts for r in kept] == [r.ts for r in reference(readings, **settings_)]
    got = [r.value for r in kept]
    assert got[0] == 1.0 and math.isnan(got[1]) and got[2:] == [1.02, inf, inf, 1.03, -inf, 1.04]


def test_keys_are_independent():
    readings = [
        reading("a", 0, 10.0),
        reading("b", 0, 10.0),
        reading("a", 1, 10.2),
        reading("b", 1, 11.0),
        reading("a", 2, 10.4),
        reading("a", 3, 11.0, key="other"),
    ]
    kept = run_deadband(readings, absolute=0.5)
    assert by_key(kept) == by_key(readings[i] for i in (0, 1, 3, 5))


# --- against the reference ---------------------------------------------------------

CONFIGS = [
    {"absolute": 0.5},
    {"absolute": 0.0},
    {"percent": 2.0},
    {"absolute": 0.5, "percent": 2.0},
    {"absolute": 1.0, "max_silence": timedelta(seconds=20)},
    {"percent": 5.0, "max_silence": timedelta(seconds=7)},
    {"absolute": 0.25, "percent": 1.0, "max_silence": timedelta(seconds=15)},
]


def random_walk(seed: int, n: int = 20_000, devices: int = 6) -> list[Reading]:
    """Random walks of several devices, interleaved, ~2% of readings out of order."""
    rng = np.random.default_rng(seed)
    device_of = rng.integers(0, devices, n)
    steps = rng.normal(0.0, 0.4, n) * rng.choice([0.1, 1.0, 5.0], n)
    readings = []
    value = np.full(devices, 50.0)
    clock = np.zeros(devices)
    for i in range(n):
        d = device_of[i]
        value[d] += steps[i]
        clock[d] += rng.exponential(1.0)
        ts = clock[d]
        if rng.random() < 0.02:
            ts -= rng.uniform(0.0, 30.0)
        readings.append(reading(f"dev-{d}", round(float(ts), 3), round(float(value[d]), 2)))
    return readings


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("settings_", CONFIGS, ids=lambda c: ",".join(map(str, c)))
def test_random_walks_match_reference(seed, settings_):
    readings = random_walk(seed)
    kept = run_deadband(readings, batch_size=500, **settings_)
    expected = reference(readings, **settings_)
    assert by_key(kept) == by_key(expected)
    # The filter must actually filter, and must keep more than the first readings.
    assert len(by_key(readings)) < len(expected) < len(readings)


values_st = st.one_of(
    st.integers(-6, 6).map(float),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from(["on", "off"]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
step_st = st.tuples(
    st.integers(0, 2),  # device
    st.integers(-20, 40),  # seconds since the device's previous reading (< 0: out of order)
    values_st,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(step_st, max_size=60),
    absolute=st.sampled_from([None, 0.0, 0.5, 1.0, 2.5]),
    percent=st.sampled_from([None, 0.0, 10.0, 50.0]),
    max_silence=st.sampled_from([None, timedelta(seconds=1), timedelta(seconds=30)]),
)
def test_hypothesis_matches_reference(steps, absolute, percent, max_silence):
    if absolute is None and percent is None:
        absolute = 0.0
    clocks = [0, 0, 0]
    readings = []
    for device, dt, value in steps:
        clocks[device] += dt
        readings.append(reading(f"d{device}", clocks[device], value))
    kept = run_deadband(
        readings, absolute=absolute, percent=percent, max_silence=max_silence, batch_size=7
    )
    expected = reference(readings, absolute=absolute, percent=percent, max_silence=max_silence)
    # repr: NaN compares unequal to itself
    assert repr(sorted(by_key(kept).items())) == repr(sorted(by_key(expected).items()))


def test_two_workers_keep_the_same_readings_as_one():
    readings = random_walk(7, n=8_000, devices=12)
    settings_ = {"absolute": 0.5, "percent": 1.0, "max_silence": timedelta(seconds=10)}
    single = run_deadband(readings, **settings_)
    out: list[tuple[str, Reading]] = []
    workers: set[int] = set()
    run_dataflow(build_flow(readings, out, workers_seen=workers, **settings_), workers=2)
    assert workers == {0, 1}
    assert by_key(r for _, r in out) == by_key(single) == by_key(reference(readings, **settings_))


def test_resume_from_recovery_snapshot_keeps_the_same_readings(tmp_path):
    readings = random_walk(11, n=3_000, devices=4)
    settings_ = {"absolute": 0.5, "max_silence": timedelta(seconds=10)}
    source = keyed(readings)
    source.insert(1_700, TestingSource.ABORT())
    out: list[tuple[str, Reading]] = []
    run_with_recovery(
        lambda: build_flow(readings, out, source=source, batch_size=50, **settings_), tmp_path
    )
    both_runs = [r for _, r in out]
    expected = reference(readings, **settings_)
    # At-least-once: a resumed run may re-emit what followed the last snapshot.
    assert set(both_runs) == set(expected)
    assert len(both_runs) < 2 * len(expected)


def test_state_is_a_small_picklable_tuple():
    config = DeadbandConfig(absolute=1.0, max_silence=timedelta(seconds=5))
    mapper = _deadband_mapper(config)
    state, out = mapper(None, reading("d", 0, 1.0))
    assert out == (reading("d", 0, 1.0),)
    assert isinstance(state, tuple)
    assert pickle.loads(pickle.dumps(state)) == state


# --- configuration errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("settings_", "error", "pattern"),
    [
        (
            {},
            ValueError,
            r"deadband needs `absolute` or `percent` \(or both\); got neither\. Hint: absolute=",
        ),
        (
            {"max_silence": timedelta(seconds=1)},
            ValueError,
            r"deadband needs `absolute` or `percent`.*got neither",
        ),
        (
            {"absolute": -0.5},
            ValueError,
            r"deadband `absolute` must be a finite number >= 0; got -0\.5\. Hint: give the band",
        ),
        (
            {"absolute": math.nan},
            ValueError,
            r"deadband `absolute` must be a finite number >= 0; got nan\. Hint:",
        ),
        (
            {"percent": math.inf},
            ValueError,
            r"deadband `percent` must be a finite number >= 0; got inf\. Hint: give a percentage",
        ),
        (
            {"percent": -1},
            ValueError,
            r"deadband `percent` must be a finite number >= 0; got -1\. Hint:",
        ),
        (
            {"absolute": "0.5"},
            TypeError,
            r"deadband `absolute` must be a number; got '0\.5' \(str\)\. Hint:",
        ),
        (
            {"percent": True},
            TypeError,
            r"deadband `percent` must be a number; got True \(bool\)\. Hint:",
        ),
        (
            {"absolute": 1.0, "max_silence": timedelta(0)},
            ValueError,
            r"deadband `max_silence` must be longer than zero; got datetime\.timedelta\(0\)\. "
            r"Hint: leave it None",
        ),
        (
            {"absolute": 1.0, "max_silence": timedelta(seconds=-3)},
            ValueError,
            r"deadband `max_silence` must be longer than zero; got datetime\.timedelta\(days=-1",
        ),
        (
            {"absolute": 1.0, "max_silence": 30},
            TypeError,
            r"deadband `max_silence` must be a datetime\.timedelta; got 30 \(int\)\. "
            r"Hint: max_silence=timedelta\(minutes=5\)",
        ),
    ],
)
def test_config_errors(settings_, error, pattern):
    with pytest.raises(error, match=pattern):
        DeadbandConfig(**settings_)
    # The operator checks its settings while the flow is built, before any data.
    flow = Dataflow("bad")
    s = op.input("in", flow, TestingSource(keyed([reading("d", 0, 1.0)])))
    with pytest.raises(error, match=pattern):
        deadband("deadband", s, **settings_)


def test_config_accepts_valid_settings():
    config = DeadbandConfig(absolute=0, percent=2.5, max_silence=timedelta(minutes=1))
    assert config.tolerance_for(100.0) == pytest.approx(2.5)
    assert config.tolerance_for(-10.0) == 0.25
    assert math.isnan(config.tolerance_for(math.inf))
    assert config.tolerance_for("text") == 0.0
    assert re.fullmatch(r"DeadbandConfig\(.*\)", repr(config))
