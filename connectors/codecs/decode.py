"""Decode once: turn raw device bytes into typed records or a dead letter."""

from __future__ import annotations

from connectors.codecs.attributes_json import ATTRIBUTES, Attribute, decode_attributes
from connectors.codecs.evb1 import decode_vibration
from connectors.codecs.logs import decode_logs
from connectors.codecs.telemetry_json import decode_telemetry
from operators.records import (
    LOGS,
    TELEMETRY,
    VIBRATION,
    DeadLetter,
    LogLine,
    RawMessage,
    Reading,
    VibrationBlock,
)

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "REFUSED_PREFIX", "decode", "refused_channel"]

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
REFUSED_PREFIX = "refused: "
"""Channel of a message a transport refused but kept (a gateway speaking for a device it
may not): the rest of the channel is the reason, and the message decodes to a dead letter."""


def refused_channel(reason: str) -> str:
    """The journal channel that makes a kept message a dead letter with ``reason``."""
    return REFUSED_PREFIX + reason


def decode(
    msg: RawMessage, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> list[Reading] | list[Attribute] | list[LogLine | DeadLetter] | VibrationBlock | DeadLetter:
    """Decode one message by its channel; never raises for bad device input.

    A logs message gives its lines, the bad ones as dead letters among them
    (see :mod:`connectors.codecs.logs`).

    An oversized payload becomes a dead letter that keeps the first
    ``max_payload_bytes`` bytes, so the record itself stays bounded.
    """
    size = len(msg.payload)
    if size > max_payload_bytes:
        reason = (
            f"{msg.channel}: payload of {size} bytes is over the {max_payload_bytes}-byte limit; "
            "split it or raise max_payload_bytes (first bytes kept)"
        )
        return _dead(msg, reason, msg.payload[:max_payload_bytes])
    if msg.channel == TELEMETRY:
        return decode_telemetry(msg)
    if msg.channel.startswith(REFUSED_PREFIX):
        return _dead(msg, msg.channel.removeprefix(REFUSED_PREFIX), msg.payload)
    if msg.channel == VIBRATION:
        return decode_vibration(msg)
    if msg.channel == ATTRIBUTES:
        return decode_attributes(msg)
    if msg.channel == LOGS:
        return decode_logs(msg)
    reason = (
        f"unknown channel {msg.channel!r}; expected {TELEMETRY!r}, {VIBRATION!r}, "
        f"{ATTRIBUTES!r} or {LOGS!r}"
    )
    return _dead(msg, reason, msg.payload)


def _dead(msg: RawMessage, reason: str, payload: bytes) -> DeadLetter:
    return DeadLetter(msg.device, msg.transport, msg.received_at, reason, payload)
