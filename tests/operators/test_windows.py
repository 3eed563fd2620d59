from __future__ import annotations

import pickle
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import astuple
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import bytewax.operators as op
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.records import Reading, series_key
from operators.windows import Summary, WindowConfig, _SummaryLogic, window_aggregate
from tests.conftest import READING_T0, keyed, note_workers, reading, run_dataflow, run_with_recovery

T0 = READING_T0
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def build_flow(
    source: list,
    down: list,
    late: list,
    *,
    batch_size: int = 500,
    workers_seen: set[int] | None = None,
    **settings_: object,
) -> Dataflow:
    flow = Dataflow("windows_test")
    s = op.input("in", flow, TestingSource(source, batch_size=batch_size))
    out = window_aggregate("agg", s, **settings_)
    note_workers("where", out.down, workers_seen)
    op.output("down", out.down, TestingSink(down))
    op.output("late", out.late, TestingSink(late))
    return flow


def run_windows(
    readings: Sequence[Reading], *, workers: int = 1, **settings_: object
) -> tuple[list[Summary], list[Reading]]:
    down: list[tuple[str, Summary]] = []
    late: list[tuple[str, Reading]] = []
    run_dataflow(build_flow(keyed(readings), down, late, **settings_), workers=workers)
    for key, s in down:
        assert key == series_key(s.device, s.key)
    for key, r in late:
        assert key == series_key(r.device, r.key)
    return [s for _, s in down], [r for _, r in late]


