"""Journal readers run at SCHED_IDLE while caught up, at SCHED_OTHER while behind or closed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, cluster_main

from connectors.devices import reader_priority
from connectors.devices.journal import Journal, JournalSettings
from connectors.devices.journal_source import BEHIND_AGE, JournalSource
from connectors.devices.reader_priority import ReaderPriority, reset_inherited
from operators.records import RawMessage

SUPPORTED = reader_priority._can_return() is None  # noqa: SLF001 - the same check as the code
needs_policy = pytest.mark.skipif(
    not SUPPORTED, reason="this process cannot return from SCHED_IDLE (no CAP_SYS_NICE)"
)


@pytest.fixture(autouse=True)
def _enabled():
    """The journal source's readers change their policy in these tests, and are normal after."""
    reader_priority.PRIORITY.enable()
    yield
    reader_priority.PRIORITY.disable()  # every reader back to SCHED_OTHER
    reader_priority.PRIORITY.enable()  # the default


def idle(tid: int) -> bool:
    return os.sched_getscheduler(tid) == os.SCHED_IDLE


def write(root: Path, count: int, received_at: datetime | None = None) -> None:
    """``count`` messages received now (or at ``received_at``), committed."""
    with Journal(JournalSettings(root, partitions=1, linger=timedelta(0))) as journal:
        for i in range(count):
            at = received_at or datetime.now(UTC)
            journal.submit(RawMessage("d1", "telemetry", "http", at, b"%08d" % i)).result(30)


def on_thread(name: str, work: Callable[[], object]) -> object:
    """``work()`` on a new thread whose OS name is ``name`` (as Bytewax names its workers)."""
    result: list[object] = []

    def target() -> None:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name)
        result.append(work())

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    return result[0]


OLD = datetime.now(UTC) - BEHIND_AGE - timedelta(seconds=1)
"""A receipt time that finds the flow behind."""


@needs_policy
def test_caught_up_readers_and_their_helpers_idle_behind_back_to_normal(tmp_path):
    write(tmp_path, 30, received_at=OLD)
    source = JournalSource(tmp_path, reader="flow", partitions=1, max_batch=10)
    part = source.build_part("in", "journal-0", None)
    seen: dict[str, object] = {}
    stop = threading.Event()

    def reader() -> None:
        helper = threading.Thread(target=stop.wait)  # started by the reader: its OS name too
        helper.start()
        me, other = threading.get_native_id(), helper.native_id
        assert other is not None
        for _ in range(3):
            assert len(part.next_batch()) == 10  # a backlog: behind
            seen.setdefault("behind", []).append((idle(me), idle(other)))  # type: ignore[union-attr]
        assert part.next_batch() == []  # everything read: caught up
        seen["caught up"] = (idle(me), idle(other))
        write(tmp_path, 15)  # a burst ingest has just committed
        assert len(part.next_batch()) == 10  # full, but fresh: still caught up
        seen["full and fresh"] = (idle(me), idle(other))
        assert len(part.next_batch()) == 5
        seen["partial"] = (idle(me), idle(other))
        write(tmp_path, 2, received_at=OLD)
        assert len(part.next_batch()) == 2  # partial, but old: behind
        seen["behind again"] = (idle(me), idle(other))
        part.close()
        seen["closed"] = (idle(me), idle(other))
        stop.set()
        helper.join()

    on_thread("timely:work-7", reader)
    assert seen == {
        "behind": [(False, False)] * 3,
        "caught up": (True, True),
        "full and fresh": (True, True),
        "partial": (True, True),
        "behind again": (False, False),
        "closed": (False, False),
    }
    assert not idle(0)  # this thread (the main one, another OS name) was never touched


