"""A corrupt journal partition is replaced by a fresh one holding its readable messages.

Salvaged messages keep their offsets, so a reader going on after the offset
it holds gets each of them once, and new messages are numbered after every
offset the old file used.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectors.common.stores import recoveries
from connectors.devices.journal import (
    Journal,
    JournalFull,
    JournalReader,
    JournalSettings,
    journal_partitions,
)
from connectors.devices.journal import partition as partition_module
from connectors.devices.journal.format import damage_flag, flag_damage, part_path
from connectors.devices.journal.partition import SEQUENCE_GAP
from tests.connectors.common.test_stores import scribble
from tests.connectors.devices.test_journal import message, wait_for

STORES = "edgesieve.stores"
READER = "flow"
HEALED = re.compile(
    r"journal store .*part-0\.sqlite is corrupt \((?P<problem>.*?)\): moved aside to "
    r"part-0\.sqlite\.corrupt-\d{8}T\d{6}Z and started a fresh one; salvaged (?P<n>\d+) "
    r"message\(s\) \((?P<span>[^)]*)\) under their offsets, so the flow reads each once; "
    r"(?P<lost>.*); new messages are numbered from (?P<next>\d+)\. Hint: the file was damaged "
    r"outside edgesieve"
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def open_journal(root: Path) -> Iterator[Callable[[], Journal]]:
    opened: list[Journal] = []

    def make() -> Journal:
        journal = Journal(JournalSettings(root=root, partitions=1, sync="normal"))
        opened.append(journal)
        return journal

    yield make
    for journal in opened:
        journal.close()


def written(root: Path, n: int = 2000, released: int = 499) -> dict[int, bytes]:
    """A closed one-partition journal of ``n`` messages, ``released`` by the flow's reader."""
    with Journal(JournalSettings(root=root, partitions=1, sync="normal")) as journal:
        futures = [journal.submit(message("pump-7", f"{i:06d}".encode() * 50)) for i in range(n)]
        offsets = {f.result(10).offset: f"{i:06d}".encode() * 50 for i, f in enumerate(futures)}
        with JournalReader(root, 0) as reader:
            if released >= 0:
                reader.release(READER, released)
    return offsets


def the_record(caplog: pytest.LogCaptureFixture) -> re.Match[str]:
    records = [r for r in caplog.records if r.name == STORES]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.ERROR
    match = HEALED.fullmatch(
        records[0].getMessage().split(". Hint: ")[0] + ". Hint: the file "
        "was damaged outside edgesieve"
    )
    assert match, records[0].getMessage()
    return match


def read_after(root: Path, after: int) -> list[tuple[int, bytes]]:
    with JournalReader(root, 0) as reader:
        return [(o, m.payload) for o, m in reader.read(after, 1_000_000)]


def test_random_bytes_in_the_middle_at_start(root: Path, open_journal, caplog) -> None:
    sent = written(root)
    scribble(part_path(root, 0))
    journal = open_journal()
    got = read_after(root, 499)
    # each salvaged message once, under its own offset, with its own payload
    assert 0 < len(got) < 1500
    assert all(sent[o] == p for o, p in got)
    assert len({o for o, _ in got}) == len(got)
    match = the_record(caplog)
    assert match["problem"].startswith("quick_check: ")
    lost = 1500 - len([o for o, _ in got])
    assert match["lost"] == (
        f"{lost} accepted message(s) up to offset 1999 could not be read and are lost"
    )
    assert int(match["next"]) == 2000
    new = journal.submit(message("pump-7", b"new")).result(10)
    assert new.offset == 2000
    assert read_after(root, 1999) == [(2000, b"new")]
    with JournalReader(root, 0) as reader:
        assert reader.released(READER) == 499
    assert recoveries(root.parent)["journal"] == 1


