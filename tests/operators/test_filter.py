"""The filter operator: device, key, range and expression tests, dropped reasons, errors."""

from __future__ import annotations

import ast
import fnmatch
import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import bytewax.operators as op
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from flows.api import Edge
from flows.config import parse_config
from operators.deadband import deadband
from operators.filter import Dropped, FilterConfig, compile_where, filter_items
from operators.records import Evict, RawMessage, series_key
from operators.spectral import Features
from tests.conftest import keyed, reading, run_dataflow
from tests.flows.conftest import run_recorded


def run_filter(items: list[Any], *, batch_size: int = 4, **settings_: Any) -> tuple[list, list]:
    """Run ``items`` through ``filter_items`` in a real dataflow; return (kept, dropped)."""
    flow = Dataflow("filter_test")
    s = op.input("in", flow, TestingSource(items, batch_size=batch_size))
    out = filter_items("f", s, **settings_)
    kept: list = []
    dropped: list = []
    op.output("kept", out.kept, TestingSink(kept))
    op.output("dropped", out.dropped, TestingSink(dropped))
    run_main(flow)
    return kept, dropped


READINGS = [
    reading("pump-7", 0, 1.0),
    reading("pump-8", 1, 25.0, key="hum"),
    reading("fan-1", 2, 30.0),
    reading("pump-7", 3, 5.0, key="rpm"),
    reading("pump-8", 4, math.nan),
    reading("pump-7", 5, 12.5),
]


def test_each_setting_keeps_what_it_names_and_the_rest_is_dropped_with_its_reason():
    kept, dropped = run_filter(
        keyed(READINGS), devices=["pump-*"], keys=["temp", "hum"], min_value=2, max_value=30
    )
    assert [r for _, r in kept] == [READINGS[1], READINGS[5]]
    assert all(k == series_key(r.device, r.key) for k, r in kept)
    assert [(k, d.reason, d.item) for k, d in dropped] == [
        (series_key("pump-7", "temp"), "range", READINGS[0]),
        (series_key("fan-1", "temp"), "device", READINGS[2]),
        (series_key("pump-7", "rpm"), "key", READINGS[3]),
        (series_key("pump-8", "temp"), "range", READINGS[4]),  # NaN is outside any range
    ]
    assert {d.step_id for _, d in dropped} == {"f"}


def test_the_first_failing_test_is_the_reason():
    r = reading("fan-1", 0, 99.0, key="rpm")  # fails all four
    _, dropped = run_filter(
        [r], devices="pump-*", keys="temp", max_value=10, where='device == "pump-7"'
    )
    assert [d.reason for _, d in dropped] == ["device"]
    _, dropped = run_filter([r], keys="temp", max_value=10, where='device == "pump-7"')
    assert [d.reason for _, d in dropped] == ["key"]
    _, dropped = run_filter([r], max_value=10, where='device == "pump-7"')
    assert [d.reason for _, d in dropped] == ["range"]
    _, dropped = run_filter([r], where='device == "pump-7"')
    assert [d.reason for _, d in dropped] == ["where"]


def test_exact_names_and_patterns_together_and_text_has_no_range():
    items = [
        reading("line-1-a", 0, 1.0),
        reading("line-3-a", 0, 1.0),
        reading("boiler", 0, "on"),
        reading("boilers", 0, 2.0),
    ]
    kept, dropped = run_filter(items, devices=["line-[12]-*", "boiler"], min_value=0)
    assert kept == [items[0]]
    assert [(k, d.reason) for k, d in dropped] == [
        ("line-3-a", "device"),  # unkeyed items are keyed by device in `dropped`
        ("boiler", "range"),  # text is outside any range
        ("boilers", "device"),
    ]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ('value > 3 and key in ("temp", "hum")', [1, 2, 5]),
        ('abs(value - 20) >= 2.5 or device == "pump-7"', [0, 1, 2, 3, 5]),
        ("2 < value <= 12.5", [3, 5]),
        ('matches(device, "pump-*") and not isnan(value)', [0, 1, 3, 5]),
        ('startswith(device, "fan") or key not in ("temp",)', [1, 2, 3]),
        ("round(value / 2) == 6 or value % 10 == 5 or -value == -1", [0, 1, 3, 5]),
        ("min(value, 10) == 10 and max(value, 26) > 26", [2]),
        ("value in (1, 5)", [0, 3]),
        ("value != 1", [1, 2, 3, 4, 5]),  # NaN != 1 is true
        ("device == key", []),
    ],
)
def test_where_expressions(where, expected):
    kept, dropped = run_filter(keyed(READINGS), where=where)
    assert [r for _, r in kept] == [READINGS[i] for i in expected]
    assert {d.reason for _, d in dropped} <= {"where"}
    assert len(kept) + len(dropped) == len(READINGS)


