"""Traffic reduction of the standard flows on five workloads, measured at a real cloud receiver.

Each workload is generated reproducibly from ``--seed`` as the device
payloads themselves (``RawMessage``: telemetry JSON, EVB1 vibration blocks,
JSON log lines), fed through the standard flow on an :class:`~flows.api.Edge`
(``Edge(config, source=...)``) and sent over gRPC through the outbox to the
reference receiver (``CloudReceiver`` on a loopback ephemeral port, a fresh
DuckDB file). The ratio is the receiver's: ``sum(raw_bytes) / sum(wire_bytes)``
over its ``uplink_batches``, beside the published table's ratio for that kind
of data (the edge-computing patterns table: sensor change > 5 % filtering
20:1, vibration FFT + threshold 10:1, logs error-only filtering 50:1, metrics
summaries 5:1; ReductStore 10,000:1 for 1 s RMS of a 10 kHz signal). Then
each workload's fidelity, computed from what the receiver stored against the
raw data:

``sensor``
    20 sensors, temperature and humidity (random walk + noise + rare
    steps, ``flows.simulator.telemetry_payloads``) at 1 Hz;
    ``flows.telemetry`` with a 1 % deadband and the points sent to the cloud
    (hourly summaries beside them). Fidelity: sample-and-hold of the points
    the cloud holds against every raw reading: the largest error, and how
    many readings are beyond the deadband tolerance (must be 0).
``vibration``
    Four machines at 25.6 kHz, 3 axes, float32 EVB1: healthy, imbalance,
    bearing fault, and one healthy machine whose imbalance starts mid-run;
    ``flows.vibration`` (spectral features, ISO zone and kurtosis alarms,
    report-by-exception). Fidelity: every alarm raised on the edge is in the
    cloud, each faulty machine raised one and the healthy one none, and the
    latency in event time from the mid-run fault's start to its alarm's ts.
``vibration-steady``
    One healthy machine, same signal, long enough for the heartbeat to
    matter. Fidelity: the largest gap between rows in the cloud (bounded by
    the heartbeat) and that every local row is within tolerance of a row the
    cloud holds (:func:`operators.exception.moved`).
``logs``
    Services logging JSON lines: INFO/DEBUG chatter with varying numbers,
    sparse WARN/ERROR bursts; ``flows.logs``. Fidelity: every ERROR line in
    the cloud's ``log_events``. Printed as skipped when ``flows.logs`` is not
    installed.
``metrics``
    Host metrics (CPU, memory, disk, network, load) at 1 s;
    ``flows.telemetry`` with one-minute window summaries to the cloud.
    Fidelity: every summary's count, min and max equal the raw readings',
    and its mean's largest error.

Every line starts with the workload's name and holds ``raw/wire = R:1``,
then the same rows' ratio at live pace (:func:`live_wire`).
The flows are loaded by name from :data:`FLOWS` with
``flows.runtime.load_flow_builder``, so running a workload from a flow file
is a change of that one line. Simulated time runs much faster than real time
here; batches are sealed by row count and wall-clock age (``cloud.batch_age``),
so a workload's batches hold more of its simulated time than a live edge's
would (the batch count is printed; docs/uplink.md explains the per-batch cost).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import secrets
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from bytewax.testing import TestingSource

from connectors.cloud import CloudReceiver
from connectors.codecs.evb1 import encode_evb1
from connectors.streams import STREAMS, conform
from connectors.uplink.seal import seal
from connectors.uplink.wire import priority_of
from flows.api import Edge
from flows.config import CloudSection, ConfigError, parse_config
from flows.machines import Machine
from flows.runtime import FlowBuilder, load_flow_builder
from flows.simulator import log_payloads, telemetry_payloads
from operators.exception import ReportConfig, moved
from operators.records import RawMessage

EDGE_ID = "bench-edge"
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
BLOCK_FRAMES = 4096

FLOWS: dict[str, str] = {
    "sensor": "telemetry.flow.yaml",
    "vibration": "vibration.flow.yaml",
    "vibration-steady": "vibration.flow.yaml",
    "logs": "logs.flow.yaml",
    "metrics": "telemetry.flow.yaml",
}
"""The standard flow file each workload runs (``flows/standard``); a module name
(``flows.telemetry``) or a path works too."""


@dataclass
class Generated:
    """A workload's device messages and what its fidelity check compares against."""

    messages: Any
    """An iterable of RawMessage (re-iterable, may be lazy)."""
    describe: str
    truth: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What one workload's run left behind."""

    data_dir: Path
    db: Path
    raw: int
    wire: int
    batches: int
    rows: int
    seconds: float

    def cloud(self, sql: str, *args: Any) -> list[tuple]:
        with duckdb.connect(str(self.db), read_only=True) as con:
            return con.execute(sql, list(args)).fetchall()

    def local(self, stream: str, sql: str) -> list[tuple]:
        glob = str(self.data_dir / "parquet" / stream / "**" / "*.parquet")
        source = f"read_parquet('{glob}', hive_partitioning=true)"
        return duckdb.sql(sql.format(src=source)).fetchall()


