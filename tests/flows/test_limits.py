"""The ``limits`` section: keys per message, series per device and edge, idle eviction.

The series step is tested on its own (every limit, its dead letters and
counters, eviction order, resuming from a snapshot) and through the telemetry
flow run the ways it runs in production.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import bytewax.operators as op
import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows import telemetry
from flows.accounting import Meter
from flows.api import Edge
from flows.config import ConfigError, LimitsSection, parse_config
from flows.ingest import (
    SERIES_BYTES,
    Message,
    SeriesLimits,
    _DeviceSeries,
    _Total,
    decoder,
    readings_payload,
)
from operators.records import DeadLetter, Evict, RawMessage, Reading
from tests.conftest import query_parquet
from tests.flows.conftest import run_recorded

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def message(device: str, seconds: float, *keys: str) -> Message:
    at = T0 + timedelta(seconds=seconds)
    return Message(at, [Reading(device, key, at, 1.0) for key in keys])


class Step:
    """The series step of one worker: a logic per device, as Bytewax keeps them."""

    def __init__(self, limits: SeriesLimits, snapshot: dict | None = None) -> None:
        self.limits = limits
        self.total = _Total()
        self.meter = Meter("t")
        self.owner = SimpleNamespace(name="t", meter=self.meter)
        self.logics = {device: self._logic(state) for device, state in (snapshot or {}).items()}

    def _logic(self, state):
        return _DeviceSeries(self.limits, self.total, lambda: self.owner, state)

    def feed(self, *messages: Message) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for msg in messages:
            device = msg.readings[0].device
            logic = self.logics.get(device) or self._logic(None)
            (items,), discard = logic.on_batch([msg])
            out += items
            if discard:
                self.logics.pop(device, None)
            else:
                self.logics[device] = logic
        return out

    def snapshot(self) -> dict:
        return {device: logic.snapshot() for device, logic in self.logics.items()}

    def stages(self) -> Counter:
        return Counter(self.meter.snapshot()["messages"])  # (stage, device) -> count


def limits(**given_) -> SeriesLimits:
    values = {
        "series_per_device": 1000,
        "state_bytes_per_device": 10**9,
        "series_total": 10**6,
        "idle_evict": None,
    }
    return SeriesLimits(**{**values, **given_})


def letters(out) -> list[DeadLetter]:
    return [x for _, x in out if isinstance(x, DeadLetter)]


def test_defaults_and_documented_numbers():
    section = parse_config({}).limits
    assert section == LimitsSection(
        keys_per_message=1000,
        series_per_device=1000,
        state_bytes_per_device=4 * 1024 * 1024,
        series_total=50_000,
        series_idle_evict=timedelta(hours=24),
    )
    # A device may hold its 1000 series with keys of the usual length within the byte limit.
    assert 1000 * (SERIES_BYTES + 64) <= section.state_bytes_per_device


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"series_idle_evict": 0},
            "limits.series_idle_evict: must be longer than zero (got 0); hint: null keeps "
            "idle series forever, 86400 forgets them after a day",
        ),
        (
            {"series_total": 0},
            "limits.series_total: must be greater than 0 (got 0)",
        ),
        (
            {"keys_per_mesage": 5},
            "limits.keys_per_mesage: unknown key; hint: the keys of limits are "
            "keys_per_message, series_idle_evict, series_per_device, series_total, "
            "state_bytes_per_device",
        ),
    ],
)
def test_limits_errors_name_the_key(section, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        parse_config({"limits": section})


def test_a_device_over_its_series_limit_gets_its_new_keys_refused_others_are_not():
    step = Step(limits(series_per_device=2))
    out = step.feed(message("evil", 0, "a", "b", "c", "d", "a"), message("good", 0, "x", "y"))
    admitted = [key for key, x in out if isinstance(x, Reading)]
    assert admitted == ["evil/a", "evil/b", "evil/a", "good/x", "good/y"]
    (letter,) = letters(out)
    assert letter.reason == (
        "limits.series_per_device: device 'evil' has 2 series, the limit; 2 readings of "
        "2 new keys refused (first 'c'); hint: send fewer distinct keys, or raise "
        "limits.series_per_device"
    )
    assert json.loads(letter.payload) == [
        {"ts": int(T0.timestamp() * 1000), "values": {"c": 1.0, "d": 1.0}}
    ]
    assert letter.received_at == T0 and letter.device == "evil"
    assert step.stages() == Counter({("refused_series_per_device", "evil"): 2})


def test_long_keys_reach_the_state_bytes_limit_first():
    long = ["k" * 200 + str(i) for i in range(3)]
    step = Step(limits(state_bytes_per_device=2 * (SERIES_BYTES + 220)))
    out = step.feed(message("evil", 0, *long))
    (letter,) = letters(out)
    assert letter.reason.startswith(
        "limits.state_bytes_per_device: device 'evil' holds about "
        f"{2 * (SERIES_BYTES + 5 + 201)} bytes of state for 2 series, and the limit is "
        f"{2 * (SERIES_BYTES + 220)}; 1 readings of 1 new keys refused (first "
        f"'{'k' * 40}'...); hint: send fewer distinct keys, or raise "
        "limits.state_bytes_per_device"
    )


def test_the_worker_total_is_shared_by_every_device():
    step = Step(limits(series_total=3))
    out = step.feed(message("a", 0, "x", "y"), message("b", 0, "x", "y"))
    (letter,) = letters(out)
    assert letter.device == "b" and letter.reason.startswith(
        "limits.series_total: device 'b' is on an edge holding 3 series, the limit; "
    )
    assert step.total.series == 3


def test_idle_series_are_evicted_oldest_first_by_the_device_receive_time():
    step = Step(limits(series_per_device=3, idle_evict=timedelta(seconds=10)))
    step.feed(message("d", 0, "a", "b"), message("d", 5, "c", "a"))
    # At 12 s only b (last sent at 0 s) is 10 s idle: it is evicted before d's readings.
    out = step.feed(message("d", 12, "e"))
    assert out == [("d/b", Evict("d", "b")), ("d/e", message("d", 12, "e").readings[0])]
    out = step.feed(message("d", 30, "a"))
    assert [x for _, x in out if isinstance(x, Evict)] == [
        Evict("d", "c"),
        Evict("d", "a"),
        Evict("d", "e"),
    ]
    assert step.stages()[("evicted_series", "d")] == 4
    assert step.total.series == 1
    # Another device's clock does not evict d's series.
    step.feed(message("other", 10_000, "z"))
    assert step.logics["d"].snapshot()[1] == {"d/a": T0 + timedelta(seconds=30)}


def test_a_device_whose_every_key_is_refused_keeps_no_state():
    step = Step(limits(series_total=1))
    step.feed(message("a", 0, "x"))
    out = step.feed(message("b", 0, "y"))
    assert len(letters(out)) == 1 and "b" not in step.logics


@settings(max_examples=60, deadline=None)
@given(
    stream=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.integers(0, 3),
            st.lists(st.sampled_from("pqrstuvw"), min_size=1, max_size=5),
        ),
        max_size=30,
    ),
    cut=st.integers(0, 30),
)
def test_resuming_from_a_snapshot_admits_refuses_and_evicts_the_same(stream, cut):
    """Determinism: a resumed step decides like one that ran through."""
    settings_ = limits(
        series_per_device=4,
        state_bytes_per_device=3 * (SERIES_BYTES + 4),
        series_total=7,
        idle_evict=timedelta(seconds=5),
    )
    clock: dict[str, int] = {}
    messages = []
    for device, step_s, keys in stream:  # receive time moves forward per device
        clock[device] = clock.get(device, 0) + step_s
        messages.append(message(device, clock[device], *keys))
    through = Step(settings_)
    expected = through.feed(*messages)
    first = Step(settings_)
    out = first.feed(*messages[:cut])
    resumed = Step(settings_, snapshot=first.snapshot())
    assert resumed.total.series == first.total.series
    out += resumed.feed(*messages[cut:])
    assert out == expected
    held = Counter(k.split("/")[0] for logic in through.logics.values() for k in logic.series)
    assert all(n <= 3 for n in held.values()) and sum(held.values()) <= 7


def raw(device: str, body: object) -> RawMessage:
    return RawMessage(device, "telemetry", "mqtt", T0, json.dumps(body).encode())


def test_a_message_with_too_many_keys_is_one_dead_letter_and_the_rest_flows():
    owner = SimpleNamespace(name="flow", meter=Meter("flow"))
    decode = decoder(
        1 << 20, channels=("telemetry",), flow="flow", owner_of=lambda _: owner, keys_per_message=3
    )
    many = raw("evil", {"a": 1, "b": 2, "c": 3, "d": 4})
    repeated = raw("good", [{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}])  # 4 readings, 1 key
    out = decode([many, repeated])
    assert out[0] == (
        "flow",
        DeadLetter(
            "evil",
            "mqtt",
            T0,
            "limits.keys_per_message: a telemetry message of device 'evil' has 4 distinct "
            "keys, more than the limit of 3; nothing of it was processed; hint: send fewer "
            "keys per message or raise limits.keys_per_message",
            many.payload,
        ),
    )
    assert out[1][0] == "good" and len(out[1][1].readings) == 4
    counts = owner.meter.snapshot()["messages"]
    assert counts[("refused_keys_per_message", "evil")] == 1
    assert counts[("readings", "good")] == 4 and ("readings", "evil") not in counts


def test_readings_payload_groups_readings_by_timestamp():
    later = T0 + timedelta(seconds=1)
    payload = readings_payload(
        [Reading("d", "a", T0, 1.0), Reading("d", "b", T0, "on"), Reading("d", "a", later, 2.0)]
    )
    ms = int(T0.timestamp() * 1000)
    assert json.loads(payload) == [
        {"ts": ms, "values": {"a": 1.0, "b": "on"}},
        {"ts": ms + 1000, "values": {"a": 2.0}},
    ]


def test_the_telemetry_flow_refuses_evicts_and_flushes(tmp_path, runner):
    config = parse_config(
        {
            "data_dir": str(tmp_path),
            "telemetry": {"deadband": {"absolute": 0.5}, "window": {"length": 60}},
            "limits": {
                "keys_per_message": 3,
                "series_per_device": 2,
                "series_idle_evict": 10,
            },
        }
    )

    def at(seconds: float, **values: float) -> dict:
        return {"ts": int((T0 + timedelta(seconds=seconds)).timestamp() * 1000), "values": values}

    def sent(device: str, seconds: float, body: dict) -> RawMessage:
        return RawMessage(
            device, "telemetry", "mqtt", T0 + timedelta(seconds=seconds), json.dumps(body).encode()
        )

    messages = [
        sent("evil", 0, at(0, a=1.0, b=1.0)),
        sent("evil", 1, at(1, c=1.0)),  # a third series: refused
        sent("evil", 2, at(2, a=1.0, b=1.0, c=1.0, d=1.0)),  # four keys: refused whole
        sent("good", 2, at(2, x=1.0, y=2.0)),
        sent("evil", 20, at(20, a=5.0)),  # a and b idle for 20 s: evicted, a admitted again
        sent("good", 3, at(3, x=9.0, y=2.0)),
    ]
    edge = run_recorded(telemetry.build, config, messages, name="telemetry", runner=runner)
    rep = edge.reports()["telemetry"]
    stages = rep.stages
    assert stages["refused_keys_per_message"] == 1
    assert stages["refused_series_per_device"] == 1
    assert stages["evicted_series"] == 2
    glob = str(tmp_path / "parquet" / "{}" / "**" / "*.parquet")
    summaries = duckdb.sql(
        f"select device, key, count, mean from read_parquet('{glob.format('telemetry_summary')}')"
        " order by device, key, mean"
    ).fetchall()
    # Evicted at 20 s: evil/a and evil/b's windows were emitted; evil/a starts afresh.
    assert summaries == [
        ("evil", "a", 1, 1.0),
        ("evil", "a", 1, 5.0),
        ("evil", "b", 1, 1.0),
        ("good", "x", 2, 5.0),
        ("good", "y", 2, 2.0),
    ]
    reasons = duckdb.sql(
        f"select device, reason from read_parquet('{glob.format('dead_letters')}') order by 2"
    ).fetchall()
    assert [(d, r.split(":")[0]) for d, r in reasons] == [
        ("evil", "limits.keys_per_message"),
        ("evil", "limits.series_per_device"),
    ]


def test_a_resumed_flow_counts_the_series_it_held_toward_the_total(tmp_path):
    """Bytewax rebuilds every key's logic from the snapshot at resume, so the worker's
    total starts from what the devices held, not from zero."""
    config = parse_config(
        {"data_dir": str(tmp_path), "limits": {"series_total": 3, "series_per_device": 3}}
    )

    def sent(device: str, *keys: str) -> RawMessage:
        return RawMessage(
            device, "telemetry", "mqtt", T0, json.dumps(dict.fromkeys(keys, 1.0)).encode()
        )

    first = [sent("a", "x", "y")]
    run_recorded(telemetry.build, config, first, name="telemetry")
    # The recorded source resumes after what the first run took: only b's message is new.
    edge = run_recorded(telemetry.build, config, [*first, sent("b", "p", "q")], name="telemetry")
    stages = edge.reports()["telemetry"].stages
    assert stages["received"] == 1 and stages["refused_series_total"] == 1


def test_devices_readings_never_carry_an_evict_devices_series_does(tmp_path):
    config = parse_config({"data_dir": str(tmp_path), "limits": {"series_idle_evict": 10}})
    seen: dict[str, list[type]] = {"readings": [], "series": []}

    def build(edge) -> None:
        dev = edge.devices("in", channels=["telemetry"])
        for name, stream in (("readings", dev.readings), ("series", dev.series)):
            op.inspect(f"see_{name}", stream, lambda _, kv, n=name: seen[n].append(type(kv[1])))
        edge.output("telemetry_points", dev.readings)

    def sent(seconds: float, body: dict) -> RawMessage:
        at = T0 + timedelta(seconds=seconds)
        return RawMessage("d", "telemetry", "mqtt", at, json.dumps(body).encode())

    run_recorded(build, config, [sent(0, {"a": 1.0}), sent(20, {"b": 2.0})], name="flow")
    assert seen == {"readings": [Reading, Reading], "series": [Reading, Evict, Reading]}


def limited_traffic() -> list[RawMessage]:
    """Two devices; one sends waves of new keys past its limit and goes idle between them."""
    out = []
    for i in range(120):
        received = T0 + timedelta(seconds=i)
        body = {"ts": int(received.timestamp() * 1000), "values": {"t": float(i % 7)}}
        out.append(RawMessage("good", "telemetry", "mqtt", received, json.dumps(body).encode()))
        if i % 40 < 8:  # a wave of 8 messages, then 32 s of silence: evicted at the next wave
            keys = {f"w{i // 40}-{i % 40}-{k}": float(k) for k in range(4)}
            body = {"ts": int(received.timestamp() * 1000), "values": keys}
            out.append(RawMessage("evil", "telemetry", "mqtt", received, json.dumps(body).encode()))
    return out


@pytest.mark.parametrize("abort_at", [None, 25, 61, 140])
def test_a_resumed_run_refuses_and_evicts_like_an_uninterrupted_one(tmp_path, abort_at):
    """Replay determinism: limits and eviction depend on the journal only."""
    from tests.flows.test_replay import Recorded

    def run(data_dir, source) -> dict[str, list[tuple]]:
        config = parse_config(
            {
                "data_dir": str(data_dir),
                "recovery": {"snapshot_interval": 0.1},
                "parquet": {"max_file_age": 0.3},
                "telemetry": {"window": {"length": 10}},
                "limits": {"series_per_device": 10, "series_idle_evict": 20},
            }
        )
        edge = Edge(config, name="telemetry", source=source)
        telemetry.build(edge)
        edge.run()
        streams = ("telemetry_points", "telemetry_summary", "dead_letters")
        return {s: query_parquet(data_dir, s, "select * from {src} order by all") for s in streams}

    reference = run(tmp_path / "reference", Recorded(limited_traffic(), None))
    # Each wave: 32 new keys, 10 admitted; a wave evicts the one before it.
    summaries = query_parquet(
        tmp_path / "reference",
        "telemetry_summary",
        "select count(distinct key) from {src} where device = 'evil'",
    )
    assert summaries == [(30,)]
    letters = query_parquet(
        tmp_path / "reference",
        "dead_letters",
        "select count(*) from {src} where reason like 'limits.series_per_device: %'",
    )
    assert letters == [(3 * 6,)]  # per wave: 10 keys admitted, 6 of its 8 messages refused
    if abort_at is None:
        return
    source = Recorded(limited_traffic(), abort_at)
    run(tmp_path / "resumed", source)  # ends at the abort, without end of input
    assert run(tmp_path / "resumed", source) == reference
