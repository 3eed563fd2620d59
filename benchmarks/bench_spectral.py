"""Spectral features: the Bytewax ``spectral`` operator versus a bare NumPy loop.

The same EVB1 blocks (4096 frames, float32, 3 axes, 25.6 kHz, from the
machine simulator; one healthy, one imbalanced and one bearing-fault machine)
go through

(a) a bare NumPy loop: parse each payload with ``np.frombuffer``, join the
    tail of the previous block, stack the frames, one ``rfft`` per group of
    blocks, the same features per row (no Bytewax, no records). It takes
    the blocks in groups of the flow's source batch size (the same chance to
    stack frames; this is the baseline of the ratio) and, for reference, one
    block at a time;
(b) a Bytewax dataflow: TestingSource of RawMessage -> decode_vibration ->
    key by device -> spectral(frames_per_row=6, about 1 s per row) -> a
    counting sink;
(c) the standard vibration flow (``flows.vibration``: decode, spectral,
    threshold alarms, Parquet sinks) from the same in-memory source.

It checks that both computed the same features, then prints samples per
second for both, the ratio (b)/(a) (target >= 0.5), and the byte reduction:
raw EVB1 bytes / the feature rows as an Arrow IPC stream with zstd buffers
(target >= 1000:1 at one row per second per axis).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime

import bytewax.operators as op
import numpy as np
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSource, run_main

from connectors.codecs.evb1 import decode_vibration
from connectors.streams import STREAMS, to_table
from flows import vibration
from flows.accounting import Meter, report
from flows.api import Edge
from flows.config import parse_config
from flows.machines import Machine, blocks
from operators.records import RawMessage
from operators.spectral import Features, spectral

FS = 25_600
FFT = 4096
FRAMES_PER_ROW = 6
BANDS = ((10.0, 100.0), (100.0, 1000.0), (1000.0, 5000.0))
VELOCITY = (10.0, 1000.0)
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MACHINES = {"pump-healthy": "healthy", "fan-imbalance": "imbalance", "motor-bearing": "bearing"}


def make_messages(count: int) -> list[RawMessage]:
    """``count`` blocks in total, round-robin over the machines, in time order."""
    per_device = -(-count // len(MACHINES))
    streams = [
        [
            RawMessage(device, "vibration", "mqtt", T0, payload)
            for payload in blocks(
                Machine(kind, seed=i), device=device, count=per_device, start_ts=T0
            )
        ]
        for i, (device, kind) in enumerate(MACHINES.items())
    ]
    return [msg for group in zip(*streams, strict=True) for msg in group][:count]


# --- (a) bare NumPy -------------------------------------------------------------------


class BareSpectral:
    """Straightforward NumPy implementation of the same features, per device."""

    def __init__(self) -> None:
        self.window = np.hanning(FFT + 1)[:FFT]
        s1, s2 = self.window.sum(), np.dot(self.window, self.window)
        bins = FFT // 2 + 1
        freqs = np.arange(bins) * FS / FFT
        self.weight = np.full(bins, 2.0 / (FFT * s2))
        self.weight[[0, -1]] /= 2
        self.amp = 2.0 / s1
        self.df = FS / FFT
        self.bands = [(np.searchsorted(freqs, lo), np.searchsorted(freqs, hi)) for lo, hi in BANDS]
        v0, v1 = np.searchsorted(freqs, VELOCITY[0]), np.searchsorted(freqs, VELOCITY[1])
        self.vel = (v0, v1, 1.0 / (2 * np.pi * freqs[v0:v1]) ** 2)
        self.tails: dict[str, np.ndarray] = {}
        self.pending: dict[str, list[tuple[np.ndarray, ...]]] = {}
        self.rows: list[tuple] = []

    def feed(self, device: str, payloads: list[bytes]) -> None:
        """Process one or more consecutive blocks of one device."""
        parts = [np.frombuffer(p, "<f4", offset=24).reshape(-1, 3) for p in payloads]
        tail = self.tails.get(device)
        if tail is not None and len(tail):
            parts.insert(0, tail)
        x = np.concatenate(parts) if len(parts) > 1 else parts[0]
        count = len(x) // FFT
        self.tails[device] = x[count * FFT :].astype(np.float64)
        if not count:
            return
        frames = np.ascontiguousarray(x[: count * FFT].T, dtype=np.float64).reshape(3, count, FFT)
        frames -= frames.mean(axis=2, keepdims=True)
        sq = frames * frames
        stats = (sq.sum(2).T, (sq * sq).sum(2).T, np.abs(frames).max(2).T)
        frames *= self.window
        spec = np.fft.rfft(frames, axis=2)
        power = (spec.real**2 + spec.imag**2).transpose(1, 0, 2)
        pending = self.pending.setdefault(device, [])
        for i in range(count):
            pending.append((power[i], stats[0][i], stats[1][i], stats[2][i]))
            if len(pending) == FRAMES_PER_ROW:
                self.emit(device, pending)
                pending.clear()

    def finish(self) -> None:
        for device, pending in self.pending.items():
            if pending:
                self.emit(device, pending)
                pending.clear()

    def emit(self, device: str, frames: list[tuple[np.ndarray, ...]]) -> None:
        k = len(frames)
        power = sum(f[0] for f in frames) / k
        ms = sum(f[1] for f in frames) / (k * FFT)
        m4 = sum(f[2] for f in frames) / (k * FFT)
        peak = np.max([f[3] for f in frames], axis=0)
        rms = np.sqrt(ms)
        energy = power * self.weight
        bands = np.stack([energy[:, a:b].sum(1) for a, b in self.bands], axis=1)
        v0, v1, w = self.vel
        velocity = np.sqrt((energy[:, v0:v1] * w).sum(1)) * 1000
        mag = np.sqrt(power)
        kk = np.argmax(mag[:, 1:], axis=1) + 1
        for a in range(3):
            m, k0 = mag[a], kk[a]
            left = m[k0 - 1] if k0 > 1 else 0.0
            right = m[k0 + 1] if k0 + 1 < len(m) else 0.0
            alpha = max(left, right) / m[k0]
            d = min(max((2 * alpha - 1) / (alpha + 1), 0.0), 0.5)
            gain = np.pi * d * (1 - d * d) / np.sin(np.pi * d) if d > 0 else 1.0
            hz = (k0 + (d if right >= left else -d)) * self.df
            self.rows.append(
                (
                    device,
                    "xyz"[a],
                    tuple(bands[a]),
                    rms[a],
                    velocity[a],
                    peak[a],
                    peak[a] / rms[a],
                    m4[a] / ms[a] ** 2,
                    hz,
                    m[k0] * self.amp * gain,
                )
            )


def run_bare(messages: list[RawMessage], batch_size: int) -> tuple[float, list[tuple]]:
    """Feed the blocks in groups of ``batch_size`` messages, split by device.

    ``batch_size=1`` is one block at a time; the flow's source hands the
    operator batches of the same size, so the comparison at equal batch
    size gives NumPy the same chance to stack frames.
    """
    t0 = time.perf_counter()
    bare = BareSpectral()
    for start in range(0, len(messages), batch_size):
        group: dict[str, list[bytes]] = {}
        for msg in messages[start : start + batch_size]:
            group.setdefault(msg.device, []).append(msg.payload)
        for device, payloads in group.items():
            bare.feed(device, payloads)
    bare.finish()
    return time.perf_counter() - t0, bare.rows


# --- (b) Bytewax ----------------------------------------------------------------------


class _CountingPartition(StatelessSinkPartition[Features]):
    def __init__(self, sink: CountingSink) -> None:
        self.sink = sink

    def write_batch(self, items: list[Features]) -> None:
        self.sink.count += len(items)
        self.sink.rows.extend(items)


class CountingSink(DynamicSink[Features]):
    """Counts (and keeps, for the byte-reduction measurement) the feature rows."""

    def __init__(self) -> None:
        self.count = 0
        self.rows: list[Features] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CountingPartition:
        return _CountingPartition(self)


def run_flow(messages: list[RawMessage], batch_size: int) -> tuple[float, list[Features], int]:
    sink = CountingSink()
    errors: list = []
    flow = Dataflow("bench_spectral")
    s = op.input("in", flow, TestingSource(messages, batch_size=batch_size))
    decoded = op.map("decode", s, decode_vibration)
    keyed = op.key_on("device", decoded, lambda block: block.device)
    out = spectral("spectral", keyed, frames_per_row=FRAMES_PER_ROW, bands_hz=BANDS)
    op.output("features", op.key_rm("unkey", out.features), sink)
    op.inspect("errors", out.errors, lambda _s, item: errors.append(item))
    t0 = time.perf_counter()
    run_main(flow)
    elapsed = time.perf_counter() - t0
    return elapsed, sink.rows, len(errors)


# --- comparison and byte reduction ----------------------------------------------------


def check_same(bare: list[tuple], flow: list[Features]) -> None:
    key = lambda r: (r[0], r[1])  # noqa: E731
    by_device: dict[tuple[str, str], list[tuple]] = {}
    for row in bare:
        by_device.setdefault(key(row), []).append(row)
    mine: dict[tuple[str, str], list[Features]] = {}
    for f in flow:
        mine.setdefault((f.device, f.axis), []).append(f)
    assert by_device.keys() == mine.keys(), "different devices/axes"
    for k, rows in by_device.items():
        assert len(rows) == len(mine[k]), f"{k}: {len(rows)} bare rows, {len(mine[k])} flow rows"
        a = np.array([[*r[2], *r[3:]] for r in rows], dtype=float)
        b = np.array(
            [
                [
                    *f.band_energy,
                    f.rms,
                    f.velocity_rms_mm_s,
                    f.peak,
                    f.crest_factor,
                    f.kurtosis,
                    f.dominant_hz,
                    f.dominant_amplitude,
                ]
                for f in mine[k]
            ]
        )
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12, err_msg=str(k))


def run_vibration_flow(messages: list[RawMessage], batch_size: int) -> tuple[float, Meter]:
    """The standard vibration flow: spectral, alarms, Parquet sinks; from memory."""
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            {
                "data_dir": tmp,
                "vibration": {
                    "frames_per_row": FRAMES_PER_ROW,
                    "bands_hz": [list(b) for b in BANDS],
                },
            }
        )
        edge = Edge(
            config, name="vibration", source=TestingSource(messages, batch_size=batch_size)
        )
        vibration.build(edge)
        flow = edge.dataflow()
        t0 = time.perf_counter()
        run_main(flow)
        return time.perf_counter() - t0, edge.meter


def stream_ipc_bytes(rows: list[Features]) -> int:
    """Size of the rows in the ``vibration_features`` stream schema, Arrow IPC with zstd."""
    table = to_table(STREAMS["vibration_features"], rows)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().size


def arrow_bytes(rows: list[Features]) -> int:
    """Size of the rows as an Arrow IPC stream with zstd-compressed buffers."""
    columns = {
        "device": pa.array([f.device for f in rows]).dictionary_encode(),
        "axis": pa.array([f.axis for f in rows]).dictionary_encode(),
        "ts": pa.array([f.ts for f in rows], type=pa.timestamp("us", tz="UTC")),
        "window_s": pa.array([f.window_s for f in rows], type=pa.float64()),
        "sample_rate_hz": pa.array([f.sample_rate_hz for f in rows], type=pa.int32()),
        "frames": pa.array([f.frames for f in rows], type=pa.int32()),
        "band_energy": pa.array([list(f.band_energy) for f in rows], type=pa.list_(pa.float64())),
    }
    for name in (
        "rms",
        "velocity_rms_mm_s",
        "peak",
        "crest_factor",
        "kurtosis",
        "dominant_hz",
        "dominant_amplitude",
    ):
        columns[name] = pa.array([getattr(f, name) for f in rows], type=pa.float64())
    columns["iso_zone"] = pa.array([f.iso_zone for f in rows]).dictionary_encode()
    columns["transport"] = pa.array([f.transport for f in rows]).dictionary_encode()
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=600, help="EVB1 blocks in total")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each side; median")
    parser.add_argument("--batch-size", type=int, default=32, help="TestingSource batch size")
    args = parser.parse_args()

    t0 = time.perf_counter()
    messages = make_messages(args.blocks)
    raw = sum(len(m.payload) for m in messages)
    samples = len(messages) * FFT
    print(
        f"{len(messages)} EVB1 blocks ({FFT} frames x 3 axes float32, {FS} Hz) from "
        f"{len(MACHINES)} simulated machines: {raw / 1e6:.1f} MB, {samples / FS:.1f} s of "
        f"signal (generated in {time.perf_counter() - t0:.1f} s)"
    )

    warm = messages[: len(MACHINES) * 2]
    run_bare(warm, args.batch_size)
    run_flow(warm, args.batch_size)
    run_vibration_flow(warm, args.batch_size)
    bare_times, single_times, flow_times, full_times = [], [], [], []
    for _ in range(args.repeat):
        full_s, meter = run_vibration_flow(messages, args.batch_size)
        full_times.append(full_s)
        bare_s, bare_rows = run_bare(messages, args.batch_size)
        single_s, single_rows = run_bare(messages, 1)
        flow_s, flow_rows, errors = run_flow(messages, args.batch_size)
        bare_times.append(bare_s)
        single_times.append(single_s)
        flow_times.append(flow_s)
    assert errors == 0, f"{errors} dead letters"
    check_same(bare_rows, flow_rows)
    check_same(single_rows, flow_rows)

    def rate(times: list[float]) -> float:
        return samples / statistics.median(times)

    def line(label: str, times: list[float], note: str = "") -> str:
        median_ms = statistics.median(times) * 1000
        return (
            f"{label} {rate(times) / 1e6:8.2f} M samples/s per axis "
            f"(median of {args.repeat}: {median_ms:.0f} ms{note})"
        )

    print(f"feature rows: {len(flow_rows)} (bare {len(bare_rows)}), equal within 1e-9")
    print(line(f"(a) bare NumPy, {args.batch_size} blocks at a time:", bare_times))
    print(line("    bare NumPy, one block at a time:", single_times))
    print(line("(b) Bytewax decode + spectral:     ", flow_times, ", decode included"))
    print(line("(c) flows.vibration (+ alarms, Parquet):", full_times))
    ratio = rate(flow_times) / rate(bare_times)
    verdict = "OK" if ratio >= 0.5 else "BELOW TARGET"
    print(f"ratio (b)/(a): {ratio:.2f}  (target >= 0.5) {verdict}")
    full = rate(full_times) / rate(bare_times)
    print(f"ratio (c)/(a): {full:.2f}  (target >= 0.5) {'OK' if full >= 0.5 else 'BELOW TARGET'}")
    report_rows = report(meter).stages.get("vibration_features", 0)
    assert report_rows == len(flow_rows), (
        f"flow wrote {report_rows} rows, expected {len(flow_rows)}"
    )

    row_s = FRAMES_PER_ROW * FFT / FS
    for label, wire in (
        ("vibration_features schema", stream_ipc_bytes(flow_rows)),
        ("dictionary-encoded strings, int32", arrow_bytes(flow_rows)),
    ):
        reduction = raw / wire
        print(
            f"byte reduction ({label}): {raw:,} raw EVB1 bytes / {wire:,} Arrow IPC zstd "
            f"bytes ({len(flow_rows)} rows, one per {row_s:.2f} s per axis, "
            f"{wire / len(flow_rows):.0f} B/row) = {reduction:,.0f}:1  (target >= 1000:1) "
            f"{'OK' if reduction >= 1000 else 'BELOW TARGET'}"
        )


if __name__ == "__main__":
    main()
