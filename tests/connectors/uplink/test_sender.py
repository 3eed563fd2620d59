from __future__ import annotations

import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import pytest
import trustme

from connectors.uplink.batch import Sealed
from connectors.uplink.outbox import Outbox, OutboxSettings
from connectors.uplink.pacing import backoff_delay
from connectors.uplink.sender import UplinkSender, UplinkStats
from connectors.uplink.settings import UplinkSettings
from connectors.uplink.wire import PUSH_METHOD
from protos import uplink_pb2, uplink_pb2_grpc
from tests.conftest import wait_for as wait_until

# a traceback in any thread (the sender's, gRPC's) fails the test
pytestmark = [
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
]

ROOT = Path(__file__).parents[3]
LOGGER = "edgesieve.uplink"
KEY = "edge-01"
SECRET = "s3cret-edge-01"
PRIORITY = {
    "alarms": 0,
    "vibration_features": 1,
    "telemetry_summary": 2,
    "telemetry_points": 3,
    "telemetry_text": 3,
}
FAST = {"backoff_min_s": 0.05, "backoff_max_s": 0.3}


# -- the in-test cloud: a real gRPC server on loopback -----------------------------------------


class FakeCloud(uplink_pb2_grpc.UplinkServicer):
    """Records what arrives, stores each batch_id once, acks; switches inject faults."""

    def __init__(self, key: str = KEY, secret: str = SECRET) -> None:
        self.key = key
        self.secret = secret
        self.lock = threading.Lock()
        self.received: list[str] = []
        self.arrivals: list[float] = []
        self.stored: dict[str, uplink_pb2.Batch] = {}
        self.streams_opened: list[float] = []
        self.metadata: list[dict[str, str]] = []
        self.peers: list[dict[str, list[bytes]]] = []
        self.refuse = False
        self.ack_delay = 0.0
        self.stall_once = 0.0
        self.drop_after: int | None = None
        self.reject_streams: set[str] = set()
        self.status_override: int | None = None
        self.end_after: int | None = None
        self.bogus_ack_once = False

    def Push(self, request_iterator: Iterator[uplink_pb2.Batch], context: grpc.ServicerContext):
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self.lock:
            self.streams_opened.append(time.monotonic())
            self.metadata.append(md)
            self.peers.append(dict(context.auth_context()))
        if self.refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, "refused by the test")
        if md.get("x-edgesieve-key") != self.key or md.get("x-edgesieve-secret") != self.secret:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown key or wrong secret")
        count = 0
        for batch in request_iterator:
            with self.lock:
                self.received.append(batch.batch_id)
                self.arrivals.append(time.monotonic())
            count += 1
            if self.drop_after is not None and count >= self.drop_after:
                self.drop_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "stream dropped by the test")
            if self.stall_once:
                stall, self.stall_once = self.stall_once, 0.0
                time.sleep(stall)
            if self.ack_delay:
                time.sleep(self.ack_delay)
            if self.bogus_ack_once:
                self.bogus_ack_once = False
                yield uplink_pb2.Ack(batch_id="no-such-batch", status=uplink_pb2.Ack.STORED)
            if self.status_override is not None:
                yield uplink_pb2.Ack(batch_id=batch.batch_id, status=self.status_override)
                continue
            if batch.stream in self.reject_streams:
                yield uplink_pb2.Ack(
                    batch_id=batch.batch_id,
                    status=uplink_pb2.Ack.REJECTED,
                    detail=f"unknown stream {batch.stream!r}",
                )
                continue
            with self.lock:
                seen = batch.batch_id in self.stored
                if not seen:
                    self.stored[batch.batch_id] = batch
            status = uplink_pb2.Ack.DUPLICATE if seen else uplink_pb2.Ack.STORED
            yield uplink_pb2.Ack(batch_id=batch.batch_id, status=status)
            if self.end_after is not None and count >= self.end_after:
                self.end_after = None
                return