def test_evictions_pass_untouched_in_order():
    items = [
        ("pump-7/temp", reading("pump-7", 0, 1.0)),
        ("pump-7/temp", Evict("pump-7", "temp")),
        ("pump-7/temp", reading("pump-7", 1, 9.0)),
        ("fan-1/temp", Evict("fan-1", "temp")),
    ]
    kept, dropped = run_filter(items, batch_size=10, devices=["nothing"], where="value > 100")
    assert kept == [items[1], items[3]]
    assert [d.reason for _, d in dropped] == ["device", "device"]


def features(device: str, velocity: float, crest: float | None) -> Features:
    return Features(
        device=device,
        axis="x",
        ts=datetime(2026, 1, 1, tzinfo=UTC),
        window_s=1.0,
        sample_rate_hz=1000,
        band_energy=(0.1,),
        rms=1.0,
        velocity_rms_mm_s=velocity,
        peak=2.0,
        crest_factor=crest,
        kurtosis=3.0,
        dominant_hz=50.0,
        dominant_amplitude=1.0,
        iso_zone="A",
        transport="mqtt",
        frames=4,
    )


def test_feature_rows_and_sql_null_rules():
    rows = [features("m1", 5.0, 4.0), features("m2", 1.0, None), features("m3", 7.0, None)]
    kept, _ = run_filter([(r.device, r) for r in rows], where="velocity_rms_mm_s > 4.5")
    assert [r for _, r in kept] == [rows[0], rows[2]]
    # a None crest factor is unknown: `unknown and x` drops, `true or unknown` keeps
    kept, _ = run_filter([(r.device, r) for r in rows], where="crest_factor > 3")
    assert [r for _, r in kept] == [rows[0]]
    kept, _ = run_filter(
        [(r.device, r) for r in rows], where="crest_factor == None or crest_factor > 3"
    )
    assert [r for _, r in kept] == rows
    kept, _ = run_filter([(r.device, r) for r in rows], where="not crest_factor > 3")
    assert kept == []


def test_a_field_some_items_lack_drops_them_with_a_detail_and_one_warning(caplog):
    items = [reading("pump-7", 0, 5.0), features("m1", 5.0, 4.0), features("m2", 9.0, 4.0)]
    with caplog.at_level(logging.WARNING, "edgesieve.filter"):
        kept, dropped = run_filter(items * 2, batch_size=3, where="velocity_rms_mm_s > 4.5")
    items = items * 2
    assert kept == [items[1], items[2], items[4], items[5]]
    assert [(d.reason, d.detail) for _, d in dropped] == [
        ("where", "no field velocity_rms_mm_s on some items")
    ] * 2
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "filter 'f': some Reading items have no field 'velocity_rms_mm_s'; the expression is "
        "unknown for them and they are dropped (reason where)"
    ]


# -- the property: the vectorised filter agrees with a plain per-item reading of the rules --


@dataclass(frozen=True)
class Other:
    """A record of another shape: no key, no value."""

    device: str
    level: str


