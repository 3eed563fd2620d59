"""Time ``edgesieve report`` on a demo-like data directory and print the HTML's size.

The data directory is made the way the demo makes it, faster than real time:
recorded device messages (sensors' telemetry JSON, EVB1 vibration blocks of a
healthy, an imbalanced and a bearing-fault machine, and a few malformed
messages) run through ``flows.edge`` on an :class:`~flows.api.Edge` with
``source=TestingSource(...)``, into Parquet, the run reports and a real
:class:`~connectors.cloud.CloudReceiver`. Then the report is built from it
twice (without and with ``--cloud``) and timed. The baseline is reading every
column of the same Parquet files once with DuckDB into Arrow: the report's
floor, since it has to read them.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from bytewax.testing import TestingSource

from connectors.cloud import CloudReceiver
from connectors.codecs.evb1 import encode_evb1
from flows import edge
from flows.accounting import FlowReport
from flows.api import Edge
from flows.config import parse_config
from flows.machines import Machine
from flows.simulator import telemetry_payloads
from operators.records import RawMessage

EDGE_ID = "demo-edge"
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
BLOCK_FRAMES = 4096
SAMPLE_RATE_HZ = 2048
KINDS = ("healthy", "imbalance", "bearing")


@dataclass(frozen=True)
class Made:
    """A data directory made by :func:`make_data_dir`."""

    data_dir: Path
    cloud: Path
    """The receiver's DuckDB file."""
    reports: dict[str, FlowReport]
    """The run's reports, as the edge returned them."""


def messages(
    minutes: float, sensors: int, machines: int, sensor_period_s: float
) -> Iterator[RawMessage]:
    """Device messages in time order: telemetry, vibration blocks, and 3 malformed payloads.

    Machines sample at :data:`SAMPLE_RATE_HZ` in contiguous blocks of
    :data:`BLOCK_FRAMES` frames (2 s), so an hour of vibration stays small.
    """
    period = timedelta(seconds=sensor_period_s)
    per_sensor = max(1, int(minutes * 60 / sensor_period_s))
    pairs = telemetry_payloads(sensors, per_sensor, period=period, start=T0)
    fleet = {
        f"machine-{i:02d}-{KINDS[i % 3]}": Machine(
            KINDS[i % 3], sample_rate_hz=SAMPLE_RATE_HZ, seed=i
        )
        for i in range(machines)
    }
    block_s = BLOCK_FRAMES / SAMPLE_RATE_HZ
    blocks_per_machine = max(1, int(minutes * 60 / block_s))
    next_block = 0
    for i, (device, body) in enumerate(pairs):
        when = T0 + period * (i // sensors)
        while (
            next_block < blocks_per_machine and T0 + timedelta(seconds=next_block * block_s) <= when
        ):
            start = T0 + timedelta(seconds=next_block * block_s)
            for name, machine in fleet.items():
                signal = machine.signal(next_block * BLOCK_FRAMES, BLOCK_FRAMES)
                payload = encode_evb1(signal, sample_rate_hz=SAMPLE_RATE_HZ, start_ts=start)
                yield RawMessage(name, "vibration", "mqtt", start, payload)
            next_block += 1
        yield RawMessage(device, "telemetry", "mqtt", when, body)
        if i in (10, 1000, 5000):
            yield RawMessage(device, "telemetry", "http", when, b'{"temperature": ')


def make_data_dir(
    root: Path,
    *,
    minutes: float = 60,
    sensors: int = 20,
    machines: int = 3,
    sensor_period_s: float = 1.0,
) -> Made:
    """Run the recorded messages through ``flows.edge`` into a receiver; what it left."""
    data_dir = root / "edge"
    db = root / "cloud.duckdb"
    secret = secrets.token_urlsafe(18)
    with CloudReceiver("127.0.0.1:0", db, {EDGE_ID: secret}) as receiver:
        config = parse_config(
            {
                "edge_id": EDGE_ID,
                "data_dir": str(data_dir),
                "vibration": {"fft_size": 2048, "frames_per_row": 1},
                "sinks": {"raw_readings": True},
                "telemetry": {
                    "deadband": {"absolute": 0.1, "max_silence": 60},
                    "window": {"length": 60},
                },
                "cloud": {
                    "target": f"127.0.0.1:{receiver.port}",
                    "key": EDGE_ID,
                    "secret": secret,
                    "batch_age": 0.2,
                    "stop_timeout": 30,
                },
            },
            source="bench_report",
        )
        source = messages(minutes, sensors, machines, sensor_period_s)
        flow = Edge(config, name="edge", source=TestingSource(list(source), 64))
        edge.build(flow)
        result = flow.run()
    return Made(data_dir, db, result.reports)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60, help="simulated time (60)")
    parser.add_argument("--sensors", type=int, default=20, help="sensors, 2 keys each, 1 Hz (20)")
    parser.add_argument("--machines", type=int, default=3, help="vibrating machines (3)")
    args = parser.parse_args(argv)
    from flows.report import build_report

    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        t0 = time.perf_counter()
        made_dir = make_data_dir(
            Path(tmp),
            minutes=args.minutes,
            sensors=args.sensors,
            machines=args.machines,
        )
        made = time.perf_counter() - t0
        data_dir, db = made_dir.data_dir, made_dir.cloud
        t0 = time.perf_counter()
        rows = 0
        for stream in sorted((data_dir / "parquet").iterdir()):
            glob = str(stream / "**" / "*.parquet")
            table = duckdb.sql(f"select * from read_parquet('{glob}')").to_arrow_table()
            rows += table.num_rows
        baseline = time.perf_counter() - t0
        print(
            f"data: {args.minutes:g} min, {args.sensors} sensors at 1 Hz, {args.machines} "
            f"machines ({SAMPLE_RATE_HZ} Hz x 3 axes, a feature row per second): {rows} local "
            f"rows, made in {made:.1f} s"
        )
        for cloud in (None, db):
            out = Path(tmp) / "report.html"
            t0 = time.perf_counter()
            build_report(data_dir, out, cloud=cloud)
            seconds = time.perf_counter() - t0
            size = out.stat().st_size
            print(
                f"report{' --cloud' if cloud else ''}: {seconds:.2f} s, {size / 1e6:.2f} MB HTML "
                f"(reading every Parquet file once: {baseline:.2f} s, "
                f"{seconds / baseline:.0f}x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
