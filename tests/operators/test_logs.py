"""The logs operator (operators.logs) in real dataflows: events, template summaries, late lines."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.logs import (
    MAX_EXAMPLE_CHARS,
    MAX_TEMPLATE_CHARS,
    OTHER,
    LogEvent,
    LogsConfig,
    LogSummary,
    _DeviceLogs,
    logs,
    template,
)
from operators.records import LEVELS, LogLine
from tests.conftest import run_dataflow, run_with_recovery

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def log(device: str, seconds: float, msg: str, level: str = "info") -> LogLine:
    return LogLine(device, "mqtt", T0 + timedelta(seconds=seconds), level, msg, None)


def build(
    lines: list, events: list, summary: list, late: list, *, batch_size: int = 100, **kw: object
) -> Dataflow:
    flow = Dataflow("logs_test")
    up = op.input("in", flow, TestingSource(lines, batch_size=batch_size))
    keyed = (
        op.key_on("key", up, lambda x: x.device) if lines and isinstance(lines[0], LogLine) else up
    )
    out = logs("logs", keyed, **kw)
    op.output("events", out.events, TestingSink(events))
    op.output("summary", out.summary, TestingSink(summary))
    op.output("late", out.late, TestingSink(late))
    return flow


def run(
    lines: list[LogLine], *, workers: int = 1, **kw: object
) -> tuple[list[LogEvent], list[LogSummary], list[LogLine]]:
    events: list = []
    summary: list = []
    late: list = []
    run_dataflow(build(lines, events, summary, late, **kw), workers=workers)
    for out in (events, summary, late):
        for key, item in out:
            assert key == item.device
    return [e for _, e in events], [s for _, s in summary], [x for _, x in late]


def final(rows: list[LogSummary]) -> dict[tuple[str, str, datetime], LogSummary]:
    """The row with the highest count per (device, template, window_start)."""
    best: dict[tuple[str, str, datetime], LogSummary] = {}
    for row in rows:
        key = (row.device, row.template, row.window_start)
        if key not in best or row.count > best[key].count:
            best[key] = row
    return best


# --- templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "want"),
    [
        ("disk sda1 at 91%", "disk <*> at <*>"),
        ('user "bob" logged in from 10.0.0.7:5022', "user <*> logged in from <*>:<*>"),
        ("can't open 'x.txt'", "can't open <*>"),
        ("id=550e8400-e29b-41d4-a716-446655440000 done", "id=<*> done"),
        ("request deadbeef-abcd-efab-cdef-abcdefabcdef done", "request <*> done"),
        ("mac aa:bb:cc:dd:ee:ff up, fe80::1 too", "mac <*> up, <*> too"),
        ("read /var/log/app.3 failed (errno 5)", "read <*> failed (errno <*>)"),
        ("took 0x1f ms, v1.2.3", "took <*> ms, <*>"),
        ("pump started", "pump started"),
    ],
)
def test_template_replaces_variable_parts(msg: str, want: str) -> None:
    assert template(msg) == want


def test_a_long_template_is_cut() -> None:
    out = template("word " * 100)
    assert len(out) == MAX_TEMPLATE_CHARS and out.endswith("…")


words = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
variables = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.uuids().map(str),
    st.ip_addresses(v=4).map(str),
    st.integers(0, 2**64).map(hex),
    st.text("abcdef", max_size=5).map(lambda s: '"' + s + '"'),
    st.integers(0, 999).map(lambda n: f"/var/log/app.{n}"),
)


@given(
    parts=st.lists(st.tuples(words, st.booleans()), min_size=1, max_size=8),
    first=st.data(),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_template_is_stable_when_only_variables_change(
    parts: list[tuple[str, bool]], first: st.DataObject
) -> None:
    def render() -> str:
        return " ".join(first.draw(variables) if var else word for word, var in parts)

    a, b = render(), render()
    assert template(a) == template(b)
    assert template(a) == " ".join("<*>" if var else word for word, var in parts)


# --- events ---------------------------------------------------------------------------------


lines_strategy = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 600),
        st.sampled_from(LEVELS),
        st.sampled_from(["x 1", "x 2", "y", "z 3 q", "boot"]),
    ),
    max_size=60,
)


@given(raw=lines_strategy, level=st.sampled_from(LEVELS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_line_at_or_above_level_is_an_event_and_every_other_line_is_counted_or_late(
    raw: list[tuple[str, int, str, str]], level: str
) -> None:
    lines = [log(d, s, m, lv) for d, s, lv, m in raw]
    events, rows, late = run(lines, level=level, window=MIN, allowed_lateness=timedelta(seconds=30))
    rank = LEVELS.index(level)
    important = [x for x in lines if LEVELS.index(x.level) >= rank]
    for device in "abc":
        assert [(e.ts, e.level, e.msg) for e in events if e.device == device] == [
            (x.ts, x.level, x.msg) for x in important if x.device == device
        ]
    assert all(e.template == template(e.msg) for e in events)
    assert all(LEVELS.index(x.level) < rank for x in late)
    counted = sum(r.count for r in final(rows).values())
    late_important = len(lines) - counted - len(late)
    assert 0 <= late_important <= len(important)


def test_events_keep_fields_transport_and_template() -> None:
    line = LogLine("a", "http", T0, "error", "disk sda1 full", '{"disk":"sda1"}')
    events, _, _ = run([line])
    assert events == [
        LogEvent("a", T0, "error", "disk sda1 full", "disk <*> full", "http", '{"disk":"sda1"}')
    ]


# --- summary windows ------------------------------------------------------------------------------


def test_lines_are_counted_per_template_and_window_and_windows_close_by_event_time() -> None:
    lines = [
        log("a", 1, "disk sda1 at 91%"),
        log("a", 5, "disk sdb2 at 97%", "warning"),
        log("a", 20, "pump started"),
        log("a", 61, "disk sda1 at 92%"),  # window 1: closes window 0 (lateness 0)
    ]
    events: list = []
    summary: list = []
    late: list = []
    flow = build(
        lines, events, summary, late, batch_size=4, window=MIN, allowed_lateness=timedelta(0)
    )
    run_dataflow(flow)
    rows = [s for _, s in summary]
    assert rows == [
        LogSummary(
            "a",
            "disk <*> at <*>",
            "warning",
            T0,
            T0 + MIN,
            2,
            T0 + timedelta(seconds=1),
            T0 + timedelta(seconds=5),
            "disk sda1 at 91%",
        ),
        LogSummary(
            "a",
            "pump started",
            "info",
            T0,
            T0 + MIN,
            1,
            T0 + timedelta(seconds=20),
            T0 + timedelta(seconds=20),
            "pump started",
        ),
        # the open window, flushed at end of input
        LogSummary(
            "a",
            "disk <*> at <*>",
            "info",
            T0 + MIN,
            T0 + 2 * MIN,
            1,
            T0 + timedelta(seconds=61),
            T0 + timedelta(seconds=61),
            "disk sda1 at 92%",
        ),
    ]
    assert [e.msg for _, e in events] == ["disk sdb2 at 97%"]
    assert late == []


def test_devices_have_their_own_clocks() -> None:
    lines = [log("a", 3600, "ahead"), log("b", 0, "behind"), log("b", 1, "behind")]
    _, rows, late = run(lines, window=MIN, allowed_lateness=timedelta(0))
    assert late == []
    assert {(r.device, r.count) for r in rows} == {("a", 1), ("b", 2)}


def test_templates_beyond_max_templates_are_one_other_row() -> None:
    lines = [log("a", i, f"message kind {chr(97 + i)}", "debug") for i in range(6)]
    lines += [log("a", 10, "message kind a"), log("a", 11, "message kind z", "error")]
    _, rows, _ = run(lines, max_templates=2, window=MIN)
    by_template = {r.template: r for r in rows}
    assert set(by_template) == {"message kind a", "message kind b", OTHER}
    assert by_template["message kind a"].count == 2
    other = by_template[OTHER]
    assert (other.count, other.level, other.example) == (5, "error", "message kind c")
    assert (other.first_ts, other.last_ts) == (
        T0 + timedelta(seconds=2),
        T0 + timedelta(seconds=11),
    )


def test_a_device_with_endless_distinct_messages_stays_bounded() -> None:
    lines = [
        log("a", i / 100, f"unique{'x' * (i % 7)} {chr(65 + i % 26)}{chr(65 + i // 26 % 26)}")
        for i in range(2000)
    ]
    _, rows, _ = run(lines, max_templates=10, window=MIN)
    assert len(rows) == 11
    assert sum(r.count for r in rows) == 2000


def test_the_example_is_cut() -> None:
    _, [row], _ = run([log("a", 0, "y" * 2000)])
    assert len(row.example) == MAX_EXAMPLE_CHARS and row.example.endswith("…")


def test_late_lines_go_to_late_unless_they_are_events() -> None:
    lines = [
        log("a", 100, "newest"),
        log("a", 95, "in time"),
        log("a", 80, "too old", "info"),
        log("a", 79, "too old but important", "error"),
    ]
    events, rows, late = run(lines, window=MIN, allowed_lateness=timedelta(seconds=10))
    assert [x.msg for x in late] == ["too old"]
    assert [e.msg for e in events] == ["too old but important"]
    assert sum(r.count for r in final(rows).values()) == 2


def test_a_line_whose_window_would_end_past_the_last_datetime_is_not_counted() -> None:
    far = datetime(9999, 12, 31, 23, 59, 30, tzinfo=UTC)
    lines = [log("a", 0, "x"), LogLine("a", "mqtt", far, "info", "far", None)]
    lines.append(LogLine("a", "mqtt", far, "error", "far error", None))
    events, rows, late = run(lines, window=MIN)
    assert [x.msg for x in late] == ["far"]
    assert [e.msg for e in events] == ["far error"]
    assert [(r.template, r.count) for r in rows] == [("x", 1)]


def test_a_flushed_window_that_counts_more_is_emitted_again_and_the_highest_count_wins() -> None:
    clock = [T0]
    logic = _DeviceLogs(
        LogsConfig(window=MIN, allowed_lateness=timedelta(seconds=5)),
        template,
        None,
        now=lambda: clock[0],
    )
    out, _ = logic.on_batch([log("a", 10, "x 1")])
    assert out == []
    # quiet for end - newest + lateness = 50 + 5 seconds of wall clock
    assert logic.notify_at() == T0 + timedelta(seconds=55)
    clock[0] = T0 + timedelta(seconds=54)
    assert logic.on_notify()[0] == []
    clock[0] = T0 + timedelta(seconds=55)
    [(tag, row)] = logic.on_notify()[0]
    assert (tag, row.count) == ("row", 1)
    assert logic.notify_at() is None
    assert logic.on_eof()[0] == []  # nothing new since the flush
    out, _ = logic.on_batch([log("a", 20, "x 2"), log("a", 70, "y")])  # closes window 0
    assert [(t, r.template, r.count) for t, r in out] == [("row", "x <*>", 2)]


def test_snapshot_resumes_the_same_decisions() -> None:
    config = LogsConfig(window=MIN, allowed_lateness=timedelta(seconds=5))
    first = _DeviceLogs(config, template, None)
    first.on_batch([log("a", 10, "x 1"), log("a", 12, "y")])
    resumed = _DeviceLogs(config, template, first.snapshot())
    out, _ = resumed.on_batch([log("a", 1, "too old"), log("a", 61, "x 5")])
    assert [t for t, _ in out] == ["late"]
    out, _ = resumed.on_batch([log("a", 70, "z")])
    assert sorted((r.template, r.count) for _, r in out) == [("x <*>", 1), ("y", 1)]
    assert {r.device for _, r in out} == {"a"}


def test_replay_from_a_snapshot_gives_the_rows_of_an_uninterrupted_run(tmp_path: Path) -> None:
    lines = [
        log(d, i * 7, f"event {i % 4} from {d}", LEVELS[i % 7]) for i in range(40) for d in "ab"
    ]
    lines.sort(key=lambda x: x.ts)
    whole_events, whole_rows, whole_late = run(lines, window=MIN)
    events: list = []
    summary: list = []
    late: list = []
    source: list = [(x.device, x) for x in lines]
    source.insert(len(source) // 2, TestingSource.ABORT())
    run_with_recovery(
        lambda: build(source, events, summary, late, batch_size=5, window=MIN), tmp_path
    )
    assert final([s for _, s in summary]) == final(whole_rows)
    assert Counter(e for _, e in events) >= Counter(whole_events)


def test_two_workers_give_the_same_rows() -> None:
    lines = [log(d, i * 3, f"event {i % 5}") for i in range(60) for d in "abcd"]
    assert final(run(lines, workers=2)[1]) == final(run(lines)[1])


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"level": "loud"},
            ValueError,
            "logs `level` must be one of trace, debug, info, notice, warning, error, critical; got 'loud' (str). Hint: level=\"warning\" sends warnings, errors and critical lines as events.",
        ),
        (
            {"window": 60},
            TypeError,
            "logs `window` must be a datetime.timedelta; got 60 (int). Hint: window=timedelta(seconds=60).",
        ),
        (
            {"allowed_lateness": 5},
            TypeError,
            "logs `allowed_lateness` must be a datetime.timedelta; got 5 (int). Hint: allowed_lateness=timedelta(seconds=60).",
        ),
        (
            {"window": timedelta(0)},
            ValueError,
            "logs `window` must be longer than zero; got datetime.timedelta(0). Hint: window=timedelta(seconds=60).",
        ),
        (
            {"allowed_lateness": timedelta(seconds=-1)},
            ValueError,
            "logs `allowed_lateness` must be >= 0; got datetime.timedelta(days=-1, seconds=86399). Hint: timedelta(0) counts no line older than its device's newest one.",
        ),
        (
            {"max_templates": 0},
            ValueError,
            "logs `max_templates` must be an int >= 1; got 0 (int). Hint: max_templates=100 summary rows per device and window.",
        ),
        (
            {"max_templates": True},
            ValueError,
            "logs `max_templates` must be an int >= 1; got True (bool). Hint: max_templates=100 summary rows per device and window.",
        ),
    ],
)
def test_bad_settings_fail_when_the_flow_is_built(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        LogsConfig(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
    flow = Dataflow("bad")
    up = op.input("in", flow, TestingSource([]))
    with pytest.raises(error):
        logs("logs", op.key_on("k", up, str), **kwargs)  # type: ignore[arg-type]
