"""Deterministic windows: lateness from each key's own event time, replay, quiet flushes.

Lateness and window contents depend only on event time and the order readings
arrive in; the wall clock only decides when a quiet window is flushed. These
tests run real dataflows (``run_main``, Bytewax recovery) and check the rule
directly on the per-key logic with a hand-driven clock.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.records import Reading
from operators.windows import (
    Summary,
    WindowConfig,
    _SeriesWindows,
    _SummaryLogic,
    window_aggregate,
)
from tests.conftest import READING_T0, keyed, reading
from tests.operators.test_windows import assert_matches, reference, run_windows

T0 = READING_T0
SECOND = timedelta(seconds=1)


def final_rows(summaries: Sequence[Summary]) -> dict[tuple[str, str, datetime], Summary]:
    """The final row of each window: the highest ``count`` per natural key."""
    final: dict[tuple[str, str, datetime], Summary] = {}
    for s in summaries:
        k = (s.device, s.key, s.window_start)
        if k not in final or s.count > final[k].count:
            final[k] = s
    return final


def timed_flow(
    source: list, down: list, late: list, emitted_at: list | None = None, **settings_: object
) -> Dataflow:
    """A window flow that also notes (monotonic seconds, summary) for every row."""
    flow = Dataflow("windows_replay")
    s = op.input("in", flow, TestingSource(source, batch_size=50))
    out = window_aggregate("agg", s, **settings_)
    if emitted_at is not None:
        op.inspect("when", out.down, lambda _s, kv: emitted_at.append((time.monotonic(), kv[1])))
    op.output("down", out.down, TestingSink(down))
    op.output("late", out.late, TestingSink(late))
    return flow


# --- lateness is a device's own affair ------------------------------------------------


def test_in_order_backlog_long_after_its_timestamps_is_not_late():
    # The probe: readings every 0.1 s, the broker stopped twice, each device's backlog
    # arriving seconds after its timestamps with allowed lateness well below that.
    settings_ = {"length": timedelta(seconds=2), "align_to": T0, "allowed_lateness": SECOND / 5}
    devices = ("pump-1", "fan-2")
    source: list = []
    for i in range(60):
        source += keyed(reading(d, i / 10, float(i)) for d in devices)
        if i in (19, 39):  # outage: nothing arrives for longer than allowed_lateness
            source.append(TestingSource.PAUSE(SECOND * 0.6))
    down: list = []
    late: list = []
    run_main(timed_flow(source, down, late, **settings_))
    assert late == []
    summaries = [s for _, s in down]
    readings = [kv[1] for kv in source if isinstance(kv, tuple)]
    expected, _ = reference(readings, **settings_)  # type: ignore[arg-type]
    assert_matches(list(final_rows(summaries).values()), expected)
    assert sum(s.count for s in final_rows(summaries).values()) == 120


def test_out_of_order_beyond_allowed_lateness_within_the_device_is_late():
    readings = [
        reading("d", 10, 1.0),
        reading("d", 7.5, 2.0),  # 2.5 s behind, allowed 3 s: on time
        reading("d", 6.9, 3.0),  # 3.1 s behind: late
        reading("other", 0, 4.0),  # another device far behind: its own clock
        reading("d", 7.0, 5.0),  # exactly newest - allowed lateness: on time
    ]
    summaries, late = run_windows(
        readings, length=timedelta(seconds=20), align_to=T0, allowed_lateness=3 * SECOND
    )
    assert late == [readings[2]]
    by_device = {s.device: s for s in summaries}
    assert by_device["d"].count == 3 and by_device["other"].count == 1


def test_one_device_far_ahead_never_makes_another_late():
    ahead = [reading("ahead", 10 * 86_400 + i, 1.0) for i in range(20)]  # ten days ahead
    behind = [reading("behind", i * 0.5, float(i)) for i in range(20)]
    behind[7], behind[9] = behind[9], behind[7]  # out of order by 1 s, allowed 2 s
    mixed = [r for pair in zip(ahead, behind, strict=True) for r in pair]
    settings_ = {"length": timedelta(seconds=4), "align_to": T0, "allowed_lateness": 2 * SECOND}
    together, late = run_windows(mixed, **settings_)
    alone, _ = run_windows(behind, **settings_)
    assert late == []
    assert sorted(
        (s for s in together if s.device == "behind"), key=lambda s: s.window_start
    ) == sorted(alone, key=lambda s: s.window_start)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(-40, 60), st.integers(-100, 100)),
        min_size=1,
        max_size=60,
    ),
    st.sampled_from([(10, None, 0), (10, 4, 15), (7, 7, 30), (25, 10, 5)]),
    st.integers(1, 20),
)
def test_hypothesis_lateness_and_windows_follow_each_devices_event_time(rows, window, batch):
    # Random jumps back and forth per device: the result is the event-time reference,
    # whatever the batching and however the devices interleave.
    length, slide, lateness = window
    clocks = [0, 0, 0]
    readings = []
    for device, step, value in rows:
        clocks[device] += step
        readings.append(reading(f"d{device}", clocks[device] / 10, float(value)))
    settings_ = {
        "length": timedelta(seconds=length),
        "slide": None if slide is None else timedelta(seconds=slide),
        "allowed_lateness": timedelta(seconds=lateness / 10),
    }
    summaries, late = run_windows(readings, batch_size=batch, **settings_)
    expected, expected_late = reference(readings, **settings_)  # type: ignore[arg-type]
    for device in ("d0", "d1", "d2"):  # each device's late readings, in arrival order
        assert [r for r in late if r.device == device] == [
            r for r in expected_late if r.device == device
        ]
    assert_matches(summaries, expected)


# --- the same input gives the same rows ------------------------------------------------


def random_walk(n: int, devices: int, seed: int) -> list[Reading]:
    """Per-device increasing time with jitter: some readings out of order, some late."""
    import random

    rng = random.Random(seed)
    clocks = [0.0] * devices
    out = []
    for i in range(n):
        d = rng.randrange(devices)
        clocks[d] += rng.uniform(0.0, 0.5)
        jitter = rng.choice([0.0, 0.0, 0.0, -1.0, -4.0])
        out.append(reading(f"dev-{d}", round(clocks[d] + jitter, 2), float(i % 17)))
    return out


WINDOW = {"length": timedelta(seconds=5), "slide": timedelta(seconds=2.5), "align_to": T0}
WINDOW_LATENESS = 2 * SECOND


def test_the_same_input_run_twice_gives_identical_rows():
    readings = random_walk(2_000, 4, seed=1)
    first = run_windows(readings, allowed_lateness=WINDOW_LATENESS, **WINDOW)
    second = run_windows(readings, allowed_lateness=WINDOW_LATENESS, **WINDOW)
    assert first == second
    assert first[1], "the input has late readings"
    assert len(final_rows(first[0])) == len(first[0]), "no window emitted twice"


def crashing_flow(
    source: list,
    down: list,
    late: list,
    crash_at: int | None,
    **settings_: object,
) -> Callable[[], Dataflow]:
    """Build the flow; its map step raises once, at the ``crash_at``-th reading."""
    seen = {"n": 0, "crashed": crash_at is None}

    def maybe_crash(kv: tuple[str, Reading]) -> tuple[str, Reading]:
        seen["n"] += 1
        if not seen["crashed"] and seen["n"] == crash_at:
            seen["crashed"] = True
            msg = f"injected crash at reading {crash_at}"
            raise RuntimeError(msg)
        return kv

    def make() -> Dataflow:
        seen["n"] = 0
        flow = Dataflow("windows_crash")
        s = op.input("in", flow, TestingSource(source, batch_size=25))
        s = op.map("crash", s, maybe_crash)
        out = window_aggregate("agg", s, **settings_)
        op.output("down", out.down, TestingSink(down))
        op.output("late", out.late, TestingSink(late))
        return flow

    return make


def run_recovered(make: Callable[[], Dataflow], recovery_dir: Path) -> None:
    """Run until the injected crash, then again: the second run resumes from a snapshot."""
    init_db_dir(recovery_dir, 1)
    config = RecoveryConfig(str(recovery_dir))
    interval = timedelta(milliseconds=1)
    with pytest.raises(RuntimeError, match='in step "windows_crash.crash') as crashed:
        run_main(make(), epoch_interval=interval, recovery_config=config)
    causes, error = [], crashed.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__
    assert any("injected crash" in cause for cause in causes), causes
    run_main(make(), epoch_interval=interval, recovery_config=config)


@pytest.mark.parametrize("crash_at", [1, 700, 1_900])
def test_crash_and_resume_from_a_snapshot_gives_identical_rows(tmp_path, crash_at):
    readings = random_walk(2_000, 4, seed=2)
    settings_ = {"allowed_lateness": WINDOW_LATENESS, **WINDOW}
    expected, expected_late = run_windows(readings, **settings_)
    down: list = []
    late: list = []
    make = crashing_flow(keyed(readings), down, late, crash_at, **settings_)
    run_recovered(make, tmp_path)
    # At least once: rows between the last snapshot and the crash may come twice,
    # but always identical to the uninterrupted run's, and nothing is missing.
    assert {s for _, s in down} == set(expected)
    assert {r for _, r in late} == set(expected_late)
    assert final_rows([s for _, s in down]) == final_rows(expected)


def test_crash_after_a_quiet_flush_and_a_backlog_gives_the_same_final_rows(tmp_path):
    # A window is flushed while its device is quiet; the device's backlog then adds to it
    # and the run crashes. The resumed run ends with the same final rows as a run with
    # no pause and no crash.
    settings_ = {"length": timedelta(seconds=2), "align_to": T0, "allowed_lateness": SECOND / 5}
    readings = [reading("d", i / 10, float(i)) for i in range(50)]
    source = keyed(readings)
    source.insert(15, TestingSource.PAUSE(SECOND * 1.5))  # quiet: [0 s, 2 s) is flushed
    expected, _ = run_windows(readings, **settings_)
    down: list = []
    late: list = []
    make = crashing_flow(source, down, late, 30, **settings_)
    run_recovered(make, tmp_path)
    summaries = [s for _, s in down]
    assert late == []
    assert final_rows(summaries) == final_rows(expected)
    flushed = [s for s in summaries if s.window_start == T0]
    assert min(s.count for s in flushed) == 15  # the flush during the pause
    assert max(s.count for s in flushed) == 20  # superseded when the window closed


# --- quiet windows -----------------------------------------------------------------------


def test_quiet_windows_are_emitted_without_new_input():
    settings_ = {"length": timedelta(seconds=10), "align_to": T0, "allowed_lateness": SECOND / 2}
    readings = [reading("d", 9.0 + i / 10, float(i)) for i in range(5)]  # newest 9.4 s
    source = [*keyed(readings), TestingSource.PAUSE(timedelta(seconds=3))]  # then idles
    down: list = []
    late: list = []
    emitted_at: list = []
    start = time.monotonic()
    run_main(timed_flow(source, down, late, emitted_at, **settings_))
    assert late == []
    ((when, s),) = emitted_at
    # Due after end - newest + allowed lateness = 1.1 s of silence, long before EOF.
    assert 1.0 < when - start < 2.5
    assert (s.count, s.first, s.last) == (5, 0.0, 4.0)


def test_a_device_that_keeps_sending_is_never_flushed():
    # Readings paced like the wall clock: event time closes every window, once.
    settings_ = {"length": SECOND / 2, "align_to": T0, "allowed_lateness": SECOND / 2}
    source: list = []
    for i in range(80):  # 2 s of readings: [0, 0.5 s) and [0.5 s, 1 s) close by event time
        source += keyed([reading("live", i / 40, float(i))])
        source.append(TestingSource.PAUSE(SECOND / 40))
    down: list = []
    late: list = []
    run_main(timed_flow(source, down, late, **settings_))
    summaries = [s for _, s in down]
    assert late == []
    assert len(summaries) == len(final_rows(summaries)) == 4
    assert sum(s.count for s in summaries) == 80


# --- the rule, on one key with a hand-driven wall clock ----------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_flush_timing_never_changes_lateness_or_contents():
    config = WindowConfig(length=timedelta(seconds=10), align_to=T0, allowed_lateness=SECOND)
    backlog = [reading("d", s, float(s)) for s in (9.6, 9.8, 10.5, 12.0)]
    results = []
    for flush in (False, True):
        clock = FakeClock()
        logic = _SeriesWindows(config, None, now=clock)
        out, _ = logic.on_batch([reading("d", s, float(s)) for s in (8.0, 9.5)])
        assert out == []
        # Due when the key's watermark would have passed 10 s: 10 - 9.5 + 1 = 1.5 s quiet.
        assert logic.notify_at() == clock.now + timedelta(seconds=1.5)
        clock.now += timedelta(seconds=1.4)
        assert logic.on_notify()[0] == []
        events = []
        if flush:
            clock.now += timedelta(minutes=10)
            events += logic.on_notify()[0]
            assert [acc[2] for _, acc in events] == [2]  # flushed with 2 readings
            assert logic.notify_at() is None  # nothing new to flush
        # Restore from a pickled snapshot: the same decisions follow.
        logic = _SeriesWindows(config, pickle.loads(pickle.dumps(logic.snapshot())), now=clock)
        events += logic.on_batch(backlog)[0]  # 12.0 closes [0 s, 10 s): 11 s >= 10 s
        results.append(events)
    unflushed, flushed = results
    assert [(w, acc[2]) for w, acc in unflushed] == [(0, 4)]
    assert [(w, acc[2]) for w, acc in flushed] == [(0, 2), (0, 4)]
    assert unflushed[-1] == flushed[-1]  # the final row does not depend on the flush


def test_a_flushed_window_that_gets_nothing_more_is_not_emitted_again():
    config = WindowConfig(length=timedelta(seconds=10), align_to=T0, allowed_lateness=SECOND)
    clock = FakeClock()
    logic = _SeriesWindows(config, None, now=clock)
    logic.on_batch([reading("d", 5, 1.0)])
    clock.now += timedelta(hours=1)
    (flushed,) = logic.on_notify()[0]
    out, keep = logic.on_batch([reading("d", 30, 2.0)])  # closes [0 s, 10 s)
    assert out == [] and keep is False  # RETAIN: the key's event time is kept
    ((window_id, acc),) = logic.on_eof()[0]  # only the window of the new reading
    assert (flushed[0], window_id, acc[2], acc[3]) == (0, 3, 1, 2.0)


def per_reading_batch(logic: _SeriesWindows, values: list[Reading]) -> list[object]:
    """The per-reading algorithm ``on_batch`` folds in locals: ``on_value`` per window."""
    config = logic.config
    out: list[object] = []
    newest = logic.newest
    cutoff = None if newest is None else newest - config.allowed_lateness
    for r in values:
        if newest is None or r.ts > newest:
            newest = r.ts
            cutoff = r.ts - config.allowed_lateness
        elif cutoff is not None and r.ts < cutoff:
            out.append((None, r))
            continue
        for window_id in range(config.first_window(r.ts), config.last_window(r.ts) + 1):
            if window_id not in logic.windows:
                logic.windows[window_id] = _SummaryLogic(None)
            logic.windows[window_id].on_value(r)
    logic.newest = newest
    if cutoff is not None:
        for window_id in sorted(w for w in logic.windows if logic._end(w) <= cutoff):
            logic._emit(window_id, out)  # type: ignore[arg-type]
            del logic.windows[window_id]
            logic.flushed.pop(window_id, None)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.integers(-10, 40),
            st.one_of(
                st.integers(-3, 3).map(float),
                st.floats(-1e6, 1e6),
                st.sampled_from([math.nan, -0.0, "on"]),
            ),
        ),
        min_size=1,
        max_size=80,
    ),
    length=st.integers(1, 20),
    slide=st.one_of(st.none(), st.integers(1, 20)),
    lateness=st.integers(0, 15),
    cuts=st.lists(st.integers(1, 80), max_size=6),
)
def test_batches_fold_exactly_like_one_reading_at_a_time(steps, length, slide, lateness, cuts):
    slide = None if slide is None else min(slide, length)
    config = WindowConfig(
        length=length * SECOND,
        slide=None if slide is None else slide * SECOND,
        allowed_lateness=lateness * SECOND,
    )
    readings = [reading("d", t, v) for t, v in steps]
    bounds = sorted({0, len(readings), *(c for c in cuts if c < len(readings))})
    fast = _SeriesWindows(config, None, now=lambda: T0)
    slow = _SeriesWindows(config, None, now=lambda: T0)
    for a, b in zip(bounds, bounds[1:], strict=False):
        got, _ = fast.on_batch(readings[a:b])
        want = per_reading_batch(slow, readings[a:b])
        assert repr(got) == repr(want)  # repr: bit-exact floats, NaN included
        assert repr(fast.snapshot()) == repr(slow.snapshot())
