"""MQTT 3.1.1 / 5 packet fields: UTF-8 strings and variable byte integers, read and written.

A field that does not parse raises :class:`Closed`, whose message is the
reason the connection is closed.
"""

from __future__ import annotations

import struct


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