class CloudServer:
    def __init__(self, cloud: FakeCloud, port: int, credentials: grpc.ServerCredentials | None):
        self.cloud = cloud
        self.port = port
        self.credentials = credentials
        self.server: grpc.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> CloudServer:
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        uplink_pb2_grpc.add_UplinkServicer_to_server(self.cloud, server)
        address = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, self.credentials)
        assert bound == self.port
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait(5)
            self.server = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def servers() -> Iterator[Callable[..., CloudServer]]:
    made: list[CloudServer] = []

    def make(
        cloud: FakeCloud | None = None,
        *,
        start: bool = True,
        credentials: grpc.ServerCredentials | None = None,
    ) -> CloudServer:
        server = CloudServer(cloud or FakeCloud(), free_port(), credentials)
        made.append(server)
        return server.start() if start else server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite")
    yield box
    box.close()


@pytest.fixture
def senders() -> Iterator[Callable[..., UplinkSender]]:
    made: list[UplinkSender] = []

    def make(box: Outbox, target: str, *, start: bool = True, **kwargs: Any) -> UplinkSender:
        params = {"key": KEY, "secret": SECRET, **FAST, **kwargs}
        sender = UplinkSender(box, UplinkSettings(target=target, **params))
        made.append(sender)
        if start:
            sender.start()
        return sender

    yield make
    for sender in made:
        sender.stop()


def make_batch(
    name: str, stream: str = "telemetry_points", *, size: int = 200, at: datetime | None = None
) -> Sealed:
    at = at or datetime.now(UTC)
    message = uplink_pb2.Batch(
        edge_id=KEY,
        batch_id=name,
        stream=stream,
        priority=PRIORITY[stream],
        rows=1,
        arrow_ipc=os.urandom(size),
        raw_bytes=1000,
        created_at_us=int(at.timestamp() * 1_000_000),
    )
    return Sealed(name, stream, PRIORITY[stream], 1, 1000, at, message.SerializeToString())


def fill(
    box: Outbox,
    n: int,
    stream: str = "telemetry_points",
    *,
    size: int = 200,
    prefix: str | None = None,
) -> list[Sealed]:
    base = datetime.now(UTC)
    batches = [
        make_batch(
            f"{prefix or stream}-{i:04d}", stream, size=size, at=base + timedelta(microseconds=i)
        )
        for i in range(n)
    ]
    for b in batches:
        assert box.put(b)
    return batches




# -- delivery ---------------------------------------------------------------------------------


def test_cloud_down_at_start_then_everything_arrives_once_in_priority_order(
    outbox, servers, senders, caplog
):
    caplog.set_level(logging.INFO, LOGGER)
    base = datetime.now(UTC)
    streams = ["telemetry_points", "telemetry_summary", "alarms", "vibration_features"]
    batches = [
        make_batch(f"b{i:03d}", streams[i % 4], at=base + timedelta(milliseconds=i))
        for i in range(40)
    ]
    for b in batches:
        outbox.put(b)
    server = servers(start=False)
    sender = senders(outbox, server.target)
    wait_until(lambda: sender.stats.last_error, "a failed connection attempt")
    wait_until(lambda: sender.state == "backoff", "the backoff state")
    assert "UNAVAILABLE" in sender.stats.last_error
    assert outbox.stats().batches == 40
    time.sleep(0.3)  # several attempts while the cloud is down
    assert outbox.stats().batches == 40
    assert sender.stats.sent == 0

    server.start()
    assert sender.flush(10.0)
    expected = [b.batch_id for b in sorted(batches, key=lambda b: (b.priority, b.created_at))]
    assert server.cloud.received == expected
    assert [server.cloud.stored[i].stream for i in expected[:10]] == ["alarms"] * 10
    assert {i: server.cloud.stored[i].SerializeToString() for i in expected} == {
        b.batch_id: b.payload for b in batches
    }
    stats = sender.stats
    assert (stats.sent, stats.acked, stats.duplicates, stats.rejected) == (40, 40, 0, 0)
    assert stats.wire_bytes == sum(len(b.payload) for b in batches)
    assert sender.state == "connected"
    md = server.cloud.metadata[-1]
    assert (md["x-edgesieve-key"], md["x-edgesieve-secret"]) == (KEY, SECRET)
    text = caplog.text
    assert "stream failed with UNAVAILABLE" in text
    assert "unacknowledged batches stay in the outbox and are sent again, retrying in" in text
    assert "Hint: check that the receiver runs and is reachable at the target" in text
    assert f"uplink to {server.target}: connected (outbox: " in text


