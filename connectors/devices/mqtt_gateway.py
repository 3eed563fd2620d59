"""ThingsBoard's gateway API on the edge's MQTT endpoint: a gateway's message as device messages.

A gateway (a registry entry with ``gateway: {devices: [patterns]}``) publishes
``v1/gateway/connect`` and ``v1/gateway/disconnect`` (``{"device": name}``),
``v1/gateway/telemetry`` (``{"Dev A": [{"ts": ms, "values": {...}}]}``) and
``v1/gateway/attributes`` (``{"Dev A": {...}}``). :func:`route` turns one such
message into what the endpoint journals: each device's part as a message of
that device (device id = the name), with transport ``gateway:<gateway id>``,
which records the gateway it came through. What a gateway may not send (a
name its patterns do not match, an invalid device id, a payload of the wrong
shape, a topic outside the gateway API) is kept as a ``refused: <reason>``
message of the gateway itself, which the flow turns into a dead letter; the
rest of the message is kept as usual.
"""

from __future__ import annotations

import json
from typing import Final, NamedTuple

from connectors.codecs.attributes_json import ATTRIBUTES
from connectors.codecs.decode import refused_channel
from connectors.devices.registry import DEVICE_ID, Device
from operators.records import TELEMETRY

__all__ = ["GATEWAY", "GATEWAY_FILTERS", "GATEWAY_TRANSPORT", "Part", "Routed", "route"]

GATEWAY: Final = "v1/gateway/"
GATEWAY_TRANSPORT: Final = "gateway:"
"""Prefix of the transport of a message a gateway sent for a device: ``gateway:gw-1``."""
GATEWAY_FILTERS: Final = frozenset(
    {"v1/gateway/attributes", "v1/gateway/attributes/response", "v1/gateway/rpc"}
)
"""The filters a gateway may subscribe to (besides a device's own)."""
_CHANNELS: Final = {"telemetry": TELEMETRY, "attributes": ATTRIBUTES}


class Part(NamedTuple):
    """One message to journal; ``redelivered``: the PUBLISH's DUP flag applies to it."""

    device: str
    channel: str
    transport: str
    payload: bytes
    redelivered: bool = False


class Routed(NamedTuple):
    """What a gateway message becomes: the parts to journal and a line to log (connect, ...)."""

    parts: list[Part]
    event: str | None = None


def route(gateway: Device, what: str, payload: bytes, *, dup: bool = False) -> Routed:
    """The parts of ``payload``, published by ``gateway`` to ``v1/gateway/<what>``."""
    transport = GATEWAY_TRANSPORT + gateway.id

    def refused(reason: str, body: bytes = payload) -> Routed:
        return Routed([Part(gateway.id, refused_channel(reason), transport, body)])

    channel = _CHANNELS.get(what)
    if what not in ("connect", "disconnect") and channel is None:
        return refused(
            f"topic 'v1/gateway/{what[:60]}' is not part of the gateway API; use "
            "v1/gateway/connect, disconnect, telemetry or attributes"
        )
    try:
        data: object = json.loads(payload)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        data = exc
    if channel is None:  # connect / disconnect: {"device": name, ...}
        name = data.get("device") if isinstance(data, dict) else None
        if not isinstance(name, str):
            return refused(
                f'v1/gateway/{what}: expected a JSON object with a "device" name, got '
                f'{_shape(data)}; e.g. {{"device": "Dev A", "type": "default"}}'
            )
        refusal = forbidden(gateway, name)
        if refusal is not None:
            return refused(refusal)
        return Routed([], f"gateway {gateway.id}: {what} {name}")
    if not isinstance(data, dict):
        return refused(
            f"v1/gateway/{what}: expected a JSON object of device names, got {_shape(data)}; "
            'e.g. {"Dev A": [{"ts": 1763800000000, "values": {"temp": 21.5}}]}'
        )
    parts = []
    for name, part in data.items():
        refusal = forbidden(gateway, name)
        if refusal is None:
            body = json.dumps(part, separators=(",", ":"), ensure_ascii=False).encode()
            parts.append(Part(name, channel, transport, body, dup))
        else:
            body = json.dumps({name: part}, separators=(",", ":"), ensure_ascii=False).encode()
            parts.append(Part(gateway.id, refused_channel(refusal), transport, body))
    return Routed(parts)


def forbidden(gateway: Device, name: str) -> str | None:
    """Why ``gateway`` may not send data of device ``name``, or None."""
    if not DEVICE_ID.fullmatch(name):
        return (
            f"gateway {gateway.id!r} sent device name {name[:60]!r}, which is not a valid device "
            "id (1-128 letters, digits, '.', '_', ':' or '-')"
        )
    if not gateway.speaks_for(name):
        patterns = ", ".join(gateway.gateway or ())
        return (
            f"gateway {gateway.id!r} may not speak for device {name!r}; its devices.yaml "
            f"patterns are [{patterns}]; hint: add a pattern matching it"
        )
    return None


def _shape(data: object) -> str:
    if isinstance(data, json.JSONDecodeError):
        return f"invalid JSON ({data.msg} at character {data.pos})"
    if isinstance(data, UnicodeDecodeError):
        return f"invalid JSON (not UTF-8: byte {data.object[data.start]:#04x} at {data.start})"
    return type(data).__name__
