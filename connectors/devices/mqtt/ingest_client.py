"""The paho client that :class:`~connectors.devices.mqtt.journaled.JournaledMqtt` drives.

PUBACKs and socket reads in batches (see :class:`IngestClient`).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.client import PUBACK

__all__ = ["IngestClient"]

_puback = struct.Struct("!BBH").pack
_RECV_BYTES: Final = 16_384
"""Bytes the network thread asks the socket for at once (about 200 telemetry messages)."""
_BUSY_PAUSE_S: Final = 0.001
"""How long the network thread leaves the socket unread while the journal writer is behind."""


class IngestClient(paho.Client):
    """paho's client with batched PUBACKs and reads.

    PUBACKs: paho's ``ack()`` queues one packet per message and wakes its
    network loop for each (a write to its socket pair, then one ``send()`` per
    packet). Here :meth:`ack` of a QoS 1 message only appends its packet id,
    and :meth:`send_acks` queues all collected PUBACKs as one packet (paho's
    ``_packet_queue``, as its own ``ack()`` does): one wake-up and one
    ``send()`` per journal group. Both run on one thread (the journal writer).

    Reads: paho reads one packet per ``select()``, in three ``recv()`` calls
    (type, length, rest), each letting the journal writer thread take the
    GIL. Here :meth:`loop_read` takes up to ``_RECV_BYTES`` with one
    ``recv()`` and handles every packet in them before returning to
    ``select()``; a packet cut at the end stays in paho's partial-packet
    state as with any short read, so nothing is left buffered between calls.

    While ``busy()`` says so (the journal has a full group waiting), a read
    is skipped for ``_BUSY_PAUSE_S``: the writer thread gets the GIL, and the
    socket, left unread, pushes the broker back.

    Relies on paho-mqtt 2.x internals (``_packet_queue``, ``_packet_read``,
    ``_sock_recv``, ``_loop_rc_handle``, ``_create_socket``); the range is
    pinned in pyproject.toml and the behaviour in the tests.
    """

    busy: Callable[[], bool] | None = None
    """Whether to read nothing for now (checked before each read; network thread)."""
    _recv_buf: bytes = b""
    _recv_pos: int = 0
    _recv_spent: bool = True

    _acks: list[int]

    def ack(self, mid: int, qos: int) -> paho.MQTTErrorCode:
        """Collect the PUBACK of ``mid`` (QoS 1); :meth:`send_acks` sends the collected ones."""
        if qos == 1:
            self._acks.append(mid)
        return paho.MQTT_ERR_SUCCESS

    def send_acks(self) -> int:
        """Queue the collected PUBACKs, in the order collected, as one write; how many."""
        mids, self._acks = self._acks, []
        if mids:
            packet = b"".join([_puback(PUBACK, 2, mid) for mid in mids])
            self._packet_queue(PUBACK, packet, 0, 0)
        return len(mids)

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        """Handle every packet one ``recv()`` brings (see the class doc)."""
        if self._sock is None:
            return paho.MQTT_ERR_NO_CONN
        if self.busy is not None and self.busy():
            # the journal writer is behind: let it have the GIL (TCP pushes the broker back)
            time.sleep(_BUSY_PAUSE_S)
            return paho.MQTT_ERR_SUCCESS
        self._recv_spent = False  # one recv() from the socket in this call
        while True:
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == paho.MQTT_ERR_AGAIN:
                return paho.MQTT_ERR_SUCCESS
            if self._sock is None:
                return paho.MQTT_ERR_NO_CONN

    def _sock_recv(self, bufsize: int) -> bytes:
        pos = self._recv_pos
        data = self._recv_buf
        if pos >= len(data):
            if self._recv_spent:
                raise BlockingIOError  # handled by paho as "no more data for now"
            self._recv_spent = True
            data = super()._sock_recv(max(bufsize, _RECV_BYTES))
            if len(data) <= bufsize:
                self._recv_buf = b""
                self._recv_pos = 0
                return data
            self._recv_buf = data
            pos = 0
        end = pos + bufsize
        self._recv_pos = end
        return data[pos:end]

    def _create_socket(self) -> Any:
        self._recv_buf = b""  # nothing of an earlier connection is read on a new one
        self._recv_pos = 0
        return super()._create_socket()
