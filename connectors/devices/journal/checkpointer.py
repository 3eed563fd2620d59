"""The journal writer's second thread: WAL checkpoints, and a survey of housekeeping to do."""

from __future__ import annotations

import sqlite3
import threading
from typing import Final

from connectors.common.stores import corruption
from connectors.devices.journal.format import (
    CHECKPOINT_S,
    CLOSE_TIMEOUT_S,
    WAL_CATCH_UP_FRAMES,
    _connect,
    damage_flag,
    logger,
)
from connectors.devices.journal.partition import Truncation, _Partition, plan_truncation

FLAGGED: Final = "flagged by a reader"
"""The survey's damage report for a partition a reader flagged (:func:`flagged` says how)."""


class Checkpointer:
    """Copies the partitions' WAL into their files from a thread and connections of its own.

    The writer's connections never checkpoint (``wal_autocheckpoint = 0``), so
    no commit waits for one. Every :data:`CHECKPOINT_S` each partition written
    since the last pass gets a ``PASSIVE`` checkpoint, which runs beside the
    writer's commits (it waits for no lock and syncs the WAL before and the
    file after copying, as ``journal.sync`` asks); once one has copied the
    whole WAL, the next commit starts the WAL over from its beginning, so the
    WAL stays a few MB however long the load lasts. A checkpoint held back by
    a reader in the middle of a read only copies less; the next pass goes on.

    Each pass also surveys every partition for the writer (:meth:`survey`),
    so the writer spends no statement step finding out whether there is
    housekeeping to do.
    """

    def __init__(self, parts: list[_Partition], sync: str) -> None:
        paths = [part.path for part in parts]
        self._parts = parts
        self._dbs: list[sqlite3.Connection] = []
        try:
            for path in paths:
                db = _connect(path, create=False)
                self._dbs.append(db)
                db.execute(f"PRAGMA synchronous = {sync.upper()}")
        except BaseException:
            for db in self._dbs:
                db.close()
            raise
        self._written = [False] * len(paths)
        """Per partition: committed since its last checkpoint (set by the writer thread)."""
        self._behind = [False] * len(paths)
        self.behind = False
        """Some partition's WAL holds over WAL_CATCH_UP_FRAMES not yet copied back."""
        self._plans: list[Truncation | None] = [None] * len(paths)
        self.free_pages = [0] * len(paths)
        """Per partition: its free pages at the last survey (the writer zeroes it as it vacuums)."""
        self._damage: list[str | None] = [None] * len(paths)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"journal-checkpoint {paths[0].parent}", daemon=True
        )
        self._thread.start()

    def wrote(self, index: int) -> None:
        """Partition ``index`` committed (a flag: no lock, no wake-up)."""
        self._written[index] = True

    def _run(self) -> None:
        while not self._stop.wait(CHECKPOINT_S):
            self.checkpoint()
            self.survey()

    def survey(self) -> None:
        """For the writer, per partition: its next truncation, free pages, a reader's damage flag.

        A plan reads rows one by one (the digests of unkeyed MQTT rows), each
        step waiting for the GIL behind busy device servers: here that delays
        no commit. A corrupt file is reported to the writer like a reader's
        flag; other errors (a full disk) are retried next pass.
        """
        for index, db in enumerate(self._dbs):
            part = self._parts[index]
            if damage_flag(part.path).exists():
                self._damage[index] = self._damage[index] or FLAGGED
            try:
                if self._plans[index] is None:
                    self._plans[index] = plan_truncation(db, part.truncated, part.last)
                self.free_pages[index] = db.execute("PRAGMA freelist_count").fetchone()[0]
            except sqlite3.Error as exc:
                if (problem := corruption(exc)) is not None:
                    self._damage[index] = problem

    def take_plan(self, index: int) -> Truncation | None:
        """The survey's truncation plan for partition ``index``, if any (cleared)."""
        plan = self._plans[index]
        self._plans[index] = None
        return plan

    def take_damage(self, index: int) -> str | None:
        """What the survey found wrong with partition ``index`` since the last call (cleared).

        :data:`FLAGGED` when a reader left a damage flag (the writer reads it).
        """
        damage = self._damage[index]
        self._damage[index] = None
        return damage

    def checkpoint(self) -> None:
        """A PASSIVE checkpoint of each partition written since the last one."""
        for index, db in enumerate(self._dbs):
            if not self._written[index]:
                continue
            self._written[index] = False
            try:
                _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:  # a full disk: the WAL keeps the commits meanwhile
                self._written[index] = True
                logger.info("journal: checkpoint of partition %d failed: %s", index, exc)
                continue
            if frames >= WAL_CATCH_UP_FRAMES:  # not started over: commits came during the copy
                self._behind[index] = True
                self.behind = True

    def take_behind(self) -> list[int]:
        """The partitions whose WAL the writer should finish checkpointing (clears them)."""
        self.behind = False
        behind = [i for i, flag in enumerate(self._behind) if flag]
        for index in behind:
            self._behind[index] = False
        return behind

    def close(self) -> None:
        """Stop the thread and close its connections (the writer's close checkpoints last)."""
        self._stop.set()
        self._thread.join(CLOSE_TIMEOUT_S)
        for db in self._dbs:
            db.close()