_UNKNOWN = None


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def reference(expr: str, item: Any) -> bool:
    """Whether ``expr`` keeps ``item``, one item at a time, with SQL's NULL (None) rules."""

    def ev(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return getattr(item, node.id, None)
        if isinstance(node, ast.BoolOp):
            vals = [ev(v) for v in node.values]
            if isinstance(node.op, ast.And):
                if any(v is False for v in vals):
                    return False
                return _UNKNOWN if any(v is None for v in vals) else True
            if any(v is True for v in vals):
                return True
            return _UNKNOWN if any(v is None for v in vals) else False
        if isinstance(node, ast.UnaryOp):
            v = ev(node.operand)
            if isinstance(node.op, ast.Not):
                return None if v is None else not v
            return -v if _num(v) else None
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if not (_num(a) and _num(b)):
                return None
            with np.errstate(all="ignore"):
                x, y = np.float64(a), np.float64(b)
                return float(
                    {
                        ast.Add: x + y,
                        ast.Sub: x - y,
                        ast.Mult: x * y,
                        ast.Div: x / y,
                        ast.Mod: x % y,
                    }[type(node.op)]
                )
        if isinstance(node, ast.Call):
            name = node.func.id  # type: ignore[attr-defined]
            args = [ev(a) for a in node.args]
            if name in ("matches", "startswith"):
                if not isinstance(args[0], str):
                    return None
                if name == "matches":
                    return fnmatch.fnmatchcase(args[0], args[1])
                return args[0].startswith(args[1])
            if not all(_num(a) for a in args):
                return None
            if name == "abs":
                return abs(args[0])
            if name == "isnan":
                return math.isnan(args[0])
            if any(math.isnan(a) for a in args):
                return math.nan
            return min(args) if name == "min" else max(args)
        if isinstance(node, ast.Compare):
            results = []
            left = node.left
            for cmp, right in zip(node.ops, node.comparators, strict=True):
                results.append(compare(cmp, left, right))
                left = right
            if any(r is False for r in results):
                return False
            return None if any(r is None for r in results) else True
        raise AssertionError(ast.dump(node))

    def compare(cmp: ast.cmpop, left: ast.expr, right: ast.expr) -> bool | None:
        if isinstance(right, ast.Constant) and right.value is None:
            v = ev(left)
            return (v is None) == isinstance(cmp, ast.Eq)
        a = ev(left)
        if isinstance(cmp, ast.In | ast.NotIn):
            members = [e.value for e in right.elts]  # type: ignore[attr-defined]
            if isinstance(members[0], str) != isinstance(a, str) or not (
                isinstance(a, str) or _num(a)
            ):
                return None
            return (a in members) == isinstance(cmp, ast.In)
        b = ev(right)
        if not ((_num(a) and _num(b)) or (isinstance(a, str) and isinstance(b, str))):
            return None
        fn = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__"}
        fn |= {ast.Gt: "__gt__", ast.GtE: "__ge__"}
        import operator

        return getattr(operator, fn[type(cmp)].strip("_"))(a, b)

    return ev(ast.parse(expr, mode="eval").body) is True


numbers = st.one_of(
    st.integers(-5, 30).map(str),
    st.floats(-50, 50, allow_nan=False).map(lambda f: repr(round(f, 2))),
)
numeric = st.recursive(
    st.one_of(st.just("value"), numbers),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from("+-*/%"), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda x: f"abs({x})"),
        inner.map(lambda x: f"-{x}"),
        st.tuples(inner, inner).map(lambda t: f"min({t[0]}, {t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"max({t[0]}, {t[1]})"),
    ),
    max_leaves=4,
)
atoms = st.one_of(
    st.tuples(numeric, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), numeric).map(" ".join),
    st.tuples(numbers, numeric, numbers).map(lambda t: f"{t[0]} <= {t[1]} < {t[2]}"),
    st.sampled_from(
        [
            'key in ("temp", "hum")',
            'key not in ("rpm",)',
            'device == "pump-7"',
            'device != "fan-1"',
            'matches(device, "pump-*")',
            'startswith(device, "fan")',
            "isnan(value)",
            "value in (1, 5, 25)",
            "level == None",
            'level != None or device < "m"',
            "device == key",
        ]
    ),
)
conditions = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda t: f"({t[0]}) and ({t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"({t[0]}) or ({t[1]})"),
        inner.map(lambda x: f"not ({x})"),
    ),
    max_leaves=4,
)
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 30).map(float),
    st.sampled_from(["on", "off"]),
)
items = st.one_of(
    st.builds(
        lambda d, k, v: reading(d, 0, v, key=k),
        st.sampled_from(["pump-7", "pump-8", "fan-1"]),
        st.sampled_from(["temp", "hum", "rpm"]),
        values,
    ),
    st.builds(Other, st.sampled_from(["pump-7", "x"]), st.sampled_from(["warn", "info"])),
)


