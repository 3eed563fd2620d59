"""Decode ThingsBoard-shaped telemetry JSON into :class:`Reading` records.

A telemetry payload is UTF-8 JSON in one of three shapes::

    {"temperature": 21.5, "door": true, "log": "ok"}
    {"ts": 1763800000000, "values": {"temperature": 21.5}}
    [{"temperature": 21.5}, {"ts": 1763800000000, "values": {"rpm": 1480}}]

``ts`` is Unix milliseconds, UTC. It must be an integer; an integral-valued
float such as ``1763800000000.0`` is accepted too (some encoders only have
doubles), a fractional one is not. A reading without ``ts`` gets the
message's ``received_at``.

Values: finite numbers become ``float``, booleans become ``1.0``/``0.0``,
strings are kept as ``str``, and JSON objects and arrays are kept as their
compact JSON text (a ``str``, like ThingsBoard's JSON values), so they land
with the strings. Anything else (``null``, ``NaN``/``Infinity`` tokens, also
inside an object or array, numbers that overflow a float, unpaired surrogates) makes the whole
message one :class:`DeadLetter` whose ``reason`` is a single line starting
with ``"telemetry: "``. A leading UTF-8 byte order mark is ignored. When a
JSON object repeats a key, the last value wins (as in :func:`json.loads`).

An empty object (``{}``, or ``{"ts": ..., "values": {}}``) is a valid message
with no readings: ThingsBoard's clients post ``{}`` to test the connection.

Decoding never raises for device input: every payload, however malformed or
deeply nested, yields either a ``list[Reading]`` (empty only for empty
objects) or a dead letter.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, NoReturn

from operators.records import DeadLetter, RawMessage, Reading

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_LIST_ITEMS",
    "MAX_TS_MS",
    "MIN_TS_MS",
    "decode_telemetry",
    "json_text",
]

MAX_KEY_LENGTH = 256
"""Longest accepted telemetry key, in characters."""

MAX_LIST_ITEMS = 10_000
"""Most objects accepted in one top-level JSON list."""

MIN_TS_MS = 946_684_800_000
"""Earliest accepted ``ts``: 2000-01-01T00:00:00Z in Unix milliseconds (inclusive)."""

MAX_TS_MS = 4_102_444_800_000
"""Latest accepted ``ts``: 2100-01-01T00:00:00Z in Unix milliseconds (exclusive)."""

_PREFIX = "telemetry: "
_MAX_REASON = 200
_MAX_QUOTE = 40
_VALUE_HINT = "send finite numbers, booleans, strings, objects or arrays"
_TS_HINT = "send Unix milliseconds as an integer, e.g. 1763800000000"
_SHAPE_HINT = 'send {"key": value}, {"ts": <Unix ms>, "values": {...}} or a list of those'


class _NonFinite:
    """Stand-in for a ``NaN``/``Infinity``/``-Infinity`` token, so the error can name its key."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token


_CONSTANTS = {token: _NonFinite(token) for token in ("NaN", "Infinity", "-Infinity")}
_DECODER = json.JSONDecoder(parse_constant=_CONSTANTS.__getitem__)
_SCAN = _DECODER.scan_once
"""The decoder's scanner: one call for a payload without surrounding whitespace."""

_new_reading = object.__new__
(
    _set_device,
    _set_key,
    _set_ts,
    _set_value,
    _set_transport,
) = (
    getattr(Reading, name).__set__  # the slot descriptors: faster than the frozen __init__
    for name in ("device", "key", "ts", "value", "transport")
)

_last_ts: tuple[int, datetime] = (0, datetime.fromtimestamp(0, UTC))
"""The last ``ts`` converted, ``(ms, datetime)``: devices of one fleet share timestamps."""