def test_truncated_partition_keeps_its_readable_prefix(root: Path, open_journal, caplog) -> None:
    sent = written(root, released=-1)
    path = part_path(root, 0)
    os.truncate(path, path.stat().st_size // 2 + 77)
    journal = open_journal()
    got = read_after(root, -1)
    assert got and all(sent[o] == p for o, p in got)
    assert [o for o, _ in got] == list(range(len(got)))  # the prefix, in order
    match = the_record(caplog)
    assert match["problem"] == "database disk image is malformed"
    # the sequence sat on a page that was cut off: numbering jumps past any offset a reader holds
    new = journal.submit(message("pump-7", b"new")).result(10)
    assert new.offset == int(match["next"])
    assert new.offset >= 2000


def test_garbage_partition_is_replaced_and_numbered_far_ahead(
    root: Path, open_journal, caplog
) -> None:
    written(root, 50, released=9)
    part_path(root, 0).write_bytes(os.urandom(64 * 1024))
    for sidecar in ("-wal", "-shm"):
        part_path(root, 0).with_name("part-0.sqlite" + sidecar).unlink(missing_ok=True)
    assert journal_partitions(root) == 1  # counted from the files
    journal = open_journal()
    match = the_record(caplog)
    assert match["problem"] == "file is not a database"
    assert match["n"] == "0"
    assert match["span"] == "none"
    assert match["lost"] == "an unknown number of accepted messages could not be read and are lost"
    new = journal.submit(message("pump-7", b"new")).result(10)
    assert new.offset == SEQUENCE_GAP - 1 + 1


def test_partition_replaced_by_a_directory(root: Path, open_journal, caplog) -> None:
    written(root, 10, released=-1)
    path = part_path(root, 0)
    for sidecar in ("", "-wal", "-shm"):
        path.with_name(path.name + sidecar).unlink(missing_ok=True)
    path.mkdir()
    journal = open_journal()
    match = the_record(caplog)
    assert match["problem"] == "a directory is where the database file should be"
    assert journal.submit(message("pump-7", b"new")).result(10).offset == SEQUENCE_GAP


def test_an_intact_journal_reports_nothing(root: Path, open_journal, caplog) -> None:
    written(root, 100, released=9)
    open_journal()
    assert [r for r in caplog.records if r.name == STORES] == []
    assert recoveries(root.parent)["journal"] == 0


def test_corruption_met_by_a_commit_is_healed_and_nothing_readable_is_lost(
    root: Path, open_journal, caplog
) -> None:
    sent = written(root, 300, released=99)
    journal = open_journal()
    fired = []

    def inject(db: sqlite3.Connection) -> None:
        if not fired:
            fired.append(1)
            raise sqlite3.DatabaseError("database disk image is malformed")

    journal._fault_hook = inject
    with pytest.raises(
        JournalFull,
        match=r"^journal partition .*part-0\.sqlite is corrupt \(database disk image is "
        r"malformed\); it is replaced by a fresh one; hint: retry$",
    ):
        journal.submit(message("pump-7", b"refused")).result(10)
    retried = journal.submit(message("pump-7", b"retried")).result(10)
    assert retried.offset == 300
    got = read_after(root, 99)
    assert got == [(o, sent[o]) for o in range(100, 300)] + [(300, b"retried")]
    match = the_record(caplog)
    assert match["lost"] == "every message was readable"
    assert journal.stats().messages == 201


def test_a_reader_that_meets_corruption_has_the_writer_replace_the_partition(
    root: Path, open_journal, caplog
) -> None:
    sent = written(root, released=-1)
    journal = open_journal()
    scribble(part_path(root, 0), at=0.6)
    reader = JournalReader(root, 0)
    try:
        got: list[tuple[int, bytes]] = []
        after = -1

        def more() -> bool:
            nonlocal after
            batch = reader.read(after, 100)
            got.extend((o, m.payload) for o, m in batch)
            if batch:
                after = batch[-1][0]
            return after >= 1999

        wait_for(more, timeout=20)
    finally:
        reader.close()
    assert not damage_flag(part_path(root, 0)).exists()
    offsets = [o for o, _ in got]
    assert offsets == sorted(set(offsets))  # each once, in order
    assert all(sent[o] == p for o, p in got)
    assert 1000 < len(got) < 2000
    match = the_record(caplog)
    assert match["problem"] == "database disk image is malformed"
    assert journal.submit(message("pump-7", b"new")).result(10).offset == 2000


def test_a_partition_that_cannot_be_replaced_pushes_devices_back(
    root: Path, open_journal, monkeypatch
) -> None:
    written(root, 10, released=-1)
    journal = open_journal()

    def refuse(path: Path, **_: object) -> Path:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(partition_module, "move_aside", refuse)
    journal._fault_hook = lambda db: (_ for _ in ()).throw(
        sqlite3.DatabaseError("database disk image is malformed")
    )
    with pytest.raises(JournalFull, match="is corrupt"):
        journal.submit(message("pump-7", b"x")).result(10)
    broken = (
        r"^journal partition .*part-0\.sqlite is corrupt \(database disk image is malformed\) "
        r"and could not be replaced by a fresh one: PermissionError: .*Permission denied.*; "
        r"hint: check that .*journal is writable, then restart the edge$"
    )
    wait_for(lambda: journal.admit() is not None)
    assert re.match(broken, journal.admit() or "")
    with pytest.raises(JournalFull, match=broken):
        journal.submit(message("pump-7", b"y")).result(10)


def test_a_flag_about_a_file_already_replaced_is_dropped(root: Path, open_journal, caplog) -> None:
    written(root, 10, released=-1)
    path = part_path(root, 0)
    flag_damage(path, "file is not a database", path.stat().st_ino + 1)  # an older file's
    open_journal()
    wait_for(lambda: not damage_flag(path).exists())
    assert [r for r in caplog.records if r.name == STORES] == []
    assert [o for o, _ in read_after(root, -1)] == list(range(10))


def test_a_reader_moves_to_the_fresh_file_at_once_while_the_old_one_still_reads(
    root: Path, open_journal
) -> None:
    offsets = written(root, 10, released=4)
    journal = open_journal()
    path = part_path(root, 0)
    with JournalReader(root, 0) as reader:
        assert [o for o, _ in reader.read(4, 100)] == [5, 6, 7, 8, 9]  # open on the old file
        flag_damage(path, "database disk image is malformed", path.stat().st_ino)
        wait_for(lambda: not damage_flag(path).exists(), timeout=10)  # replaced, all salvaged
        new = journal.submit(message("pump-7", b"new")).result(10)
        # the moved file still reads, but the next read is of the fresh one
        assert [(o, m.payload) for o, m in reader.read(9, 100)] == [(new.offset, b"new")]
        assert [(o, m.payload) for o, m in reader.read(-1, 100)] == [
            *((o, offsets[o]) for o in range(5, 10)),
            (new.offset, b"new"),
        ]


def test_a_reader_never_guesses_while_the_partition_is_replaced(root: Path, open_journal) -> None:
    offsets = written(root, 10, released=4)
    journal = open_journal()
    path = part_path(root, 0)
    reader = JournalReader(root, 0)
    try:
        scribble(path, at=0.0, size=path.stat().st_size)  # the whole file, garbage
        assert reader.last_offset() == -1  # nothing committed it can vouch for
        reader.release(READER, 9)  # nothing released meanwhile, no error
        with pytest.raises(sqlite3.DatabaseError, match="malformed|not a database"):
            reader.released(READER)
        wait_for(lambda: not damage_flag(path).exists(), timeout=10)
        # the fresh file: what the WAL still held of the unreleased messages (pages the
        # scribble missed), under their offsets and intact, or nothing
        salvaged = [(o, m.payload) for o, m in reader.read(-1, 100)]
        assert set(salvaged) <= {(o, offsets[o]) for o in range(5, 10)}
        new = journal.submit(message("pump-7", b"new")).result(10)
        assert [(o, m.payload) for o, m in reader.read(-1, 100)] == [
            *salvaged,
            (new.offset, b"new"),
        ]
        assert new.offset == 10
        assert reader.last_offset() == new.offset
    finally:
        reader.close()