def test_new_batches_are_sent_while_connected(outbox, servers, senders):
    server = servers()
    sender = senders(outbox, server.target)
    wait_until(lambda: sender.state == "connected", "connected")
    fill(outbox, 3, "alarms")
    assert sender.flush(5.0)
    fill(outbox, 2, "telemetry_summary")
    assert sender.flush(5.0)
    assert len(server.cloud.stored) == 5
    assert len(server.cloud.streams_opened) == 1


def test_window_limits_batches_in_flight(outbox, servers, senders):
    cloud = FakeCloud()
    cloud.stall_once = 0.5
    server = servers(cloud)
    fill(outbox, 20)
    sender = senders(outbox, server.target, window=4)
    wait_until(lambda: sender.stats.sent >= 4, "the first window")
    time.sleep(0.2)
    assert sender.stats.sent == 4  # no Ack yet: nothing more goes out
    assert sender.flush(10.0)
    assert len(server.cloud.received) == 20


def test_wrong_secret_keeps_batches_and_logs_an_error(outbox, servers, senders, caplog):
    cloud = FakeCloud(secret="the-right-one")
    server = servers(cloud)
    batches = fill(outbox, 5)
    with caplog.at_level(logging.WARNING, LOGGER):
        sender = senders(outbox, server.target, backoff_max_s=0.4)
        wait_until(lambda: len(cloud.streams_opened) >= 3, "three refused attempts")
    assert outbox.stats().batches == 5
    assert cloud.received == []
    assert sender.stats.acked == 0
    gaps = [b - a for a, b in zip(cloud.streams_opened, cloud.streams_opened[1:], strict=False)]
    assert min(gaps) >= 0.35  # UNAUTHENTICATED waits backoff_max_s, not the fast backoff
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.ERROR]
    assert errors
    assert (
        f"uplink to {server.target}: the cloud refused key 'edge-01': UNAUTHENTICATED: "
        "unknown key or wrong secret. Hint: check cloud.key and cloud.secret against the "
        "receiver's auth file"
    ) in errors[0].getMessage()
    assert "nothing is deleted from the outbox, retrying in 0.4s" in errors[0].getMessage()
    assert SECRET not in caplog.text
    cloud.secret = SECRET  # the receiver's auth file is fixed: the next retry gets through
    assert sender.flush(10.0)
    assert set(cloud.stored) == {b.batch_id for b in batches}


def test_rejected_batches_leave_the_outbox(outbox, servers, senders, caplog):
    cloud = FakeCloud()
    cloud.reject_streams = {"telemetry_text"}
    server = servers(cloud)
    bad = fill(outbox, 3, "telemetry_text")
    good = fill(outbox, 2, "alarms")
    with caplog.at_level(logging.ERROR, LOGGER):
        sender = senders(outbox, server.target)
        assert sender.flush(5.0)
    assert set(cloud.stored) == {b.batch_id for b in good}
    assert sender.stats.rejected == 3 and sender.stats.acked == 2
    rejected = outbox.rejected()
    assert [r.batch_id for r in rejected] == [b.batch_id for b in bad]
    assert {r.detail for r in rejected} == {"unknown stream 'telemetry_text'"}
    assert outbox.stats().rejected == 3
    assert (
        "the cloud REJECTED batch telemetry_text-0000 (stream 'telemetry_text', 1 rows): "
        "unknown stream 'telemetry_text'. It was moved to the rejected table of the outbox"
        in caplog.text
    )
    assert outbox.put(bad[0]) is False  # never queued (and sent) again
    time.sleep(0.1)
    assert cloud.received.count(bad[0].batch_id) == 1