@dataclass(frozen=True)
class Workload:
    name: str
    published: str
    target: float
    config: dict[str, Any]
    generate: Callable[[int, bool], Generated]
    fidelity: Callable[[Generated, Run], tuple[str, bool]]


def _ratio(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}:1"
    return f"{value:.1f}:1"


# --- sensor --------------------------------------------------------------------------------

SENSOR_PERCENT = 1.0


def sensor_messages(seed: int, quick: bool) -> Generated:
    devices, seconds = (4, 900) if quick else (20, 3600)
    pairs = telemetry_payloads(devices, seconds, start=T0, seed=seed)
    messages = [
        RawMessage(device, "telemetry", "mqtt", T0 + timedelta(seconds=i // devices), body)
        for i, (device, body) in enumerate(pairs)
    ]
    return Generated(
        messages,
        f"{devices} sensors x 2 keys at 1 Hz for {seconds / 60:g} min",
        {"readings": _readings(pairs)},
    )


def _readings(pairs: list[tuple[str, bytes]]) -> pa.Table:
    """Every raw reading of telemetry JSON payloads, as a table (device, key, ts, value)."""
    device, key, ts, value = [], [], [], []
    for dev, body in pairs:
        data = json.loads(body)
        when = datetime.fromtimestamp(data["ts"] / 1000, tz=UTC)
        for k, v in data["values"].items():
            device.append(dev)
            key.append(k)
            ts.append(when)
            value.append(float(v))
    return pa.table(
        {
            "device": device,
            "key": key,
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "value": value,
        }
    )


def sensor_fidelity(gen: Generated, run: Run) -> tuple[str, bool]:
    with _compare(
        run, gen.truth["readings"], "select device, key, ts, value from telemetry_points"
    ) as con:
        worst, beyond, missing, total = con.sql(
            "select max(abs(r.value - p.value)), "
            f"count(*) filter (where abs(r.value - p.value) > {SENSOR_PERCENT / 100} "
            "* abs(p.value) + 1e-9), "
            "count(*) filter (where p.value is null), count(*) "
            "from raw r asof left join cloud p "
            "on r.device = p.device and r.key = p.key and r.ts >= p.ts"
        ).fetchall()[0]
    ok = beyond == 0 and missing == 0
    return (
        f"max reconstruction error {worst:.3f} (tolerance {SENSOR_PERCENT:g} % of the held "
        f"value), {beyond} of {total} readings beyond it",
        ok,
    )


@contextmanager
def _compare(run: Run, raw: pa.Table, cloud_sql: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """In-memory DuckDB with ``raw`` (the raw readings) and ``cloud`` (what the receiver holds)."""
    with duckdb.connect(str(run.db), read_only=True) as stored:
        cloud = stored.sql(cloud_sql).arrow()
    with duckdb.connect() as con:
        con.register("raw", raw)
        con.register("cloud", cloud)
        yield con


# --- vibration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """EVB1 blocks of machines, round-robin in time order, made lazily (a re-iterable)."""

    machines: dict[str, tuple[Machine, Machine | None, int]]
    """device -> (machine, machine after the fault or None, first block of the fault)."""
    count: int

    def __iter__(self) -> Iterator[RawMessage]:
        fs = next(iter(self.machines.values()))[0].sample_rate_hz
        for i in range(self.count):
            first = i * BLOCK_FRAMES
            start = T0 + timedelta(microseconds=(first * 2_000_000 + fs) // (2 * fs))
            for device, (before, after, fault) in self.machines.items():
                machine = after if after is not None and i >= fault else before
                payload = encode_evb1(
                    machine.signal(first, BLOCK_FRAMES), sample_rate_hz=fs, start_ts=start
                )
                yield RawMessage(device, "vibration", "mqtt", start, payload)

    def fault_start(self, device: str) -> datetime:
        machine, _, fault = self.machines[device]
        return T0 + timedelta(seconds=fault * BLOCK_FRAMES / machine.sample_rate_hz)


FAULTY = {"fan-2": "imbalance", "motor-3": "bearing", "press-4": "imbalance from mid-run"}


def vibration_messages(seed: int, quick: bool) -> Generated:
    seconds = 20 if quick else 60
    count = int(seconds * 25_600 / BLOCK_FRAMES)
    machines = {
        "pump-1": (Machine("healthy", seed=seed), None, 0),
        "fan-2": (Machine("imbalance", seed=seed + 1), None, 0),
        "motor-3": (Machine("bearing", seed=seed + 2), None, 0),
        "press-4": (
            Machine("healthy", seed=seed + 3),
            Machine("imbalance", seed=seed + 3),
            count // 2,
        ),
    }
    blocks = Blocks(machines, count)
    return Generated(
        blocks,
        f"4 machines (healthy, imbalance, bearing, imbalance from mid-run), 25.6 kHz x 3 axes "
        f"float32, {seconds} s",
        {"blocks": blocks},
    )


def vibration_fidelity(gen: Generated, run: Run) -> tuple[str, bool]:
    blocks: Blocks = gen.truth["blocks"]
    query = "select device, key, rule, ts, state from {src}"
    local = set(run.local("alarms", query))
    cloud = set(run.cloud("select device, key, rule, ts, state from alarms"))
    raised = {d for d, _, _, _, state in cloud if state == "raised"}
    fault = blocks.fault_start("press-4")
    after = sorted(
        ts
        for d, _, _, ts, state in cloud
        if d == "press-4" and state == "raised" and ts >= fault - timedelta(seconds=1)
    )
    latency = (after[0] - fault).total_seconds() if after else math.nan
    missed = sorted(set(FAULTY) - raised)
    false = sorted(raised - set(FAULTY))
    ok = local == cloud and not missed and not false and bool(after)
    missing = f" (missed {', '.join(missed)})" if missed else ""
    return (
        f"{len(cloud)} of {len(local)} alarms delivered, faults alarmed "
        f"{len(FAULTY) - len(missed)}/{len(FAULTY)}{missing}, false alarms {len(false)}, "
        f"mid-run fault alarm latency {latency:.2f} s event time",
        ok,
    )


def steady_messages(seed: int, quick: bool) -> Generated:
    seconds = 60 if quick else 12 * 60
    count = int(seconds * 25_600 / BLOCK_FRAMES)
    blocks = Blocks({"pump-9": (Machine("healthy", seed=seed), None, 0)}, count)
    return Generated(
        blocks,
        f"1 healthy machine, 25.6 kHz x 3 axes float32, {seconds / 60:g} min",
        {"blocks": blocks},
    )


def steady_fidelity(gen: Generated, run: Run) -> tuple[str, bool]:
    config = ReportConfig()
    sent = run.cloud("select axis, ts from vibration_features order by axis, ts")
    local = run.local("vibration_features", "select count(*) from {src}")[0][0]
    gaps = [
        (b - a).total_seconds()
        for (xa, a), (xb, b) in zip(sent, sent[1:], strict=False)
        if xa == xb
    ]
    biggest = max(gaps, default=0.0)
    # every local row is within tolerance of the newest cloud row at or before it
    rows = run.local(
        "vibration_features",
        "select axis, ts, rms, velocity_rms_mm_s, peak, crest_factor, kurtosis, dominant_hz, "
        "band_energy, iso_zone from {src} order by axis, ts",
    )
    cloud_rows = {
        (r[0], r[1]): _row(r)
        for r in run.cloud(
            "select axis, ts, rms, velocity_rms_mm_s, peak, crest_factor, kurtosis, dominant_hz, "
            "band_energy, iso_zone from vibration_features"
        )
    }
    reference: dict[str, Any] = {}
    beyond = 0
    for r in rows:
        row = _row(r)
        ref = cloud_rows.get((r[0], r[1]))
        if ref is not None:
            reference[r[0]] = ref
            continue
        last = reference.get(r[0])
        if last is None or last.iso_zone != row.iso_zone or moved(_LOOSE, last, row) is not None:
            beyond += 1
    heartbeat = config.heartbeat.total_seconds() if config.heartbeat else math.inf
    ok = beyond == 0 and biggest <= heartbeat + 1
    return (
        f"{len(sent)} of {local} rows sent, largest gap {biggest:.0f} s (heartbeat "
        f"{heartbeat:.0f} s), {beyond} skipped rows beyond tolerance",
        ok,
    )


_LOOSE = ReportConfig(tolerance=0.1 * (1 + 1e-6))
"""The default tolerance, loosened by the float32 rounding of the rows the cloud holds."""


@dataclass(frozen=True)
class _Features:
    axis: str
    ts: datetime
    rms: float
    velocity_rms_mm_s: float
    peak: float
    crest_factor: float | None
    kurtosis: float | None
    dominant_hz: float
    band_energy: tuple[float, ...]
    iso_zone: str


def _row(r: tuple) -> _Features:
    return _Features(*r[:8], tuple(r[8]), r[9])


# --- logs ----------------------------------------------------------------------------------

def log_messages(seed: int, quick: bool) -> Generated:
    """Services logging JSON lines (``flows.simulator.log_payloads``), one message a second each."""
    services, seconds = (3, 300) if quick else (10, 1800)
    logs = log_payloads(services, seconds, start=T0, seed=seed)
    messages = [RawMessage(m.device, "logs", "mqtt", m.sent_at, m.body) for m in logs]
    errors = [(m.device, msg) for m in logs for msg in m.errors]
    return Generated(
        messages,
        f"{services} services, JSON lines (INFO/DEBUG chatter, WARN/ERROR bursts) for "
        f"{seconds / 60:g} min",
        {"errors": errors},
    )


def logs_fidelity(gen: Generated, run: Run) -> tuple[str, bool]:
    expected: list[tuple[str, str]] = gen.truth["errors"]
    stored = run.cloud("select device, msg from log_events where level = 'error'")
    missing = sorted(set(expected) - set(stored))
    return (
        f"{len(set(expected)) - len(missing)} of {len(set(expected))} ERROR lines delivered",
        not missing,
    )


# --- metrics -------------------------------------------------------------------------------


def metrics_messages(seed: int, quick: bool) -> Generated:
    rng = np.random.default_rng(seed)
    hosts, seconds = (3, 600) if quick else (10, 3600)
    pairs: list[tuple[str, bytes]] = []
    n = seconds
    series: dict[str, np.ndarray] = {}
    per_host = []
    for _ in range(hosts):
        busy = np.clip(
            20
            + np.cumsum(rng.normal(0, 1.5, n)) * 0.2
            + rng.gamma(1.5, 4, n)
            + (rng.random(n) < 0.01) * rng.uniform(20, 60, n),
            0,
            100,
        )
        series = {
            "cpu_user_pct": busy * 0.7,
            "cpu_system_pct": busy * 0.2 + rng.gamma(1, 0.5, n),
            "cpu_iowait_pct": rng.gamma(0.5, 1.0, n),
            "load1": np.clip(busy / 25 + rng.normal(0, 0.05, n), 0, None),
            "mem_used_pct": np.clip(55 + np.cumsum(rng.normal(0, 0.02, n)), 0, 100),
            "mem_available_mb": 16_000 * (1 - (55 + np.cumsum(rng.normal(0, 0.02, n))) / 100),
            "swap_used_pct": np.full(n, 2.0) + (np.arange(n) > n // 2) * 0.5,
            "disk_used_pct": 71.0 + np.arange(n) * 1e-4,
            "disk_read_kbs": rng.lognormal(3, 1.2, n),
            "disk_write_kbs": rng.lognormal(4, 1.0, n),
            "net_rx_kbs": rng.lognormal(5, 0.8, n),
            "net_tx_kbs": rng.lognormal(4.5, 0.8, n),
        }
        per_host.append(series)
    start_ms = int(T0.timestamp() * 1000)
    for t in range(n):
        for h in range(hosts):
            values = {k: round(float(v[t]), 2) for k, v in per_host[h].items()}
            body = {"ts": start_ms + t * 1000, "values": values}
            pairs.append((f"host-{h:02d}", json.dumps(body, separators=(",", ":")).encode()))
    messages = [
        RawMessage(device, "telemetry", "mqtt", T0 + timedelta(seconds=i // hosts), body)
        for i, (device, body) in enumerate(pairs)
    ]
    return Generated(
        messages,
        f"{hosts} hosts x {len(series)} metrics at 1 s for {seconds / 60:g} min",
        {"readings": _readings(pairs)},
    )


def metrics_fidelity(gen: Generated, run: Run) -> tuple[str, bool]:
    raw = gen.truth["readings"]
    summaries = (
        'select device, key, window_start, window_end, "count", mean, "min", "max" '
        "from telemetry_summary"
    )
    with _compare(run, raw, summaries) as con:
        rows, count_off, min_off, max_off, mean_err, covered = con.sql(
            "with truth as ("
            "  select s.device, s.key, s.window_start, count(*) n, avg(r.value) mean, "
            "  min(r.value) lo, max(r.value) hi, any_value(s.count) c, any_value(s.mean) m, "
            "  any_value(s.min) smin, any_value(s.max) smax "
            "  from cloud s join raw r on r.device = s.device and r.key = s.key "
            "  and r.ts >= s.window_start and r.ts < s.window_end "
            "  group by all) "
            "select count(*), count(*) filter (where n != c), count(*) filter (where lo != smin), "
            "count(*) filter (where hi != smax), max(abs(mean - m)), sum(n) from truth"
        ).fetchall()[0]
    total = raw.num_rows
    ok = rows > 0 and count_off == 0 and min_off == 0 and max_off == 0 and covered == total
    return (
        f"{rows} summaries over {covered} of {total} readings: count/min/max wrong in "
        f"{count_off}/{min_off}/{max_off}, largest mean error {mean_err:.1e}",
        ok,
    )


# --- the workloads -------------------------------------------------------------------------

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "sensor",
        "20:1",
        40,
        {
            "telemetry": {
                "deadband": {"absolute": None, "percent": SENSOR_PERCENT},
                "window": {"length": 3600},
            },
            "cloud": {"send_points": True},
        },
        sensor_messages,
        sensor_fidelity,
    ),
    Workload("vibration", "10:1", 1_000, {}, vibration_messages, vibration_fidelity),
    Workload(
        "vibration-steady", "10,000:1 (ReductStore)", 10_000, {}, steady_messages, steady_fidelity
    ),
    Workload("logs", "50:1", 100, {}, log_messages, logs_fidelity),
    Workload(
        "metrics",
        "5:1",
        10,
        {"telemetry": {"window": {"length": 60}}},
        metrics_messages,
        metrics_fidelity,
    ),
)


def _merge(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in more.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


_CLOUD_DEFAULTS = CloudSection(target="127.0.0.1:1", key=EDGE_ID, secret="-")
LIVE_BATCH_AGE = _CLOUD_DEFAULTS.batch_age
"""``cloud.batch_age`` of a live edge (the default), whose batches the live-pace figure re-seals."""


def live_wire(
    run: Run,
    *,
    batch_age: timedelta = LIVE_BATCH_AGE,
    partitions: int = _CLOUD_DEFAULTS.partitions,
    alarm_batch_age: timedelta = _CLOUD_DEFAULTS.alarm_batch_age,
) -> int:
    """Wire bytes of the rows the receiver stored, sealed as a live edge would have sealed them.

    Here simulated time runs far faster than real time, so the sink's
    wall-clock ``batch_age`` lets a batch gather minutes of rows. A live
    edge seals each partition's rows ``batch_age`` after the first of them
    (alarms: ``alarm_batch_age``);
    each batch costs about 1-3 KB of Arrow schema and buffer headers. This
    re-seals the stored rows of every stream that way, by event time, with
    the edge's own :func:`~connectors.uplink.seal.seal`, routed to
    ``partitions`` partitions by device like the cloud sink.
    """
    total = 0
    with duckdb.connect(str(run.db), read_only=True) as con:
        streams = [s for (s,) in con.sql("select distinct stream from uplink_batches").fetchall()]
        for stream in streams:
            spec = STREAMS[stream]
            age = alarm_batch_age if priority_of(stream) == 0 else batch_age
            table = con.sql(
                f"select {', '.join(spec.columns)} from {stream} order by {spec.time_column}"
            ).arrow()
            table = conform(spec, table.read_all() if hasattr(table, "read_all") else table)
            times = table.column(spec.time_column).to_pylist()
            devices = table.column("device").to_pylist()
            groups: dict[tuple[int, int], list[int]] = {}
            opened: dict[int, datetime] = {}
            count: dict[int, int] = {}
            for i, (when, device) in enumerate(zip(times, devices, strict=True)):
                part = zlib.adler32(device.encode()) % partitions
                if part not in opened or when >= opened[part] + age:
                    opened[part] = when
                    count[part] = count.get(part, 0) + 1
                groups.setdefault((part, count[part]), []).append(i)
            for rows in groups.values():
                batch = table.take(pa.array(rows))
                total += len(seal(EDGE_ID, stream, batch, priority=0).payload)
    return total


def run_workload(workload: Workload, gen: Generated, build: FlowBuilder, tmp: Path) -> Run:
    """Run ``gen`` through ``build`` on an Edge into a fresh receiver; what the receiver got."""
    data_dir = tmp / workload.name / "edge"
    db = tmp / workload.name / "cloud.duckdb"
    secret = secrets.token_urlsafe(18)
    with CloudReceiver("127.0.0.1:0", db, {EDGE_ID: secret}) as receiver:
        base = {
            "edge_id": EDGE_ID,
            "data_dir": str(data_dir),
            "cloud": {
                "target": f"127.0.0.1:{receiver.port}",
                "key": EDGE_ID,
                "secret": secret,
                "stop_timeout": 30,
            },
        }
        config = parse_config(_merge(base, workload.config), source=workload.name)
        edge = Edge(
            config, name=workload.name.replace("-", "_"), source=TestingSource(gen.messages, 64)
        )
        build(edge)
        t0 = time.perf_counter()
        edge.run()
        seconds = time.perf_counter() - t0
    with duckdb.connect(str(db), read_only=True) as con:
        batches, rows, raw, wire = con.sql(
            "select count(*), coalesce(sum(rows), 0), coalesce(sum(raw_bytes), 0), "
            "coalesce(sum(wire_bytes), 0) from uplink_batches"
        ).fetchall()[0]
    return Run(data_dir, db, int(raw), int(wire), int(batches), int(rows), seconds)


def measure(
    workload: Workload,
    *,
    seed: int,
    quick: bool,
    tmp: Path,
    live_batch_age: timedelta = LIVE_BATCH_AGE,
) -> tuple[str, bool]:
    """One workload: its line (name, ratio, published ratio, fidelity) and whether fidelity held."""
    try:
        build = load_flow_builder(FLOWS[workload.name])
    except ConfigError:
        return f"{workload.name}: skipped ({FLOWS[workload.name]} not available)", True
    gen = workload.generate(seed, quick)
    run = run_workload(workload, gen, build, tmp)
    ratio = run.raw / run.wire if run.wire else math.nan
    live = live_wire(run, batch_age=live_batch_age)
    fidelity, ok = workload.fidelity(gen, run)
    verdict = "OK" if ratio >= workload.target else f"BELOW TARGET {_ratio(workload.target)}"
    line = (
        f"{workload.name}: raw/wire = {_ratio(ratio)} (published {workload.published}; "
        f"target >= {_ratio(workload.target)} {verdict}; at live pace {_ratio(run.raw / live)} "
        f"with batch_age {live_batch_age.total_seconds():g} s); {fidelity}; "
        f"{'fidelity OK' if ok else 'FIDELITY FAILED'} | {gen.describe}; {run.raw:,} raw B, "
        f"{run.wire:,} wire B in {run.batches} batches ({run.rows} rows), {run.seconds:.1f} s"
    )
    return line, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=13, help="seed of every workload")
    parser.add_argument("--quick", action="store_true", help="small workloads (a smoke run)")
    parser.add_argument(
        "--only", action="append", choices=[w.name for w in WORKLOADS], help="run only these"
    )
    parser.add_argument(
        "--live-batch-age",
        type=float,
        default=LIVE_BATCH_AGE.total_seconds(),
        help="cloud.batch_age in seconds of the live edge the live-pace figure re-seals for",
    )
    args = parser.parse_args(argv)
    live_age = timedelta(seconds=args.live_batch_age)
    logging.basicConfig(level=logging.WARNING)
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-reduction-") as tmp:
        for workload in WORKLOADS:
            if args.only and workload.name not in args.only:
                continue
            line, fine = measure(
                workload, seed=args.seed, quick=args.quick, tmp=Path(tmp), live_batch_age=live_age
            )
            print(line, flush=True)
            ok = ok and fine
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
