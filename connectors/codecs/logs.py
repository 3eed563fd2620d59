"""Decode device log payloads into :class:`~operators.records.LogLine` records.

A logs payload is UTF-8 in one of these shapes:

- one JSON object: ``{"ts": 1763800000000, "level": "error", "msg": "disk full"}``;
- a JSON list of such objects;
- JSON lines: one such object per line;
- text lines, syslog style: ``<PRI>`` (optional; its severity gives the
  level), an RFC 3339 timestamp (``2025-11-22T08:26:40.5Z``; UTC when it has
  no offset) or an RFC 3164 one (``Nov 22 08:26:40``, UTC, the year of the
  receive time, or the year before when that would put it more than a month
  ahead), a level word (``ERROR``, ``[warn]``, ``Info:``...), then the
  message. Each part is optional; a line without them is all message.

Text and JSON lines mix freely: a line whose first non-blank character is
``{`` is JSON, any other is text. Blank lines are skipped; CRLF line ends are fine.

In a JSON object ``msg`` (or ``message``) is the message, a string;
``level`` a level name (default ``info``); ``ts`` Unix milliseconds (UTC)
or an RFC 3339 string. Without ``ts`` a line gets the message's
``received_at``. Every other field is kept, as a compact JSON object text,
in ``fields``. Levels are normalised to ``trace debug info notice warning
error critical`` (:data:`ALIASES`: ``warn``, ``err``, ``fatal``, ``crit``,
``emerg``, ``alert``, ``panic``... any case).

Per line, not per message: a bad line (not UTF-8, not valid JSON, a JSON
object without ``msg``, an unknown level, a bad timestamp or one outside
2000-01-01..2100-01-01, more than
:data:`MAX_LINE_CHARS` characters) becomes a :class:`DeadLetter` of its
own, holding that line, and the good lines of the same message are kept.
Lines beyond :data:`MAX_LINES` of one message become one dead letter
holding them all. A message with no good line at all (empty, or every line
bad) is one dead letter, whole, so an HTTP or CoAP device is answered 400 /
4.00. Reasons are one line starting with ``"logs: "``. Decoding never raises
for device input.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.codecs.telemetry_json import (
    _DECODER,
    MAX_TS_MS,
    MIN_TS_MS,
    _has_surrogate,
    _kind,
    _quote,
    _Reject,
    _timestamp,
    json_text,
)
from operators.records import LEVELS, DeadLetter, LogLine, RawMessage

__all__ = ["ALIASES", "MAX_LINE_CHARS", "MAX_LINES", "decode_logs", "logs_payload"]

MAX_LINE_CHARS = 8192
"""Longest accepted line, in characters (for a JSON object: its ``msg`` and other fields)."""
MAX_LINES = 10_000
"""Most lines (or JSON list items) taken from one message; the rest is one dead letter."""

ALIASES: dict[str, str] = {
    **{level: level for level in LEVELS},
    "trc": "trace",
    "verbose": "trace",
    "finest": "trace",
    "dbg": "debug",
    "fine": "debug",
    "inf": "info",
    "information": "info",
    "informational": "info",
    "warn": "warning",
    "wrn": "warning",
    "err": "error",
    "crit": "critical",
    "fatal": "critical",
    "severe": "critical",
    "alert": "critical",
    "emerg": "critical",
    "emergency": "critical",
    "panic": "critical",
}
"""Level words (lower case) and the level each stands for."""

_SYSLOG = ("critical", "critical", "critical", "error", "warning", "notice", "info", "debug")
"""Level of each syslog severity (``PRI % 8``): emerg, alert, crit, err, warning, notice..."""

_PREFIX = "logs: "
_MAX_REASON = 200
_LEVEL_HINT = "use one of " + ", ".join(LEVELS)
_SHAPE_HINT = 'send text lines or JSON like {"level": "error", "msg": "disk full"}'
_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_HEAD = re.compile(
    r"(?:<(?P<pri>\d{1,3})>(?:1 )?)?"
    r"(?:(?P<iso>\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(?:[.,]\d{1,9})?(?:[Zz]|[+-]\d\d:?\d\d)?)"
    r"|(?P<mon>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) (?P<day>[ \d]\d) "
    r"(?P<hms>\d\d:\d\d:\d\d))?\s*"
)
_LIST_START = re.compile(r'\[\s*($|[\[{\]"\d-])')
_WORD = re.compile(r"\[?([A-Za-z]{3,13})\]?:?(?:\s+|$)")
_MONTH = timedelta(days=31)
_MIN_TS = datetime.fromtimestamp(MIN_TS_MS / 1000, UTC)
_MAX_TS = datetime.fromtimestamp(MAX_TS_MS / 1000, UTC)


class _Bad(Exception):
    """One line (or list item) is bad: the reason, without the ``logs:`` prefix."""


def decode_logs(msg: RawMessage) -> list[LogLine | DeadLetter] | DeadLetter:
    """Decode one logs message: its lines in order (bad ones as dead letters), or one dead letter.

    The list holds at least one :class:`LogLine`; a message without any is a
    single dead letter. Never raises for bad input.
    """
    payload = msg.payload
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None:
        text = text.removeprefix("\ufeff")
        start = text.lstrip()[:1]
        if not start:
            return _dead(msg, "payload is empty; " + _SHAPE_HINT, payload)
        if start in "[{":
            doc, error = _whole_json(text)
            if type(doc) is list:
                return _finish(msg, _items(msg, doc))
            if type(doc) is dict:
                return _finish(msg, _items(msg, [doc], single=True))
            if error is not None and _json_meant(text):
                return _dead(msg, f"not valid JSON ({error}); {_SHAPE_HINT}", payload)
    return _finish(msg, _lines(msg, payload, text))


def _whole_json(text: str) -> tuple[Any, str | None]:
    """``text`` as one JSON document, or None and why it is not one (it may be JSON lines)."""
    try:
        return _DECODER.decode(text), None
    except RecursionError:
        return None, "nested too deeply"
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError:
        return None, "a number has too many digits to convert"


def _json_meant(text: str) -> bool:
    """Whether ``text``, not one JSON document, was meant to be one (not text or JSON lines).

    ``[`` then ``{``, ``[``, ``]``, a string or a number starts a JSON list
    (``[INFO] started`` is a text line); a first line that is not a JSON
    object by itself starts a pretty-printed object (JSON lines are).
    """
    first = text.lstrip().split("\n", 1)[0].strip()
    if first[0] == "[":
        return _LIST_START.match(first) is not None
    try:
        return type(_DECODER.decode(first)) is not dict
    except (ValueError, RecursionError):
        return True


def _finish(
    msg: RawMessage, out: list[LogLine | DeadLetter]
) -> list[LogLine | DeadLetter] | DeadLetter:
    """``out``, or one dead letter of the whole message when no line in it is good."""
    for item in out:
        if type(item) is LogLine:
            return out
    first = out[0]
    assert type(first) is DeadLetter
    reason = first.reason.removeprefix(_PREFIX)
    if len(out) > 1:
        reason = f"no good line among {len(out)}; first: {reason}"
    return _dead(msg, reason, msg.payload)


def _items(
    msg: RawMessage, items: list[Any], *, single: bool = False
) -> list[LogLine | DeadLetter]:
    out: list[LogLine | DeadLetter] = []
    if not items:
        return [_dead(msg, "the JSON list is empty; " + _SHAPE_HINT, msg.payload)]
    for index, item in enumerate(items[:MAX_LINES]):
        try:
            if type(item) is not dict:
                raise _Bad(f"is {_kind(item)}, not an object; " + _SHAPE_HINT)
            out.append(_from_object(msg, item))
        except _Bad as exc:
            if single:
                out.append(_dead(msg, str(exc), msg.payload))
                continue
            encoded = json_text(item)
            body = encoded.encode() if encoded is not None else msg.payload
            out.append(_dead(msg, f"list index {index}: {exc}", body))
    if len(items) > MAX_LINES:
        rest = json.dumps(items[MAX_LINES:], ensure_ascii=False, default=str).encode(
            "utf-8", "replace"
        )
        reason = (
            f"the list has {len(items)} items, more than {MAX_LINES}; items from index "
            f"{MAX_LINES} on are kept here unprocessed; hint: send fewer lines per message"
        )
        out.append(_dead(msg, reason, rest))
    return out


def _lines(msg: RawMessage, payload: bytes, text: str | None) -> list[LogLine | DeadLetter]:
    """Each line of ``payload`` decoded (``text`` is it as UTF-8, or None when it is not)."""
    raw: list[str] | list[bytes] = text.split("\n") if text is not None else payload.split(b"\n")
    out: list[LogLine | DeadLetter] = []
    taken = 0
    for number, line in enumerate(raw, 1):
        if type(line) is bytes:
            try:
                line = line.decode()
            except UnicodeDecodeError as exc:
                reason = (
                    f"line {number}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                    f"{exc.start}); send text encoded as UTF-8"
                )
                out.append(_dead(msg, reason, line))  # type: ignore[arg-type]
                taken += 1
                continue
        line = line.strip()  # type: ignore[union-attr]
        if not line:
            continue
        if taken == MAX_LINES:
            rest = b"\n".join(
                x if type(x) is bytes else x.encode("utf-8", "surrogatepass")  # type: ignore[union-attr]
                for x in raw[number - 1 :]
            )
            reason = (
                f"the message has more than {MAX_LINES} lines; lines from line {number} on are "
                "kept here unprocessed; hint: send fewer lines per message"
            )
            out.append(_dead(msg, reason, rest))
            break
        taken += 1
        try:
            if len(line) > MAX_LINE_CHARS:
                raise _Bad(
                    f"is {len(line)} characters long, more than {MAX_LINE_CHARS}; "
                    "split long messages"
                )
            if line[0] == "{":
                out.append(_json_line(msg, line))
            else:
                out.append(_text_line(msg, line))
        except _Bad as exc:
            out.append(_dead(msg, f"line {number}: {exc}", line.encode("utf-8", "surrogatepass")))
    return out  # not empty: the payload holds a non-blank line, or one that is not UTF-8


def _json_line(msg: RawMessage, line: str) -> LogLine:
    try:
        doc = _DECODER.decode(line)
    except RecursionError:
        raise _Bad("JSON is nested too deeply; " + _SHAPE_HINT) from None
    except json.JSONDecodeError as exc:
        raise _Bad(f"not valid JSON ({exc.msg} at column {exc.colno}); {_SHAPE_HINT}") from None
    except ValueError:
        raise _Bad("a JSON number has too many digits to convert; send it as a string") from None
    if type(doc) is not dict:  # pragma: no cover - a line starting with { decodes to an object
        raise _Bad(f"is {_kind(doc)}, not an object; " + _SHAPE_HINT)
    return _from_object(msg, doc)


def _from_object(msg: RawMessage, obj: dict[str, Any]) -> LogLine:
    name = "msg" if "msg" in obj else "message"
    text = obj.get(name)
    if text is None:
        if name in obj:
            raise _Bad(f'"{name}" is null; send the message as a string')
        raise _Bad('the JSON object has no "msg"; ' + _SHAPE_HINT)
    if type(text) is not str:
        raise _Bad(f'"{name}" is {_kind(text)}; send the message as a string')
    if not text.isascii() and _has_surrogate(text):
        raise _Bad(f'"{name}" contains an unpaired surrogate; send valid Unicode')
    level = "info"
    if "level" in obj:
        raw = obj["level"]
        if type(raw) is not str:
            raise _Bad(f'"level" is {_kind(raw)}; ' + _LEVEL_HINT)
        found = ALIASES.get(raw.lower())
        if found is None:
            raise _Bad(f'"level" {_quote(raw)} is not a log level; ' + _LEVEL_HINT)
        level = found
    ts = msg.received_at
    if "ts" in obj:
        ts = _json_ts(obj["ts"])
    rest = {k: v for k, v in obj.items() if k not in ("ts", "level", name)}
    fields = None
    if rest:
        fields = json_text(rest)
        if fields is None:
            raise _Bad("a field holds NaN, Infinity or an unpaired surrogate; send standard JSON")
    size = len(text) + (len(fields) if fields is not None else 0)
    if size > MAX_LINE_CHARS:
        raise _Bad(
            f"message and fields are {size} characters long, more than {MAX_LINE_CHARS}; "
            "split long messages"
        )
    return LogLine(msg.device, msg.transport, ts, level, text, fields)


def _json_ts(raw: object) -> datetime:
    if type(raw) is str:
        ts = _iso(raw)
        if ts is None:
            raise _Bad(
                f'"ts" {_quote(raw)} is not an RFC 3339 time; send Unix milliseconds or '
                '"2025-11-22T08:26:40Z"'
            )
        return ts
    try:
        return _timestamp(raw, None)
    except _Reject as exc:
        raise _Bad(exc.reason) from None


def _iso(text: str) -> datetime | None:
    """An RFC 3339 time as aware UTC (UTC when it has no offset), or None when it is not one.

    A time outside 2000-01-01..2100-01-01 is refused here, as in ``ts`` milliseconds.
    """
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    try:
        ts = ts.astimezone(UTC)
    except OverflowError:
        return None
    if not _MIN_TS <= ts < _MAX_TS:
        raise _Bad(f"time {_quote(text)} is outside 2000-01-01..2100-01-01; fix the clock")
    return ts


def _text_line(msg: RawMessage, line: str) -> LogLine:
    head = _HEAD.match(line)
    assert head is not None  # every group is optional
    level = "info"
    pri = head["pri"]
    if pri is not None:
        value = int(pri)
        if value > 191:
            raise _Bad(f"syslog priority <{pri}> is over 191; send <facility * 8 + severity>")
        level = _SYSLOG[value & 7]
    ts = msg.received_at
    if head["iso"] is not None:
        found = _iso(head["iso"].replace(",", "."))
        if found is None:
            raise _Bad(f"timestamp {head['iso']!r} is not a valid date and time; fix the clock")
        ts = found
    elif head["mon"] is not None:
        ts = _bsd(head["mon"], head["day"], head["hms"], msg.received_at)
    rest = line[head.end() :]
    word = _WORD.match(rest)
    if word is not None:
        found_level = ALIASES.get(word[1].lower())
        if found_level is not None:
            level = found_level
            rest = rest[word.end() :]
    return LogLine(msg.device, msg.transport, ts, level, rest, None)


def _bsd(month: str, day: str, hms: str, received_at: datetime) -> datetime:
    """An RFC 3164 time (no year: the receive time's, or the year before if a month ahead)."""
    hour, minute, second = (int(x) for x in hms.split(":"))
    year = received_at.year
    for candidate in (year, year - 1):
        try:
            ts = datetime(candidate, _MONTHS[month], int(day), hour, minute, second, tzinfo=UTC)
        except ValueError:
            continue
        if ts <= received_at + _MONTH:
            return ts
    raise _Bad(f"timestamp '{month} {day} {hms}' is not a valid date and time; fix the clock")


def logs_payload(line: LogLine) -> bytes:
    """A log line re-encoded as the device API's JSON object (for dead letters)."""
    doc: dict[str, Any] = {"ts": int(line.ts.timestamp() * 1000), "level": line.level}
    doc["msg"] = line.msg
    if line.fields is not None:
        doc.update(json.loads(line.fields))
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _dead(msg: RawMessage, reason: str, payload: bytes) -> DeadLetter:
    reason = _PREFIX + " ".join(reason.splitlines())
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 1] + "…"
    return DeadLetter(msg.device, msg.transport, msg.received_at, reason, payload)
