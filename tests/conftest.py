"""Fixtures shared by the whole suite: a real mosquitto broker, its clients, dataflow runners."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import cluster_main, run_main

from connectors.devices.broker import EmbeddedBroker, Mosquitto

PUB_TIMEOUT_S = 15.0


class Broker(Protocol):
    """What the helpers need from a broker: where it listens."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def require_binaries(*names: str) -> None:
    """Skip (locally) or fail (when CI is set) if a broker binary is missing."""
    missing = [
        name
        for name in names
        if shutil.which(name) is None and shutil.which(name, path="/usr/sbin") is None
    ]
    if not missing:
        return
    reason = f"{', '.join(missing)} not installed (apt-get install mosquitto mosquitto-clients)"
    if os.environ.get("CI") is not None:
        pytest.fail(f"{reason}; CI is set, so the MQTT tests must run", pytrace=False)
    pytest.skip(reason)


def mosquitto_pub(
    broker: Broker,
    topic: str,
    *,
    message: bytes | str | None = None,
    file: Path | None = None,
    lines: Iterable[str] | None = None,
    qos: int = 1,
    username: str | None = None,
    password: str | None = None,
    protocol: str = "mqttv311",
    client_id: str | None = None,
    timeout: float = PUB_TIMEOUT_S,
) -> None:
    """Publish with the real ``mosquitto_pub`` binary; raise with its stderr on failure.

    Exactly one of ``message`` (str or bytes, bytes go through stdin), ``file``
    (one message with the file's content) or ``lines`` (one message per line,
    ``-l``) is used.
    """
    given = [x is not None for x in (message, file, lines)]
    if sum(given) != 1:
        msg = "mosquitto_pub: give exactly one of message=, file= or lines="
        raise ValueError(msg)
    require_binaries("mosquitto_pub")
    cmd = [
        "mosquitto_pub",
        "-h",
        broker.host,
        "-p",
        str(broker.port),
        "-t",
        topic,
        "-q",
        str(qos),
        "-V",
        protocol,
    ]
    if username is not None:
        cmd += ["-u", username]
    if password is not None:
        cmd += ["-P", password]
    if client_id is not None:
        cmd += ["-i", client_id]
    stdin: bytes | None = None
    if isinstance(message, str):
        cmd += ["-m", message]
    elif isinstance(message, bytes):
        cmd += ["-s"]
        stdin = message
    elif file is not None:
        cmd += ["-f", str(file)]
    else:
        assert lines is not None
        cmd += ["-l"]
        stdin = "".join(f"{line}\n" for line in lines).encode()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        msg = (
            f"mosquitto_pub to {broker.host}:{broker.port} topic {topic!r} failed "
            f"(exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()}"
        )
        raise RuntimeError(msg)


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``cond`` every 10 ms until it is truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


class FlowThread:
    """A Bytewax dataflow running in a background thread (``run_main`` or ``cluster_main``)."""

    def __init__(self, flow: Dataflow, *, workers: int = 1) -> None:
        self.flow = flow
        self.workers = workers
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"flow-{flow.flow_id}", daemon=True)

    def _run(self) -> None:
        try:
            if self.workers == 1:
                run_main(self.flow)
            else:
                cluster_main(self.flow, [], 0, worker_count_per_proc=self.workers)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def start(self) -> FlowThread:
        """Start the dataflow thread."""
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the dataflow is still running."""
        return self._thread.is_alive()

    def join(self, timeout: float = 15.0) -> None:
        """Wait for the dataflow to end; fail on timeout, re-raise its error."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"dataflow {self.flow.flow_id!r} did not finish within {timeout:g}s")
        if self.error is not None:
            raise self.error


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Make (not start) Mosquitto brokers in ``tmp_path``; all are stopped at teardown."""
    require_binaries("mosquitto")
    brokers: list[Mosquitto] = []

    def make(name: str = "mosquitto", **kwargs: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / name, **kwargs)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A started mosquitto on an ephemeral loopback port, with persistence in ``tmp_path``."""
    return mosquitto_factory().start()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """A started amqtt broker on an ephemeral loopback port."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(name="mosquitto_pub")
def mosquitto_pub_fixture() -> Callable[..., None]:
    """The :func:`mosquitto_pub` helper (skips or fails like ``mosquitto`` when missing)."""
    require_binaries("mosquitto_pub")
    return mosquitto_pub


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Any]:
    """The :func:`wait_for` polling helper."""
    return wait_for


@pytest.fixture
def run_flow() -> Iterator[Callable[..., FlowThread]]:
    """Start dataflows in background threads; ``stops`` events are set at teardown."""
    started: list[tuple[FlowThread, list[threading.Event]]] = []

    def start(
        flow: Dataflow, *, workers: int = 1, stops: Iterable[threading.Event] = ()
    ) -> FlowThread:
        runner = FlowThread(flow, workers=workers).start()
        started.append((runner, list(stops)))
        return runner

    yield start
    for _runner, stops in started:
        for stop in stops:
            stop.set()
    for runner, _ in started:
        runner._thread.join(10.0)
