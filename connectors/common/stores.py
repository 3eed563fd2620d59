"""Stores that heal: recognise a corrupt store file, move it aside, salvage what is readable.

The edge keeps four stores under ``data_dir``: the ingest journal
(``journal/part-<i>.sqlite``), the uplink outbox (``outbox.sqlite``), the
Bytewax recovery store (``recovery/<flow>/``) and the DuckDB database
(``edge.duckdb``). When one of them is damaged outside the program's control
(a disk or file-system fault, a power cut on a disk that ignores flushes,
another program writing the file), its owner:

1. recognises it, at start (:func:`sqlite_problem`: ``PRAGMA quick_check``)
   or at run time (:func:`corruption`: SQLite's "database disk image is
   malformed" / "file is not a database", DuckDB's checksum and "not a valid
   DuckDB database file" errors), and tells it apart from a full disk;
2. moves it aside under a dated name (:func:`move_aside`:
   ``outbox.sqlite.corrupt-20261203T041500Z`` with its ``-wal``/``-shm``),
   so nothing is deleted and the copy can be inspected;
3. copies what SQLite can still read into a fresh store
   (:func:`salvage_rows`) and goes on;
4. says so once, in one line (:func:`report`).

Every moved-aside copy under ``data_dir`` is counted by
:func:`recoveries`, exported as ``edgesieve_store_recoveries_total{store}``
(:class:`StoreRecoveryCollector`); the count lives in the file names, so it
covers every process of the edge and survives restarts (deleting an
inspected copy lowers it, which Prometheus reads as a counter reset).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "CORRUPT_HINT",
    "StoreRecoveryCollector",
    "corruption",
    "heal_recovery_store",
    "is_disk_full",
    "move_aside",
    "recoveries",
    "report",
    "salvage_rows",
    "sqlite_problem",
    "sync_dir",
]

logger = logging.getLogger("edgesieve.stores")

MARK = ".corrupt-"
"""What a moved-aside store's name carries between its own name and the UTC time."""
SIDECARS = ("-wal", "-shm", "-journal", ".wal")
"""Files that belong to a store file and move with it (SQLite's and DuckDB's)."""
CORRUPT_HINT = (
    "the file was damaged outside edgesieve (a disk or file-system fault, a power cut on a "
    "disk that ignores flushes, or another program writing it); check the disk (dmesg, "
    "SMART), then inspect or delete the moved copy"
)

_SQLITE_CORRUPT = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_SQLITE_TEXTS = ("database disk image is malformed", "file is not a database")
_DUCKDB_TEXTS = (
    "corrupt database file",
    "not a valid duckdb database file",
    "could not read enough bytes",
    "checksum",
)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's or the OS's "no space left" (not corruption)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


