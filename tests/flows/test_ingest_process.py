"""The ingest process: devices are answered only after the journal commit, and it is supervised."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connectors.devices.journal import Journal, JournalReader, JournalSettings
from connectors.devices.mosquitto import Mosquitto
from connectors.devices.mqtt.client import MqttSettings
from connectors.devices.mqtt.journaled import JournaledMqtt
from flows.config import ConfigError, EdgeConfig, parse_config
from flows.ingest_process import journal_settings, run_ingest
from flows.ingest_supervisor import IngestSupervisor
from tests.conftest import (
    DEVICES,
    ROOT,
    TOKEN_1,
    coap_client,
    curl,
    free_port,
    mosquitto_pub,
    wait_for,
    write_devices,
)

CHANNELS = ("telemetry", "vibration")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(
    tmp_path: Path,
    broker: Mosquitto | None,
    *,
    http: bool = True,
    coap: bool = True,
    max_bytes: int | None = None,
    http_port: int | None = None,
) -> EdgeConfig:
    data: dict[str, Any] = {"data_dir": str(tmp_path / "var"), "transports": {}}
    if http or coap:
        data["devices"] = str(write_devices(tmp_path, DEVICES))
    if broker is not None:
        data["transports"]["mqtt"] = {"url": broker.url, "client_id": "edge-test"}
    if http:
        data["transports"]["http"] = {"listen": f"127.0.0.1:{http_port or free_port()}"}
    if coap:
        data["transports"]["coap"] = {"listen": f"127.0.0.1:{free_udp_port()}"}
    data["journal"] = {"partitions": 1}
    if max_bytes is not None:  # the whole journal for one device
        data["journal"]["max_bytes"] = max_bytes
        data["journal"]["device_share"] = 1.0
    return parse_config(data)


def journaled(config: EdgeConfig) -> list[bytes]:
    """Every payload in the journal, in offset order."""
    root = journal_settings(config).root
    with JournalReader(root, 0) as reader:
        return [msg.payload for _, msg in reader.read(-1, 10_000)]


def http_url(config: EdgeConfig, token: str = TOKEN_1) -> str:
    assert config.transports.http is not None
    return f"http://{config.transports.http.listen}/api/v1/{token}/telemetry"


def coap_url(config: EdgeConfig, token: str = TOKEN_1) -> str:
    assert config.transports.coap is not None
    return f"coap://{config.transports.coap.listen}/api/v1/{token}/telemetry"


class IngestThread:
    """:func:`run_ingest` in a thread of the test process."""

    def __init__(self, config: EdgeConfig) -> None:
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self._thread.start()
        wait_for(lambda: self.ready.is_set() or self.error, "the ingest to be ready", 20)
        if self.error is not None:
            raise self.error

    def _run(self, config: EdgeConfig) -> None:
        try:
            run_ingest(config, channels=CHANNELS, stop=self.stop, ready=self.ready.set)
        except BaseException as exc:  # reported to the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


@pytest.fixture
def ingest() -> Iterator[Callable[[EdgeConfig], IngestThread]]:
    started: list[IngestThread] = []

    def start(config: EdgeConfig) -> IngestThread:
        thread = IngestThread(config)
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.close()


def mqtt_settings_for(broker: Mosquitto, **kwargs: Any) -> MqttSettings:
    return MqttSettings(url=broker.url, channels=CHANNELS, client_id="edge-journaled", **kwargs)


def publish(broker: Mosquitto, device: str, payload: str) -> None:
    mosquitto_pub(broker, f"v1/devices/{device}/telemetry", message=payload, qos=1)


# --- answers after the commit -------------------------------------------------------------------


def test_http_and_coap_answer_after_the_commit(
    tmp_path: Path, ingest: Callable[[EdgeConfig], IngestThread]
) -> None:
    config = make_config(tmp_path, None)
    ingest(config)
    reply = curl(http_url(config), b'{"t": 1}')
    assert reply.status == 200
    assert journaled(config) == [b'{"t": 1}']  # committed before the 200 was sent
    bad = curl(http_url(config), b"{broken")
    assert bad.status == 400 and bad.error.startswith("telemetry: ")
    assert journaled(config)[-1] == b"{broken"  # a dead letter for the flow, committed first
    answer = coap_client(coap_url(config), text='{"t": 2}')
    assert [c for c in answer.codes if c != "0.00"] == ["2.04"]  # piggy-backed or separate
    assert journaled(config)[-1] == b'{"t": 2}'


def test_mqtt_puback_goes_out_after_the_commit(tmp_path: Path, mosquitto: Mosquitto) -> None:
    journal = Journal(JournalSettings(root=tmp_path / "journal", partitions=1))
    mqtt = JournaledMqtt(mqtt_settings_for(mosquitto, protocol="5"), journal)
    in_journal_at_ack: list[list[bytes]] = []
    send_ack = mqtt._client.ack

    def ack(mid: int, qos: int) -> Any:
        with JournalReader(tmp_path / "journal", 0) as reader:
            in_journal_at_ack.append([m.payload for _, m in reader.read(-1, 100)])
        return send_ack(mid, qos)

    mqtt._client.ack = ack  # type: ignore[method-assign]
    try:
        mqtt.start()
        wait_for(lambda: mqtt.ready, "the journaled client to subscribe")
        for n in range(3):
            publish(mosquitto, "pump-1", f'{{"n": {n}}}')
        wait_for(lambda: mqtt.acked == 3, "three PUBACKs")
    finally:
        journal.close()
        mqtt.close()
    # at each PUBACK the journal holds that message and every earlier one (later ones may have
    # joined the same group commit)
    sent = [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert len(in_journal_at_ack) == 3
    for k, held in enumerate(in_journal_at_ack):
        assert held[: k + 1] == sent[: k + 1]
    assert (mqtt.committed, mqtt.duplicates, mqtt.withheld) == (3, 0, 0)


_CRASH_BEFORE_PUBACK = """
import os, sys, time
from pathlib import Path
from connectors.devices.journal import Journal, JournalSettings
from connectors.devices.mqtt.client import MqttSettings
from connectors.devices.mqtt.journaled import JournaledMqtt

