"""The ingress hand-off and DeviceServers: verdicts, bounds, and real servers in real dataflows."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import numpy as np
import pytest
from bytewax.dataflow import Dataflow
from bytewax.errors import BytewaxRuntimeError
from bytewax.testing import TestingSink, cluster_main

import connectors.devices.ingress as ingress_module
from connectors.codecs.evb1 import encode_evb1
from connectors.devices.http import HttpServer
from connectors.devices.ingress import DeviceServers, Ingress, Offer, Verdict
from operators.records import DeadLetter, RawMessage, Reading, VibrationBlock
from tests.conftest import TOKEN_1, TOKEN_2, curl, device_registry, port_when_listening, refused

THREAD = "edgesieve-device-servers"
MARGIN = timedelta(seconds=1.5)
"""Slack for scheduling on a busy machine; the hold-back itself is checked exactly."""


def server_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == THREAD}


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST ``body`` with the real curl binary; the status and the JSON answer."""
    reply = curl(url, body)
    return reply.status, reply.json


def telemetry(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


# --- Ingress: verdicts, counters, order ---------------------------------------------------------


def test_accepted_telemetry_is_queued_decoded() -> None:
    ingress = Ingress()
    before = datetime.now(UTC)
    offer = ingress.offer("pump-1", "telemetry", "http", b'{"temperature": 21.5, "on": true}')
    after = datetime.now(UTC)
    assert offer == Offer(Verdict.ACCEPTED)
    assert offer.reason == ""
    assert len(ingress) == 1
    assert (ingress.accepted, ingress.rejected, ingress.refused, ingress.high_water) == (1, 0, 0, 1)
    [msg] = ingress.take(10)
    assert (msg.device, msg.channel, msg.transport) == ("pump-1", "telemetry", "http")
    assert msg.payload == b'{"temperature": 21.5, "on": true}'
    assert before <= msg.received_at <= after and msg.received_at.tzinfo is UTC
    assert msg.decoded == [
        Reading("pump-1", "temperature", msg.received_at, 21.5, "http"),
        Reading("pump-1", "on", msg.received_at, 1.0, "http"),
    ]
    assert len(ingress) == 0 and ingress.oldest() is None


def test_accepted_readings_keep_their_own_timestamps() -> None:
    ingress = Ingress()
    payload = (
        b'[{"ts": 1763800000000, "values": {"t": 1}}, {"ts": 1763800000500, "values": {"t": 2}}]'
    )
    assert ingress.offer("fan-2", "telemetry", "coap", payload).verdict is Verdict.ACCEPTED
    [msg] = ingress.take(1)
    t0 = datetime(2025, 11, 22, 8, 26, 40, tzinfo=UTC)
    assert msg.decoded == [
        Reading("fan-2", "t", t0, 1.0, "coap"),
        Reading("fan-2", "t", t0 + timedelta(milliseconds=500), 2.0, "coap"),
    ]


def test_accepted_vibration_is_queued_as_a_block() -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    samples = np.array([[0.5, -1.0], [1.5, 2.0], [0.0, 0.25]])
    block = encode_evb1(samples, sample_rate_hz=1000, start_ts=start)
    ingress = Ingress()
    assert ingress.offer("pump-1", "vibration", "http", block) == Offer(Verdict.ACCEPTED)
    [msg] = ingress.take(1)
    assert isinstance(msg.decoded, VibrationBlock)
    assert (msg.decoded.device, msg.decoded.start_ts, msg.decoded.sample_rate_hz) == (
        "pump-1",
        start,
        1000,
    )
    np.testing.assert_array_equal(msg.decoded.samples, samples)


@pytest.mark.parametrize(
    ("channel", "payload", "reason"),
    [
        (
            "telemetry",
            b'{"temperature": ',
            "telemetry: not valid JSON (Expecting value at line 1 column 17); "
            'send UTF-8 JSON like {"temperature": 21.5}',
        ),
        (
            "telemetry",
            b"",
            "telemetry: payload is empty; "
            'send {"key": value}, {"ts": <Unix ms>, "values": {...}} or a list of those',
        ),
        ("vibration", b"EVB0", None),
        ("alarms", b"{}", "unknown channel 'alarms'; expected 'telemetry', 'vibration', 'attributes' or 'logs'"),
    ],
)
def test_malformed_payload_is_rejected_but_kept_as_a_dead_letter(
    channel: str, payload: bytes, reason: str | None
) -> None:
    ingress = Ingress()
    offer = ingress.offer("pump-1", channel, "http", payload)
    assert offer.verdict is Verdict.REJECTED
    if reason is not None:
        assert offer.reason == reason
    assert offer.reason and "\n" not in offer.reason
    assert (ingress.accepted, ingress.rejected, ingress.refused, ingress.high_water) == (0, 1, 0, 1)
    [msg] = ingress.take(1)
    assert msg.payload == payload and msg.channel == channel
    assert msg.decoded == DeadLetter("pump-1", "http", msg.received_at, offer.reason, payload)


def test_too_large_is_refused_and_not_queued() -> None:
    ingress = Ingress(max_payload_bytes=16)
    exact = b'{"n": 123456789}'
    assert len(exact) == 16
    assert ingress.offer("pump-1", "telemetry", "http", exact).verdict is Verdict.ACCEPTED
    offer = ingress.offer("pump-1", "telemetry", "http", exact + b" ")
    assert offer == Offer(
        Verdict.TOO_LARGE,
        "payload of 17 bytes is over the 16-byte limit; split it into smaller messages",
    )
    assert len(ingress) == 1
    assert (ingress.accepted, ingress.rejected, ingress.refused, ingress.high_water) == (1, 0, 1, 1)
    [msg] = ingress.take(5)
    assert msg.payload == exact


def test_full_queue_is_overloaded_until_it_drains() -> None:
    ingress = Ingress(max_messages=2, max_payload_bytes=64, retry_after_s=3)
    assert ingress.offer("pump-1", "telemetry", "http", telemetry(0)).verdict is Verdict.ACCEPTED
    assert ingress.offer("pump-1", "telemetry", "http", b"{oops").verdict is Verdict.REJECTED
    busy = Offer(Verdict.OVERLOADED, "edge is busy; retry in 3s")
    assert ingress.offer("fan-2", "telemetry", "http", telemetry(1)) == busy
    assert ingress.offer("fan-2", "telemetry", "http", b"{oops") == busy  # not even decoded
    # the size check comes first: a device must not retry what can never fit
    assert ingress.offer("fan-2", "telemetry", "http", b"x" * 65).verdict is Verdict.TOO_LARGE
    assert len(ingress) == 2
    assert (ingress.accepted, ingress.rejected, ingress.refused, ingress.high_water) == (1, 1, 3, 2)
    assert [m.payload for m in ingress.take(1)] == [telemetry(0)]
    assert ingress.offer("fan-2", "telemetry", "http", telemetry(2)).verdict is Verdict.ACCEPTED
    assert ingress.offer("fan-2", "telemetry", "http", telemetry(3)) == busy
    assert [m.payload for m in ingress.take(10)] == [b"{oops", telemetry(2)]
    assert (ingress.accepted, ingress.rejected, ingress.refused, ingress.high_water) == (2, 1, 4, 2)


def test_retry_after_zero() -> None:
    ingress = Ingress(max_messages=1, retry_after_s=0)
    ingress.offer("pump-1", "telemetry", "http", telemetry(0))
    assert ingress.offer("pump-1", "telemetry", "http", telemetry(1)).reason == (
        "edge is busy; retry in 0s"
    )


def test_take_is_oldest_first_and_bounded() -> None:
    ingress = Ingress()
    assert ingress.take(3) == [] and ingress.oldest() is None
    for n in range(5):
        ingress.offer("pump-1", "telemetry", "mqtt", telemetry(n))
    first = ingress.oldest()
    assert ingress.take(0) == [] and ingress.take(-1) == [] and len(ingress) == 5
    head = ingress.take(2)
    assert [m.payload for m in head] == [telemetry(0), telemetry(1)]
    assert head[0].received_at == first and len(ingress) == 3
    third = ingress.oldest()
    rest = ingress.take(10)
    assert [m.payload for m in rest] == [telemetry(2), telemetry(3), telemetry(4)]
    assert rest[0].received_at == third
    stamps = [m.received_at for m in head + rest]
    assert stamps == sorted(stamps)
    assert ingress.oldest() is None and len(ingress) == 0 and ingress.take(10) == []
    assert ingress.high_water == 5


@pytest.mark.parametrize(
    ("kwargs", "got"),
    [
        ({"max_messages": 0}, "0, 1048576, 1"),
        ({"max_payload_bytes": 0}, "10000, 0, 1"),
        ({"max_messages": -5, "max_payload_bytes": -1}, "-5, -1, 1"),
        ({"retry_after_s": -1}, "10000, 1048576, -1"),
    ],
)
def test_ingress_settings_are_checked(kwargs: dict[str, int], got: str) -> None:
    with pytest.raises(ValueError) as info:
        Ingress(**kwargs)
    assert str(info.value) == (
        "Ingress: max_messages and max_payload_bytes must be positive and "
        f"retry_after_s >= 0 (got {got})"
    )


# --- the source partition, driven directly ------------------------------------------------------


def test_partition_lingers_hands_over_full_batches_and_drains_at_stop() -> None:
    ingress, stop = Ingress(), threading.Event()
    linger = timedelta(hours=1)
    before = server_threads()
    source = DeviceServers(ingress, [], stop=stop, max_batch=3, linger=linger)
    partition = source.build("servers", 0, 1)
    try:
        assert len(server_threads() - before) == 1
        now = datetime.now(UTC)
        assert partition.next_batch() == []
        awake = partition.next_awake()
        assert awake is not None and now < awake <= datetime.now(UTC) + timedelta(seconds=1)

        for n in range(2):
            ingress.offer("pump-1", "telemetry", "http", telemetry(n))
        oldest = ingress.oldest()
        assert oldest is not None
        assert partition.next_batch() == []  # fewer than max_batch, younger than linger
        assert partition.next_awake() == oldest + linger

        for n in range(2, 4):
            ingress.offer("pump-1", "telemetry", "http", telemetry(n))
        assert partition.next_awake() is None  # a full batch is due now
        assert [m.payload for m in partition.next_batch()] == [telemetry(n) for n in range(3)]
        assert partition.next_batch() == []  # the fourth lingers

        stop.set()
        assert partition.next_awake() is None
        assert [m.payload for m in partition.next_batch()] == [telemetry(3)]
        assert not (server_threads() - before)  # servers stopped before the last hand-over
        with pytest.raises(StopIteration):
            partition.next_batch()
    finally:
        partition.close()
        partition.close()
    assert not (server_threads() - before)


def test_stop_hands_over_everything_in_batches_of_max_batch() -> None:
    ingress, stop = Ingress(), threading.Event()
    partition = DeviceServers(ingress, [], stop=stop, max_batch=2).build("servers", 0, 1)
    try:
        for n in range(5):
            ingress.offer("pump-1", "telemetry", "http", telemetry(n))
        stop.set()
        batches = [[m.payload for m in partition.next_batch()] for _ in range(3)]
        assert batches == [
            [telemetry(0), telemetry(1)],
            [telemetry(2), telemetry(3)],
            [telemetry(4)],
        ]
        with pytest.raises(StopIteration):
            partition.next_batch()
    finally:
        partition.close()


def test_other_workers_get_no_servers_and_end_at_once() -> None:
    ingress = Ingress()
    server = HttpServer("127.0.0.1:0", device_registry(), ingress)
    before = server_threads()
    partition = DeviceServers(ingress, [server]).build("servers", 1, 2)
    with pytest.raises(StopIteration):
        partition.next_batch()
    partition.close()
    assert not (server_threads() - before)
    with pytest.raises(RuntimeError, match=r"not started yet"):
        _ = server.port


# --- real servers in real dataflows -------------------------------------------------------------


def test_two_worker_flow_with_curl_delivers_every_accepted_message_once(
    run_flow: Callable[..., Any],
) -> None:
    ingress = Ingress()
    server = HttpServer("127.0.0.1:0", device_registry(), ingress)
    stop = threading.Event()
    source = DeviceServers(ingress, [server], stop=stop, linger=MARGIN)
    flow = Dataflow("ingress_two_workers")
    out: list[RawMessage] = []
    op.output("out", op.input("servers", flow, source), TestingSink(out))

    before = server_threads()
    runner = run_flow(flow, workers=2, stops=[stop])

    port = port_when_listening(server, "the HTTP server to listen")
    assert len(server_threads() - before) == 1  # only worker 0 runs servers

    base = f"http://127.0.0.1:{port}/api/v1"
    sent: list[tuple[str, bytes]] = []
    for n in range(10):
        token, device = (TOKEN_1, "pump-1") if n % 2 else (TOKEN_2, "fan-2")
        assert post(f"{base}/{token}/telemetry", telemetry(n)) == (200, {"status": "accepted"})
        sent.append((device, telemetry(n)))
    status, answer = post(f"{base}/{TOKEN_1}/telemetry", b'{"n": ')
    assert status == 400 and answer["error"].startswith("telemetry: not valid JSON")
    status, answer = post(f"{base}/not-a-token-123/telemetry", telemetry(99))
    assert status == 401
    queued_at_stop = len(ingress)
    stop.set()
    runner.join(15.0)

    assert queued_at_stop >= 1  # the last ones were still lingering: the stop path handed them over
    assert not runner.alive
    got = Counter((m.device, m.payload) for m in out)
    assert got == Counter([*sent, ("pump-1", b'{"n": ')])  # each exactly once, nothing else
    for msg in out:
        if msg.payload == b'{"n": ':
            assert isinstance(msg.decoded, DeadLetter)
        else:
            assert msg.decoded == [
                Reading(msg.device, "n", msg.received_at, json.loads(msg.payload)["n"], "http")
            ]
    assert (ingress.accepted, ingress.rejected, ingress.refused, len(ingress)) == (10, 1, 0, 0)
    assert refused(port)
    with pytest.raises(RuntimeError, match=r"failed \(exit 7\)"):  # connection refused
        post(f"{base}/{TOKEN_1}/telemetry", telemetry(100))
    assert not (server_threads() - before)


def test_linger_holds_a_lone_message_then_hands_it_over(
    run_flow: Callable[..., Any], wait_for: Callable[..., Any]
) -> None:
    linger = timedelta(milliseconds=300)
    ingress, stop = Ingress(), threading.Event()
    flow = Dataflow("ingress_linger")
    arrived: list[tuple[RawMessage, datetime]] = []
    raw = op.input("servers", flow, DeviceServers(ingress, [], stop=stop, linger=linger))
    op.output("out", op.map("stamp", raw, lambda m: (m, datetime.now(UTC))), TestingSink(arrived))
    before = server_threads()
    runner = run_flow(flow, stops=[stop])
    wait_for(lambda: server_threads() - before, "the source to start")

    for n in range(2):
        ingress.offer("pump-1", "telemetry", "http", telemetry(n))
        wait_for(lambda n=n: len(arrived) > n, f"message {n}")
        msg, at = arrived[n]
        assert msg.payload == telemetry(n)
        assert linger <= at - msg.received_at < linger + MARGIN
    stop.set()
    runner.join()
    assert len(arrived) == 2


def test_a_full_batch_does_not_wait_for_linger(
    run_flow: Callable[..., Any], wait_for: Callable[..., Any]
) -> None:
    linger = timedelta(seconds=10)
    ingress, stop = Ingress(), threading.Event()
    for n in range(3):
        ingress.offer("pump-1", "telemetry", "http", telemetry(n))
    flow = Dataflow("ingress_full_batch")
    arrived: list[tuple[RawMessage, datetime]] = []
    source = DeviceServers(ingress, [], stop=stop, max_batch=3, linger=linger)
    raw = op.input("servers", flow, source)
    op.output("out", op.map("stamp", raw, lambda m: (m, datetime.now(UTC))), TestingSink(arrived))
    runner = run_flow(flow, stops=[stop])
    wait_for(lambda: len(arrived) == 3, "the full batch")
    assert [m.payload for m, _ in arrived] == [telemetry(n) for n in range(3)]
    assert all(at - m.received_at < linger / 2 for m, at in arrived)
    stop.set()
    runner.join()


# --- servers that fail --------------------------------------------------------------------------


class PortProbe:
    """Records the port of the server started before it (servers start in order)."""

    name = "probe"

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.port: int | None = None

    async def start(self) -> None:
        self.port = self.server.port

    async def stop(self) -> None:
        return None


def test_a_server_that_cannot_bind_fails_the_build_and_stops_the_others(taken_port: int) -> None:
    port = taken_port
    ingress = Ingress()
    first = HttpServer("127.0.0.1:0", device_registry(), ingress)
    probe = PortProbe(first)
    blocked = HttpServer(f"127.0.0.1:{port}", device_registry(), ingress)
    before = server_threads()
    with pytest.raises(OSError) as info:
        DeviceServers(ingress, [first, probe, blocked]).build("servers", 0, 1)
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value).startswith(
        f"[Errno {errno.EADDRINUSE}] HttpServer: cannot listen on '127.0.0.1:{port}': "
    )
    assert f"hint: another process may hold port {port}" in str(info.value)
    assert not (server_threads() - before)
    assert probe.port is not None and refused(probe.port)  # the one that started is stopped
    with pytest.raises(RuntimeError, match=r"not started yet"):
        _ = first.port