def test_stream_dropped_midway_resends_unacked_batches(outbox, servers, senders, caplog):
    cloud = FakeCloud()
    cloud.drop_after = 10
    cloud.ack_delay = 0.002
    server = servers(cloud)
    batches = fill(outbox, 60)
    with caplog.at_level(logging.WARNING, LOGGER):
        sender = senders(outbox, server.target, window=8)
        assert sender.flush(10.0)
    put = {b.batch_id for b in batches}
    assert set(cloud.received) == put
    assert set(cloud.stored) == put
    repeats = {i for i in cloud.received if cloud.received.count(i) > 1}
    assert repeats, "the batches in flight when the stream dropped were sent again"
    assert repeats <= put
    assert "telemetry_points-0009" in repeats  # received, never acked, sent again
    assert len(cloud.streams_opened) >= 2
    assert sender.stats.reconnects >= 1
    assert sender.stats.sent >= len(cloud.received) > 60
    assert sender.stats.acked == 60
    assert "stream failed with UNAVAILABLE: stream dropped by the test" in caplog.text


def test_receiver_that_ends_the_stream_is_reconnected(outbox, servers, senders, caplog):
    cloud = FakeCloud()
    cloud.end_after = 3
    server = servers(cloud)
    fill(outbox, 10)
    with caplog.at_level(logging.WARNING, LOGGER):
        sender = senders(outbox, server.target)
        assert sender.flush(10.0)
    assert len(cloud.stored) == 10
    assert len(cloud.streams_opened) >= 2
    assert "the receiver closed the stream" in caplog.text


def test_missing_ack_reopens_the_stream(outbox, servers, senders, caplog):
    cloud = FakeCloud()
    cloud.stall_once = 1.5
    server = servers(cloud)
    batches = fill(outbox, 3)
    with caplog.at_level(logging.WARNING, LOGGER):
        sender = senders(outbox, server.target, ack_timeout_s=0.3)
        assert sender.flush(10.0)
    assert set(cloud.stored) == {b.batch_id for b in batches}
    assert (
        "no Ack for 0.3s with 3 batch(es) in flight (ack_timeout_s=0.3); reopening the "
        "stream" in caplog.text
    )


def test_unknown_ack_status_keeps_the_batch(outbox, servers, senders, caplog):
    cloud = FakeCloud()
    cloud.status_override = uplink_pb2.Ack.STATUS_UNSPECIFIED
    server = servers(cloud)
    fill(outbox, 2)
    with caplog.at_level(logging.WARNING, LOGGER):
        sender = senders(outbox, server.target)
        wait_until(lambda: "unknown Ack status" in caplog.text, "the protocol warning")
    assert outbox.stats().batches == 2
    assert (
        "the receiver answered batch telemetry_points-0000 with unknown Ack status 0; the "
        "batch stays in the outbox. Hint: the receiver speaks a different version" in caplog.text
    )
    cloud.status_override = None
    assert sender.flush(10.0)


def test_ack_for_a_batch_not_in_flight_is_ignored(outbox, servers, senders, caplog):
    cloud = FakeCloud()
    cloud.bogus_ack_once = True
    server = servers(cloud)
    fill(outbox, 3)
    with caplog.at_level(logging.WARNING, LOGGER):
        sender = senders(outbox, server.target)
        assert sender.flush(5.0)
    assert sender.stats.acked == 3
    assert len(cloud.streams_opened) == 1
    assert "Ack for batch 'no-such-batch' that is not in flight (status STORED); ignored" in caplog.text


