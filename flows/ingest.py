"""The decode step every flow starts with: count, decode and key in one pass.

Readings are keyed by series (``device/key``), vibration blocks by device,
dead letters by the name of the flow part that reports them. Messages of a
channel the flow does not take become dead letters, so nothing is dropped
silently.
"""

from __future__ import annotations

import json
from collections import Counter as Tally
from collections.abc import Callable
from typing import Protocol

from connectors.codecs.decode import decode
from connectors.codecs.evb1 import encode_evb1
from connectors.codecs.telemetry_json import decode_telemetry
from flows.accounting import RECEIVED, Meter
from operators.records import (
    TELEMETRY,
    VIBRATION,
    DeadLetter,
    RawMessage,
    Reading,
    VibrationBlock,
)

__all__ = ["CHANNELS", "READINGS", "Decoded", "decoder", "reading_payload", "to_dead_letter"]

READINGS = "readings"
CHANNELS = (TELEMETRY, VIBRATION)
"""The device API's channels."""

Decoded = Reading | VibrationBlock | DeadLetter


class Owner(Protocol):
    """The part of a flow that counts a channel's messages: a name and a meter."""

    name: str
    meter: Meter


def decoder(
    max_payload_bytes: int,
    *,
    channels: tuple[str, ...],
    flow: str,
    owner_of: Callable[[str], Owner],
) -> Callable[[list[RawMessage]], list[tuple[str, Decoded]]]:
    """A batch mapper for ``op.flat_map_batch`` that counts, decodes and keys messages.

    ``owner_of(channel)`` picks the part whose report counts that channel's
    messages and whose ``dead_letters`` get its undecodable ones.
    """
    wanted = frozenset(channels)

    def decode_batch(batch: list[RawMessage]) -> list[tuple[str, Decoded]]:
        received: dict[str, tuple[Tally[str], Tally[str], Tally[str]]] = {}
        owners: dict[str, Owner] = {}
        out: list[tuple[str, Decoded]] = []
        for msg in batch:
            channel = msg.channel
            owner = owners.get(channel)
            if owner is None:
                owner = owners[channel] = owner_of(channel)
                received.setdefault(owner.name, (Tally(), Tally(), Tally()))
            counts, sizes, readings = received[owner.name]
            device = msg.device
            counts[device] += 1
            sizes[device] += len(msg.payload)
            if channel not in wanted:
                out.append((owner.name, _unwanted(msg, flow)))
                continue
            result = msg.decoded
            if result is None:
                if channel == TELEMETRY and len(msg.payload) <= max_payload_bytes:
                    result = decode_telemetry(msg)  # what decode() does, one call less
                else:
                    result = decode(msg, max_payload_bytes=max_payload_bytes)
            if type(result) is list:
                readings[device] += len(result)
                prefix = device + "/"  # series_key(device, key), built once per message
                out += [(prefix + r.key, r) for r in result]
            elif type(result) is VibrationBlock:
                out.append((device, result))
            else:
                out.append((owner.name, result))  # type: ignore[arg-type]
        for owner in {id(o): o for o in owners.values()}.values():
            counts, sizes, readings = received[owner.name]
            owner.meter.add(RECEIVED, counts, sizes)
            if readings:
                owner.meter.add(READINGS, readings)
        return out

    return decode_batch


def _unwanted(msg: RawMessage, flow: str) -> DeadLetter:
    reason = (
        f"{msg.channel} message sent to flow {flow!r}, which does not take the "
        f"{msg.channel} channel"
    )
    return DeadLetter(msg.device, msg.transport, msg.received_at, reason, msg.payload)


def to_dead_letter(item: Decoded, reason: str) -> DeadLetter:
    """``item`` as a dead letter with ``reason`` (a dead letter stays as it is).

    The payload is the record in its device API shape (JSON for a reading,
    EVB1 for a vibration block), so it can be sent again. Its ``received_at``
    is the record's own timestamp, so a replay gives the same dead letter.
    """
    if isinstance(item, DeadLetter):
        return item
    if isinstance(item, VibrationBlock):
        payload = encode_evb1(
            item.samples, sample_rate_hz=item.sample_rate_hz, start_ts=item.start_ts
        )
        return DeadLetter(item.device, item.transport, item.start_ts, reason, payload)
    return DeadLetter(item.device, item.transport, item.ts, reason, reading_payload(item))


def reading_payload(reading: Reading) -> bytes:
    """A reading re-encoded in the device API's JSON shape (for dead letters)."""
    ts_ms = int(reading.ts.timestamp() * 1000)
    return json.dumps({"ts": ts_ms, "values": {reading.key: reading.value}}).encode()
