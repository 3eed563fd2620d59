"""The mechanics every buffering sink partition shares: a lock, a flush timer, retries, close.

Two bases build on :class:`TimedFlush`:

- :class:`TimedFlushPartition` (a Bytewax ``StatelessSinkPartition``): a
  subclass keeps its own buffer and says what is due (``_flush_due_locked``)
  and how to empty it on close (``_flush_all_locked``); this base runs the
  timer thread that flushes what becomes due while no batch arrives, spaces
  retries after a failure, and stops the timer and flushes on close.
- :class:`ReplaySafePartition` (a Bytewax ``StatefulSinkPartition``): the
  exactly-once commit protocol of the local sinks. It buffers one stream's
  rows as Arrow tables, flushes by size and age, numbers every flush with a
  sequence number, and snapshots ``{"version": 1, "next_seq": int,
  "buffer": [bytes, ...]}`` (the unflushed rows as Arrow IPC streams,
  :func:`encode_buffer`).
  A subclass writes a flush (``_write_locked``) and, when the partition is
  built, removes what flushes ``>= next_seq`` left behind (``_open``).

Why this is exactly-once under Bytewax recovery: a snapshot is taken under
the lock, so it holds either the state before a flush or after it, never
half of one. Every row of the epochs up to the snapshot is then either in a
flush numbered below ``next_seq`` or in the snapshot's buffer. Bytewax
resumes the partition from that snapshot and replays the input after it;
``_open`` deletes the flushes numbered ``next_seq`` and above (written after
the snapshot, they hold only rows of the buffer or of the replay) and the
buffer is restored, so each row ends up in exactly one flush.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import pyarrow as pa
from bytewax.outputs import StatefulSinkPartition, StatelessSinkPartition

from connectors.streams import StreamSpec, conform, to_table

__all__ = [
    "ReplaySafePartition",
    "SinkState",
    "TimedFlush",
    "TimedFlushPartition",
    "check_partitions",
    "check_recovery_dir",
    "encode_buffer",
    "recovery_store_id",
]

logger = logging.getLogger("edgesieve.sinks")

SinkState = dict[str, Any]
"""A :class:`ReplaySafePartition` snapshot: ``{"version": 1, "next_seq": int,
"buffer": [bytes, ...]}``, plain built-in types so it unpickles whatever this
module becomes."""

_STATE_VERSION = 1
_BUFFER_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4", use_threads=False)
_GROWTH_FACTOR = 4
_GROWTH_LOG_INTERVAL_S = 60.0
_MAX_PARTITIONS = 1024
_STORE_ID_FILE = "edgesieve-store-id"


class TimedFlush(ABC):  # noqa: B024 - the abstract methods are declared below
    """The lock, flush timer, retry spacing and close shared by buffering partitions.

    Subclasses call :meth:`_init_timer` first, :meth:`_start_timer` at the
    end of their ``__init__``, hold ``self._lock`` while touching their
    buffer, and set ``self._retry_at`` (monotonic seconds) after a failed
    flush.
    """

    def _init_timer(self, *, where: str, thread: str, max_age_s: float, retry_s: float) -> None:
        self._where = where
        self._max_age_s = max_age_s
        self._retry_s = retry_s
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._run_timer, name=thread, daemon=True)

    def _start_timer(self) -> None:
        self._timer.start()

    @abstractmethod
    def _flush_due_locked(self, now: float) -> None:
        """Flush what is due at ``now`` (monotonic seconds); called with the lock held."""

    @abstractmethod
    def _flush_all_locked(self) -> None:
        """Flush everything on close; called with the lock held, after the timer stopped."""

    def close(self) -> None:
        """Stop the timer and flush everything still buffered."""
        self._stop.set()
        if self._timer.is_alive() and self._timer is not threading.current_thread():
            self._timer.join()
        with self._lock:
            self._flush_all_locked()

    def _run_timer(self) -> None:
        interval = min(1.0, max(0.01, self._max_age_s / 10))
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    self._flush_due_locked(time.monotonic())
            except Exception:
                self._retry_at = time.monotonic() + max(self._retry_s, interval)
                logger.exception(
                    "%s: a flush started by the timer thread failed unexpectedly; rows stay "
                    "buffered and the flush is retried",
                    self._where,
                )


class TimedFlushPartition(TimedFlush, StatelessSinkPartition[object]):
    """A stateless sink partition whose buffer is flushed by size on write and by age."""


class ReplaySafePartition(TimedFlush, StatefulSinkPartition[object, SinkState]):
    """A stream sink partition that is exactly-once across Bytewax recovery replay.

    Subclasses call :meth:`_init_timer`, then :meth:`_init_buffer`, then
    :meth:`_resume` with Bytewax's resume state (it calls :meth:`_open`,
    restores the buffer, publishes restored rows and starts the timer).
    They implement :meth:`_open` and :meth:`_write_locked`.

    Counters: ``rows_written``, ``write_failures``, and the
    ``buffered_rows``/``buffered_bytes`` properties.
    """

    def _init_buffer(
        self,
        spec: StreamSpec,
        *,
        max_bytes: int | None,
        max_rows: int | None,
        size_setting: str,
    ) -> None:
        self._spec = spec
        self._max_bytes = max_bytes
        self._max_rows = max_rows
        self._size_setting = size_setting
        self._tables: list[pa.Table] = []
        self._encoded: list[bytes] = []
        self._encoded_tables = 0
        self._rows = 0
        self._bytes = 0
        self._oldest: float | None = None
        self._next_seq = 0
        self._last_growth_log: float | None = None
        self._failing_since: int | None = None
        self._growth_log_interval_s = _GROWTH_LOG_INTERVAL_S
        self.rows_written = 0
        self.write_failures = 0

    @property
    def buffered_rows(self) -> int:
        """Rows held in memory, not yet written."""
        return self._rows

    @property
    def buffered_bytes(self) -> int:
        """Arrow bytes held in memory, not yet written."""
        return self._bytes

    @property
    def next_seq(self) -> int:
        """The sequence number the next flush gets."""
        return self._next_seq

    # --- what a subclass writes ------------------------------------------------------

    @abstractmethod
    def _open(self, next_seq: int | None) -> int:
        """Prepare the destination; return the sequence number of the next flush.

        ``next_seq`` comes from a resume snapshot: remove everything flushes
        numbered ``next_seq`` and above left, and return ``next_seq``. It is
        ``None`` on a start without resume state: remove nothing and return a
        number past every flush already there.
        """

    @abstractmethod
    def _write_locked(self, table: pa.Table) -> pa.Table | None:
        """Write ``table`` (one or more flushes numbered from ``self._next_seq``).

        Advance ``self._next_seq`` past every flush that is durably written
        and count ``rows_written``/``write_failures``. Return the rows that
        could not be written (kept buffered, retried), or ``None``.
        """

    def _lost_hint(self) -> str:
        """Where the rows were going, for the message when a final flush fails."""
        return self._spec.name

    # --- resume and snapshot ---------------------------------------------------------

    def _resume(self, state: SinkState | None) -> None:
        """Open the destination from Bytewax's resume state and start the timer."""
        if state is None:
            self._next_seq = self._open(None)
        else:
            next_seq, tables = self._decode(state)
            self._next_seq = self._open(next_seq)
            if tables:
                with self._lock:
                    self._append_locked(pa.concat_tables(tables), time.monotonic())
                    # Publish the restored rows at once: they were flushed before the
                    # crash (or the clean stop) and _open just removed that flush.
                    self._flush_locked()
        self._start_timer()

    def _decode(self, state: SinkState) -> tuple[int, list[pa.Table]]:
        if (
            not isinstance(state, dict)
            or state.get("version") != _STATE_VERSION
            or not isinstance(state.get("next_seq"), int)
            or not isinstance(state.get("buffer"), list)
        ):
            shown = repr(state)[:80]
            msg = (
                f"{self._where}: the recovery snapshot of this sink partition is not a "
                f"version-{_STATE_VERSION} state (got {shown}). Hint: it was written by "
                "another edgesieve version or another sink under the same step id; use a "
                "new recovery directory (outputs already written stay)"
            )
            raise ValueError(msg)
        tables: list[pa.Table] = []
        for chunk in state["buffer"]:
            with pa.ipc.open_stream(pa.py_buffer(chunk)) as reader:
                table = reader.read_all()
            if table.num_rows:
                tables.append(conform(self._spec, table))
        return state["next_seq"], tables

    def snapshot(self) -> SinkState:
        """The next sequence number and the unflushed rows (compressed Arrow IPC)."""
        with self._lock:
            self._snapshot_flush_locked()
            if self._encoded_tables < len(self._tables):
                new = self._tables[self._encoded_tables :]
                table = pa.concat_tables(new) if len(new) > 1 else new[0]
                self._encoded.append(encode_buffer(table))
                self._encoded_tables = len(self._tables)
            return {
                "version": _STATE_VERSION,
                "next_seq": self._next_seq,
                "buffer": list(self._encoded),
            }

    def _snapshot_flush_locked(self) -> None:
        """Hook: flush before a snapshot is taken (by default nothing)."""

    # --- buffering and flushing ------------------------------------------------------

    def write_batch(self, items: list[object]) -> None:
        """Buffer a batch; flush if the size or age limit is reached.

        Items are records (see :func:`connectors.streams.to_table`) or, when the
        first item is a pyarrow ``Table``/``RecordBatch``, Arrow data that is
        cast to the stream schema (see :func:`connectors.streams.conform`).
        """
        if not items:
            return
        if isinstance(items[0], pa.Table | pa.RecordBatch):
            parts = [conform(self._spec, item) for item in items]  # type: ignore[arg-type]
            table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            if not table.num_rows:
                return
        else:
            table = to_table(self._spec, items)
        with self._lock:
            now = time.monotonic()
            self._append_locked(table, now)
            self._flush_due_locked(now)

    def _append_locked(self, table: pa.Table, now: float) -> None:
        self._tables.append(table)
        self._rows += table.num_rows
        self._bytes += table.nbytes
        if self._oldest is None:
            self._oldest = now

    def _flush_all_locked(self) -> None:
        if self._rows and not self._flush_locked():
            logger.error(
                "%s: the final flush on close failed; %d rows (%d bytes) were NOT written "
                "to %s. They are in the last recovery snapshot and are written when the flow "
                "restarts with recovery; without recovery they are lost. See the errors "
                "above for the cause",
                self._where,
                self._rows,
                self._bytes,
                self._lost_hint(),
            )

    def _flush_due_locked(self, now: float) -> None:
        if self._due(now):
            self._flush_locked()

    def _due(self, now: float) -> bool:
        if not self._rows or now < self._retry_at:
            return False
        if self._max_bytes is not None and self._bytes >= self._max_bytes:
            return True
        if self._max_rows is not None and self._rows >= self._max_rows:
            return True
        return self._oldest is not None and now - self._oldest >= self._max_age_s

    def _flush_locked(self) -> bool:
        """Write all buffered rows; keep what fails. Returns whether the buffer is empty."""
        failures_before = self.write_failures
        table = pa.concat_tables(self._tables) if len(self._tables) > 1 else self._tables[0]
        kept = self._write_locked(table)
        now = time.monotonic()
        if kept is None or not kept.num_rows:
            if self._failing_since is not None:
                logger.warning(
                    "%s: writes succeed again after %d failed attempts; nothing was lost",
                    self._where,
                    self.write_failures - self._failing_since,
                )
            self._tables, self._rows, self._bytes, self._oldest = [], 0, 0, None
            self._encoded, self._encoded_tables = [], 0
            self._failing_since = None
            self._last_growth_log = None
            return True
        if self._failing_since is None:
            self._failing_since = failures_before
        if kept is not table:
            self._tables = [kept]
            self._rows = kept.num_rows
            self._bytes = kept.nbytes
            self._encoded, self._encoded_tables = [], 0
        self._retry_at = now + self._retry_s
        self._log_growth(now)
        return False

    def _log_growth(self, now: float) -> None:
        limit = self._max_bytes if self._max_bytes is not None else self._max_rows
        held = self._bytes if self._max_bytes is not None else self._rows
        if limit is None or held <= _GROWTH_FACTOR * limit:
            return
        if (
            self._last_growth_log is not None
            and now - self._last_growth_log < self._growth_log_interval_s
        ):
            return
        self._last_growth_log = now
        logger.error(
            "%s: the write buffer keeps growing: %d rows, %d bytes held in memory, over "
            "%dx %s (%d), because %d writes failed so far. Nothing is dropped; "
            "the process will run out of memory if writes keep failing. Hint: fix the "
            "cause logged above",
            self._where,
            self._rows,
            self._bytes,
            _GROWTH_FACTOR,
            self._size_setting,
            limit,
            self.write_failures,
        )


