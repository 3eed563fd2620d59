"""The device input of a flow: decoded messages split by kind (:class:`Devices`).

:func:`decoded_devices` is what :meth:`flows.api.Edge.devices` builds after
its input (the ingest journal or a given source): decode, the ``limits``,
then one stream per kind of record. What cannot be decoded, and what a limit
refuses, comes back apart as ``(part name, dead letter)`` items.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.operators import KeyedStream

from connectors.codecs.attributes_json import Attribute
from flows.config import EdgeConfig
from flows.ingest import Decoded, Message, Owner, SeriesLimits, decoder, series_limits
from operators.records import (
    TELEMETRY,
    DeadLetter,
    Evict,
    LogLine,
    RawMessage,
    Reading,
    VibrationBlock,
)

__all__ = ["Devices", "decoded_devices", "unkeyed"]


class Devices:
    """The decoded device input of a flow.

    ``readings`` are numeric readings keyed by series (``device/key``),
    ``text`` are string readings, ``blocks`` are vibration blocks keyed by
    device, ``attributes`` are client attributes and ``logs`` log lines, both keyed by
    device. ``series`` is ``readings`` with an
    :class:`~operators.records.Evict` wherever ``limits.series_idle_evict``
    forgets a series, in order with its readings: feed it to operators that
    keep per-series state (deadband, window aggregates, threshold) so that
    state is dropped too. Undecodable messages and what ``limits`` refuses
    are already on their way to ``dead_letters``; a kind of record no step
    takes is dead-lettered too, so nothing is lost silently.
    """

    def __init__(
        self,
        series: KeyedStream[Reading | Evict],
        text: Stream[Reading],
        blocks: KeyedStream[VibrationBlock],
        attributes: KeyedStream[Attribute],
        logs: KeyedStream[LogLine],
        *,
        step_id: str,
    ) -> None:
        self._streams: dict[str, Stream[Any]] = {
            "readings": series,
            "text": text,
            "blocks": blocks,
            "attributes": attributes,
            "logs": logs,
        }
        self._step_id = step_id
        self._readings: KeyedStream[Reading] | None = None
        self._used: set[str] = set()

    @property
    def readings(self) -> KeyedStream[Reading]:
        """Numeric telemetry readings (numbers and booleans), keyed ``device/key``."""
        if self._readings is None:
            self._readings = op.filter(
                f"{self._step_id}_readings", self._take("readings"), _not_evict
            )
        return self._readings

    @property
    def series(self) -> KeyedStream[Reading | Evict]:
        """``readings`` and, in order with them, an ``Evict`` for each series forgotten."""
        return self._take("readings")

    @property
    def text(self) -> Stream[Reading]:
        """String telemetry readings (logs, states): kept, never fed to numeric operators."""
        return self._take("text")

    @property
    def blocks(self) -> KeyedStream[VibrationBlock]:
        """Decoded EVB1 vibration blocks, keyed by device."""
        return self._take("blocks")

    @property
    def attributes(self) -> KeyedStream[Attribute]:
        """Client attributes (the ``attributes`` channel), keyed by device."""
        return self._take("attributes")

    @property
    def logs(self) -> KeyedStream[LogLine]:
        """Log lines (the ``logs`` channel), keyed by device, in the order each device sent them."""
        return self._take("logs")

    def _take(self, kind: str) -> Any:
        self._used.add(kind)
        return self._streams[kind]

    def unused(self) -> dict[str, Stream[Any]]:
        """The streams no step took (they are dead-lettered when the flow is finished)."""
        return {
            k: (op.filter(f"{self._step_id}_unused_{k}", s, _not_evict) if k == "readings" else s)
            for k, s in self._streams.items()
            if k not in self._used
        }


def decoded_devices(
    sid: str,
    raw: Stream[RawMessage],
    config: EdgeConfig,
    *,
    channels: tuple[str, ...],
    flow: str,
    owner_of: Callable[[str], Owner],
) -> tuple[Devices, Stream[tuple[str, DeadLetter]]]:
    """Decode ``raw``, apply ``config.limits`` and split the records by kind.

    ``owner_of(channel)`` is the part of the flow whose report counts that
    channel (see :func:`flows.ingest.decoder`). Returns the :class:`Devices`
    and the dead letters of undecodable or refused messages, keyed by the
    name of their part.
    """
    limits = config.limits
    decode = decoder(
        config.max_payload_bytes,
        channels=channels,
        flow=flow,
        owner_of=owner_of,
        keys_per_message=limits.keys_per_message,
    )
    decoded = op.flat_map_batch(f"{sid}_decode", raw, decode)
    messages = op.branch(f"{sid}_messages", decoded, _is_message)
    series = series_limits(
        f"{sid}_limits",
        messages.trues,  # type: ignore[arg-type]
        SeriesLimits(
            series_per_device=limits.series_per_device,
            state_bytes_per_device=limits.state_bytes_per_device,
            series_total=limits.series_total,
            idle_evict=limits.series_idle_evict,
        ),
        lambda: owner_of(TELEMETRY),
    )
    items = op.merge(f"{sid}_items", series, messages.falses)
    numbers = op.branch(f"{sid}_numbers", items, _is_number)
    others = op.branch(f"{sid}_text", numbers.falses, _is_reading)
    rest = op.branch(f"{sid}_blocks", others.falses, _is_block)
    attributes = op.branch(f"{sid}_attributes", rest.falses, _is_attribute)
    logs = op.branch(f"{sid}_logs", attributes.falses, _is_log_line)
    text = op.map(f"{sid}_unkey_text", others.trues, unkeyed)
    devices = Devices(
        numbers.trues,  # type: ignore[arg-type]
        text,
        rest.trues,  # type: ignore[arg-type]
        attributes.trues,  # type: ignore[arg-type]
        logs.trues,  # type: ignore[arg-type]
        step_id=sid,
    )
    return devices, logs.falses  # type: ignore[return-value]


def unkeyed(item: Any) -> Any:
    """The record of an item of a stream, keyed (``(key, record)``) or not."""
    return item[1] if type(item) is tuple else item


def _is_message(item: tuple[str, object]) -> bool:
    return type(item[1]) is Message


def _is_number(item: tuple[str, object]) -> bool:
    value = item[1]
    return (type(value) is Reading and type(value.value) is float) or type(value) is Evict


def _not_evict(item: tuple[str, object]) -> bool:
    return type(item[1]) is not Evict


def _is_reading(item: tuple[str, Decoded]) -> bool:
    return type(item[1]) is Reading


def _is_block(item: tuple[str, Decoded]) -> bool:
    return type(item[1]) is VibrationBlock


def _is_attribute(item: tuple[str, Decoded]) -> bool:
    return type(item[1]) is Attribute


def _is_log_line(item: tuple[str, Decoded]) -> bool:
    return type(item[1]) is LogLine
