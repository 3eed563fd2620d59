"""Tests for the device logs codec (connectors.codecs.logs)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.codecs.logs import ALIASES, MAX_LINE_CHARS, MAX_LINES, decode_logs, logs_payload
from operators.records import LEVELS, LOGS, DeadLetter, LogLine
from tests.conftest import assert_reason_shape, raw_message

RECEIVED = datetime(2025, 11, 22, 9, 30, 15, 250_000, tzinfo=UTC)
DEVICE = "pump-7"
T1 = datetime(2025, 11, 22, 8, 26, 40, tzinfo=UTC)
SHAPE = 'send text lines or JSON like {"level": "error", "msg": "disk full"}'
LEVEL_HINT = "use one of trace, debug, info, notice, warning, error, critical"


def decode(
    payload: bytes | str, received: datetime = RECEIVED
) -> list[LogLine | DeadLetter] | DeadLetter:
    return decode_logs(raw_message(LOGS, payload, received, transport="http"))


def line(msg: str, level: str = "info", ts: datetime = RECEIVED, fields: str | None = None):
    return LogLine(DEVICE, "http", ts, level, msg, fields)


def dead(reason: str, payload: bytes) -> DeadLetter:
    return DeadLetter(DEVICE, "http", RECEIVED, "logs: " + reason, payload)


# --- shapes -----------------------------------------------------------------------------------


def test_one_json_object_with_extra_fields_kept_as_json_text() -> None:
    out = decode('{"ts": 1763800000000, "level": "ERR", "msg": "disk full", "disk": "sda", "n": 3}')
    assert out == [line("disk full", "error", T1, '{"disk":"sda","n":3}')]


def test_a_json_list_and_json_lines_give_the_same_lines() -> None:
    docs = [{"msg": "a"}, {"msg": "b", "level": "warn"}, {"message": "c", "level": "Fatal"}]
    want = [line("a"), line("b", "warning"), line("c", "critical")]
    assert decode(json.dumps(docs)) == want
    assert decode("\n".join(json.dumps(d) for d in docs)) == want
    assert decode("\r\n".join(json.dumps(d) for d in docs) + "\r\n\r\n") == want


def test_a_pretty_printed_object_is_one_line() -> None:
    assert decode('{\n  "msg": "boot",\n  "level": "notice"\n}\n') == [line("boot", "notice")]


def test_ts_as_rfc3339_string_and_missing_ts_is_the_receive_time() -> None:
    out = decode('{"ts": "2025-11-22T09:26:40+01:00", "msg": "x"}\n{"msg": "y"}')
    assert out == [line("x", ts=T1), line("y")]


def test_syslog_text_lines() -> None:
    out = decode(
        "<11>2025-11-22T08:26:40Z ERROR boom after 42 tries\n"
        "<13>1 2025-11-22T08:26:40.500Z host app - - - hello\n"
        "<12>Nov 22 08:26:40 host app[7]: started\n"
        "2025-11-22 08:26:40,250 [warn] slow disk\n"
        "Info: all good\n"
        "just a message\n"
        "   indented continuation  \n"
    )
    assert out == [
        line("boom after 42 tries", "error", T1),
        line("host app - - - hello", "notice", T1 + timedelta(milliseconds=500)),
        line("host app[7]: started", "warning", T1),
        line("slow disk", "warning", T1 + timedelta(milliseconds=250)),
        line("all good"),
        line("just a message"),
        line("indented continuation"),
    ]


@pytest.mark.parametrize(
    ("pri", "level"), [(0, "critical"), (3, "error"), (4, "warning"), (15, "debug"), (191, "debug")]
)
def test_syslog_priority_gives_the_level(pri: int, level: str) -> None:
    assert decode(f"<{pri}>x") == [line("x", level)]


def test_a_level_word_after_the_priority_wins() -> None:
    assert decode("<14>CRIT x") == [line("x", "critical")]


def test_a_word_that_is_no_level_stays_in_the_message() -> None:
    assert decode("Starting pump") == [line("Starting pump")]
    assert decode("[main] up") == [line("[main] up")]


def test_rfc3164_year_comes_from_the_receive_time_or_the_year_before() -> None:
    jan = datetime(2026, 1, 2, tzinfo=UTC)
    assert decode("Dec 31 23:59:59 x", jan) == [
        LogLine(DEVICE, "http", datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), "info", "x")
    ]
    assert decode("Jan  1 00:00:01 x", jan) == [
        LogLine(DEVICE, "http", datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), "info", "x")
    ]


def test_a_timestamp_without_offset_is_utc() -> None:
    assert decode("2025-11-22T08:26:40 x") == [line("x", ts=T1)]


@pytest.mark.parametrize("word", sorted(ALIASES))
def test_every_level_alias_in_any_case(word: str) -> None:
    assert decode(f"{word.upper()} x") == [line("x", ALIASES[word])]
    assert decode(json.dumps({"msg": "x", "level": word.title()})) == [line("x", ALIASES[word])]


def test_unicode_and_a_bom() -> None:
    assert decode("\ufeffWARN Zähler größer 😀".encode()) == [line("Zähler größer 😀", "warning")]


# --- bad lines are dead letters of their own ------------------------------------------------


def test_one_bad_line_does_not_lose_the_good_ones() -> None:
    payload = b'ok one\n{"msg": 1}\n\xff\xfe bad\n{"msg": "two"}\n'
    assert decode(payload) == [
        line("ok one"),
        dead('line 2: "msg" is a number; send the message as a string', b'{"msg": 1}'),
        dead(
            "line 3: not UTF-8 (byte 0xff at offset 0); send text encoded as UTF-8", b"\xff\xfe bad"
        ),
        line("two"),
    ]


def test_bad_list_items_are_dead_letters_of_their_own() -> None:
    out = decode('[{"msg": "a"}, 3, {"msg": "b", "level": "loud"}]')
    assert out == [
        line("a"),
        dead(f"list index 1: is a number, not an object; {SHAPE}", b"3"),
        dead(
            f"list index 2: \"level\" 'loud' is not a log level; {LEVEL_HINT}",
            b'{"msg":"b","level":"loud"}',
        ),
    ]


BAD_LINES = [
    ('{"level": "error"}', f'the JSON object has no "msg"; {SHAPE}'),
    ('{"msg": null}', '"msg" is null; send the message as a string'),
    ('{"msg": ["a"]}', '"msg" is an array; send the message as a string'),
    ('{"msg": "\\ud800"}', '"msg" contains an unpaired surrogate; send valid Unicode'),
    ('{"msg": "x", "level": 3}', f'"level" is a number; {LEVEL_HINT}'),
    ('{"msg": "x", "level": "loud"}', f"\"level\" 'loud' is not a log level; {LEVEL_HINT}"),
    (
        '{"msg": "x", "ts": "yesterday"}',
        '"ts" \'yesterday\' is not an RFC 3339 time; send Unix milliseconds or "2025-11-22T08:26:40Z"',
    ),
    (
        '{"msg": "x", "ts": true}',
        "ts is a boolean; send Unix milliseconds as an integer, e.g. 1763800000000",
    ),
    (
        '{"msg": "x", "ts": 1763800000}',
        "ts 1763800000 is outside 2000-01-01..2100-01-01 (it looks like seconds); send Unix milliseconds (UTC)",
    ),
    (
        '{"msg": "x", "v": NaN}',
        "a field holds NaN, Infinity or an unpaired surrogate; send standard JSON",
    ),
    ('{"msg": "x"', f"not valid JSON (Expecting ',' delimiter at column 12); {SHAPE}"),
    (
        '{"msg": "x", "n": 1' + "0" * 5000 + "}",
        "a JSON number has too many digits to convert; send it as a string",
    ),
    ('{"a": ' + "[" * 5000, "JSON is nested too deeply; " + SHAPE),
    (
        "9999-12-31T23:59:59Z x",
        "time '9999-12-31T23:59:59Z' is outside 2000-01-01..2100-01-01; fix the clock",
    ),
    (
        '{"msg": "x", "ts": "1999-12-31T23:00:00Z"}',
        "time '1999-12-31T23:00:00Z' is outside 2000-01-01..2100-01-01; fix the clock",
    ),
    ("<999>x", "syslog priority <999> is over 191; send <facility * 8 + severity>"),
    (
        "2025-13-01T00:00:00Z x",
        "timestamp '2025-13-01T00:00:00Z' is not a valid date and time; fix the clock",
    ),
    (
        "Feb 30 00:00:00 x",
        "timestamp 'Feb 30 00:00:00' is not a valid date and time; fix the clock",
    ),
    (
        "x" * (MAX_LINE_CHARS + 1),
        f"is {MAX_LINE_CHARS + 1} characters long, more than {MAX_LINE_CHARS}; split long messages",
    ),
]


@pytest.mark.parametrize(("text", "reason"), BAD_LINES, ids=[r[:30] for _, r in BAD_LINES])
def test_every_bad_line_reason(text: str, reason: str) -> None:
    out = decode("ok\n" + text)
    assert isinstance(out, list) and out[0] == line("ok")
    [letter] = out[1:]
    assert isinstance(letter, DeadLetter)
    assert_reason_shape(letter.reason, "logs")
    want = "logs: line 2: " + reason
    if len(want) > 200:
        want = want[:199] + "…"
    assert letter.reason == want
    assert letter.payload == text.encode("utf-8", "surrogatepass")


def test_a_json_object_over_the_line_length_is_refused() -> None:
    doc = {"msg": "x" * MAX_LINE_CHARS, "k": 1}
    out = decode(json.dumps([{"msg": "ok"}, doc]))
    assert out == [
        line("ok"),
        dead(
            f"list index 1: message and fields are {MAX_LINE_CHARS + 7} characters long, "
            f"more than {MAX_LINE_CHARS}; split long messages",
            json.dumps(doc, separators=(",", ":")).encode(),
        ),
    ]


def test_a_message_with_no_good_line_is_one_dead_letter_whole() -> None:
    assert decode('{"msg": 1}') == dead(
        '"msg" is a number; send the message as a string', b'{"msg": 1}'
    )
    assert decode(b"\xff\n<999>x") == dead(
        "no good line among 2; first: line 1: not UTF-8 (byte 0xff at offset 0); send text "
        "encoded as UTF-8",
        b"\xff\n<999>x",
    )
    assert decode("[3]") == dead(f"list index 0: is a number, not an object; {SHAPE}", b"[3]")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", f"payload is empty; {SHAPE}"),
        (b" \r\n\t", f"payload is empty; {SHAPE}"),
        (b"\xef\xbb\xbf", f"payload is empty; {SHAPE}"),
        (b"[]", f"the JSON list is empty; {SHAPE}"),
        (
            b'{\n "msg": "x",\n}',
            "not valid JSON (Expecting property name enclosed in double quotes at line 3 "
            f"column 1); {SHAPE}",
        ),
        (
            b'[{"msg": "x"},]',
            f"not valid JSON (Expecting value at line 1 column 15); {SHAPE}",
        ),
    ],
)
def test_whole_message_reasons(payload: bytes, reason: str) -> None:
    assert decode(payload) == dead(reason, payload)


def test_lines_beyond_the_limit_are_one_dead_letter() -> None:
    text = "\n".join(f"l{i}" for i in range(MAX_LINES + 3))
    out = decode(text)
    assert isinstance(out, list) and len(out) == MAX_LINES + 1
    assert out[MAX_LINES - 1] == line(f"l{MAX_LINES - 1}")
    assert out[-1] == dead(
        f"the message has more than {MAX_LINES} lines; lines from line {MAX_LINES + 1} on are "
        "kept here unprocessed; hint: send fewer lines per message",
        b"\n".join(f"l{i}".encode() for i in range(MAX_LINES, MAX_LINES + 3)),
    )


def test_list_items_beyond_the_limit_are_one_dead_letter() -> None:
    items = [{"msg": str(i)} for i in range(MAX_LINES + 2)]
    out = decode(json.dumps(items))
    assert isinstance(out, list) and len(out) == MAX_LINES + 1
    assert out[-1] == dead(
        f"the list has {MAX_LINES + 2} items, more than {MAX_LINES}; items from index "
        f"{MAX_LINES} on are kept here unprocessed; hint: send fewer lines per message",
        json.dumps(items[MAX_LINES:]).encode(),
    )


def test_logs_payload_round_trips() -> None:
    one = line("disk full", "error", T1, '{"disk":"sda"}')
    assert decode(logs_payload(one)) == [one]


# --- properties ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=10,
)
noise = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.lists(json_values, max_size=4).map(lambda v: "\n".join(json.dumps(x) for x in v).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(
        st.sampled_from(
            [
                "<3>",
                "<200>",
                "2025-11-22T08:26:40Z",
                "Nov 22 08:26:40",
                "WARN",
                "{",
                "[",
                "]",
                "}",
                "\n",
                " ",
                "x",
                '"msg"',
                ":",
                "\xff",
            ]
        ),
        max_size=20,
    ).map(lambda p: "".join(p).encode("utf-8", "surrogateescape")),
)


@given(payload=noise)
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_decoding_never_raises_and_every_reason_is_one_line(payload: bytes) -> None:
    out = decode(payload)
    items = [out] if isinstance(out, DeadLetter) else out
    assert items
    if isinstance(out, list):
        assert any(isinstance(x, LogLine) for x in out)
    for item in items:
        if isinstance(item, DeadLetter):
            assert_reason_shape(item.reason, "logs")
            assert (item.device, item.transport, item.received_at) == (DEVICE, "http", RECEIVED)
        else:
            assert (
                item.level in LEVELS
                and item.ts.tzinfo is UTC
                or item.ts.utcoffset() == timedelta(0)
            )
            assert item.fields is None or isinstance(json.loads(item.fields), dict)
            item.msg.encode()  # valid Unicode


ms_range = st.integers(946_684_800_000, 4_102_444_799_999)
messages = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=50)
extra = st.dictionaries(
    st.text(max_size=5).filter(lambda k: k not in ("ts", "level", "msg", "message")),
    st.integers() | st.text(max_size=5) | st.booleans(),
    max_size=3,
)


@given(
    docs=st.lists(
        st.tuples(ms_range, st.sampled_from(LEVELS), messages, extra), min_size=1, max_size=8
    )
)
@settings(max_examples=300)
def test_json_lines_round_trip(docs: list[tuple[int, str, str, dict]]) -> None:
    text = "\n".join(json.dumps({"ts": t, "level": lv, "msg": m, **x}) for t, lv, m, x in docs)
    out = decode(text)
    assert out == [
        line(
            m,
            lv,
            datetime.fromtimestamp(t / 1000, UTC),
            json.dumps(x, ensure_ascii=False, separators=(",", ":")) if x else None,
        )
        for t, lv, m, x in docs
    ]


text_messages = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
    min_size=1,
    max_size=40,
)


@given(
    lines_=st.lists(
        st.tuples(ms_range, st.sampled_from(LEVELS), text_messages, st.sampled_from([0, 60, -330])),
        min_size=1,
        max_size=8,
    )
)
@settings(max_examples=300)
def test_text_lines_round_trip(lines_: list[tuple[int, str, str, int]]) -> None:
    rows = []
    want = []
    for t, level, msg, offset in lines_:
        ts = datetime.fromtimestamp(t / 1000, UTC)
        local = ts.astimezone(timezone(timedelta(minutes=offset)))
        rows.append(f"{local.isoformat(timespec='milliseconds')} {level.upper()} {msg}")
        want.append(line(msg, level, ts))
    assert decode("\n".join(rows)) == want