def test_unexpected_error_in_the_sender_is_logged_and_retried(outbox, servers, senders, caplog):
    server = servers()
    fill(outbox, 3)
    real_next = outbox.next
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real_next(*args, **kwargs)

    with (
        mock.patch.object(outbox, "next", side_effect=failing_once),
        caplog.at_level(logging.WARNING, LOGGER),
    ):
        sender = senders(outbox, server.target)
        assert sender.flush(5.0)
    assert "unexpected error in the sender" in caplog.text
    assert (
        "OperationalError: disk I/O error; unacknowledged batches stay in the outbox" in caplog.text
    )
    assert len(server.cloud.stored) == 3


def test_bandwidth_cap_slows_sending(tmp_path, servers, senders):
    def run(rate: int | None) -> tuple[float, FakeCloud]:
        cloud = FakeCloud()
        server = servers(cloud)
        box = Outbox(tmp_path / f"outbox-{rate}.sqlite")
        batches = fill(box, 10, size=2500)
        total = sum(len(b.payload) for b in batches)
        assert 25_000 < total < 26_000
        start = time.monotonic()
        sender = senders(box, server.target, bandwidth_bytes_per_s=rate)
        assert sender.flush(15.0)
        elapsed = time.monotonic() - start
        assert sender.stats.wire_bytes == total
        sender.stop()
        box.close()
        return elapsed, cloud

    free, _ = run(None)
    capped, cloud = run(10_000)
    # a one-second burst (10 kB), then 10 kB/s; a message may overdraw the bucket, so the
    # last of the ~25.4 kB goes out after (25.4 - 10 - 2.54) / 10 = 1.29 s
    assert capped >= 1.2
    assert capped > 3 * free
    span = cloud.arrivals[-1] - cloud.arrivals[0]
    assert span >= 1.2


def test_stop_leaves_unacked_batches_in_the_outbox(outbox, servers, senders, caplog):
    cloud = FakeCloud()
    cloud.ack_delay = 0.3
    server = servers(cloud)
    fill(outbox, 6)
    sender = senders(outbox, server.target, window=2)
    wait_until(lambda: cloud.received, "the first batch")
    caplog.set_level(logging.INFO, LOGGER)
    sender.stop()
    assert sender.state == "stopped"
    left = outbox.stats().batches
    assert 4 <= left <= 6
    assert len(cloud.stored) == 6 - left
    assert "stopped (outbox: " in caplog.text


def test_flush_times_out_when_the_cloud_is_down(outbox, senders):
    fill(outbox, 2)
    sender = senders(outbox, f"127.0.0.1:{free_port()}")
    start = time.monotonic()
    assert sender.flush(0.3) is False
    assert 0.25 <= time.monotonic() - start < 2.0
    assert outbox.stats().batches == 2


def test_sender_expires_old_batches(tmp_path, senders):
    box = Outbox(tmp_path / "o.sqlite", OutboxSettings(ttl=timedelta(hours=1)))
    old = datetime.now(UTC) - timedelta(hours=2)
    box.put(make_batch("old", at=old))
    box.put(make_batch("new"))
    senders(box, f"127.0.0.1:{free_port()}", expire_interval_s=0.05)
    wait_until(lambda: box.stats().expired == 1, "the TTL expiry")
    assert [s.batch_id for s in box.next(10)] == ["new"]
    box.close()


def test_closing_the_outbox_stops_the_sender(tmp_path, senders, caplog):
    box = Outbox(tmp_path / "o.sqlite")
    sender = senders(box, f"127.0.0.1:{free_port()}", backoff_min_s=0.02, backoff_max_s=0.05)
    wait_until(lambda: sender.state == "backoff", "backoff")
    with caplog.at_level(logging.ERROR, LOGGER):
        box.close()
        wait_until(lambda: sender.state == "stopped", "the sender to stop")
    assert (
        "was closed while the sender ran; the sender stops. Hint: stop the sender before "
        "closing its outbox" in caplog.text
    )
    with pytest.raises(
        RuntimeError,
        match=r"uplink to 127.0.0.1:\d+: cannot start, the outbox "
        r"'.*o.sqlite' is closed",
    ):
        sender.start()


