"""Bytewax sink writing one stream to date-partitioned Parquet files.

Layout (Hive partitioning, readable by ``pyarrow.dataset`` and DuckDB's
``read_parquet(..., hive_partitioning=true)``)::

    root/<stream>/date=YYYY-MM-DD/part-<UTC %Y%m%dT%H%M%S%fZ>-w<worker>-<writer>-<seq>.parquet

``<writer>`` is random per sink partition, so several sinks of one stream
(e.g. two flows writing ``dead_letters``) never pick the same name.

Each worker buffers Arrow tables and rolls a file per UTC date when the
buffer reaches ``max_file_bytes``, when its oldest row has waited
``max_file_age`` (checked on every batch and by a timer thread, so an idle
stream still publishes), and on ``close()``.

A file is written under a hidden temporary name in its final directory,
flushed and fsynced, renamed into place and the directory fsynced: a file is
visible under its final name only when complete. A write that fails
(``ENOSPC``, ``EACCES``, ...) never stops the dataflow and never drops rows:
the error is logged, the rows stay buffered and the write is retried at the
next flush trigger.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from bytewax.outputs import DynamicSink

from connectors.sinks.timed import TimedFlushPartition
from connectors.streams import StreamSpec, conform, spec_of, to_table

__all__ = ["ParquetSettings", "ParquetSink", "ParquetSinkPartition", "OnWrite"]

logger = logging.getLogger("edgesieve.parquet")

OnWrite = Callable[[str, int, int], None]
"""``on_write(stream, rows, file_bytes)``, called after each published file."""

_CODECS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")
_GROWTH_FACTOR = 4
_GROWTH_LOG_INTERVAL_S = 60.0

_HINTS = {
    errno.ENOSPC: "free disk space on that volume or point data_dir at a larger one",
    errno.EDQUOT: "the disk quota of the user running the flow is used up; raise or free it",
    errno.EACCES: "check that the user running the flow may create and write files there",
    errno.EPERM: "check that the user running the flow may create and write files there",
    errno.EROFS: "the filesystem is mounted read-only; remount it read-write or move data_dir",
    errno.ENOTDIR: "a path component is a file, not a directory; move it out of the way",
    errno.EIO: "the device reported an I/O error; check the disk and the kernel log",
}


def _available_codecs() -> list[str]:
    return [c for c in _CODECS if c == "none" or pa.Codec.is_available(c)]


@dataclass(frozen=True)
class ParquetSettings:
    """When to roll files and how to compress them.

    ``max_file_bytes`` is the size of the buffered (uncompressed, in-memory)
    Arrow data at which a file is rolled; files on disk are smaller.
    ``max_file_age`` is how long the oldest buffered row may wait.
    ``retry_interval`` is the least time between a failed write and its retry,
    so a full disk is not hammered on every batch (``0`` retries at once).
    """

    max_file_bytes: int = 64 * 1024 * 1024
    max_file_age: timedelta = timedelta(seconds=60)
    compression: str = "zstd"
    retry_interval: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        size = self.max_file_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            msg = (
                f"ParquetSettings.max_file_bytes must be a positive int (bytes); got {size!r}. "
                "Hint: the default is 64 MiB, 64 * 1024 * 1024"
            )
            raise ValueError(msg)
        for name in ("max_file_age", "retry_interval"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value < timedelta(0):
                msg = (
                    f"ParquetSettings.{name} must be a non-negative datetime.timedelta; "
                    f"got {value!r}. Hint: timedelta(seconds=60)"
                )
                raise ValueError(msg)
        if self.max_file_age <= timedelta(0):
            msg = (
                f"ParquetSettings.max_file_age must be greater than zero; got "
                f"{self.max_file_age!r}. Hint: timedelta(seconds=60)"
            )
            raise ValueError(msg)
        codecs = _available_codecs()
        codec = self.compression.lower() if isinstance(self.compression, str) else None
        if codec not in codecs:
            msg = (
                f"ParquetSettings.compression {self.compression!r} is not a Parquet codec "
                f"available in this pyarrow; use one of: {', '.join(codecs)}"
            )
            raise ValueError(msg)
        object.__setattr__(self, "compression", codec)


class ParquetSink(DynamicSink[object]):
    """Write the records of one stream (see :data:`connectors.streams.STREAMS`).

    Items are records with attributes (or dict keys) named like the stream's
    columns, or pyarrow tables / record batches with those columns. Every
    worker writes its own files (``-w<worker>-`` in the name).
    ``on_write(stream, rows, file_bytes)`` is called after each published
    file, from the worker thread or from the partition's timer thread, so it
    must be thread-safe.
    """

    def __init__(
        self,
        root: Path,
        stream: str | StreamSpec,
        *,
        settings: ParquetSettings = ParquetSettings(),
        on_write: OnWrite | None = None,
    ) -> None:
        spec = spec_of(stream, "ParquetSink")
        stream = spec.name
        if not isinstance(settings, ParquetSettings):
            msg = (
                f"ParquetSink({stream!r}): settings must be a ParquetSettings; "
                f"got {type(settings).__name__}"
            )
            raise TypeError(msg)
        if on_write is not None and not callable(on_write):
            msg = (
                f"ParquetSink({stream!r}): on_write must be callable as "
                f"on_write(stream, rows, file_bytes); got {type(on_write).__name__}"
            )
            raise TypeError(msg)
        root = Path(root)
        if root.exists() and not root.is_dir():
            msg = (
                f"ParquetSink({stream!r}): root {str(root)!r} exists and is not a directory. "
                "Hint: point it at a directory (it is created if missing)"
            )
            raise ValueError(msg)
        self.root = root
        self.spec: StreamSpec = spec
        self.settings = settings
        self.on_write = on_write

    def build(self, step_id: str, worker_index: int, worker_count: int) -> ParquetSinkPartition:
        """Build this worker's partition (starts its timer thread)."""
        return ParquetSinkPartition(
            root=self.root,
            spec=self.spec,
            settings=self.settings,
            on_write=self.on_write,
            worker_index=worker_index,
            step_id=step_id,
        )


