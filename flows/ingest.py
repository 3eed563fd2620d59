"""The decode step every flow starts with: count, decode, limit and key.

Readings are keyed by series (``device/key``), vibration blocks, client
attributes and log lines by device, dead letters by the name of the flow part
that reports them. Messages of a channel the flow does not take become dead
letters, so nothing is dropped silently. The ``limits`` of the configuration
are applied here, before any operator keeps state: too many keys in one
message, too many series for one device or the edge, and series idle too long
(see :func:`series_limits`).
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.operators import KeyedStream, StatefulBatchLogic

from connectors.codecs.attributes_json import ATTRIBUTES, Attribute, attributes_payload
from connectors.codecs.decode import REFUSED_PREFIX, decode
from connectors.codecs.evb1 import encode_evb1
from connectors.codecs.logs import logs_payload
from connectors.codecs.telemetry_json import decode_telemetry
from flows.accounting import RECEIVED, Meter
from operators.records import (
    LOGS,
    TELEMETRY,
    VIBRATION,
    DeadLetter,
    Evict,
    LogLine,
    RawMessage,
    Reading,
    VibrationBlock,
)

__all__ = [
    "CHANNELS",
    "EVICTED",
    "READINGS",
    "REFUSED",
    "Decoded",
    "Message",
    "SeriesLimits",
    "decoder",
    "reading_payload",
    "readings_payload",
    "series_limits",
    "to_dead_letter",
]

READINGS = "readings"
REFUSED = "refused_"
"""Prefix of the stages counting what a limit refused: ``refused_keys_per_message`` (messages),
``refused_series_per_device``, ``refused_state_bytes_per_device``, ``refused_series_total``
(readings)."""
EVICTED = "evicted_series"
"""Stage counting series forgotten after ``limits.series_idle_evict`` of silence."""
CHANNELS = (TELEMETRY, VIBRATION, ATTRIBUTES, LOGS)
"""The device API's channels."""

Decoded = Reading | VibrationBlock | Attribute | LogLine | DeadLetter


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
    keys_per_message: int | None = None,
) -> Callable[[list[RawMessage]], list[tuple[str, object]]]:
    """A batch mapper for ``op.flat_map_batch`` that counts and decodes messages.

    ``owner_of(channel)`` picks the part whose report counts that channel's
    messages and whose ``dead_letters`` get its undecodable ones. Out come
    ``(device, Message)`` for telemetry (its readings, for :func:`series_limits`;
    nothing for an empty ``{}``), ``(device, block)`` for vibration,
    ``(device, attribute)`` for each client attribute, ``(device, line)`` for each log
    line and ``(part name, dead letter)``. A
    telemetry or attributes message with more than ``keys_per_message`` distinct
    keys is a dead letter whole, counted in the stage ``refused_keys_per_message``.
    """
    wanted = frozenset(channels)

    def decode_batch(batch: list[RawMessage]) -> list[tuple[str, object]]:
        received: dict[str, tuple[Tally[str], Tally[str], Tally[str], Tally[str]]] = {}
        owners: dict[str, Owner] = {}
        out: list[tuple[str, object]] = []
        for msg in batch:
            channel = msg.channel
            owner = owners.get(channel)
            if owner is None:
                owner = owners[channel] = owner_of(channel)
                received.setdefault(owner.name, (Tally(), Tally(), Tally(), Tally()))
            counts, sizes, readings, refused = received[owner.name]
            device = msg.device
            counts[device] += 1
            sizes[device] += len(msg.payload)
            if channel not in wanted and not channel.startswith(REFUSED_PREFIX):
                out.append((owner.name, _unwanted(msg, flow)))
                continue
            result = msg.decoded
            if result is None:
                if channel == TELEMETRY and len(msg.payload) <= max_payload_bytes:
                    result = decode_telemetry(msg)  # what decode() does, one call less
                else:
                    result = decode(msg, max_payload_bytes=max_payload_bytes)
            if channel == LOGS and type(result) is list:  # lines, and dead letters of bad ones
                out.extend(
                    (device, x) if type(x) is LogLine else (owner.name, x)
                    for x in result  # type: ignore[union-attr]
                )
                continue
            if type(result) is list:
                if not result:  # {}: a valid message with nothing in it
                    continue
                if keys_per_message is not None and len(result) > keys_per_message:
                    keys = len({r.key for r in result})
                    if keys > keys_per_message:
                        refused[device] += 1
                        out.append((owner.name, _too_many_keys(msg, keys, keys_per_message)))
                        continue
                if channel == ATTRIBUTES:
                    out.extend((device, attribute) for attribute in result)
                    continue
                readings[device] += len(result)
                out.append((device, Message(msg.received_at, result)))
            elif type(result) is VibrationBlock:
                out.append((device, result))
            else:
                out.append((owner.name, result))
        for owner in {id(o): o for o in owners.values()}.values():
            counts, sizes, readings, refused = received[owner.name]
            owner.meter.add(RECEIVED, counts, sizes)
            if readings:
                owner.meter.add(READINGS, readings)
            if refused:
                owner.meter.add(REFUSED + "keys_per_message", refused)
        return out

    return decode_batch