JournaledMqtt._ack = lambda self, pending: os._exit(3)  # committed, PUBACK never sent
journal = Journal(JournalSettings(root=Path(sys.argv[1]), partitions=1))
settings = MqttSettings(url=sys.argv[2], channels=("telemetry", "vibration"),
                        client_id="edge-journaled")
mqtt = JournaledMqtt(settings, journal)
mqtt.start()
deadline = time.monotonic() + 20
while not mqtt.ready and time.monotonic() < deadline:
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(20)
os._exit(4)
"""


@pytest.mark.slow
def test_a_crash_between_commit_and_puback_stores_the_redelivery_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    root = tmp_path / "journal"
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASH_BEFORE_PUBACK, str(root), mosquitto.url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready", child.stderr.read()
        publish(mosquitto, "pump-1", '{"once": 1}')
        assert child.wait(20) == 3
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with JournalReader(root, 0) as reader:
        assert [m.payload for _, m in reader.read(-1, 10)] == [b'{"once": 1}']
    journal = Journal(JournalSettings(root=root, partitions=1))
    mqtt = JournaledMqtt(mqtt_settings_for(mosquitto), journal)
    try:
        mqtt.start()
        wait_for(lambda: mqtt.acked == 1, "the redelivered message to be acknowledged", 20)
    finally:
        journal.close()
        mqtt.close()
    assert (mqtt.received, mqtt.duplicates, mqtt.committed) == (1, 1, 0)
    with JournalReader(root, 0) as reader:
        assert [m.payload for _, m in reader.read(-1, 10)] == [b'{"once": 1}']


# --- a full journal ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_journal_pushes_devices_back_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, ingest: Callable[[EdgeConfig], IngestThread]
) -> None:
    config = make_config(tmp_path, None, max_bytes=30)
    ingest(config)
    assert curl(http_url(config), b'{"fill": 123456789}').status == 200  # 19 of 30 bytes
    refused = curl(http_url(config), b'{"more": 123456789}')
    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert refused.error.startswith("edge is busy: journal full: 19 payload bytes held of ")
    assert refused.error.endswith("; retry in 1s")
    answer = coap_client(coap_url(config), text='{"more": 123456789}')
    assert answer.code == "5.03"
    assert answer.diagnostic.startswith("edge is busy: journal full: 19 payload bytes held")

    # MQTT on a journal of its own, just as small: PUBACKs are withheld, then sent
    root = tmp_path / "mqtt-journal"
    journal = Journal(JournalSettings(root=root, partitions=1, max_bytes=30, device_share=1.0))
    mqtt = JournaledMqtt(mqtt_settings_for(mosquitto), journal)
    try:
        mqtt.start()
        wait_for(lambda: mqtt.ready, "the journaled client to subscribe")
        payloads = [f'{{"n": {n:09d}}}' for n in range(5)]  # 16 bytes each
        for payload in payloads:
            publish(mosquitto, "pump-1", payload)
        wait_for(lambda: mqtt.received == 5, "five messages")
        wait_for(lambda: mqtt.withheld_now == 4, "four withheld messages")
        assert mqtt.acked == 1
        with JournalReader(root, 0) as reader:
            for _ in range(4):  # each release makes room for one more
                wait_for(lambda r=reader: r.last_offset() >= 0, "a commit")
                reader.release("test", reader.last_offset())
                done = mqtt.acked + 1
                wait_for(lambda d=done: mqtt.acked >= d, "a withheld message to be acked", 15)
            assert mqtt.acked == 5 and mqtt.withheld_now == 0
    finally:
        journal.close()
        mqtt.close()
    assert mqtt.dropped == 0
    with JournalReader(root, 0) as reader:
        rows = reader.read(-1, 10)
        assert [m.payload.decode() for _, m in rows] == payloads[-1:], rows
        assert reader.last_offset() == 4  # five committed, in arrival order, four released


# --- the supervised process ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_supervisor_restarts_a_killed_ingest_process_and_nothing_is_lost(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, mosquitto, coap=False)
    supervisor = IngestSupervisor(config, channels=CHANNELS)
    caplog.set_level(logging.INFO, "edgesieve.ingest")
    supervisor.start()
    try:
        wait_for(lambda: supervisor.ready, "the ingest process to be ready", 30)
        with pytest.raises(RuntimeError, match=r"^IngestSupervisor.start: already started; "):
            supervisor.start()
        publish(mosquitto, "pump-1", '{"n": 1}')
        assert curl(http_url(config), b'{"n": 2}').status == 200
        wait_for(lambda: len(journaled(config)) == 2, "two journaled messages")
        pid = supervisor.pid
        assert pid is not None and pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not supervisor.ready, "the supervisor to notice")
        publish(mosquitto, "pump-1", '{"n": 3}')  # queued in the edge's session meanwhile
        wait_for(lambda: supervisor.restarts == 1 and supervisor.ready, "a restart", 30)
        assert supervisor.pid not in (None, pid)
        assert curl(http_url(config), b'{"n": 4}').status == 200
        wait_for(lambda: len(journaled(config)) == 4, "four journaled messages", 15)
    finally:
        supervisor.stop()
    assert supervisor.pid is None
    assert sorted(journaled(config)) == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b'{"n": 4}']
    assert f"ingest process (pid {pid}) was killed by signal 9; restarting it in 0.5s" in (
        caplog.text
    )


@pytest.mark.slow
def test_a_first_start_that_fails_is_not_retried_and_its_line_reaches_the_supervisor(
    tmp_path: Path,
    taken_port: int,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    config = make_config(tmp_path, None, coap=False, http_port=taken_port)
    reasons: list[str] = []
    supervisor = IngestSupervisor(config, channels=CHANNELS, on_failure=reasons.append)
    caplog.set_level(logging.INFO, "edgesieve.ingest")
    supervisor.start()
    try:
        wait_for(lambda: reasons, "the start failure", 20)
        time.sleep(1.0)  # longer than the first backoff: no restart comes
        assert supervisor.restarts == 0 and not supervisor.ready
    finally:
        supervisor.stop()
    line = (
        f"transports.http.listen: 127.0.0.1:{taken_port} is in use (Address already in use); "
        f"hint: stop the program that holds port {taken_port} or choose another port"
    )
    assert reasons == [line] and supervisor.failure == line
    assert f"ERROR edgesieve.ingest: ingest: cannot run: {line}" in capfd.readouterr().err
    assert "restarting" not in caplog.text


def test_a_journal_still_locked_by_a_previous_process_is_retried_until_free(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, None, coap=False)
    reasons: list[str] = []
    supervisor = IngestSupervisor(config, channels=CHANNELS, on_failure=reasons.append)
    previous = Journal(journal_settings(config))  # holds writer.lock, like an ingest stopping
    try:
        supervisor.start()
        wait_for(lambda: supervisor.restarts >= 1, "a retry", 20)
        assert reasons == [] and supervisor.failure is None and not supervisor.ready
    finally:
        previous.close()
    try:
        wait_for(lambda: supervisor.ready, "a start once the journal is free", 30)
    finally:
        supervisor.stop()


def test_a_process_that_ran_and_cannot_come_back_is_retried(tmp_path: Path) -> None:
    config = make_config(tmp_path, None, coap=False)
    assert config.transports.http is not None
    port = int(config.transports.http.listen.rsplit(":", 1)[1])
    reasons: list[str] = []
    supervisor = IngestSupervisor(config, channels=CHANNELS, on_failure=reasons.append)
    supervisor.start()
    try:
        wait_for(lambda: supervisor.ready, "the ingest process to get ready", 30)
        pid = supervisor.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: supervisor.pid is None, "the ingest process to be gone")
        with socket.socket() as thief:  # its port is taken while it is down
            thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            thief.bind(("127.0.0.1", port))
            thief.listen()
            wait_for(lambda: supervisor.restarts >= 2, "restarts that fail", 30)
        assert reasons == [] and supervisor.failure is None
        wait_for(lambda: supervisor.ready, "a restart once the port is free", 30)
    finally:
        supervisor.stop()


def test_standalone_port_in_use_exits_2_with_one_line(tmp_path: Path, taken_port: int) -> None:
    config = make_config(tmp_path, None, coap=False, http_port=taken_port)
    config_file = tmp_path / "edge.yaml"
    assert config.devices is not None
    config_file.write_text(
        f"data_dir: {config.data_dir}\ndevices: {config.devices}\n"
        f"transports: {{http: {{listen: '127.0.0.1:{taken_port}'}}}}\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.ingest_process", "--config", str(config_file)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    errors = [line for line in proc.stderr.decode().splitlines() if " ERROR " in line]
    assert proc.returncode == 2, proc.stderr.decode()
    assert len(errors) == 1 and "Traceback" not in proc.stderr.decode()
    assert (
        f"ingest: cannot run: transports.http.listen: 127.0.0.1:{taken_port} is in use" in errors[0]
    )


def test_standalone_sigterm_is_a_clean_stop(tmp_path: Path) -> None:
    config = make_config(tmp_path, None, coap=False)
    config_file = tmp_path / "edge.yaml"
    assert config.devices is not None and config.transports.http is not None
    config_file.write_text(
        f"data_dir: {config.data_dir}\ndevices: {config.devices}\n"
        f"transports: {{http: {{listen: '{config.transports.http.listen}'}}}}\n"
        "journal: {partitions: 1}\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.ingest_process", "--config", str(config_file)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and status != 200:
            try:
                status = curl(http_url(config), b'{"t": 1}').status
            except RuntimeError:
                time.sleep(0.1)
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    assert "ingest: stopped" in proc.stderr.read().decode()
    assert journaled(config) == [b'{"t": 1}']


# --- errors --------------------------------------------------------------------------------------


def test_run_ingest_without_transports_is_a_config_error(tmp_path: Path) -> None:
    config = parse_config({"data_dir": str(tmp_path)})
    with pytest.raises(
        ConfigError,
        match=r"^transports: none is configured, so the ingest process has nothing to serve; "
        r"hint: add transports.mqtt, transports.http, transports.coap or transports.mqtt_server "
        r"to the config$",
    ):
        run_ingest(config, channels=CHANNELS, stop=threading.Event())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"receive_maximum": 0},
            r"^JournaledMqtt: receive_maximum must be an integer in 1..65535, got 0; "
            r"hint: unacknowledged messages in flight, e.g. 1000$",
        ),
        (
            {"max_withheld": 0},
            r"^JournaledMqtt: max_withheld must be an integer >= 1, got 0; "
            r"hint: leave it unset \(twice receive_maximum\)$",
        ),
    ],
)
def test_journaled_mqtt_settings_are_checked(
    tmp_path: Path, kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        JournaledMqtt(MqttSettings(), object(), **kwargs)  # type: ignore[arg-type]


def test_refused_credentials_are_one_log_line(
    tmp_path: Path,
    mosquitto_factory: Callable[..., Mosquitto],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from connectors.devices.broker_auth import EdgeAccount, write_mosquitto_config
    from tests.conftest import device_registry

    passwd, acl = write_mosquitto_config(
        device_registry(), EdgeAccount("edge", "edge-secret-0123"), tmp_path / "auth"
    )
    broker = mosquitto_factory(password_file=passwd, acl_file=acl).start()
    journal = Journal(JournalSettings(root=tmp_path / "journal", partitions=1))
    settings = mqtt_settings_for(
        broker,
        username="edge",
        password="wrong-password",
        reconnect_min_s=0.05,
        reconnect_max_s=0.1,
    )
    mqtt = JournaledMqtt(settings, journal)
    caplog.set_level(logging.INFO, "edgesieve.mqtt.journaled")
    try:
        mqtt.start()
        wait_for(lambda: mqtt.connect_failures >= 3, "three refused attempts")
    finally:
        journal.close()
        mqtt.close()
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusals) == 1, caplog.text
    assert (
        refusals[0]
        .getMessage()
        .startswith(
            f"mqtt client edge-journaled: broker 127.0.0.1:{broker.port} refused the connection ("
        )
    )
    assert "hint: check transports.mqtt.username/password against the broker" in (
        refusals[0].getMessage()
    )
    assert "wrong-password" not in caplog.text


def stop_within(supervisor: IngestSupervisor, seconds: float) -> None:
    """``supervisor.stop()``, failing the test if it has not returned after ``seconds``."""
    stopper = threading.Thread(target=supervisor.stop, name="test-stop", daemon=True)
    stopper.start()
    stopper.join(seconds)
    if stopper.is_alive():
        pytest.fail(f"IngestSupervisor.stop() still blocked after {seconds:g}s")


@pytest.mark.slow
def test_stop_right_after_the_ingest_process_died_returns(tmp_path: Path) -> None:
    # A child that dies inside a wait for its parent's stop word (here kill -9; SIGTERM before it
    # handled SIGTERM) must not leave the stop waiting for it.
    config = make_config(tmp_path, None, coap=False)
    supervisor = IngestSupervisor(config, channels=CHANNELS)
    supervisor.start()
    try:
        wait_for(lambda: supervisor.ready, "the ingest process to be ready", 30)
        pid = supervisor.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: supervisor.pid is None, "the ingest process to be gone")
    finally:
        stop_within(supervisor, 10)
    assert supervisor.restarts == 0


@pytest.mark.slow
def test_sigterm_to_the_ingest_process_is_a_clean_stop_and_the_supervisor_restarts_it(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, mosquitto, coap=False)
    supervisor = IngestSupervisor(config, channels=CHANNELS)
    caplog.set_level(logging.INFO, "edgesieve.ingest")
    supervisor.start()
    try:
        wait_for(lambda: supervisor.ready, "the ingest process to be ready", 30)
        assert curl(http_url(config), b'{"n": 1}').status == 200
        pid = supervisor.pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: supervisor.restarts == 1 and supervisor.ready, "a restart", 30)
        publish(mosquitto, "pump-1", '{"n": 2}')
        wait_for(lambda: len(journaled(config)) == 2, "two journaled messages")
    finally:
        stop_within(supervisor, 30)
    assert sorted(journaled(config)) == [b'{"n": 1}', b'{"n": 2}']
    assert f"ingest process (pid {pid}) exited with status 0; restarting it" in caplog.text