def encode_buffer(table: pa.Table) -> bytes:
    """Buffered rows for a sink's snapshot: an Arrow IPC stream with LZ4-compressed buffers.

    Compressed in the calling thread, not on Arrow's thread pool: under load
    the flow's threads run below ingest (:mod:`connectors.devices.reader_priority`)
    and a snapshot that handed its buffers to the pool waited 18-35 ms for
    each. LZ4 rather than zstd: zstd creates a compression context for every
    column buffer, which took 6 ms of CPU for 1,000 rows of
    ``telemetry_points`` beside a busy ingest process, LZ4 under 1 ms; the
    bytes are about 1.5 times zstd's. Snapshots written with zstd (before)
    read back the same: the codec is recorded in the stream.
    """
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_BUFFER_OPTIONS) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def recovery_store_id(recovery_dir: Path) -> str:
    """The id of the recovery store in ``recovery_dir``, created on first use.

    A store made anew (the directory deleted and initialised again) gets a
    new id, so a sink can tell "this store never snapshotted me" from "a new
    store". The id lives in ``recovery_dir/edgesieve-store-id``.
    """
    path = Path(recovery_dir) / _STORE_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    temp = path.with_name(f".{_STORE_ID_FILE}.{uuid.uuid4().hex}.tmp")
    with open(temp, "w") as fh:
        fh.write(uuid.uuid4().hex)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)
    _fsync_dir_quiet(path.parent)
    return path.read_text().strip()


