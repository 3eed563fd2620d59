"""Cloud uplink: batched Arrow streaming versus one Push per record, backlog drain, wire bytes.

Every measurement talks to the reference receiver (``CloudReceiver``, gRPC on
127.0.0.1, a fresh DuckDB file in a temporary directory) and uses generated
``telemetry_summary`` rows (``operators.windows.Summary``; default 100 devices
x 5 keys x 100 one-minute windows = 50,000 rows).

1. Records/s into the receiver.
   (a) baseline: one ``Push`` call per record, each carrying a one-row
       ``Batch`` (a fresh stream per record on one kept-alive channel: the
       closest this service has to a unary call per record), waiting for its
       ``Ack`` before the next. Timed on a subset (``--baseline-records``).
   (b) edgesieve: the rows sealed into batches of ``--batch-rows`` (Arrow IPC,
       zstd), put in an ``Outbox`` and sent by a connected ``UplinkSender``;
       timed from the first ``put`` to ``flush()``.
   Sealing is done before either timer starts (its cost is printed). Prints
   both rates and the ratio (b)/(a), and checks that the receiver stored every
   row exactly once (its stream table and ``uplink_batches``).
2. Backlog drain. With the receiver down and the sender running (in backoff),
   the outbox fills with ``--backlog-minutes`` of batches at a live rate of
   ``--live-batch-rows`` rows per second (one batch per second; ``created_at``
   spread one second apart, nothing waits). Then the receiver starts and the
   drain is timed until the outbox is empty. Prints the drain rate in rows/s
   and as a multiple of the live rate.
3. Wire bytes per row for the rows of 1: Arrow IPC zstd (``arrow_ipc`` and
   the whole serialized ``Batch``) versus JSON (one ``json.dumps`` per row,
   the JSON of the whole list, and that JSON gzip- and zstd-compressed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import grpc
import pyarrow as pa

from connectors.cloud import CloudReceiver, ReceiverLimits
from connectors.streams import STREAMS, to_table
from connectors.uplink.batch import Sealed
from connectors.uplink.outbox import Outbox, OutboxSettings
from connectors.uplink.seal import seal
from connectors.uplink.sender import UplinkSender
from connectors.uplink.settings import UplinkSettings
from connectors.uplink.wire import KEY_HEADER, PRIORITIES, PUSH_METHOD, SECRET_HEADER
from operators.windows import Summary
from protos import uplink_pb2

STREAM = "telemetry_summary"
SPEC = STREAMS[STREAM]
PRIORITY = PRIORITIES[STREAM]
EDGE = "bench-edge-01"
SECRET = "bench-secret-0123456789abcdef"
EDGES = {EDGE: SECRET}
METADATA = ((KEY_HEADER, EDGE), (SECRET_HEADER, SECRET))
KEYS = ("temperature", "humidity", "pressure", "voltage", "current")
BASES = {
    "temperature": 21.5,
    "humidity": 45.0,
    "pressure": 1013.2,
    "voltage": 230.0,
    "current": 4.2,
}
T0 = datetime(2025, 3, 1, tzinfo=UTC)
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 0.5


# --- data ----------------------------------------------------------------------------------


def summaries(
    devices: int,
    keys: int,
    windows: int,
    window_s: int,
    readings: int,
    start: datetime,
    seed: int,
) -> Iterator[list[Summary]]:
    """One list of ``devices * keys`` rows per window, in time order.

    Readings are quantised to 0.01 (so min/max/first/last are short decimals),
    ``mean`` and ``std`` are full-precision floats, ``count`` is ``readings``
    per window with one missing now and then.
    """
    rng = random.Random(seed)
    names = [KEYS[i % len(KEYS)] + ("" if i < len(KEYS) else f"_{i}") for i in range(keys)]
    series = [(f"dev-{d:04d}", name) for d in range(devices) for name in names]
    level = {s: BASES.get(s[1], 10.0) * rng.uniform(0.9, 1.1) for s in series}
    width = timedelta(seconds=window_s)
    for w in range(windows):
        ws = start + w * width
        we = ws + width
        rows = []
        for s in series:
            base = level[s] = level[s] + rng.gauss(0.0, 0.002 * abs(level[s]) + 0.01)
            std = abs(rng.gauss(0.005 * abs(base) + 0.02, 0.01))
            mean = base + rng.gauss(0.0, std / 4)
            low = round(mean - rng.uniform(1.0, 2.5) * std, 2)
            high = round(mean + rng.uniform(1.0, 2.5) * std, 2)
            rows.append(
                Summary(
                    device=s[0],
                    key=s[1],
                    window_start=ws,
                    window_end=we,
                    count=readings - (rng.random() < 0.05),
                    mean=mean,
                    min=low,
                    max=high,
                    std=std,
                    first=round(rng.uniform(low, high), 2),
                    last=round(rng.uniform(low, high), 2),
                )
            )
        yield rows


def seal_rows(rows: list[Summary], created_at: datetime | None = None) -> Sealed:
    return seal(EDGE, STREAM, to_table(SPEC, rows), priority=PRIORITY, created_at=created_at)


def chunks(rows: list[Summary], size: int) -> Iterator[list[Summary]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


# --- receiver and sender helpers -----------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    rows: int
    distinct: int
    orphans: int
    batches: int
    batch_rows: int
    count_sum: int

    def check(self, where: str, rows: int, batches: int, count_sum: int) -> str:
        problems = []
        if self.rows != rows:
            problems.append(f"{self.rows} rows stored, expected {rows}")
        if self.distinct != rows:
            problems.append(
                f"{self.distinct} distinct (device, key, window_start), expected {rows}"
            )
        if self.orphans:
            problems.append(f"{self.orphans} rows without an uplink_batches row")
        if self.batches != batches:
            problems.append(f"{self.batches} uplink_batches rows, expected {batches}")
        if self.batch_rows != rows:
            problems.append(f"uplink_batches.rows sums to {self.batch_rows}, expected {rows}")
        if self.count_sum != count_sum:
            problems.append(f"sum(count) is {self.count_sum}, expected {count_sum}")
        if problems:
            raise RuntimeError(f"{where}: receiver check failed: {'; '.join(problems)}")
        return (
            f"receiver check ({where}): {self.rows:,} rows in {STREAM}, each once; "
            f"{self.batches:,} uplink_batches rows summing to {self.batch_rows:,} rows: OK"
        )


def stored(db: Path) -> Stored:
    """Count what the (stopped) receiver stored."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows, distinct, count_sum = con.execute(
            f"SELECT count(*), count(DISTINCT (device, key, window_start)), "
            f"coalesce(sum(count), 0) FROM {STREAM}"
        ).fetchone()
        orphans = con.execute(
            f"SELECT count(*) FROM {STREAM} t ANTI JOIN uplink_batches b USING (batch_id)"
        ).fetchone()[0]
        batches, batch_rows = con.execute(
            "SELECT count(*), coalesce(sum(rows), 0) FROM uplink_batches"
        ).fetchone()
    finally:
        con.close()
    return Stored(rows, distinct, orphans, batches, int(batch_rows), int(count_sum))