def test_a_server_that_cannot_bind_fails_the_dataflow(taken_port: int) -> None:
    port = taken_port
    ingress = Ingress()
    source = DeviceServers(ingress, [HttpServer(f"127.0.0.1:{port}", device_registry(), ingress)])
    flow = Dataflow("ingress_bind_fails")
    op.output("out", op.input("servers", flow, source), TestingSink([]))
    before = server_threads()
    with pytest.raises(BytewaxRuntimeError) as info:
        cluster_main(flow, [], 0, worker_count_per_proc=2)
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(
        isinstance(e, OSError) and f"HttpServer: cannot listen on '127.0.0.1:{port}'" in str(e)
        for e in chain
    ), chain
    assert not (server_threads() - before)


class Hanging:
    """A server whose start never finishes."""

    name = "hanging"

    def __init__(self) -> None:
        self.cancelled = False
        self.stopped = 0

    async def start(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def stop(self) -> None:
        self.stopped += 1


def test_a_server_that_never_starts_times_out_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress_module, "_START_TIMEOUT_S", 0.2)
    ingress = Ingress()
    first = HttpServer("127.0.0.1:0", device_registry(), ingress)
    probe, hanging = PortProbe(first), Hanging()
    before = server_threads()
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        DeviceServers(ingress, [first, probe, hanging]).build("servers", 0, 1)
    assert time.monotonic() - start < 5
    assert str(info.value) == (
        "DeviceServers: the device servers (http, probe, hanging) did not start within 0.2s; "
        "hint: check their listen addresses"
    )
    assert hanging.cancelled and hanging.stopped >= 1
    assert probe.port is not None and refused(probe.port)
    assert not (server_threads() - before)