def test_stats_snapshot(outbox, senders):
    sender = senders(outbox, "127.0.0.1:9", start=False)
    assert sender.state == "stopped"
    assert sender.stats == UplinkStats("stopped", 0, 0, 0, 0, 0, 0, None)


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("edge-01.client")
    other_ca = trustme.CA()
    d = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(d / "ca.pem")
    other_ca.cert_pem.write_to_path(d / "other-ca.pem")
    client_cert.cert_chain_pems[0].write_to_path(d / "client.pem")
    client_cert.private_key_pem.write_to_path(d / "client.key")
    return {
        "dir": d,
        "ca_pem": ca.cert_pem.bytes(),
        "server_key": server_cert.private_key_pem.bytes(),
        "server_chain": b"".join(p.bytes() for p in server_cert.cert_chain_pems),
    }


def test_tls(outbox, servers, senders, pki):
    creds = grpc.ssl_server_credentials([(pki["server_key"], pki["server_chain"])])
    server = servers(credentials=creds)
    batches = fill(outbox, 4)
    sender = senders(outbox, server.target, tls_ca=pki["dir"] / "ca.pem")
    assert sender.flush(10.0)
    assert set(server.cloud.stored) == {b.batch_id for b in batches}
    assert server.cloud.peers[-1].get("transport_security_type") == [b"ssl"]


def test_tls_with_an_untrusted_server_certificate_fails(outbox, servers, senders, pki):
    creds = grpc.ssl_server_credentials([(pki["server_key"], pki["server_chain"])])
    server = servers(credentials=creds)
    fill(outbox, 2)
    sender = senders(outbox, server.target, tls_ca=pki["dir"] / "other-ca.pem")
    wait_until(lambda: sender.stats.last_error, "the handshake failure")
    assert sender.flush(0.3) is False
    assert server.cloud.received == []
    assert "UNAVAILABLE" in sender.stats.last_error


def test_plaintext_sender_cannot_talk_to_a_tls_receiver(outbox, servers, senders, pki):
    creds = grpc.ssl_server_credentials([(pki["server_key"], pki["server_chain"])])
    server = servers(credentials=creds)
    fill(outbox, 2)
    sender = senders(outbox, server.target)
    wait_until(lambda: sender.stats.last_error, "a failure")
    assert server.cloud.received == []
    assert outbox.stats().batches == 2


def test_mutual_tls(outbox, servers, senders, pki):
    creds = grpc.ssl_server_credentials(
        [(pki["server_key"], pki["server_chain"])],
        root_certificates=pki["ca_pem"],
        require_client_auth=True,
    )
    server = servers(credentials=creds)
    batches = fill(outbox, 4)
    sender = senders(
        outbox,
        server.target,
        tls_ca=pki["dir"] / "ca.pem",
        tls_cert=pki["dir"] / "client.pem",
        tls_key=pki["dir"] / "client.key",
    )
    assert sender.flush(10.0)
    assert set(server.cloud.stored) == {b.batch_id for b in batches}
    peer = server.cloud.peers[-1]
    assert b"edge-01.client" in b"".join(peer.get("x509_subject_alternative_name", []))


def test_mutual_tls_without_client_certificate_is_refused(outbox, servers, senders, pki):
    creds = grpc.ssl_server_credentials(
        [(pki["server_key"], pki["server_chain"])],
        root_certificates=pki["ca_pem"],
        require_client_auth=True,
    )
    server = servers(credentials=creds)
    fill(outbox, 2)
    sender = senders(outbox, server.target, tls_ca=pki["dir"] / "ca.pem")
    wait_until(lambda: sender.stats.last_error, "the refused handshake")
    assert sender.flush(0.3) is False
    assert server.cloud.received == []


