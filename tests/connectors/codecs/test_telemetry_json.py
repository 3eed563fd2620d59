"""Tests for the telemetry JSON codec (connectors.codecs.telemetry_json)."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.codecs.telemetry_json import (
    MAX_KEY_LENGTH,
    MAX_LIST_ITEMS,
    MAX_TS_MS,
    MIN_TS_MS,
    decode_telemetry,
)
from operators.records import DeadLetter, RawMessage, Reading
from tests.conftest import assert_reason_shape, raw_message

RECEIVED = datetime(2025, 11, 22, 9, 30, 15, 250_000, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TS = 1_763_800_000_000
DEVICE = "pump-7"


def make_msg(payload: bytes | str, *, device: str = DEVICE, transport: str = "mqtt") -> RawMessage:
    return raw_message("telemetry", payload, RECEIVED, device=device, transport=transport)


def at(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def readings(payload: bytes | str, **kw: str) -> list[Reading]:
    out = decode_telemetry(make_msg(payload, **kw))
    assert isinstance(out, list), getattr(out, "reason", out)
    return out


def reason_of(payload: bytes | str) -> str:
    out = decode_telemetry(make_msg(payload))
    assert isinstance(out, DeadLetter), out
    assert_reason_shape(out.reason, "telemetry")
    return out.reason


# --- the three shapes --------------------------------------------------------------------------


def test_plain_object_uses_received_at() -> None:
    assert readings('{"temperature": 21.5, "humidity": 40}') == [
        Reading(DEVICE, "temperature", RECEIVED, 21.5, "mqtt"),
        Reading(DEVICE, "humidity", RECEIVED, 40.0, "mqtt"),
    ]


def test_ts_values_object() -> None:
    got = readings(f'{{"ts": {TS}, "values": {{"temperature": 21.5, "rpm": 1480}}}}')
    assert got == [
        Reading(DEVICE, "temperature", at(TS), 21.5, "mqtt"),
        Reading(DEVICE, "rpm", at(TS), 1480.0, "mqtt"),
    ]
    assert got[0].ts == datetime(2025, 11, 22, 8, 26, 40, tzinfo=UTC)
    assert got[0].ts.tzinfo is UTC


def test_list_mixing_shapes_keeps_order() -> None:
    payload = json.dumps(
        [
            {"a": 1},
            {"ts": TS, "values": {"b": 2.5, "c": "ok"}},
            {"ts": TS + 1000, "values": {"b": 3}},
        ]
    )
    assert readings(payload) == [
        Reading(DEVICE, "a", RECEIVED, 1.0, "mqtt"),
        Reading(DEVICE, "b", at(TS), 2.5, "mqtt"),
        Reading(DEVICE, "c", at(TS), "ok", "mqtt"),
        Reading(DEVICE, "b", at(TS + 1000), 3.0, "mqtt"),
    ]


@pytest.mark.parametrize("transport", ["mqtt", "coap", "http"])
def test_device_and_transport_come_from_the_message(transport: str) -> None:
    got = readings('{"x": 1}', device="fan-2", transport=transport)
    assert [(r.device, r.transport) for r in got] == [("fan-2", transport)]


def test_value_conversions() -> None:
    got = readings(
        '{"on": true, "off": false, "n": 3, "f": -0.25, "log": "motor started", "e": ""}'
    )
    assert [(r.key, r.value) for r in got] == [
        ("on", 1.0),
        ("off", 0.0),
        ("n", 3.0),
        ("f", -0.25),
        ("log", "motor started"),
        ("e", ""),
    ]
    assert [type(r.value) for r in got] == [float, float, float, float, str, str]


def test_millisecond_precision_is_exact() -> None:
    (r,) = readings(f'{{"ts": {TS + 123}, "values": {{"x": 1}}}}')
    assert r.ts == datetime(2025, 11, 22, 8, 26, 40, 123_000, tzinfo=UTC)


def test_integral_float_ts_is_accepted() -> None:
    (r,) = readings(f'{{"ts": {TS}.0, "values": {{"x": 1}}}}')
    assert r.ts == at(TS)


def test_ts_bounds_are_2000_inclusive_to_2100_exclusive() -> None:
    (lo,) = readings(f'{{"ts": {MIN_TS_MS}, "values": {{"x": 1}}}}')
    assert lo.ts == datetime(2000, 1, 1, tzinfo=UTC)
    (hi,) = readings(f'{{"ts": {MAX_TS_MS - 1}, "values": {{"x": 1}}}}')
    assert hi.ts == datetime(2099, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)


def test_unicode_keys_and_values_are_kept() -> None:
    got = readings('{"température": "über", "\\u03c9": 1}')
    assert [(r.key, r.value) for r in got] == [("température", "über"), ("ω", 1.0)]


def test_key_of_max_length_is_accepted() -> None:
    key = "k" * MAX_KEY_LENGTH
    assert [r.key for r in readings(json.dumps({key: 1}))] == [key]


def test_utf8_bom_is_ignored() -> None:
    assert readings(b'\xef\xbb\xbf{"x": 1}') == [Reading(DEVICE, "x", RECEIVED, 1.0, "mqtt")]


def test_repeated_key_last_value_wins() -> None:
    assert [r.value for r in readings('{"x": 1, "x": 2}')] == [2.0]


def test_list_of_max_length_is_accepted() -> None:
    got = readings(json.dumps([{"x": i} for i in range(MAX_LIST_ITEMS)]))
    assert len(got) == MAX_LIST_ITEMS
    assert got[-1].value == float(MAX_LIST_ITEMS - 1)


def test_values_key_with_scalar_value_is_an_ordinary_key() -> None:
    assert [(r.key, r.value) for r in readings('{"values": 5}')] == [("values", 5.0)]


# --- dead letters ------------------------------------------------------------------------------


def test_dead_letter_copies_the_message() -> None:
    msg = RawMessage("fan-2", "telemetry", "coap", RECEIVED, b'{"x": null}')
    out = decode_telemetry(msg)
    assert isinstance(out, DeadLetter)
    assert (out.device, out.transport, out.received_at, out.payload) == (
        "fan-2",
        "coap",
        RECEIVED,
        b'{"x": null}',
    )


def test_reason_example_from_the_brief() -> None:
    assert reason_of('{"temperature": NaN}') == (
        "telemetry: value of 'temperature' is NaN; send finite numbers, booleans, strings, "
        "objects or arrays"
    )


ERRORS: list[tuple[str, bytes | str, str]] = [
    # encoding and syntax
    ("non-utf8", b'{"x": "\xff"}', r"payload is not UTF-8 \(byte 0xff at offset 7\); send JSON"),
    ("utf16", '{"x": 1}'.encode("utf-16"), r"payload is not UTF-8 \(byte 0xff at offset 0\)"),
    ("not-json", b'{"x": }', r"not valid JSON \(Expecting value at line 1 column 7\)"),
    ("trailing", b'{"x": 1} 2', r"not valid JSON \(Extra data at line 1 column 10\)"),
    ("truncated", b'{"x": 1', r"not valid JSON \(Expecting ',' delimiter"),
    ("empty", b"", r"payload is empty; send \{\"key\": value\}"),
    ("blank", b" \n\t ", r"payload is empty"),
    # non-finite numbers
    (
        "nan",
        b'{"t": NaN}',
        r"value of 't' is NaN; send finite numbers, booleans, strings, objects or arrays",
    ),
    ("inf", b'{"t": Infinity}', r"value of 't' is Infinity; send finite"),
    ("-inf", b'{"t": -Infinity}', r"value of 't' is -Infinity; send finite"),
    ("1e400", b'{"t": 1e400}', r"value of 't' overflows a 64-bit float; send finite"),
    ("-1e400", b'{"t": -1e400}', r"value of 't' overflows a 64-bit float"),
    ("big-int", b'{"t": 1' + b"0" * 400 + b"}", r"value of 't' is an integer too large"),
    ("digits", b'{"t": ' + b"9" * 5000 + b"}", r"a JSON number has too many digits"),
    # value types
    (
        "null",
        b'{"t": null}',
        r"value of 't' is null; send finite numbers, booleans, strings, objects or arrays",
    ),
    ("array-nan", b'{"t": [1, NaN]}', r"value of 't' holds NaN, Infinity or an unpaired surr"),
    ("object-inf", b'{"t": {"a": -Infinity}}', r"value of 't' holds NaN, Infinity or an unpaired"),
    ("object-surrogate", b'{"t": {"a": "\\ud800"}}', r"value of 't' holds NaN, Infinity or an"),
    ("ts-null-value", f'{{"ts": {TS}, "values": {{"t": null}}}}', r"value of 't' is null"),
    # top level
    ("top-number", b"21.5", r"top-level JSON is a number; send \{\"key\": value\}, \{\"ts\""),
    ("top-string", b'"hi"', r"top-level JSON is a string"),
    ("top-bool", b"true", r"top-level JSON is a boolean"),
    ("top-null", b"null", r"top-level JSON is null"),
    ("top-nan", b"NaN", r"top-level JSON is NaN"),
    # ts/values shape
    ("ts-no-values", f'{{"ts": {TS}}}', r"'ts' without 'values'; send \{\"key\": value\}"),
    ("ts-values-number", f'{{"ts": {TS}, "values": 5}}', r"'values' is a number, not an object"),
    ("ts-values-list", f'{{"ts": {TS}, "values": [1]}}', r"'values' is an array, not an object"),
    ("ts-values-null", f'{{"ts": {TS}, "values": null}}', r"'values' is null, not an object"),
    (
        "ts-extra-key",
        f'{{"ts": {TS}, "values": {{"a": 1}}, "b": 2}}',
        r"unexpected key 'b' next to 'ts' and 'values'; put every reading inside 'values'",
    ),
    (
        "values-without-ts",
        b'{"values": {"a": 1}}',
        r"'values' without 'ts'; add \"ts\" \(Unix milliseconds\) or send the keys at the top",
    ),
    # no readings
    ("empty-list", b"[]", r"the list is empty, so there are no readings"),
    # keys
    ("empty-key", b'{"": 1}', r"a key is empty; name every value"),
    (
        "long-key",
        json.dumps({"k" * (MAX_KEY_LENGTH + 1): 1}),
        r"key 'kkkk[k]*… is 257 characters long, more than 256; use shorter keys",
    ),
    ("surrogate-key", b'{"\\udc00": 1}', r"key '\\udc00' contains an unpaired surrogate"),
    ("surrogate-value", b'{"x": "a\\ud800"}', r"value of 'x' contains an unpaired surrogate"),
    # ts values
    (
        "ts-before-2000",
        f'{{"ts": {MIN_TS_MS - 1}, "values": {{"x": 1}}}}',
        r"ts 946684799999 is outside 2000-01-01\.\.2100-01-01; send Unix milliseconds \(UTC\)",
    ),
    (
        "ts-2100",
        f'{{"ts": {MAX_TS_MS}, "values": {{"x": 1}}}}',
        r"ts 4102444800000 is outside 2000-01-01\.\.2100-01-01;",
    ),
    ("ts-negative", b'{"ts": -1, "values": {"x": 1}}', r"ts -1 is outside 2000-01-01"),
    (
        "ts-seconds",
        b'{"ts": 1763800000, "values": {"x": 1}}',
        r"ts 1763800000 is outside 2000-01-01\.\.2100-01-01 \(it looks like seconds\)",
    ),
    (
        "ts-micros",
        b'{"ts": 1763800000000000, "values": {"x": 1}}',
        r"\(it looks like microseconds\)",
    ),
    (
        "ts-nanos",
        b'{"ts": 1763800000000000000, "values": {"x": 1}}',
        r"\(it looks like nanoseconds\)",
    ),
    (
        "ts-huge-int",
        b'{"ts": 1' + b"0" * 100 + b', "values": {"x": 1}}',
        r"ts 10{30,}… is outside 2000-01-01",
    ),
    (
        "ts-fraction",
        f'{{"ts": {TS}.5, "values": {{"x": 1}}}}',
        r"ts 1763800000000\.5 is not a whole number of milliseconds; send Unix milliseconds as an",
    ),
    (
        "ts-bool",
        b'{"ts": true, "values": {"x": 1}}',
        r"ts is a boolean; send Unix milliseconds as an integer, e\.g\. 1763800000000",
    ),
    ("ts-string", b'{"ts": "2025-11-22", "values": {"x": 1}}', r"ts is a string \('2025-11-22'\)"),
    ("ts-null", b'{"ts": null, "values": {"x": 1}}', r"ts is null; send Unix milliseconds"),
    ("ts-array", b'{"ts": [1], "values": {"x": 1}}', r"ts is an array; send Unix milliseconds"),
    ("ts-nan", b'{"ts": NaN, "values": {"x": 1}}', r"ts is NaN; send Unix milliseconds"),
    ("ts-1e400", b'{"ts": 1e400, "values": {"x": 1}}', r"ts overflows a 64-bit float; send Unix"),
    # lists
    (
        "list-too-long",
        json.dumps([{"x": 1}] * (MAX_LIST_ITEMS + 1)),
        r"the list has 10001 items, more than 10000; split it into several messages",
    ),
    ("list-item-number", b'[{"x": 1}, 5]', r"list index 1: item is a number, not an object"),
    ("list-nested", b"[[{}]]", r"list index 0: item is an array, not an object"),
    (
        "list-item-error",
        b'[{"x": 1}, {"y": 2}, {"z": null}]',
        r"list index 2: value of 'z' is null",
    ),
    (
        "list-item-ts",
        f'[{{"ts": {TS}, "values": {{"a": 1}}}}, {{"ts": 5, "values": {{"a": 1}}}}]',
        r"list index 1: ts 5 is outside",
    ),
    # nesting
    ("deep-arrays", b"[" * 200_000, r"JSON is nested too deeply; send"),
    ("deep-objects", b'{"a":' * 200_000, r"JSON is nested too deeply"),
]


@pytest.mark.parametrize(
    ("payload", "pattern"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_error_reasons(payload: bytes | str, pattern: str) -> None:
    reason = reason_of(payload)
    assert re.search(pattern, reason), reason


@pytest.mark.parametrize(
    "payload", ["{}", " {} ", f'{{"ts": {TS}, "values": {{}}}}', '[{"x": 1}, {}]'], ids=str
)
def test_empty_objects_are_valid_and_hold_nothing(payload: str) -> None:
    # ThingsBoard's clients post {} to test the connection and expect it accepted.
    assert [r.key for r in readings(payload)] == (["x"] if "x" in payload else [])


def test_objects_and_arrays_are_kept_as_compact_json_text() -> None:
    out = readings('{"cfg": {"a": 1, "b": [true, null, "é"]}, "xs": [1.5, 2], "deep": [[[]]]}')
    assert [(r.key, r.value) for r in out] == [
        ("cfg", '{"a":1,"b":[true,null,"é"]}'),
        ("xs", "[1.5,2]"),
        ("deep", "[[[]]]"),
    ]
    nested = '{"a": ' + "[" * 500 + "]" * 500 + "}"
    assert readings(nested)[0].value == "[" * 500 + "]" * 500


def test_long_keys_are_quoted_short() -> None:
    reason = reason_of(json.dumps({"x" * MAX_KEY_LENGTH: None}))
    assert "x" * 41 not in reason
    assert re.search(r"value of 'x{30,}… is null", reason), reason


def test_reason_quotes_escape_line_breaks() -> None:
    reason = reason_of(json.dumps({"a\nb\u2028c\rd": None}))
    assert "'a\\nb\\u2028c\\rd'" in reason


def test_one_bad_value_rejects_the_whole_message() -> None:
    out = decode_telemetry(make_msg('[{"good": 1}, {"bad": null}, {"good": 2}]'))
    assert isinstance(out, DeadLetter)


# --- properties --------------------------------------------------------------------------------


def check_result(out: list[Reading] | DeadLetter) -> None:
    if isinstance(out, DeadLetter):
        assert_reason_shape(out.reason, "telemetry")
        assert (out.device, out.transport, out.received_at) == (DEVICE, "mqtt", RECEIVED)
        return
    assert isinstance(out, list)
    # a successful decode has readings, or none for empty objects ({} tests a connection)
    for r in out:
        assert isinstance(r, Reading)
        assert r.device == DEVICE and r.transport == "mqtt"
        assert r.ts.tzinfo is not None and r.ts.utcoffset() == timedelta(0)
        assert 0 < len(r.key) <= MAX_KEY_LENGTH
        if isinstance(r.value, float):
            assert math.isfinite(r.value)
        else:
            assert isinstance(r.value, str)
            r.value.encode()


any_chars = st.one_of(
    st.characters(),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from(["\n", "\u2028", '"', "\\"]),
)
any_text = st.text(alphabet=any_chars, max_size=12) | st.sampled_from(["ts", "values", ""])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)
telemetry_like = st.recursive(
    json_values,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(any_text, children, max_size=4)
        | st.fixed_dictionaries(
            {"ts": st.one_of(st.integers(), st.floats(), json_values), "values": children}
        )
    ),
    max_leaves=30,
)


@given(st.binary(max_size=512))
@settings(max_examples=400)
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    check_result(decode_telemetry(make_msg(payload)))


@given(telemetry_like, st.booleans(), st.sampled_from([None, 0, 2]))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_json_never_raises(value: Any, ensure_ascii: bool, indent: int | None) -> None:
    # json.dumps writes nan/inf as the NaN/Infinity tokens, surrogates as escapes
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)
    payload = text.encode("utf-8", "surrogatepass")
    check_result(decode_telemetry(make_msg(payload)))


valid_keys = st.text(
    alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=MAX_KEY_LENGTH
)
valid_values = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)
)
valid_ts = st.integers(min_value=MIN_TS_MS, max_value=MAX_TS_MS - 1)
plain_objects = st.dictionaries(valid_keys.filter(lambda k: k != "ts"), valid_values, min_size=1)
ts_objects = st.fixed_dictionaries(
    {"ts": valid_ts, "values": st.dictionaries(valid_keys, valid_values, min_size=1)}
)
valid_items = plain_objects | ts_objects


def expected_readings(doc: dict[str, Any] | list[dict[str, Any]]) -> list[Reading]:
    out = []
    for item in doc if isinstance(doc, list) else [doc]:
        if "ts" in item:
            ts, values = at(item["ts"]), item["values"]
        else:
            ts, values = RECEIVED, item
        for key, value in values.items():
            if isinstance(value, bool):
                value = 1.0 if value else 0.0
            elif isinstance(value, int | float):
                value = float(value)
            out.append(Reading(DEVICE, key, ts, value, "mqtt"))
    return out


@given(valid_items | st.lists(valid_items, min_size=1, max_size=8), st.booleans())
@settings(max_examples=300)
def test_valid_telemetry_decodes_to_expected_readings(
    doc: dict[str, Any] | list[dict[str, Any]], ensure_ascii: bool
) -> None:
    out = decode_telemetry(make_msg(json.dumps(doc, ensure_ascii=ensure_ascii)))
    assert out == expected_readings(doc)


@given(valid_ts)
def test_ts_conversion_is_exact_to_the_millisecond(ms: int) -> None:
    (r,) = readings(json.dumps({"ts": ms, "values": {"x": 1}}))
    assert r.ts == at(ms)
    assert r.ts.tzinfo is UTC


@given(
    valid_items | st.lists(valid_items, min_size=1, max_size=4),
    st.sampled_from(["{}", " {} ", "\n{}\n", "\ufeff{}", "\ufeff {}\t", "{}\r\n"]),
)
@settings(max_examples=200)
def test_whitespace_and_bom_around_the_document_change_nothing(
    doc: dict[str, Any] | list[dict[str, Any]], frame: str
) -> None:
    text = frame.replace("{}", json.dumps(doc, indent=1))
    assert decode_telemetry(make_msg(text)) == expected_readings(doc)


@pytest.mark.parametrize("text", ['{"a": 1} x', '{"a": 1}{"b": 2}', ' {"a": 1', "[1] ]"])
def test_trailing_or_truncated_json_names_the_spot_as_json_loads_does(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as exc:
        json.loads(text)
    out = decode_telemetry(make_msg(text))
    assert isinstance(out, DeadLetter)
    e = exc.value
    assert f"({e.msg} at line {e.lineno} column {e.colno})" in out.reason


def test_messages_sharing_a_ts_and_the_next_ts_convert_exactly() -> None:
    for ms in (TS, TS, TS + 1, TS, MIN_TS_MS, MIN_TS_MS):
        (r,) = readings(json.dumps({"ts": ms, "values": {"x": 1}}))
        assert r.ts == at(ms)


# Raw JSON text, not json.dumps output: the tokens Python's parser accepts beyond JSON
# (NaN, Infinity), numbers beyond float64 or beyond int() limits, lone surrogate escapes,
# control characters, nesting near and past the recursion limit.
raw_leaves = st.sampled_from(
    [
        "NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-400", "-0", "0.0",
        "9" * 4400, "-" + "9" * 400, "1" + "0" * 309, "1.7976931348623157e308",
        "1763800000000", "true", "null", '""', '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"',
        '"a\\nb"', '"\\/"', '"\t"', "[]", "{}", "tru", '"', "1.", ".5", "01", "+1",
    ]
)  # fmt: skip
raw_keys = st.sampled_from(['"ts"', '"values"', '"t"', '""', '"\\ud800"', '"k\\u0000"', "t"])


def raw_json(depth: int) -> st.SearchStrategy[str]:
    if depth == 0:
        return raw_leaves
    child = raw_json(depth - 1)
    return st.one_of(
        raw_leaves,
        st.lists(child, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(raw_keys, child), max_size=4).map(
            lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
        ),
    )


@given(raw_json(3), st.integers(0, 3000), st.sampled_from(["[", '{"t":']))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_raw_json_tokens_and_deep_nesting_never_raise(doc: str, depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * depth + doc + closer * depth
    check_result(decode_telemetry(make_msg(text.encode("utf-8", "surrogatepass"))))