class _Reject(Exception):
    """Raised inside the decoder to turn the whole message into a dead letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_telemetry(msg: RawMessage) -> list[Reading] | DeadLetter:
    """Decode one telemetry message into readings, or a dead letter that says why not.

    Every :class:`Reading` carries ``msg.device`` and ``msg.transport``; readings
    come out in payload order. Never raises for bad input.
    """
    payload = msg.payload
    try:
        text = payload.decode()
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        return _dead(
            msg,
            f"payload is not UTF-8 (byte 0x{bad:02x} at offset {exc.start}); "
            "send JSON encoded as UTF-8",
        )
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        # The scanner alone, as json.loads calls it for a payload without whitespace around
        # it; anything else (errors included) goes the full way for its exact message.
        doc, end = _SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError):
        end = -1
    if end != len(text):
        doc = _full_decode(msg, text)
        if type(doc) is DeadLetter:
            return doc
    return _readings(doc, msg)


def _full_decode(msg: RawMessage, text: str) -> Any:
    """``text`` decoded by :func:`json.loads` rules, or the dead letter that says why not."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        return _dead(msg, "JSON is nested too deeply; " + _SHAPE_HINT)
    except json.JSONDecodeError as exc:
        if not text.strip():
            return _dead(msg, "payload is empty; " + _SHAPE_HINT)
        return _dead(
            msg,
            f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            'send UTF-8 JSON like {"temperature": 21.5}',
        )
    except ValueError:
        return _dead(msg, "a JSON number has too many digits to convert; " + _VALUE_HINT)


def _readings(doc: Any, msg: RawMessage) -> list[Reading] | DeadLetter:
    """The readings of a decoded document, or the dead letter that says why not."""
    out: list[Reading] = []
    try:
        kind = type(doc)
        if kind is dict:
            _collect(doc, msg, out, None)
        elif kind is list:
            count = len(doc)
            if count == 0:
                _reject(None, "the list is empty, so there are no readings; " + _SHAPE_HINT)
            if count > MAX_LIST_ITEMS:
                _reject(
                    None,
                    f"the list has {count} items, more than {MAX_LIST_ITEMS}; "
                    "split it into several messages",
                )
            for index, item in enumerate(doc):
                if type(item) is not dict:
                    _reject(index, f"item is {_kind(item)}, not an object; " + _SHAPE_HINT)
                _collect(item, msg, out, index)
        else:
            _reject(None, f"top-level JSON is {_kind(doc)}; " + _SHAPE_HINT)
    except _Reject as exc:
        return _dead(msg, exc.reason)
    return out


def _collect(obj: dict[str, Any], msg: RawMessage, out: list[Reading], index: int | None) -> None:
    """Append the readings of one JSON object (either shape) to ``out``."""
    if "ts" in obj:
        if "values" not in obj:
            _reject(index, "'ts' without 'values'; " + _SHAPE_HINT)
        if len(obj) > 2:
            extra = next(k for k in obj if k != "ts" and k != "values")
            _reject(
                index,
                f"unexpected key {_quote(extra)} next to 'ts' and 'values'; "
                "put every reading inside 'values'",
            )
        items = obj["values"]
        if type(items) is not dict:
            _reject(index, f"'values' is {_kind(items)}, not an object; " + _SHAPE_HINT)
        ts = _timestamp(obj["ts"], index)
    else:
        items = obj
        ts = msg.received_at
    device = msg.device
    transport = msg.transport
    append = out.append
    new = _new_reading
    for key, value in items.items():
        if (
            type(value) is float
            and value - value == 0.0
            and 0 < len(key) <= MAX_KEY_LENGTH
            and key.isascii()
        ):  # the common case: every check below passes
            reading = new(Reading)
            _set_device(reading, device)
            _set_key(reading, key)
            _set_ts(reading, ts)
            _set_value(reading, value)
            _set_transport(reading, transport)
            append(reading)
            continue
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            _bad_key(key, index)
        if not key.isascii() and _has_surrogate(key):
            _reject(index, f"key {_quote(key)} contains an unpaired surrogate; send valid Unicode")
        kind = type(value)
        if kind is float:
            if value - value != 0.0:
                _reject(
                    index,
                    f"value of {_quote(key)} overflows a 64-bit float; " + _VALUE_HINT,
                )
        elif kind is str:
            if not value.isascii() and _has_surrogate(value):
                _reject(
                    index,
                    f"value of {_quote(key)} contains an unpaired surrogate; send valid Unicode",
                )
        elif kind is int:
            try:
                value = float(value)
            except OverflowError:
                _reject(
                    index,
                    f"value of {_quote(key)} is an integer too large for a 64-bit float; "
                    + _VALUE_HINT,
                )
        elif kind is bool:
            value = 1.0 if value else 0.0
        elif kind is dict and key == "values" and items is obj:
            _reject(
                index,
                "'values' without 'ts'; add \"ts\" (Unix milliseconds) or send the keys "
                "at the top level",
            )
        elif kind is dict or kind is list:
            value = json_text(value)
            if value is None:
                _reject(
                    index,
                    f"value of {_quote(key)} holds NaN, Infinity or an unpaired surrogate; "
                    "send standard JSON",
                )
        else:
            _reject(index, f"value of {_quote(key)} is {_kind(value)}; " + _VALUE_HINT)
        append(Reading(device, key, ts, value, transport))


