"""The ingest journal as a Bytewax input: one partition per journal file.

The ingest process commits every accepted device message to the journal
(``connectors.devices.journal``) before it acknowledges the device; the
dataflow reads the journal with :class:`JournalSource`.

Offsets, resume state and release
---------------------------------
Each journal partition numbers its messages with increasing offsets. The
resume state of a partition is the last offset it emitted, so a resumed
partition reads the offsets after it. Without resume state a partition starts
after what its reader (the flow's name) released last.

The lag (committed offsets not yet read: the ``edgesieve_journal_lag_messages``
gauge and the report's ``journal_lag``) stays current during a catch-up: a
full batch re-reads the last committed offset once it has read up to the
known one, and at most every 100 ms otherwise (a one-row query, next to a
batch of up to ``max_batch`` messages).

With recovery (``recovery`` = Bytewax's recovery directory, as ``edgesieve
run`` runs every flow), a partition releases, at each of its snapshots, the
lowest offset that any snapshot still stored in the recovery database holds
for it: Bytewax keeps only the snapshots it could resume from, so nothing a
resume could replay is ever released, and rows in sink buffers and windows
(part of those snapshots) are covered. Without a snapshot of the partition
nothing is released.

Without recovery, release follows Bytewax 0.21.1's epochs. A stateful input
calls ``snapshot()`` at the end of every epoch, only while the dataflow's
probe has passed the previous epochs: every item emitted in an earlier epoch
has gone through every output step. So at each snapshot a partition releases
what it had emitted at the previous snapshot. Rows a sink still buffers and
window state are then not covered: a crash of the flow process loses them.

After a run that ended normally (every sink closed and flushed),
:meth:`JournalSource.release_emitted` releases the rest.

CPU priority
------------
Each read tells :data:`connectors.devices.reader_priority.PRIORITY` whether
the flow is caught up (its oldest message is fresh) or behind (older than
:data:`BEHIND_AGE`): caught up, the reading threads yield the CPU to the
ingest process, whose answers devices wait for. A full read of fresh
messages is caught up too: a burst the ingest process has just committed
is no reason to take a core from it.

Stop
----
The input never ends on its own: a partition raises ``StopIteration`` only
once ``drain`` is set (the ingest process has stopped and committed its last
messages) and it has emitted every committed offset. A clean stop therefore
takes every accepted message through the flow before windows close and sinks
flush.
"""

from __future__ import annotations

import logging
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from connectors.common.stores import corruption
from connectors.devices.journal import JournalReader, journal_partitions
from connectors.devices.journal.format import part_path
from connectors.devices.reader_priority import PRIORITY
from operators.records import RawMessage

__all__ = [
    "JournalProgress",
    "JournalSource",
    "JournalSourcePartition",
    "journal_depth",
    "resumable_offset",
]

log = logging.getLogger("edgesieve.journal")

_PART_PREFIX = "journal-"
_COMMITTED_EVERY_S = 0.1
"""During a catch-up (full batches), re-read the committed offset at most this often."""
READ_BYTES = 8 * 1024 * 1024
"""Payload bytes one read takes at most (and ``max_batch`` messages): a flood of large
messages is read a few at a time, so what the flow holds in flight is bounded by bytes."""
_IDLE_MAX = timedelta(milliseconds=80)
"""Consecutive empty polls wait twice as long each time, up to this: an idle edge sleeps."""
GATHER: Final = timedelta(milliseconds=50)
"""After a batch that read everything committed, the next read waits this long.

Under a steady stream a flow that read again at once would take one or two
messages per read, and pay its per-batch costs (a query, a Bytewax
activation of every step) for each: gathering 50 ms halves the flow's CPU
at 4,000 HTTP requests/s, CPU the ingest process (whose commits devices
wait for) gets instead. Devices never wait for it: their answer follows the
journal commit, not the flow.
"""


BEHIND_AGE: Final = timedelta(milliseconds=250)
"""A read whose oldest message was received longer ago than this finds the flow behind.

The age, not the batch size, decides: a flow yielding the CPU (see
:mod:`connectors.devices.reader_priority`) that cannot keep up reads old
messages within a quarter of a second, and takes its core back; a flow
that keeps up while yielding leaves both cores' worth of slack to ingest.
"""


@dataclass(frozen=True)
class JournalProgress:
    """Where one partition's reader stands: ``lag`` offsets are committed but not yet read."""

    committed: int
    read: int
    released: int

    @property
    def lag(self) -> int:
        """Committed offsets the flow has not read yet."""
        return max(0, self.committed - self.read)