def sender_settings(port: int) -> UplinkSettings:
    return UplinkSettings(
        target=f"127.0.0.1:{port}",
        key=EDGE,
        secret=SECRET,
        backoff_min_s=BACKOFF_MIN_S,
        backoff_max_s=BACKOFF_MAX_S,
        ack_timeout_s=30.0,
    )


def wait_connected(sender: UplinkSender, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sender.state != "connected":
        if time.monotonic() > deadline:
            raise RuntimeError(f"sender not connected after {timeout}s: {sender.stats}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


UNPACED = ReceiverLimits(edge_batches_per_s=10**9, edge_bytes_per_s=10**15)
"""The receiver's per-edge pacing off: both sides run as fast as the receiver stores."""


# --- 1. records/s --------------------------------------------------------------------------


def run_per_record(db: Path, singles: list[Sealed], timeout: float) -> float:
    """(a) One Push call per record on one channel; seconds for all of them."""
    receiver = CloudReceiver("127.0.0.1:0", db, EDGES, limits=UNPACED).start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{receiver.port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            push = channel.stream_stream(
                PUSH_METHOD,
                request_serializer=None,
                response_deserializer=uplink_pb2.Ack.FromString,
            )
            deadline = time.monotonic() + timeout
            t0 = time.perf_counter()
            for sealed in singles:
                acks = list(push(iter([sealed.payload]), metadata=METADATA, timeout=10))
                if len(acks) != 1 or acks[0].status != uplink_pb2.Ack.STORED:
                    raise RuntimeError(f"per-record Push of {sealed.batch_id}: got {acks}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"per-record baseline exceeded {timeout}s")
            elapsed = time.perf_counter() - t0
        finally:
            channel.close()
    finally:
        receiver.stop()
    return elapsed


def run_batched(tmp: Path, db: Path, batches: list[Sealed], timeout: float) -> float:
    """(b) Outbox + UplinkSender, connected beforehand; seconds from first put to flush."""
    receiver = CloudReceiver("127.0.0.1:0", db, EDGES, limits=UNPACED).start()
    try:
        with Outbox(tmp / "outbox-batched.sqlite") as outbox:
            sender = UplinkSender(outbox, sender_settings(receiver.port))
            sender.start()
            try:
                wait_connected(sender, 10)
                t0 = time.perf_counter()
                for sealed in batches:
                    if not outbox.put(sealed):
                        raise RuntimeError(f"outbox refused batch {sealed.batch_id}")
                if not sender.flush(timeout):
                    raise RuntimeError(f"outbox not drained in {timeout}s: {sender.stats}")
                elapsed = time.perf_counter() - t0
                stats = sender.stats
            finally:
                sender.stop()
    finally:
        receiver.stop()
    if stats.sent != len(batches) or stats.duplicates or stats.rejected:
        raise RuntimeError(f"sender sent {stats.sent}/{len(batches)} batches: {stats}")
    return elapsed


# --- 2. backlog drain ----------------------------------------------------------------------


class _Unreachable(logging.Filter):
    """Count, and keep off the console, the sender's "receiver unreachable" warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "UNAVAILABLE" in record.getMessage():
            self.hidden += 1
            return False
        return True


def run_backlog(tmp: Path, args: argparse.Namespace) -> None:
    batches_n = args.backlog_minutes * 60 * args.live_batches_per_s
    per_batch = args.live_batch_rows
    live_rate = per_batch * args.live_batches_per_s
    devices = max(1, per_batch // args.keys)
    if devices * args.keys != per_batch:
        raise SystemExit(f"--live-batch-rows must be a multiple of --keys ({args.keys})")
    interval = timedelta(seconds=1 / args.live_batches_per_s)
    window_s = max(1, round(1 / args.live_batches_per_s))

    t0 = time.perf_counter()
    start = datetime.now(UTC) - batches_n * interval
    backlog: list[Sealed] = []
    count_sum = 0
    for i, rows in enumerate(summaries(devices, args.keys, batches_n, window_s, 10, start, seed=2)):
        count_sum += sum(r.count for r in rows)
        backlog.append(seal_rows(rows, created_at=start + (i + 1) * interval))
    seal_s = time.perf_counter() - t0
    rows_n = batches_n * per_batch
    size = sum(len(s.payload) for s in backlog)
    print(
        f"backlog: {args.backlog_minutes} min at {args.live_batches_per_s} batch/s x "
        f"{per_batch:,} rows ({devices} devices x {args.keys} keys, {window_s} s windows) = "
        f"{live_rate:,} rows/s "
        f"live -> {batches_n:,} batches, {rows_n:,} rows, {size / 1e6:.1f} MB serialized "
        f"(generated and sealed in {seal_s:.1f} s)"
    )

    port = free_port()
    db = tmp / "cloud-backlog.duckdb"
    quiet = _Unreachable()
    uplink_log = logging.getLogger("edgesieve.uplink")
    uplink_log.addFilter(quiet)
    first_commit: list[float] = []

    def on_commit(batch_id: str) -> None:
        if not first_commit:
            first_commit.append(time.perf_counter())

    with Outbox(
        tmp / "outbox-backlog.sqlite", OutboxSettings(max_bytes=max(size * 2, 1 << 20))
    ) as outbox:
        sender = UplinkSender(outbox, sender_settings(port))
        sender.start()
        receiver = None
        try:
            t0 = time.perf_counter()
            for sealed in backlog:
                if not outbox.put(sealed):
                    raise RuntimeError(f"outbox refused batch {sealed.batch_id}")
            fill_s = time.perf_counter() - t0
            deadline = time.monotonic() + 10
            while not quiet.hidden or sender.state != "backoff":
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sender never failed with the receiver down: {sender.stats}"
                    )
                time.sleep(0.01)
            waiting = outbox.stats()
            down = sender.stats
            if waiting.batches != batches_n or down.acked:
                raise RuntimeError(f"outbox holds {waiting.batches}/{batches_n}: {down}")
            print(
                f"receiver down: outbox filled with {waiting.batches:,} batches "
                f"({waiting.bytes / 1e6:.1f} MB, oldest {waiting.oldest_age_s or 0:.0f} s old) "
                f"in {fill_s:.1f} s; sender state {down.state!r}, "
                f"{quiet.hidden} failed attempt(s) so far (warnings hidden)"
            )

            t0 = time.perf_counter()
            receiver = CloudReceiver(
                f"127.0.0.1:{port}", db, EDGES, on_commit=on_commit, limits=UNPACED
            )
            receiver.start()
            failed_down = quiet.hidden
            if not sender.flush(args.timeout):
                raise RuntimeError(f"backlog not drained in {args.timeout}s: {sender.stats}")
            drain_s = time.perf_counter() - t0
            stats = sender.stats
        finally:
            uplink_log.removeFilter(quiet)
            sender.stop()
            if receiver is not None:
                receiver.stop()
    print(stored(db).check("backlog", rows_n, batches_n, count_sum))
    if stats.duplicates or stats.rejected:
        raise RuntimeError(f"backlog drain: unexpected duplicates/rejections: {stats}")

    reconnect_s = (first_commit[0] - t0) if first_commit else 0.0
    rate = rows_n / drain_s
    streaming = rows_n / max(1e-9, drain_s - reconnect_s)
    print(
        f"drain: {drain_s:.2f} s from receiver start to empty outbox "
        f"(first batch stored after {reconnect_s:.2f} s; backoff_max_s={BACKOFF_MAX_S}; "
        f"{quiet.hidden - failed_down} attempt(s) failed UNAVAILABLE after the receiver started)"
    )
    print(
        f"drain rate: {rate:>12,.0f} rows/s = {rate / live_rate:,.0f}x the live rate "
        f"({live_rate:,} rows/s)   (no target set; > 1x is needed to ever catch up)"
    )
    print(
        f"            {streaming:>12,.0f} rows/s = {streaming / live_rate:,.0f}x from the first "
        "stored batch on"
    )
    if rate > live_rate:
        catch_up = rows_n / (rate - live_rate)
        print(
            f"an outage of {args.backlog_minutes} min is caught up {catch_up:.1f} s after the "
            f"cloud returns, with production continuing ({stats.sent} batches sent, "
            f"{stats.reconnects} reconnects)"
        )


# --- 3. wire bytes -------------------------------------------------------------------------


def row_json(row: Summary) -> dict[str, object]:
    return {
        "device": row.device,
        "key": row.key,
        "window_start": row.window_start.isoformat(),
        "window_end": row.window_end.isoformat(),
        "count": row.count,
        "mean": row.mean,
        "min": row.min,
        "max": row.max,
        "std": row.std,
        "first": row.first,
        "last": row.last,
    }


def wire_bytes(
    rows: list[Summary], batches: list[Sealed], singles: list[Sealed], batch_rows: int
) -> None:
    n = len(rows)
    arrow = sum(len(uplink_pb2.Batch.FromString(s.payload).arrow_ipc) for s in batches)
    message = sum(len(s.payload) for s in batches)
    single = sum(len(s.payload) for s in singles) / len(singles)
    dicts = [row_json(r) for r in rows]
    lines = sum(len(json.dumps(d).encode()) for d in dicts)
    whole = json.dumps(dicts).encode()
    gz_whole = len(gzip.compress(whole, compresslevel=6))
    gz_batches = sum(
        len(gzip.compress(json.dumps(part).encode(), compresslevel=6))
        for part in chunks(dicts, batch_rows)  # type: ignore[arg-type]
    )
    zstd = pa.Codec("zstd")
    zs_batches = sum(
        len(zstd.compress(json.dumps(part).encode(), asbytes=True))
        for part in chunks(dicts, batch_rows)  # type: ignore[arg-type]
    )

    print(f"{n:,} rows, {STREAM} ({len(SPEC.schema)} columns), {len(batches)} batches:")
    table = [
        ("Arrow IPC zstd (Batch.arrow_ipc)", arrow),
        ("serialized Batch (wire)", message),
        ("JSON, one json.dumps per row", lines),
        ("JSON of the whole list", len(whole)),
        ("JSON of the whole list, gzip -6", gz_whole),
        (f"JSON per {batch_rows:,}-row batch, gzip -6", gz_batches),
        (f"JSON per {batch_rows:,}-row batch, zstd", zs_batches),
    ]
    for label, total in table:
        per_row = total / n
        print(
            f"  {label:<42} {per_row:>8.1f} bytes/row   "
            f"x{per_row / (message / n):>6.2f} of the Batch"
        )
    print(f"  {'one-row Batch, as in (a)':<42} {single:>8.1f} bytes/row")
    for label, total in (
        ("JSON per row / Batch", lines),
        ("JSON list / Batch", len(whole)),
        ("JSON list gzip / Batch", gz_whole),
    ):
        print(f"ratio {label}: {total / message:.2f}   (no target set)")


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--keys", type=int, default=5)
    parser.add_argument("--windows", type=int, default=100, help="one-minute windows per series")
    parser.add_argument("--batch-rows", type=int, default=5_000)
    parser.add_argument("--baseline-records", type=int, default=2_000)
    parser.add_argument("--backlog-minutes", type=int, default=10)
    parser.add_argument("--live-batch-rows", type=int, default=1_000)
    parser.add_argument("--live-batches-per-s", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    rows = [
        r for part in summaries(args.devices, args.keys, args.windows, 60, 60, T0, 1) for r in part
    ]
    n = len(rows)
    count_sum = sum(r.count for r in rows)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = [seal_rows(part) for part in chunks(rows, args.batch_rows)]
    seal_s = time.perf_counter() - t0
    subset = rows[: min(n, args.baseline_records)]
    t0 = time.perf_counter()
    singles = [seal_rows([r]) for r in subset]
    single_seal_s = time.perf_counter() - t0
    print(
        f"data: {n:,} {STREAM} rows ({args.devices} devices x {args.keys} keys x "
        f"{args.windows} windows, generated in {gen_s:.2f} s)"
    )
    print(
        f"sealing (not timed below): {len(batches)} batches of <= {args.batch_rows:,} rows in "
        f"{seal_s:.2f} s; {len(singles):,} one-row batches in {single_seal_s:.2f} s"
    )

    print("\n== 1. records/s into the receiver")
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp_name:
        tmp = Path(tmp_name)
        db_a = tmp / "cloud-per-record.duckdb"
        per_record_s = run_per_record(db_a, singles, args.timeout)
        print(
            stored(db_a).check("per record", len(subset), len(subset), sum(r.count for r in subset))
        )
        db_b = tmp / "cloud-batched.duckdb"
        batched_s = run_batched(tmp, db_b, batches, args.timeout)
        print(stored(db_b).check("batched", n, len(batches), count_sum))

        rate_a = len(subset) / per_record_s
        rate_b = n / batched_s
        print(
            f"(a) one Push call per record (1-row Batch):  {rate_a:>10,.0f} records/s  "
            f"({len(subset):,} records in {per_record_s:.2f} s, "
            f"{per_record_s / len(subset) * 1e3:.2f} ms/record)"
        )
        print(
            f"(b) edgesieve Outbox + UplinkSender:         {rate_b:>10,.0f} records/s  "
            f"({n:,} records in {len(batches)} batches, {batched_s:.2f} s put -> flush)"
        )
        with_seal = n / (batched_s + seal_s)
        print(f"    (b) including sealing:                   {with_seal:>10,.0f} records/s")
        ratio = rate_b / rate_a
        verdict = "OK" if ratio >= 10 else "BELOW TARGET"
        print(f"ratio (b)/(a): {ratio:.1f}x   (target >= 10x)  {verdict}")

        print("\n== 2. backlog drain versus live production")
        run_backlog(tmp, args)

    print("\n== 3. wire bytes per row")
    wire_bytes(rows, batches, singles, args.batch_rows)


if __name__ == "__main__":
    main()
