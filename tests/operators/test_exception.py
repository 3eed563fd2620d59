from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.exception import HOLD_ROWS, ReportConfig, moved, report_by_exception
from operators.records import Evict
from operators.threshold import RAISED, Alarm
from tests.conftest import run_with_recovery

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
KEY = "pump-7/x"


@dataclass(frozen=True)
class Row:
    """The attributes of a vibration feature row the operator reads."""

    device: str
    axis: str
    ts: datetime
    rms: float
    velocity_rms_mm_s: float
    peak: float
    crest_factor: float | None
    kurtosis: float | None
    dominant_hz: float
    band_energy: tuple[float, ...]
    iso_zone: str


def row(seconds: float, rms: float = 1.0, zone: str = "A", **more: object) -> Row:
    values: dict = {
        "velocity_rms_mm_s": 1.0,
        "peak": 3.0,
        "crest_factor": 3.0,
        "kurtosis": 3.0,
        "dominant_hz": 24.75,
        "band_energy": (0.5, 0.1),
    }
    values.update(more)
    return Row("pump-7", "x", T0 + timedelta(seconds=seconds), rms, iso_zone=zone, **values)


def alarm(r: Row) -> Alarm:
    return Alarm(r.device, r.ts, "iso_zone_c", RAISED, "warning", r.rms, key=KEY)


def run(
    rows: list,
    alarms: list[Alarm] | None = None,
    *,
    batch: int = 8,
    alarm_batch: int = 8,
    **kw: object,
) -> list:
    out: list = []
    flow = Dataflow("report_test")
    up = op.input("rows", flow, TestingSource([(KEY, r) for r in rows], batch_size=batch))
    al = None
    if alarms is not None:
        al = op.input("alarms", flow, TestingSource([(KEY, a) for a in alarms], alarm_batch))
    passed = report_by_exception("report", up, alarms=al, **kw)
    op.output("out", passed, TestingSink(out))
    run_main(flow)
    assert all(k == KEY for k, _ in out)
    return [r for _, r in out]


def test_steady_rows_are_dropped_and_changes_pass() -> None:
    rows = [row(i, rms=1.0 + 0.01 * (i % 3)) for i in range(10)]
    rows.append(row(10, rms=1.5))  # +50 %
    rows.append(row(11, rms=1.52))  # within 10 % of 1.5
    rows.append(row(12, rms=1.52, zone="C"))
    rows.append(row(13, rms=1.52, zone="C", band_energy=(0.5, 0.2)))
    got = run(rows)
    assert [r.ts for r in got] == [rows[i].ts for i in (0, 10, 12, 13)]


def test_floor_hides_changes_of_a_quiet_feature() -> None:
    rows = [row(0, band_energy=(0.5, 1e-6)), row(1, band_energy=(0.5, 5e-5))]  # x50 but < 1e-4
    assert len(run(rows)) == 1
    assert len(run(rows, floors={"band_energy": 0.0})) == 2


def test_none_to_number_is_a_change() -> None:
    rows = [row(0, crest_factor=None), row(1, crest_factor=None), row(2, crest_factor=3.0)]
    assert [r.ts for r in run(rows)] == [rows[0].ts, rows[2].ts]


def test_heartbeat_passes_a_row_after_the_period() -> None:
    rows = [row(i * 60) for i in range(25)]  # one row a minute for 24 minutes
    got = run(rows, heartbeat=timedelta(minutes=10))
    assert [r.ts - T0 for r in got] == [timedelta(minutes=m) for m in (0, 10, 20)]
    assert len(run(rows, heartbeat=None)) == 1


def test_out_of_order_row_passes_and_keeps_the_reference() -> None:
    rows = [row(10), row(5), row(11, rms=1.05)]
    assert [r.ts for r in run(rows)] == [rows[0].ts, rows[1].ts]


@pytest.mark.parametrize(("batch", "alarm_batch"), [(1, 1), (64, 1), (1, 64), (7, 3)])
def test_alarm_row_passes_whether_the_alarm_comes_before_or_after(
    batch: int, alarm_batch: int
) -> None:
    rows = [row(i) for i in range(40)]
    fired = [alarm(rows[5]), alarm(rows[30])]
    got = run(rows, fired, batch=batch, alarm_batch=alarm_batch)
    assert sorted(r.ts for r in got) == [rows[0].ts, rows[5].ts, rows[30].ts]


def test_alarm_between_rows_sends_the_row_just_before() -> None:
    rows = [row(i) for i in range(10)]
    late = Alarm("pump-7", T0 + timedelta(seconds=4.5), "r", RAISED, "warning", 1.0)
    # rows first (batch of all), alarm after: the row at 4 s is the one just before
    got = run(rows, [late], batch=64, alarm_batch=1)
    assert sorted(r.ts for r in got) == [rows[0].ts, rows[4].ts]


def test_alarm_older_than_the_held_rows_passes_nothing_more() -> None:
    rows = [row(i) for i in range(HOLD_ROWS + 10)]
    old = alarm(rows[2])
    flow_rows = [(KEY, r) for r in rows]
    out: list = []
    flow = Dataflow("late_alarm")
    # one input, rows first: the alarm arrives after every row, its row is no longer held
    items = op.input("in", flow, TestingSource([*flow_rows, (KEY, old)], batch_size=500))
    op.output("out", report_by_exception("report", items), TestingSink(out))
    run_main(flow)
    assert [r.ts for _, r in out] == [rows[0].ts]