@needs_policy
def test_a_partial_read_of_old_messages_finds_the_flow_behind(tmp_path):
    """A flow starved of CPU under a light stream reads partial batches, but late ones."""
    write(tmp_path, 3, received_at=OLD)
    write(tmp_path, 3)
    source = JournalSource(tmp_path, reader="flow", partitions=1, max_batch=100)
    part = source.build_part("in", "journal-0", None)

    def reads() -> list[tuple[int, bool]]:
        seen = [(len(part.next_batch()), idle(0))]  # all six: the oldest is old
        write(tmp_path, 2)
        seen.append((len(part.next_batch()), idle(0)))  # two fresh ones: caught up
        part.close()
        return seen

    assert on_thread("timely:work-5", reads) == [(6, False), (2, True)]


@needs_policy
def test_one_partition_behind_keeps_every_reader_normal():
    priority = ReaderPriority(enabled=True)

    def report(key: str, behind: bool) -> bool:
        (priority.behind if behind else priority.caught_up)(key)
        return idle(0)

    assert on_thread("timely:work-1", lambda: report("p0", behind=True)) is False
    assert on_thread("timely:work-2", lambda: report("p1", behind=False)) is False  # p0 behind
    assert on_thread("timely:work-1", lambda: report("p0", behind=False)) is True
    assert priority.idle
    priority.forget("p0")
    priority.forget("p1")
    assert not priority.idle


@needs_policy
def test_helpers_started_while_idle_return_to_normal_with_their_reader_renamed_or_not():
    priority = ReaderPriority(enabled=True)
    stop = threading.Event()

    def renamed() -> None:  # as gRPC's threads name themselves
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("event_engine")
        stop.wait()

    def reader() -> tuple[list[bool], list[bool]]:
        priority.caught_up("p0")
        helpers = [threading.Thread(target=stop.wait), threading.Thread(target=renamed)]
        for helper in helpers:  # started while caught up
            helper.start()
        time.sleep(0.1)  # the second has renamed itself
        inherited = [idle(h.native_id) for h in helpers]  # type: ignore[arg-type]
        priority.caught_up("p0")
        priority.behind("p0")
        after = [idle(h.native_id) for h in helpers]  # type: ignore[arg-type]
        priority.forget("p0")
        stop.set()
        for helper in helpers:
            helper.join()
        return inherited, after

    assert on_thread("timely:work-8", reader) == ([True, True], [False, False])


def test_the_main_thread_is_never_lowered():
    priority = ReaderPriority(enabled=True)
    priority.caught_up("p0")
    assert not idle(0) and not priority.idle


@needs_policy
def test_an_adopted_thread_follows_the_readers_and_is_normal_after_the_block():
    priority = ReaderPriority(enabled=True)

    def report(key: str, behind: bool) -> None:
        on_thread("timely:work-3", lambda: (priority.behind if behind else priority.caught_up)(key))

    def waiter() -> list[bool]:  # another OS name than the readers: only adoption moves it
        seen = []
        with priority.adopted():
            seen.append(idle(0))  # no reader yet: normal
            report("p0", behind=False)
            seen.append(idle(0))
            report("p0", behind=True)
            seen.append(idle(0))
            report("p0", behind=False)
            seen.append(idle(0))
        seen.append(idle(0))  # the block is over: normal, the readers still idle
        report("p0", behind=True)
        report("p0", behind=False)
        seen.append(idle(0))  # not adopted any more: left alone
        with priority.adopted():  # adopted while the readers idle: at once
            seen.append(idle(0))
        seen.append(idle(0))
        priority.forget("p0")
        return seen

    assert on_thread("cluster", waiter) == [False, True, False, True, False, False, True, False]


@needs_policy
def test_a_flow_on_worker_threads_ends_with_every_thread_normal(tmp_path):
    write(tmp_path, 40, received_at=OLD)
    write(tmp_path, 10)
    source = JournalSource(tmp_path, reader="flow", partitions=1, max_batch=20)
    seen: list[bool] = []

    def look(message: RawMessage) -> RawMessage:
        seen.append(idle(0))  # the worker's policy while it processes the item
        if len(seen) == 50:
            source.drain.set()
        return message

    out: list[RawMessage] = []
    flow = Dataflow("priority")
    op.output("out", op.map("look", op.input("in", flow, source), look), TestingSink(out))
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    assert len(out) == 50
    assert seen[:40] == [False] * 40  # two batches of old messages: processed at normal priority
    assert seen[40:] == [True] * 10  # fresh ones: caught up, processed at SCHED_IDLE
    tasks = Path("/proc/self/task")
    assert not [t.name for t in tasks.iterdir() if idle(int(t.name))]