def test_tls_server_name_override(outbox, servers, senders, pki):
    ca = trustme.CA()
    cert = ca.issue_cert("cloud.example.test")
    ca.cert_pem.write_to_path(pki["dir"] / "named-ca.pem")
    creds = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), b"".join(p.bytes() for p in cert.cert_chain_pems))]
    )
    server = servers(credentials=creds)
    fill(outbox, 2)
    sender = senders(
        outbox,
        server.target,
        tls_ca=pki["dir"] / "named-ca.pem",
        tls_server_name="cloud.example.test",
    )
    assert sender.flush(10.0)


# -- kill -9 of the edge while sending ---------------------------------------------------------

_SENDER = """
import sys, time
from pathlib import Path
from connectors.uplink.outbox import Outbox
from connectors.uplink.sender import UplinkSender
from connectors.uplink.settings import UplinkSettings
box = Outbox(Path(sys.argv[1]))
sender = UplinkSender(box, UplinkSettings(target=sys.argv[2], key="edge-01",
                      secret="s3cret-edge-01", backoff_min_s=0.05, backoff_max_s=0.2, window=4))
sender.start()
print("started", flush=True)
time.sleep(60)
"""


def test_kill_9_while_sending_loses_nothing(tmp_path, servers, senders):
    cloud = FakeCloud()
    cloud.ack_delay = 0.02
    server = servers(cloud)
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    batches = fill(box, 80, "telemetry_summary")
    fill(box, 20, "alarms")
    box.close()
    put = {b.batch_id for b in batches} | {f"alarms-{i:04d}" for i in range(20)}

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SENDER, str(path), server.target],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout.readline().strip() == "started"
        wait_until(lambda: len(cloud.stored) >= 30, "the subprocess to deliver 30 batches")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    with cloud.lock:
        stored_at_kill = set(cloud.stored)
    assert len(stored_at_kill) < len(put), "killed mid-way"

    box = Outbox(path)
    try:
        waiting = {s.batch_id for s in box.next(1000)}
        assert put - stored_at_kill <= waiting  # nothing unacknowledged was lost
        assert len(waiting) < len(put)
        sender = senders(box, server.target)
        assert sender.flush(15.0)
        assert box.stats().batches == 0
    finally:
        sender.stop()
        box.close()
    assert set(cloud.received) == put
    assert set(cloud.stored) == put
    assert all(cloud.received.count(i) <= 2 for i in put)


# -- settings and errors ----------------------------------------------------------------------


def test_backoff_is_exponential_with_full_jitter():
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(60.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 60.0, rng) for _ in range(200)]
        assert all(0.5 <= d <= cap for d in delays)
        if attempt >= 3:
            assert max(delays) > 0.8 * cap and min(delays) < 0.5 + 0.2 * cap
    assert backoff_delay(10_000, 0.5, 60.0, rng) <= 60.0


def test_push_method_path():
    assert PUSH_METHOD == "/edgesieve.uplink.v1.Uplink/Push"


