"""A full data disk at stop: one line and status 3, nothing accepted lost, nothing doubled.

The data directory lives on a small tmpfs. HTTP devices send numbered readings
(all answered 200), the disk is filled up, the edge gets SIGTERM. The stop
cannot write its final snapshot and Parquet files: ``edgesieve run`` says so in
one line and exits with status 3, leaving no temporary file behind. Once space
is back, the next start processes what the journal kept: every accepted reading
is in ``telemetry_points`` (Parquet and DuckDB) exactly once and the summaries
count each reading once.

Needs root (mount); skipped where tmpfs cannot be mounted.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flows.accounting import FlowReport
from tests.conftest import DEVICES, free_port, query_parquet, refused, wait_for, write_devices

ROOT = Path(__file__).parents[2]
EDGE = [sys.executable, "-m", "flows.cli", "run", "flows.telemetry"]
READINGS = 60
"""Readings per device."""
BASE_MS = 1_763_800_000_000
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 48 MiB tmpfs at ``tmp_path/disk``."""
    at = tmp_path / "disk"
    at.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(at)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill ``disk`` up; return the file that holds the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):  # to the last byte
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def post(port: int, token: str, seq: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = json.dumps({"ts": BASE_MS + seq * 1000, "values": {"seq": float(seq)}})
        conn.request("POST", f"/api/v1/{token}/telemetry", body)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def stop(proc: subprocess.Popen, log: Path) -> tuple[int, list[str]]:
    """SIGTERM the edge; its exit status and the stderr lines that are not log lines."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text()
    assert "Traceback" not in text, text
    return code, [line for line in text.splitlines() if line and not LOG_LINE.match(line)]


def start(
    config: Path, log: Path, port: int, *, bytewax_snapshot_s: int | None = None
) -> subprocess.Popen:
    """Start ``edgesieve run flows.telemetry``, or ``python -m bytewax.run`` with snapshots."""
    if bytewax_snapshot_s is None:
        cmd = [*EDGE, "--config", str(config)]
    else:
        recovery = config.parent / "disk" / "var" / "recovery" / "telemetry"
        cmd = [sys.executable, "-m", "bytewax.run", "flows.telemetry", "-r", str(recovery)]
        cmd += ["-s", str(bytewax_snapshot_s), "-b", "0"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "EDGESIEVE_CONFIG": str(config)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    wait_for(
        lambda: not refused(port) or proc.poll() is not None,
        "the edge to listen",
        60,
    )
    assert proc.poll() is None, log.read_text()
    return proc


@pytest.mark.parametrize(
    ("runner", "snapshot_s"),
    [("edgesieve", 1), ("edgesieve", 3600), ("bytewax", 1)],
    ids=["snapshots-during-the-run", "none-before-stop", "bytewax-runner"],
)
def test_a_stop_on_a_full_disk_loses_nothing_and_the_next_start_catches_up(
    tmp_path, small_disk, runner, snapshot_s
):
    data = small_disk / "var"
    port = free_port()
    config = tmp_path / "edge.yaml"
    config.write_text(
        f"data_dir: {data}\n"
        f"devices: {write_devices(tmp_path, DEVICES)}\n"
        f'transports: {{http: {{listen: "127.0.0.1:{port}"}}}}\n'
        "telemetry: {window: {length: 3600}}\n"  # summaries come only from the stop
        "parquet: {max_file_age: 3600}\n"  # so do the Parquet files
        f"recovery: {{snapshot_interval: {snapshot_s}}}\n"
    )
    log = tmp_path / "edge-full.log"
    bytewax_snapshot_s = snapshot_s if runner == "bytewax" else None
    proc = start(config, log, port, bytewax_snapshot_s=bytewax_snapshot_s)
    accepted: set[tuple[str, int]] = set()
    for seq in range(READINGS):
        for device, token in DEVICES.items():
            if post(port, token, seq) == 200:
                accepted.add((device, seq))
    assert len(accepted) == READINGS * len(DEVICES)
    time.sleep(2.5)  # read by the flow, snapshots taken when they are every second
    filler = fill(small_disk)
    code, lines = stop(proc, log)

    assert code == 3, log.read_text()
    if runner == "bytewax":  # Bytewax prints its own panic and the sinks log without a format
        lines = lines[-1:]
    assert len(lines) == 1, log.read_text()
    assert lines[0].startswith("edgesieve: error: flow telemetry stopped: No space left on device")
    assert lines[0].endswith(
        f"what devices were told accepted is kept in {data / 'journal'} and processed by the "
        f"next start; hint: free space on the disk of {data}, then start the edge again"
    )
    assert not [p for p in data.rglob("*") if p.name.endswith(".tmp")]

    filler.unlink()
    log = tmp_path / "edge-after.log"
    proc = start(config, log, port)
    time.sleep(2.0)
    code, lines = stop(proc, log)
    assert code == 0 and not lines, log.read_text()  # the report goes to stdout

    points = query_parquet(data, "telemetry_points", "select device, value from {src}")
    assert sorted(points) == sorted((d, float(s)) for d, s in accepted)
    summaries = query_parquet(
        data, "telemetry_summary", "select device, sum(count) from {src} group by device"
    )
    assert sorted(summaries) == [(device, READINGS) for device in sorted(DEVICES)]
    with duckdb.connect(str(data / "edge.duckdb"), read_only=True) as db:
        stored = db.sql("select device, value from telemetry_points").fetchall()
    assert sorted(stored) == sorted((d, float(s)) for d, s in accepted)
    report = json.loads((data / "report-telemetry.json").read_text())
    assert report["journal_messages"] == 0 and report["journal_lag"] == 0


def test_a_report_that_cannot_be_written_is_one_warning_and_leaves_nothing(small_disk, caplog):
    path = small_disk / "report-telemetry.json"
    path.write_text("{}")  # the previous run's
    filler = fill(small_disk)
    rep = FlowReport("telemetry", messages_in=3, raw_bytes=30, stages={"received": 3})
    with caplog.at_level(logging.WARNING, "edgesieve.run"):
        assert rep.write(path) is False
    assert [r.getMessage() for r in caplog.records] == [
        f"report: {path} not written (No space left on device); the report is printed only; "
        f"hint: free space or fix the permissions of {small_disk}"
    ]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "report-telemetry.json"]
    assert path.read_text() == "{}"
    filler.unlink()
    assert rep.write(path) is True
    assert json.loads(path.read_text())["messages_in"] == 3
    assert sorted(p.name for p in small_disk.iterdir()) == ["report-telemetry.json"]