def _no_constant(value: object) -> NoReturn:
    raise TypeError(value)


def json_text(value: object) -> str | None:
    """``value`` (as this module decodes JSON) as compact JSON text, or None.

    None when it holds a ``NaN``/``Infinity`` token or an unpaired surrogate;
    ``null`` inside an object or array is kept.
    """
    try:
        text = json.dumps(
            value, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_no_constant
        )
    except (TypeError, ValueError, RecursionError):
        return None
    if not text.isascii() and _has_surrogate(text):
        return None
    return text


def _timestamp(raw: object, index: int | None) -> datetime:
    """Validate a ``ts`` field and return it as an aware UTC datetime."""
    kind = type(raw)
    if kind is int:
        ms: int = raw  # type: ignore[assignment]
    elif kind is float:
        f: float = raw  # type: ignore[assignment]
        if f - f != 0.0:
            _reject(index, "ts overflows a 64-bit float; " + _TS_HINT)
        if not f.is_integer():
            _reject(index, f"ts {f!r} is not a whole number of milliseconds; " + _TS_HINT)
        ms = int(f)
    elif kind is str:
        _reject(index, f"ts is a string ({_quote(raw)}); " + _TS_HINT)  # type: ignore[arg-type]
    else:
        _reject(index, f"ts is {_kind(raw)}; " + _TS_HINT)
    if not MIN_TS_MS <= ms < MAX_TS_MS:
        _reject(
            index,
            f"ts {_clip(str(ms))} is outside 2000-01-01..2100-01-01{_unit_hint(ms)}; "
            "send Unix milliseconds (UTC)",
        )
    global _last_ts
    last_ms, last = _last_ts
    if ms == last_ms:
        return last
    ts = datetime.fromtimestamp(ms / 1000, UTC)
    _last_ts = (ms, ts)
    return ts


def _unit_hint(ms: int) -> str:
    """Guess the unit of an out-of-range timestamp, for the error message."""
    for factor, unit in ((1e-3, "seconds"), (1e3, "microseconds"), (1e6, "nanoseconds")):
        if MIN_TS_MS * factor <= ms < MAX_TS_MS * factor:
            return f" (it looks like {unit})"
    return ""


def _bad_key(key: str, index: int | None) -> NoReturn:
    if not key:
        _reject(index, 'a key is empty; name every value, e.g. {"temperature": 21.5}')
    _reject(
        index,
        f"key {_quote(key)} is {len(key)} characters long, more than {MAX_KEY_LENGTH}; "
        "use shorter keys",
    )


def _has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (a JSON escape such as backslash-u-d800)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _kind(value: object) -> str:
    """Name a decoded JSON value's type the way a JSON author would."""
    if value is None:
        return "null"
    if isinstance(value, _NonFinite):
        return value.token
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 1] + "…"


def _quote(text: str) -> str:
    """``repr`` of a key or string, shortened; ``repr`` escapes line breaks."""
    return _clip(repr(text))


def _reject(index: int | None, what: str) -> NoReturn:
    if index is not None:
        what = f"list index {index}: {what}"
    raise _Reject(what)


def _dead(msg: RawMessage, reason: str) -> DeadLetter:
    reason = _PREFIX + " ".join(reason.splitlines())
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 1] + "…"
    return DeadLetter(msg.device, msg.transport, msg.received_at, reason, msg.payload)
