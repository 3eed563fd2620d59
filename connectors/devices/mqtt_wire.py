"""MQTT 3.1.1 / 5 on the wire: packet fields, and the packets a device server reads and writes.

Fields: UTF-8 strings and variable byte integers, read and written.
Packets: CONNECT read (:func:`parse_connect`), CONNACK, SUBACK, UNSUBACK,
PUBACK and QoS 0 PUBLISH written, any packet read with a size limit
(:func:`read_packet`). A field that does not parse raises :class:`Closed`,
whose message is the reason the connection is closed.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Final


class Closed(Exception):
    """The connection ends; the message says why (logged once)."""


def read_string(body: bytes, at: int) -> tuple[str, int]:
    """The UTF-8 string at ``at`` (2-byte length first) and the offset after it."""
    (size,) = struct.unpack_from("!H", body, at)
    end = at + 2 + size
    if end > len(body):
        msg = "a string runs past the end of its packet"
        raise Closed(msg)
    try:
        return body[at + 2 : end].decode("utf-8"), end
    except UnicodeDecodeError:
        msg = "a string is not UTF-8"
        raise Closed(msg) from None


def read_varint(body: bytes, at: int) -> tuple[int, int]:
    """The variable byte integer at ``at`` (at most 4 bytes) and the offset after it."""
    value, shift = 0, 0
    for _ in range(4):
        byte = body[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    msg = "malformed variable byte integer"
    raise Closed(msg)


def encode_string(text: str) -> bytes:
    """``text`` as an MQTT string: 2-byte length, UTF-8 bytes."""
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def encode_length(size: int) -> bytes:
    """``size`` as a variable byte integer (a packet's remaining length)."""
    out = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        out.append(byte | (0x80 if size else 0))
        if not size:
            return bytes(out)


# -- packets a device server reads and writes ---------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK = 8, 9, 10, 11
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

ACCEPTED, BAD_VERSION, BAD_CLIENT_ID, UNAVAILABLE, BAD_CREDENTIALS = 0, 1, 2, 3, 4
"""MQTT 3.1.1's CONNACK return codes."""
_V5_CONNACK: Final = {ACCEPTED: 0x00, BAD_CLIENT_ID: 0x85, UNAVAILABLE: 0x88, BAD_CREDENTIALS: 0x86}
"""MQTT 5 reason codes of the 3.1.1 return codes."""


@dataclass(frozen=True)
class Connect:
    """What a device server needs of a CONNECT packet (a will is read past)."""

    protocol: str
    level: int
    """4: MQTT 3.1.1, 5: MQTT 5."""
    clean: bool
    keepalive: int
    """Seconds."""
    client_id: str
    username: str
    """The ThingsBoard access token ("" without one); the password is not read."""

    @property
    def v5(self) -> bool:
        """Whether the client speaks MQTT 5."""
        return self.level == 5


def parse_connect(body: bytes) -> Connect:
    """The CONNECT packet ``body``; raises :class:`Closed` (or struct.error, IndexError)."""
    protocol, at = read_string(body, 0)
    level, flags, keepalive = body[at], body[at + 1], struct.unpack_from("!H", body, at + 2)[0]
    at += 4
    if protocol != "MQTT" or level not in (4, 5):
        return Connect(protocol, level, bool(flags & 0x02), keepalive, "", "")
    v5 = level == 5
    at = skip_properties(body, at, v5=v5)
    client_id, at = read_string(body, at)
    if flags & 0x04:  # will properties, topic and message: read and ignore
        at = skip_properties(body, at, v5=v5)
        _, at = read_string(body, at)
        (size,) = struct.unpack_from("!H", body, at)
        at += 2 + size
    username = ""
    if flags & 0x80:
        username, at = read_string(body, at)
    return Connect(protocol, level, bool(flags & 0x02), keepalive, client_id, username)


def skip_properties(body: bytes, at: int, *, v5: bool) -> int:
    """``at`` past an MQTT 5 property list (none in 3.1.1); the properties are not used."""
    if not v5:
        return at
    size, at = read_varint(body, at)
    return at + size


def connack(
    code: int, *, v5: bool, receive_max: int, max_packet: int, assigned_id: str | None = None
) -> bytes:
    """CONNACK ``code`` (3.1.1's return code; MQTT 5 gets its reason code and the limits)."""
    if not v5:
        return bytes((0x20, 2, 0, code))
    props = b""
    if code == ACCEPTED:
        props = (
            b"\x21"
            + struct.pack("!H", min(receive_max, 0xFFFF))  # receive maximum
            + b"\x24\x01"  # maximum QoS 1
            + b"\x27"
            + struct.pack("!I", max_packet)  # maximum packet size
        )
        if assigned_id is not None:
            props += b"\x12" + encode_string(assigned_id)
    data = bytes((0, _V5_CONNACK[code])) + encode_length(len(props)) + props
    return b"\x20" + encode_length(len(data)) + data


def publish_qos0(topic: str, payload: bytes, *, v5: bool) -> bytes:
    """PUBLISH ``payload`` on ``topic`` at QoS 0 (MQTT 5: no properties)."""
    data = encode_string(topic) + (b"\x00" if v5 else b"") + payload
    return bytes((0x30,)) + encode_length(len(data)) + data


def puback(packet_id: int) -> bytes:
    """PUBACK of ``packet_id`` (MQTT 5: success, no properties)."""
    return b"\x40\x02" + struct.pack("!H", packet_id)


def subscription_filters(body: bytes, *, v5: bool) -> list[tuple[str, int]]:
    """The ``(filter, requested QoS)`` pairs of a SUBSCRIBE packet's ``body``."""
    at, filters = skip_properties(body, 2, v5=v5), []
    while at < len(body):
        topic, at = read_string(body, at)
        filters.append((topic, body[at] & 0x03))
        at += 1
    return filters


def suback(body: bytes, codes: bytes, *, v5: bool) -> bytes:
    """SUBACK to the SUBSCRIBE ``body``: one granted QoS or failure code per filter."""
    data = body[:2] + (b"\x00" if v5 else b"") + codes
    return bytes((0x90,)) + encode_length(len(data)) + data


def unsuback(body: bytes, *, v5: bool) -> bytes:
    """UNSUBACK to the UNSUBSCRIBE ``body`` (MQTT 5: success for each filter)."""
    if not v5:
        return bytes((0xB0, 2)) + body[:2]
    at, count = skip_properties(body, 2, v5=v5), 0
    while at < len(body):
        _, at = read_string(body, at)
        count += 1
    data = body[:2] + b"\x00" + bytes(count)
    return bytes((0xB0,)) + encode_length(len(data)) + data


async def read_packet(reader: asyncio.StreamReader, limit: int) -> tuple[int, int, bytes]:
    """The next packet's type, flags and body; :class:`Closed` past ``limit`` body bytes."""
    head = await reader.readexactly(1)
    size, shift = 0, 0
    for _ in range(4):
        (byte,) = await reader.readexactly(1)
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    else:
        msg = "malformed remaining length"
        raise Closed(msg)
    if size > limit:
        msg = (
            f"a packet of {size} bytes is over the limit of {limit} (max_payload_bytes "
            "plus the topic); split the payload into smaller messages"
        )
        raise Closed(msg)
    body = await reader.readexactly(size) if size else b""
    return head[0] >> 4, head[0] & 0x0F, body
