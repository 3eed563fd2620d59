"""A corrupt outbox file is moved aside, its readable batches salvaged, and the outbox goes on."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from pathlib import Path

import pytest

from connectors.common import stores
from connectors.common.stores import recoveries
from connectors.uplink import outbox_store
from connectors.uplink.batch import Sealed
from connectors.uplink.outbox import Outbox
from tests.connectors.common.test_stores import scribble
from tests.connectors.uplink.test_sender import (  # noqa: F401 - fixtures
    fill,
    make_batch,
    senders,
    servers,
)

STORES = "edgesieve.stores"
HEALED = (
    r"outbox store .*outbox.sqlite is corrupt \((?P<problem>.*?)\): moved aside to "
    r"outbox.sqlite.corrupt-\d{8}T\d{6}Z and started a fresh one; salvaged (?P<n>\d+) waiting "
    r"batch\(es\) \(\d+ rows\) and \d+ rejected one\(s\); (?P<lost>[^.]*)\. Hint: the file "
    r"was damaged outside edgesieve"
)


def filled(path: Path, n: int = 300, size: int = 2000) -> list[Sealed]:
    """An outbox file holding ``n`` batches, closed (so its WAL is checkpointed)."""
    with Outbox(path) as box:
        return fill(box, n, size=size)


def healed(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == STORES]


def check_salvage(box: Outbox, batches: list[Sealed]) -> list[Sealed]:
    """Every salvaged batch is one that was put, whole; the outbox takes new ones."""
    got = box.next(10_000)
    originals = {b.batch_id: b for b in batches}
    for s in got:
        assert s == originals[s.batch_id]
    extra = make_batch("after-recovery")
    assert box.put(extra)
    assert box.next(10_000)[-1] == extra
    return got


def test_random_bytes_in_the_middle_at_start(tmp_path: Path, caplog):
    path = tmp_path / "outbox.sqlite"
    batches = filled(path)
    scribble(path)
    with Outbox(path) as box:
        got = check_salvage(box, batches)
    assert 0 < len(got) < len(batches)
    (record,) = healed(caplog)
    assert record.levelno == logging.ERROR
    match = re.fullmatch(HEALED + ".*", record.getMessage())
    assert match, record.getMessage()
    assert re.fullmatch(r"quick_check: .+ \(and \d+ more problems\)", match["problem"])
    assert int(match["n"]) == len(got)
    assert match["lost"].startswith("the batches SQLite could not read are lost")
    moved = list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert [p.name for p in moved if "-wal" not in p.name and "-shm" not in p.name]
    assert recoveries(tmp_path)["outbox"] == 1
    assert "disk" not in match["problem"]


def test_truncated_file_keeps_the_readable_prefix(tmp_path: Path, caplog):
    path = tmp_path / "outbox.sqlite"
    batches = filled(path)
    os.truncate(path, path.stat().st_size // 2 + 123)
    with Outbox(path) as box:
        got = check_salvage(box, batches)
    assert 0 < len(got) < len(batches)
    assert "database disk image is malformed" in healed(caplog)[0].getMessage()


def test_garbage_file_is_replaced_by_a_fresh_outbox(tmp_path: Path, caplog):
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with Outbox(path) as box:
        assert check_salvage(box, []) == []
    (record,) = healed(caplog)
    assert "(file is not a database)" in record.getMessage()
    assert "salvaged 0 waiting batch(es)" in record.getMessage()
    assert recoveries(tmp_path) == {"outbox": 1, "journal": 0, "recovery": 0, "duckdb": 0}


def test_an_intact_outbox_reports_nothing(tmp_path: Path, caplog):
    path = tmp_path / "outbox.sqlite"
    batches = filled(path, 20)
    with Outbox(path) as box:
        assert box.next(100) == batches
    assert healed(caplog) == []
    assert recoveries(tmp_path)["outbox"] == 0


def test_corruption_at_run_time_is_healed_once_and_the_outbox_goes_on(tmp_path: Path, caplog):
    path = tmp_path / "outbox.sqlite"
    batches = filled(path)
    with Outbox(path) as box:
        scribble(path)  # under the open outbox: found when the pages are read
        got = box.next(10_000)
        assert 0 < len(got) < len(batches)
        assert box.put(make_batch("new-1"))
        box.ack(got[0].batch_id)
        assert box.reject(got[1].batch_id, "test")
        stats = box.stats()
        assert stats.batches == len(got) - 1  # -2 + 1
        assert stats.rejected == 1
        assert box.expire() == 0
    records = healed(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "is corrupt (database disk image is malformed)" in records[0].getMessage()


def test_a_corrupt_store_whose_replacement_fails_says_so(tmp_path: Path, monkeypatch):
    path = tmp_path / "outbox.sqlite"
    filled(path, 50)
    with Outbox(path) as box:
        scribble(path, at=0.3, size=200_000)

        def refuse(path: Path, **_: object) -> Path:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(outbox_store, "move_aside", refuse)
        with pytest.raises(
            RuntimeError,
            match=r"Outbox '.*outbox.sqlite' is corrupt \(database disk image is malformed\) "
            r"and could not be replaced by a fresh one: PermissionError: .*Permission denied.*"
            r"Hint: check that data_dir is writable, then restart the edge",
        ):
            box.next(10_000)
        assert box.closed


def test_an_unwritable_place_is_not_called_corrupt(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        RuntimeError,
        match=r"Outbox: cannot open '.*file/outbox.sqlite': FileExistsError: .* Hint: the path "
        r"must be a writable SQLite outbox file \(or not exist yet\) on a disk with free space",
    ):
        Outbox(tmp_path / "file" / "outbox.sqlite")
    assert recoveries(tmp_path)["outbox"] == 0


def test_the_salvaged_batches_reach_a_real_receiver_once(tmp_path, servers, senders):  # noqa: F811
    path = tmp_path / "outbox.sqlite"
    batches = filled(path, 200)
    scribble(path)
    with Outbox(path) as box:
        waiting = box.next(10_000)
        server = servers()
        sender = senders(box, server.target)
        assert sender.flush(10.0)
        sender.stop()
    assert sorted(server.cloud.stored) == sorted(b.batch_id for b in waiting)
    assert len(server.cloud.received) == len(waiting)
    originals = {b.batch_id: b.payload for b in batches}
    for batch_id, message in server.cloud.stored.items():
        assert message.SerializeToString() == originals[batch_id]


def test_disk_full_is_not_taken_for_corruption():
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert stores.corruption(full) is None
    locked = sqlite3.OperationalError("database is locked")
    assert stores.corruption(locked) is None
    assert stores.corruption(sqlite3.DatabaseError("file is not a database")) == (
        "file is not a database"
    )
