"""Ingest journal: device messages committed to disk before devices are told "accepted".

The journal is ``partitions`` SQLite files ``part-<i>.sqlite`` (WAL) under
``data_dir/journal``; a device's messages always go to partition
:func:`partition_of` of its id, so their order is kept. Each file's WAL is
extended with zeros to ``WAL_PREALLOC_BYTES`` when the writer opens it (while
the disk keeps ``WAL_PREALLOC_SPARE_BYTES`` free), so commits write inside the
file and their syncs need not make a new file size durable.

- **Append** (:class:`Journal`, one per process, guarded by an exclusive lock on
  ``writer.lock``): :meth:`Journal.submit` queues a message and returns a future
  at once; :meth:`Journal.append` does the same with a callback instead (no
  future per message; one call per group for the messages appended with the
  same callback), :meth:`Journal.append_received` with the fields instead of a
  ``RawMessage``. A writer thread takes up to ``max_batch`` queued
  messages (while fewer than its last group wait, up to ``linger`` after the
  first for more; an idle writer is woken once as many as its last group are
  queued, or looks every ``linger``), writes them in one transaction
  per partition (multi-row INSERTs; the partitions of a group are written and
  committed side by side), commits (``synchronous=FULL`` or ``NORMAL``), then
  resolves the futures and calls the callbacks in submission order, on the
  writer thread. A partition's part of a group is written whole or not at all.
- **Offsets** are the rows' ``INTEGER PRIMARY KEY AUTOINCREMENT`` values, from 0,
  assigned by the writer; ``sqlite_sequence`` keeps the highest one ever used,
  so offsets are never reused after truncation or a restart.
- **Bounds**: payload bytes held (committed and not released by every
  registered reader, plus those waiting to be committed) never exceed
  ``max_bytes``; at most ``4 * max_batch`` messages wait for the writer. Beyond
  either, and while the disk is full, futures fail with :class:`JournalFull`
  and :meth:`Journal.admit` gives the reason. One device's messages may hold
  at most ``device_share`` of both (a dict of per-device counts under the
  append lock; :meth:`Journal.admit` with the device says so); a transport
  that cannot push one device back alone (MQTT) appends with ``over_share``
  and is refused only once less than one share would be left. A disk-full commit is rolled
  back; the writer keeps running and the next successful commit clears it.
- **Redelivery** (MQTT DUP): a redelivered message equal (device, channel,
  payload) to an unkeyed row of a transport that redelivers (not HTTP or
  CoAP) among the partition's last :data:`DEDUP_WINDOW` offsets is not
  written again (compared by content, so ordinary rows store no digest). A
  message with a ``dedup_key`` (CoAP retransmissions) stores a
  ``blake2b``-128 digest of key and content, indexed, and is looked up by it.
  Rows of that window that are released and deleted leave their digest in a
  ``recent`` table, so a retransmission that comes after its first copy was
  processed (the device got no answer because the edge crashed after the
  commit) is still recognised.
- **Truncation**: a reader (:class:`JournalReader`, any process) registers by
  its first :meth:`JournalReader.release`; the writer deletes rows at or below
  the lowest offset released by every registered reader, in chunks of
  :data:`TRUNCATE_CHUNK` rows (one every ``TRUNCATE_BEHIND_S`` between group
  commits while released rows are left), and runs an incremental vacuum when idle so the
  files shrink. With no registered reader nothing is deleted; a reader that
  registers later starts from what is still held. The writer's checkpointer
  thread finds what there is to delete (and the digests it keeps), so the
  writer, whose every statement waits for the GIL behind busy device servers,
  deletes a chunk in a few statements.
"""

from connectors.devices.journal.format import (
    DEDUP_WINDOW,
    SYNC_MODES,
    TRUNCATE_CHUNK,
    Committed,
    JournalFull,
    JournalSettings,
    JournalStats,
    journal_partitions,
    partition_of,
)
from connectors.devices.journal.reader import JournalReader
from connectors.devices.journal.writer import Journal

__all__ = [
    "DEDUP_WINDOW",
    "SYNC_MODES",
    "TRUNCATE_CHUNK",
    "Committed",
    "Journal",
    "JournalFull",
    "JournalReader",
    "JournalSettings",
    "JournalStats",
    "journal_partitions",
    "partition_of",
]
