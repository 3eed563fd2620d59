"""The journal as a Bytewax input: exactly once, in order, resumable, draining, releasing."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, cluster_main, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.devices.journal import Journal, JournalReader, JournalSettings
from connectors.devices.journal_source import GATHER, JournalSource, journal_depth
from operators.records import RawMessage

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def message(device: str, seq: int, size: int = 8) -> RawMessage:
    payload = f"{seq:08d}".encode().ljust(size, b".")
    return RawMessage(device, "telemetry", "mqtt", T0, payload)


def write(root: Path, messages: list[RawMessage], *, partitions: int = 4, **kw: object) -> None:
    with Journal(JournalSettings(root, partitions=partitions, linger=timedelta(0), **kw)) as j:
        for future in [j.submit(m) for m in messages]:
            future.result(timeout=30)


def traffic(devices: int, per_device: int) -> list[RawMessage]:
    return [message(f"d{d}", i) for i in range(per_device) for d in range(devices)]


def run(source: JournalSource, runner: str = "run_main", **kw: object) -> list[RawMessage]:
    out: list[RawMessage] = []
    flow = Dataflow("journal")
    op.output("out", op.input("in", flow, source), TestingSink(out))
    if runner == "run_main":
        run_main(flow, **kw)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=int(runner[-1]), **kw)
    return out


def per_device(messages: list[RawMessage]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        seen[m.device].append(int(m.payload[:8]))
    return dict(seen)


def drained_source(root: Path, **kw: object) -> JournalSource:
    source = JournalSource(root, reader="flow", partitions=4, **kw)  # type: ignore[arg-type]
    source.drain.set()
    return source


@pytest.mark.parametrize("runner", ["run_main", "cluster_main-1", "cluster_main-2"])
def test_every_message_once_in_device_order(tmp_path, runner):
    sent = traffic(devices=9, per_device=40)
    write(tmp_path, sent)
    got = run(drained_source(tmp_path, max_batch=7), runner)
    assert len(got) == len(sent)
    assert per_device(got) == {f"d{d}": list(range(40)) for d in range(9)}


def test_resume_state_is_the_last_emitted_offset(tmp_path):
    write(tmp_path, traffic(devices=1, per_device=10), partitions=1)
    source = drained_source(tmp_path)
    part = source.build_part("in", "journal-0", 4)
    got = part.next_batch()
    assert [int(m.payload[:8]) for m in got] == [5, 6, 7, 8, 9]
    assert part.snapshot() == 9
    with pytest.raises(StopIteration):
        part.next_batch()
    part.close()


def test_without_state_it_starts_after_what_the_reader_released(tmp_path):
    write(tmp_path, traffic(devices=1, per_device=10), partitions=1)
    with JournalReader(tmp_path, 0) as reader:
        reader.release("flow", 6)
        reader.release("other", 2)
    got = run(drained_source(tmp_path))
    assert [int(m.payload[:8]) for m in got] == [7, 8, 9]


def test_next_batch_never_blocks_and_ends_only_when_drained(tmp_path):
    write(tmp_path, [], partitions=2)
    source = JournalSource(tmp_path, reader="flow", partitions=2, idle=timedelta(milliseconds=3))
    part = source.build_part("in", "journal-1", None)
    started = time.monotonic()
    assert part.next_batch() == []
    assert time.monotonic() - started < 0.5
    awake = part.next_awake()
    assert awake is not None and timedelta(0) < awake - datetime.now(UTC) <= timedelta(seconds=1)
    source.drain.set()
    with pytest.raises(StopIteration):
        part.next_batch()
    part.close()


def test_a_full_batch_reads_again_at_once_a_partial_one_gathers_first(tmp_path):
    write(tmp_path, traffic(devices=1, per_device=10), partitions=1)
    source = JournalSource(tmp_path, reader="flow", partitions=1, max_batch=4)
    part = source.build_part("in", "journal-0", None)
    assert len(part.next_batch()) == 4
    assert part.next_awake() is None  # more may wait: read again at once
    assert len(part.next_batch()) == 4
    assert part.next_awake() is None
    before = datetime.now(UTC)
    assert len(part.next_batch()) == 2  # everything committed was read
    awake = part.next_awake()
    assert awake is not None
    assert GATHER <= awake - before < GATHER + timedelta(milliseconds=500)
    part.close()


def test_a_flow_drains_what_is_committed_while_it_runs_then_ends_on_the_signal(tmp_path):
    root = tmp_path / "journal"
    source = JournalSource(root, reader="flow", partitions=3)  # starts before the journal exists
    done: list[RawMessage] = []

    def flow() -> None:
        done.extend(run(source, "cluster_main-2"))

    runner = threading.Thread(target=flow)
    runner.start()
    sent = traffic(devices=5, per_device=50)
    with Journal(JournalSettings(root, partitions=3, linger=timedelta(0))) as journal:
        for i, m in enumerate(sent):
            journal.submit(m).result(timeout=30)
            if i % 50 == 0:
                time.sleep(0.01)
    time.sleep(0.2)
    assert runner.is_alive()  # the input does not end while ingest may still commit
    source.drain.set()  # ingest stopped: everything committed is read, then the input ends
    runner.join(30)
    assert not runner.is_alive()
    assert per_device(done) == {f"d{d}": list(range(50)) for d in range(5)}
    assert source.lag == 0


def test_release_lets_the_writer_free_space(tmp_path):
    settings = JournalSettings(
        tmp_path, partitions=2, max_bytes=4000, linger=timedelta(0), device_share=1.0
    )  # the global bound: 3 devices fill it
    with Journal(settings) as journal:
        for i in range(40):
            journal.submit(message(f"d{i % 3}", i, size=100)).result(timeout=30)
        assert journal.admit() is not None and "journal full" in journal.admit()  # type: ignore[operator]
        assert journal_depth(tmp_path) == (40, 4000)
        source = drained_source(tmp_path)
        # short epochs: each snapshot releases what the epoch before emitted
        got = run(source, epoch_interval=timedelta(milliseconds=1))
        assert len(got) == 40
        source.release_emitted()  # the run ended normally: the last epoch is through too
        assert all(p.released == p.read for p in source.progress().values())
        deadline = time.monotonic() + 10
        # the writer truncates one partition after the other: room comes back with the first
        while journal.stats().messages and time.monotonic() < deadline:
            time.sleep(0.02)
        assert journal.admit() is None
        assert journal.stats().messages == 0
    assert journal_depth(tmp_path) == (0, 0)


def test_snapshot_releases_only_what_an_earlier_epoch_emitted(tmp_path):
    write(tmp_path, traffic(devices=1, per_device=6), partitions=1)
    source = JournalSource(tmp_path, reader="flow", partitions=1, max_batch=2)
    part = source.build_part("in", "journal-0", None)
    with JournalReader(tmp_path, 0) as reader:
        part.next_batch()  # offsets 0, 1 in the first epoch
        assert part.snapshot() == 1 and reader.released("flow") == -1
        part.next_batch()  # 2, 3
        assert part.snapshot() == 3 and reader.released("flow") == 1
        assert part.snapshot() == 3 and reader.released("flow") == 3
    assert source.progress()[0].released == 3
    part.close()


def test_unknown_partition_names_are_refused(tmp_path):
    source = JournalSource(tmp_path, reader="flow", partitions=2)
    assert source.list_parts() == ["journal-0", "journal-1"]
    with pytest.raises(ValueError, match=r"got unknown partition 'p-1'; hint: partitions are"):
        source.build_part("in", "p-1", None)


def test_an_existing_journal_names_its_own_partitions(tmp_path):
    write(tmp_path, [], partitions=3)
    assert JournalSource(tmp_path, reader="flow", partitions=8).list_parts() == [
        "journal-0",
        "journal-1",
        "journal-2",
    ]


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    partitions=st.integers(1, 5),
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    max_batch=st.integers(1, 50),
    released=st.integers(-1, 20),
    workers=st.sampled_from(["run_main", "cluster_main-2"]),
)
def test_property_exactly_once_in_order_after_the_release(
    tmp_path_factory, partitions, counts, max_batch, released, workers
):
    root = tmp_path_factory.mktemp("journal")
    sent = [message(f"dev-{d}", i) for d, n in enumerate(counts) for i in range(n)]
    write(root, sent, partitions=partitions)
    skipped: set[tuple[str, int]] = set()
    for p in range(partitions):
        with JournalReader(root, p) as reader:
            upto = min(released, reader.last_offset())
            if upto >= 0:
                reader.release("flow", upto)
            skipped |= {(m.device, int(m.payload[:8])) for _, m in reader.read(-1, upto + 1)}
    source = JournalSource(root, reader="flow", partitions=partitions, max_batch=max_batch)
    source.drain.set()
    got = run(source, workers)
    expected = [m for m in sent if (m.device, int(m.payload[:8])) not in skipped]
    assert sorted((m.device, m.payload) for m in got) == sorted(
        (m.device, m.payload) for m in expected
    )
    for device, seqs in per_device(got).items():
        assert seqs == sorted(seqs), device


def test_depth_and_lag_are_gauges(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from flows.accounting import JournalCollector

    write(tmp_path, traffic(devices=2, per_device=5), partitions=1)
    source = JournalSource(tmp_path, reader="flow", partitions=1, max_batch=4)
    registry = CollectorRegistry()
    registry.register(JournalCollector(source))
    part = source.build_part("in", "journal-0", None)
    part.next_batch()  # 4 of 10 read
    part.snapshot()
    part.snapshot()  # the 4 released
    text = generate_latest(registry).decode()
    assert "edgesieve_journal_lag_messages 6.0" in text
    assert "edgesieve_journal_messages 6.0" in text
    assert "edgesieve_journal_bytes 48.0" in text
    part.close()


def lag_gauge(registry: object) -> float:
    from prometheus_client import generate_latest

    for line in generate_latest(registry).decode().splitlines():  # type: ignore[arg-type]
        if line.startswith("edgesieve_journal_lag_messages "):
            return float(line.split()[1])
    pytest.fail("no edgesieve_journal_lag_messages sample")


def test_lag_counts_what_was_committed_after_the_reader_opened(tmp_path):
    from prometheus_client import CollectorRegistry

    from flows.accounting import JournalCollector

    write(tmp_path, [], partitions=1)
    source = JournalSource(tmp_path, reader="flow", partitions=1, max_batch=10)
    registry = CollectorRegistry()
    registry.register(JournalCollector(source))
    part = source.build_part("in", "journal-0", None)  # opens on an empty journal
    assert part.next_batch() == []
    write(tmp_path, traffic(devices=1, per_device=1000), partitions=1)  # a backlog arrives
    read = 0
    while read < 500:
        read += len(part.next_batch())  # a catch-up: every batch is full
        assert source.lag == 1000 - read
    assert lag_gauge(registry) == 500.0
    while batch := part.next_batch():
        read += len(batch)
    assert read == 1000 and source.lag == 0 and lag_gauge(registry) == 0.0
    part.close()


def test_a_flow_behind_a_growing_journal_sees_its_lag(tmp_path):
    # The flow opens the journal while it is empty, the backlog is committed while it reads in
    # small batches: its lag gauge must show how far behind it is, not 0.
    root = tmp_path / "journal"
    write(root, [], partitions=1)
    source = JournalSource(root, reader="flow", partitions=1, max_batch=10)
    lags: list[int] = []

    def slow(m: RawMessage) -> RawMessage:
        time.sleep(0.0005)
        lags.append(source.lag)
        return m

    out: list[RawMessage] = []
    flow = Dataflow("lagging")
    op.output("out", op.map("slow", op.input("in", flow, source), slow), TestingSink(out))
    runner = threading.Thread(target=run_main, args=(flow,))
    runner.start()
    try:
        wait_for_progress = time.monotonic() + 10
        while not source.progress() and time.monotonic() < wait_for_progress:
            time.sleep(0.01)
        write(root, traffic(devices=4, per_device=500), partitions=1)
    finally:
        source.drain.set()
        runner.join(60)
    assert not runner.is_alive()
    assert len(out) == 2000
    assert max(lags) > 1000, f"the lag seen while catching up peaked at {max(lags)}"
    assert source.lag == 0
