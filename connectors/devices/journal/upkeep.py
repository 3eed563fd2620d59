"""The journal writer's upkeep between group commits: deletion, checkpoints, probes, healing.

:class:`Upkeep` is the part of :class:`~connectors.devices.journal.Journal`
its writer thread runs while no group waits: it deletes what every reader
released (the checkpointer thread's plans), finishes checkpoints the
checkpointer could not, probes a full disk until writes succeed again, and
replaces a partition found corrupt. See the package docstring (Truncation).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from connectors.common.stores import corruption
from connectors.devices.journal.checkpointer import FLAGGED, Checkpointer
from connectors.devices.journal.format import (
    PROBE_BYTES,
    VACUUM_PAGES,
    JournalSettings,
    damage_flag,
    flagged,
    logger,
)
from connectors.devices.journal.partition import Truncation, _Partition


class Upkeep:
    """The writer thread's work between groups (a mixin of the journal, like its admission).

    Every attribute is the journal's; the writer thread calls these methods
    only, between group commits.
    """

    settings: JournalSettings
    root: Path
    _parts: list[_Partition]
    _checkpointer: Checkpointer
    _plans: list[Truncation | None]
    _broken: str | None
    _disk_full: str | None
    _held_bytes: int
    _accounts: dict[str, list[int]]
    _queue: Any
    _lock: threading.Lock
    _cond: threading.Condition
    _fault_hook: Callable[[sqlite3.Connection], None] | None
    _released: Callable[[int, dict[str, int]], None]

    def _fault(self, db: sqlite3.Connection) -> None:
        """The fault injected into a write of ``db``, if a test set one."""
        hook = self._fault_hook
        if hook is not None:
            hook(db)

    def _probe(self) -> None:
        """Write and delete PROBE_BYTES in each partition; clear the disk-full state if it works."""
        for part in self._parts:
            db = part.db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._fault(db)
                    db.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', zeroblob(?))",
                        (PROBE_BYTES,),
                    )
                    db.execute("DELETE FROM meta WHERE key = 'probe'")
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except Exception as exc:  # noqa: BLE001 - still full (or worse): try again later
                logger.info("journal %s: write probe failed: %s", part.path, exc)
                return
        with self._cond:
            self._disk_full = None

    def _catch_up(self) -> None:
        """Finish the checkpoints the checkpointer could not (the WAL starts over next commit)."""
        for index in self._checkpointer.take_behind():
            part = self._parts[index]
            try:
                part.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                if (problem := corruption(exc)) is not None:
                    self._heal(index, problem)
                else:
                    logger.info("journal %s: checkpoint failed: %s", part.path, exc)

    def _truncate(self) -> None:
        """Delete what the checkpointer found released, vacuum, heal what a reader flagged.

        The checkpointer's survey reads what there is to do, so an idle pass
        costs no statement here.
        """
        if self._broken is not None:
            return
        for part in self._parts:
            survey = self._checkpointer
            try:
                index = part.index
                plan = self._plans[index] or survey.take_plan(index)
                self._plans[index] = None  # a failed chunk: the next survey plans again
                count, size, sizes, self._plans[index] = part.truncate_chunk(plan)
                if count:
                    with self._lock:
                        self._released(size, sizes)
                elif survey.free_pages[part.index] > VACUUM_PAGES:
                    survey.free_pages[part.index] = 0
                    part.vacuum_chunk()
            except sqlite3.Error as exc:
                if (problem := corruption(exc)) is not None:
                    self._heal(part.index, problem)
                else:
                    logger.exception("journal %s: truncation failed", part.path)
        for part in self._parts:
            problem = self._checkpointer.take_damage(part.index)
            if problem == FLAGGED:
                problem = flagged(part.path)
            if problem is not None:
                self._heal(part.index, problem)

    def _heal(self, index: int, problem: str) -> None:
        """Replace corrupt partition ``index`` by a fresh file with what is readable of it.

        The writer thread's own work: its checkpointer's connections are
        closed and reopened around it. Readers in other processes notice the
        new file (:class:`JournalReader` compares inodes) and go on after
        their offsets. A partition that cannot be replaced refuses messages
        with the reason (devices are pushed back) until the edge restarts.
        """
        old = self._parts[index]
        self._checkpointer.close()
        old.db.close()
        try:
            part = _Partition(
                self.root,
                index,
                self.settings.partitions,
                self.settings.sync,
                self._cond,
                damage=problem,
                last=old.last,
            )
        except (sqlite3.Error, OSError) as exc:
            broken = (
                f"journal partition {old.path} is corrupt ({problem}) and could not be replaced "
                f"by a fresh one: {type(exc).__name__}: {exc}; hint: check that {self.root} is "
                "writable, then restart the edge"
            )
            logger.error("%s", broken)
            with self._cond:
                self._broken = broken
            return
        with self._cond:
            self._parts[index] = part
            self._held_bytes = sum(p.bytes for p in self._parts)
            # the devices' shares: what the fresh file holds, plus what waits in the queue
            queued: dict[str, list[int]] = {}
            for item in self._queue:
                account = queued.setdefault(item.device, [0, 0])
                account[0] += item.size
                account[1] += 1
            for p in self._parts:
                for device, size in p.device_bytes().items():
                    queued.setdefault(device, [0, 0])[0] += size
            self._accounts = queued
        damage_flag(old.path).unlink(missing_ok=True)
        self._plans[index] = None  # it named rows of the file moved aside
        self._checkpointer = Checkpointer(self._parts, self.settings.sync)