def _fsync_dir_quiet(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def check_partitions(where: str, partitions: object) -> int:
    """Validate a sink's fixed partition count; ``where`` names the caller."""
    if (
        isinstance(partitions, bool)
        or not isinstance(partitions, int)
        or not 1 <= partitions <= _MAX_PARTITIONS
    ):
        msg = (
            f"{where}: partitions must be an int from 1 to {_MAX_PARTITIONS}; got "
            f"{partitions!r}. Hint: 4 (keep it unchanged while a recovery store is in use)"
        )
        raise ValueError(msg)
    return partitions


def check_recovery_dir(where: str, recovery_dir: object) -> Path | None:
    """Validate a sink's ``recovery_dir`` argument; ``where`` names the caller."""
    if recovery_dir is None:
        return None
    if not isinstance(recovery_dir, str | os.PathLike):
        msg = (
            f"{where}: recovery_dir must be a path or None; got {type(recovery_dir).__name__}. "
            "Hint: the directory given to bytewax.recovery.RecoveryConfig"
        )
        raise TypeError(msg)
    path = Path(recovery_dir)
    if not path.is_dir():
        msg = (
            f"{where}: recovery_dir {str(path)!r} is not a directory. Hint: create it with "
            "bytewax.recovery.init_db_dir(path, partitions) before building the flow"
        )
        raise ValueError(msg)
    return path
