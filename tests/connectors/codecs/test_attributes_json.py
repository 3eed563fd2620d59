"""Tests for the client attributes codec (connectors.codecs.attributes_json)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.codecs.attributes_json import (
    ATTRIBUTES,
    Attribute,
    attributes_payload,
    decode_attributes,
)
from connectors.codecs.telemetry_json import MAX_KEY_LENGTH
from operators.records import DeadLetter
from tests.conftest import assert_reason_shape, raw_message

RECEIVED = datetime(2025, 11, 22, 9, 30, 15, 250_000, tzinfo=UTC)
DEVICE = "pump-7"


def decode(payload: bytes | str, transport: str = "http") -> list[Attribute] | DeadLetter:
    return decode_attributes(raw_message(ATTRIBUTES, payload, RECEIVED, transport=transport))


def test_every_json_type_is_kept_as_its_json_text() -> None:
    out = decode(
        '{"fw": "1.4.2", "n": 30, "x": 1.5, "on": true, "loc": {"lat": 52.1, "tags": ["a", null]}, '
        '"l": [1, 2], "big": 100000000000000000000000}'
    )
    assert out == [
        Attribute(DEVICE, "fw", '"1.4.2"', RECEIVED, "http"),
        Attribute(DEVICE, "n", "30", RECEIVED, "http"),
        Attribute(DEVICE, "x", "1.5", RECEIVED, "http"),
        Attribute(DEVICE, "on", "true", RECEIVED, "http"),
        Attribute(DEVICE, "loc", '{"lat":52.1,"tags":["a",null]}', RECEIVED, "http"),
        Attribute(DEVICE, "l", "[1,2]", RECEIVED, "http"),
        Attribute(DEVICE, "big", "100000000000000000000000", RECEIVED, "http"),
    ]


@pytest.mark.parametrize("payload", ["{}", " {}\n", "\ufeff{}"])
def test_an_empty_object_is_valid_and_holds_nothing(payload: str) -> None:
    assert decode(payload) == []


def test_unicode_keys_and_values_and_repeated_keys() -> None:
    out = decode('{"Zähler": "größer", "a": 1, "a": 2}')
    assert isinstance(out, list)
    assert [(a.key, a.value) for a in out] == [("Zähler", '"größer"'), ("a", "2")]


def test_payload_round_trips_for_dead_letters() -> None:
    out = decode('{"fw": "1.4.2", "cfg": {"a": [1]}}')
    assert isinstance(out, list)
    assert json.loads(attributes_payload(out)) == {"fw": "1.4.2", "cfg": {"a": [1]}}


ERRORS: list[tuple[str, bytes | str, str]] = [
    ("non-utf8", b'{"x": "\xff"}', r"payload is not UTF-8 \(byte 0xff at offset 7\); send JSON"),
    ("empty", b"", r"payload is empty; send one JSON object of attributes like"),
    ("blank", b" \n", r"payload is empty"),
    ("not-json", b'{"x": }', r"not valid JSON \(Expecting value at line 1 column 7\); send one"),
    ("trailing", b'{"x": 1} 2', r"not valid JSON \(Extra data at line 1 column 10\)"),
    ("list", b'[{"x": 1}]', r"top-level JSON is an array; send one JSON object of attributes"),
    ("number", b"5", r"top-level JSON is a number"),
    ("null-top", b"null", r"top-level JSON is null"),
    ("deep", b"[" * 200_000, r"JSON is nested too deeply; send one JSON object"),
    ("digits", b'{"x": ' + b"9" * 5000 + b"}", r"a JSON number has too many digits to convert"),
    ("empty-key", b'{"": 1}', r"a key is empty; name every attribute"),
    (
        "long-key",
        json.dumps({"k" * (MAX_KEY_LENGTH + 1): 1}),
        r"key 'kkk[k]*… is 257 characters long, more than 256; use shorter keys",
    ),
    ("surrogate-key", b'{"\\udc00": 1}', r"key '\\udc00' contains an unpaired surrogate"),
    ("null", b'{"fw": null}', r"value of 'fw' is null; send a string, number, boolean, object"),
    ("nan", b'{"x": NaN}', r"value of 'x' holds NaN, Infinity or an unpaired surrogate; send"),
    ("nested-inf", b'{"x": {"a": [Infinity]}}', r"value of 'x' holds NaN, Infinity"),
    ("surrogate-value", b'{"x": "a\\ud800"}', r"value of 'x' holds NaN, Infinity or an unpaired"),
]


@pytest.mark.parametrize(
    ("payload", "pattern"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_error_reasons(payload: bytes | str, pattern: str) -> None:
    out = decode(payload, transport="coap")
    assert isinstance(out, DeadLetter), out
    assert_reason_shape(out.reason, "attributes")
    assert re.search(pattern, out.reason), out.reason
    raw = payload.encode() if isinstance(payload, str) else payload
    assert (out.device, out.transport, out.received_at, out.payload) == (
        DEVICE,
        "coap",
        RECEIVED,
        raw,
    )


def test_one_bad_value_refuses_the_whole_message() -> None:
    assert isinstance(decode('{"good": 1, "bad": null, "also": 2}'), DeadLetter)


any_text = st.text(
    alphabet=st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    max_size=8,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values, st.booleans())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_any_json_decodes_or_dead_letters_never_raises(value: Any, ensure_ascii: bool) -> None:
    payload = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    out = decode(payload)
    if isinstance(out, DeadLetter):
        assert_reason_shape(out.reason, "attributes")
        assert out.payload == payload
        return
    assert isinstance(value, dict)
    assert [a.key for a in out] == list(value)
    for attribute in out:
        attribute.value.encode()  # valid UTF-8: no lone surrogates
        assert json.loads(attribute.value) == value[attribute.key]
        assert (attribute.device, attribute.updated_at, attribute.source) == (
            DEVICE,
            RECEIVED,
            "http",
        )


@given(st.binary(max_size=256))
@settings(max_examples=300)
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    out = decode(payload)
    if isinstance(out, DeadLetter):
        assert_reason_shape(out.reason, "attributes")
    else:
        assert all(isinstance(a, Attribute) for a in out)