@settings(max_examples=300, deadline=None)
@given(expr=conditions, batch=st.lists(items, max_size=30))
def test_the_vectorised_expression_agrees_with_a_per_item_reading(expr, batch):
    keep, _ = compile_where(expr).mask(batch)
    assert keep.tolist() == [reference(expr, x) for x in batch], expr


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    expr=conditions,
    batch=st.lists(st.one_of(items, st.builds(Evict, st.just("pump-7"), st.just("temp")))),
    batch_size=st.integers(1, 8),
)
def test_the_operator_keeps_exactly_what_the_predicate_keeps_in_order(expr, batch, batch_size):
    source = [(x.device, x) for x in batch]
    kept, dropped = run_filter(source, batch_size=batch_size, where=expr)
    expected = [kv for kv in source if type(kv[1]) is Evict or reference(expr, kv[1])]
    assert kept == expected
    assert sorted(map(id, (d.item for _, d in dropped))) == sorted(
        id(x) for _, x in source if type(x) is not Evict and not reference(expr, x)
    )
    assert all(d.reason == "where" for _, d in dropped)


def first_failed(item: Any, devices, keys, low, high, expr) -> str | None:
    """The reason a plain reading of the settings drops ``item`` for, or None to keep it."""
    if type(item) is Evict:
        return None
    name = getattr(item, "device", None)
    if devices is not None and not (
        isinstance(name, str) and any(fnmatch.fnmatchcase(name, p) for p in devices)
    ):
        return "device"
    key = getattr(item, "key", None)
    if keys is not None and not (
        isinstance(key, str) and any(fnmatch.fnmatchcase(key, p) for p in keys)
    ):
        return "key"
    if low is not None or high is not None:
        value = getattr(item, "value", None)
        if not _num(value) or math.isnan(value):
            return "range"
        if (low is not None and value < low) or (high is not None and value > high):
            return "range"
    if expr is not None and not reference(expr, item):
        return "where"
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.lists(st.one_of(items, st.builds(Evict, st.just("fan-1"), st.just("hum")))),
    devices=st.none() | st.lists(st.sampled_from(["pump-*", "fan-1", "x", "p?mp-8"]), min_size=1),
    keys=st.none() | st.lists(st.sampled_from(["temp", "h*", "rpm"]), min_size=1),
    low=st.none() | st.floats(-10, 10),
    high=st.none() | st.floats(10, 40),
    expr=st.none() | conditions,
    batch_size=st.integers(1, 8),
)
def test_every_setting_together_keeps_exactly_what_a_plain_reading_keeps(
    batch, devices, keys, low, high, expr, batch_size
):
    settings_ = {"devices": devices, "keys": keys, "min_value": low, "max_value": high}
    if all(v is None for v in settings_.values()) and expr is None:
        expr = "value > 0"
    source = [(str(i), x) for i, x in enumerate(batch)]
    kept, dropped = run_filter(source, batch_size=batch_size, where=expr, **settings_)
    why = [first_failed(x, devices, keys, low, high, expr) for _, x in source]
    assert kept == [kv for kv, w in zip(source, why, strict=True) if w is None]
    assert sorted((k, d.reason) for k, d in dropped) == sorted(
        (kv[0], w) for kv, w in zip(source, why, strict=True) if w is not None
    )


def test_several_workers_keep_each_key_in_order():
    flow = Dataflow("filter_workers")
    items = keyed([reading(f"pump-{i % 3}", i, float(i % 7)) for i in range(200)])
    s = op.input("in", flow, TestingSource(items, batch_size=7))
    out = filter_items("f", s, where="value >= 2")
    kept: list = []
    op.output("kept", out.kept, TestingSink(kept))
    run_dataflow(flow, workers=2)
    for key in {k for k, _ in items}:
        assert [kv for kv in kept if kv[0] == key] == [
            kv for kv in items if kv[0] == key and kv[1].value >= 2
        ]


