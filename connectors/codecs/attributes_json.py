"""Decode ThingsBoard client attributes into :class:`Attribute` records.

An attributes payload is one UTF-8 JSON object of key → value::

    {"firmware": "1.4.2", "interval_s": 30, "enabled": true, "location": {"lat": 52.1}}

Every value (string, number, boolean, object or array) is kept as its
compact JSON text, so the string ``1.4.2`` is stored as ``"1.4.2"`` (quotes
included) and the number 30 as ``30``: the type survives and SQL's
``json_extract`` reads it back. The attribute's ``updated_at`` is the
message's ``received_at``; ``source`` is its transport. ``{}`` is valid and holds no attributes.

Refused, the whole message becoming one :class:`DeadLetter` whose reason is
one line starting with ``"attributes: "``: bytes that are not UTF-8 JSON, a
top level that is not an object, an empty key or one over
:data:`~connectors.codecs.telemetry_json.MAX_KEY_LENGTH` characters,
``null`` values, ``NaN``/``Infinity`` tokens and unpaired surrogates.
Decoding never raises for device input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from connectors.codecs.telemetry_json import (
    _DECODER,
    MAX_KEY_LENGTH,
    _has_surrogate,
    _kind,
    _quote,
    json_text,
)
from operators.records import DeadLetter, RawMessage

__all__ = ["ATTRIBUTES", "Attribute", "attributes_payload", "decode_attributes"]

ATTRIBUTES = "attributes"
"""The device channel of client attributes (MQTT topic suffix, HTTP/CoAP path)."""

_PREFIX = "attributes: "
_MAX_REASON = 200
_SHAPE_HINT = 'send one JSON object of attributes like {"firmware": "1.4.2"}'


@dataclass(frozen=True, slots=True)
class Attribute:
    """One reported client attribute of a device: its value as JSON text, and when it came."""

    device: str
    key: str
    value: str
    updated_at: datetime
    source: str


def decode_attributes(msg: RawMessage) -> list[Attribute] | DeadLetter:
    """Decode one attributes message, in payload order, or a dead letter that says why not."""
    try:
        text = msg.payload.decode()
    except UnicodeDecodeError as exc:
        return _dead(
            msg,
            f"payload is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "send JSON encoded as UTF-8",
        )
    text = text.removeprefix("\ufeff")
    try:
        doc = _DECODER.decode(text)
    except RecursionError:
        return _dead(msg, "JSON is nested too deeply; " + _SHAPE_HINT)
    except json.JSONDecodeError as exc:
        if not text.strip():
            return _dead(msg, "payload is empty; " + _SHAPE_HINT)
        return _dead(
            msg,
            f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); {_SHAPE_HINT}",
        )
    except ValueError:
        return _dead(msg, "a JSON number has too many digits to convert; send it as a string")
    if type(doc) is not dict:
        return _dead(msg, f"top-level JSON is {_kind(doc)}; " + _SHAPE_HINT)
    out: list[Attribute] = []
    for key, value in doc.items():
        if not key:
            return _dead(msg, 'a key is empty; name every attribute, e.g. {"firmware": "1.4.2"}')
        if len(key) > MAX_KEY_LENGTH:
            return _dead(
                msg,
                f"key {_quote(key)} is {len(key)} characters long, more than {MAX_KEY_LENGTH}; "
                "use shorter keys",
            )
        if not key.isascii() and _has_surrogate(key):
            return _dead(
                msg, f"key {_quote(key)} contains an unpaired surrogate; send valid Unicode"
            )
        if value is None:
            return _dead(
                msg,
                f"value of {_quote(key)} is null; send a string, number, boolean, object or array",
            )
        encoded = json_text(value)
        if encoded is None:
            return _dead(
                msg,
                f"value of {_quote(key)} holds NaN, Infinity or an unpaired surrogate; "
                "send standard JSON",
            )
        out.append(Attribute(msg.device, key, encoded, msg.received_at, msg.transport))
    return out


def attributes_payload(attributes: list[Attribute]) -> bytes:
    """Attributes re-encoded as the device API's JSON object (for dead letters)."""
    body = ",".join(f"{json.dumps(a.key)}:{a.value}" for a in attributes)
    return ("{" + body + "}").encode()


def _dead(msg: RawMessage, reason: str) -> DeadLetter:
    reason = _PREFIX + " ".join(reason.splitlines())
    if len(reason) > _MAX_REASON:
        reason = reason[: _MAX_REASON - 1] + "…"
    return DeadLetter(msg.device, msg.transport, msg.received_at, reason, msg.payload)