def _too_many_keys(msg: RawMessage, keys: int, limit: int) -> DeadLetter:
    reason = (
        f"limits.keys_per_message: {_a(msg.channel)} message of device {msg.device!r} has {keys} "
        f"distinct keys, more than the limit of {limit}; nothing of it was processed; hint: "
        "send fewer keys per message or raise limits.keys_per_message"
    )
    return DeadLetter(msg.device, msg.transport, msg.received_at, reason, msg.payload)


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a telemetry", "an attributes"."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


@dataclass(frozen=True, slots=True)
class Message:
    """The readings of one decoded telemetry message and when the edge received it."""

    received_at: datetime
    readings: list[Reading]


SERIES_BYTES = 4096
"""Memory one series costs the standard telemetry flow, besides its key: the deadband and
window operators' per-key state and Bytewax's bookkeeping of it, this step's entry, and
the allocator's overhead (measured: about 3.7 KiB of flow-process RSS per series)."""

SeriesState = tuple[datetime, dict[str, datetime]]
"""Snapshot of one device's series: ``(newest received_at, {series key: received_at of
its last message})``, the series in the order they were last sent."""


@dataclass(frozen=True)
class SeriesLimits:
    """The per-device and per-worker series limits of :func:`series_limits`."""

    series_per_device: int
    state_bytes_per_device: int
    series_total: int
    idle_evict: timedelta | None


TRIM_AFTER = 1000
"""Evicted series after which the freed heap is handed back to the OS."""
TRIM_DELAY_S = 1.0
"""How long after such an eviction: the operators downstream drop the series' state first."""


def _malloc_trim() -> Callable[[], object] | None:
    """The C library's ``malloc_trim`` (glibc), or None where there is none."""
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


class _Total:
    """Series held by every device of one worker (shared by its devices' logics).

    After a large eviction it trims the C heap once, a moment later: glibc
    keeps freed memory for reuse, so without it the process's RSS would not
    come down after the state of evicted series is dropped.
    """

    __slots__ = ("evicted", "series", "timer", "trim")

    def __init__(self) -> None:
        self.series = 0
        self.evicted = 0
        self.trim = _malloc_trim()
        self.timer: threading.Timer | None = None

    def note_evicted(self, count: int) -> None:
        """Count ``count`` evicted series; trim the heap soon once enough were."""
        self.evicted += count
        if self.evicted < TRIM_AFTER or self.trim is None:
            return
        timer = self.timer
        if timer is not None and timer.is_alive():
            return
        self.evicted = 0
        self.timer = threading.Timer(TRIM_DELAY_S, self.trim, args=(0,))
        self.timer.daemon = True
        self.timer.start()


class _DeviceSeries(StatefulBatchLogic[Message, list[tuple[str, object]], SeriesState]):
    """One device's series: admitted in message order, evicted when idle.

    Time is the device's own receive time (``received_at``, stored in the
    journal), so a replay admits, refuses and evicts exactly the same.
    """

    __slots__ = ("bytes", "clock", "limits", "owner", "series", "total")

    def __init__(
        self,
        limits: SeriesLimits,
        total: _Total,
        owner: Callable[[], Owner],
        resume_state: SeriesState | None,
    ) -> None:
        self.limits = limits
        self.total = total
        self.owner = owner
        self.clock: datetime | None = None
        self.series: dict[str, datetime] = {}
        self.bytes = 0
        if resume_state is not None:
            self.clock, series = resume_state
            self.series = dict(series)
            self.bytes = sum(SERIES_BYTES + len(k) for k in self.series)
            total.series += len(self.series)

    def on_batch(self, values: list[Message]) -> tuple[list[list[tuple[str, object]]], bool]:
        out: list[tuple[str, object]] = []
        refused: Tally[str] = Tally()
        evicted = 0
        limits = self.limits
        idle = limits.idle_evict
        series = self.series
        total = self.total
        device = ""
        for message in values:
            received_at = message.received_at
            readings = message.readings
            device = readings[0].device
            clock = self.clock
            if clock is None or received_at > clock:
                self.clock = clock = received_at
            if idle is not None and series:
                cutoff = clock - idle
                idle_keys = []
                for key, seen in series.items():  # oldest first: stop at the first recent one
                    if seen > cutoff:
                        break
                    idle_keys.append(key)
                for key in idle_keys:
                    del series[key]
                    self.bytes -= SERIES_BYTES + len(key)
                    out.append((key, Evict(device, key[len(device) + 1 :])))
                total.series -= len(idle_keys)
                evicted += len(idle_keys)
            prefix = device + "/"
            over: dict[str, list[Reading]] = {}
            for reading in readings:
                key = prefix + reading.key
                seen = series.get(key)
                if seen is not None:
                    if seen is not received_at:  # to the end: series stay in the order last sent
                        del series[key]
                        series[key] = received_at
                    out.append((key, reading))
                    continue
                reason = self._refusal(key)
                if reason is None:
                    series[key] = received_at
                    self.bytes += SERIES_BYTES + len(key)
                    total.series += 1
                    out.append((key, reading))
                else:
                    over.setdefault(reason, []).append(reading)
            for limit, refused_readings in over.items():
                refused[limit] += len(refused_readings)
                letter = self._letter(limit, refused_readings, received_at)
                out.append((self.owner().name, letter))
        if refused or evicted:
            meter = self.owner().meter
            for limit, n in refused.items():
                meter.add(REFUSED + limit, {device: n})
            if evicted:
                meter.add(EVICTED, {device: evicted})
                total.note_evicted(evicted)
        return [out], (StatefulBatchLogic.DISCARD if not series else StatefulBatchLogic.RETAIN)

    def _refusal(self, key: str) -> str | None:
        """The limit a new series ``key`` would break, or None."""
        limits = self.limits
        if len(self.series) >= limits.series_per_device:
            return "series_per_device"
        if self.bytes + SERIES_BYTES + len(key) > limits.state_bytes_per_device:
            return "state_bytes_per_device"
        if self.total.series >= limits.series_total:
            return "series_total"
        return None

    def _letter(self, limit: str, readings: list[Reading], received_at: datetime) -> DeadLetter:
        first = readings[0]
        keys = list(dict.fromkeys(r.key for r in readings))
        limits = self.limits
        held = {
            "series_per_device": f"has {len(self.series)} series, the limit",
            "state_bytes_per_device": (
                f"holds about {self.bytes} bytes of state for {len(self.series)} series, "
                f"and the limit is {limits.state_bytes_per_device}"
            ),
            "series_total": f"is on an edge holding {self.total.series} series, the limit",
        }[limit]
        reason = (
            f"limits.{limit}: device {first.device!r} {held}; {len(readings)} readings of "
            f"{len(keys)} new keys refused (first {_short(keys[0])}); hint: send fewer distinct "
            f"keys, or raise limits.{limit}"
        )
        return DeadLetter(
            first.device, first.transport, received_at, reason, readings_payload(readings)
        )

    def snapshot(self) -> SeriesState:
        assert self.clock is not None
        return (self.clock, dict(self.series))