# -- counting what was dropped ---------------------------------------------------------------


def test_edge_counts_dropped_items_per_reason_in_the_report_and_metrics(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})
    t0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

    def build(edge: Edge) -> None:
        dev = edge.devices("in", channels=["telemetry"])
        out = filter_items("hot", dev.series, devices="pump-*", where="value > 3")
        edge.output("telemetry_points", deadband("deadband", out.kept, absolute=0.1))
        edge.count_dropped("hot_dropped", out.dropped)

    def msg(device: str, body: dict) -> RawMessage:
        return RawMessage(device, "telemetry", "mqtt", t0, json.dumps(body).encode())

    messages = [
        msg("pump-7", {"temp": 5.0, "hum": 1.0}),
        msg("pump-7", {"temp": 2.0}),
        msg("fan-1", {"temp": 9.0}),
    ]
    edge = run_recorded(build, config, messages, name="hot")
    rep = edge.reports()["hot"]
    assert rep.stages.get("dropped_hot_where") == 2, rep.stages
    assert rep.stages["dropped_hot_device"] == 1
    assert rep.devices["pump-7"]["dropped_hot_where"] == 2
    assert rep.output_rows["telemetry_points"] == 1
    scraped = generate_latest(edge.meter.registry).decode()
    assert re.search(
        r'edgesieve_messages_total\{device="fan-1",flow="hot",stage="dropped_hot_device"\} 1\.0',
        scraped,
    ), scraped


# -- every error message -----------------------------------------------------------------------

LANGUAGE = (
    "use fields, numbers, strings, comparisons, in (...), and/or/not, + - * / % and the "
    "functions abs, isnan, matches, max, min, round, startswith"
)


@pytest.mark.parametrize(
    ("settings_", "error", "message"),
    [
        (
            {},
            ValueError,
            "filter 'hot': needs at least one of devices, keys, min_value, max_value, where; "
            'got none; hint: e.g. where="value > 3" or devices=["pump-*"]',
        ),
        (
            {"devices": 7},
            TypeError,
            "filter 'hot': devices must be a list of names or patterns, got 7; "
            'hint: devices=["pump-*", "fan-2"]',
        ),
        (
            {"keys": ["temp", ""]},
            TypeError,
            "filter 'hot': keys must hold non-empty strings, got '' in ['temp', '']; "
            'hint: keys=["temp", "hum*"]',
        ),
        (
            {"devices": []},
            ValueError,
            "filter 'hot': devices is empty, which would drop everything; "
            'hint: devices=["pump-*", "fan-2"]',
        ),
        (
            {"min_value": "3"},
            TypeError,
            "filter 'hot': min_value must be a number, got '3' (str); "
            "hint: min_value=0.5, or leave it unset for no bound",
        ),
        (
            {"max_value": math.nan},
            ValueError,
            "filter 'hot': max_value is NaN; hint: give a number, or leave it unset for no bound",
        ),
        (
            {"min_value": 5, "max_value": 1},
            ValueError,
            "filter 'hot': min_value 5 is above max_value 1, which would drop everything; "
            "hint: swap them",
        ),
        (
            {"where": 3},
            TypeError,
            "filter 'hot': where must be an expression string, got 3 (int); "
            'hint: where="value > 3"',
        ),
        (
            {"where": "  "},
            ValueError,
            "filter 'hot': where: is empty; hint: e.g. where=\"value > 3\"",
        ),
    ],
)
def test_setting_errors(settings_, error, message):
    with pytest.raises(error) as info:
        filter_items("hot", op.input("in", Dataflow("f"), TestingSource([])), **settings_)
    assert str(info.value) == message


