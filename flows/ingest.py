"""The ingest step every flow starts with: count, decode and key in one pass.

Readings are keyed by series (``device/key``), vibration blocks and dead
letters by device. A flow takes the record kinds it handles and turns the rest
into dead letters with :func:`as_dead_letter`, so nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter as Tally
from collections.abc import Callable
from datetime import UTC, datetime

from connectors.codecs.decode import decode
from connectors.codecs.evb1 import encode_evb1
from flows.accounting import RECEIVED, Meter
from operators.records import DeadLetter, RawMessage, Reading, VibrationBlock, series_key

__all__ = ["READINGS", "Decoded", "as_dead_letter", "decoder", "reading_payload"]

READINGS = "readings"

Decoded = Reading | VibrationBlock | DeadLetter


def decoder(
    max_payload_bytes: int, meter: Meter
) -> Callable[[list[RawMessage]], list[tuple[str, Decoded]]]:
    """A batch mapper for ``op.flat_map_batch`` that counts, decodes and keys messages."""

    def decode_batch(batch: list[RawMessage]) -> list[tuple[str, Decoded]]:
        received: Tally[str] = Tally()
        sizes: Tally[str] = Tally()
        readings: Tally[str] = Tally()
        out: list[tuple[str, Decoded]] = []
        for msg in batch:
            device = msg.device
            received[device] += 1
            sizes[device] += len(msg.payload)
            result = msg.decoded
            if result is None:
                result = decode(msg, max_payload_bytes=max_payload_bytes)
            if type(result) is list:
                readings[device] += len(result)
                out.extend((series_key(device, r.key), r) for r in result)
            else:
                out.append((device, result))  # type: ignore[arg-type]
        meter.add(RECEIVED, received, sizes)
        if readings:
            meter.add(READINGS, readings)
        return out

    return decode_batch


def as_dead_letter(item: Decoded, flow: str) -> DeadLetter:
    """A dead letter for a record this flow does not handle (a dead letter stays as it is)."""
    if isinstance(item, DeadLetter):
        return item
    if isinstance(item, VibrationBlock):
        payload = encode_evb1(
            item.samples, sample_rate_hz=item.sample_rate_hz, start_ts=item.start_ts
        )
        reason = f"vibration block sent to flows.{flow}, which does not process vibration"
        return DeadLetter(item.device, item.transport, datetime.now(UTC), reason, payload)
    reason = (
        f"telemetry reading {item.key!r} sent to flows.{flow}, which does not process telemetry"
    )
    return DeadLetter(item.device, item.transport, datetime.now(UTC), reason, reading_payload(item))


def reading_payload(reading: Reading) -> bytes:
    """A reading re-encoded in the device API's JSON shape (for dead letters)."""
    ts_ms = int(reading.ts.timestamp() * 1000)
    return json.dumps({"ts": ts_ms, "values": {reading.key: reading.value}}).encode()
