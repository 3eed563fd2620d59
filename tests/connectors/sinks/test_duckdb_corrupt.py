"""A corrupt edge.duckdb is moved aside and a fresh one takes the rows from then on."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from connectors.common.stores import recoveries
from connectors.sinks.duckdb import DuckDBSettings, DuckDBSink
from tests.connectors.sinks.test_duckdb import POINTS, query, run_flow
from tests.connectors.sinks.test_parquet_exactly_once import readings

STORES = "edgesieve.stores"
HEALED = (
    r"duckdb store .*edge\.duckdb is corrupt \((?P<problem>.*?)\): moved aside to "
    r"edge\.duckdb\.corrupt-\d{8}T\d{6}Z and started a fresh one; the tables start empty and "
    r"fill with new rows; every row written before is in the Parquet files \(load them with "
    r"read_parquet if needed\)\. Hint: the file was damaged outside edgesieve"
)


def filled(path: Path, n: int = 20_000) -> None:
    run_flow(readings(n), DuckDBSink(path, POINTS, settings=DuckDBSettings(max_rows=5000)))


def problem_of(caplog: pytest.LogCaptureFixture) -> str:
    records = [r for r in caplog.records if r.name == STORES]
    assert len(records) == 1, [r.getMessage() for r in records]
    match = re.match(HEALED, records[0].getMessage())
    assert match, records[0].getMessage()
    return match["problem"]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("garbage", r"IO Error: The file .* exists, but it is not a valid DuckDB database file!"),
        ("truncated", r"IO Error: Could not read enough bytes from file .*"),
    ],
)
def test_a_corrupt_file_at_start_is_replaced(tmp_path: Path, caplog, damage, problem) -> None:
    path = tmp_path / "edge.duckdb"
    filled(path)
    if damage == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    else:
        os.truncate(path, path.stat().st_size // 3)
    run_flow(readings(300), DuckDBSink(path, POINTS))
    assert re.fullmatch(problem, problem_of(caplog))
    assert query(path, f"SELECT count(*) FROM {POINTS}") == [(300,)]
    assert recoveries(tmp_path)["duckdb"] == 1


def test_random_bytes_in_the_middle_found_at_open_or_at_the_first_load(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / "edge.duckdb"
    filled(path)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(20_000))
    run_flow(readings(300), DuckDBSink(path, POINTS))
    problem = problem_of(caplog)
    assert "checksum" in problem or "Corrupt" in problem
    # the new rows are all there, once
    assert query(path, f"SELECT count(*), count(DISTINCT value) FROM {POINTS}") == [(300, 300)]


def test_corruption_met_by_a_load_replaces_the_file_and_the_rows_go_to_the_new_one(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / "edge.duckdb"
    sink = DuckDBSink(path, POINTS, settings=DuckDBSettings(max_rows=10_000))
    part = sink.build_part("s", "p0", None)
    try:
        part.write_batch(readings(100))
        assert part._flush_locked()
        with path.open("r+b") as f:  # the file under the open database
            f.seek(0)
            f.write(os.urandom(64 * 1024))
        import duckdb

        real = part._cur
        calls = []

        class Failing:
            """The cursor raises what DuckDB raises on a damaged block, once."""

            def __getattr__(self, name: str):
                return getattr(real, name)

            def begin(self):
                if not calls:
                    calls.append(1)
                    raise duckdb.IOException("IO Error: Corrupt database file: computed checksum")
                return real.begin()

        part._cur = Failing()  # type: ignore[assignment]
        part.write_batch(readings(50))
        assert part._flush_locked()
    finally:
        part.close()
    assert "Corrupt database file" in problem_of(caplog)
    assert query(path, f"SELECT count(*) FROM {POINTS}") == [(50,)]
    assert part.write_failures == 1
    assert not [
        r for r in caplog.records if r.name == "edgesieve.duckdb" and r.levelno >= logging.ERROR
    ]


def test_a_locked_database_is_not_taken_for_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "edge.duckdb"
    filled(path, 10)
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb,sys,time; c=duckdb.connect(sys.argv[1]); "
            "print('held', flush=True); time.sleep(30)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=r"could not open the DuckDB database .*lock"):
            DuckDBSink(path, POINTS).build_part("s", "p0", None)
    finally:
        holder.kill()
        holder.wait()
    assert recoveries(tmp_path)["duckdb"] == 0