def test_without_the_capability_nothing_changes_and_one_line_says_why(monkeypatch, caplog):
    def refuse(pid: int, policy: int, param: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    priority = ReaderPriority(enabled=True)
    with caplog.at_level(logging.INFO, logger="edgesieve.journal"):
        for key in ("p0", "p1", "p0"):
            on_thread("timely:work-3", lambda k=key: priority.caught_up(k))
    lines = [r.getMessage() for r in caplog.records if r.name == "edgesieve.journal"]
    assert lines == [
        "journal readers keep the CPU priority of ingest (PermissionError: Operation not "
        "permitted; returning from SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE 20): on few "
        "cores the flow's batches can delay device answers"
    ]
    assert not priority.idle


@needs_policy
def test_a_process_started_at_sched_idle_returns_to_normal(caplog):
    def started_idle() -> tuple[bool, bool]:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        before = idle(0)
        reset_inherited()
        return before, idle(0)

    assert on_thread("edgesieve-ingest", started_idle) == (True, False)


def test_leaving_an_inherited_sched_idle_that_is_refused_is_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_IDLE)

    def refuse(pid: int, policy: int, param: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING, logger="edgesieve.journal"):
        reset_inherited()
    assert [r.getMessage() for r in caplog.records] == [
        "ingest: started at the SCHED_IDLE CPU policy and cannot leave it ([Errno 1] Operation "
        "not permitted); hint: start it from a normal-priority process, or grant CAP_SYS_NICE"
    ]


@needs_policy
def test_disabled_it_returns_the_readers_to_normal_and_leaves_them_there():
    priority = ReaderPriority(enabled=True)

    def caught_up_disabled_caught_up() -> tuple[bool, bool, bool]:
        priority.caught_up("p0")
        before = idle(0)
        priority.disable()
        after = idle(0)
        priority.caught_up("p0")
        return before, after, idle(0)

    assert on_thread("timely:work-4", caught_up_disabled_caught_up) == (True, False, False)
    assert not priority.idle


UNPRIVILEGED = """
import logging, os, threading
from pathlib import Path
from connectors.devices.reader_priority import ReaderPriority
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
priority = ReaderPriority(enabled=True)
def reader():
    Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("timely:work-0")
    priority.caught_up("p0")
    print("idle" if os.sched_getscheduler(0) == os.SCHED_IDLE else "normal", priority.idle)
thread = threading.Thread(target=reader)
thread.start()
thread.join()
"""


@needs_policy
def test_a_process_without_cap_sys_nice_keeps_its_policy_and_says_why(tmp_path):
    without = ["setpriv", "--bounding-set=-sys_nice", "--inh-caps=-sys_nice"]
    done = subprocess.run(
        [*without, sys.executable, "-c", UNPRIVILEGED],
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "normal False\n"
    assert done.stderr == (
        "INFO edgesieve.journal: journal readers keep the CPU priority of ingest "
        "(PermissionError: Operation not permitted; returning from SCHED_IDLE needs "
        "CAP_SYS_NICE or RLIMIT_NICE 20): on few cores the flow's batches can delay device "
        "answers\n"
    )


@needs_policy
def test_on_by_default_and_off_when_not_enabled():
    assert on_thread("timely:work-9", lambda: (ReaderPriority().caught_up("p0"), idle(0))[1])
    off = ReaderPriority(enabled=False)
    assert on_thread("timely:work-9", lambda: (off.caught_up("p0"), idle(0))[1]) is False
    assert not off.idle