def test_repr_hides_the_secret():
    settings = UplinkSettings(target="127.0.0.1:1", key=KEY, secret=SECRET)
    assert SECRET not in repr(settings)
    assert "edge-01" in repr(settings)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"target": ""},
            ValueError,
            r"UplinkSettings\.target: must be HOST:PORT, e\.g\. 127\.0\.0\.1:8080 or \[::1\]:8080 "
            r"\(got ''\); hint: give a host and a port without spaces",
        ),
        ({"target": "host 1:5"}, ValueError, r"\(got 'host 1:5'\); hint: give a host and a port"),
        ({"target": "cloud.example"}, ValueError, r"\(got 'cloud\.example'\); hint: give both"),
        ({"target": "cloud:99999"}, ValueError, r"hint: the port must be a number 0-65535"),
        ({"target": "cloud:0"}, ValueError, r"hint: give the port the server listens on"),
        (
            {"target": "dns:///cloud .example:1"},
            ValueError,
            r"UplinkSettings\.target: a gRPC target URI has no spaces \(got 'dns:///cloud "
            r"\.example:1'\); hint: dns:///cloud\.example:50051",
        ),
        ({"key": ""}, ValueError, r"UplinkSettings.key must be a non-empty string; got str"),
        (
            {"secret": None},
            ValueError,
            r"UplinkSettings.secret must be a non-empty string; got NoneType",
        ),
        (
            {"secret": "caf\u00e9"},
            ValueError,
            r"UplinkSettings.secret must be printable ASCII because it travels as gRPC metadata; it "
            r"contains a character outside 0x20-0x7E. Hint: generate it with secrets.token_urlsafe",
        ),
        (
            {"tls_cert": "c.pem"},
            ValueError,
            r"UplinkSettings: set both tls_cert and tls_key for mutual TLS, or neither; got "
            r"tls_cert=c.pem, tls_key=None",
        ),
        ({"tls_ca": 5}, TypeError, r"UplinkSettings.tls_ca must be a path or None; got 5"),
        (
            {"backoff_min_s": 0},
            ValueError,
            r"UplinkSettings.backoff_min_s must be a positive number of seconds; got 0. Hint: 0.5",
        ),
        ({"backoff_max_s": float("inf")}, ValueError, r"backoff_max_s must be a positive number"),
        (
            {"backoff_min_s": 5.0, "backoff_max_s": 1.0},
            ValueError,
            r"UplinkSettings.backoff_max_s \(1.0\) must not be smaller than backoff_min_s \(5.0\)",
        ),
        (
            {"bandwidth_bytes_per_s": 0},
            ValueError,
            r"UplinkSettings.bandwidth_bytes_per_s must be a positive int or None \(unlimited\); got 0",
        ),
        (
            {"window": 0},
            ValueError,
            r"UplinkSettings.window must be an int >= 1 \(batches in flight\); got 0",
        ),
        ({"ack_timeout_s": -1}, ValueError, r"UplinkSettings.ack_timeout_s must be a positive"),
        (
            {"expire_interval_s": "60"},
            ValueError,
            r"UplinkSettings.expire_interval_s must be a positive",
        ),
        (
            {"tls_server_name": 3},
            TypeError,
            r"UplinkSettings.tls_server_name must be a string or None; got 3",
        ),
    ],
)
def test_settings_errors(kwargs, error, match):
    params = {"target": "127.0.0.1:50051", "key": KEY, "secret": SECRET, **kwargs}
    with pytest.raises(error, match=match):
        UplinkSettings(**params)


def test_unreadable_tls_file(outbox, tmp_path):
    settings = UplinkSettings(
        target="127.0.0.1:1", key=KEY, secret=SECRET, tls_ca=tmp_path / "missing.pem"
    )
    with pytest.raises(
        ValueError,
        match=r"UplinkSettings\.tls_ca: the PEM file does not exist \(got '.*missing\.pem'\)",
    ):
        UplinkSender(outbox, settings)


def test_tls_file_that_is_not_pem(outbox, tmp_path):
    (tmp_path / "ca.der").write_bytes(b"\x30\x82\x01\x0a" * 10)
    settings = UplinkSettings(
        target="127.0.0.1:1", key=KEY, secret=SECRET, tls_ca=tmp_path / "ca.der"
    )
    with pytest.raises(
        ValueError,
        match=r"UplinkSettings\.tls_ca: the file is not PEM, 40 bytes without a '-----BEGIN' "
        r"line \(got '.*ca\.der'\); hint: convert DER with",
    ):
        UplinkSender(outbox, settings)


def test_sender_argument_types(outbox):
    settings = UplinkSettings(target="127.0.0.1:1", key=KEY, secret=SECRET)
    with pytest.raises(TypeError, match=r"UplinkSender: outbox must be an Outbox; got str"):
        UplinkSender("outbox", settings)
    with pytest.raises(
        TypeError, match=r"UplinkSender: settings must be an UplinkSettings; got dict"
    ):
        UplinkSender(outbox, {})
