"""An ``Evict`` on a key makes deadband, window aggregates and threshold forget it.

The property for each operator: a series with an ``Evict`` in it gives what its
part before and its part after give as two separate runs (the windows of the
first part emitted at the ``Evict`` as at an end of input, and a ``cleared``
alarm for an alarm the first part left raised), whatever the batching.
"""

from __future__ import annotations

from datetime import timedelta

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.deadband import DeadbandConfig, _DeadbandLogic, _keeper, deadband
from operators.records import Evict, Reading, series_key
from operators.threshold import CLEARED, Alarm, Rule, threshold
from operators.windows import WindowConfig, _SeriesWindows, window_aggregate
from tests.conftest import reading

KEY = series_key("pump-1", "temp")
EVICT = Evict("pump-1", "temp")


def run(step, items: list, batch_size: int) -> list:
    flow = Dataflow("evict_test")
    up = op.input("in", flow, TestingSource([(KEY, x) for x in items], batch_size=batch_size))
    out: list = []
    op.output("out", step(up), TestingSink(out))
    run_main(flow)
    return [x for _, x in out]


def points(items: list, batch_size: int) -> list:
    return run(lambda up: deadband("deadband", up, absolute=0.5), items, batch_size)


def summaries(items: list, batch_size: int) -> list:
    return run(
        lambda up: (
            window_aggregate(
                "windows", up, length=timedelta(seconds=10), allowed_lateness=timedelta(seconds=3)
            ).down
        ),
        items,
        batch_size,
    )


def alarms(items: list, batch_size: int) -> list:
    rule = Rule("hot", "value", raise_above=5.0, clear_below=2.0, min_count=2)
    return run(lambda up: threshold("alarms", up, rules=[rule]), items, batch_size)


series = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 9)), min_size=0, max_size=25).map(
    lambda rows: [reading("pump-1", s, float(v)) for s, v in rows]
)


def cleared_at_evict(before: list) -> list:
    """The ``cleared`` alarm the Evict gives when ``before`` ends raised (the rule of ``alarms``).

    Its ``ts`` and value are those of the newest reading since the raise (the
    later one on a tie), stated plainly here.
    """
    active, run, last = False, 0, None
    for r in before:
        if active:
            if r.value < 2.0:
                active, last = False, None
            elif r.ts >= last.ts:
                last = r
        elif r.value > 5.0:
            run += 1
            if run >= 2:
                active, run, last = True, 0, r
        else:
            run = 0
    if not active:
        return []
    return [Alarm("pump-1", last.ts, "hot", CLEARED, "warning", last.value)]


@settings(max_examples=25, deadline=None)
@given(before=series, after=series, batch_size=st.integers(1, 8))
def test_an_evicted_series_starts_afresh_in_every_operator(before, after, batch_size):
    for step in (points, summaries, alarms):
        whole = step([*before, EVICT, *after], batch_size)
        # windows are emitted at an Evict as at the end of input; a raised alarm is cleared
        evicted = cleared_at_evict(before) if step is alarms else []
        assert whole == step(before, batch_size) + evicted + step(after, batch_size), step.__name__


def test_evicted_windows_are_emitted_and_a_formerly_late_reading_counts_again():
    items = [
        reading("pump-1", 5, 1.0),
        reading("pump-1", 30, 2.0),
        EVICT,
        reading("pump-1", 1, 3.0),
    ]
    rows = [(s.window_start.second, s.count, s.mean) for s in summaries(items, 2)]
    # At the Evict both open windows are emitted; the reading at 1 s is then a first one.
    assert rows == [(0, 1, 1.0), (30, 1, 2.0), (0, 1, 3.0)]


def test_an_evict_discards_the_key_state_of_each_logic():
    config = DeadbandConfig(absolute=0.5)
    band = _DeadbandLogic(_keeper(config), None)
    assert band.on_batch([reading("pump-1", 1, 1.0)]) == (
        [reading("pump-1", 1, 1.0)],
        StatefulBatchLogic.RETAIN,
    )
    assert band.on_batch([EVICT]) == ([], StatefulBatchLogic.DISCARD)
    windows = _SeriesWindows(WindowConfig(length=timedelta(seconds=10)), None)
    windows.on_batch([reading("pump-1", 1, 1.0)])
    out, discard = windows.on_batch([EVICT])
    assert discard is StatefulBatchLogic.DISCARD
    assert [acc[2] for _, acc in out] == [1]  # the open window, emitted with its one reading
    # An Evict for a key never seen (a text series, say) leaves nothing behind either.
    assert _DeadbandLogic(_keeper(config), None).on_batch([EVICT]) == ([], True)


def test_a_reading_after_the_evict_in_the_same_batch_keeps_the_key():
    band = _DeadbandLogic(_keeper(DeadbandConfig(absolute=0.5)), None)
    kept, discard = band.on_batch(
        [reading("pump-1", 1, 1.0), EVICT, reading("pump-1", 2, 1.1), reading("pump-1", 3, 1.2)]
    )
    assert [r.ts.second for r in kept] == [1, 2] and discard is StatefulBatchLogic.RETAIN


def test_readings_are_what_operators_take_and_evict_is_not_one():
    assert not isinstance(EVICT, Reading)