class JournalSourcePartition(StatefulSourcePartition[RawMessage, int]):
    """One journal partition read from ``after`` on; never blocks.

    The reader opens once the journal exists (the ingest process creates it),
    so a flow may start before its ingest process.
    """

    def __init__(
        self,
        root: Path,
        partition: int,
        *,
        reader: str,
        after: int | None,
        drain: threading.Event,
        max_batch: int,
        idle: timedelta,
        gather: timedelta = GATHER,
        on_progress: Callable[[int, JournalProgress], None],
        recovery: tuple[Path, str] | None = None,
    ) -> None:
        self._root = root
        self._recovery = recovery
        self._partition = partition
        self._name = reader
        self._resume = after
        self._drain = drain
        self._max_batch = max_batch
        self._idle = idle
        self._gather = gather
        self._on_progress = on_progress
        self._reader: JournalReader | None = None
        self._after = -1 if after is None else after
        self._committed = -1
        self._committed_at = 0.0  # time.monotonic() of the last last_offset()
        self._released = -1
        self._safe = self._after
        self._awake: datetime | None = None
        self._wait_for = idle
        """How long the next empty poll waits: ``idle``, doubling while nothing comes."""
        self._open()

    def _open(self) -> bool:
        """Open the reader if the journal exists; pick the start offset; return whether open."""
        if self._reader is not None:
            return True
        if journal_partitions(self._root) is None:
            return False
        try:
            reader = JournalReader(self._root, self._partition)
        except FileNotFoundError:
            return False  # the ingest process is creating the journal's files
        try:
            self._released = reader.released(self._name)
        except sqlite3.OperationalError:
            reader.close()  # created, its tables not yet
            return False
        except sqlite3.DatabaseError as exc:  # corrupt: the ingest process replaces it
            reader.close()
            problem = corruption(exc)
            if problem is None:
                raise
            reader.report_damage(problem)
            return False
        self._reader = reader
        if self._resume is None:
            self._after = self._safe = self._released
        self._refresh_committed()
        self._report()
        return True

    def _refresh_committed(self) -> None:
        assert self._reader is not None
        self._committed = max(self._reader.last_offset(), self._after)
        self._committed_at = time.monotonic()

    def _report(self) -> None:
        self._on_progress(
            self._partition, JournalProgress(self._committed, self._after, self._released)
        )

    def next_batch(self) -> list[RawMessage]:
        """Up to ``max_batch`` messages after the last one emitted; ``[]`` when none is new."""
        drained = self._drain.is_set()  # before reading: ingest has committed everything by then
        if not self._open():
            if drained:
                raise StopIteration
            return self._wait()
        assert self._reader is not None
        batch = self._reader.read(self._after, self._max_batch, READ_BYTES)
        if batch:
            self._after = batch[-1][0]
            full = (
                len(batch) == self._max_batch or sum(len(m.payload) for _, m in batch) >= READ_BYTES
            )
            if datetime.now(UTC) - batch[0][1].received_at > BEHIND_AGE:
                PRIORITY.behind(self)  # before the batch is processed
            else:
                PRIORITY.caught_up(self)
            if not full:
                # this read saw everything committed: the flow is caught up
                self._committed = max(self._committed, self._after)
            elif (
                self._after >= self._committed
                or time.monotonic() - self._committed_at >= _COMMITTED_EVERY_S
            ):
                self._refresh_committed()  # catching up: how far behind, for the lag gauge
            self._awake = None if full else datetime.now(UTC) + self._gather
            self._wait_for = self._idle
            self._report()
            return [message for _, message in batch]
        self._refresh_committed()
        self._report()
        if drained and self._after >= self._committed:
            PRIORITY.forget(self)
            raise StopIteration
        PRIORITY.caught_up(self)
        return self._wait()

    def _wait(self) -> list[RawMessage]:
        self._awake = datetime.now(UTC) + self._wait_for
        self._wait_for = min(self._wait_for * 2, max(_IDLE_MAX, self._idle))
        return []

    def next_awake(self) -> datetime | None:
        """At once after a full batch, ``gather`` ahead after a partial one.

        After an empty poll ``idle`` ahead, doubling up to 80 ms.
        """
        return self._awake

    def snapshot(self) -> int:
        """The last emitted offset; releases what no resumable snapshot can replay any more."""
        if self._recovery is not None:
            db_dir, step_id = self._recovery
            self._safe = resumable_offset(db_dir, step_id, f"{_PART_PREFIX}{self._partition}")
        if self._reader is not None and self._safe > self._released:
            self._reader.release(self._name, self._safe)
            self._released = self._safe
            self._report()
        if self._recovery is None:
            self._safe = self._after
        return self._after

    def close(self) -> None:
        """Close the reader (nothing more is released here: the last epoch may be in flight)."""
        PRIORITY.forget(self)
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class JournalSource(FixedPartitionedSource[RawMessage, int]):
    """Device messages from the ingest journal at ``root``, one Bytewax partition per file.

    ``reader`` names this flow's position in the journal (what it released).
    ``partitions`` is the count the ingest process creates the journal with;
    an existing journal's own count wins. Set :attr:`drain` once ingest has
    stopped: each partition ends after emitting everything committed.
    :meth:`progress` gives per-partition committed/read/released offsets.
    ``recovery`` is the Bytewax recovery directory the flow runs with (None:
    none); it decides what is released (see the module docstring).
    """

    def __init__(
        self,
        root: Path,
        *,
        reader: str,
        partitions: int,
        drain: threading.Event | None = None,
        max_batch: int = 1000,
        idle: timedelta = timedelta(milliseconds=5),
        recovery: Path | None = None,
    ) -> None:
        if not reader:
            msg = f"JournalSource({root}): reader must name the flow (got {reader!r})"
            raise ValueError(msg)
        if partitions < 1 or max_batch < 1:
            msg = (
                f"JournalSource({root}): partitions and max_batch must be >= 1 "
                f"(got {partitions}, {max_batch}); hint: journal.partitions in the config"
            )
            raise ValueError(msg)
        self.root = Path(root)
        self.reader = reader
        self.drain = drain if drain is not None else threading.Event()
        self._partitions = partitions
        self._max_batch = max_batch
        self._idle = idle
        self.recovery = None if recovery is None else Path(recovery)
        self._lock = threading.Lock()
        self._progress: dict[int, JournalProgress] = {}

    @property
    def partitions(self) -> int:
        """The journal's partition count (the configured one until the journal exists)."""
        return journal_partitions(self.root) or self._partitions

    def list_parts(self) -> list[str]:
        """Every partition: the journal is local files, so each worker can reach all of them."""
        return [f"{_PART_PREFIX}{p}" for p in range(self.partitions)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> JournalSourcePartition:
        """Open ``journal-N`` after ``resume_state``, or after what ``reader`` released."""
        if not for_part.startswith(_PART_PREFIX) or not for_part[len(_PART_PREFIX) :].isdigit():
            msg = (
                f"JournalSource({self.root}): step {step_id!r} got unknown partition "
                f"{for_part!r}; hint: partitions are named journal-0 .. journal-N"
            )
            raise ValueError(msg)
        return JournalSourcePartition(
            self.root,
            int(for_part[len(_PART_PREFIX) :]),
            reader=self.reader,
            after=resume_state,
            drain=self.drain,
            max_batch=self._max_batch,
            idle=self._idle,
            on_progress=self._set_progress,
            recovery=None if self.recovery is None else (self.recovery, step_id),
        )

    def _set_progress(self, partition: int, progress: JournalProgress) -> None:
        with self._lock:
            self._progress[partition] = progress

    def progress(self) -> dict[int, JournalProgress]:
        """The last seen committed/read/released offsets of each partition read so far."""
        with self._lock:
            return dict(self._progress)

    @property
    def lag(self) -> int:
        """Messages committed to the journal that the flow has not read yet."""
        return sum(p.lag for p in self.progress().values())

    def release_emitted(self) -> None:
        """Release everything emitted: call it only after the dataflow finished normally."""
        for partition, progress in sorted(self.progress().items()):
            if progress.read <= progress.released:
                continue
            reader = JournalReader(self.root, partition)
            try:
                reader.release(self.reader, progress.read)
            finally:
                reader.close()
            self._set_progress(
                partition, JournalProgress(progress.committed, progress.read, progress.read)
            )


def resumable_offset(db_dir: Path, step_id: str, part: str) -> int:
    """The lowest offset of ``part`` in the snapshots stored under ``db_dir``; -1 if none.

    ``db_dir`` is a Bytewax 0.21 recovery directory (``part-N.sqlite3`` files,
    table ``snaps(step_id, state_key, snap_epoch, ser_change)``, states
    pickled). Bytewax deletes a snapshot once a later epoch is complete, so
    what is stored is what a resume could start from. A file that is busy
    or unreadable counts as holding offset -1: nothing is released this time.
    """
    lowest: int | None = None
    for path in sorted(Path(db_dir).glob("part-*.sqlite3")):
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5)
            try:
                rows = db.execute(
                    "SELECT ser_change FROM snaps WHERE step_id = ? AND state_key = ?",
                    (step_id, part),
                ).fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:
            log.debug("recovery snapshots in %s not readable now (%s)", path, exc)
            return -1
        for (blob,) in rows:
            offset = -1 if blob is None else int(pickle.loads(blob))  # noqa: S301 - our state
            lowest = offset if lowest is None else min(lowest, offset)
    return -1 if lowest is None else lowest


def journal_depth(root: Path) -> tuple[int, int]:
    """Messages and payload bytes the journal at ``root`` holds for its readers.

    Held means committed and not yet released by every registered reader
    (rows released but not yet deleted by the writer do not count); (0, 0)
    before the journal exists. Read straight from the partition files
    (read-only, a scan: for scrapes and reports, not the hot path) until the
    journal's read side reports what it holds.
    """
    messages = nbytes = 0
    for partition in range(journal_partitions(root) or 0):
        path = part_path(root, partition)
        if not path.exists():
            continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE seq > "
                "(SELECT coalesce(min(released), -1) FROM readers)"
            ).fetchone()
        except sqlite3.DatabaseError:
            continue  # created, its tables not yet (or corrupt: being replaced)
        finally:
            db.close()
        messages += int(count)
        nbytes += int(size)
    return messages, nbytes