WHERE_ERRORS = [
    (
        "value > 3 or (lambda: 1)",
        "unsupported syntax 'lambda' at column 15",
        LANGUAGE,
    ),
    ("value >", "not a valid expression (invalid syntax) at column 7", None),
    ("value ** 2 > 3", "unsupported operator '**' at column 1", LANGUAGE),
    ("value // 2 > 3", "unsupported operator '//' at column 1", LANGUAGE),
    ("value is None", "unsupported operator 'is' at column 1", LANGUAGE),
    ("x.y > 3", "unsupported syntax 'attribute access' at column 1", LANGUAGE),
    ("tags[0] == 'a'", "unsupported syntax 'subscript' at column 1", LANGUAGE),
    ("value > (1 if key else 2)", "unsupported syntax 'if-else' at column 10", LANGUAGE),
    ("foo(value) > 1", "unknown function 'foo' at column 1", None),
    ("value.bit_length() > 1", "unsupported syntax 'attribute access' at column 1", LANGUAGE),
    ("abs(x=value) > 1", "abs() takes no keyword arguments at column 7", "abs(x)"),
    ("abs(value, 2) > 1", "abs() takes 1 argument, got 2 at column 1", "abs(value - 20) >= 2.5"),
    ("min(value) > 1", "min() takes 2+ arguments, got 1 at column 1", "min(value, 100) > 3"),
    ("round(value, 1, 2) > 1", "round() takes 1 to 2 arguments, got 3 at column 1", None),
    ("round(value, 1.5) > 1", "round()'s digits must be an integer literal at column 14", None),
    (
        "matches(device, key)",
        "matches()'s second argument must be a string literal at column 17",
        None,
    ),
    ("value", "field 'value' alone is not a condition at column 1", None),
    ("abs > 3", "function 'abs' used without calling it at column 1", "abs(...)"),
    ("abs", "function 'abs' used without calling it at column 1", "abs(...)"),
    ("value + 1", "`value + 1` is not a condition at column 1", None),
    ("_secret > 1", "field '_secret' is private at column 1", None),
    ("_x == None", "field '_x' is private at column 1", None),
    (
        'value > 3 and value == "on"',
        "field 'value' is used as a number at column 1 and as text at column 15",
        None,
    ),
    ('abs("x") > 1', "`'x'` is text where a number is needed at column 5", None),
    ("key in other", "'in' takes a literal tuple or list of numbers or strings at column 8", None),
    ('key in ("a", 1)', "'in' list mixes numbers and strings at column 8", None),
    ("value > None", "None compares only as field == None or field != None at column 9", None),
    ("value > b'x'", "unsupported literal b'x' at column 9", None),
    ("value > 3 and 4", "`4` is not a condition at column 15", None),
]


@pytest.mark.parametrize(("where", "what", "hint"), WHERE_ERRORS)
def test_where_errors_name_the_step_the_expression_and_the_column(where, what, hint):
    with pytest.raises(ValueError) as info:
        filter_items("hot", op.input("in", Dataflow("f"), TestingSource([])), where=where)
    text = str(info.value)
    quoted = where.replace('"', '\\"')
    assert text.startswith(f"filter 'hot': where: {what} in \"{quoted}\"; hint: "), text
    if hint is not None:
        assert text.endswith(f"; hint: {hint}"), text
    assert "\n" not in text


def test_config_is_frozen_and_normalised():
    config = FilterConfig(devices="pump-*", keys=("temp",), min_value=1)
    assert config.devices == ("pump-*",) and config.keys == ("temp",) and config.min_value == 1.0
    with pytest.raises(AttributeError):
        config.where = "value > 1"  # type: ignore[misc]
    assert Dropped("f", "where", 1) == Dropped("f", "where", 1, "")


def test_count_dropped_after_the_flow_is_finished_is_an_error(tmp_path):
    edge = Edge(parse_config({"data_dir": str(tmp_path)}), name="late", source=TestingSource([]))
    dev = edge.devices("in", channels=["telemetry"])
    out = filter_items("hot", dev.readings, where="value > 3")
    edge.output("telemetry_points", out.kept)
    edge.dataflow()
    with pytest.raises(RuntimeError) as info:
        edge.count_dropped("hot_dropped", out.dropped)
    assert str(info.value) == (
        "Edge.count_dropped(): the flow 'late' is already finished (dataflow() or run() was "
        "called); hint: declare everything inside build(edge)"
    )