class FailingStop:
    """A server that cannot stop cleanly."""

    name = "flaky"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        msg = "socket already gone"
        raise OSError(msg)


def test_a_server_that_fails_to_stop_is_logged_and_the_rest_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ingress = Ingress()
    http = HttpServer("127.0.0.1:0", device_registry(), ingress)
    before = server_threads()
    partition = DeviceServers(ingress, [FailingStop(), http, PortProbe(http)]).build("s", 0, 1)
    port = http.port
    with caplog.at_level(logging.ERROR, logger="edgesieve.ingress"):
        partition.close()
    [record] = [r for r in caplog.records if r.name == "edgesieve.ingress"]
    assert record.getMessage() == "flaky server did not stop cleanly"
    assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)
    assert refused(port)
    assert not (server_threads() - before)


class HangingStop:
    """A server whose stop never finishes."""

    name = "stuck"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await asyncio.Event().wait()


class Messages(logging.Handler):
    """Keeps only the text of records, so no traceback keeps their frames alive."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_servers_that_do_not_stop_in_time_are_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingress_module, "_STOP_TIMEOUT_S", 0.2)
    handler = Messages()
    monkeypatch.setattr(ingress_module.logger, "propagate", False)
    ingress_module.logger.addHandler(handler)
    before = server_threads()
    try:
        partition = DeviceServers(Ingress(), [HangingStop()]).build("s", 0, 1)
        partition.close()
    finally:
        ingress_module.logger.removeHandler(handler)
    assert handler.messages == ["device servers did not stop cleanly"]
    assert not (server_threads() - before)
    del partition
    gc.collect()  # the abandoned stop task is reported now, not in a later test


# --- Ingress in journal mode: answers after the commit ------------------------------------------


class _HeldJournal:
    """A journal whose commits the test completes by hand (``admit`` gives ``pushback``)."""

    def __init__(self) -> None:
        self.futures: list[Any] = []
        self.submitted: list[RawMessage] = []
        self.pushback: str | None = None

    def submit(self, msg: RawMessage, *, redelivery: bool = False, dedup_key: bytes | None = None) -> Any:
        import concurrent.futures

        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        self.submitted.append(msg)
        self.futures.append(future)
        return future

    def append(
        self,
        msg: RawMessage,
        done: Any,
        token: Any = None,
        *,
        redelivery: bool = False,
        dedup_key: bytes | None = None,
    ) -> bool:
        future = self.submit(msg, redelivery=redelivery, dedup_key=dedup_key)
        future.add_done_callback(lambda f: done([token], [f.exception() or f.result()]))
        return True

    def admit(self, device: str | None = None) -> str | None:
        return self.pushback


def _journal(tmp_path: Any, **kwargs: Any) -> Any:
    from connectors.devices.journal import Journal, JournalSettings

    return Journal(JournalSettings(root=tmp_path / "journal", partitions=1, **kwargs))


def _journaled(tmp_path: Any) -> list[RawMessage]:
    from connectors.devices.journal import JournalReader

    with JournalReader(tmp_path / "journal", 0) as reader:
        return [msg for _, msg in reader.read(-1, 100)]


def test_journal_mode_accepts_once_committed_and_journals_malformed_too(tmp_path: Any) -> None:
    journal = _journal(tmp_path)
    ingress = Ingress(journal=journal)
    try:
        ok = asyncio.run(ingress.deliver("pump-1", "telemetry", "http", b'{"t": 1}'))
        assert ok == Offer(Verdict.ACCEPTED)
        assert [m.payload for m in _journaled(tmp_path)] == [b'{"t": 1}']  # on disk on return
        bad = asyncio.run(ingress.deliver("pump-1", "telemetry", "coap", b"{nope"))
        assert bad.verdict is Verdict.REJECTED and bad.reason.startswith("telemetry: ")
        [first, second] = _journaled(tmp_path)
        assert (second.device, second.channel, second.transport) == ("pump-1", "telemetry", "coap")
        assert second.payload == b"{nope" and second.received_at.tzinfo is not None
        assert (ingress.accepted, ingress.rejected, ingress.refused) == (1, 1, 0)
        assert len(ingress) == 0  # nothing is held in memory
    finally:
        journal.close()


def test_journal_mode_answers_only_after_the_commit() -> None:
    journal = _HeldJournal()
    ingress = Ingress(journal=journal)  # type: ignore[arg-type]
    from connectors.devices.journal import Committed

    async def scenario() -> tuple[bool, Offer]:
        task = asyncio.ensure_future(ingress.deliver("pump-1", "telemetry", "http", b'{"t": 1}'))
        await asyncio.sleep(0.2)
        waited = not task.done()
        journal.futures[0].set_result(Committed(0, 0))
        return waited, await task

    waited, offer = asyncio.run(scenario())
    assert waited and offer == Offer(Verdict.ACCEPTED)
    assert journal.submitted[0].decoded is None  # the flow decodes what it reads back


def test_journal_mode_a_client_going_away_does_not_cancel_the_commit() -> None:
    journal = _HeldJournal()
    ingress = Ingress(journal=journal)  # type: ignore[arg-type]

    async def scenario() -> None:
        task = asyncio.ensure_future(ingress.deliver("pump-1", "telemetry", "http", b'{"t": 1}'))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert not journal.futures[0].cancelled()


def test_journal_mode_refusals_carry_the_journals_reason(tmp_path: Any) -> None:
    from connectors.devices.journal import JournalFull

    journal = _HeldJournal()
    ingress = Ingress(journal=journal, retry_after_s=3)  # type: ignore[arg-type]
    journal.pushback = "journal full: 10 payload bytes held of journal.max_bytes=10"
    assert ingress.busy() == (
        "edge is busy: journal full: 10 payload bytes held of journal.max_bytes=10; retry in 3s"
    )
    offer = asyncio.run(ingress.deliver("pump-1", "telemetry", "http", b'{"t": 1}'))
    assert offer == Offer(Verdict.OVERLOADED, ingress.busy() or "")
    assert journal.submitted == []  # pushed back before submitting
    journal.pushback = None

    async def failing(exc: BaseException) -> Offer:
        task = asyncio.ensure_future(ingress.deliver("pump-1", "telemetry", "http", b'{"t": 1}'))
        await asyncio.sleep(0.05)
        journal.futures[-1].set_exception(exc)
        return await task

    full = asyncio.run(failing(JournalFull("disk full: No space left on device")))
    assert full == Offer(
        Verdict.OVERLOADED, "edge is busy: disk full: No space left on device; retry in 3s"
    )
    closed = asyncio.run(failing(RuntimeError("journal closed")))
    assert closed == Offer(
        Verdict.OVERLOADED, "edge is stopping, the message was not kept; retry in 3s"
    )
    assert (ingress.accepted, ingress.rejected, ingress.refused) == (0, 0, 3)


def test_journal_mode_too_large_is_not_submitted() -> None:
    journal = _HeldJournal()
    ingress = Ingress(journal=journal, max_payload_bytes=4)  # type: ignore[arg-type]
    offer = asyncio.run(ingress.deliver("pump-1", "telemetry", "http", b"12345"))
    assert offer.verdict is Verdict.TOO_LARGE and journal.submitted == []


def test_journal_mode_refuses_the_in_memory_offer() -> None:
    ingress = Ingress(journal=_HeldJournal())  # type: ignore[arg-type]
    with pytest.raises(
        RuntimeError,
        match=r"^Ingress.offer: this ingress writes to a journal, got a http telemetry message "
        r"to queue in memory; hint: await Ingress.deliver\(\), which answers after the commit$",
    ):
        ingress.offer("pump-1", "telemetry", "http", b"{}")


def test_memory_mode_deliver_is_offer() -> None:
    ingress = Ingress(max_messages=1)
    assert asyncio.run(ingress.deliver("pump-1", "telemetry", "http", b'{"t": 1}')).verdict is (
        Verdict.ACCEPTED
    )
    assert ingress.busy() == "edge is busy; retry in 1s"
    assert len(ingress) == 1


def test_journal_mode_pushes_back_only_the_device_over_its_share(tmp_path: Any) -> None:
    journal = _journal(tmp_path, max_bytes=1000, device_share=0.5)

    async def scenario() -> list[Offer]:
        offers = []
        for device in ["flood"] * 6 + ["calm"]:
            offers.append(await ingress.deliver(device, "telemetry", "http", b'{"t": 1}'.ljust(100)))
        return offers

    ingress = Ingress(journal=journal, retry_after_s=2)
    try:
        offers = asyncio.run(scenario())
        assert ingress.busy("flood") is not None and ingress.busy("calm") is None
        assert ingress.busy() is None
    finally:
        journal.close()
    assert [o.verdict for o in offers] == [Verdict.ACCEPTED] * 5 + [
        Verdict.OVERLOADED,
        Verdict.ACCEPTED,
    ]
    assert offers[5].reason.startswith(
        "edge is busy: journal share of device flood full: 500 payload bytes held of its 500 "
        "(journal.device_share=0.5 x journal.max_bytes=1000) in "
    )
    assert offers[5].reason.endswith("; retry in 2s")
    assert (ingress.accepted, ingress.refused) == (6, 1)


def test_in_memory_a_device_over_its_share_of_the_queue_is_refused_alone() -> None:
    ingress = Ingress(max_messages=8, device_share=0.25, retry_after_s=2)
    offers = [ingress.offer(d, "telemetry", "http", b'{"t": 1}') for d in ["flood"] * 3 + ["calm"]]
    assert [o.verdict for o in offers] == [Verdict.ACCEPTED] * 2 + [
        Verdict.OVERLOADED,
        Verdict.ACCEPTED,
    ]
    assert offers[2].reason == (
        "edge is busy: device flood has 2 messages waiting for the flow, the most one device "
        "may (0.25 x 8); retry in 2s"
    )
    assert ingress.busy("flood") == offers[2].reason and ingress.busy("calm") is None
    assert [m.device for m in ingress.take(1)] == ["flood"]
    assert ingress.offer("flood", "telemetry", "http", b'{"t": 2}').verdict is Verdict.ACCEPTED
    assert [m.device for m in ingress.take(10)] == ["flood", "calm", "flood"]
    assert ingress._queued == {}  # nothing is kept for devices with nothing queued
    with pytest.raises(
        ValueError,
        match=r"^Ingress: device_share must be above 0 and at most 1 \(got 0\); hint: the "
        r"fraction of max_messages one device may have queued, e.g\. 0\.25$",
    ):
        Ingress(device_share=0)
