"""Bytewax sink sealing one stream into batches for the cloud outbox.

A :class:`~bytewax.outputs.FixedPartitionedSink`: items are ``(key, row)``
2-tuples, the key (the device id) picks one of ``partitions`` partitions.
Each partition buffers the stream's rows as Arrow tables and seals a batch when
``max_rows`` rows are buffered, when the oldest buffered row has waited
``max_age`` (checked on every write and by a timer thread, so an idle stream
still seals), and on ``close()``. A batch is sealed by
:func:`connectors.uplink.seal.seal` and committed to the outbox
(``Outbox.put``) before the sink returns; the same rows in the same order
always give the same batch id, so a batch replayed after a crash is
recognised by the outbox and by the cloud.

When the outbox cannot store a batch (disk full, I/O error), the rows stay
buffered, the error is logged and the seal is retried after
``retry_interval``; the dataflow never stops for it.

Recovery: a partition's snapshot is the rows it holds but has not sealed,
:data:`CloudSinkState` ``{"version": 1, "buffer": [bytes, ...],
"carry_raw_bytes": int, "carry_rows": int}`` (each buffered table as an Arrow
IPC stream, :func:`connectors.sinks.timed.encode_buffer`, plus raw-byte
accounting already claimed by a failed seal).
The snapshot never writes to the outbox, so it cannot fail when the disk is
full and it does not cut batches at every epoch. Resumed from it after a
crash, the partition holds exactly the rows of the epochs up to the snapshot
that were not sealed then, and Bytewax replays the rest. Rows sealed between
the snapshot and the crash are therefore sealed a second time, usually into
batches with other ids; the cloud receiver skips them by their natural key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pyarrow as pa
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from connectors.common.stores import is_disk_full
from connectors.sinks.timed import TimedFlushPartition, encode_buffer
from connectors.streams import StreamSpec, conform, spec_of, to_table
from connectors.uplink.batch import Sealed
from connectors.uplink.outbox import Outbox
from connectors.uplink.seal import seal
from connectors.uplink.wire import priority_of

__all__ = [
    "CloudSink",
    "CloudSinkPartition",
    "CloudSinkSettings",
    "CloudSinkState",
]

logger = logging.getLogger("edgesieve.cloud_sink")

RawBytes = Callable[[list[object]], int]
OnSeal = Callable[[Sealed], None]

CloudSinkState = dict[str, Any]
"""A partition's snapshot: ``{"version": 1, "buffer": [bytes, ...], "carry_raw_bytes": int,
"carry_rows": int}``; plain built-in types, so it unpickles whatever this module becomes."""

DEFAULT_PARTITIONS = 4
_STATE_VERSION = 1
@dataclass(frozen=True)
class CloudSinkSettings:
    """When to seal a batch.

    ``max_rows`` rows per batch at most; ``max_age`` is how long the oldest
    buffered row may wait; ``retry_interval`` is the least time between a
    failed ``Outbox.put`` and its retry.
    """

    max_rows: int = 10_000
    max_age: timedelta = timedelta(seconds=10)
    retry_interval: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        rows = self.max_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
            msg = f"CloudSinkSettings.max_rows must be a positive int; got {rows!r}. Hint: 10_000"
            raise ValueError(msg)
        if not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0):
            msg = (
                f"CloudSinkSettings.max_age must be a positive datetime.timedelta; got "
                f"{self.max_age!r}. Hint: timedelta(seconds=10)"
            )
            raise ValueError(msg)
        if not isinstance(self.retry_interval, timedelta) or self.retry_interval < timedelta(0):
            msg = (
                f"CloudSinkSettings.retry_interval must be a non-negative datetime.timedelta; "
                f"got {self.retry_interval!r}. Hint: timedelta(seconds=5)"
            )
            raise ValueError(msg)


def _zstd_available() -> bool:
    return bool(pa.Codec.is_available("zstd"))


class CloudSink(FixedPartitionedSink[object, CloudSinkState]):
    """Seal the records of ``stream`` into batches in ``outbox`` (see the module docstring).

    Items are ``(key, value)`` 2-tuples; the key (a string, e.g. the device
    id) routes the value to one of ``partitions`` partitions, which Bytewax
    spreads over the workers. Values are records with attributes (or dict
    keys) named like the stream's columns, or pyarrow tables / record batches
    with those columns. ``partitions`` is fixed for a recovery directory:
    resuming with another count loses the state of partitions that no longer
    exist.
    ``raw_bytes(rows)`` says how many device bytes a batch stands for; it is
    called once per sealed batch with the batch's items (the records, or the
    Arrow slices for Arrow input); without it ``raw_bytes`` is 0.
    ``on_seal(sealed)`` is called after each batch newly stored in the outbox.
    Both run on the worker thread or the partition's timer thread.
    ``priority`` overrides the stream's priority (:func:`~connectors.uplink.wire.priority_of`).
    """

    def __init__(
        self,
        outbox: Outbox | Callable[[], Outbox],
        edge_id: str,
        stream: str | StreamSpec,
        *,
        settings: CloudSinkSettings = CloudSinkSettings(),
        raw_bytes: RawBytes | None = None,
        on_seal: OnSeal | None = None,
        priority: int | None = None,
        partitions: int = DEFAULT_PARTITIONS,
    ) -> None:
        spec = spec_of(stream, "CloudSink")
        stream = spec.name
        if not isinstance(outbox, Outbox) and not callable(outbox):
            msg = (
                f"CloudSink({stream!r}): outbox must be an Outbox or a function opening one; "
                f"got {type(outbox).__name__}"
            )
            raise TypeError(msg)
        if not isinstance(edge_id, str) or not edge_id:
            msg = f"CloudSink({stream!r}): edge_id must be a non-empty string; got {edge_id!r}"
            raise ValueError(msg)
        if not isinstance(settings, CloudSinkSettings):
            msg = (
                f"CloudSink({stream!r}): settings must be a CloudSinkSettings; "
                f"got {type(settings).__name__}"
            )
            raise TypeError(msg)
        for name, fn in (("raw_bytes", raw_bytes), ("on_seal", on_seal)):
            if fn is not None and not callable(fn):
                msg = f"CloudSink({stream!r}): {name} must be callable; got {type(fn).__name__}"
                raise TypeError(msg)
        if priority is None:
            priority = priority_of(stream)
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            msg = f"CloudSink({stream!r}): priority must be an int >= 0; got {priority!r}"
            raise ValueError(msg)
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            msg = (
                f"CloudSink({stream!r}): partitions must be an int >= 1; got {partitions!r}. "
                f"Hint: {DEFAULT_PARTITIONS}, at least the number of workers"
            )
            raise ValueError(msg)
        if not _zstd_available():
            msg = (
                "CloudSink: this pyarrow has no zstd codec, which the uplink requires. "
                "Hint: install the pyarrow wheels from PyPI"
            )
            raise RuntimeError(msg)
        self._outbox = outbox
        self.edge_id = edge_id
        self.spec: StreamSpec = spec
        self.priority = priority
        self.settings = settings
        self.raw_bytes = raw_bytes
        self.on_seal = on_seal
        self.partitions = partitions

    @property
    def outbox(self) -> Outbox:
        """The outbox; a function given instead is called once, when the flow starts."""
        if not isinstance(self._outbox, Outbox):
            self._outbox = self._outbox()
        return self._outbox

    def list_parts(self) -> list[str]:
        """Every partition, on every worker: Bytewax gives each one to one worker."""
        return [f"part-{i}" for i in range(self.partitions)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: CloudSinkState | None
    ) -> CloudSinkPartition:
        """Build one partition, resumed from its snapshot (starts its timer thread)."""
        self.outbox  # noqa: B018 -- open the outbox (and start the uplink) before rows arrive
        return CloudSinkPartition(self, step_id=step_id, part=for_part, resume_state=resume_state)


@dataclass
class _Segment:
    items: list[object] | None
    table: pa.Table
    arrived: float
    encoded: bytes | None = None
    """The table as :func:`encode_buffer` bytes, once a snapshot needed it."""


class CloudSinkPartition(TimedFlushPartition, StatefulSinkPartition[object, CloudSinkState]):
    """One partition's buffer; see :class:`CloudSink`.

    Counters: ``batches_sealed`` (stored in the outbox), ``rows_sealed``,
    ``put_failures`` (outbox errors, retried), ``dropped_rows`` (batches the
    outbox can never hold, or not sealed on close), ``resumed_rows`` (rows
    restored from the snapshot) and ``buffered_rows``.
    """

    def __init__(
        self,
        sink: CloudSink,
        *,
        step_id: str,
        part: str,
        resume_state: CloudSinkState | None = None,
    ) -> None:
        self._sink = sink
        self._spec = sink.spec
        self._settings = sink.settings
        self._init_timer(
            where=f"CloudSink {step_id!r} (stream {sink.spec.name!r}, {part})",
            thread=f"cloud-{sink.spec.name}-{part}",
            max_age_s=sink.settings.max_age.total_seconds(),
            retry_s=sink.settings.retry_interval.total_seconds(),
        )
        self._segments: list[_Segment] = []
        self._rows = 0
        self._oldest: float | None = None
        self._carry_raw = 0
        self._carry_rows = 0
        self.batches_sealed = 0
        self.rows_sealed = 0
        self.put_failures = 0
        self.dropped_rows = 0
        self.resumed_rows = 0
        if resume_state is not None:
            self._resume(resume_state)
        self._start_timer()

    def _resume(self, state: CloudSinkState) -> None:
        """Restore the rows buffered at the snapshot (sealed later by rows or age)."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            msg = (
                f"{self._where}: cannot resume from a snapshot of version {got!r}; this "
                f"edgesieve writes version {_STATE_VERSION}. Hint: finish the old run with the "
                "edgesieve version that wrote it, or start with a fresh recovery directory"
            )
            raise ValueError(msg)
        now = time.monotonic()
        for data in state["buffer"]:
            table = conform(self._spec, pa.ipc.open_stream(data).read_all())
            if table.num_rows:
                self._segments.append(_Segment(None, table, now, data))
                self._rows += table.num_rows
        self._oldest = now if self._rows else None
        self._carry_raw = int(state["carry_raw_bytes"])
        self._carry_rows = min(int(state["carry_rows"]), self._rows)
        self.resumed_rows = self._rows
        if self._rows:
            logger.info(
                "%s: resumed %d buffered rows from the recovery snapshot", self._where, self._rows
            )

    def snapshot(self) -> CloudSinkState | None:
        """The unsealed rows (Arrow IPC per buffered table); None when nothing is held.

        Taken under the lock, so it is the buffer before or after a seal, never
        half of one. Tables encoded for an earlier snapshot are not encoded again.
        """
        with self._lock:
            if not self._rows and not self._carry_rows:
                return None
            buffer = []
            for segment in self._segments:
                if segment.encoded is None:
                    segment.encoded = encode_buffer(segment.table)
                buffer.append(segment.encoded)
            return {
                "version": _STATE_VERSION,
                "buffer": buffer,
                "carry_raw_bytes": self._carry_raw,
                "carry_rows": self._carry_rows,
            }

    @property
    def buffered_rows(self) -> int:
        """Rows not yet sealed into the outbox."""
        return self._rows

    def write_batch(self, items: list[object]) -> None:
        """Buffer a batch; seal when ``max_rows`` or ``max_age`` is reached."""
        if not items:
            return
        if isinstance(items[0], pa.Table | pa.RecordBatch):
            for item in items:
                table = conform(self._spec, item)  # type: ignore[arg-type]
                if table.num_rows:
                    self._add(_Segment(None, table, time.monotonic()))
        else:
            self._add(_Segment(list(items), to_table(self._spec, items), time.monotonic()))

    def _add(self, segment: _Segment) -> None:
        with self._lock:
            now = time.monotonic()
            self._segments.append(segment)
            self._rows += segment.table.num_rows
            if self._oldest is None:
                self._oldest = now
            self._flush_due_locked(now)

    def _flush_all_locked(self) -> None:
        while self._rows:
            if not self._seal_locked(min(self._rows, self._settings.max_rows)):
                self.dropped_rows += self._rows
                logger.error(
                    "%s: the final seal on close failed; %d rows were NOT stored in the "
                    "outbox %s. With recovery on they are in the last snapshot and are sealed "
                    "at the next start; without it they are lost. See the errors above",
                    self._where,
                    self._rows,
                    self._sink.outbox.path,
                )
                self._segments, self._rows, self._oldest = [], 0, None
                return

    def _flush_due_locked(self, now: float) -> None:
        while self._rows and now >= self._retry_at:
            if self._rows >= self._settings.max_rows:
                count = self._settings.max_rows
            elif self._oldest is not None and now - self._oldest >= self._max_age_s:
                count = self._rows
            else:
                return
            if not self._seal_locked(count):
                return

    def _seal_locked(self, count: int) -> bool:
        """Seal the first ``count`` buffered rows; False (rows kept) if the outbox failed."""
        sink = self._sink
        head, rest = _split(self._segments, count)
        table = pa.concat_tables([s.table for s in head]).combine_chunks()
        raw, carry = self._raw_for(head, count)
        try:
            sealed = seal(
                sink.edge_id, self._spec.name, table, priority=sink.priority, raw_bytes=raw
            )
            stored = sink.outbox.put(sealed)
        except ValueError as exc:
            self.dropped_rows += table.num_rows
            logger.error(
                "%s: %d rows can never be stored and are dropped: %s",
                self._where,
                table.num_rows,
                exc,
            )
            self._carry_raw, self._carry_rows = carry
            self._consume(rest)
            return True
        except Exception as exc:
            self.put_failures += 1
            self._carry_raw = raw + carry[0]
            self._carry_rows = max(count, self._carry_rows)
            self._retry_at = time.monotonic() + self._retry_s
            logger.error(
                "%s: could not store a batch of %d rows in the outbox %s: %s: %s. The rows "
                "stay buffered (%d rows) and the seal is retried in %.1fs. Hint: %s",
                self._where,
                table.num_rows,
                sink.outbox.path,
                type(exc).__name__,
                exc,
                self._rows,
                self._retry_s,
                "free disk space on the volume of data_dir"
                if is_disk_full(exc)
                else "see the error; check that data_dir is writable",
            )
            return False
        self._carry_raw, self._carry_rows = carry
        self._consume(rest)
        if stored:
            self.batches_sealed += 1
            self.rows_sealed += sealed.rows
            if sink.on_seal is not None:
                try:
                    sink.on_seal(sealed)
                except Exception:
                    logger.exception(
                        "%s: the on_seal callback raised for batch %s; the batch is stored "
                        "and sealing continues",
                        self._where,
                        sealed.batch_id,
                    )
        return True

    def _consume(self, rest: list[_Segment]) -> None:
        self._segments = rest
        self._rows = sum(s.table.num_rows for s in rest)
        self._oldest = rest[0].arrived if rest else None
        self._retry_at = 0.0

    def _raw_for(self, head: list[_Segment], count: int) -> tuple[int, tuple[int, int]]:
        """Raw bytes of the first ``count`` rows and what stays carried after them.

        The first ``_carry_rows`` buffered rows were already given to the
        ``raw_bytes`` callback by a seal that failed (their sum is
        ``_carry_raw``), so the callback only ever sees each row once.
        """
        covered, carried = self._carry_rows, self._carry_raw
        if count <= covered:
            raw = carried * count // covered
            return raw, (carried - raw, covered - count)
        _, fresh = _split(head, covered)
        return carried + self._raw_bytes(fresh), (0, 0)

    def _raw_bytes(self, head: list[_Segment]) -> int:
        fn = self._sink.raw_bytes
        if fn is None:
            return 0
        items: list[object] = []
        for segment in head:
            if segment.items is not None:
                items.extend(segment.items)
            else:
                items.append(segment.table)
        try:
            value = fn(items)
        except Exception:
            logger.exception(
                "%s: the raw_bytes callback raised for a batch of %d rows; the batch is sent "
                "with raw_bytes=0",
                self._where,
                sum(s.table.num_rows for s in head),
            )
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            logger.error(
                "%s: the raw_bytes callback returned %r; it must return a non-negative int. "
                "The batch is sent with raw_bytes=0",
                self._where,
                value,
            )
            return 0
        return value


def _split(segments: list[_Segment], count: int) -> tuple[list[_Segment], list[_Segment]]:
    """Split ``segments`` into the first ``count`` rows and the rest."""
    head: list[_Segment] = []
    rest: list[_Segment] = []
    need = count
    for segment in segments:
        n = segment.table.num_rows
        if need <= 0:
            rest.append(segment)
        elif n <= need:
            head.append(segment)
            need -= n
        else:
            items = segment.items
            head.append(
                _Segment(
                    items[:need] if items else None, segment.table.slice(0, need), segment.arrived
                )
            )
            rest.append(
                _Segment(
                    items[need:] if items else None, segment.table.slice(need), segment.arrived
                )
            )
            need = 0
    return head, rest
