"""What one batch and one edge may cost the receiver, and the checks that run before decoding.

:class:`ReceiverLimits` holds the settings (``edgesieve cloud`` options).
:func:`measure_ipc` reads only the Arrow IPC message headers of a batch and
adds up what its buffers expand to, so a small zstd payload that would expand
to gigabytes is refused before anything is decompressed.
:class:`EdgeQuotas` paces each edge to its rate quota and bounds the ``Push``
calls it may hold open at once.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import pyarrow as pa

from connectors.uplink.pacing import TokenBucket

__all__ = [
    "DEFAULT_EDGE_BATCHES_PER_S",
    "DEFAULT_EDGE_BYTES_PER_S",
    "DEFAULT_EDGE_CALLS",
    "DEFAULT_EDGE_STORAGE_BYTES",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_BATCH_ROWS",
    "DEFAULT_MAX_DECODING_BYTES",
    "DEFAULT_MAX_RAW_BYTES",
    "DecodeBudget",
    "EdgeQuotas",
    "LIMIT_OPTIONS",
    "IpcSize",
    "ReceiverLimits",
    "measure_ipc",
]

MiB = 1024 * 1024
DEFAULT_MAX_BATCH_BYTES = 64 * MiB
"""Decompressed Arrow bytes of one batch (the edge's default batch is about 1-3 MiB)."""
DEFAULT_MAX_BATCH_ROWS = 1_000_000
"""Rows of one batch (the edge seals at ``cloud.batch_rows``, 10,000 by default)."""
DEFAULT_MAX_RAW_BYTES = 1 << 40
"""The most device bytes (1 TiB) one batch may claim to stand for and be credited."""
DEFAULT_EDGE_BATCHES_PER_S = 200
"""Batches per second one edge may push (a one-second burst; faster edges are paced)."""
DEFAULT_EDGE_BYTES_PER_S = 64 * MiB
"""Decompressed Arrow bytes per second one edge may push (paced like batches)."""
DEFAULT_EDGE_STORAGE_BYTES = 64 * 1024 * MiB
"""Decompressed Arrow bytes (64 GiB) one edge may have stored in ``uplink_batches``."""
DEFAULT_EDGE_CALLS = 4
"""``Push`` calls one edge may hold open at once (an edge uses one)."""
DEFAULT_MAX_DECODING_BYTES = 4 * DEFAULT_MAX_BATCH_BYTES
"""Decompressed Arrow bytes all calls together may be decoding and storing at once."""


LIMIT_OPTIONS: dict[str, tuple[int, str]] = {
    "max_batch_bytes": (DEFAULT_MAX_BATCH_BYTES, "cap on one batch's decompressed Arrow bytes"),
    "max_batch_rows": (DEFAULT_MAX_BATCH_ROWS, "cap on one batch's rows"),
    "max_raw_bytes": (
        DEFAULT_MAX_RAW_BYTES,
        "raw_bytes one batch may claim and be credited; 0 = no cap",
    ),
    "edge_batches_per_s": (DEFAULT_EDGE_BATCHES_PER_S, "batches per second per edge, paced"),
    "edge_bytes_per_s": (
        DEFAULT_EDGE_BYTES_PER_S,
        "decompressed Arrow bytes per second per edge, paced",
    ),
    "edge_storage_bytes": (
        DEFAULT_EDGE_STORAGE_BYTES,
        "decompressed Arrow bytes stored per edge; 0 = no quota",
    ),
    "edge_calls": (DEFAULT_EDGE_CALLS, "Push calls one edge may hold open"),
    "max_decoding_bytes": (
        DEFAULT_MAX_DECODING_BYTES,
        "decompressed Arrow bytes being decoded at once, all calls together",
    ),
}
"""Each :class:`ReceiverLimits` field: its default and help (``edgesieve cloud`` options)."""


def _positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "an int >= 0 (0 = no limit)" if allow_zero else "an int >= 1"
        option = "--" + name.replace("_", "-")
        msg = f"ReceiverLimits.{name} ({option}) must be {what}; got {value!r}"
        raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class ReceiverLimits:
    """Per-batch caps and per-edge quotas of the receiver (see docs/uplink.md).

    ``max_batch_bytes`` and ``max_batch_rows`` cap one batch (over them:
    ``REJECTED``); a ``raw_bytes`` claim over ``max_raw_bytes`` is stored but
    not credited. ``edge_batches_per_s`` and ``edge_bytes_per_s`` pace each
    edge (its batches wait, nothing is refused); ``edge_storage_bytes`` (0 =
    no limit) ends an edge's call with ``RESOURCE_EXHAUSTED`` once it has that
    much stored, and so does a call beyond ``edge_calls`` open ones: the edge
    keeps its batches and retries. ``max_decoding_bytes`` bounds the
    decompressed bytes all calls decode and store at once (a batch waits for
    room; one larger than it runs alone), which bounds the receiver's memory.
    """

    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES
    edge_batches_per_s: int = DEFAULT_EDGE_BATCHES_PER_S
    edge_bytes_per_s: int = DEFAULT_EDGE_BYTES_PER_S
    edge_storage_bytes: int = DEFAULT_EDGE_STORAGE_BYTES
    edge_calls: int = DEFAULT_EDGE_CALLS
    max_decoding_bytes: int = DEFAULT_MAX_DECODING_BYTES

    def __post_init__(self) -> None:
        for name in (
            "max_batch_bytes",
            "max_batch_rows",
            "edge_batches_per_s",
            "edge_bytes_per_s",
            "edge_calls",
            "max_decoding_bytes",
        ):
            _positive(name, getattr(self, name))
        _positive("max_raw_bytes", self.max_raw_bytes, allow_zero=True)
        _positive("edge_storage_bytes", self.edge_storage_bytes, allow_zero=True)


class IpcSize(NamedTuple):
    """What an Arrow IPC stream holds, read from its message headers.

    ``arrow_bytes``: its buffers once decompressed; ``rows``: over all record batches.
    """

    arrow_bytes: int
    rows: int


# Arrow's Message.fbs: the MessageHeader union's types, and the fields used here.
_SCHEMA, _DICTIONARY_BATCH, _RECORD_BATCH = 1, 2, 3
_U8, _U16, _I32, _U32, _I64 = (struct.Struct(f"<{c}") for c in "BHiIq")
_NOT_COMPRESSED = -1


class _Table:
    """One FlatBuffers table in ``buf`` at ``pos``; out-of-range reads raise ``ValueError``."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        self.vtable = pos - _read(_I32, buf, pos)
        self.vtable_size = _read(_U16, buf, self.vtable)

    def _field(self, index: int) -> int:
        slot = 4 + 2 * index
        if slot + 2 > self.vtable_size:
            return 0
        offset = _read(_U16, self.buf, self.vtable + slot)
        return self.pos + offset if offset else 0

    def scalar(self, index: int, kind: struct.Struct, default: int = 0) -> int:
        at = self._field(index)
        return _read(kind, self.buf, at) if at else default

    def table(self, index: int) -> _Table | None:
        at = self._field(index)
        return _Table(self.buf, at + _read(_U32, self.buf, at)) if at else None

    def structs(self, index: int, size: int) -> Iterator[tuple[int, int]]:
        """A vector of structs of two int64 (``Buffer``, ``FieldNode``)."""
        at = self._field(index)
        if not at:
            return
        start = at + _read(_U32, self.buf, at)
        count = _read(_U32, self.buf, start)
        if start + 4 + count * size > len(self.buf):
            msg = f"a vector of {count} entries runs past the message header"
            raise ValueError(msg)
        for i in range(count):
            base = start + 4 + i * size
            yield _read(_I64, self.buf, base), _read(_I64, self.buf, base + 8)


def _read(kind: struct.Struct, buf: bytes, pos: int) -> int:
    if pos < 0 or pos + kind.size > len(buf):
        msg = f"a message header field at byte {pos} lies outside its {len(buf)} bytes"
        raise ValueError(msg)
    return int(kind.unpack_from(buf, pos)[0])


def _body_bytes(batch: _Table, body: memoryview, room: int, max_bytes: int) -> int:
    """What the buffers of one record batch occupy once decompressed (counted past ``room``)."""
    compressed = batch.table(3) is not None
    total = 0
    for offset, length in batch.structs(2, 16):
        if offset < 0 or length < 0 or offset + length > len(body):
            msg = (
                f"a buffer at offset {offset} of length {length} lies outside the "
                f"{len(body)}-byte message body"
            )
            raise ValueError(msg)
        size = length
        if compressed and length:
            if length < 8:
                msg = f"a compressed buffer of {length} bytes has no 8-byte length prefix"
                raise ValueError(msg)
            claimed = _read(_I64, body, offset)
            if claimed == _NOT_COMPRESSED:
                size = length - 8
            elif claimed < 0:
                msg = f"a compressed buffer claims {claimed} bytes uncompressed"
                raise ValueError(msg)
            else:
                size = claimed
        total += size
        if total > room:
            break
    for length, _nulls in batch.structs(1, 16):
        if length < 0 or length > 8 * max_bytes:
            msg = f"a column claims {length} values, more than the batch's bytes can hold"
            raise ValueError(msg)
    return total


def measure_ipc(data: bytes, *, max_bytes: int) -> IpcSize:
    """Decompressed buffer bytes and rows of the Arrow IPC stream ``data``, unread.

    Only message headers and the 8-byte length prefixes of compressed buffers
    are read. Counting stops once ``max_bytes`` is passed (the caller refuses
    the batch). Raises ``ValueError`` (or ``pyarrow.ArrowException``) when the
    stream is malformed.
    """
    reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(data))
    total = rows = 0
    schemas = 0
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        meta = message.metadata.to_pybytes()
        header = _Table(meta, _read(_U32, meta, 0))
        kind = header.scalar(1, _U8)
        body = memoryview(message.body) if message.body is not None else memoryview(b"")
        if kind == _SCHEMA:
            schemas += 1
            continue
        if kind == _RECORD_BATCH:
            batch = header.table(2)
            if batch is None:
                msg = "a record batch message has no header"
                raise ValueError(msg)
            length = batch.scalar(0, _I64)
            if length < 0:
                msg = f"a record batch claims {length} rows"
                raise ValueError(msg)
            rows += length
        elif kind == _DICTIONARY_BATCH:
            dictionary = header.table(2)
            batch = dictionary.table(1) if dictionary is not None else None
            if batch is None:
                msg = "a dictionary batch message has no data"
                raise ValueError(msg)
        else:
            msg = f"message type {kind} has no place in an IPC stream"
            raise ValueError(msg)
        total += _body_bytes(batch, body, max_bytes - total, max_bytes)
        if total > max_bytes:
            break
    if schemas != 1:
        msg = f"the stream has {schemas} schema messages; it must start with exactly one"
        raise ValueError(msg)
    return IpcSize(total, rows)


class EdgeQuotas:
    """Per-edge rate pacing and open-call counts (thread-safe)."""

    def __init__(self, limits: ReceiverLimits) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._calls: dict[str, int] = {}

    def enter_call(self, edge: str) -> bool:
        """Count a new ``Push`` call of ``edge``; False (not counted) when it has its limit."""
        with self._lock:
            open_calls = self._calls.get(edge, 0)
            if open_calls >= self._limits.edge_calls:
                return False
            self._calls[edge] = open_calls + 1
            return True

    def leave_call(self, edge: str) -> None:
        """The end of a call counted by :meth:`enter_call`."""
        with self._lock:
            left = self._calls.get(edge, 1) - 1
            if left:
                self._calls[edge] = left
            else:
                self._calls.pop(edge, None)

    def pace(self, edge: str, arrow_bytes: int) -> float:
        """Reserve one batch of ``arrow_bytes`` for ``edge``: seconds it must wait first.

        The reservation is taken at once (the buckets may go into debt), so
        batches of one edge on several calls queue behind each other.
        """
        with self._lock:
            buckets = self._buckets.get(edge)
            if buckets is None:
                buckets = self._buckets[edge] = (
                    TokenBucket(self._limits.edge_batches_per_s),
                    TokenBucket(self._limits.edge_bytes_per_s),
                )
            per_batch, per_byte = buckets
            wait = max(per_batch.wait_s(), per_byte.wait_s())
            per_batch.spend(1)
            per_byte.spend(arrow_bytes)
            return wait


class DecodeBudget:
    """Decompressed bytes being decoded at once, over all calls (thread-safe).

    :meth:`reserve` waits until ``nbytes`` fit under the budget, or until
    nothing else is being decoded (a batch larger than the budget runs
    alone); it gives up, returning False, when ``stop`` is set.
    """

    def __init__(self, budget: int, stop: threading.Event) -> None:
        self._budget = budget
        self._stop = stop
        self._used = 0
        self._room = threading.Condition()

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` of the budget once they fit; False if stopping first."""
        with self._room:
            while self._used and self._used + nbytes > self._budget:
                if self._stop.is_set():
                    return False
                self._room.wait(0.1)
            self._used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`reserve` took."""
        with self._room:
            self._used -= nbytes
            self._room.notify_all()
