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

Release follows Bytewax 0.21.1's epochs. A stateful input calls
``snapshot()`` at the end of every epoch (``epoch_interval``, 10 s by default),
with or without a recovery config, and only while the dataflow's probe has
passed the previous epochs: every item emitted in an earlier epoch has gone
through every output step (without recovery the probe watches the outputs;
with recovery it watches the written snapshots). So at each snapshot a
partition releases what it had emitted at the previous snapshot, never the
current epoch. After a run that ended normally (every sink closed and
flushed), :meth:`JournalSource.release_emitted` releases the rest.

What this rule does not cover: rows a sink buffers and window state are not
on disk when their items pass the output step, so a crash of the flow process
loses what was released but still buffered or windowed. Tying release to
recovery snapshots closes that gap.

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
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from connectors.devices.journal import JournalReader, journal_partitions
from connectors.devices.journal.format import part_path
from operators.records import RawMessage

__all__ = ["JournalProgress", "JournalSource", "JournalSourcePartition", "journal_depth"]

log = logging.getLogger("edgesieve.journal")

_PART_PREFIX = "journal-"


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
        on_progress: Callable[[int, JournalProgress], None],
    ) -> None:
        self._root = root
        self._partition = partition
        self._name = reader
        self._resume = after
        self._drain = drain
        self._max_batch = max_batch
        self._idle = idle
        self._on_progress = on_progress
        self._reader: JournalReader | None = None
        self._after = -1 if after is None else after
        self._committed = -1
        self._released = -1
        self._safe = self._after
        self._awake: datetime | None = None
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
        self._reader = reader
        if self._resume is None:
            self._after = self._safe = self._released
        self._committed = self._reader.last_offset()
        self._report()
        return True

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
        batch = self._reader.read(self._after, self._max_batch)
        if batch:
            self._after = batch[-1][0]
            self._committed = max(self._committed, self._after)
            self._awake = None
            self._report()
            return [message for _, message in batch]
        self._committed = self._reader.last_offset()
        self._report()
        if drained and self._after >= self._committed:
            raise StopIteration
        return self._wait()

    def _wait(self) -> list[RawMessage]:
        self._awake = datetime.now(UTC) + self._idle
        return []

    def next_awake(self) -> datetime | None:
        """A few milliseconds ahead after an empty poll; at once while there is more."""
        return self._awake

    def snapshot(self) -> int:
        """The last emitted offset; releases what was emitted before the previous snapshot."""
        if self._reader is not None and self._safe > self._released:
            self._reader.release(self._name, self._safe)
            self._released = self._safe
            self._report()
        self._safe = self._after
        return self._after

    def close(self) -> None:
        """Close the reader (nothing more is released here: the last epoch may be in flight)."""
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
        except sqlite3.OperationalError:
            continue  # created, its tables not yet
        finally:
            db.close()
        messages += int(count)
        nbytes += int(size)
    return messages, nbytes