def reference(
    readings: Sequence[Reading],
    *,
    length: timedelta,
    slide: timedelta | None = None,
    allowed_lateness: timedelta = timedelta(seconds=5),
    align_to: datetime = EPOCH,
) -> tuple[dict[tuple[str, str, datetime], tuple], list[Reading]]:
    """NumPy statement of the window rules (late = older than newest-of-key - lateness)."""
    slide = length if slide is None else slide
    newest: dict[str, datetime] = {}
    on_time: dict[str, list[Reading]] = {}
    late = []
    for r in readings:
        k = series_key(r.device, r.key)
        if k in newest and r.ts < newest[k] - allowed_lateness:
            late.append(r)
            continue
        newest[k] = max(newest.get(k, r.ts), r.ts)
        if not isinstance(r.value, str):
            on_time.setdefault(k, []).append(r)
    us = timedelta(microseconds=1)
    length_us, slide_us = length // us, slide // us
    summaries = {}
    for rs in on_time.values():
        t = np.array([(r.ts - align_to) // us for r in rs], dtype=np.int64)
        v = np.array([r.value for r in rs], dtype=np.float64)
        first_id = int(((t - length_us) // slide_us + 1).min())
        last_id = int((t // slide_us).max())
        for wid in range(first_id, last_id + 1):
            start_us = wid * slide_us
            inside = (t >= start_us) & (t < start_us + length_us)
            if not inside.any():
                continue
            tw, vw = t[inside], v[inside]
            start = align_to + timedelta(microseconds=int(start_us))
            summaries[(rs[0].device, rs[0].key, start)] = (
                start + length,
                int(inside.sum()),
                float(vw.mean()),
                float(vw.min()),
                float(vw.max()),
                float(vw.std(ddof=0)),
                float(vw[np.argmin(tw)]),  # earliest ts; ties: first to arrive
                float(vw[len(tw) - 1 - np.argmax(tw[::-1])]),  # latest ts; ties: last to arrive
            )
    return summaries, late


def assert_matches(summaries: list[Summary], expected: dict) -> None:
    got = {(s.device, s.key, s.window_start): s for s in summaries}
    assert len(got) == len(summaries), "a window was emitted twice"
    assert got.keys() == expected.keys()
    for k, s in got.items():
        end, count, mean, lo, hi, std, first, last = expected[k]
        assert s.window_start.tzinfo is not None and s.window_start.utcoffset() == timedelta(0)
        assert (s.window_end, s.count, s.min, s.max, s.first, s.last) == (
            end,
            count,
            lo,
            hi,
            first,
            last,
        ), k
        assert s.mean == pytest.approx(mean, rel=1e-12, abs=1e-9), k
        assert s.std == pytest.approx(std, rel=1e-9, abs=1e-9), k


def random_readings(seed: int, *, n: int = 4_000, devices: int = 5) -> list[Reading]:
    """Interleaved devices; readings delayed by up to 8 s, ~3% delayed by minutes.

    Readings whose lag behind their series' newest timestamp is between 12 s and
    90 s are left out, so with ``allowed_lateness=30 s`` every reading is clearly
    on time or clearly late however long the test itself takes.
    """
    rng = np.random.default_rng(seed)
    events = []
    for d in range(devices):
        gaps = rng.exponential(0.25, n // devices)
        ts = np.round(np.cumsum(gaps), 1)  # 0.1 s resolution: some equal timestamps
        values = np.round(np.cumsum(rng.normal(0, 1, len(ts))) + 20 * d, 3)
        delay = rng.uniform(0, 8, len(ts))
        very_late = rng.random(len(ts)) < 0.03
        delay[very_late] = rng.uniform(120, 600, very_late.sum())
        for t, v, dl in zip(ts, values, delay, strict=True):
            events.append((t + dl, reading(f"dev-{d}", float(t), float(v))))
    events.sort(key=lambda e: e[0])
    newest: dict[str, datetime] = {}
    kept = []
    for _, r in events:
        k = series_key(r.device, r.key)
        lag = (newest.get(k, r.ts) - r.ts).total_seconds()
        if 12 <= lag <= 90:
            continue
        newest[k] = max(newest.get(k, r.ts), r.ts)
        kept.append(r)
    return kept


LATENESS = timedelta(seconds=30)
WINDOWS = [
    {"length": timedelta(seconds=10)},
    {"length": timedelta(seconds=7), "align_to": T0 + timedelta(seconds=3.5)},
    {"length": timedelta(seconds=10), "slide": timedelta(seconds=5)},
    {"length": timedelta(seconds=30), "slide": timedelta(seconds=4)},
    {"length": timedelta(seconds=9), "slide": timedelta(seconds=9)},
]


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize(
    "window", WINDOWS, ids=lambda w: ",".join(f"{k}={v}" for k, v in w.items())
)
def test_random_data_matches_numpy_reference(seed, window):
    readings = random_readings(seed)
    summaries, late = run_windows(readings, allowed_lateness=LATENESS, **window)
    expected, expected_late = reference(readings, allowed_lateness=LATENESS, **window)
    assert_matches(summaries, expected)
    assert Counter(late) == Counter(expected_late)
    assert 50 < len(late) < 300  # late readings exist, and most readings are on time
    assert len({s.device for s in summaries}) == 5


def test_tumbling_by_hand():
    values = [(0, 1.0), (1, 2.0), (4, 6.0), (3, 3.0), (10, 5.0), (19.5, 7.0)]
    readings = [reading("pump-7", s, v) for s, v in values]
    summaries, late = run_windows(readings, length=timedelta(seconds=10), align_to=T0)
    assert late == []
    assert summaries == [
        Summary("pump-7", "temp", T0, T0 + timedelta(seconds=10), 4, 3.0, 1.0, 6.0,
                float(np.std([1.0, 2.0, 6.0, 3.0])), 1.0, 6.0),
        Summary("pump-7", "temp", T0 + timedelta(seconds=10), T0 + timedelta(seconds=20),
                2, 6.0, 5.0, 7.0, 1.0, 5.0, 7.0),
    ]  # fmt: skip


def test_single_reading_window_has_zero_std():
    (s,), _ = run_windows([reading("d", 1, 42.0)], length=timedelta(minutes=1))
    assert (s.count, s.mean, s.std, s.min, s.max, s.first, s.last) == (
        1,
        42.0,
        0.0,
        42.0,
        42.0,
        42.0,
        42.0,
    )


def test_std_is_stable_for_large_offsets():
    values = 1e9 + np.array([4.0, 7.0, 13.0, 16.0] * 250)
    readings = [reading("d", i * 0.01, float(v)) for i, v in enumerate(values)]
    (s,), _ = run_windows(readings, length=timedelta(minutes=1), align_to=T0)
    assert s.std == pytest.approx(float(np.std(values)), rel=1e-9)
    assert s.mean == pytest.approx(1e9 + 10.0, rel=1e-15)


def test_sliding_window_bounds_follow_bytewax_ids():
    align = datetime(2025, 3, 1, 11, 59, 58, tzinfo=UTC)
    summaries, _ = run_windows(
        [reading("d", 0, 1.0)], length=timedelta(seconds=10), slide=timedelta(seconds=4),
        align_to=align,
    )  # fmt: skip
    # T0 = align + 2 s lies in [align - 4 s, align + 6 s) and [align, align + 10 s) only:
    # [align - 8 s, align + 2 s) ends just before it.
    starts = sorted(s.window_start for s in summaries)
    assert starts == [align - timedelta(seconds=4), align]
    assert all(s.window_end - s.window_start == timedelta(seconds=10) for s in summaries)
    config = WindowConfig(length=timedelta(seconds=10), slide=timedelta(seconds=4), align_to=align)
    assert config.bounds(-1) == (align - timedelta(seconds=4), align + timedelta(seconds=6))
    assert config.first_window(T0) == -1


def test_first_and_last_follow_timestamps_not_arrival():
    readings = [reading("d", s, v) for s, v in ((5, 50.0), (2, 20.0), (8, 80.0), (1, 10.0))]
    readings += [reading("d", 8, 81.0), reading("d", 1, 11.0)]  # ties: first/last arrival
    (s,), late = run_windows(
        readings, length=timedelta(seconds=10), align_to=T0, allowed_lateness=LATENESS
    )
    assert late == []
    assert (s.first, s.last, s.count) == (10.0, 81.0, 6)


def test_each_key_has_its_own_event_time():
    ahead = [reading("ahead", 86_400 + i, 1.0) for i in range(5)]  # a day ahead
    behind = [reading("behind", i, float(i)) for i in range(5)]
    mixed = [r for pair in zip(ahead, behind, strict=True) for r in pair]
    summaries, late = run_windows(mixed, length=timedelta(seconds=10), align_to=T0)
    assert late == []
    by_device = {s.device: s for s in summaries}
    assert by_device["behind"].count == 5 and by_device["behind"].mean == 2.0
    assert by_device["ahead"].count == 5


def test_late_readings_respect_allowed_lateness_and_are_not_aggregated():
    readings = [
        reading("d", 100, 1.0),
        reading("d", 80, 2.0),  # 20 s behind, allowed 30 s: on time
        reading("d", 65, 3.0),  # 35 s behind: late
        reading("d", 130, 4.0),
        reading("d", 101, 5.0),  # 29 s behind the new newest: on time
        reading("d", 99, 6.0),  # 31 s behind: late
    ]
    summaries, late = run_windows(
        readings, length=timedelta(minutes=5), align_to=T0, allowed_lateness=LATENESS
    )
    assert late == [readings[2], readings[5]]
    (s,) = summaries
    assert (s.count, s.min, s.max, s.first, s.last) == (4, 1.0, 5.0, 2.0, 4.0)
    # With zero allowed lateness, anything older than the newest reading is late.
    summaries, late = run_windows(
        readings, length=timedelta(minutes=5), align_to=T0, allowed_lateness=timedelta(0)
    )
    assert late == [readings[i] for i in (1, 2, 4, 5)]
    assert summaries[0].count == 2


def test_late_reading_of_overlapping_sliding_windows_is_reported_once():
    readings = [reading("d", 300, 1.0), reading("d", 100, 2.0)]
    summaries, late = run_windows(
        readings,
        length=timedelta(seconds=60),
        slide=timedelta(seconds=10),
        align_to=T0,
        allowed_lateness=timedelta(seconds=5),
    )
    assert late == [readings[1]]  # it falls in 6 windows
    assert {s.count for s in summaries} == {1} and len(summaries) == 6
    assert all(s.mean == 1.0 for s in summaries)


def test_open_windows_are_emitted_at_end_of_input():
    # An hour of allowed lateness: no watermark passes any window before EOF.
    readings = [reading(f"d{i % 3}", i, float(i)) for i in range(90)]
    summaries, late = run_windows(
        readings,
        length=timedelta(seconds=10),
        allowed_lateness=timedelta(hours=1),
        align_to=T0,
    )
    assert late == []
    assert len(summaries) == 27
    assert max(s.window_end for s in summaries) == T0 + timedelta(seconds=90)
    assert sum(s.count for s in summaries) == 90


def test_strings_are_skipped():
    readings = [reading("d", 0, 1.0), reading("d", 1, "door open"), reading("d", 2, 3.0)]
    readings += [reading("d", 1, "only text", key="log")]
    summaries, late = run_windows(readings, length=timedelta(seconds=10), align_to=T0)
    assert late == []
    (s,) = summaries
    assert (s.key, s.count, s.mean, s.first, s.last) == ("temp", 2, 2.0, 1.0, 3.0)


def test_two_workers_give_the_same_result_as_one():
    readings = random_readings(9, n=3_000, devices=8)
    window = {"length": timedelta(seconds=10), "slide": timedelta(seconds=5)}
    one, late_one = run_windows(readings, allowed_lateness=LATENESS, **window)
    workers: set[int] = set()
    down: list[tuple[str, Summary]] = []
    late: list[tuple[str, Reading]] = []
    flow = build_flow(
        keyed(readings), down, late, workers_seen=workers, allowed_lateness=LATENESS, **window
    )
    run_dataflow(flow, workers=2)
    assert workers == {0, 1}
    assert Counter(s for _, s in down) == Counter(one)
    assert Counter(r for _, r in late) == Counter(late_one)
    assert late_one


def test_resume_from_recovery_snapshot_gives_the_same_windows(tmp_path):
    readings = random_readings(5, n=2_000, devices=3)
    window = {"length": timedelta(seconds=10), "allowed_lateness": LATENESS}
    expected, expected_late = run_windows(readings, **window)
    source = keyed(readings)
    source.insert(1_100, TestingSource.ABORT())
    down: list = []
    late: list = []
    run_with_recovery(lambda: build_flow(source, down, late, batch_size=50, **window), tmp_path)
    # At-least-once: what followed the last snapshot may be emitted twice.
    assert {s for _, s in down} == set(expected)
    assert {r for _, r in late} == set(expected_late)


def test_window_state_snapshot_is_picklable_and_restores():
    logic = _SummaryLogic(None)
    assert logic.snapshot() is None
    for s, v in ((1, 2.0), (0, 4.0), (2, 9.0)):
        logic.on_value(reading("d", s, v))
    state = pickle.loads(pickle.dumps(logic.snapshot()))
    restored = _SummaryLogic(state)
    restored.on_value(reading("d", 3, 1.0))
    logic.on_value(reading("d", 3, 1.0))
    assert restored.snapshot() == logic.snapshot()
    assert restored.on_close() == (logic.snapshot(),)


def test_merge_combines_like_one_window():
    values = [(0, 3.0), (5, -1.0), (2, 8.0), (9, 4.5), (7, 4.5), (1, 0.5)]
    whole, left, right = _SummaryLogic(None), _SummaryLogic(None), _SummaryLogic(None)
    for i, (s, v) in enumerate(values):
        whole.on_value(reading("d", s, v))
        (left if i < 2 else right).on_value(reading("d", s, v))
    left.on_merge(right)
    merged, single = left.snapshot(), whole.snapshot()
    assert merged is not None and single is not None
    assert merged[:3] == single[:3] and merged[5:] == single[5:]
    assert merged[3:5] == pytest.approx(single[3:5])
    empty = _SummaryLogic(None)
    empty.on_merge(whole)
    assert empty.snapshot() == single


def test_no_busy_wait_when_device_clock_lags_system_time():
    # Historical timestamps: the window's end, read as a system time, is long past.
    readings = [reading("d", 0, 1.0), reading("d", 9.5, 2.0)]
    source = [*keyed(readings), TestingSource.PAUSE(timedelta(seconds=2.5))]
    source.append(keyed([reading("d", 30, 3.0)])[0])
    emitted: list[float] = []
    flow = Dataflow("lagging")
    s = op.input("in", flow, TestingSource(source, batch_size=10))
    out = window_aggregate(
        "agg", s, length=timedelta(seconds=10), align_to=T0, allowed_lateness=timedelta(seconds=1)
    )
    op.inspect("when", out.down, lambda _s, _x: emitted.append(time.monotonic() - start))
    start, cpu = time.monotonic(), time.process_time()
    run_main(flow)
    cpu = time.process_time() - cpu
    # The quiet flush is due after end - newest + allowed lateness = 1.5 s of silence.
    assert 1.3 < emitted[0] < 2.4
    assert cpu < 1.0, f"worker spun for {cpu:.2f} s of CPU during a 2.5 s pause"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(1, 60), st.floats(-1e3, 1e3)),
        min_size=1,
        max_size=50,
    ),
    st.sampled_from([(10, None), (10, 3), (7, 7), (25, 10)]),
)
def test_hypothesis_in_order_data_matches_reference(rows, window):
    # Strictly increasing timestamps per device, zero lateness: windows close mid-stream.
    length, slide = (timedelta(seconds=x) if x else None for x in window)
    clocks = [0, 0]
    readings = []
    for device, gap, value in rows:
        clocks[device] += gap
        readings.append(reading(f"d{device}", clocks[device] / 10, value))
    settings_ = {"length": length, "slide": slide, "allowed_lateness": timedelta(0)}
    summaries, late = run_windows(readings, batch_size=8, **settings_)
    expected, expected_late = reference(readings, **settings_)
    assert late == expected_late == []
    assert_matches(summaries, expected)


# --- configuration errors ----------------------------------------------------------

BERLIN = timezone(timedelta(hours=1), "CET")


@pytest.mark.parametrize(
    ("settings_", "error", "pattern"),
    [
        (
            {"length": timedelta(0)},
            ValueError,
            r"window_aggregate `length` must be longer than zero; got datetime\.timedelta\(0\)\. "
            r"Hint: length=timedelta\(seconds=10\)",
        ),
        (
            {"length": timedelta(seconds=-5)},
            ValueError,
            r"window_aggregate `length` must be longer than zero; got datetime\.timedelta\(days=-1",
        ),
        (
            {"length": 10},
            TypeError,
            r"window_aggregate `length` must be a datetime\.timedelta; got 10 \(int\)\. "
            r"Hint: length=timedelta",
        ),
        (
            {"length": timedelta(seconds=10), "slide": timedelta(0)},
            ValueError,
            r"window_aggregate `slide` must be > 0 and <= `length` \(datetime\.timedelta"
            r"\(seconds=10\)\); got datetime\.timedelta\(0\)\. Hint: a slide longer",
        ),
        (
            {"length": timedelta(seconds=10), "slide": timedelta(seconds=11)},
            ValueError,
            r"`slide` must be > 0 and <= `length`.*got datetime\.timedelta\(seconds=11\)\. "
            r"Hint: .*leave slide=None for tumbling windows",
        ),
        (
            {"length": timedelta(seconds=10), "slide": 5.0},
            TypeError,
            r"window_aggregate `slide` must be a datetime\.timedelta; got 5\.0 \(float\)",
        ),
        (
            {"length": timedelta(seconds=10), "allowed_lateness": timedelta(seconds=-1)},
            ValueError,
            r"window_aggregate `allowed_lateness` must be >= 0; got datetime\.timedelta\(days=-1, "
            r"seconds=86399\)\. Hint: timedelta\(0\) treats",
        ),
        (
            {"length": timedelta(seconds=10), "allowed_lateness": None},
            TypeError,
            r"window_aggregate `allowed_lateness` must be a datetime\.timedelta; got None",
        ),
        (
            {"length": timedelta(seconds=10), "align_to": datetime(2025, 1, 1)},
            ValueError,
            r"window_aggregate `align_to` must be timezone-aware UTC; got 2025-01-01T00:00:00 "
            r"\(tzinfo=None\)\. Hint: datetime\(\.\.\., tzinfo=UTC\)",
        ),
        (
            {"length": timedelta(seconds=10), "align_to": datetime(2025, 1, 1, tzinfo=BERLIN)},
            ValueError,
            r"`align_to` must be timezone-aware UTC; got 2025-01-01T00:00:00\+01:00 .*"
            r"\.astimezone\(UTC\)",
        ),
        (
            {"length": timedelta(seconds=10), "align_to": "2025-01-01"},
            TypeError,
            r"window_aggregate `align_to` must be a datetime; got '2025-01-01' \(str\)\. Hint:",
        ),
    ],
)
def test_config_errors(settings_, error, pattern):
    with pytest.raises(error, match=pattern):
        WindowConfig(**settings_)
    # The operator checks its settings while the flow is built, before any data.
    flow = Dataflow("bad")
    s = op.input("in", flow, TestingSource(keyed([reading("d", 0, 1.0)])))
    with pytest.raises(error, match=pattern):
        window_aggregate("agg", s, **settings_)


def test_config_defaults_and_tumbling_equivalence():
    config = WindowConfig(length=timedelta(seconds=10))
    assert config.allowed_lateness == timedelta(seconds=5)
    assert config.align_to == EPOCH and config.step == timedelta(seconds=10)
    other_utc = WindowConfig(
        length=timedelta(1), align_to=datetime(2025, 1, 1, tzinfo=ZoneInfo("UTC"))
    )
    assert other_utc.align_to == datetime(2025, 1, 1, tzinfo=UTC)
    assert other_utc.align_to.tzinfo is UTC
    # slide == length is tumbling: same output.
    readings = random_readings(2, n=600, devices=2)
    a, _ = run_windows(readings, length=timedelta(seconds=6), allowed_lateness=LATENESS)
    b, _ = run_windows(
        readings, length=timedelta(seconds=6), slide=timedelta(seconds=6), allowed_lateness=LATENESS
    )
    assert sorted(map(astuple, a)) == sorted(map(astuple, b))
