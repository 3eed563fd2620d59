"""Power loss, approximated: the journal's disk image, copied with the ingest process frozen mid-write.

The data directory lives on an ext4 filesystem in a loop-mounted image file.
HTTP devices stream into the ingest process (``journal.sync: full``); at
random moments its process group is frozen (SIGSTOP), the set of readings
the devices were told "accepted" is taken, and the image file is copied
without syncing the filesystem inside it, then the process goes on (SIGCONT).
A copy holds what had reached the (virtual) disk: everything fsynced, and
any subset of what the kernel was writing back, but nothing still only in the
inner filesystem's page cache, which is what a power cut loses. Each copy is
then mounted (ext4 replays its own journal) and opened as the edge would
open it after the cut (SQLite rolls back or replays its WAL): every reading
accepted before the freeze must be in it, exactly once, and every partition
must pass ``PRAGMA integrity_check``.

Needs root (mount); skipped where loop devices cannot be mounted.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from connectors.devices.journal import journal_partitions
from connectors.devices.journal.format import part_path
from tests.conftest import DEVICES, free_port, wait_for, write_devices
from tests.flows.test_durability import INGEST, journaled, start

CUTS = 5
IMAGE_MB = 192


def mount(image: Path, at: Path) -> None:
    at.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(at)], check=True, capture_output=True)


def unmount(at: Path) -> None:
    subprocess.run(["umount", str(at)], check=True, capture_output=True)


@pytest.fixture
def disk(tmp_path: Path):
    """An ext4 image mounted at ``tmp_path/disk``; skipped without loop mounts."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root and mkfs.ext4 to mount a loop filesystem")
    image = tmp_path / "disk.img"
    with image.open("wb") as fh:
        fh.truncate(IMAGE_MB * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    at = tmp_path / "disk"
    try:
        mount(image, at)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a loop filesystem here: {exc.stderr.decode().strip()}")
    try:
        yield image, at
    finally:
        subprocess.run(["umount", "-l", str(at)], capture_output=True)


class HttpDevices:
    """Two HTTP devices posting numbered readings; each records the seqs answered 200."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted: dict[str, set[int]] = {d: set() for d in DEVICES}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._post, args=(d,), daemon=True) for d in DEVICES]

    def __enter__(self) -> HttpDevices:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def taken(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(d, s) for d, seqs in self.accepted.items() for s in seqs}

    def _post(self, device: str) -> None:
        token, seq, deadline = DEVICES[device], 0, time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("POST", f"/api/v1/{token}/telemetry", json.dumps({"seq": seq}))
                if conn.getresponse().status == 200:
                    with self._lock:
                        self.accepted[device].add(seq)
            except OSError:
                time.sleep(0.01)
            finally:
                conn.close()
            seq += 1


def test_every_reading_accepted_before_a_power_cut_is_in_the_journal_once(tmp_path, disk):
    image, at = disk
    rng = random.Random(11)
    port = free_port()
    config = tmp_path / "edge.yaml"
    config.write_text(
        f"data_dir: {at / 'var'}\n"
        f"devices: {write_devices(tmp_path, DEVICES)}\n"
        f'transports: {{http: {{listen: "127.0.0.1:{port}"}}}}\n'
        "journal: {sync: full}\n"
    )
    log = tmp_path / "ingest.log"
    proc = start(INGEST, config, log)
    cuts: list[tuple[Path, set[tuple[str, int]]]] = []
    try:
        wait_for(lambda: b"ingest: ready" in log.read_bytes() or proc.poll() is not None,
                 "ingest to start", 30)
        with HttpDevices(port) as devices:
            for i in range(CUTS):
                time.sleep(rng.uniform(0.3, 1.2))
                os.killpg(proc.pid, signal.SIGSTOP)
                try:
                    time.sleep(0.05)  # answers already on the wire reach the devices
                    accepted = devices.taken()
                    copy = tmp_path / f"cut-{i}.img"
                    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
                finally:
                    os.killpg(proc.pid, signal.SIGCONT)
                cuts.append((copy, accepted))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert len(cuts[-1][1]) > 100, "too few readings accepted to mean anything"
    for copy, accepted in cuts:
        view = tmp_path / "view"
        mount(copy, view)
        try:
            root = view / "var" / "journal"
            for partition in range(journal_partitions(root) or 0):
                db = sqlite3.connect(part_path(root, partition))
                try:
                    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                finally:
                    db.close()
            seen: Counter[tuple[str, int]] = journaled(root)
        finally:
            unmount(view)
        copy.unlink()
        doubled = sorted(k for k, n in seen.items() if n > 1)
        assert not doubled, f"{copy.name}: stored twice: {doubled[:10]}"
        missing = sorted(accepted - set(seen))
        assert not missing, f"{copy.name}: accepted before the cut, not on disk: {missing[:10]} ({len(missing)})"