def test_evict_forgets_the_key() -> None:
    rows = [(KEY, row(0)), (KEY, row(1)), (KEY, Evict("pump-7", "x")), (KEY, row(2))]
    out: list = []
    flow = Dataflow("evict")
    s = op.input("in", flow, TestingSource(rows))
    op.output("out", report_by_exception("report", s), TestingSink(out))
    run_main(flow)
    assert [r.ts for _, r in out] == [T0, T0 + timedelta(seconds=2)]


def test_resumes_from_a_snapshot_with_the_same_rows(tmp_path: Path) -> None:
    rows = [row(i, rms=1.0 + (0.3 if i % 7 == 0 else 0.0)) for i in range(30)]
    expected = run(rows)
    out: list = []
    items: list = [(KEY, r) for r in rows]
    items.insert(12, TestingSource.ABORT())  # one abort: the second run resumes past it

    def make() -> Dataflow:
        flow = Dataflow("report_recovery")
        s = op.input("in", flow, TestingSource(items, batch_size=1))
        op.output("out", report_by_exception("report", s), TestingSink(out))
        return flow

    run_with_recovery(make, tmp_path)
    # at-least-once: the resumed run may pass again what followed the last snapshot
    assert {r.ts for _, r in out} == {r.ts for r in expected}


# --- property: never skips an alarm or a zone change, heartbeat, tolerance ----------------

ZONES = "ABCD"


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Row], list[int], int, int]:
    n = draw(st.integers(1, 60))
    gaps = draw(st.lists(st.integers(1, 400), min_size=n, max_size=n))
    seconds = 0
    rows = []
    rms = 1.0
    zone = 0
    for i in range(n):
        seconds += gaps[i]
        rms = max(0.0, rms * draw(st.sampled_from([1.0, 1.0, 1.02, 0.97, 1.2, 0.7])))
        if draw(st.integers(0, 9)) == 0:
            zone = draw(st.integers(0, 3))
        crest = draw(st.sampled_from([3.0, 3.0, 3.1, None]))
        bands = (draw(st.sampled_from([0.5, 0.52, 0.9])), 1e-4)
        rows.append(row(seconds, rms=rms, zone=ZONES[zone], crest_factor=crest, band_energy=bands))
    alarmed = sorted(draw(st.sets(st.integers(0, n - 1), max_size=5)))
    return rows, alarmed, draw(st.integers(1, 9)), draw(st.integers(1, 9))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_never_skips_an_alarm_or_zone_change(
    scenario: tuple[list[Row], list[int], int, int],
) -> None:
    rows, alarmed, batch, alarm_batch = scenario
    heartbeat = timedelta(minutes=10)
    config = ReportConfig(tolerance=0.1, heartbeat=heartbeat)
    fired = [alarm(rows[i]) for i in alarmed]
    got = run(rows, fired, batch=batch, alarm_batch=alarm_batch, tolerance=0.1)
    passed = {r.ts for r in got}
    assert len(passed) == len(got), "a row passed twice"
    assert {rows[i].ts for i in alarmed} <= passed, "an alarm's row was skipped"
    for before, after in zip(rows, rows[1:], strict=False):
        if before.iso_zone != after.iso_zone:
            assert after.ts in passed, "a zone change was skipped"
    # every skipped row: a passed row before it, under heartbeat, same zone, within tolerance
    sent: list[Row] = []
    for r in rows:
        if r.ts in passed:
            sent.append(r)
            continue
        assert any(
            r.ts - s.ts < heartbeat and s.iso_zone == r.iso_zone and moved(config, s, r) is None
            for s in sent
        ), f"row at {r.ts} skipped without a passed row it is within tolerance of"
    # the same rows pass whatever the interleaving of rows and alarms
    again = run(rows, fired, batch=64, alarm_batch=1, tolerance=0.1)
    assert {r.ts for r in again} == passed


# --- settings errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"tolerance": "10%"}, TypeError, "`tolerance` must be a number; got '10%' (str)"),
        ({"tolerance": True}, TypeError, "`tolerance` must be a number"),
        ({"tolerance": -0.1}, ValueError, "`tolerance` must be a finite number >= 0; got -0.1"),
        ({"tolerance": float("nan")}, ValueError, "`tolerance` must be a finite number >= 0"),
        ({"heartbeat": 600}, TypeError, "`heartbeat` must be a datetime.timedelta or None"),
        ({"heartbeat": timedelta(0)}, ValueError, "`heartbeat` must be longer than zero"),
        ({"floors": ["rms"]}, TypeError, "`floors` must be a mapping of feature name"),
        ({"floors": {}}, ValueError, "`floors` is empty, so no feature is watched"),
        ({"floors": {"not a name": 1.0}}, ValueError, "'not a name' (str) is not a feature name"),
        ({"floors": {"rms": "0.1"}}, TypeError, r"`floors\['rms'\]` must be a number"),
        ({"floors": {"rms": -1.0}}, ValueError, r"`floors\['rms'\]` must be a finite number >= 0"),
    ],
)
def test_settings_errors(kwargs: dict, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern if "\\" in pattern else re.escape(pattern)):
        ReportConfig(**kwargs)
    flow = Dataflow("bad")
    s = op.input("in", flow, TestingSource([]))
    with pytest.raises(error, match="Hint"):
        report_by_exception("report", s, **kwargs)


def test_alarms_must_be_a_stream() -> None:
    flow = Dataflow("bad_alarms")
    s = op.input("in", flow, TestingSource([]))
    with pytest.raises(
        TypeError, match=r"`alarms` must be a keyed stream of alarms or None; got \["
    ):
        report_by_exception("report", s, alarms=[alarm(row(0))])  # type: ignore[arg-type]