class ParquetSinkPartition(TimedFlushPartition):
    """One worker's buffer and files; see :class:`ParquetSink`.

    Counters for monitoring and tests: ``files_written``, ``rows_written``,
    ``write_failures`` (failed file writes), and the ``buffered_rows`` and
    ``buffered_bytes`` properties.
    """

    def __init__(
        self,
        *,
        root: Path,
        spec: StreamSpec,
        settings: ParquetSettings,
        on_write: OnWrite | None,
        worker_index: int,
        step_id: str,
    ) -> None:
        self._root = Path(root)
        self._spec = spec
        self._settings = settings
        self._on_write = on_write
        self._worker = worker_index
        self._init_timer(
            where=f"ParquetSink {step_id!r} (stream {spec.name!r}, worker {worker_index})",
            thread=f"parquet-{spec.name}-w{worker_index}",
            max_age_s=settings.max_file_age.total_seconds(),
            retry_s=settings.retry_interval.total_seconds(),
        )
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._bytes = 0
        self._oldest: float | None = None
        self._last_growth_log: float | None = None
        self._failing_since: int | None = None
        self._seq = 0
        self._writer = secrets.token_hex(3)
        self.files_written = 0
        self.rows_written = 0
        self.write_failures = 0
        self._growth_log_interval_s = _GROWTH_LOG_INTERVAL_S
        self._start_timer()

    @property
    def buffered_rows(self) -> int:
        """Rows held in memory, not yet in a published file."""
        return self._rows

    @property
    def buffered_bytes(self) -> int:
        """Arrow bytes held in memory, not yet in a published file."""
        return self._bytes

    def write_batch(self, items: list[object]) -> None:
        """Buffer a batch; roll files if the size or age limit is reached.

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
            self._tables.append(table)
            self._rows += table.num_rows
            self._bytes += table.nbytes
            if self._oldest is None:
                self._oldest = now
            self._flush_due_locked(now)

    def _flush_all_locked(self) -> None:
        if self._rows and not self._flush_locked():
            logger.error(
                "%s: the final flush on close failed; %d rows (%d bytes) were NOT written "
                "to %s and are lost. See the errors above for the cause",
                self._where,
                self._rows,
                self._bytes,
                self._root / self._spec.name,
            )

    def _flush_due_locked(self, now: float) -> None:
        if self._due(now):
            self._flush_locked()

    def _due(self, now: float) -> bool:
        if not self._rows or now < self._retry_at:
            return False
        if self._bytes >= self._settings.max_file_bytes:
            return True
        return self._oldest is not None and now - self._oldest >= self._max_age_s

    def _flush_locked(self) -> bool:
        """Write all buffered rows, one file per UTC date; keep what fails.

        Returns whether the buffer is now empty. Call with the lock held.
        """
        failures_before = self.write_failures
        table = pa.concat_tables(self._tables) if len(self._tables) > 1 else self._tables[0]
        kept: list[pa.Table] = []
        for day, part in self._split_by_date(table):
            if self._publish(day, part):
                self.files_written += 1
                self.rows_written += part.num_rows
            else:
                kept.append(part)
        now = time.monotonic()
        if not kept:
            if self._failing_since is not None:
                logger.warning(
                    "%s: writes succeed again after %d failed attempts; nothing was lost",
                    self._where,
                    self.write_failures - self._failing_since,
                )
            self._tables, self._rows, self._bytes, self._oldest = [], 0, 0, None
            self._failing_since = None
            self._last_growth_log = None
            return True
        if self._failing_since is None:
            self._failing_since = failures_before
        self._tables = kept
        self._rows = sum(t.num_rows for t in kept)
        self._bytes = sum(t.nbytes for t in kept)
        self._retry_at = now + self._retry_s
        limit = _GROWTH_FACTOR * self._settings.max_file_bytes
        if self._bytes > limit and (
            self._last_growth_log is None
            or now - self._last_growth_log >= self._growth_log_interval_s
        ):
            self._last_growth_log = now
            logger.error(
                "%s: the write buffer keeps growing: %d rows, %d bytes held in memory, over "
                "%dx max_file_bytes (%d), because %d writes failed so far. Nothing is dropped; "
                "the process will run out of memory if writes keep failing. Hint: fix the "
                "cause logged above",
                self._where,
                self._rows,
                self._bytes,
                _GROWTH_FACTOR,
                self._settings.max_file_bytes,
                self.write_failures,
            )
        return False

    def _split_by_date(self, table: pa.Table) -> list[tuple[date, pa.Table]]:
        days = pc.cast(table[self._spec.time_column], pa.date32())
        unique = pc.unique(days)
        if len(unique) == 1:
            return [(unique[0].as_py(), table)]
        return [
            (day, table.filter(pc.equal(days, pa.scalar(day, pa.date32()))))
            for day in sorted(unique.to_pylist())
        ]

    def _publish(self, day: date, table: pa.Table) -> bool:
        """Write one complete file atomically; log and return False on failure."""
        directory = self._root / self._spec.name / f"date={day.isoformat()}"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self._seq += 1
        name = f"part-{stamp}-w{self._worker}-{self._writer}-{self._seq:06d}.parquet"
        final = directory / name
        temp = directory / f".{name}.tmp"
        try:
            self._ensure_dir(directory)
            with open(temp, "wb") as fh:
                pq.write_table(table, fh, compression=self._settings.compression)
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
            os.replace(temp, final)
        except Exception as exc:
            self.write_failures += 1
            self._log_failure(table.num_rows, final, exc)
            self._remove_temp(temp)
            return False
        self._fsync_dir(directory)
        if self._on_write is not None:
            try:
                self._on_write(self._spec.name, table.num_rows, size)
            except Exception:
                logger.exception(
                    "%s: the on_write callback raised for %s (%d rows); the file is "
                    "published and writing continues",
                    self._where,
                    final,
                    table.num_rows,
                )
        return True

    def _log_failure(self, rows: int, final: Path, exc: Exception) -> None:
        code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
        code_name = errno.errorcode.get(code, str(code)) if code is not None else "none"
        hint = _HINTS.get(code, "check the path, the filesystem and the error above")
        logger.error(
            "%s: could not write %d rows to %s: %s: %s (errno %s). The rows stay buffered "
            "(%d rows, %d bytes in memory) and the write is retried at the next flush "
            "(at the earliest in %.1fs). Hint: %s",
            self._where,
            rows,
            final,
            type(exc).__name__,
            exc,
            code_name,
            self._rows,
            self._bytes,
            self._retry_s,
            hint,
        )

    def _remove_temp(self, temp: Path) -> None:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning(
                "%s: could not remove the incomplete temporary file %s: %s. It is hidden "
                "from dataset readers; delete it by hand",
                self._where,
                temp,
                exc,
            )

    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` and missing parents, fsyncing each new entry.

        Checked for every file (one ``stat``), so a date directory removed by
        retention cleanup is simply created again.
        """
        missing: list[Path] = []
        path = directory
        while not path.is_dir():
            missing.append(path)
            path = path.parent
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            self._fsync_dir(path.parent)

    def _fsync_dir(self, directory: Path) -> None:
        """Make a rename or new entry in ``directory`` durable."""
        try:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOTSUP):
                return
            logger.warning(
                "%s: could not fsync directory %s: %s; the files in it are complete but "
                "may not survive a power loss",
                self._where,
                directory,
                exc,
            )
