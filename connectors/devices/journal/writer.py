"""The journal's append side: group commit in a writer thread, bounds, dedup, truncation."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from connectors.common.stores import corruption, is_disk_full
from connectors.devices.journal.admission import Admission
from connectors.devices.journal.checkpointer import Checkpointer
from connectors.devices.journal.format import (
    _COLUMNS,
    CLOSE_TIMEOUT_S,
    DEVICE_CACHE,
    LATENCY_SAMPLES,
    NO_DIGEST,
    NOT_REDELIVERED,
    PROBE_INTERVAL_S,
    READERS_POLL_S,
    TRUNCATE_BEHIND_S,
    TRUNCATE_BUSY_S,
    Committed,
    Done,
    JournalFull,
    JournalSettings,
    JournalStats,
    _percentile,
    check_settings,
    digest_of,
    journal_partitions,
    lock_writer,
    logger,
    partition_of,
    to_us,
)
from connectors.devices.journal.partition import (
    Truncation,
    _insert,
    _Partition,
    plan_truncation,
)
from connectors.devices.journal.upkeep import Upkeep
from operators.records import RawMessage


class _Item(NamedTuple):
    """One queued message (a tuple: made once per message on the submitting thread)."""

    device: str
    channel: str
    transport: str
    received_us: int
    payload: bytes
    size: int
    redelivery: bool
    key: bytes | None
    done: Done
    token: Any
    submitted: float


def _resolve(futures: list[Any], outcomes: list[Committed | BaseException]) -> None:
    """The :meth:`Journal.append` callback of :meth:`Journal.submit`: tokens are futures."""
    for future, outcome in zip(futures, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class Journal(Admission, Upkeep):
    """The append side: one per process, thread-safe, group commit in a writer thread."""

    def __init__(self, settings: JournalSettings) -> None:
        check_settings(settings)
        self.settings = settings
        self.root = Path(settings.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._max_batch = settings.max_batch
        self._linger_s = settings.linger.total_seconds()
        self._last_group = 0
        """Messages in the last group taken (writer thread)."""
        self._want = settings.max_batch
        """Queued messages at which an append wakes the writer (it sets this before it waits)."""
        self._lock_file = lock_writer(self.root)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._parts: list[_Partition] = []
        try:
            recorded = journal_partitions(self.root)
            if recorded is not None and recorded != settings.partitions:
                msg = (
                    f"journal.partitions: the journal at {self.root} was created with "
                    f"{recorded} partitions (got {settings.partitions}); hint: set "
                    f"journal.partitions: {recorded}, or move the journal away once every "
                    "message in it was processed"
                )
                raise ValueError(msg)
            for i in range(settings.partitions):
                self._parts.append(
                    _Partition(self.root, i, settings.partitions, settings.sync, self._cond)
                )
            for part in self._parts:
                while part.truncate_chunk(plan_truncation(part.db, part.truncated, part.last))[0]:
                    pass
            held: dict[str, int] = {}
            for part in self._parts:
                held.update(part.device_bytes())
        except BaseException:
            for part in self._parts:
                part.db.close()
            self._lock_file.close()
            raise
        self._queue: deque[_Item] = deque()
        self._plans: list[Truncation | None] = [None] * settings.partitions
        """Per partition: what is left of the truncation plan being deleted (writer thread)."""
        self._closing = False
        self._open_accounts(settings, held)
        self._device_parts: dict[str, int] = {}
        """Partition of each device seen (writer thread; cleared beyond DEVICE_CACHE)."""
        self._fault_hook: Callable[[sqlite3.Connection], None] | None = None
        """Called at the start of each write transaction (tests inject disk faults with it)."""
        self._closed = False
        self._commits = 0
        self._duplicates = 0
        self._waits: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._writes: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        # the writer thread writes one partition of a group itself, the pool the others
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(
                max_workers=settings.partitions - 1, thread_name_prefix="journal-partition"
            )
            if settings.partitions > 1
            else None
        )
        try:
            self._checkpointer = Checkpointer(self._parts, settings.sync)
        except BaseException:
            for part in self._parts:
                part.db.close()
            self._lock_file.close()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"journal-writer {self.root}", daemon=True
        )
        self._thread.start()

    # -- append side ---------------------------------------------------------------------

    def submit(
        self, msg: RawMessage, *, redelivery: bool = False, dedup_key: bytes | None = None
    ) -> concurrent.futures.Future[Committed]:
        """Queue ``msg``; the future resolves after its durable commit (see the module doc).

        ``redelivery`` (the MQTT DUP flag): an identical recent message is not
        written again. ``dedup_key`` (a transport's identity of the
        transmission, e.g. CoAP's endpoint, message id and token): always
        looked up, so a retransmission after a crash between commit and answer
        is stored once, while a new message with the same content is not
        mistaken for it.

        Never blocks. A refused message (journal over ``max_bytes``, queue full,
        its device over its ``device_share``) gets a future already failed with
        :class:`JournalFull`, and a submission
        after :meth:`close` one failed with ``RuntimeError``; their callbacks run
        in the caller's thread. While the disk is full, messages are still
        queued (their group fails with ``JournalFull("disk full: ...")`` if it
        still is); :meth:`admit` is what pushes devices back meanwhile.
        """
        future: concurrent.futures.Future[Committed] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # a queued message cannot be cancelled
        self.append(msg, _resolve, future, redelivery=redelivery, dedup_key=dedup_key)
        return future

    def append(
        self,
        msg: RawMessage,
        done: Done,
        token: Any = None,
        *,
        redelivery: bool = False,
        dedup_key: bytes | None = None,
    ) -> bool:
        """:meth:`submit` without a future: ``done(tokens, outcomes)`` is called instead.

        ``outcomes`` are the :class:`Committed` places of the messages whose
        ``token`` is in ``tokens`` at the same index, or the exceptions their
        futures would fail with. After each group commit, the writer thread
        calls ``done`` once per run of consecutive messages appended with the
        same ``done``, in submission order, so one callable used for every
        message gets the whole group at once (MQTT queues the group's PUBACKs
        as one write). A refused message gets ``done([token], [error])`` at
        once in the caller's thread. True when the message was queued, False
        when it was refused. Cheaper than a future per message (no lock, no
        condition).
        """
        us = to_us(msg.received_at)  # a naive timestamp is the caller's bug: raise here
        return self.append_received(
            msg.device,
            msg.channel,
            msg.transport,
            us,
            msg.payload,
            done,
            token,
            redelivery=redelivery,
            dedup_key=dedup_key,
        )

    def append_received(
        self,
        device: str,
        channel: str,
        transport: str,
        received_us: int,
        payload: bytes,
        done: Done,
        token: Any = None,
        *,
        redelivery: bool = False,
        dedup_key: bytes | None = None,
        over_share: bool = False,
    ) -> bool:
        """:meth:`append` of a message's fields (``received_us``: microseconds since the epoch).

        For a transport's receiving thread that makes no :class:`RawMessage`
        of its own (MQTT): one tuple queued per message, under one lock.

        ``over_share``: a message whose device already holds its
        ``device_share`` is kept anyway while the journal has room beyond one
        device's share (the reserve left for the devices within theirs),
        rather than refused. For a transport that already told the device
        "accepted" and cannot push one device back alone (MQTT).
        """
        size = len(payload)
        with self._lock:
            refused = self._reserve(device, size, over_share)
            if refused is None:
                queue = self._queue
                queue.append(
                    _Item(
                        device,
                        channel,
                        transport,
                        received_us,
                        payload,
                        size,
                        redelivery,
                        dedup_key,
                        done,
                        token,
                        time.monotonic(),
                    )
                )
                if len(queue) == self._want:
                    self._cond.notify()  # the group the writer waits for is complete
                return True
        done([token], [refused])
        return False

    def stats(self) -> JournalStats:
        """Held messages and bytes, oldest held age, commits and commit latency."""
        with self._cond:
            waits = list(self._waits)
            writes = list(self._writes)
            oldest = [p.oldest_us for p in self._parts if p.oldest_us is not None]
            now_us = to_us(datetime.now(UTC))
            return JournalStats(
                messages=sum(p.count for p in self._parts),
                bytes=sum(p.bytes for p in self._parts),
                oldest_age_s=max(0.0, (now_us - min(oldest)) / 1e6) if oldest else 0.0,
                commits=self._commits,
                commit_p50_ms=_percentile(waits, 0.50) * 1000,
                commit_p99_ms=_percentile(waits, 0.99) * 1000,
                write_p50_ms=_percentile(writes, 0.50) * 1000,
                write_p99_ms=_percentile(writes, 0.99) * 1000,
                queued=len(self._queue),
                duplicates=self._duplicates,
                refused=self._refused,
                refused_share=self._refused_share,
                over_share=self._over_share,
            )

    def close(self) -> None:
        """Commit what was submitted, stop the writer, close the files."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            logger.error("journal %s: writer did not stop in %.0f s", self.root, CLOSE_TIMEOUT_S)
            return
        if self._pool is not None:
            self._pool.shutdown()
        self._checkpointer.close()
        with self._cond:
            self._closed = True
            for part in self._parts:
                part.db.close()
            self._lock_file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = 0.0
        next_probe = 0.0
        while True:
            group = self._take()
            if group:
                self._commit_group(group)
            if self._checkpointer.behind:
                self._catch_up()
            now = time.monotonic()
            if now >= next_poll or not group:
                # idle: at once; busy: every TRUNCATE_BUSY_S, or TRUNCATE_BEHIND_S while a
                # plan has rows left (each chunk a transaction of its own)
                self._truncate()
                left = any(plan is not None for plan in self._plans)
                next_poll = now + (TRUNCATE_BEHIND_S if left else TRUNCATE_BUSY_S)
            if not group and self._disk_full is not None and now >= next_probe and not self._broken:
                next_probe = now + PROBE_INTERVAL_S
                self._probe()
            with self._cond:
                if self._closing and not self._queue:
                    return

    def _take(self) -> list[_Item]:
        """Up to max_batch queued items, waiting up to linger for more once one is there.

        Linger only while fewer wait than the last group held: more are on
        their way then (a burst, devices in lockstep, a backlog). Devices
        that wait for their answer before sending again are all in the queue
        already, and lingering would only delay them. The linger counts from
        the first queued message's submission.

        An idle writer expects a group like the last one: it is woken when
        that many are queued, not by the first of them (a wake-up it cannot
        use, which cost each group commit a GIL hand-off the device servers'
        thread waited out), and looks every ``linger`` meanwhile, so a smaller
        group still commits ``linger`` after its first message. A look that
        finds nothing queued makes it expect single messages again: woken by
        each first one, looking every READERS_POLL_S.
        """
        max_batch = self._max_batch
        linger = self._linger_s
        with self._cond:
            if not self._queue and not self._closing:
                expect = min(max_batch, self._last_group) if linger > 0 else 1
                self._want = max(expect, 1)
                self._cond.wait(linger if expect > 1 else READERS_POLL_S)
                self._want = max_batch
            if not self._queue:
                self._last_group = 0
                return []
            want = min(max_batch, self._last_group)
            if linger > 0 and len(self._queue) < want and not self._closing:
                deadline = self._queue[0].submitted + linger
                self._want = want
                while len(self._queue) < want and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._want = max_batch
            queue = self._queue
            if len(queue) <= max_batch:
                group = list(queue)
                queue.clear()
            else:
                group = [queue.popleft() for _ in range(max_batch)]
            self._last_group = len(group)
            accounts = self._accounts
            for item in group:
                accounts[item.device][1] -= 1  # no longer waiting (its bytes are held still)
            return group

    def _partition_of(self, device: str) -> int:
        """:func:`partition_of`, remembered per device (writer thread)."""
        index = self._device_parts.get(device)
        if index is None:
            if len(self._device_parts) >= DEVICE_CACHE:
                self._device_parts.clear()
            index = self._device_parts[device] = partition_of(device, self.settings.partitions)
        return index

    def _commit_group(self, group: list[_Item]) -> None:
        started = time.monotonic()
        by_part: dict[int, list[int]] = {}  # partition: indexes into group
        parts = self._device_parts
        for i, item in enumerate(group):
            index = parts.get(item.device)
            if index is None:
                index = self._partition_of(item.device)
            places = by_part.get(index)
            if places is None:
                by_part[index] = [i]
            else:
                places.append(i)
        outcomes: list[Committed | BaseException] = [None] * len(group)  # type: ignore[list-item]
        disk_full: str | None = None
        damaged: dict[int, str] = {}
        wrote = False
        writes = self._write_partitions(
            {index: [group[i] for i in places] for index, places in by_part.items()}
        )
        for index, places in by_part.items():
            part = self._parts[index]
            try:
                written = writes[index].result()
            except Exception as exc:  # noqa: BLE001 - every failure goes to the callbacks
                if is_disk_full(exc):
                    disk_full = (
                        f"disk full: {part.path}: {type(exc).__name__}: {exc}; hint: free space "
                        f"on the disk of {self.root}, commits resume by themselves"
                    )
                    error: BaseException = JournalFull(disk_full)
                elif (problem := corruption(exc)) is not None:
                    damaged[index] = problem
                    error = JournalFull(
                        f"journal partition {part.path} is corrupt ({problem}); it is replaced "
                        "by a fresh one; hint: retry"
                    )
                else:
                    logger.exception("journal %s: commit failed", part.path)
                    error = exc
                for i in places:
                    outcomes[i] = error
                continue
            wrote = True
            for i, committed in zip(places, written, strict=True):
                outcomes[i] = committed
        done = time.monotonic()
        with self._cond:
            self._pending_bytes -= sum(item.size for item in group)
            accounts = self._accounts
            for item, outcome in zip(group, outcomes, strict=True):
                if outcome.__class__ is not Committed or outcome.duplicate:  # type: ignore[union-attr]
                    account = accounts[item.device]
                    account[0] -= item.size  # nothing is held for it
                    if not account[0] and not account[1]:
                        del accounts[item.device]
            if wrote:
                self._commits += 1
                self._writes.append(done - started)
                self._waits.append(done - group[0].submitted)
            if disk_full is not None:
                self._disk_full = disk_full
            elif wrote:
                self._disk_full = None
        for index, problem in damaged.items():
            self._heal(index, problem)
        # one call per run of consecutive items with the same callback, in submission order
        start = 0
        count = len(group)
        while start < count:
            callback = group[start].done
            end = start + 1
            while end < count and group[end].done == callback:  # bound methods: ==
                end += 1
            callback([item.token for item in group[start:end]], outcomes[start:end])
            start = end

    def _write_partitions(
        self, by_part: dict[int, list[_Item]]
    ) -> dict[int, concurrent.futures.Future[list[Committed]]]:
        """Write each partition's items in its own transaction, the partitions side by side.

        Each partition is its own file with its own commit (and fsync with
        ``sync=full``): committed in parallel, a group waits for the slowest
        sync rather than for their sum, and the devices' acknowledgements with it.
        """
        pending = iter(by_part.items())
        index, items = next(pending)
        writes = {}
        if self._pool is not None:
            submit = self._pool.submit
            writes = {i: submit(self._write, self._parts[i], rest) for i, rest in pending}
        # the first partition on this thread: with one partition, no hand-off to another thread
        future: concurrent.futures.Future[list[Committed]] = concurrent.futures.Future()
        try:
            future.set_result(self._write(self._parts[index], items))
        except Exception as exc:  # noqa: BLE001 - the caller handles it
            future.set_exception(exc)
        writes[index] = future
        return writes

    def _write(self, part: _Partition, items: list[_Item]) -> list[Committed]:
        """Write ``items`` to ``part`` in one transaction; their results in order.

        A row stores a digest only when it has a dedup key (the key's rows are
        looked up by it); a redelivery is compared with recent unkeyed rows by
        content (:meth:`_Partition.find_redelivery`), so an ordinary message
        costs no hashing.
        """
        db = part.db
        rows: list[object] = []  # the rows' values one after the other (multi-row INSERT)
        outcome: list[Committed] = []
        index = part.index
        last = part.last
        size = 0
        duplicates = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            self._fault(db)
            for item in items:
                key = item.key
                if key is not None:
                    digest = digest_of(item.device, item.channel, item.payload, key)
                    earlier = _in_rows(rows, item, digest)
                    if earlier is None:
                        earlier = part.find(digest)
                    if earlier is not None:
                        outcome.append(Committed(index, earlier, duplicate=True))
                        duplicates += 1
                        continue
                else:
                    digest = NO_DIGEST
                    if item.redelivery:
                        earlier = _in_rows(rows, item, NO_DIGEST)
                        if earlier is None:
                            earlier = part.find_redelivery(item.device, item.channel, item.payload)
                        if earlier is not None:
                            outcome.append(Committed(index, earlier, duplicate=True))
                            duplicates += 1
                            continue
                last += 1
                rows += (
                    last,
                    item.device,
                    item.channel,
                    item.transport,
                    item.received_us,
                    item.payload,
                    item.size,
                    digest,
                )
                size += item.size
                outcome.append(Committed(index, last))
            _insert(db, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._checkpointer.wrote(index)
        written = len(rows) // _COLUMNS
        with self._lock:
            if part.count == 0 and written:
                part.oldest_us = int(rows[4])  # type: ignore[call-overload]
            part.last = last
            part.count += written
            part.bytes += size
            self._held_bytes += size
            self._duplicates += duplicates
        return outcome


def _in_rows(rows: list[object], item: _Item, digest: bytes) -> int | None:
    """The offset of the latest row in ``rows`` (this transaction's) ``item`` repeats, if any.

    Keyed: the same digest. Unkeyed (``digest`` empty): an unkeyed row of the
    same device, channel and payload, from a transport that redelivers. Only
    redeliveries and keyed messages look, and a group holds at most max_batch rows.
    """
    for start in range(len(rows) - _COLUMNS, -1, -_COLUMNS):
        if rows[start + 7] != digest:
            continue
        if digest or (
            rows[start + 1] == item.device
            and rows[start + 2] == item.channel
            and rows[start + 5] == item.payload
            and rows[start + 3] not in NOT_REDELIVERED
        ):
            return rows[start]  # type: ignore[return-value]
    return None
