"""Constants of the uplink protocol ``edgesieve.uplink.v1``, shared by the edge and the cloud.

The messages themselves are in ``protos/uplink.proto``; this module holds
what both ends must agree on beyond them: the method path, the metadata
carrying the credentials, the ``Ack`` statuses, the stream priorities and
how a ``batch_id`` is derived (the receiver checks it).
"""

from __future__ import annotations

import hashlib

from protos import uplink_pb2

__all__ = [
    "DEFAULT_PRIORITY",
    "DUPLICATE",
    "KEY_HEADER",
    "MAX_BATCH_ID_LENGTH",
    "PRIORITIES",
    "PUSH_METHOD",
    "REJECTED",
    "SECRET_HEADER",
    "STORED",
    "UNAUTHENTICATED_DETAIL",
    "batch_id_of",
    "priority_of",
    "status_name",
]

_SERVICE = uplink_pb2.DESCRIPTOR.services_by_name["Uplink"]
PUSH_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Push'].name}"
"""The gRPC method path of ``Uplink.Push``."""

KEY_HEADER = "x-edgesieve-key"
"""Call metadata carrying the edge key (also the ``edge_id`` of its batches)."""
SECRET_HEADER = "x-edgesieve-secret"
"""Call metadata carrying the edge secret."""
UNAUTHENTICATED_DETAIL = "unknown edge key or wrong secret"
"""Detail of a refused ``Push``: the same for every cause, so it tells an attacker nothing."""

STORED = uplink_pb2.Ack.STORED
"""Ack status: the batch and its ``uplink_batches`` row are committed."""
DUPLICATE = uplink_pb2.Ack.DUPLICATE
"""Ack status: the ``batch_id`` was stored before; nothing written again."""
REJECTED = uplink_pb2.Ack.REJECTED
"""Ack status: the batch will never be stored; ``detail`` says why."""

MAX_BATCH_ID_LENGTH = 256
"""Longest ``batch_id`` the receiver stores."""

PRIORITIES: dict[str, int] = {
    "alarms": 0,
    "vibration_features": 1,
    "telemetry_summary": 2,
    "telemetry_points": 3,
    "telemetry_text": 3,
    "device_attributes": 2,
    "log_events": 1,
    "log_summary": 2,
    "dead_letters": 4,
}
"""Outbox priority of each built-in stream: 0 is sent first and dropped last."""
DEFAULT_PRIORITY = 2
"""Priority of a stream not in :data:`PRIORITIES` (a user's own output stream)."""


def priority_of(stream: str) -> int:
    """The priority of ``stream``: :data:`PRIORITIES`, else :data:`DEFAULT_PRIORITY`."""
    return PRIORITIES.get(stream, DEFAULT_PRIORITY)


def status_name(status: int) -> str:
    """``STORED``, ``DUPLICATE``, ``REJECTED`` or the number of an unknown status."""
    try:
        return uplink_pb2.Ack.Status.Name(status)
    except ValueError:
        return str(status)


def batch_id_of(edge_id: str, stream: str, arrow_ipc: bytes) -> str:
    """The deterministic batch id: hex SHA-256 over edge id, stream and IPC bytes.

    The edge id and the stream are each preceded by their UTF-8 length as 8
    bytes big-endian; the receiver recomputes the id and rejects a mismatch.
    """
    digest = hashlib.sha256()
    for part in (edge_id.encode(), stream.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(arrow_ipc)
    return digest.hexdigest()
