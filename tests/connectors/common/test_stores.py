"""The shared store-healing helpers on real SQLite and DuckDB files."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from connectors.common.stores import (
    StoreRecoveryCollector,
    corruption,
    heal_recovery_store,
    is_disk_full,
    move_aside,
    recoveries,
    salvage_rows,
    sqlite_problem,
)

PAGE = 4096
WHEN = datetime(2026, 12, 3, 4, 15, tzinfo=UTC)


def scribble(path: Path, *, at: float = 0.5, size: int = 5 * PAGE) -> None:
    """Random bytes over whole pages in the middle of the file, as a failing disk writes them.

    Whole pages, so the damage is structural: SQLite keeps no checksums, and
    bytes damaged inside a stored value read back without an error.
    """
    start = int(path.stat().st_size * at) // PAGE * PAGE
    with path.open("r+b") as f:
        f.seek(start)
        f.write(os.urandom(size))


def table(path: Path, rows: int = 3000, size: int = 300) -> dict[int, bytes]:
    """A WAL SQLite file with one table ``t(seq, b)``, checkpointed and closed."""
    values = {i + 1: os.urandom(size) for i in range(rows)}
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, b BLOB)")
    db.executemany("INSERT INTO t (seq, b) VALUES (?, ?)", values.items())
    db.commit()
    db.close()
    return values


def test_salvage_finds_the_rows_after_the_damage(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    values = table(path)
    scribble(path, at=0.3)
    rows, whole = salvage_rows(path, "t", ("b",))
    assert not whole
    got = {seq: b for seq, b in rows}
    assert all(values[seq] == b for seq, b in got.items())
    assert max(got) == 3000  # past the damage
    assert min(got) == 1
    assert 2500 < len(got) < 3000


def test_salvage_of_an_intact_table_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    values = table(path, 100)
    rows, whole = salvage_rows(path, "t", ("b",))
    assert whole and dict(rows) == values
    db = sqlite3.connect(path)
    db.execute("DELETE FROM t")
    db.commit()
    db.close()
    assert salvage_rows(path, "t", ("b",)) == ([], True)


def test_salvage_of_a_truncated_file_reads_its_prefix(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    values = table(path)
    os.truncate(path, path.stat().st_size // 2 + 999)
    rows, whole = salvage_rows(path, "t", ("b",))
    assert not whole
    assert [seq for seq, _ in rows] == list(range(1, len(rows) + 1))
    assert all(values[seq] == b for seq, b in rows) and len(rows) > 1000
    assert not list(tmp_path.glob("*.salvage"))  # its working copy is gone


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(at=st.floats(0.0, 0.95), pages=st.integers(1, 40))
def test_salvage_never_invents_rows(tmp_path: Path, at: float, pages: int) -> None:
    path = tmp_path / f"h-{at}-{pages}.sqlite"
    values = table(path, 1000, 200)
    scribble(path, at=at, size=pages * PAGE)
    rows, _ = salvage_rows(path, "t", ("b",))
    assert all(values.get(seq) == b for seq, b in rows)
    for p in path.parent.glob(path.name + "*"):
        p.unlink()


def test_sqlite_problem(tmp_path: Path) -> None:
    assert sqlite_problem(tmp_path / "missing.sqlite") is None
    (tmp_path / "empty.sqlite").touch()
    assert sqlite_problem(tmp_path / "empty.sqlite") is None
    assert sqlite_problem(tmp_path) == "a directory is where the database file should be"
    garbage = tmp_path / "g.sqlite"
    garbage.write_bytes(b"x" * 10_000)
    assert sqlite_problem(garbage) == "file is not a database"
    path = tmp_path / "s.sqlite"
    table(path)
    assert sqlite_problem(path) is None
    scribble(path)
    problem = sqlite_problem(path)
    assert problem is not None
    assert problem.startswith("quick_check: ") or problem == "database disk image is malformed"


def test_move_aside_takes_the_sidecars_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).write_text(suffix or "main")
    moved = move_aside(path, now=WHEN)
    assert moved.name == "outbox.sqlite.corrupt-20261203T041500Z"
    assert moved.read_text() == "main"
    assert moved.with_name(moved.name + "-wal").read_text() == "-wal"
    assert not path.exists() and not path.with_name("outbox.sqlite-wal").exists()
    path.write_text("again")
    assert move_aside(path, now=WHEN).name == "outbox.sqlite.corrupt-20261203T041500Z-1"
    store = tmp_path / "recovery" / "edge"
    store.mkdir(parents=True)
    assert move_aside(store, now=WHEN).name == "edge.corrupt-20261203T041500Z"


def test_recoveries_count_the_moved_copies_not_their_sidecars(tmp_path: Path) -> None:
    for name in ("outbox.sqlite", "edge.duckdb", "journal/part-0.sqlite", "journal/part-1.sqlite"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        path.with_name(path.name + "-wal").write_text("x")
        path.with_name(path.name + ".wal").write_text("x")
        move_aside(path, now=WHEN)
    (tmp_path / "recovery" / "edge").mkdir(parents=True)
    (tmp_path / "recovery" / "edge" / "part-0.sqlite3").write_bytes(b"y" * 5000)
    assert heal_recovery_store(tmp_path / "recovery" / "edge") is not None
    assert heal_recovery_store(tmp_path / "recovery" / "missing") is None
    assert recoveries(tmp_path) == {"outbox": 1, "journal": 2, "recovery": 1, "duckdb": 1}
    registry = CollectorRegistry()
    registry.register(StoreRecoveryCollector(tmp_path))
    text = generate_latest(registry).decode()
    assert 'edgesieve_store_recoveries_total{store="journal"} 2.0' in text
    assert "# TYPE edgesieve_store_recoveries_total counter" in text


def test_what_counts_as_corruption(tmp_path: Path) -> None:
    full = sqlite3.OperationalError("database or disk is full")
    assert corruption(full) is None and is_disk_full(full)
    assert is_disk_full(OSError(28, "No space left on device"))
    assert not is_disk_full(sqlite3.DatabaseError("database disk image is malformed"))
    assert corruption(sqlite3.OperationalError("database is locked")) is None
    assert corruption(sqlite3.DatabaseError("file is not a database")) == "file is not a database"
    garbage = tmp_path / "g.duckdb"
    garbage.write_bytes(os.urandom(300_000))
    with pytest.raises(duckdb.Error) as err:
        duckdb.connect(str(garbage))
    assert corruption(err.value) is not None and "not a valid DuckDB database" in str(
        corruption(err.value)
    )
    assert corruption(duckdb.IOException("IO Error: Could not set lock on file")) is None
    assert corruption(ValueError("file is not a database")) is None