def corruption(exc: BaseException) -> str | None:
    """One line naming the damage when ``exc`` says a store file is corrupt, else None.

    A full disk, a lock held by another process or a missing table is not
    corruption (None): those have their own handling.
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _SQLITE_CORRUPT:
            return text
        if any(t in text for t in _SQLITE_TEXTS):
            return text
        return None
    if type(exc).__module__.split(".")[0] in {"duckdb", "_duckdb"}:
        lowered = text.lower()
        if any(t in lowered for t in _DUCKDB_TEXTS):
            return text
    return None


def sqlite_problem(path: Path) -> str | None:
    """None when the SQLite file at ``path`` passes ``PRAGMA quick_check``, else what is wrong.

    A missing or empty file passes (SQLite creates it). A directory in the
    file's place fails. Errors that are not about the file's content (a lock
    held too long) are raised.
    """
    path = Path(path)
    if path.is_dir():
        return "a directory is where the database file should be"
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30.0)
    except sqlite3.Error as exc:
        if corruption(exc):
            return corruption(exc)
        raise
    try:
        rows = db.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.Error as exc:
        problem = corruption(exc)
        if problem is None:
            raise
        return problem
    finally:
        db.close()
    lines = [
        line.strip()
        for row in rows
        for line in str(row[0]).splitlines()
        if line.strip() and not line.startswith("***")
    ]
    if lines == ["ok"]:
        return None
    more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
    return f"quick_check: {lines[0][:160]}{more}"


def move_aside(path: Path, *, now: datetime | None = None) -> Path:
    """Rename ``path`` (a file with its sidecars, or a directory) to a dated name; the new path.

    ``outbox.sqlite`` becomes ``outbox.sqlite.corrupt-20261203T041500Z`` (a
    ``-1``, ``-2`` ... is added if that name is taken) and its ``-wal`` /
    ``-shm`` follow under the new name, so SQLite still opens the copy whole.
    """
    path = Path(path)
    when = (now or datetime.now(UTC)).astimezone(UTC)
    base = f"{path.name}{MARK}{when:%Y%m%dT%H%M%SZ}"
    target = path.with_name(base)
    n = 0
    while target.exists() or any(target.with_name(target.name + s).exists() for s in SIDECARS):
        n += 1
        target = path.with_name(f"{base}-{n}")
    os.replace(path, target)
    for sidecar in SIDECARS:
        extra = path.with_name(path.name + sidecar)
        if extra.exists():
            os.replace(extra, target.with_name(target.name + sidecar))
    sync_dir(path.parent)
    return target


def sync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def salvage_rows(
    path: Path, table: str, columns: Sequence[str]
) -> tuple[list[tuple[object, ...]], bool]:
    """The rows of ``table`` SQLite can still read from the damaged file at ``path``.

    Returns ``(rows, whole)``: each row is ``(rowid, *columns)`` in rowid
    order (rowids are taken to be non-negative, as the stores' are);
    ``whole`` is False when some rows could not be read. The table is read
    in rowid order; at a damaged page the read seeks past it (by rowid,
    through the b-tree's interior pages) with doubling steps up to the
    highest readable rowid, then reads back down to the damage, so every
    row on a readable page is found. An unreadable schema gives no rows.
    """
    short = _short_copy(Path(path))
    try:
        return _salvage(path if short is None else short, table, columns)
    finally:
        if short is not None:
            short.unlink(missing_ok=True)


def _short_copy(path: Path) -> Path | None:
    """A copy of a truncated SQLite file that SQLite agrees to read, None if not truncated.

    SQLite calls a file shorter than the page count in its header malformed
    and reads nothing; the copy is cut to whole pages and its header says so.
    """
    try:
        with path.open("rb") as f:
            head = f.read(100)
        size = path.stat().st_size
    except OSError:
        return None
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        return None
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or size // page >= int.from_bytes(head[28:32], "big"):
        return None
    copy = path.with_name(path.name + ".salvage")
    shutil.copyfile(path, copy)
    os.truncate(copy, (size // page) * page)
    with copy.open("r+b") as f:
        f.seek(28)
        f.write((size // page).to_bytes(4, "big"))
    return copy


def _salvage(
    path: Path, table: str, columns: Sequence[str]
) -> tuple[list[tuple[object, ...]], bool]:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.Error:
        return [], False
    select = f"SELECT rowid, {', '.join(columns)} FROM {table}"  # noqa: S608 - our names
    found: dict[int, tuple[object, ...]] = {}
    whole = True
    try:
        top = _top(db, table, select, found)
        last, failed = _scan(db, select, -1, found, up=True)
        if top is None and not found:
            return [], not failed and _readable(db, table)
        whole = not failed and top is not None
        top = max(found) if top is None else top
        pos = -1 if last is None else last
        step = 1
        while failed and pos + step <= top:
            last, failed = _scan(db, select, pos + step - 1, found, up=True)
            if last is None:  # still inside the damage
                step *= 2
                failed = True
                continue
            _scan(db, select, pos + step - 1, found, up=False)  # back down to the damage
            pos, step = last, 1
    finally:
        db.close()
    return [found[k] for k in sorted(found)], whole


def _readable(db: sqlite3.Connection, table: str) -> bool:
    try:
        db.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - our names
    except sqlite3.Error:
        return False
    return True


def _top(
    db: sqlite3.Connection, table: str, select: str, found: dict[int, tuple[object, ...]]
) -> int | None:
    """The highest rowid (read from the end if the b-tree's right edge is damaged)."""
    try:
        row = db.execute(f"SELECT max(rowid) FROM {table}").fetchone()  # noqa: S608
        if row is not None and row[0] is not None:
            return int(row[0])
    except sqlite3.Error:
        pass
    try:
        for row in db.execute(f"{select} ORDER BY rowid DESC"):
            found.setdefault(int(row[0]), tuple(row))
    except sqlite3.Error:
        pass
    return max(found) if found else None


def _scan(
    db: sqlite3.Connection,
    select: str,
    start: int,
    found: dict[int, tuple[object, ...]],
    *,
    up: bool,
) -> tuple[int | None, bool]:
    """Read rows > ``start`` upwards, or <= ``start`` downwards to a row already read.

    Stops at the end or at an error; returns the last rowid read (None if
    none) and whether it stopped at an error.
    """
    last: int | None = None
    query = (
        f"{select} WHERE rowid > ? ORDER BY rowid"
        if up
        else f"{select} WHERE rowid <= ? ORDER BY rowid DESC"
    )
    try:
        for row in db.execute(query, (start,)):
            key = int(row[0])
            if not up and key in found:
                break
            found[key] = tuple(row)
            last = key
    except sqlite3.Error:
        return last, True
    return last, False


def report(store: str, path: Path, moved: Path, problem: str, salvaged: str) -> None:
    """Log the recovery of one store: one line, once per damaged file."""
    logger.error(
        "%s store %s is corrupt (%s): moved aside to %s and started a fresh one; %s. Hint: %s",
        store,
        path,
        problem,
        moved.name,
        salvaged,
        CORRUPT_HINT,
    )


RECOVERY_CONSEQUENCE = (
    "the flow starts from the journal's released offsets with empty operator state: nothing "
    "accepted is lost, but rows already written from the replayed messages may be written "
    "again (Parquet, DuckDB, cloud)"
)


def heal_recovery_store(db_dir: Path) -> Path | None:
    """Move a corrupt Bytewax recovery store ``db_dir`` aside; where it went, None if intact.

    Checks every ``part-*.sqlite3`` with ``PRAGMA quick_check``; a store
    with a damaged part, or a file where the directory should be, is moved
    aside whole (its snapshots belong together) and the caller creates a
    fresh one. Nothing is salvaged: a snapshot is only useful with the
    others of its epoch. See :data:`RECOVERY_CONSEQUENCE` for what it means.
    """
    db_dir = Path(db_dir)
    if not db_dir.exists():
        return None
    problem = None
    if not db_dir.is_dir():
        problem = "a file is where the recovery directory should be"
    else:
        for part in sorted(db_dir.glob("part-*.sqlite3")):
            found = sqlite_problem(part)
            if found is not None:
                problem = f"{part.name}: {found}"
                break
    if problem is None:
        return None
    moved = move_aside(db_dir)
    report("recovery", db_dir, moved, problem, RECOVERY_CONSEQUENCE)
    return moved


_STORES = {
    "outbox": ("outbox.sqlite",),
    "journal": ("journal/part-*.sqlite",),
    "recovery": ("recovery/*",),
    "duckdb": ("edge.duckdb",),
}


def recoveries(data_dir: Path) -> dict[str, int]:
    """How many moved-aside copies of each store are kept under ``data_dir``."""
    counts = {}
    for store, patterns in _STORES.items():
        names = set()
        for pattern in patterns:
            for path in Path(data_dir).glob(pattern + MARK + "*"):
                if not any(path.name.endswith(s) for s in (*SIDECARS, ".salvage")):
                    names.add(path.name)
        counts[store] = len(names)
    return counts


class StoreRecoveryCollector(Collector):
    """``edgesieve_store_recoveries_total{store}``: corrupt stores moved aside (see the module)."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = Path(data_dir)

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Count the moved-aside copies at scrape time."""
        family = CounterMetricFamily(
            "edgesieve_store_recoveries",
            "Corrupt stores (outbox, journal partition, recovery store, DuckDB file) moved "
            "aside and replaced by a fresh one; the copies are kept under data_dir",
            labels=["store"],
        )
        for store, count in recoveries(self._data_dir).items():
            family.add_metric([store], count)
        yield family
