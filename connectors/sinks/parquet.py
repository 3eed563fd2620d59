"""Bytewax sink writing one stream to date-partitioned Parquet files, exactly once.

Layout (Hive partitioning, readable by ``pyarrow.dataset`` and DuckDB's
``read_parquet(..., hive_partitioning=true)``)::

    root/<stream>/date=YYYY-MM-DD/part-<step_id>-p<partition>-<seq:08d>.parquet

:class:`ParquetSink` is a Bytewax ``FixedPartitionedSink``: its items are
``(key, record)`` pairs (the key is the device id); Bytewax routes each key
to one of a fixed number of partitions (``partitions``, default 4) with
its stable ``adler32`` hash, and every partition writes its own numbered
files. The partition count must stay the same for as long as a recovery
store is in use: it is part of the snapshot keys and of the routing.

Each partition buffers Arrow tables and rolls a file per UTC date when the
buffer reaches ``max_file_bytes``, when its oldest row has waited
``max_file_age`` (checked on every batch and by a timer thread, so an idle
stream still publishes), and on ``close()``.

A file is written under a hidden temporary name in its final directory,
flushed and fsynced, renamed into place and the directory fsynced: a file is
visible under its final name only when complete. A write that fails
(``ENOSPC``, ``EACCES``, ...) never stops the dataflow and never drops rows:
the error is logged, the rows stay buffered (and in the recovery snapshot)
and the write is retried at the next flush trigger.

Exactly once across Bytewax recovery (see :mod:`connectors.sinks.timed`):
a partition's snapshot is the sequence number of its next file and the rows
it holds that are in no file yet. Resumed from a snapshot, the partition
deletes its files numbered from that sequence number on (written after the
snapshot; the replay writes their rows again) and its leftover temporary
files, restores the buffered rows and publishes them at once. Without
resume state it never deletes or overwrites a file of an earlier run: it
numbers on after the highest file of its step and partition, except when
the sink is told the ``recovery_dir`` and that same recovery store already
started this partition without ever committing a snapshot of it (a crash
in the first epoch): then the files of those runs are deleted, because the
input replays their rows. A marker file
``root/<stream>/.sink-<step_id>-p<partition>.json`` remembers where a
recovery store started each partition.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from bytewax.outputs import FixedPartitionedSink

from connectors.sinks.timed import (
    ReplaySafePartition,
    SinkState,
    check_partitions,
    check_recovery_dir,
    recovery_store_id,
)
from connectors.streams import StreamSpec, spec_of

__all__ = ["OnWrite", "ParquetSettings", "ParquetSink", "ParquetSinkPartition"]

logger = logging.getLogger("edgesieve.parquet")

OnWrite = Callable[[str, int, int], None]
"""``on_write(stream, rows, file_bytes)``, called after each published file."""

_CODECS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

_HINTS = {
    errno.ENOSPC: "free disk space on that volume or point data_dir at a larger one",
    errno.EDQUOT: "the disk quota of the user running the flow is used up; raise or free it",
    errno.EACCES: "check that the user running the flow may create and write files there",
    errno.EPERM: "check that the user running the flow may create and write files there",
    errno.EROFS: "the filesystem is mounted read-only; remount it read-write or move data_dir",
    errno.ENOTDIR: "a path component is a file, not a directory; move it out of the way",
    errno.EIO: "the device reported an I/O error; check the disk and the kernel log",
    errno.EEXIST: (
        "another process writes the same flow and step to this directory; give each "
        "running flow its own data_dir or flow id"
    ),
}


def _available_codecs() -> list[str]:
    return [c for c in _CODECS if c == "none" or pa.Codec.is_available(c)]


def safe_name(step_id: str) -> str:
    """``step_id`` with characters unsafe in file names replaced by ``_``."""
    return _UNSAFE.sub("_", step_id)


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


class ParquetSink(FixedPartitionedSink[object, SinkState]):
    """Write the records of one stream (see :data:`connectors.streams.STREAMS`), exactly once.

    Items are ``(key, record)`` pairs, the key a string (the device id) that
    picks the partition; a record has attributes (or dict keys) named like
    the stream's columns, or is a pyarrow table / record batch with those
    columns. ``partitions`` is fixed: keep it while a recovery store is in
    use. ``recovery_dir`` is the Bytewax recovery directory the flow runs
    with (``None`` without recovery); see the module docs.
    ``on_write(stream, rows, file_bytes)`` is called after each published
    file, from the worker thread or from the partition's timer thread, so it
    must be thread-safe.
    """

    def __init__(
        self,
        root: Path,
        stream: str | StreamSpec,
        *,
        partitions: int = 4,
        settings: ParquetSettings = ParquetSettings(),
        on_write: OnWrite | None = None,
        recovery_dir: Path | None = None,
    ) -> None:
        spec = spec_of(stream, "ParquetSink")
        stream = spec.name
        where = f"ParquetSink({stream!r})"
        if not isinstance(settings, ParquetSettings):
            msg = f"{where}: settings must be a ParquetSettings; got {type(settings).__name__}"
            raise TypeError(msg)
        if on_write is not None and not callable(on_write):
            msg = (
                f"{where}: on_write must be callable as on_write(stream, rows, file_bytes); "
                f"got {type(on_write).__name__}"
            )
            raise TypeError(msg)
        root = Path(root)
        if root.exists() and not root.is_dir():
            msg = (
                f"{where}: root {str(root)!r} exists and is not a directory. "
                "Hint: point it at a directory (it is created if missing)"
            )
            raise ValueError(msg)
        self.root = root
        self.spec: StreamSpec = spec
        self.settings = settings
        self.on_write = on_write
        self.partitions = check_partitions(where, partitions)
        self.recovery_dir = check_recovery_dir(where, recovery_dir)

    def list_parts(self) -> list[str]:
        """All partitions: every worker of this machine can write the directory."""
        return [f"p{i}" for i in range(self.partitions)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: SinkState | None
    ) -> ParquetSinkPartition:
        """Build or resume one partition (starts its timer thread)."""
        return ParquetSinkPartition(self, step_id=step_id, part=for_part, state=resume_state)


class ParquetSinkPartition(ReplaySafePartition):
    """One partition's buffer and files; see :class:`ParquetSink`.

    Counters for monitoring and tests: ``files_written``, ``rows_written``,
    ``write_failures`` (failed file writes), ``files_removed`` (files of a
    replayed epoch deleted on resume), and the ``buffered_rows`` and
    ``buffered_bytes`` properties.
    """

    def __init__(
        self, sink: ParquetSink, *, step_id: str, part: str, state: SinkState | None
    ) -> None:
        spec = sink.spec
        settings = sink.settings
        self._root = sink.root
        self._settings = settings
        self._on_write = sink.on_write
        self._recovery_dir = sink.recovery_dir
        self._part = part
        self._prefix = f"part-{safe_name(step_id)}-{part}-"
        self._init_timer(
            where=f"ParquetSink {step_id!r} (stream {spec.name!r}, partition {part})",
            thread=f"parquet-{spec.name}-{part}",
            max_age_s=settings.max_file_age.total_seconds(),
            retry_s=settings.retry_interval.total_seconds(),
        )
        self._init_buffer(
            spec, max_bytes=settings.max_file_bytes, max_rows=None, size_setting="max_file_bytes"
        )
        self.files_written = 0
        self.files_removed = 0
        self._resume(state)

    # --- resume ----------------------------------------------------------------------

    def _open(self, next_seq: int | None) -> int:
        stream_dir = self._root / self._spec.name
        files, temps = self._own_files(stream_dir)
        for temp in temps:
            self._unlink(temp)
        if next_seq is None:
            next_seq = self._fresh_start(stream_dir, files)
        stale = [path for seq, path in files if seq >= next_seq]
        for path in stale:
            self._unlink(path)
            self.files_removed += 1
        for directory in {p.parent for p in stale + temps}:
            self._fsync_dir(directory)
        if stale:
            logger.info(
                "%s: resumed at file %d; removed %d file(s) written after the recovery "
                "snapshot, the replay writes their rows again",
                self._where,
                next_seq,
                len(stale),
            )
        return next_seq

    def _fresh_start(self, stream_dir: Path, files: list[tuple[int, Path]]) -> int:
        """The first sequence number without resume state (see the module docs)."""
        after = max((seq for seq, _ in files), default=-1) + 1
        if self._recovery_dir is None:
            return after
        store = recovery_store_id(self._recovery_dir)
        marker = stream_dir / f".sink-{self._prefix[5:-1]}.json"
        try:
            recorded = json.loads(marker.read_text())
            if recorded.get("store") == store and isinstance(recorded.get("base"), int):
                return int(recorded["base"])
        except (FileNotFoundError, ValueError, AttributeError):
            pass
        self._ensure_dir(stream_dir)
        temp = marker.with_name(f"{marker.name}.tmp")
        with open(temp, "w") as fh:
            json.dump({"store": store, "base": after}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, marker)
        self._fsync_dir(stream_dir)
        return after

    def _own_files(self, stream_dir: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
        """The published files (with their numbers) and temporary files of this partition."""
        files: list[tuple[int, Path]] = []
        temps: list[Path] = []
        prefix = self._prefix
        hidden = "." + prefix
        try:
            days = [e for e in os.scandir(stream_dir) if e.name.startswith("date=")]
        except FileNotFoundError:
            return files, temps
        for day in days:
            try:
                entries = list(os.scandir(day.path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(prefix) and name.endswith(".parquet"):
                    number = name[len(prefix) : -len(".parquet")]
                    if number.isdigit():
                        files.append((int(number), Path(entry.path)))
                elif name.startswith(hidden) and name.endswith(".tmp"):
                    temps.append(Path(entry.path))
        return files, temps

    def _unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _lost_hint(self) -> str:
        return str(self._root / self._spec.name)

    # --- writing ---------------------------------------------------------------------

    def _write_locked(self, table: pa.Table) -> pa.Table | None:
        """Write one file per UTC date; return the rows of the dates that failed."""
        parts = self._split_by_date(table)
        kept: list[pa.Table] = []
        for day, part in parts:
            if self._publish(day, part):
                self.files_written += 1
                self.rows_written += part.num_rows
            else:
                kept.append(part)
        if not kept:
            return None
        if len(kept) == len(parts):
            return table
        return pa.concat_tables(kept)

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
        name = f"{self._prefix}{self._next_seq:08d}.parquet"
        final = directory / name
        temp = directory / f".{name}.tmp"
        try:
            self._ensure_dir(directory)
            if final.exists():
                raise FileExistsError(errno.EEXIST, "a file of that name is already there")
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
        self._next_seq += 1
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