def _short(key: str) -> str:
    """``key`` quoted, cut to 40 characters (a key may have up to 256)."""
    return repr(key) if len(key) <= 40 else f"{key[:40]!r}..."


def series_limits(
    step_id: str,
    up: KeyedStream[Message],
    limits: SeriesLimits,
    owner: Callable[[], Owner],
) -> Stream[tuple[str, object]]:
    """Admit, refuse and evict each device's series; readings and evictions keyed by series.

    A new key of a device is admitted while the device has fewer than
    ``series_per_device`` series, their estimated state stays within
    ``state_bytes_per_device`` and the worker holds fewer than
    ``series_total``; otherwise its readings in that message become one dead
    letter per limit (payload: those readings as telemetry JSON) and are
    counted in the stage ``refused_<limit>``. A series its device has not sent
    for ``idle_evict`` of the device's receive time is evicted before the
    device's next message: an :class:`~operators.records.Evict` goes down its
    key (operators drop its state) and the stage ``evicted_series`` counts it.
    """
    # Bytewax runs each worker in its own OS thread (threading.local does not last
    # between its calls into Python, the thread's ident does).
    totals: dict[int, _Total] = {}

    def build(resume_state: SeriesState | None) -> _DeviceSeries:
        total = totals.get(threading.get_ident())
        if total is None:
            total = totals.setdefault(threading.get_ident(), _Total())
        return _DeviceSeries(limits, total, owner, resume_state)

    held = op.stateful_batch(f"{step_id}_series", up, build)
    return op.flat_map_batch(
        f"{step_id}_by_series", held, lambda batch: [x for _, items in batch for x in items]
    )


def _unwanted(msg: RawMessage, flow: str) -> DeadLetter:
    reason = (
        f"{msg.channel} message sent to flow {flow!r}, which does not take the "
        f"{msg.channel} channel"
    )
    return DeadLetter(msg.device, msg.transport, msg.received_at, reason, msg.payload)


def to_dead_letter(item: Decoded, reason: str) -> DeadLetter:
    """``item`` as a dead letter with ``reason`` (a dead letter stays as it is).

    The payload is the record in its device API shape (JSON for a reading, an
    attribute or a log line, EVB1 for a vibration block), so it can be sent
    again. Its ``received_at`` is the record's own timestamp, so a replay
    gives the same dead letter.
    """
    if isinstance(item, DeadLetter):
        return item
    if isinstance(item, Attribute):
        payload = attributes_payload([item])
        return DeadLetter(item.device, item.source, item.updated_at, reason, payload)
    if isinstance(item, LogLine):
        return DeadLetter(item.device, item.transport, item.ts, reason, logs_payload(item))
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


def readings_payload(readings: list[Reading]) -> bytes:
    """Readings re-encoded as one telemetry JSON list, one object per timestamp."""
    by_ts: dict[datetime, dict[str, float | str]] = {}
    for reading in readings:
        by_ts.setdefault(reading.ts, {})[reading.key] = reading.value
    doc = [{"ts": int(ts.timestamp() * 1000), "values": values} for ts, values in by_ts.items()]
    return json.dumps(doc).encode()
