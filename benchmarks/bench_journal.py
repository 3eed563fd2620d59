"""Ingest journal: committed messages/s through ``Journal`` versus bare SQLite, commit latency.

For each ``journal.sync`` mode (``full``, ``normal``), in temporary directories on
the same file system (``--dir``, default the system temp dir):

1. baseline: bare SQLite, one WAL file with the journal's table and digest index,
   the rows built beforehand, ``executemany`` of ``--max-batch`` rows and a
   commit per batch, one thread. This is what SQLite alone does on this disk.
2. journal: ``--producers`` threads each submit their share of ``--messages``
   ``RawMessage`` of ``--payload`` bytes (devices spread over the partitions)
   to one ``Journal``; a refused submission (queue bound) is retried after
   1 ms, as a device pushed back would retry. Timed from the first submit to
   the last message resolved. Latency is submit to resolved, per message. Two
   ways of being told: ``submit()`` with a future per message (HTTP, CoAP)
   and ``append()`` with one callback per group (MQTT).

Prints both rates, the ratio journal/baseline, p50/p99 of the per-message
latency and the journal's own group figures (``JournalStats``).

3. moderate load: one producer ``append()``s at ``--paced-rate`` msg/s for
   ``--paced-seconds``; p50/p99 of submit to durable commit, per message.

4. deletions beside busy device servers (``sync=full``, one partition as
   ``journal.partitions`` defaults to): the moderate load of 3 again, with a
   thread doing Python work half of the time beside the writer, as device
   servers at half load do (every statement of the writer gives the GIL up
   and may wait to take it back); (a) with no reader, so nothing is deleted,
   and (b) with a reader releasing everything committed every
   ``--release-every`` s, as the flow does at its snapshots, so the writer
   deletes as it commits. Prints p50/p99/max of submit to durable for both
   and the ratios (b)/(a).

5. sustained deletion (``sync=full``, one partition): a stream of
   ``--sustained-rate`` msg/s (``append()``) for ``--sustained-seconds``, with a
   reader releasing everything committed every 0.2 s. Prints the commit rate,
   the rate at which released rows were deleted (ratio deleted/committed: 1.0
   keeps up) and the most rows held meanwhile. A writer that deleted slower
   than the stream commits would fill the journal with processed rows until
   devices were pushed back.

6. GIL: a pure-Python spinner thread counts for ``--gil-seconds`` alone, then
   next to a thread committing one-row transactions with ``synchronous=FULL``
   (each commit is an fsync). If ``sqlite3`` held the GIL during the commit the
   spinner would stall for the share of time spent in commits; prints that
   share and the spinner's rate relative to alone.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connectors.devices.journal import (
    Committed,
    Journal,
    JournalFull,
    JournalReader,
    JournalSettings,
)
from connectors.devices.journal.format import _INSERT, _SCHEMA, digest_of, to_us
from operators.records import RawMessage

DEVICES = 64


def payload(i: int, size: int) -> bytes:
    head = f"{{\"seq\":{i},\"t\":21.5,\"rh\":40.1}}".encode()
    return (head + b" " * size)[:size]


def bare_sqlite(directory: Path, sync: str, messages: int, size: int, batch: int) -> float:
    db = sqlite3.connect(directory / "bare.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {sync.upper()}")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    now = to_us(datetime.now(UTC))
    rows = []
    for i in range(messages):
        device, body = f"dev-{i % DEVICES}", payload(i, size)
        rows.append((i, device, "telemetry", "mqtt", now, body, size,
                     digest_of(device, "telemetry", body)))
    started = time.perf_counter()
    for start in range(0, messages, batch):
        db.execute("BEGIN IMMEDIATE")
        db.executemany(_INSERT, rows[start:start + batch])
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return messages / elapsed


def through_journal(
    directory: Path, sync: str, args: argparse.Namespace, api: str
) -> dict[str, float]:
    journal = Journal(JournalSettings(
        root=directory / "journal", partitions=args.partitions, sync=sync,
        max_batch=args.max_batch, linger=timedelta(milliseconds=args.linger_ms),
    ))
    latencies: list[float] = []
    refusals = [0]
    done = threading.Event()
    remaining = [args.messages]
    lock = threading.Lock()

    def resolved(t0: float, _outcome: object = None) -> None:
        latencies.append(time.perf_counter() - t0)
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    def resolved_group(starts: list[float], outcomes: list[object]) -> None:
        now = time.perf_counter()
        pairs = zip(starts, outcomes, strict=True)
        committed = [now - t0 for t0, o in pairs if not isinstance(o, JournalFull)]
        latencies.extend(committed)
        with lock:
            remaining[0] -= len(committed)
            if remaining[0] == 0:
                done.set()

    def produce(k: int) -> None:
        now = datetime.now(UTC)
        for i in range(k, args.messages, args.producers):
            msg = RawMessage(f"dev-{i % DEVICES}", "telemetry", "mqtt", now,
                             payload(i, args.payload))
            for _attempt in range(10_000):
                t0 = time.perf_counter()
                if api == "callback":
                    if journal.append(msg, resolved_group, t0):
                        break
                    refusals[0] += 1
                    time.sleep(0.001)
                    continue
                future = journal.submit(msg)
                if future.done() and isinstance(future.exception(), JournalFull):
                    refusals[0] += 1
                    time.sleep(0.001)
                    continue
                future.add_done_callback(lambda _f, t0=t0: resolved(t0))
                break
            else:
                raise RuntimeError("journal refused one message 10,000 times")

    producers = [threading.Thread(target=produce, args=(k,)) for k in range(args.producers)]
    started = time.perf_counter()
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    if not done.wait(300):
        raise RuntimeError("journal did not commit every message in 300 s")
    elapsed = time.perf_counter() - started
    stats = journal.stats()
    journal.close()
    latencies.sort()
    return {
        "rate": args.messages / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "groups": stats.commits,
        "group_p50_ms": stats.commit_p50_ms,
        "group_p99_ms": stats.commit_p99_ms,
        "write_p50_ms": stats.write_p50_ms,
        "write_p99_ms": stats.write_p99_ms,
        "refusals": refusals[0],
    }


def paced(
    directory: Path,
    sync: str,
    args: argparse.Namespace,
    *,
    busy: bool = False,
    release_every: float | None = None,
) -> tuple[float, float, float, float]:
    """Per-message submit-to-durable p50/p99/max (ms) at ``--paced-rate`` msg/s, rate held.

    ``busy``: a Python thread spins beside the writer meanwhile. ``release_every``:
    a reader releases everything committed that often (seconds), so the writer deletes.
    """
    root = directory / "journal"
    journal = Journal(JournalSettings(
        root=root, partitions=args.partitions, sync=sync,
        max_batch=args.max_batch, linger=timedelta(milliseconds=args.linger_ms),
    ))
    latencies: list[float] = []
    stop = threading.Event()

    def resolved(starts: list[float], _outcomes: list[object]) -> None:
        now = time.perf_counter()
        latencies.extend(now - t0 for t0 in starts)

    def releaser() -> None:
        readers = [JournalReader(root, p) for p in range(args.partitions)]
        while not stop.wait(release_every):
            for reader in readers:
                reader.release("flow", reader.last_offset())
        for reader in readers:
            reader.close()

    helpers = []
    if busy:
        helpers.append(threading.Thread(target=lambda: spin_until(stop)))
    if release_every is not None:
        helpers.append(threading.Thread(target=releaser))
    for helper in helpers:
        helper.start()
    total = int(args.paced_rate * args.paced_seconds)
    now = datetime.now(UTC)
    started = time.perf_counter()
    for i in range(total):
        due = started + i / args.paced_rate
        while (ahead := due - time.perf_counter()) > 0:
            time.sleep(ahead)
        msg = RawMessage(f"dev-{i % DEVICES}", "telemetry", "mqtt", now, payload(i, args.payload))
        journal.append(msg, resolved, time.perf_counter())
    held = total / (time.perf_counter() - started)
    journal.close()
    stop.set()
    for helper in helpers:
        helper.join()
    latencies.sort()
    if len(latencies) != total:
        raise RuntimeError(f"paced: {len(latencies)}/{total} messages committed")
    p50, p99, worst = (latencies[i] * 1000 for i in (total // 2, int(total * 0.99), -1))
    return p50, p99, worst, held


def sustained(directory: Path, args: argparse.Namespace) -> tuple[float, float, int]:
    """Commit and delete rates (per second) of a paced stream with a releasing reader, most held."""
    root = directory / "journal"
    journal = Journal(JournalSettings(
        root=root, partitions=1, sync="full", max_batch=args.max_batch,
        linger=timedelta(milliseconds=args.linger_ms), device_share=1.0,
    ))
    committed = [0]
    stop = threading.Event()

    def done(_tokens: list[object], outcomes: list[object]) -> None:
        committed[0] += sum(1 for o in outcomes if isinstance(o, Committed))

    def releaser() -> None:
        with JournalReader(root, 0) as reader:
            while not stop.wait(0.2):
                reader.release("flow", reader.last_offset())

    releasing = threading.Thread(target=releaser)
    releasing.start()
    now = datetime.now(UTC)
    total = int(args.sustained_rate * args.sustained_seconds)
    most = 0
    started = time.perf_counter()
    for i in range(total):
        if i % 100 == 0:
            due = started + i / args.sustained_rate
            while (ahead := due - time.perf_counter()) > 0:
                time.sleep(ahead)
            if i % 10_000 == 0:
                most = max(most, journal.stats().messages)
        msg = RawMessage(f"dev-{i % DEVICES}", "telemetry", "mqtt", now, payload(i, args.payload))
        while not journal.append(msg, done):
            time.sleep(0.001)  # queue bound: retried, as a pushed-back device would
    while committed[0] < total:
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    held = journal.stats().messages
    stop.set()
    releasing.join()
    journal.close()
    return total / elapsed, (total - held) / elapsed, max(most, held)


def spin_until(stop: threading.Event, busy_s: float = 0.0005) -> None:
    """Device servers at half load until ``stop``: Python work for ``busy_s``, then as long idle.

    While it works the GIL is given up only on demand (every switch interval).
    """
    while not stop.is_set():
        deadline = time.perf_counter() + busy_s
        while time.perf_counter() < deadline:
            for _ in range(100):
                pass
        time.sleep(busy_s)


def spin(seconds: float, counter: list[int] | None = None) -> int:
    box = [0] if counter is None else counter
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            box[0] += 1
    return box[0]


def gil_check(directory: Path, seconds: float) -> tuple[float, float, float]:
    """Spinner progress while a COMMIT runs (relative to alone), commit share, commits/s.

    The committer reads the spinner's counter before and after each COMMIT: if
    ``sqlite3`` kept the GIL through the fsync the spinner could not count meanwhile.
    """
    alone = spin(seconds) / seconds
    db = sqlite3.connect(directory / "gil.sqlite", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE t (x BLOB)")
    stop = threading.Event()
    counter = [0]
    in_commit = [0.0, 0, 0]  # seconds in COMMIT, commits, spinner counts during COMMIT

    def committer() -> None:
        for _ in range(1_000_000):
            if stop.is_set():
                return
            db.execute("BEGIN")
            db.execute("INSERT INTO t VALUES (?)", (b"x" * 100,))
            c0, t0 = counter[0], time.perf_counter()
            db.execute("COMMIT")
            in_commit[0] += time.perf_counter() - t0
            in_commit[1] += 1
            in_commit[2] += counter[0] - c0

    thread = threading.Thread(target=committer)
    started = time.perf_counter()
    thread.start()
    spin(seconds, counter)
    stop.set()
    thread.join()
    wall = time.perf_counter() - started
    db.close()
    during = in_commit[2] / in_commit[0] if in_commit[0] else 0.0
    return during / alone, in_commit[0] / wall, in_commit[1] / wall


def report(sync: str, api: str, bare: float, result: dict[str, float], messages: int) -> None:
    print(f"sync={sync:6} bare executemany {bare:10,.0f} msg/s | journal {api:8} "
          f"{result['rate']:10,.0f} msg/s | ratio {result['rate'] / bare:5.2f}")
    print(f"             latency submit->durable p50 {result['p50_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms; {result['groups']:.0f} groups "
          f"({messages / result['groups']:.0f} msg/group), oldest-in-group wait "
          f"p50 {result['group_p50_ms']:.1f} / p99 {result['group_p99_ms']:.1f} ms, "
          f"write+sync p50 {result['write_p50_ms']:.1f} / p99 "
          f"{result['write_p99_ms']:.1f} ms; queue-full retries {result['refusals']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=2000)
    parser.add_argument("--linger-ms", type=float, default=2.0)
    parser.add_argument("--gil-seconds", type=float, default=2.0)
    parser.add_argument("--paced-rate", type=float, default=5000.0)
    parser.add_argument("--paced-seconds", type=float, default=3.0)
    parser.add_argument(
        "--release-every", type=float, default=1.0, help="seconds between releases in 4 (b)"
    )
    parser.add_argument("--sustained-rate", type=float, default=40_000.0)
    parser.add_argument("--sustained-seconds", type=float, default=10.0)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    print(f"{args.messages} messages of {args.payload} B, {args.producers} producers, "
          f"{args.partitions} partitions, max_batch {args.max_batch}, linger {args.linger_ms} ms")
    for sync in ("full", "normal"):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            bare = bare_sqlite(Path(tmp), sync, args.messages, args.payload, args.max_batch)
        for api in ("future", "callback"):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                result = through_journal(Path(tmp), sync, args, api)
            report(sync, api, bare, result, args.messages)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            p50, p99, _, held = paced(Path(tmp), sync, args)
        print(f"sync={sync:6} at {held:,.0f} msg/s (append): submit->durable p50 {p50:.1f} ms, "
              f"p99 {p99:.1f} ms")
    figures = []
    one = argparse.Namespace(**{**vars(args), "partitions": 1})
    for release_every in (None, args.release_every):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            figures.append(paced(Path(tmp), "full", one, busy=True, release_every=release_every))
    labels = ("(a) nothing deleted", "(b) deleting")
    for label, (p50, p99, worst, held) in zip(labels, figures, strict=True):
        print(f"beside a half-busy thread, {label:20} at {held:,.0f} msg/s: submit->durable "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms")
    (_, a99, amax, _), (_, b99, bmax, _) = figures
    print(f"deleting / nothing deleted: p99 {b99 / a99:.2f}x, max {bmax / amax:.2f}x")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        commits, deletes, most = sustained(Path(tmp), args)
    print(f"sustained, one partition: commits {commits:,.0f} msg/s, released rows deleted "
          f"{deletes:,.0f}/s (deleted/committed {deletes / commits:.2f}), at most {most:,} "
          "rows held")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        relative, share, rate = gil_check(Path(tmp), args.gil_seconds)
    print(f"GIL: {rate:,.0f} fsync commits/s, {share:.0%} of the wall time inside COMMIT; a "
          f"Python thread counted at {relative:.0%} of its rate alone while a COMMIT ran "
          f"(about 0% if the GIL were held: {'released' if relative > 0.5 else 'HELD'})")

if __name__ == "__main__":
    main()
